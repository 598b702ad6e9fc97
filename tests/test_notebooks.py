"""The committed notebooks: numbered, stripped, with a papermill parameters cell of literals."""

from __future__ import annotations

import ast
import json
import re

import pytest

from cam.study import paths

pytestmark = pytest.mark.study  # the study's tests: `make test-backends` runs -m "not study"

NOTEBOOKS = sorted(paths.NOTEBOOKS_DIR.glob("*.ipynb"))


def test_there_are_numbered_notebooks():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        assert re.fullmatch(r"[A-Z]?\d\d-[a-z0-9-]+\.ipynb", path.name), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped_and_parameterised(path):
    book = json.loads(path.read_text())
    code = [c for c in book["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), \
        f"{path.name} is committed with outputs; run nbstripout"
    tagged = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    tree = ast.parse("".join(tagged[0]["source"]))
    for node in tree.body:
        assert isinstance(node, ast.Assign), f"{path.name}: parameters cell has {ast.dump(node)}"
        ast.literal_eval(node.value)  # literals only: papermill does not recompute derived values
    names = {t.id for node in tree.body for t in node.targets}
    assert {"dataset", "data_dir", "output_dir"} <= names


EXECUTED = sorted(paths.RESULTS_DIR.glob("*/notebooks/*.ipynb"))
#: A machine's folders: an executed copy names paths relative to the repository.
ABSOLUTE = re.compile(r"/(work|home|root|tmp)/")
#: A logger's or Python's warning printed into a cell (TensorFlow's go to stdout).
WARNING_LINE = re.compile(r"^(WARNING:\S+:|.*\b\w*Warning: )", re.MULTILINE)


def _texts(cell):
    """(where, text) of a cell's source and every text its outputs hold."""
    yield "source", "".join(cell["source"])
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            yield output["name"], "".join(output["text"])
        elif output["output_type"] == "error":
            yield "error", "\n".join(output["traceback"])
        for mime, value in output.get("data", {}).items():
            if mime.startswith("text/"):
                yield mime, "".join(value)


@pytest.mark.parametrize("path", EXECUTED, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_executed_notebook_is_clean(path):
    """The executed copies `make reproduce` commits: no machine's folders (output_dir is
    injected relative to the repository), nothing on stderr, no errors, no warnings."""
    book = json.loads(path.read_text())
    papermill = json.dumps(book["metadata"].get("papermill", {}))  # parameters, paths
    problems = [f"papermill's metadata names {ABSOLUTE.search(papermill).group(0)}"
                ] if ABSOLUTE.search(papermill) else []
    for i, cell in enumerate(book["cells"]):
        for where, text in _texts(cell):
            first = text.strip().splitlines()[0][:120] if text.strip() else ""
            if where in ("stderr", "error"):
                problems.append(f"cell {i}: {where}: {first}")
            elif ABSOLUTE.search(text):
                problems.append(f"cell {i}: {where} names {ABSOLUTE.search(text).group(0)}: "
                                f"{text[max(0, ABSOLUTE.search(text).start() - 40):][:120]!r}")
            elif where != "source" and WARNING_LINE.search(text):
                problems.append(f"cell {i}: {where}: {WARNING_LINE.search(text).group(0)[:120]}")
    more = f"\n... and {len(problems) - 12} more" if len(problems) > 12 else ""
    assert not problems, f"{path.relative_to(paths.ROOT)}:\n" + "\n".join(problems[:12]) + more
