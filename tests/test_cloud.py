"""The SkyPilot tasks (skypilot/*.yaml), with no cloud account.

SkyPilot's own parser reads each task as `sky launch --env ...` does. Then what the parsed task
says to run is run here, on fake nodes: its setup and run commands and envs, the SKYPILOT_*
variables SkyPilot sets (two nodes of one process each, gloo on the CPU), a workdir per node (a
VM has its own disk: a recovered job gets a fresh one) and a folder standing in for the bucket
mount. The runs really train and resume. Only setup's `pip install` is a stand-in that records
its arguments (no network here)."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
from conftest import TINY_MODEL

from neoxlab.checkpoint import is_complete, latest_checkpoint
from neoxlab.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
TASKS = {path.name: path for path in sorted((REPO / "skypilot").glob("*.yaml"))}
BUCKET = "neoxlab-test-bucket"
FAKE_KEY = "local-neoxlab_fake_secret_0123456789abcdefghij"
TIMEOUT = 240  # seconds for any one fake node; nothing waits longer

# Runs in a subprocess with its own HOME: SkyPilot writes ~/.sky when it loads.
PARSE = """
import json, sys
import sky, yaml
parsed = {}
for path, envs in json.loads(sys.argv[1]):
    with open(path, encoding="utf-8") as file:
        config = yaml.safe_load(file)
    try:
        task = sky.Task.from_yaml_config(config, env_overrides=sorted(envs.items()))
    except ValueError as err:
        parsed[path] = {"error": str(err)}
        continue
    parsed[path] = task.to_yaml_config()
    parsed[path].pop("_user_specified_yaml", None)
print(json.dumps(parsed))
"""


def parse_tasks(requests: list[tuple[Path, dict]], home: Path) -> dict[str, dict]:
    """Each task as SkyPilot understands it after `--env KEY=VALUE` for `envs` (or its error)."""
    if find_spec("sky") is None:
        pytest.skip('skypilot is not installed: pip install -e ".[cloud]" (see CONTRIBUTING.md)')
    argument = json.dumps([[str(path), envs] for path, envs in requests])
    done = subprocess.run(
        [sys.executable, "-c", PARSE, argument],
        env={**os.environ, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict[str, dict]:
    """Every task as launched with the envs the tests give (a tiny config, a bucket name)."""
    envs = {"CONFIG": "configs/tiny.yml"}
    bucket = {**envs, "BUCKET": BUCKET}
    requests = [(TASKS["train.yaml"], envs)]
    requests += [(TASKS[name], bucket) for name in ("train_multinode.yaml", "train_spot.yaml")]
    parsed = parse_tasks(requests, tmp_path_factory.mktemp("sky-home"))
    return {Path(path).name: task for path, task in parsed.items()}


def test_the_tasks_validate_with_skypilots_parser(tasks, tmp_path):
    assert set(TASKS) == {"train.yaml", "train_multinode.yaml", "train_spot.yaml"}
    assert not [task["error"] for task in tasks.values() if "error" in task]
    # One setup and one run script serve all three, so what the tests below run is what each runs.
    assert {(task["setup"], task["run"]) for task in tasks.values()} == {
        ("bash skypilot/setup.sh", "bash skypilot/run.sh")
    }
    assert all(task["workdir"] == "." for task in tasks.values())
    single, multinode, spot = (tasks[name] for name in sorted(TASKS))
    assert single["num_nodes"] == 1 and not single["file_mounts"]
    assert multinode["num_nodes"] == 2 and spot["num_nodes"] == 1
    for task in (multinode, spot):
        # runs/ goes where the bucket is mounted, and the mount caches writes (see the YAML)
        mount = task["file_mounts"][task["envs"]["RUNS_FOLDER"]]
        assert mount["name"] == BUCKET and mount["mode"] == "MOUNT_CACHED"
    for resources in spot["resources"]["any_of"]:
        assert resources["use_spot"] and resources["job_recovery"]["max_restarts_on_errors"]
    # No secret has a value in any task: WANDB_API_KEY comes with `--secret` at launch.
    assert not any(task.get("secrets") for task in tasks.values())
    assert not any("WANDB_API_KEY:" in path.read_text() for path in TASKS.values())
    # The bucket has no default (bucket names are global): launching without one is refused.
    bare = parse_tasks([(TASKS["train_spot.yaml"], {"CONFIG": "configs/tiny.yml"})], tmp_path)
    assert "'BUCKET' is None" in next(iter(bare.values()))["error"]


# ---- fake nodes ------------------------------------------------------------------------------


def tiny_config() -> str:
    """configs/tiny.yml of a fake workdir: the tests' tiny model on the workdir's own data."""
    settings = dict(item.split("=", 1) for item in TINY_MODEL)
    settings.update({"data-path": "../data/tiny.jsonl", "device": "cpu"})
    return "".join(f"{key}: {value}\n" for key, value in settings.items())


def new_workdir(folder: Path, corpus: Path) -> Path:
    """What `sky launch` leaves on a fresh VM: the repository's skypilot/ and configs (here the
    tiny one), the corpus beside it, nothing prepared, no runs."""
    shutil.copytree(REPO / "skypilot", folder / "skypilot")
    (folder / "configs").mkdir()
    (folder / "configs" / "tiny.yml").write_text(tiny_config())
    (folder / "data").mkdir()
    shutil.copy(corpus, folder / "data" / "tiny.jsonl")
    return folder


def fake_pip(folder: Path) -> Path:
    """A `pip` that records its arguments: setup's install needs a network the tests lack."""
    folder.mkdir()
    script = folder / "pip"
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder / "calls"}\n')
    script.chmod(0o755)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_environment(task: dict, rank: int, nodes: int, bin_dir: Path, **envs: str) -> dict:
    """The environment SkyPilot gives a node's setup and run: its own, the task's envs, ours."""
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    return {
        **os.environ,
        "PATH": path,
        **task["envs"],
        "SKYPILOT_NODE_RANK": str(rank),
        "SKYPILOT_NUM_NODES": str(nodes),
        "SKYPILOT_NODE_IPS": "\n".join(["127.0.0.1"] * nodes),
        "SKYPILOT_NUM_GPUS_PER_NODE": "1",
        "OMP_NUM_THREADS": "1",  # the nodes share two cores
        **envs,
    }


def start(command: str, workdir: Path, env: dict) -> subprocess.Popen:
    # Own process group: a preemption takes the node's every process down at once.
    return subprocess.Popen(
        ["bash", "-c", command],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen) -> str:
    """Wait for a node's command (at most TIMEOUT seconds); its output, after checking it ran."""
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        output = stop(process)
        pytest.fail(f"a fake node ran past {TIMEOUT} s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    return output


def stop(process: subprocess.Popen) -> str:
    """End a node still running: SIGTERM first, which torchrun passes on to its workers (they
    run in sessions of their own, out of reach of the node's group), then SIGKILL."""
    if process.returncode is not None:
        return ""  # already waited for
    with contextlib.suppress(ProcessLookupError):  # it may have just ended
        os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.communicate()[0]


def launch(task: dict, workdirs: list[Path], bin_dir: Path, **envs: str) -> list[str]:
    """`sky launch`: setup on every node, then run on all of them at once; their outputs."""
    count = len(workdirs)
    environments = [node_environment(task, rank, count, bin_dir, **envs) for rank in range(count)]
    for workdir, env in zip(workdirs, environments, strict=True):
        finish(start(task["setup"], workdir, env))
    nodes = [start(task["run"], w, e) for w, e in zip(workdirs, environments, strict=True)]
    try:
        return [finish(node) for node in nodes]
    finally:
        for node in nodes:  # a node that failed leaves its peer waiting for it
            stop(node)


def only_run(runs: Path) -> Path:
    (run,) = [path for path in runs.iterdir() if path.is_dir()]
    return run


def trained_steps(run: Path) -> list[int]:
    return [m["step"] for m in read_metrics(run) if "train/loss" in m]


def test_one_gpu_task_trains_in_the_workdir(tasks, tiny_corpus, tmp_path):
    """train.yaml on one node: setup installs from the workdir and prepares PREPARE's corpus;
    the run trains on it, W&B turned on by the key, and lands in the workdir's runs/ (what
    `rsync -Pavz neox:sky_workdir/runs/ runs/` fetches)."""
    workdir = new_workdir(tmp_path / "vm", tiny_corpus)
    bin_dir = fake_pip(tmp_path / "bin")
    (workdir / "configs" / "tiny.yml").write_text(
        tiny_config().replace("../data/tiny.jsonl", "../data/python_stdlib.jsonl")
    )
    (out,) = launch(
        tasks["train.yaml"],
        [workdir],
        bin_dir,
        PREPARE="python-stdlib --max-files 30",
        ARGS="train-iters=4 eval-interval=4 save-interval=4",
        WANDB_API_KEY=FAKE_KEY,
    )
    assert (bin_dir / "calls").read_text() == "install --progress-bar off -e .[wandb]\n"
    assert (workdir / "data" / "python_stdlib.jsonl").is_file()
    run = only_run(workdir / "runs")
    assert run.name.startswith("tiny-")  # NAME defaults to the config's name
    assert "W&B: off (WANDB_MODE=disabled)" in out  # --wandb was added (the tests disable W&B)
    assert trained_steps(run)[-1] == 4 and latest_checkpoint(run / "checkpoints")
    secret = FAKE_KEY.encode()
    assert not [p for p in workdir.rglob("*") if p.is_file() and secret in p.read_bytes()]


@pytest.mark.slow
def test_two_nodes_train_then_resume_on_new_vms(tasks, tiny_corpus, tmp_path):
    """train_multinode.yaml on 2 nodes x 1 process: one torchrun per node meets on the first
    node's IP and trains into the bucket; the same launch on two fresh VMs resumes from it."""
    task, bucket = tasks["train_multinode.yaml"], tmp_path / "bucket"
    bin_dir = fake_pip(tmp_path / "bin")
    envs = {"RUNS_FOLDER": str(bucket), "NAME": "multi", "ARGS": "exit-interval=10"}
    first = [new_workdir(tmp_path / f"vm{rank}", tiny_corpus) for rank in range(2)]
    head, other = launch(task, first, bin_dir, RDZV_PORT=str(free_port()), **envs)
    assert "node 0 of 2: 1 processes" in head and "node 1 of 2: 1 processes" in other
    run = only_run(bucket / "runs")
    assert trained_steps(run)[-1] == 10 and "stopped early at step 10" in head
    # each node tokenized its own copy of the data; both made the same tokenizer
    tokenizers = [(w / "data" / "tiny.bpe-300.tokenizer.json").read_bytes() for w in first]
    assert tokenizers[0] == tokenizers[1]

    again = [new_workdir(tmp_path / f"new-vm{rank}", tiny_corpus) for rank in range(2)]
    head, _ = launch(task, again, bin_dir, RDZV_PORT=str(free_port()), **envs)
    assert f"resuming {run.name} from step_0000010" in head
    assert only_run(bucket / "runs") == run  # continued, not a new run
    assert trained_steps(run) == [1, 5, 10, 15, 20]
    assert latest_checkpoint(run / "checkpoints").name == "step_0000020"


@pytest.mark.slow
def test_preempted_spot_job_resumes_on_a_new_vm(tasks, tiny_corpus, tmp_path):
    """train_spot.yaml: the VM is killed (SIGKILL to every process) after its first checkpoint
    reached the bucket; the job relaunched on a fresh VM continues from the newest complete
    checkpoint there and finishes the run."""
    task, bucket = tasks["train_spot.yaml"], tmp_path / "bucket"
    bin_dir = fake_pip(tmp_path / "bin")
    long_run = "train-iters=400 eval-interval=200 sample-tokens=0 log-interval=10 keep-last-k=2"
    envs = {"RUNS_FOLDER": str(bucket), "ARGS": long_run}
    vm = new_workdir(tmp_path / "vm", tiny_corpus)
    env = node_environment(task, 0, 1, bin_dir, **envs)
    finish(start(task["setup"], vm, env))
    node = start(task["run"], vm, env)
    try:
        deadline = time.monotonic() + TIMEOUT
        # a complete checkpoint, not the temporary folder it is written in first
        while not any(latest_checkpoint(c) for c in bucket.glob("runs/*/checkpoints")):
            assert node.poll() is None, node.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no checkpoint reached the bucket"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):  # unless it already ended
            os.killpg(node.pid, signal.SIGKILL)  # preempted: no signal handler, no last save
        node.communicate(timeout=TIMEOUT)
    run = only_run(bucket / "runs")
    newest = latest_checkpoint(run / "checkpoints")
    assert newest is not None and is_complete(newest)
    assert trained_steps(run)[-1] < 400  # it was cut off mid-run

    (out,) = launch(task, [new_workdir(tmp_path / "new-vm", tiny_corpus)], bin_dir, **envs)
    assert f"resuming {run.name} from {newest.name}" in out
    assert only_run(bucket / "runs") == run
    steps = trained_steps(run)
    assert steps == sorted(set(steps)) and steps[-1] == 400  # each step logged once, to the end
