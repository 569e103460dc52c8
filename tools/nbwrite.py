"""Shared by the tools/make_*.py scripts: write a notebook without outputs."""
import nbformat as nbf

#: the cell constructors every generator uses: md("markdown"), code("python")
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
          "language_info": {"name": "python"}}


def write_notebook(cells, path: str) -> None:
    """Write ``cells`` (nbformat v4 cells) to ``path`` with the python3 kernel, no outputs."""
    nbf.write(nbf.v4.new_notebook(cells=cells, metadata=KERNEL), path)
    print(f"wrote {path}")
