"""The project's own text: one meaning per public name, and nothing that points outside the
repository or at how the project is managed."""
import ast
import collections
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the entry-point convention: ``main`` of each runnable module means the same thing
SHARED_BY_CONVENTION = {"main"}
#: references to files outside the repository, issue numbers, acceptance targets
OUTSIDE = re.compile(r"papers\.md|style\.md|\bissues?\s*#?\d+|(?<![\w&/])#\d{2,}\b|"
                     r"acceptance (?:target|criteri)", re.IGNORECASE)
#: a test asserting such a reference is absent names it, and is no such reference itself
ABSENCE_CHECK = re.compile(r"assert .* not in ")


def public_definitions(root: Path) -> dict[str, list[str]]:
    found = collections.defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                found[node.name].append(str(path.relative_to(root)))
    return found


def test_no_two_public_functions_or_classes_share_a_name():
    shared = {name: where for name, where in public_definitions(ROOT / "mixlab").items()
              if len(where) > 1 and name not in SHARED_BY_CONVENTION}
    assert not shared, f"one name, one meaning: {shared}"


def test_the_name_check_catches_a_repeated_name(tmp_path):
    (tmp_path / "a.py").write_text("def evaluate():\n    pass\n")
    (tmp_path / "b.py").write_text("class evaluate:\n    pass\n")
    assert len(public_definitions(tmp_path)["evaluate"]) == 2


def project_text_files():
    for pattern in ("mixlab/**/*.py", "tests/*.py", "tools/*.py", "notebooks/*.py",
                    "docs/*.md", "*.md", "Makefile", "pyproject.toml"):
        for path in sorted(ROOT.glob(pattern)):
            if path.name != Path(__file__).name:
                yield path


def test_no_text_points_outside_the_repository_or_at_issue_numbers():
    hits = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
            for path in project_text_files()
            for i, line in enumerate(path.read_text().splitlines(), 1)
            if OUTSIDE.search(line) and not ABSENCE_CHECK.search(line)]
    assert not hits, "\n".join(hits)


def test_the_text_check_catches_what_it_is_for():
    for bad in ("see ../shared/papers.md", "the house style.md", "fixes issue 14",
                "as in #123", "the acceptance target"):
        assert OUTSIDE.search(bad), bad
    for fine in ("tensor[#0]", "colour &#160;", "issubclass", "an editing session"):
        assert not OUTSIDE.search(fine), fine
