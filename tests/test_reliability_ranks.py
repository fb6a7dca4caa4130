"""Faults in multi-process training: real torchrun jobs (2 processes, gloo on CPU) whose ranks are
killed or frozen mid-step, killed inside a checkpoint write, or restarted by torchrun itself.
Nothing hangs (every wait has a deadline), every job ends within a bounded time, and the run,
resumed, ends with the weights of a 2-process run that was never interrupted, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neoxlab.checkpoint import list_checkpoints, read_state

# `neoxlab train` as torchrun starts it, with test hooks (none of them in neoxlab itself):
# - every rank writes its pid to MARKS/pid-RANK-ATTEMPT (ATTEMPT: torchrun's restart count);
# - FAULT=RANK:SIGNAL:N: in the first attempt that rank sends itself SIGNAL (KILL or STOP) in
#   the middle of its Nth step, before its last micro-batch (whose gradients are all-reduced),
#   after writing MARKS/fault;
# - HOLD=RANK:weights holds that rank inside its second checkpoint save, its weights file half
#   written; HOLD=RANK:gather holds it inside the second save's gather of the sharded
#   optimizer state (the weights are gathered already), where rank 0 waits for it;
# - STALE=RANK:ATTEMPT: in that attempt the rank lists the checkpoints as they were one save
#   ago, as a node whose NFS client still caches the folder's listing sees them.
LAUNCHER = r"""
import os, signal, sys, time
from pathlib import Path
import neoxlab.checkpoint as checkpoint
import neoxlab.distributed as distributed
from neoxlab.cli import main

marks = Path(os.environ["MARKS"])
rank, attempt = os.environ["RANK"], os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
(marks / f"pid-{rank}-{attempt}").write_text(str(os.getpid()))
held_rank, _, stage = os.environ.get("HOLD", "").partition(":")
saves = []

def hold():
    (marks / f"held-{rank}").write_text("held")
    time.sleep(600)

if held_rank == rank and stage == "weights":
    write_weights = checkpoint.save_file

    def save_file(tensors, filename, *args, **kwargs):
        write_weights(tensors, filename, *args, **kwargs)
        saves.append(filename)
        if len(saves) == 2:
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            hold()

    checkpoint.save_file = save_file

if held_rank == rank and stage == "gather":
    gather_optimizer = distributed.get_optimizer_state_dict

    def get_optimizer_state_dict(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            hold()
        return gather_optimizer(*args, **kwargs)

    distributed.get_optimizer_state_dict = get_optimizer_state_dict

fault_rank, _, fault = os.environ.get("FAULT", "").partition(":")
if fault_rank == rank and attempt == "0":
    name, _, step = fault.partition(":")
    synchronise = distributed.gradient_sync
    steps = []

    def gradient_sync(model, enabled):
        if enabled:  # the last micro-batch of a step
            steps.append(1)
            if len(steps) == int(step):
                (marks / "fault").write_text(name)
                os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
        return synchronise(model, enabled)

    distributed.gradient_sync = gradient_sync

if os.environ.get("STALE") == f"{rank}:{attempt}":
    list_all = checkpoint.list_checkpoints
    checkpoint.list_checkpoints = lambda root: list_all(root)[:-1]

sys.exit(main(sys.argv[1:]))
"""

END = 12
RUN = [
    "seq-length=32",
    "hidden-size=32",
    "num-layers=2",
    "num-attention-heads=2",
    "micro-batch-size=2",
    "global-batch-size=8",  # 2 micro-batches per rank and step
    "vocab-size=300",
    "lr=3e-3",
    "warmup=2",
    "hidden-dropout=0.1",  # the RNG state must survive the faults too
    f"train-iters={END}",
    "eval-interval=1000",
    "eval-iters=1",
    "log-interval=1",
    "save-interval=4",
    "sample-tokens=0",
    "device=cpu",
]
TIMEOUT = 180  # seconds any one wait of these tests may take: none can hang the suite
# The frozen job's collective timeout (the default, 1800 s, is for real clusters); a margin
# for two ranks that start a few seconds apart on a busy machine.
COLLECTIVE_TIMEOUT = 10


class Job:
    """One torchrun job of the launcher; `finish()` waits for it with a deadline, and `stop()`
    (in a `finally`) kills whatever of it still runs, so a failing test leaves no orphans."""

    def __init__(self, tmp_path: Path, arguments: list[str], *, restarts: int = 0, **env) -> None:
        self.marks = tmp_path / "marks"
        self.marks.mkdir(exist_ok=True)
        for old in self.marks.iterdir():
            old.unlink()
        launcher = tmp_path / "launcher.py"
        launcher.write_text(LAUNCHER)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node=2", f"--max-restarts={restarts}", str(launcher)]
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [*command, "train", *arguments, "--no-progress"],
            cwd=tmp_path,
            # One thread per process: the numbers must not depend on how busy the machine is.
            env={**os.environ, "OMP_NUM_THREADS": "1", "MARKS": str(self.marks), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def pid(self, rank: int, attempt: int = 0) -> int:
        self.wait_for(lambda: (self.marks / f"pid-{rank}-{attempt}").is_file(), f"rank {rank}")
        return int((self.marks / f"pid-{rank}-{attempt}").read_text())

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            if self.process.poll() is not None:
                _, err = self.process.communicate()
                pytest.fail(f"the job ended (rc {self.process.returncode}) before {what}:\n{err}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.02)

    def finish(self) -> tuple[int, str, str, float]:
        """(exit code, stdout, stderr, seconds since the job started)."""
        out, err = self.process.communicate(timeout=TIMEOUT)
        return self.process.returncode, out, err, time.monotonic() - self.started

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        # torchrun starts each worker in a session of its own (and they hold its pipes open)
        for mark in self.marks.glob("pid-*"):
            kill_if_ours(int(mark.read_text()), signal.SIGKILL)
        self.process.communicate(timeout=TIMEOUT)


def kill_if_ours(pid: int, number: int) -> None:
    try:
        if "launcher.py" in Path(f"/proc/{pid}/cmdline").read_text():
            os.kill(pid, number)
    except (FileNotFoundError, ProcessLookupError):
        pass  # gone already


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def logged_steps(tmp_path: Path, name: str) -> list[int]:
    """Steps rank 0 has logged so far in the run named `name` (a line being written is skipped)."""
    steps = []
    for metrics in tmp_path.glob(f"runs/{name}-*/metrics.jsonl"):
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "train/loss" in record:
                steps.append(record["step"])
    return steps


def only_run(tmp_path: Path, name: str) -> Path:
    (run,) = tmp_path.glob(f"runs/{name}-*")
    return run


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    checkpoint = list_checkpoints(run / "checkpoints")[-1]
    assert read_state(checkpoint)["step"] == END
    return load_file(str(checkpoint / "model.safetensors"))


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    different = [name for name in got if not torch.equal(got[name], expected[name])]
    assert not different, f"differ from the uninterrupted run: {different}"


def run_to_the_end(tmp_path: Path, arguments: list[str]) -> str:
    job = Job(tmp_path, arguments)
    try:
        code, out, err, _ = job.finish()
    finally:
        job.stop()
    assert code == 0, err[-4000:]
    return out


@pytest.fixture
def run(tiny_corpus) -> list[str]:
    return [*RUN, f"data-path={tiny_corpus}"]


def uninterrupted_run(mode: str, corpus: Path, folder: Path) -> dict[str, torch.Tensor]:
    """The final weights of the same 2-process run, never interrupted."""
    run_to_the_end(folder, [*RUN, f"data-path={corpus}", f"distributed={mode}", "--name", "x"])
    return final_weights(only_run(folder, "x"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_corpus, tmp_path_factory) -> dict[str, torch.Tensor]:
    return uninterrupted_run("ddp", tiny_corpus, tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def uninterrupted_sharded(tiny_corpus, tmp_path_factory) -> dict[str, torch.Tensor]:
    return uninterrupted_run("fsdp", tiny_corpus, tmp_path_factory.mktemp("fsdp"))


@pytest.mark.slow
def test_a_killed_or_frozen_rank_ends_the_job_and_the_rerun_resumes(run, uninterrupted, tmp_path):
    """Case 1. A SIGKILLed rank: its connections close, the survivor's collective fails at once
    and torchrun ends the job, naming the rank and the signal. A frozen rank (a lost node looks
    the same: it answers nothing and closes nothing): the survivor gives up after
    distributed-timeout. Each time the same command, rerun, continues from the newest complete
    checkpoint."""
    command = [*run, "--name", "x", "--resume", "auto"]
    job = Job(tmp_path, command, FAULT="1:KILL:6")
    try:
        job.wait_for((job.marks / "fault").is_file, "the kill")
        killed = time.monotonic()
        code, out, err, _ = job.finish()
        seconds = time.monotonic() - killed
    finally:
        job.stop()
    assert code != 0 and seconds < 15, (code, seconds)
    assert "rank      : 1" in err and "Signal 9 (SIGKILL)" in err  # torchrun's report
    # the survivor says what happened (torchrun's SIGTERM to it is no stop with a checkpoint),
    # and the run, which did not end, has no summary
    assert "error: another process of this job failed during step 6" in err
    assert "SIGTERM received: stopping" not in out + err and "[rank0]: Traceback" not in err
    run_dir = only_run(tmp_path, "x")
    assert not (run_dir / "summary.json").exists()
    assert [c.name for c in list_checkpoints(run_dir / "checkpoints")] == ["step_0000004"]

    frozen_command = [*command, f"distributed-timeout={COLLECTIVE_TIMEOUT}"]
    job = Job(tmp_path, frozen_command, FAULT="1:STOP:5")  # resumed at 4: freezes in step 9
    try:
        job.wait_for((job.marks / "fault").is_file, "the freeze")
        frozen = time.monotonic()
        survivor = job.pid(0)
        job.wait_for(lambda: not alive(survivor), "rank 0 to give up")
        seconds = time.monotonic() - frozen
        os.kill(job.pid(1), signal.SIGKILL)  # the lost node is gone for good
        code, _, err, _ = job.finish()
    finally:
        job.stop()
    assert code != 0 and COLLECTIVE_TIMEOUT <= seconds < COLLECTIVE_TIMEOUT + 10, (code, seconds)
    assert f"Timed out waiting {COLLECTIVE_TIMEOUT * 1000}ms" in err
    assert "error: another process of this job failed during step 9" in err
    assert only_run(tmp_path, "x") == run_dir
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == "step_0000008"

    out = run_to_the_end(tmp_path, command)
    assert f"resuming {run_dir.name} from step_0000008" in out
    assert_same_weights(final_weights(run_dir), uninterrupted)
    assert sorted(set(logged_steps(tmp_path, "x"))) == list(range(1, END + 1))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "hold"),
    # rank 0's write is the same code in both modes; the gather is FSDP2's part of the save
    [("ddp", "0:weights"), ("fsdp", "1:gather")],
    ids=["ddp-rank0-writing", "fsdp-rank1-gathering"],
)
def test_a_rank_killed_inside_a_checkpoint_write(mode, hold, run, request, tmp_path):
    """Case 2. A rank dies inside the second save (step 8): rank 0 with half the weights file
    written, or a rank that is gathering its shards for rank 0 (FSDP2). The half-written
    checkpoint is never picked: the rerun resumes from step 4, and ends with the weights of
    the uninterrupted run of its mode."""
    command = [*run, f"distributed={mode}", "--name", "x", "--resume", "auto"]
    job = Job(tmp_path, command, HOLD=hold)
    try:
        rank = int(hold[0])
        job.wait_for((job.marks / f"held-{rank}").is_file, "the hold inside the save")
        os.kill(job.pid(rank), signal.SIGKILL)
        code, _, err, _ = job.finish()
    finally:
        job.stop()
    assert code != 0, err
    run_dir = only_run(tmp_path, "x")
    checkpoints = run_dir / "checkpoints"
    assert [c.name for c in list_checkpoints(checkpoints)] == ["step_0000004"]
    if rank == 0:  # what the kill left: a temporary folder no reader takes for a checkpoint
        (left,) = [p.name for p in checkpoints.iterdir() if p.name != "step_0000004"]
        assert left.startswith("step_0000008.tmp-")

    out = run_to_the_end(tmp_path, command)
    assert f"resuming {run_dir.name} from step_0000004" in out
    assert [c.name for c in list_checkpoints(checkpoints)] == [
        "step_0000004",
        "step_0000008",
        "step_0000012",
    ]
    assert sorted(p.name for p in checkpoints.iterdir())[-1] == "step_0000012"  # no temporaries
    reference = "uninterrupted" if mode == "ddp" else "uninterrupted_sharded"
    assert_same_weights(final_weights(run_dir), request.getfixturevalue(reference))


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_and_the_workers_resume(run, uninterrupted, tmp_path):
    """Case 3. `torchrun --max-restarts 1 ... --name x --resume auto`: rank 1 is killed once;
    torchrun starts both workers again with the same arguments and they continue from the
    newest checkpoint on their own. The restarted rank 1 sees the folder as it was one save
    ago (a lagging NFS listing): every rank takes rank 0's choice, or the ranks would start
    from different steps."""
    command = [*run, "--name", "x", "--resume", "auto"]
    # PyTorch 2.13's torchrun hands the restarted workers the store of the first attempt, where
    # they find its ranks' addresses and cannot connect (pytorch/pytorch#135712); this opts out.
    fix = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    job = Job(tmp_path, command, restarts=1, FAULT="1:KILL:10", STALE="1:1", **fix)
    try:
        code, out, err, _ = job.finish()
    finally:
        job.stop()
    assert code == 0, err[-4000:]
    run_dir = only_run(tmp_path, "x")
    assert f"resuming {run_dir.name} from step_0000008" in out
    assert_same_weights(final_weights(run_dir), uninterrupted)
