"""The house stays light (issue 8): no product function longer than 60 lines, and the product's size
in lines printed for the record. `python tests/test_house.py` prints both."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
FOLDERS = ("minilora", "kernels")  # the product


def product_files(folder: str) -> list[Path]:
    """The files the issue counts: `cat minilora/*.py minilora/*/*.py kernels/*.py | wc -l`."""
    return sorted((ROOT / folder).glob("*.py")) + sorted((ROOT / folder).glob("*/*.py"))


def functions(folder: str) -> list[tuple[int, str]]:
    """(lines from `def` to the last line, "file:function") for every function in the folder."""
    out = []
    for path in product_files(folder):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{path.relative_to(ROOT)}:{node.name}"
                out.append((node.end_lineno - node.lineno + 1, name))
    return sorted(out, reverse=True)


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_function_longer_than_60_lines(folder):
    long = [f"{name} ({n} lines)" for n, name in functions(folder) if n > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines; name their parts: {long}"


def main() -> None:
    total = 0
    for folder in FOLDERS:
        for path in product_files(folder):
            n = len(path.read_text(encoding="utf-8").splitlines())
            total += n
            print(f"{n:6d}  {path.relative_to(ROOT)}")
    print(f"{total:6d}  product (minilora/*.py minilora/*/*.py kernels/*.py)")
    for folder in FOLDERS:
        print(f"longest functions in {folder}/:")
        for n, name in functions(folder)[:5]:
            print(f"{n:6d}  {name}")


if __name__ == "__main__":
    main()
