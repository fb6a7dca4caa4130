"""The training loop: end to end on a tiny model, exact resume, divergence, precision."""

import json

import pytest
import torch
from safetensors.torch import load_file

from neoxlab.checkpoint import list_checkpoints, load_training_state, read_state
from neoxlab.config import load_config
from neoxlab.errors import NeoxlabError
from neoxlab.model import GPTNeoX
from neoxlab.tracking import read_metrics
from neoxlab.trainer import Trainer, train


def run(overrides, **kwargs):
    return train(load_config([], overrides), progress=False, log=lambda _: None, **kwargs)


def test_end_to_end_run_directory(tiny_overrides, tmp_path):
    result = run([*tiny_overrides, "run-name=e2e"])
    run_dir = result.run_dir
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("e2e-")
    for name in ("config.yml", "metrics.jsonl", "tokenizer.json", "tokenizer_config.json"):
        assert (run_dir / name).is_file(), name
    metrics = read_metrics(run_dir)
    train_steps = [m["step"] for m in metrics if "train/loss" in m]
    assert train_steps == [1, 5, 10, 15, 20]  # first and last always logged
    evals = [m for m in metrics if "val/loss" in m]
    assert [m["step"] for m in evals] == [0, 10, 20]
    first = metrics[1]
    for key in ("tokens", "train/lr", "train/grad_norm", "train/tokens_per_second"):
        assert key in first
    assert first["tokens"] == 4 * 32
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 1.0
    assert evals[-1]["val/ppl"] == pytest.approx(2.718281828 ** evals[-1]["val/loss"], rel=1e-6)
    assert 0 <= evals[-1]["val/acc"] <= 1
    assert result.best_val_loss == min(m["val/loss"] for m in evals)
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert [c.name for c in checkpoints] == ["step_0000010", "step_0000020"]
    samples = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert samples == ["step_0000000.txt", "step_0000010.txt", "step_0000020.txt"]
    # the checkpoint folder is self-contained and loads without pickles
    state = read_state(checkpoints[-1])
    assert state["step"] == 20 and state["config"]["hidden-size"] == 32
    assert "optimizer" in load_training_state(checkpoints[-1])


def test_exact_resume_matches_uninterrupted(tiny_overrides):
    overrides = [*tiny_overrides, "hidden-dropout=0.1"]  # dropout: the RNG state must resume too
    full = run([*overrides, "run-name=full"])
    first = run([*overrides, "run-name=part", "exit-interval=10"])
    assert not first.finished and first.step == 10
    resumed = run(overrides, resume=first.run_dir)
    assert resumed.finished and resumed.step == 20
    full_metrics = read_metrics(full.run_dir)
    resumed_metrics = read_metrics(resumed.run_dir)
    loss = {m["step"]: m["train/loss"] for m in full_metrics if "train/loss" in m}
    resumed_loss = {m["step"]: m["train/loss"] for m in resumed_metrics if "train/loss" in m}
    assert resumed_loss.keys() == loss.keys()  # no duplicated or missing steps after resume
    assert abs(resumed_loss[20] - loss[20]) <= 1e-6
    a = load_file(str(full.run_dir / "checkpoints/step_0000020/model.safetensors"))
    b = load_file(str(resumed.run_dir / "checkpoints/step_0000020/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_run(tiny_overrides):
    overrides = [*tiny_overrides, "train-iters=5", "sample-tokens=0", "save=false"]
    a, b = run(overrides), run(overrides)
    losses = [
        [m["train/loss"] for m in read_metrics(r.run_dir) if "train/loss" in m] for r in (a, b)
    ]
    assert losses[0] == losses[1]


def test_gradient_accumulation_matches_one_big_batch(tiny_overrides):
    common = [*tiny_overrides, "train-iters=3", "log-interval=1", "sample-tokens=0", "save=false"]
    accumulated = run([*common, "micro-batch-size=2", "global-batch-size=4"])
    single = run([*common, "micro-batch-size=4", "global-batch-size=4"])
    losses = [
        [m["train/loss"] for m in read_metrics(r.run_dir) if "train/loss" in m]
        for r in (accumulated, single)
    ]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_non_finite_loss_stops_with_checkpoint_kept(tiny_overrides, monkeypatch):
    original = GPTNeoX.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        logits, loss = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 2 * 12:  # 12 steps of 2 micro-batches, then NaN
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPTNeoX, "forward", poisoned)
    trainer = Trainer(load_config([], tiny_overrides), progress=False, log=lambda _: None)
    with pytest.raises(NeoxlabError, match=r"step 13.*non-finite.*step_0000010"):
        trainer.run()
    assert [c.name for c in list_checkpoints(trainer.run_dir / "checkpoints")] == ["step_0000010"]


def test_fp16_on_cpu_falls_back_to_fp32_with_notice(tiny_overrides):
    notices = []
    trainer = Trainer(
        load_config([], [*tiny_overrides, "fp16.enabled=true"]), progress=False, log=notices.append
    )
    assert trainer.runtime.precision == "fp32"
    assert any("fp16" in n and "fp32" in n for n in notices)


def test_resume_without_checkpoint_is_clear(tiny_overrides, tmp_path):
    run_dir = tmp_path / "runs" / "empty"
    run_dir.mkdir(parents=True)
    with pytest.raises(NeoxlabError, match="no checkpoint"):
        run(tiny_overrides, resume=run_dir)


def test_config_saved_to_run_reloads(tiny_overrides):
    result = run([*tiny_overrides, "train-iters=2", "save=false", "sample-tokens=0"])
    reloaded = load_config([result.run_dir / "config.yml"])
    assert reloaded.train_iters == 2 and reloaded.hidden_size == 32
    assert json.loads((result.run_dir / "tokenizer_config.json").read_text())["eos_token"]


def test_validation_windows_do_not_depend_on_the_seed(tiny_overrides):
    """Runs of different seeds are scored on the same validation text, trained on other windows."""
    from neoxlab.data.batches import EVAL_STREAM, TRAIN_STREAM
    from neoxlab.data.prepare import build_samplers, prepare_data

    batches = {}
    for seed in (1, 2):
        config = load_config([], [*tiny_overrides, f"seed={seed}"])
        train_sampler, val_sampler = build_samplers(config, prepare_data(config, lambda _: None))
        batches[seed] = (
            train_sampler.batch(0, 4, TRAIN_STREAM).inputs,
            val_sampler.batch(0, 4, EVAL_STREAM).inputs,
        )
    assert not batches[1][0].equal(batches[2][0])
    assert batches[1][1].equal(batches[2][1])
