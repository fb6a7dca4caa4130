"""Everything neoxlab does on a CUDA GPU, checked and then timed, in one command of <= 8 minutes.

    python bench/gpu_check.py --out DIR [--only NAME ...] [--budget 450] [--inline] [--smoke]

Correctness first, a few training steps each, every check pass/fail with its reason: fp32 (its
losses against the CPU's), bf16 autocast, fp16 with the GradScaler (real overflow: skipped steps,
scale backoff), the T4 path (fp16, eager, SDPA limited to a T4's kernels), torch.compile in its
default and reduce-overhead (CUDA graphs, with gradient accumulation) modes against eager, the
chunked loss, the device-resident sampler, KV-cache generation, greedy parity with
transformers, exact resume (dropout on: the CUDA RNG state), torchrun DDP and FSDP2 over NCCL
in a world of one process, which SDPA kernel runs, LoRA in fp16 (the T4's finetuning), QLoRA
(nf4 base weights; CUDA only), 8-bit AdamW (close to AdamW, exact resume), and lm-eval's
scores of an offline task (`neoxlab eval --tasks`) against the CPU's. Then speed, at the full
scripts' shapes with shorter runs and steady-state windows after a warm-up: the baby GPT
(baby_gpt.py) and the Pythia-160M shape with its MFU (pythia160m.py), neoxlab against
transformers; KV-cache generation at batch 1 and 16 (generate.py); the notebooks' configs as a
T4 runs them, with their peak memory (t4_path.py). Every corpus is random tokens of the real
vocabulary size (speed and memory depend on shapes only), but the lm-eval check's (this
Python's standard library), so nothing has to be downloaded.

Each check and measurement runs in a process of its own (a crash, a hang or a poisoned CUDA
context stays there; `--inline` runs them all in this one), under its time limit and the run's
`--budget`: whatever the budget leaves no time for is listed as not run, so the tables always
come. DIR receives gpu_check.json (every result, rewritten as each ends), gpu_check.md (the
tables, ready to paste into bench/RESULTS.md, and printed last) and gpu_check.log (each item's
output). `--smoke` runs the same code on the CPU at tiny shapes (tests/test_gpu_check.py).

To add a check: a function `check_x(context) -> str` (returns what passed; raises to fail,
`Skip` to skip) and its line in CHECKS; a measurement: `speed_x(context) -> rows` and its line
in SPEED.

Python packages the GPU image lacks are listed in bench/gpu_wheels.txt with the command that
downloads them into .whl/; on the device machine, `bash bench/gpu_check.sh` installs them and
runs this script (bench/RESULTS.md, "The GPU check", has the call).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import common
import corpora
import generate
import hf_baseline
import numpy as np
import t4_path
import throughput
import torch
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend

from neoxlab.benchmark_results import metric_values
from neoxlab.benchmarks import BenchmarkOptions, evaluate_model, import_lm_eval, prepare_tasks
from neoxlab.checkpoint import latest_checkpoint, read_state
from neoxlab.data.batches import DeviceWindowSampler, WindowSampler
from neoxlab.data.benchmark_data import python_stdlib_perplexity
from neoxlab.errors import NeoxlabError
from neoxlab.hf import export_hf, load_trained
from neoxlab.loss_scale import build_grad_scaler
from neoxlab.model import LOSS_CHUNK_ELEMENTS, GPTNeoX, ModelConfig
from neoxlab.runtime import ATTENTION_NAMES, resolve_runtime
from neoxlab.tracking import read_metrics
from neoxlab.trainer import Trainer

BENCH = Path(__file__).resolve().parent
DEFAULT_BUDGET = 450  # seconds: 7.5 minutes, inside the 8 a GPU session can give this
LIMITS = {"correctness": 150, "speed": 270}  # seconds one item may take
MIN_SECONDS_LEFT = 20  # an item is not started with less of the budget left
# The checks' model: small, but with real head sizes (64) so SDPA's GPU kernels apply.
GPU_MODEL = [
    "hidden-size=256",
    "num-layers=2",
    "num-attention-heads=4",
    "seq-length=256",
    "max-position-embeddings=256",
    "micro-batch-size=8",
    "global-batch-size=8",
]
CHECK_RUN = [
    "train-iters=6",
    "lr=3e-3",
    "warmup=0",
    "log-interval=1",
    "eval-interval=6",
    "eval-iters=1",
    "sample-tokens=0",
    "save=false",
]
# The model keys a run with init-from takes from the model it starts from.
INIT_FROM_BRINGS = {"hidden-size", "num-layers", "num-attention-heads", "max-position-embeddings"}
# Loss agreement between two runs of the same steps, by precision (bf16 and TF32 round early).
LOSS_TOLERANCE = {"fp32": 1e-2, "bf16": 5e-2, "fp16": 5e-2}
LM_EVAL_TRAIN_FILES = 40  # of the task's documents: the check's model trains on them
GRAD_NORM_TOLERANCE = 0.05  # relative: Adam hides a scaled gradient from the losses, not the norm
# The aten operator each SDPA kernel runs as (the CPU's flash kernel included).
KERNEL_OPERATORS = {
    SDPBackend.FLASH_ATTENTION: "_scaled_dot_product_flash_attention",
    SDPBackend.EFFICIENT_ATTENTION: "_scaled_dot_product_efficient_attention",
    SDPBackend.CUDNN_ATTENTION: "_scaled_dot_product_cudnn_attention",
    SDPBackend.MATH: "_scaled_dot_product_attention_math",
}
SPEED_HEADERS = [
    "workload",
    "implementation",
    "tokens/s",
    "MFU",
    "peak GiB",
    "vs transformers",
    "notes",
]


class Skip(Exception):
    """The check does not apply to this device (the reason is its message)."""


class CheckFailed(Exception):
    """The check ran and found neoxlab wrong (the reason is its message)."""


@dataclass
class Context:
    """What a check or measurement runs with: the device, the mode and its scratch folder."""

    device: torch.device
    smoke: bool
    folder: Path  # the working directory: runs/ lands here

    def model(self, init_from: Path | None = None) -> list[str]:
        """Overrides of the checks' small model on this device, on random tokens; with
        `init_from`, of a run on that model (which brings its shape and tokenizer)."""
        corpus = self.folder / "corpus"
        if not corpus.exists():
            corpus.mkdir()
            corpora.synthetic_corpus(corpus, 300 if self.smoke else 512, 400_000, predictable=0.8)
        shapes = common.SMOKE_MODEL if self.smoke else GPU_MODEL
        data = [f"data-path={corpus / 'random_text_document'}"]
        if init_from is None:
            data += [f"vocab-file={corpus / 'tokenizer.json'}", "tokenizer-type=hf"]
        else:
            data.append(f"init-from={init_from}")
            shapes = [s for s in shapes if s.split("=")[0] not in INIT_FROM_BRINGS]
        return [*data, *shapes, *CHECK_RUN, f"device={self.device.type}"]

    def on_cpu(self) -> Context:
        return dataclasses.replace(self, device=torch.device("cpu"))


@dataclass
class Result:
    name: str
    kind: str  # correctness | speed
    status: str  # pass | FAIL | skip | timeout | not run
    seconds: float
    detail: str
    rows: list[list[str]] = field(default_factory=list)  # a measurement's table rows
    error: str | None = None  # the traceback of a failure


# ---- training runs the checks compare -------------------------------------------------------


def trainer_for(
    context: Context,
    *overrides: str,
    precision: str | None = None,
    resume: Path | None = None,
    init_from: Path | None = None,
) -> Trainer:
    """A Trainer of the checks' model. `precision` is required of the runtime on a GPU; on a CPU
    (--smoke), where resolve_runtime trains in fp32, it is forced, so that CPU autocast and
    GradScaler("cpu") run the same code."""
    config = common.neoxlab_config([], [*context.model(init_from), *overrides])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(config, resume=resume, progress=False, log=common.quiet)
    if precision and trainer.runtime.device.type == "cpu":
        trainer.runtime = dataclasses.replace(trainer.runtime, precision=precision)
        trainer.scaler = build_grad_scaler("cpu", True, trainer.config.fp16)
    elif precision and trainer.runtime.precision != precision:
        raise CheckFailed(f"the runtime chose {trainer.runtime.precision}, not {precision}")
    return trainer


def run(trainer: Trainer) -> Trainer:
    with contextlib.redirect_stdout(io.StringIO()):  # its evaluation lines
        trainer.run()
    return trainer


def logged(trainer: Trainer, key: str = "train/loss") -> dict[int, float]:
    return logged_in(trainer.run_dir, key)


def logged_in(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(run_dir) if key in m}


def agree(
    expected: dict[int, float], got: dict[int, float], tolerance: float, relative: bool = False
) -> float:
    """The largest difference between two runs' logged values (steps must match); a difference
    over `tolerance` fails, naming the step."""
    if sorted(expected) != sorted(got) or not expected:
        raise CheckFailed(f"logged steps differ: {sorted(expected)} against {sorted(got)}")
    worst = 0.0
    for step, value in expected.items():
        difference = abs(got[step] - value) / (abs(value) if relative else 1.0)
        if not difference <= tolerance:  # NaN fails too
            kind = "relative difference" if relative else "difference"
            raise CheckFailed(
                f"step {step}: {got[step]:.6g} against {value:.6g} ({kind} {difference:.2g} > "
                f"{tolerance:g})"
            )
        worst = max(worst, difference)
    return worst


def compare_runs(reference: Path, run_dir: Path, precision: str) -> str:
    """Two runs' losses within the precision's tolerance and gradient norms within 5%: what
    they differ by."""
    loss = agree(logged_in(reference), logged_in(run_dir), LOSS_TOLERANCE[precision])
    norm = agree(
        logged_in(reference, "train/grad_norm"),
        logged_in(run_dir, "train/grad_norm"),
        GRAD_NORM_TOLERANCE,
        relative=True,
    )
    return f"losses within {loss:.1e}, grad norms within {norm:.1%}"


def same_run(reference: Trainer, trainer: Trainer) -> str:
    return compare_runs(reference.run_dir, trainer.run_dir, trainer.runtime.precision)


def kernel_that_runs(trainer: Trainer) -> SDPBackend:
    """The SDPA kernel one training forward and backward of `trainer`'s model runs."""
    device = trainer.runtime.device
    batch = trainer.train_sampler.batch(0, trainer.micro_batch).to(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        with trainer.runtime.autocast():
            _, loss = trainer.model(batch.inputs, batch.targets)
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    names = {event.name for event in profile.events()}
    ran = [k for k, op in KERNEL_OPERATORS.items() if any(op in name for name in names)]
    if len(ran) != 1:
        raise CheckFailed(f"expected one SDPA kernel in the profile, found {ran}")
    return ran[0]


@contextlib.contextmanager
def exact_matmuls() -> Iterator[None]:
    """IEEE fp32 matmuls (no TF32, no bf16 arithmetic): comparisons that expect equality."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def has_bf16(context: Context) -> bool:
    return context.device.type != "cuda" or torch.cuda.get_device_capability() >= (8, 0)


# ---- correctness ----------------------------------------------------------------------------


def check_fp32(context: Context) -> str:
    reference = run(trainer_for(context.on_cpu(), "precision=fp32", "compile=false"))
    trainer = run(trainer_for(context, "precision=fp32", "compile=false"))
    loss = agree(logged(reference), logged(trainer), LOSS_TOLERANCE["fp32"])
    return f"{len(logged(trainer))} steps; losses within {loss:.1e} of the CPU's"


def check_bf16(context: Context) -> str:
    if not has_bf16(context):
        raise Skip("no native bf16 on this GPU (sm < 8.0)")
    reference = run(trainer_for(context, "precision=fp32", "compile=false"))
    trainer = trainer_for(context, "precision=bf16", "compile=false", precision="bf16")
    dtypes = set()
    layer = trainer.model.gpt_neox.layers[0].attention.query_key_value
    hook = layer.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    run(trainer)
    hook.remove()
    if dtypes != {torch.bfloat16}:
        raise CheckFailed(f"matmuls under autocast produced {dtypes}, not bf16")
    return f"matmuls in bf16; against fp32: {same_run(reference, trainer)}"


def check_fp16_grad_scaler(context: Context) -> str:
    """Real overflow: a loss scale of 2^40 (2^24 for --smoke's larger gradients) overflows
    fp16 gradients until the scaler has halved it enough; those steps are skipped and
    counted, and the rest train."""
    steps, power = (12, 24) if context.smoke else (40, 40)
    trainer = trainer_for(
        context,
        "precision=fp16",
        "compile=false",
        f"train-iters={steps}",
        f"eval-interval={steps}",
        "log-interval=4",
        f"fp16.initial_scale_power={power}",
        precision="fp16",
    )
    run(trainer)
    losses = logged(trainer)
    scale = trainer.scaler.get_scale()
    if not 0 < trainer.skipped_steps < steps:
        raise CheckFailed(f"{trainer.skipped_steps} of {steps} steps skipped: expected some")
    if scale != 2.0 ** (power - trainer.skipped_steps):
        raise CheckFailed(f"scale {scale} after {trainer.skipped_steps} halvings of 2^{power}")
    if not all(math.isfinite(loss) for loss in losses.values()):
        raise CheckFailed(f"non-finite losses: {losses}")
    first, last = losses[min(losses)], losses[max(losses)]
    return (
        f"{trainer.skipped_steps} of {steps} steps skipped (scale 2^{power} -> "
        f"2^{math.log2(scale):.0f}); loss {first:.3f} -> {last:.3f}"
    )


def check_t4_path(context: Context) -> str:
    """fp16, eager, SDPA limited to the kernels a T4 has (runtime.attention_kernels)."""
    with t4_path.t4_attention():
        trainer = trainer_for(context, "precision=fp16", "compile=false", precision="fp16")
        kernel = kernel_that_runs(trainer)
        run(trainer)
    # the first of a T4's kernels this device has (a CPU has no memory-efficient kernel)
    expected = SDPBackend.EFFICIENT_ATTENTION if context.device.type == "cuda" else SDPBackend.MATH
    if kernel != expected:
        raise CheckFailed(f"SDPA ran {ATTENTION_NAMES[kernel]}, not {ATTENTION_NAMES[expected]}")
    losses = logged(trainer)
    if not all(math.isfinite(loss) for loss in losses.values()):
        raise CheckFailed(f"non-finite losses: {losses}")
    return (
        f"{ATTENTION_NAMES[kernel]} attention; losses {losses[1]:.3f} -> {losses[max(losses)]:.3f}"
    )


def compiled_against_eager(context: Context, mode: str, accumulation: int) -> str:
    batch = f"global-batch-size={accumulation * (4 if context.smoke else 8)}"
    reference = run(trainer_for(context, "compile=false", batch))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    trainer = trainer_for(context, "compile=true", f"compile-mode={mode}", batch)
    start = time.perf_counter()
    run(trainer)
    seconds = time.perf_counter() - start
    breaks = dict(counters["graph_break"])
    if breaks:
        raise CheckFailed(f"graph breaks: {breaks}")
    graphs = counters["stats"]["unique_graphs"]
    if graphs != 1:
        raise CheckFailed(f"{graphs} graphs compiled (recompiles): expected 1")
    return (
        f"{trainer.runtime.describe()}, {accumulation} micro-batches a step: "
        f"{same_run(reference, trainer)}; {seconds:.0f} s with compilation"
    )


def check_compile(context: Context) -> str:
    return compiled_against_eager(context, "default", accumulation=1)


def check_compile_cuda_graphs(context: Context) -> str:
    """reduce-overhead replays CUDA graphs; with accumulation each micro-batch is a new step."""
    return compiled_against_eager(context, "reduce-overhead", accumulation=2)


def check_chunked_loss(context: Context) -> str:
    """Pythia's 50k vocabulary in several chunks: the loss and every gradient of the chunked
    path against the plain one, in the run's precision."""
    runtime = resolve_runtime(context.device.type, "auto", "false", notice=common.quiet)
    sequence = 64 if context.smoke else 2048
    shapes = ModelConfig(
        vocab_size=50304,
        hidden_size=64 if context.smoke else 256,
        num_layers=1,
        num_attention_heads=2,
        max_position_embeddings=sequence,
    )
    torch.manual_seed(0)
    plain = GPTNeoX(shapes).to(context.device)
    chunked = GPTNeoX(dataclasses.replace(shapes, chunked_cross_entropy=True)).to(context.device)
    chunked.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 50277, (2, sequence + 1), device=context.device)
    losses = []
    for model in (plain, chunked):
        with runtime.autocast():
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss.item())
    worst = max(
        ((a.grad - b.grad).abs().max() / a.grad.abs().max()).item()
        for a, b in zip(plain.parameters(), chunked.parameters(), strict=True)
    )
    loss_difference = abs(losses[0] - losses[1])
    if loss_difference > 1e-3 or worst > 2e-2:
        raise CheckFailed(f"loss differs by {loss_difference:.2g}, a gradient by {worst:.2g}")
    elements = LOSS_CHUNK_ELEMENTS.get(context.device.type, LOSS_CHUNK_ELEMENTS["other"])
    rows_per_chunk = elements // 50304
    chunks = math.ceil(2 * sequence / rows_per_chunk)
    return (
        f"{runtime.precision}, {chunks} chunks: loss within {loss_difference:.1e}, "
        f"gradients within {worst:.1e} (relative)"
    )


def check_device_sampler(context: Context) -> str:
    tokens = np.random.default_rng(0).integers(0, 50277, size=1_000_000).astype(np.uint16)
    host = WindowSampler(tokens, 256, seed=1234, split="train")
    resident = DeviceWindowSampler(host, context.device)
    for step in range(20):
        for stream in (0, 1):
            expected, got = host.batch(step, 8, stream), resident.batch(step, 8, stream)
            if got.inputs.device.type != context.device.type:
                raise CheckFailed(f"the batch is on {got.inputs.device}")
            if not (
                expected.inputs.equal(got.inputs.cpu())
                and expected.targets.equal(got.targets.cpu())
            ):
                raise CheckFailed(f"step {step}, stream {stream}: other windows than the host's")
    return "20 steps x 2 streams: the host sampler's windows, gathered on the device"


def check_kv_cache(context: Context) -> str:
    """Greedy decoding with the cache picks what a full forward pass over the sequence picks."""
    width, context_length = (64, 64) if context.smoke else (256, 256)
    shapes = ModelConfig(
        vocab_size=512,
        hidden_size=width,
        num_layers=2,
        num_attention_heads=width // 64,
        max_position_embeddings=context_length,
    )
    torch.manual_seed(0)
    model = GPTNeoX(shapes).to(context.device).eval()
    prompt = torch.randint(0, 512, (4, 16), device=context.device)
    new_tokens = shapes.max_position_embeddings - 16
    with exact_matmuls(), torch.no_grad():
        generated = generate.neoxlab_generate(model, prompt, new_tokens)
        logits, _ = model(torch.cat((prompt, generated[:, :-1]), dim=1))
    logits = logits[:, 15:]  # the predictions of the generated positions
    chosen = logits.gather(-1, generated[..., None]).squeeze(-1)
    gap = (logits.max(dim=-1).values - chosen).max().item()  # 0 where the argmax was chosen
    if gap > 1e-4:
        raise CheckFailed(f"a cached step chose a token {gap:.2g} below the best logit")
    return f"4 x {new_tokens} tokens: each the full pass's argmax (largest gap {gap:.1e})"


def check_hf_parity(context: Context) -> str:
    """The export, loaded by transformers on this device: the same logits and greedy tokens."""
    import transformers

    trainer = run(trainer_for(context, "train-iters=1", "save-interval=1", "save=checkpoints"))
    checkpoint = latest_checkpoint(trainer.run_dir / "checkpoints")
    export = export_hf(checkpoint, context.folder / "hf", log=common.quiet)
    ours = load_trained(checkpoint, context.device).model.eval()
    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(export).to(context.device).eval()
    theirs.generation_config.eos_token_id = None
    prompt = torch.randint(0, 300, (2, 8), device=context.device)
    with exact_matmuls(), torch.no_grad():
        difference = (ours(prompt)[0] - theirs(input_ids=prompt).logits).abs().max().item()
        same = generate.neoxlab_generate(ours, prompt, 16) == generate.transformers_generate(
            theirs, prompt, 16
        )
    if difference > 1e-4 or not same.all():
        raise CheckFailed(
            f"logits differ by {difference:.2g}; {same.float().mean():.0%} same tokens"
        )
    return f"logits within {difference:.1e}; 2 x 16 greedy tokens identical"


def check_exact_resume(context: Context) -> str:
    """Stopped at step 3 and resumed, a run with dropout (the device's RNG state) gives the
    losses of the uninterrupted run."""
    run_overrides = ["precision=fp32", "compile=false", "hidden-dropout=0.1", "save=checkpoints"]
    run_overrides += ["save-interval=3"]
    whole = run(trainer_for(context, *run_overrides, "run-name=whole"))
    exact = resumed_at_step_3(context, run_overrides, whole)
    return f"steps 4-6 after resuming at 3: {exact} the uninterrupted run's losses"


def resumed_at_step_3(context: Context, overrides: list[str], whole: Trainer) -> str:
    """The run of `overrides` stopped at step 3 and resumed: how close its later losses come
    to those of `whole`, the same run uninterrupted ("bitwise" or "within X"; 1e-5 fails)."""
    part = run(trainer_for(context, *overrides, "run-name=part", "exit-interval=3"))
    resumed = run(trainer_for(context, *overrides, "run-name=part", resume=part.run_dir))
    expected = {step: loss for step, loss in logged(whole).items() if step > 3}
    got = {step: loss for step, loss in logged(resumed).items() if step > 3}
    difference = agree(expected, got, 1e-5)
    return "bitwise" if difference == 0 else f"within {difference:.1e}"


def torchrun_world_of_one(context: Context, mode: str) -> str:
    overrides = ["compile=false", "save=checkpoints", "save-interval=6"]
    plain = run(trainer_for(context, *overrides, "run-name=plain"))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        str(BENCH / "one_process_world.py"),
        *context.model(),
        *overrides,
        f"distributed={mode}",
        "run-name=world",
        "--no-progress",
    ]
    done = subprocess.run(command, cwd=context.folder, capture_output=True, text=True, check=False)
    if done.returncode:
        raise CheckFailed(f"torchrun exited {done.returncode}: {done.stderr[-1500:]}")
    (run_dir,) = (context.folder / "runs").glob("world-*")
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None or read_state(checkpoint)["step"] != 6:
        raise CheckFailed("the run wrote no step-6 checkpoint")
    # rank 0 gathered every weight whole (FSDP2: from DTensor shards)
    weights = load_file(checkpoint / "model.safetensors")
    expected = plain.model.state_dict()
    if weights.keys() != expected.keys() or any(
        weights[name].shape != tensor.shape for name, tensor in expected.items()
    ):
        raise CheckFailed("the checkpoint's weights are not the whole model's")
    precision = plain.runtime.precision
    backend = "NCCL" if context.device.type == "cuda" else "gloo"
    versus = compare_runs(plain.run_dir, run_dir, precision)
    return f"{backend}, {precision}: {versus} of one process; whole checkpoint"


def check_ddp(context: Context) -> str:
    return torchrun_world_of_one(context, "ddp")


def check_fsdp2(context: Context) -> str:
    return torchrun_world_of_one(context, "fsdp")


def check_sdpa_kernel(context: Context) -> str:
    """The kernel SDPA picks is the first of runtime.attention_kernels."""
    trainer = trainer_for(context, "compile=false")
    expected = trainer.runtime.attention_kernels[0]
    kernel = kernel_that_runs(trainer)
    if kernel != expected:
        raise CheckFailed(
            f"SDPA ran {ATTENTION_NAMES[kernel]}; runtime.attention_kernels lists "
            f"{ATTENTION_NAMES[expected]} first"
        )
    return f"{ATTENTION_NAMES[kernel]} ({trainer.runtime.precision}), as the runtime says"


def check_lm_eval(context: Context) -> str:
    """`neoxlab eval --tasks` on this device scores as on the CPU: lm-eval's rolling perplexity
    over the offline python_stdlib_perplexity task (this Python's own files: nothing to
    download), for a model trained a few steps on the task's first files."""
    try:
        import_lm_eval()
    except NeoxlabError as missing:
        raise Skip(f"{missing}: add its wheels (bench/gpu_wheels.txt)") from None
    texts = python_stdlib_perplexity()["test"]["text"][:LM_EVAL_TRAIN_FILES]
    corpus = context.folder / "stdlib.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    data = [f"data-path={corpus}", "tokenizer-type=bpe", "vocab-size=300"]
    data += [f"vocab-file={context.folder / 'stdlib-tokenizer.json'}"]
    trainer = run(trainer_for(context, *data, "save=checkpoints", "save-interval=6"))
    checkpoint = latest_checkpoint(trainer.run_dir / "checkpoints")
    documents = 2 if context.smoke else 4
    options = BenchmarkOptions(
        ("python_stdlib_perplexity",), str(common.REPO / "benchmarks"), documents, batch_size=16
    )
    names = prepare_tasks(options)
    scores = {}
    for device in (torch.device("cpu"), context.device):
        with exact_matmuls():
            trained = load_trained(checkpoint, device)
            results = evaluate_model(trained, options, names, quiet=True)
        scores[device.type] = metric_values(results)
    cpu, here = scores["cpu"], scores[context.device.type]
    worst = max(abs(here[name] - value) / abs(value) for name, value in cpu.items())
    if cpu.keys() != here.keys() or not worst <= 1e-4:  # NaN fails too
        raise CheckFailed(f"{context.device.type} {here} against the CPU's {cpu}")
    bits = here["benchmarks/python_stdlib_perplexity/bits_per_byte"]
    return f"{documents} files, {bits:.3f} bits/byte: within {worst:.1e} (relative) of the CPU"


def lora_base(context: Context) -> Path:
    """A transformers GPTNeoX folder of the checks' model after one step: the frozen base the
    adapter checks train on (init-from), built once per process."""
    folder = context.folder / "lora-base"
    if not folder.exists():
        overrides = ["train-iters=1", "save-interval=1", "save=checkpoints", "run-name=base"]
        trainer = run(trainer_for(context, *overrides))
        export_hf(latest_checkpoint(trainer.run_dir / "checkpoints"), folder, log=common.quiet)
    return folder


def adapters_train(context: Context, precision: str, *overrides: str) -> str:
    """LoRA (rank 8) on the base: only adapters take gradients, the base's weights stay
    bitwise unchanged (4-bit ones included), and the adapters learn: the last steps' losses
    are below those of the frozen base (lr 0) on the same batches."""
    steps = 10 if context.smoke else 20
    runs = {}
    for lr in ("0", "1e-2"):
        runs[lr] = trainer_for(
            context,
            "lora-rank=8",
            "lora-alpha=16",
            f"lr={lr}",
            f"train-iters={steps}",
            f"eval-interval={steps}",
            f"precision={precision}",
            "compile=false",
            *overrides,
            precision=precision,
            init_from=lora_base(context),
        )
    trainer = runs["1e-2"]
    parameters = dict(trainer.model.named_parameters())
    frozen = {name: p.detach().clone() for name, p in parameters.items() if not p.requires_grad}
    trained = [name for name, p in parameters.items() if p.requires_grad]
    for each in runs.values():
        run(each)
    if not trained or any(".lora_" not in name for name in trained):
        raise CheckFailed(f"trained parameters other than adapters: {trained[:4]}")
    moved = [name for name, before in frozen.items() if not parameters[name].equal(before)]
    if moved:
        raise CheckFailed(f"{len(moved)} frozen weights changed, e.g. {moved[0]}")
    base, tuned = (list(logged(runs[lr]).values())[-5:] for lr in ("0", "1e-2"))
    gain = (sum(base) - sum(tuned)) / len(base)
    if not (all(math.isfinite(loss) for loss in tuned) and gain > 0):
        raise CheckFailed(f"adapters did not learn: last losses {tuned} against the base's {base}")
    return (
        f"{precision}: {len(trained)} adapter tensors trained, {len(frozen)} frozen unchanged; "
        f"last 5 losses {gain:.3f} below the frozen base's"
    )


def check_lora(context: Context) -> str:
    """LoRA as a T4 trains it: fp16 with the GradScaler."""
    return adapters_train(context, "fp16")


def check_qlora(context: Context) -> str:
    """QLoRA: the base's blocks in nf4 (bitsandbytes), adapters in the compute precision."""
    if context.device.type != "cuda":
        raise Skip("QLoRA needs CUDA (its CPU refusal: tests/test_finetune.py)")
    precision = "bf16" if has_bf16(context) else "fp16"
    return adapters_train(context, precision, "load-in-4bit=true")


def check_adamw8bit(context: Context) -> str:
    """bitsandbytes' 8-bit AdamW on the device: close to AdamW's run, and stopped at step 3 and
    resumed, the uninterrupted run's losses."""
    common_overrides = ["precision=fp32", "compile=false", "save=checkpoints", "save-interval=3"]
    adamw = run(trainer_for(context, *common_overrides, "run-name=adamw"))
    eight_bit = [*common_overrides, "optimizer.type=AdamW8bit"]
    whole = run(trainer_for(context, *eight_bit, "run-name=whole"))
    if type(whole.optimizer).__name__ != "AdamW8bit":
        raise CheckFailed(f"the run stepped {type(whole.optimizer).__name__}, not AdamW8bit")
    exact = resumed_at_step_3(context, eight_bit, whole)
    versus = agree(logged(adamw), logged(whole), LOSS_TOLERANCE["fp32"])
    return f"losses within {versus:.1e} of AdamW's; resumed at 3: {exact} the uninterrupted run"


# ---- speed ----------------------------------------------------------------------------------


def training_rows(
    workload: str, config_file: Path, overrides: list[str], steps: int, warmup: int, smoke: bool
) -> list[list[str]]:
    """neoxlab's trainer (its defaults for this GPU), then transformers' plain loop."""
    variants = {"default": ([], True)}
    measured, baseline, _ = hf_baseline.neoxlab_variants_then_hf(
        config_file, overrides, variants, ["default"], steps, warmup, smoke
    )
    return [
        [
            workload,
            implementation,
            common.number(result.tokens_per_second),
            common.number(result.mfu, "{:.1%}"),
            common.number(result.peak_memory_gib, "{:.2f}"),
            f"{result.tokens_per_second / baseline.tokens_per_second:.2f}x",
            f"{result.precision}, {result.steps} steps timed after {warmup}",
        ]
        for implementation, _, result in measured
    ]


def speed_baby_gpt(context: Context) -> list[list[str]]:
    """configs/shakespeare_char.yml's shapes (67 characters padded to 128 rows)."""
    steps, warmup, log_every = (6, 2, 2) if context.smoke else (150, 50, 25)
    overrides = [
        *corpora.synthetic_corpus(context.folder, 67, 1_000_000),
        *throughput.timed_run_overrides(steps, log_every, context.smoke),
    ]
    config = common.CONFIGS / "shakespeare_char.yml"
    return training_rows("baby GPT", config, overrides, steps, warmup, context.smoke)


def speed_pythia160m(context: Context) -> list[list[str]]:
    """configs/pythia/160M.yml at batch 16 x 2048, without activation checkpointing."""
    steps, warmup, log_every, batch = (6, 2, 2, 4) if context.smoke else (30, 10, 5, 16)
    vocab = 500 if context.smoke else 50277
    overrides = [
        *corpora.synthetic_corpus(context.folder, vocab, 200_000 if context.smoke else 8_000_000),
        f"micro-batch-size={batch}",
        f"global-batch-size={batch}",
        "checkpoint-activations=false",
        f"lr-decay-iters={steps}",
        *throughput.timed_run_overrides(steps, log_every, context.smoke),
    ]
    config = common.CONFIGS / "pythia" / "160M.yml"
    return training_rows("Pythia-160M shape", config, overrides, steps, warmup, context.smoke)


def speed_generation(context: Context) -> list[list[str]]:
    prompt, new_tokens, repeats = (8, 8, 1) if context.smoke else (64, 256, 2)
    rows = []
    for name in generate.MODELS:
        measured = generate.model_rows(
            name,
            context.folder,
            context.device,
            [1, 16],
            prompt,
            new_tokens,
            repeats,
            context.smoke,
        )
        for model, batch, implementation, tokens_per_second, _, versus, same in measured:
            workload = f"generation, {model}, batch {batch}"
            notes = f"{same} same tokens"
            rows.append([workload, implementation, tokens_per_second, "-", "-", versus, notes])
    return rows


def speed_t4_configs(context: Context) -> list[list[str]]:
    steps, warmup = (6, 2) if context.smoke else (30, 10)
    rows = []
    for name in t4_path.CONFIGS:
        measured = t4_path.measure(name, context.folder, steps, warmup, context.smoke)
        _, precision, attention, tokens_per_second, allocated, reserved, estimate, fits = measured
        notes = f"reserved {reserved} GiB, dry-run {estimate} GiB, fits a T4: {fits}"
        implementation = f"neoxlab {precision} eager, {attention}"
        rows.append(
            [f"T4 path, {name}", implementation, tokens_per_second, "-", allocated, "-", notes]
        )
    return rows


# ---- the registries: one line per check or measurement ---------------------------------------

CHECKS: dict[str, Callable[[Context], str]] = {
    "fp32": check_fp32,
    "bf16": check_bf16,
    "fp16-grad-scaler": check_fp16_grad_scaler,
    "t4-path": check_t4_path,
    "compile": check_compile,
    "compile-cuda-graphs": check_compile_cuda_graphs,
    "chunked-loss": check_chunked_loss,
    "device-sampler": check_device_sampler,
    "kv-cache": check_kv_cache,
    "hf-parity": check_hf_parity,
    "exact-resume": check_exact_resume,
    "torchrun-ddp": check_ddp,
    "torchrun-fsdp2": check_fsdp2,
    "sdpa-kernel": check_sdpa_kernel,
    "lora": check_lora,
    "qlora": check_qlora,
    "adamw8bit": check_adamw8bit,
    "lm-eval": check_lm_eval,
}
SPEED: dict[str, Callable[[Context], list[list[str]]]] = {
    "speed-baby-gpt": speed_baby_gpt,
    "speed-pythia160m": speed_pythia160m,
    "speed-generation": speed_generation,
    "speed-t4-configs": speed_t4_configs,
}


# ---- running them ---------------------------------------------------------------------------


def run_inline(name: str, device: torch.device, smoke: bool) -> Result:
    """One check or measurement in this process; whatever it raises becomes its result."""
    kind = "correctness" if name in CHECKS else "speed"
    start = time.perf_counter()
    rows: list[list[str]] = []
    error = None
    with common.scratch() as folder:
        context = Context(device, smoke, folder)
        try:
            if kind == "correctness":
                detail = CHECKS[name](context)
            else:
                rows = SPEED[name](context)
                detail = f"{len(rows)} rows"
            status = "pass"
        except Skip as skip:
            status, detail = "skip", str(skip)
        # Any failure is this item's result, recorded with its reason: the next item runs.
        except Exception as failure:
            status, detail = "FAIL", f"{type(failure).__name__}: {failure}"
            error = traceback.format_exc()
        finally:
            torch._dynamo.reset()
            throughput.release(device)
    return Result(name, kind, status, time.perf_counter() - start, detail, rows, error)


def run_isolated(name: str, smoke: bool, seconds_left: float, log: io.TextIOBase) -> Result:
    """One check or measurement in a process of its own (this script with --inline), killed
    with everything it started when its time is up; its output goes to `log`."""
    kind = "correctness" if name in CHECKS else "speed"
    if seconds_left < MIN_SECONDS_LEFT:
        return Result(name, kind, "not run", 0.0, "the time budget was spent")
    limit = min(LIMITS[kind], seconds_left)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as child_out:
        command = [sys.executable, __file__, "--out", child_out, "--only", name, "--inline"]
        log.write(f"\n===== {name} =====\n")
        log.flush()
        child = subprocess.Popen(
            [*command, *(["--smoke"] if smoke else [])],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout kills torchrun's too
        )
        try:
            child.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return Result(name, kind, "timeout", time.perf_counter() - start, f"over {limit:.0f} s")
        report = Path(child_out) / "gpu_check.json"
        if report.exists():
            (result,) = json.loads(report.read_text())["results"]
            return Result(**result)
    seconds = time.perf_counter() - start
    detail = f"its process exited {child.returncode} without a result (see gpu_check.log)"
    return Result(name, kind, "FAIL", seconds, detail)


# ---- the report -----------------------------------------------------------------------------


def cell(text: str, limit: int = 300) -> str:
    """Text for one markdown table cell: one line, no column breaks."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def markdown(results: list[Result], device: torch.device, command: str, seconds: float) -> str:
    heading = (
        f"GPU check, {datetime.date.today().isoformat()}: {common.describe_device(device)}, "
        f"commit {common.commit()}; `{command}` ({seconds:.0f} s)"
    )
    items = common.table(
        ["item", "kind", "result", "seconds", "detail"],
        [[r.name, r.kind, r.status, f"{r.seconds:.0f}", cell(r.detail)] for r in results],
    )
    rows = [row for result in results for row in result.rows]
    speed = common.table(SPEED_HEADERS, rows) if rows else "No speed rows."
    return f"{heading}\n\n{items}\n\n{speed}\n"


def write_report(
    out: Path, results: list[Result], device: torch.device, command: str, seconds: float
) -> None:
    summary = {
        "device": common.describe_device(device),
        "commit": common.commit(),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "seconds": seconds,
        "results": [dataclasses.asdict(result) for result in results],
    }
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    names = [*CHECKS, *SPEED]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME", help=", ".join(names))
    parser.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET, help="seconds for everything (450)"
    )
    parser.add_argument("--inline", action="store_true", help="run every item in this process")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (tests)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = common.bench_device(args.smoke)
    command = common.command(__file__, argv)
    start = time.monotonic()
    results: list[Result] = []
    log = None if args.inline else open(args.out / "gpu_check.log", "w")  # noqa: SIM115
    try:
        for name in args.only or names:
            if log is None:
                result = run_inline(name, device, args.smoke)
            else:
                seconds_left = start + args.budget - time.monotonic()
                result = run_isolated(name, args.smoke, seconds_left, log)
            results.append(result)
            print(f"{name}: {result.status} ({result.seconds:.0f} s) {result.detail}", flush=True)
            write_report(args.out, results, device, command, time.monotonic() - start)
    finally:
        if log is not None:
            log.close()
    text = markdown(results, device, command, time.monotonic() - start)
    (args.out / "gpu_check.md").write_text(text)
    print(f"\n{text}")
    return 0 if all(r.status in ("pass", "skip") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
