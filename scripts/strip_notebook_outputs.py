"""Strip outputs and execution counts from notebooks before they are committed.

    python scripts/strip_notebook_outputs.py                 # every notebook under notebooks/
    python scripts/strip_notebook_outputs.py --check FILE    # exit 1 if FILE has outputs

Committed notebooks carry no outputs: diffs stay readable, and no run's numbers pose as the
notebook's (tests/test_notebooks.py checks it). Cell ids, tags and metadata are kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def has_outputs(notebook: nbformat.NotebookNode) -> bool:
    return any(
        cell.outputs or cell.execution_count is not None
        for cell in notebook.cells
        if cell.cell_type == "code"
    )


def strip(notebook: nbformat.NotebookNode) -> None:
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        # papermill and Jupyter record run times and states here; they are not content
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
    notebook.metadata.pop("papermill", None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="notebooks (default: notebooks/)")
    parser.add_argument("--check", action="store_true", help="only report notebooks with outputs")
    args = parser.parse_args(argv)
    files = args.files or sorted(NOTEBOOKS.glob("*.ipynb"))
    dirty = []
    for path in files:
        notebook = nbformat.read(path, as_version=4)
        if not has_outputs(notebook):
            continue
        dirty.append(path)
        if not args.check:
            strip(notebook)
            nbformat.write(notebook, path)
            print(f"stripped {path}")
    if args.check and dirty:
        print("notebooks with outputs: " + ", ".join(map(str, dirty)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
