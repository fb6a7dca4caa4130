"""The two Colab notebooks: committed clean, and executed end to end on a CPU with tiny
parameters (papermill), in a temporary folder so that nothing lands in the checkout."""

import itertools
import json
import subprocess
from pathlib import Path

import nbformat
import papermill
import pytest

from neoxlab.compare import load_run

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "notebooks" / "shakespeare_training_notebook.ipynb"
CODE = ROOT / "notebooks" / "code_completion_notebook.ipynb"
NOTEBOOKS = [SHAKESPEARE, CODE]
COLAB_URL = "https://colab.research.google.com/github/neoxlab/neoxlab/blob/main/notebooks/"

# A model that trains in a fraction of a second per run, for both notebooks.
TINY_MODEL = [
    "hidden-size=32",
    "num-layers=2",
    "num-attention-heads=2",
    "seq-length=64",
    "max-position-embeddings=64",
    "micro-batch-size=2",
    "global-batch-size=4",
    "sample-tokens=16",
]
SHAKESPEARE_PARAMETERS = {
    "train_iters": 24,
    "experiment_iters": 8,
    "eval_interval": 12,
    "eval_iters": 2,
    "log_interval": 4,
    "model_overrides": TINY_MODEL,
    "device": "cpu",
    "use_wandb": True,  # offline (WANDB_MODE below): the path users take, without an account
}
CODE_PARAMETERS = {
    "train_iters": 12,
    "experiment_iters": 6,
    "eval_interval": 6,
    "eval_iters": 2,
    "line_completion_samples": 4,
    "log_interval": 3,
    "max_files": 40,
    "vocab_size": 400,
    "model_overrides": TINY_MODEL,
    "device": "cpu",
    "use_wandb": False,
}
CODE_EXPERIMENTS = [
    "sgd",
    "adamw",
    "lion",
    "muon",
    "adamw-linear",
    "adamw-wsd",
    "adamw-clip-value",
    "adamw-no-wd-embedding",
]


def _parameter_names(path: Path) -> set[str]:
    return set(papermill.inspect_notebook(str(path)))


def _checkout_changes() -> set[str]:
    """Files git sees as new or changed in the checkout, ignored ones included (empty when the
    checkout is not a git repository); the caches that tests running beside this one write
    (bytecode, pytest's, hypothesis' example database) left out."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--ignored", "--untracked-files=all"],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.splitlines() if done.returncode == 0 else []
    caches = ("__pycache__", ".pytest_cache", ".hypothesis/")
    return {line for line in lines if not any(cache in line for cache in caches)}


def _execute(path: Path, tmp_path: Path, parameters: dict) -> tuple[nbformat.NotebookNode, Path]:
    """Run the notebook in tmp_path with `parameters`; any cell error fails the test."""
    assert set(parameters) <= _parameter_names(path), "a parameter the notebook does not have"
    work = tmp_path / "work"
    before = _checkout_changes()
    executed = tmp_path / path.name
    papermill.execute_notebook(
        str(path),
        str(executed),
        parameters={**parameters, "work_dir": str(work), "repo_dir": str(ROOT)},
        cwd=str(tmp_path),
        kernel_name="python3",
        progress_bar=False,
        execution_timeout=120,  # no cell may wait for input (a W&B login prompt, say)
    )
    assert _checkout_changes() == before, "the notebook wrote into the repository checkout"
    return nbformat.read(executed, as_version=4), work


def _outputs(notebook: nbformat.NotebookNode, kind: str) -> list[str]:
    """The text of every output of that MIME type (or stream text for 'stream')."""
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if kind == "stream" and output["output_type"] == "stream":
                found.append(output["text"])
            elif kind in output.get("data", {}):
                found.append(output["data"][kind])
    return found


@pytest.fixture
def kernel_environment(tmp_path, monkeypatch):
    """What the kernel process inherits: W&B's files inside tmp_path and no credentials, one
    torch thread (two pytest workers already share the two cores; a second thread each only
    waits for a core)."""
    for variable, folder in (
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / folder))
    monkeypatch.setenv("NETRC", str(tmp_path / "wandb-home" / "netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    cells = notebook.cells
    code_cells = [cell for cell in cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code_cells), (
        f"{path.name} has outputs: python scripts/strip_notebook_outputs.py {path}"
    )
    assert cells[0].cell_type == "markdown" and COLAB_URL + path.name in cells[0].source
    for before, cell in itertools.pairwise(cells):
        if cell.cell_type == "code":
            assert before.cell_type == "markdown", f"no explanation before:\n{cell.source}"
    tagged = [cell for cell in code_cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert {"train_iters", "device", "use_wandb", "model_overrides"} <= _parameter_names(path)
    install = next(cell.source for cell in code_cells if "pip" in cell.source)
    assert '"google.colab" in sys.modules' in install
    assert "https://github.com/neoxlab/neoxlab" in install


@pytest.mark.slow
def test_shakespeare_notebook_runs(tmp_path, monkeypatch, kernel_environment):
    monkeypatch.setenv("WANDB_MODE", "offline")
    notebook, work = _execute(SHAKESPEARE, tmp_path, SHAKESPEARE_PARAMETERS)

    runs = {path.name.rsplit("-", 1)[0]: path for path in (work / "runs").iterdir()}
    assert set(runs) == {"main", "baseline", "lr-x3", "batch-x2", "depth-x2", "resume-demo"}
    for name, run_dir in runs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        expected = SHAKESPEARE_PARAMETERS["train_iters" if name == "main" else "experiment_iters"]
        if name == "resume-demo":
            expected = max(4, SHAKESPEARE_PARAMETERS["experiment_iters"] // 5)
        assert summary["step"] == expected, name
        assert list((run_dir / "wandb").glob("offline-run-*")), f"{name} logged no W&B run"
    # the resume demo stopped halfway and continued: one run folder, two W&B offline parts
    assert len(list((runs["resume-demo"] / "wandb").glob("offline-run-*"))) == 2
    assert (work / "experiments.png").read_bytes().startswith(b"\x89PNG")
    exported = {path.name for path in next((work / "exports").iterdir()).iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= exported
    assert len(_outputs(notebook, "image/png")) >= 2  # the loss curve and the comparison
    stream = "".join(_outputs(notebook, "stream"))
    assert "validation loss" in stream and "resuming resume-demo" in stream


@pytest.mark.slow
def test_code_completion_notebook_runs(tmp_path, kernel_environment):
    notebook, work = _execute(CODE, tmp_path, CODE_PARAMETERS)

    runs = {path.name.rsplit("-", 1)[0]: path for path in (work / "runs").iterdir()}
    assert set(runs) == {"main", *CODE_EXPERIMENTS}
    assert len(_outputs(notebook, "image/png")) >= 4  # curves, schedules, two comparisons
    # The summary is built from the runs: each row shows the run's own best validation loss.
    summary = next(text for text in _outputs(notebook, "text/markdown") if "| run | steps" in text)
    rows = {line.split("|")[1].strip(): line for line in summary.splitlines()[2:]}
    assert set(rows) == {"main", *CODE_EXPERIMENTS}
    for name, run_dir in runs.items():
        assert f"| {load_run(run_dir).best_val_loss:.4f} |" in rows[name], name
    markdown = _outputs(notebook, "text/markdown")
    findings = next(text for text in markdown if "**Optimizers**" in text)
    optimizers = ["sgd", "adamw", "lion", "muon"]
    best = min(optimizers, key=lambda name: load_run(runs[name]).best_val_loss)
    assert f"first: **{best}**" in findings
