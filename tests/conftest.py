import functools
import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` runs two workers on two cores: one thread each. With torch's default (a thread
    # per core) the workers' OpenMP threads fight over the cores; on a busy 2-core machine a
    # test that takes 10 s alone took over 100 s.
    # Subprocesses the tests start inherit the setting through OMP_NUM_THREADS.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@functools.cache
def tiny_shakespeare_file() -> Path:
    """Tiny Shakespeare found the way neoxlab finds it, in the environment pytest started in:
    NEOXLAB_DATA_MIRROR when set, else the neoxlab cache, else the canonical download."""
    from neoxlab.data.corpora import fetch_shakespeare
    from neoxlab.errors import NeoxlabError

    try:
        return fetch_shakespeare()
    except NeoxlabError as error:
        pytest.exit(f"the tests need Tiny Shakespeare: {error}", returncode=2)


def pytest_sessionstart(session):
    # Fetched once here, before the workers start, so `-n 2` downloads it once, and a machine
    # without the network or a mirror stops with one line instead of a hundred errors.
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        tiny_shakespeare_file()


@pytest.fixture(scope="session")
def shakespeare_mirror(tmp_path_factory) -> Path:
    """A mirror folder (tinyshakespeare/input.txt) for the tests: they never download."""
    mirror = tmp_path_factory.mktemp("mirror")
    (mirror / "tinyshakespeare").mkdir()
    (mirror / "tinyshakespeare" / "input.txt").symlink_to(tiny_shakespeare_file())
    return mirror


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    return tiny_shakespeare_file().read_text(encoding="utf-8")


TINY_MODEL = [
    "hidden-size=32",
    "num-layers=2",
    "num-attention-heads=2",
    "seq-length=32",
    "micro-batch-size=2",
    "global-batch-size=4",
    "vocab-size=300",
    "lr=3e-3",
    "warmup=2",
    "train-iters=20",
    "eval-interval=10",
    "eval-iters=2",
    "log-interval=5",
    "save-interval=10",
    "sample-tokens=8",
]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory, shakespeare_text) -> Path:
    """The first 100k characters of Tiny Shakespeare as a split jsonl (fast to tokenize)."""
    from neoxlab.data.corpora import write_shakespeare_jsonl

    folder = tmp_path_factory.mktemp("corpus")
    return write_shakespeare_jsonl(shakespeare_text[:100_000], folder / "tiny.jsonl")


@pytest.fixture
def tiny_overrides(tiny_corpus) -> list[str]:
    """Overrides for a seconds-long CPU training run on the tiny corpus."""
    return [*TINY_MODEL, f"data-path={tiny_corpus}", "device=cpu"]


@pytest.fixture(autouse=True)
def _matmul_precision():
    """A test that builds a runtime changes torch's process-wide fp32 matmul precision (bf16
    arithmetic on a CPU): later tests in the worker get torch's default back."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch, shakespeare_mirror):
    """Every test runs in its own folder (runs/ lands there) with its own download cache, the
    test mirror, and W&B off, whatever the user's shell exports (WANDB_DIR, WANDB_PROJECT, ...):
    a test that needs W&B sets its variables itself."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEOXLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NEOXLAB_DATA_MIRROR", str(shakespeare_mirror))
    for name in [name for name in os.environ if name.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "disabled")
