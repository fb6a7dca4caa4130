"""The two Colab notebooks: committed clean, and executed end to end on a CPU with tiny
parameters (papermill), in a temporary folder so that nothing lands in the checkout."""

import itertools
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import papermill
import pytest
import torch

from neoxlab.compare import load_run
from neoxlab.config import load_config
from neoxlab.data.corpora import fetch_shakespeare, write_shakespeare_jsonl
from neoxlab.tokenizer import read_text
from neoxlab.tracking import read_metrics, read_summary
from neoxlab.trainer import train

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "notebooks" / "shakespeare_training_notebook.ipynb"
CODE = ROOT / "notebooks" / "code_completion_notebook.ipynb"
NOTEBOOKS = [SHAKESPEARE, CODE]
CONFIG = ROOT / "configs" / "shakespeare.yml"
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
    "sample-tokens=8",
]
SHAKESPEARE_PARAMETERS = {
    "train_iters": 24,
    "experiment_iters": 8,
    "eval_interval": 12,
    "eval_iters": 2,
    "log_interval": 4,
    "model_overrides": TINY_MODEL,
    "device": "cpu",
    "use_wandb": True,  # no key and no WANDB_MODE: offline, the path users take without an account
    "resume_main_run": True,  # the test leaves a stopped main run behind (see the test)
}
CODE_PARAMETERS = {
    "train_iters": 12,
    "experiment_iters": 6,
    "eval_interval": 6,
    "eval_iters": 2,
    "line_completion_samples": 2,
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
    "adamw-seed2",
    "llama",
]
README = ROOT / "README.md"


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


def _code_cell(path: Path, containing: str) -> str:
    notebook = nbformat.read(path, as_version=4)
    return next(
        c.source for c in notebook.cells if c.cell_type == "code" and containing in c.source
    )


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
    # As on a fresh Colab: no key, and no WANDB_MODE to say what to do without one.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
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
    names = {"train_iters", "device", "use_wandb", "model_overrides", "resume_main_run"}
    assert names <= _parameter_names(path)
    # A short run still draws a curve: the evaluation interval follows train_iters by default.
    assert papermill.inspect_notebook(str(path))["eval_interval"]["default"] == "None"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_keeps_colabs_torch_and_clones_the_readme_url(path):
    install = _code_cell(path, '"google.colab" in sys.modules')
    # pip installs neoxlab under a constraint that pins torch to the version already there
    assert 'keep_torch.write_text(f"torch=={torch.__version__}' in install
    assert '"--constraint", str(keep_torch)' in install
    assert "print(f\"installing neoxlab beside Colab's torch {torch.__version__}" in install
    # the clone URL is the one the README tells people to clone
    url = re.search(r'REPO_URL = "([^"]+)"', install).group(1)
    assert f"git clone {url}" in README.read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_stops_on_a_cpu_unless_asked(path, tmp_path, kernel_environment):
    """device="auto" without a GPU: *Run all* stops at the GPU check with neoxlab's one-line
    error, before any data is prepared (device="cpu", asked for on purpose, trains: below)."""
    with pytest.raises(papermill.PapermillExecutionError) as stopped:
        _execute(path, tmp_path, {"device": "auto", "use_wandb": False})
    assert stopped.value.ename == "NeoxlabError"
    error = next(
        output
        for cell in nbformat.read(tmp_path / path.name, as_version=4).cells
        for output in cell.get("outputs", [])
        if output["output_type"] == "error"
    )
    assert len(error["traceback"]) == 1  # one line, not a traceback
    assert error["traceback"][0].startswith("error: no GPU here")
    assert 'device = "cpu"' in error["traceback"][0]
    assert list((tmp_path / "work").iterdir()) == []  # no data, tokenizer or runs


def _stopped_main_run_and_a_newer_run(work: Path) -> Path:
    """What a disconnect leaves: the notebook's main run stopped halfway with a checkpoint, and
    a newer run folder of another name (the newest run, which `latest` used to continue)."""
    data = write_shakespeare_jsonl(
        read_text(fetch_shakespeare()), work / "data" / "shakespeare.jsonl"
    )
    parameters = SHAKESPEARE_PARAMETERS
    overrides = [
        f"data-path={data}",
        # The notebook's own tokenizer file: trained here, the notebook finds it trained (as it
        # does after a disconnect) and resumes with it.
        f"vocab-file={work / 'tokenizer' / 'shakespeare-bpe-5000.json'}",
        "device=cpu",
        "run-name=main",
        f"train-iters={parameters['train_iters']}",
        f"exit-interval={parameters['train_iters'] // 2}",
        f"eval-interval={parameters['eval_interval']}",
        f"save-interval={parameters['eval_interval']}",
        f"eval-iters={parameters['eval_iters']}",
        *parameters["model_overrides"],
    ]
    stopped = train(load_config([CONFIG], overrides), config_files=[str(CONFIG)], progress=False)
    assert stopped.step == parameters["train_iters"] // 2 and not stopped.finished
    # copied, not copied with its times: every file of the copy is newer
    newer = work / "runs" / stopped.run_dir.name.replace("main-", "other-")
    shutil.copytree(stopped.run_dir, newer, copy_function=shutil.copy)
    return stopped.run_dir


@pytest.mark.slow
def test_shakespeare_notebook_runs(tmp_path, monkeypatch, kernel_environment):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # where the runs made here go: work/runs, as the notebook's
    main_run = _stopped_main_run_and_a_newer_run(work)
    notebook, work = _execute(SHAKESPEARE, tmp_path, SHAKESPEARE_PARAMETERS)
    stream = "".join(_outputs(notebook, "stream"))

    runs = {path.name.rsplit("-", 1)[0]: path for path in (work / "runs").iterdir()}
    expected_runs = {"main", "baseline", "lr-x3", "batch-x2", "depth-x2", "llama-block"}
    expected_runs.add("resume-demo")
    assert set(runs) == {*expected_runs, "other"}
    # resume_main_run: the main run continued by name, not the newest run folder
    assert list((work / "runs").glob("main-*")) == [main_run]
    assert f"resuming {main_run.name} from step_0000012" in stream
    assert [m["step"] for m in read_metrics(main_run) if "val/loss" in m] == [0, 12, 24]
    for name in expected_runs:
        expected = SHAKESPEARE_PARAMETERS["train_iters" if name == "main" else "experiment_iters"]
        if name == "resume-demo":
            expected = max(4, SHAKESPEARE_PARAMETERS["experiment_iters"] // 5)
        assert read_summary(runs[name])["step"] == expected, name
        assert list((runs[name] / "wandb").glob("offline-run-*")), f"{name} logged no W&B run"
    # no key and no WANDB_MODE: the notebook says W&B logs offline, and asks for nothing
    assert "W&B: no API key found, so runs log offline" in stream
    # the resume demo stopped halfway and continued: one run folder, two W&B offline parts
    assert len(list((runs["resume-demo"] / "wandb").glob("offline-run-*"))) == 2
    assert (work / "experiments.png").read_bytes().startswith(b"\x89PNG")
    # the architecture experiment trains Llama's block, by gpt-neox's keys
    llama = load_run(runs["llama-block"]).config
    assert (llama["norm"], llama["activation"], llama["gpt-j-residual"]) == (
        "rmsnorm",
        "swiglu",
        False,
    )
    exported = {path.name for path in next((work / "exports").iterdir()).iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= exported
    assert len(_outputs(notebook, "image/png")) >= 2  # the loss curve and the comparison
    assert "validation loss" in stream and "resuming resume-demo" in stream
    # the tokenizer's training code is shown (the run above trained it), the model printed and
    # run once with its shapes
    assert "def train_bpe(" in stream and "already trained:" in stream
    assert "embed_out                  -> (2, 64, 5120)" in stream
    assert "ln(5,120): the loss of guessing evenly" in stream


@pytest.mark.slow
def test_code_completion_notebook_runs(tmp_path, kernel_environment):
    notebook, work = _execute(CODE, tmp_path, CODE_PARAMETERS)

    runs = {path.name.rsplit("-", 1)[0]: path for path in (work / "runs").iterdir()}
    assert set(runs) == {"main", *CODE_EXPERIMENTS}
    assert len(_outputs(notebook, "image/png")) >= 5  # curves, schedules, three comparisons
    # The summary is built from the runs: each row shows the run's own best validation loss.
    summary = next(text for text in _outputs(notebook, "text/markdown") if "| run | steps" in text)
    rows = {line.split("|")[1].strip(): line for line in summary.splitlines()[2:]}
    assert set(rows) == {"main", *CODE_EXPERIMENTS}
    for name, run_dir in runs.items():
        assert f"| {load_run(run_dir).best_val_loss:.4f} |" in rows[name], name
    markdown = _outputs(notebook, "text/markdown")
    findings = next(text for text in markdown if "**Optimizers**" in text)
    best_loss = {name: load_run(run_dir).best_val_loss for name, run_dir in runs.items()}
    optimizers = ["sgd", "adamw", "lion", "muon"]
    assert f"first: **{min(optimizers, key=best_loss.get)}**" in findings
    # the noise threshold: the gap between two AdamW runs that differ only in their seed
    noise = abs(best_loss["adamw-seed2"] - best_loss["adamw"])
    assert f"ended {noise:.3f} apart" in findings
    clipping = next(line for line in findings.splitlines() if "**Clipping**" in line)
    within = abs(best_loss["adamw-clip-value"] - best_loss["adamw"]) <= noise
    assert ("within the noise" if within else "beyond the noise") in clipping
    # the architecture run: Llama's block, its parameter count printed beside Pythia's
    assert "**Architecture**, Llama's block" in findings
    llama = load_run(runs["llama"]).config
    assert (llama["norm"], llama["activation"], llama["use-bias-in-mlp"]) == (
        "rmsnorm",
        "swiglu",
        False,
    )
    stream = "".join(_outputs(notebook, "stream"))
    assert re.search(r"llama: [\d,]+ parameters, rmsnorm, swiglu", stream)
    assert (work / "architecture.png").read_bytes().startswith(b"\x89PNG")
    # the algorithm runs warm up: the learning rate climbs before it decays
    rates = [m["train/lr"] for m in read_metrics(runs["adamw"]) if "train/lr" in m]
    assert rates[0] < max(rates) and rates.index(max(rates)) > 0
