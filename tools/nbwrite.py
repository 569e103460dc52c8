"""Shared by the tools/make_*.py scripts: write a notebook without outputs."""
from pathlib import Path

import nbformat as nbf

#: the cell constructors every generator uses: md("markdown"), code("python")
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
          "language_info": {"name": "python"}}
#: the repository root: notebook paths are relative to it, whatever the working directory
ROOT = Path(__file__).resolve().parents[1]


def write_notebook(cells, path: str) -> None:
    """Write ``cells`` (nbformat v4 cells) to ``path`` (relative to the repository root) with
    the python3 kernel, no outputs."""
    out = ROOT / path
    nbf.write(nbf.v4.new_notebook(cells=cells, metadata=KERNEL), str(out))
    print(f"wrote {out.relative_to(ROOT)}")
