"""configs/shakespeare_char_fast.yml: no more parameters than shakespeare_char.yml, and it trains.

Its time target (val <= 1.45 within 8 s on an H100) is measured by
bench/shakespeare_time_to_loss.py, not here."""

from pathlib import Path

import torch

from neoxlab.config import load_config, model_config, padded_vocab_size
from neoxlab.model import GPTNeoX
from neoxlab.tracking import read_metrics
from neoxlab.trainer import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CHAR_VOCAB = 65 + 2  # Tiny Shakespeare's characters and the two special tokens


def parameters(name: str) -> int:
    config = load_config([CONFIGS / name], notice=lambda _: None)
    vocab = padded_vocab_size(CHAR_VOCAB, config.make_vocab_size_divisible_by)
    with torch.device("meta"):
        return GPTNeoX(model_config(config, vocab)).num_parameters()


def test_fast_config_has_no_more_parameters_than_the_reference():
    assert parameters("shakespeare_char_fast.yml") <= parameters("shakespeare_char.yml")


def test_fast_config_trains_on_cpu(tiny_corpus, tmp_path):
    """The config's recipe (optimizer, schedule, dropout, clipping) on a CPU-sized network:
    narrower, shorter sequences, a smaller batch, 20 steps (still inside its warmup) and
    two-batch evaluations. Its real shape is the parameter test's."""
    overrides = [
        f"data-path={tiny_corpus}",
        f"vocab-file={tmp_path / 'char.json'}",
        "device=cpu",
        "hidden-size=64",
        "num-layers=2",
        "num-attention-heads=2",
        "seq-length=64",
        "micro-batch-size=4",
        "global-batch-size=4",
        "train-iters=20",
        "eval-interval=20",
        "eval-iters=2",
        "sample-tokens=0",
        "save=false",
    ]
    config = load_config([CONFIGS / "shakespeare_char_fast.yml"], overrides)
    assert (config.lr_decay_style, config.min_lr, config.warmup) == ("linear", 0.0, 50)
    result = train(config, progress=False, log=lambda _: None)
    evals = [m["val/loss"] for m in read_metrics(result.run_dir) if "val/loss" in m]
    assert len(evals) == 2 and evals[-1] < evals[0] - 0.5
