"""Multi-process training on CPU (gloo): real torchrun processes against one-process runs.

The batch of a step does not depend on the world size, so 2-process DDP and FSDP2 runs must give
the losses of a 1-process run with the same global batch (fp32, up to summation order).
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import tiny_shakespeare_file
from safetensors.torch import load_file

from neoxlab.checkpoint import list_checkpoints, load_training_state, read_state
from neoxlab.cli import main
from neoxlab.config import load_config
from neoxlab.tracking import read_metrics
from neoxlab.trainer import train

# Global batch 8 of micro-batches of 2: 4 accumulation steps on one process, 2 on each of two.
OVERRIDES = [
    "hidden-size=32",
    "num-layers=2",
    "num-attention-heads=2",
    "seq-length=32",
    "micro-batch-size=2",
    "global-batch-size=8",
    "vocab-size=300",
    "lr=3e-3",
    "warmup=2",
    "train-iters=6",
    "log-interval=1",
    "eval-interval=3",
    "eval-iters=2",
    "save-interval=3",
    "sample-tokens=4",
    "device=cpu",
]
TOLERANCE = 1e-5
REPO = Path(__file__).resolve().parents[1]


def torchrun(arguments: list[str], cwd, processes: int = 2) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "neoxlab",
        "train",
        *arguments,
        "--no-progress",
    ]
    # One thread per process: two processes share the two cores of a test machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def single_process(overrides: list[str]):
    return train(load_config([], overrides), progress=False, log=lambda _: None)


def losses(run_dir, key: str = "train/loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(run_dir) if key in m}


def only_run(folder):
    (run,) = [p for p in (folder / "runs").iterdir() if p.is_dir()]
    return run


@pytest.fixture
def overrides(tiny_corpus) -> list[str]:
    return [*OVERRIDES, f"data-path={tiny_corpus}"]


@pytest.fixture
def reference(overrides, tmp_path_factory, monkeypatch):
    """The uninterrupted one-process run every multi-process run is compared with."""
    monkeypatch.chdir(tmp_path_factory.mktemp("reference"))
    result = single_process([*overrides, "run-name=one"])
    return result.run_dir


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(mode, overrides, reference, tmp_path):
    done = torchrun([*overrides, f"distributed={mode}", "run-name=two"], tmp_path)
    run = only_run(tmp_path)  # one run directory: the ranks agreed on it
    expected, got = losses(reference), losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=TOLERANCE), step
    assert losses(run, "val/loss") == pytest.approx(losses(reference, "val/loss"), abs=TOLERANCE)
    grad_norms = losses(run, "train/grad_norm")
    assert grad_norms == pytest.approx(losses(reference, "train/grad_norm"), rel=1e-4)
    # rank 0 alone logged: one line per step, and one progress summary
    assert len([m for m in read_metrics(run) if "train/loss" in m]) == 6
    assert done.stdout.count("run: ") == 1
    samples = run / "samples"
    assert samples.is_dir() if mode == "ddp" else not samples.exists()


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_one_process(overrides, reference, tmp_path):
    torchrun(
        [*overrides, "zero-optimization.stage=1", "run-name=part", "exit-interval=3"], tmp_path
    )
    run = only_run(tmp_path)
    (checkpoint,) = list_checkpoints(run / "checkpoints")
    assert read_state(checkpoint)["step"] == 3
    # the gathered optimizer state is whole: one entry per parameter, keyed by name
    optimizer = load_training_state(checkpoint)["optimizer"]
    assert "gpt_neox.embed_in.weight" in optimizer["state"]
    # a sharded run's checkpoint exports to Hugging Face like any other
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    weights = load_file(checkpoint / "model.safetensors")
    assert exported.keys() == weights.keys()
    assert all(exported[name].equal(tensor) for name, tensor in weights.items())

    resumed = train(load_config([], overrides), resume=run, progress=False, log=lambda _: None)
    assert resumed.finished and resumed.step == 6
    expected, got = losses(reference), losses(run)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], abs=TOLERANCE), step


# Every architecture variant at once, Llama-shaped: RMSNorm, SwiGLU, one key/value head, the
# head tied to the embedding, no biases (tests/test_architectures.py checks each one alone).
LLAMA_VARIANTS = [
    "norm=rmsnorm",
    "activation=swiglu",
    "gpt-j-residual=false",
    "rotary-pct=1.0",
    "num-kv-heads=1",
    "no-weight-tying=false",
    "use-bias-in-attn-linear=false",
    "use-bias-in-mlp=false",
]


@pytest.mark.slow
def test_fsdp_and_resume_with_the_architecture_variants(overrides, tmp_path, monkeypatch):
    variant = [*overrides, *LLAMA_VARIANTS]
    monkeypatch.chdir(tmp_path)
    reference = single_process([*variant, "run-name=one"]).run_dir
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    torchrun([*variant, "distributed=fsdp", "run-name=two", "exit-interval=3"], sharded)
    run = only_run(sharded)
    weights = load_file(list_checkpoints(run / "checkpoints")[0] / "model.safetensors")
    assert "embed_out.weight" not in weights  # tied: one matrix, gathered once
    resumed = train(load_config([], variant), resume=run, progress=False, log=lambda _: None)
    assert resumed.finished and resumed.step == 6
    expected, got = losses(reference), losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=TOLERANCE), step


def fake_slurm(folder):
    """`srun` and `scontrol` stand-ins: srun runs its command here, the node list is localhost."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/bash\necho localhost\n")
    for script in (srun, scontrol):
        script.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NNODES": "1",
        "SLURM_CPUS_PER_TASK": "2",
        "GPUS_PER_NODE": "2",
        "RDZV_PORT": "29517",
        "OMP_NUM_THREADS": "1",
    }


@pytest.mark.slow
def test_slurm_scripts_prepare_then_train(overrides, tmp_path):
    """The sbatch scripts as Slurm would run them, on one node with two CPU "GPUs"."""
    scripts = REPO / "scripts" / "slurm"
    env = fake_slurm(tmp_path)
    data_tokenizer = tmp_path / "tokenizer.json"
    from neoxlab.tokenizer import train_bpe

    train_bpe(["To be, or not to be, that is the question " * 40], 300).save(str(data_tokenizer))
    corpus = tmp_path / "corpus.jsonl"
    text = tiny_shakespeare_file().read_text(encoding="utf-8")
    lines = [line for line in text[:60_000].split("\n\n") if line]
    corpus.write_text("".join(f'{{"text": {json.dumps(line)}}}\n' for line in lines))

    def sbatch(script, *arguments):
        done = subprocess.run(
            ["bash", str(scripts / script), *arguments],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    sbatch("prepare.sbatch", str(corpus), "--tokenizer", str(data_tokenizer), "--out", "data/c4")
    prefix = tmp_path / "data" / "c4_text_document"
    model = [o for o in overrides if not o.startswith(("data-path", "vocab-size"))]
    arguments = [*model, f"data-path={prefix}", f"vocab-file={data_tokenizer}", "tokenizer-type=hf"]
    sbatch("train.sbatch", *arguments, "exit-interval=3")
    run = only_run(tmp_path)
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step_0000003"]
    # the same command again continues that run (as a requeued job would)
    sbatch("train.sbatch", *arguments)  # the script resumes on its own (--resume auto)
    assert only_run(tmp_path) == run
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]


def test_gradient_accumulation_reduces_once_per_step(tmp_path):
    """DDP all-reduces gradients after the last micro-batch only (no_sync before it)."""
    import torch
    import torch.distributed as dist

    from neoxlab import distributed

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = distributed.wrap_ddp(torch.nn.Linear(4, 4), torch.device("cpu"))
        reductions = []

        def counting_hook(state, bucket):
            reductions.append(bucket.index())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        model.register_comm_hook(None, counting_hook)
        for index in range(4):
            with distributed.gradient_sync(model, enabled=index == 3):
                model(torch.randn(2, 4)).sum().backward()
        assert len(reductions) == 1
        # the trainer hands in torch.compile's wrapper, which keeps the model as _orig_mod
        compiled = types.SimpleNamespace(_orig_mod=model)
        for index in range(2):
            with distributed.gradient_sync(compiled, enabled=index == 1):
                model(torch.randn(2, 4)).sum().backward()
        assert len(reductions) == 2
    finally:
        dist.destroy_process_group()
