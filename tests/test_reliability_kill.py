"""Kill anywhere: `neoxlab train` as a real process, SIGKILLed at seeded random moments and inside
checkpoint writes, resumed each time, ends with the weights of a run never interrupted; SIGINT and
SIGTERM checkpoint and stop cleanly. These are the suite's few real subprocess tests."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neoxlab.checkpoint import list_checkpoints, load_training_state, load_weights, read_state
from neoxlab.cli import main
from neoxlab.config import load_config
from neoxlab.data.prepare import prepare_data
from neoxlab.tokenizer import load_tokenizer
from neoxlab.tracking import Tracker, read_metrics
from neoxlab.trainer import train

# `neoxlab train` with test hooks that hold the process inside a checkpoint write until the test
# kills it (PAUSE_IN=weights:N: the Nth save of this process has written half its weights file;
# PAUSE_IN=prune:N: the Nth save's keep-last pruning has deleted the weights of an old
# checkpoint). SIGINT gets Python's default handler, as in a terminal (a shell running the tests
# in the background may have set it to "ignore").
LAUNCHER = r"""
import os, re, shutil, signal, sys, time
from pathlib import Path
import neoxlab.checkpoint as checkpoint
from neoxlab.cli import main

def hold():
    Path(os.environ["PAUSE_FLAG"]).write_text("paused")
    time.sleep(600)

stage, _, nth = os.environ.get("PAUSE_IN", "").partition(":")
saves = []
write_weights = checkpoint.save_file
remove_tree = shutil.rmtree

def save_file(tensors, filename, *args, **kwargs):
    write_weights(tensors, filename, *args, **kwargs)
    saves.append(filename)
    if stage == "weights" and len(saves) == int(nth):
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        hold()

def rmtree(path, *args, **kwargs):
    folder = Path(path)
    complete = (folder / "state.json").is_file() and (folder / "model.safetensors").is_file()
    if stage == "prune" and len(saves) >= int(nth) and complete:
        (folder / "model.safetensors").unlink()
        hold()
    remove_tree(path, *args, **kwargs)

checkpoint.save_file = save_file
shutil.rmtree = rmtree
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main(sys.argv[1:]))
"""

END = 30
RUN = [
    "seq-length=32",
    "hidden-size=32",
    "num-layers=2",
    "num-attention-heads=2",
    "micro-batch-size=2",
    "global-batch-size=4",
    "vocab-size=300",
    "lr=3e-3",
    "warmup=2",
    "hidden-dropout=0.1",  # dropout: the RNG state must survive the kills too
    f"train-iters={END}",
    "eval-interval=10",
    "eval-iters=1",
    "log-interval=1",
    "save-interval=2",
    "keep-last-k=3",
    "sample-tokens=0",
    "device=cpu",
]
TIMEOUT = 120


def environment(tmp_path: Path) -> dict[str, str]:
    # One thread each: the processes run side by side, and the numbers must not depend on it.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PAUSE_FLAG": str(tmp_path / "paused")}


def start(argv, tmp_path, **extra_env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, "train", *argv, "--no-progress"],
        cwd=tmp_path,
        env={**environment(tmp_path), **extra_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the run ended (rc {process.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            continue  # the line being written right now
    return steps


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=TIMEOUT)
    assert process.returncode == -signal.SIGKILL


def assert_checkpoints_readable(run_dir: Path) -> list[Path]:
    """Every checkpoint a reader can find loads completely, with finite weights."""
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    for checkpoint in checkpoints:
        assert read_state(checkpoint)["step"] == int(checkpoint.name.removeprefix("step_"))
        weights = load_weights(checkpoint)
        assert all(torch.isfinite(t).all() for t in weights.values()), checkpoint
        assert "optimizer" in load_training_state(checkpoint)
        load_tokenizer(checkpoint / "tokenizer.json")
    return checkpoints


def temporaries(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if ".tmp" in path.name]


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(tiny_corpus, tmp_path):
    run = [*RUN, f"data-path={tiny_corpus}"]
    prepare_data(load_config([], run), log=lambda _: None)  # both runs read one cached dataset
    reference = start([*run, "--name", "reference"], tmp_path)
    rng = random.Random(9)

    # 1. a seeded random moment (training, evaluating or saving: wherever it lands)
    process = start([*run, "--name", "killed"], tmp_path)
    run_dir = None

    def reached(step):
        def check():
            nonlocal run_dir
            found = list((tmp_path / "runs").glob("killed-*"))
            run_dir = found[0] if found else None
            return run_dir is not None and max(logged_steps(run_dir), default=0) >= step

        return check

    wait_for(reached(rng.randint(5, 9)), process, "the first kill point")
    time.sleep(rng.uniform(0, 0.05))
    kill(process)
    assert assert_checkpoints_readable(run_dir)

    resume = ["--resume", str(run_dir)]
    flag = tmp_path / "paused"
    for stage in ("weights", "prune", "random"):
        after = max(logged_steps(run_dir))
        if stage == "random":
            process = start(resume, tmp_path)
            wait_for(reached(after + rng.randint(3, 6)), process, "a random kill point")
            time.sleep(rng.uniform(0, 0.05))
        else:
            # 2. inside a write: the weights file half written / an old checkpoint half deleted
            flag.unlink(missing_ok=True)
            process = start(resume, tmp_path, PAUSE_IN=f"{stage}:{rng.randint(1, 2)}")
            wait_for(flag.exists, process, f"the {stage} hook")
        kill(process)
        assert assert_checkpoints_readable(run_dir)
        if stage != "random":  # the kill landed inside the write, which left its temporary
            assert temporaries(run_dir / "checkpoints")

    finished = start(resume, tmp_path)
    _, err = finished.communicate(timeout=TIMEOUT)
    assert finished.returncode == 0, err
    _, err_ref = reference.communicate(timeout=TIMEOUT)
    assert reference.returncode == 0, err_ref
    (reference_dir,) = (tmp_path / "runs").glob("reference-*")

    checkpoints = assert_checkpoints_readable(run_dir)
    assert checkpoints[-1].name == f"step_{END:07d}" and len(checkpoints) == 3  # keep-last-k
    assert temporaries(run_dir) == [] and temporaries(tiny_corpus.parent) == []
    a = load_file(str(checkpoints[-1] / "model.safetensors"))
    b = load_file(str(reference_dir / f"checkpoints/step_{END:07d}/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(folder):
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]

    assert losses(run_dir) == losses(reference_dir)  # every step once, same numbers


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_checkpoint_and_say_how_to_resume(tiny_corpus, tmp_path, stop):
    run = [*RUN, "train-iters=1000", "save-interval=1000", f"data-path={tiny_corpus}"]
    process = start([*run, "--name", "stopped"], tmp_path)
    runs = tmp_path / "runs"
    wait_for(
        lambda: any(max(logged_steps(d), default=0) >= 3 for d in runs.glob("stopped-*")),
        process,
        "step 3",
    )
    process.send_signal(stop)
    out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 128 + stop, err
    assert "Traceback" not in err
    (run_dir,) = runs.glob("stopped-*")
    (checkpoint,) = assert_checkpoints_readable(run_dir)
    step = read_state(checkpoint)["step"]
    name = signal.Signals(stop).name
    assert f"{name} received: stopping after this step" in out
    assert f"{name} received at step {step}; continue with: neoxlab train" in out
    command = re.search(r"continue with: (neoxlab train .*)", out).group(1).split()
    assert command[:4] == ["neoxlab", "train", "--resume", str(run_dir)]
    # the command printed continues the run (here only two more steps)
    assert main([*command[1:], f"train-iters={step + 2}", "--no-progress"]) == 0
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == f"step_{step + 2:07d}"


def test_signal_mid_run_resumes_exactly_and_a_second_one_stops_at_once(
    tiny_overrides, monkeypatch, capsys
):
    """In-process: the signal lands at a chosen step (a hook on the metrics log), the run stops
    after the next step with a checkpoint, and resuming gives the uninterrupted run's weights."""

    overrides = [*tiny_overrides, "hidden-dropout=0.1", "log-interval=1", "sample-tokens=0"]
    overrides += ["train-iters=12", "eval-interval=6"]
    log = Tracker.log
    signals_at = {}

    def log_and_signal(self, record):
        log(self, record)
        for _ in range(signals_at.get(record["step"], 0) if "train/loss" in record else 0):
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(Tracker, "log", log_and_signal)
    handler = signal.getsignal(signal.SIGINT)
    quiet = {"progress": False, "log": lambda _: None}
    full = train(load_config([], [*overrides, "run-name=full"]), **quiet)
    signals_at[7] = 1  # while step 7 is logged: step 8 is the last, logged and saved
    stopped = train(load_config([], [*overrides, "run-name=part"]), **quiet)
    assert (stopped.step, stopped.finished, stopped.stopped_by) == (8, False, "SIGINT")
    assert [m["step"] for m in read_metrics(stopped.run_dir) if "train/loss" in m][-1] == 8
    assert [c.name for c in list_checkpoints(stopped.run_dir / "checkpoints")] == ["step_0000008"]
    signals_at.clear()
    resumed = train(load_config([], overrides), resume=stopped.run_dir, **quiet)
    assert resumed.finished
    a = load_file(str(full.run_dir / "checkpoints/step_0000012/model.safetensors"))
    b = load_file(str(resumed.run_dir / "checkpoints/step_0000012/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert signal.getsignal(signal.SIGINT) is handler  # restored after the run

    signals_at[3] = 2  # Ctrl-C twice: stop now, no checkpoint
    assert main(["train", *overrides, "--name", "twice", "--no-progress"]) == 130
    assert capsys.readouterr().err.endswith("interrupted\n")
    (run_dir,) = Path.cwd().glob("runs/twice-*")
    assert list_checkpoints(run_dir / "checkpoints") == []


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_rank_at_one_step(tiny_corpus, tmp_path):
    """torchrun forwards SIGTERM to each rank; ranks that stopped at different steps would hang
    in the next collective. They agree (a vote), rank 0 saves, and the job ends."""
    run = [*RUN, "train-iters=1000", "save-interval=1000", f"data-path={tiny_corpus}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    process = subprocess.Popen(
        [*command, "-m", "neoxlab", "train", *run, "--name", "ranks", "--no-progress"],
        cwd=tmp_path,
        env=environment(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    runs = tmp_path / "runs"
    wait_for(
        lambda: any(max(logged_steps(d), default=0) >= 3 for d in runs.glob("ranks-*")),
        process,
        "step 3",
    )
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=TIMEOUT)  # a hang would time out here
    (run_dir,) = runs.glob("ranks-*")
    (checkpoint,) = assert_checkpoints_readable(run_dir)
    step = read_state(checkpoint)["step"]
    assert f"SIGTERM received at step {step}; continue with" in out, out + err
    assert out.count("SIGTERM received: stopping after this step") == 1  # once the ranks agree
    assert max(logged_steps(run_dir)) == step  # no rank went on training
