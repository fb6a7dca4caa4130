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

# The repository is checked out beside shared/ (here and in CI); shared/data holds corpora
# that tests read instead of downloading them.
SHARED_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data_dir() -> Path:
    if not (SHARED_DATA_DIR / "tinyshakespeare" / "input.txt").is_file():
        pytest.fail(f"shared test data missing: {SHARED_DATA_DIR}/tinyshakespeare/input.txt")
    return SHARED_DATA_DIR


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
def tiny_corpus(tmp_path_factory) -> Path:
    """The first 100k characters of Tiny Shakespeare as a split jsonl (fast to tokenize)."""
    from neoxlab.data.corpora import write_shakespeare_jsonl

    text = (SHARED_DATA_DIR / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    folder = tmp_path_factory.mktemp("corpus")
    return write_shakespeare_jsonl(text[:100_000], folder / "tiny.jsonl")


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
def _isolated(tmp_path, monkeypatch):
    """Every test runs in its own folder (runs/ lands there) with its own download cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEOXLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NEOXLAB_DATA_MIRROR", str(SHARED_DATA_DIR))
    monkeypatch.setenv("WANDB_MODE", "disabled")
