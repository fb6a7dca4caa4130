"""What the benchmarks share: where they ran, corpora, neoxlab's trainer and the Hugging Face
baseline timed the same way, and the rows they add to bench/RESULTS.md.

Every script takes `--smoke` (a seconds-long CPU run with tiny shapes; tests/test_bench.py runs
each one so none can rot) and `--record [FILE]` (append its rows to bench/RESULTS.md, or FILE,
with the date, device, commit and exact command). Without a GPU a script still runs, on the
CPU, and says so in its device column.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neoxlab.config import Config, load_config
from neoxlab.data import batches
from neoxlab.data.corpora import fetch_shakespeare, write_shakespeare_jsonl
from neoxlab.data.indexed import IndexedDatasetWriter, best_dtype
from neoxlab.model import ModelConfig
from neoxlab.runtime import Runtime, model_flops_utilization, resolve_runtime
from neoxlab.tokenizer import read_text
from neoxlab.tracking import read_metrics
from neoxlab.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
CONFIGS = REPO / "configs"
# Devices the targets were set on (dense bf16 peak 989 TFLOP/s).
TARGET_DEVICES = ("H100", "H200")
# Tiny shapes for --smoke: seconds on a CPU.
SMOKE_MODEL = [
    "hidden-size=32",
    "num-layers=2",
    "num-attention-heads=2",
    "seq-length=32",
    "max-position-embeddings=32",
    "micro-batch-size=4",
    "global-batch-size=4",
    "device=cpu",
]


def parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU, seconds (tests use it)"
    )
    parser.add_argument(
        "--record",
        nargs="?",
        const=RESULTS,
        type=Path,
        metavar="FILE",
        help=f"append the rows to FILE (default {RESULTS.relative_to(REPO)})",
    )
    return parser


def bench_device(smoke: bool) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, "
            f"CUDA {torch.version.cuda})"
        )
    name = platform.processor() or platform.machine()
    return f"CPU {name}, {os.cpu_count()} cores (torch {torch.__version__})"


def on_target_device(device: torch.device) -> bool:
    """Whether the issue's targets apply to this device (they were set on an H100)."""
    return device.type == "cuda" and any(
        name in torch.cuda.get_device_name(device) for name in TARGET_DEVICES
    )


def commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{head}+uncommitted" if git("status", "--porcelain", "--untracked-files=no") else head


def command(script: str, argv: Sequence[str] | None) -> str:
    """The command line that runs `script` with `argv` (default: this process's arguments)."""
    path = Path(script).resolve()
    with contextlib.suppress(ValueError):
        path = path.relative_to(REPO)
    return shlex.join(["python", str(path), *(sys.argv[1:] if argv is None else argv)])


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


RECORD_COLUMNS = ("date", "device", "commit", "command")
NO_ROWS_YET = "No rows yet"  # RESULTS.md's placeholder line in a section without results


def record(
    path: Path,
    section: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    device: torch.device,
    command_line: str,
) -> None:
    """Append rows (prefixed with date, device, commit and command) to the table under the
    `## section` heading of `path`; a missing section or file is created with its header."""
    where = (
        datetime.date.today().isoformat(),
        describe_device(device),
        commit(),
        f"`{command_line}`",
    )
    new_table = table([*RECORD_COLUMNS, *headers], [[*where, *row] for row in rows]).splitlines()
    body = (
        path.read_text(encoding="utf-8").splitlines() if path.exists() else ["# Benchmark results"]
    )
    heading = f"## {section}"
    if heading not in body:
        body += ["", heading, "", *new_table]
    else:
        start = body.index(heading)
        end = next((i for i in range(start + 1, len(body)) if body[i].startswith("## ")), len(body))
        table_lines = [i for i in range(start, end) if body[i].startswith("|")]
        if table_lines:  # below the last row: older rows stay
            body[table_lines[-1] + 1 : table_lines[-1] + 1] = new_table[2:]
        else:  # the section's first table, after its text (and instead of "No rows yet")
            kept = [line for line in body[start:end] if not line.startswith(NO_ROWS_YET)]
            while len(kept) > 1 and not kept[-1].strip():
                kept.pop()
            after = [""] if end < len(body) else []  # a blank line before the next section
            body[start:end] = [*kept, "", *new_table, *after]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(body) + "\n", encoding="utf-8")
    tmp.replace(path)


def report(
    record_path: Path | None,
    section: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    device: torch.device,
    script: str,
    argv: Sequence[str] | None,
) -> None:
    """Print the table; with `--record` also append it to `record_path` (see `record`)."""
    print(table(headers, rows))
    if record_path:
        record(record_path, section, headers, rows, device, command(script, argv))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def number(value: float | None, form: str = "{:,.0f}") -> str:
    return "-" if value is None or not math.isfinite(value) else form.format(value)


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A temporary working folder (runs/ lands there), removed afterwards."""
    previous = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="neoxlab-bench-") as folder:
        os.chdir(folder)
        try:
            yield Path(folder)
        finally:
            os.chdir(previous)


# ---- corpora --------------------------------------------------------------------------------


def shakespeare_jsonl(folder: Path, characters: int | None = None) -> Path:
    """Tiny Shakespeare (its first `characters`) as neoxlab's split jsonl in `folder`."""
    text = read_text(fetch_shakespeare())
    return write_shakespeare_jsonl(text[:characters], folder / "shakespeare.jsonl")


def synthetic_corpus(folder: Path, vocab_size: int, tokens: int, documents: int = 200) -> list[str]:
    """Uniformly random token ids as a prepared GPT-NeoX dataset, with a word-level tokenizer
    of `vocab_size` tokens (the last two special): for speed and memory, where only the shapes
    matter. Returns the config overrides that train on it."""
    from tokenizers import Tokenizer, models

    specials = ["<|endoftext|>", "<|padding|>"]
    words = {f"t{i}": i for i in range(vocab_size - len(specials))}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tokenizer.add_special_tokens(specials)
    tokenizer_file = folder / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    eod = tokenizer.token_to_id(specials[0])
    rng = np.random.default_rng(0)
    prefix = folder / "random_text_document"
    per_document = max(1, tokens // documents)
    with IndexedDatasetWriter(prefix, best_dtype(vocab_size)) as writer:
        for _ in range(documents):
            body = rng.integers(0, vocab_size - len(specials), size=per_document - 1)
            writer.add_document(np.append(body, eod))
    return [f"data-path={prefix}", f"vocab-file={tokenizer_file}", "tokenizer-type=hf"]


# ---- neoxlab's trainer, timed by its own metrics ----------------------------------------------


@contextlib.contextmanager
def device_resident(enabled: bool) -> Iterator[None]:
    """With `enabled` false, even small corpora stay on the host (the prefetched, pinned-memory
    path large corpora take), to measure what GPU-resident batches buy."""
    saved = batches.DEVICE_RESIDENT_MAX_TOKENS
    if not enabled:
        batches.DEVICE_RESIDENT_MAX_TOKENS = 0
    try:
        yield
    finally:
        batches.DEVICE_RESIDENT_MAX_TOKENS = saved


@dataclass
class Throughput:
    tokens_per_second: float
    mfu: float | None
    steps: int  # optimizer steps timed (after the warm-up)
    peak_memory_gib: float | None
    model: ModelConfig  # the network trained (for the baseline's shapes)
    global_batch: int
    precision: str


def quiet(message: str) -> None:
    """The trainer's log, unprinted: the scripts print their own tables."""


def neoxlab_config(files: Sequence[Path], overrides: Sequence[str]) -> Config:
    return load_config([str(f) for f in files], list(overrides), notice=quiet)


def windows(run_dir: Path) -> list[tuple[int, int, float]]:
    """(first step, last step, seconds) of each logged training window: the trainer's
    tokens/s covers the steps since the previous log, evaluation and checkpoints excluded."""
    result, previous_step, previous_tokens = [], 0, 0
    for metric in read_metrics(run_dir):
        if "train/tokens_per_second" not in metric:
            continue
        tokens = metric["tokens"] - previous_tokens
        result.append(
            (previous_step + 1, metric["step"], tokens / metric["train/tokens_per_second"])
        )
        previous_step, previous_tokens = metric["step"], metric["tokens"]
    return result


def train_neoxlab(config: Config, warmup_steps: int) -> Throughput:
    """Train with neoxlab's Trainer; tokens/s and MFU over the logged windows that start after
    `warmup_steps` (compilation and autotuning happen in the first steps). The trainer is
    released before returning, so the next run's peak memory is its own."""
    trainer = Trainer(config, progress=False, log=quiet)
    device = trainer.runtime.device
    reset_peak_memory(device)
    with contextlib.redirect_stdout(io.StringIO()):  # its evaluation lines
        trainer.run()
    timed = [w for w in windows(trainer.run_dir) if w[0] > warmup_steps]
    if not timed:
        raise SystemExit(f"no logged window starts after step {warmup_steps}: train longer")
    steps = sum(last - first + 1 for first, last, _ in timed)
    seconds = sum(s for *_, s in timed)
    tokens_per_second = steps * trainer.global_batch * config.seq_length / seconds
    flops = trainer.model.flops_per_token(config.seq_length)
    result = Throughput(
        tokens_per_second,
        mfu(trainer.runtime, flops, tokens_per_second),
        steps,
        peak_memory_gib(device),
        trainer.model.config,
        trainer.global_batch,
        trainer.runtime.precision,
    )
    del trainer
    release(device)
    return result


def timed_run_overrides(steps: int, log_every: int, smoke: bool) -> list[str]:
    """Overrides of a timed training run: no sample, no checkpoint, one evaluation batch."""
    return [
        f"train-iters={steps}",
        f"log-interval={log_every}",
        f"eval-interval={steps}",
        "eval-iters=1",
        "sample-tokens=0",
        "save=false",
        *(SMOKE_MODEL if smoke else []),
    ]


def neoxlab_variants_then_hf(
    config_file: Path,
    overrides: Sequence[str],
    variants: dict[str, tuple[list[str], bool]],
    names: Sequence[str],
    steps: int,
    warmup_steps: int,
    smoke: bool,
) -> tuple[list[tuple[str, str, Throughput]], Throughput, Config]:
    """Train each named neoxlab variant (name -> (extra overrides, small corpora on the GPU)),
    then the transformers baseline at the same shapes and batch, in this one process: the
    measurements, the baseline's (also last in the list) and the baseline's config."""
    measured = []
    for name in names:
        extra, resident = variants[name]
        config = neoxlab_config([config_file], [*overrides, *extra])
        with device_resident(resident):
            measured.append(("neoxlab", name, train_neoxlab(config, warmup_steps)))
    config = neoxlab_config([config_file], overrides)
    first = measured[0][2]
    baseline = train_hf(
        first.model,
        config,
        runtime_for(config),
        first.global_batch,
        steps=3 if smoke else steps - warmup_steps,
        warmup_steps=1 if smoke else warmup_steps,
    )
    measured.append(("transformers", "plain loop", baseline))
    return measured, baseline, config


def release(device: torch.device) -> None:
    """Free what the last run left (compiled graphs hold on to their modules until collected)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def mfu(runtime: Runtime, flops_per_token: int, tokens_per_second: float) -> float | None:
    peak = runtime.peak_flops()
    return model_flops_utilization(flops_per_token, tokens_per_second, peak, 1) if peak else None


# ---- the Hugging Face baseline ------------------------------------------------------------------


def hf_model(model: ModelConfig, device: torch.device) -> torch.nn.Module:
    """transformers' GPTNeoXForCausalLM with the shapes of `model` (random init)."""
    import transformers

    config = transformers.GPTNeoXConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        intermediate_size=model.intermediate_size,
        max_position_embeddings=model.max_position_embeddings,
        rotary_pct=model.rotary_pct,
        rotary_emb_base=model.rotary_emb_base,
        hidden_act={"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[model.activation],
        use_parallel_residual=model.parallel_residual,
        layer_norm_eps=model.layernorm_eps,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        tie_word_embeddings=False,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"  # PyTorch's fused attention, as neoxlab uses
    return transformers.GPTNeoXForCausalLM(config).to(device)


def train_hf(
    model_config: ModelConfig,
    config: Config,
    runtime: Runtime,
    batch: int,
    steps: int,
    warmup_steps: int,
) -> Throughput:
    """The baseline: GPTNeoXForCausalLM and a plain loop (autocast, loss in fp32, fused AdamW on
    CUDA, gradient clipping, torch.compile where neoxlab compiles), batches of random tokens
    made on the device beforehand (no data loading at all: the baseline's best case)."""
    device = runtime.device
    torch.manual_seed(0)
    model = hf_model(model_config, device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        betas=tuple(config.optimizer.get("params", {}).get("betas", (0.9, 0.999))),
        weight_decay=config.weight_decay,
        fused=device.type == "cuda" or None,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.precision == "fp16")
    step_model = torch.compile(model) if runtime.compile else model
    seq, vocab = config.seq_length, model_config.vocab_size
    batches = [torch.randint(0, vocab, (batch, seq + 1), device=device) for _ in range(4)]
    reset_peak_memory(device)
    start = 0.0
    for step in range(warmup_steps + steps):
        if step == warmup_steps:
            synchronize(device)
            start = time.perf_counter()
        windows = batches[step % len(batches)]
        with runtime.autocast():
            logits = step_model(input_ids=windows[:, :-1]).logits
        loss = F.cross_entropy(logits.float().view(-1, vocab), windows[:, 1:].reshape(-1))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clipping or math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens_per_second = steps * batch * seq / seconds
    flops = model_flops_per_token(model_config, seq)
    result = Throughput(
        tokens_per_second,
        mfu(runtime, flops, tokens_per_second),
        steps,
        peak_memory_gib(device),
        model_config,
        batch,
        runtime.precision,
    )
    del model, step_model, optimizer
    release(device)
    return result


def model_flops_per_token(model: ModelConfig, seq_length: int) -> int:
    """The issue's formula for the same shapes (neoxlab's GPTNeoX.flops_per_token)."""
    from neoxlab.model import GPTNeoX

    with torch.device("meta"):
        return GPTNeoX(model).flops_per_token(seq_length)


def runtime_for(config: Config) -> Runtime:
    return resolve_runtime(
        config.device,
        config.requested_precision(),
        config.compile,
        notice=quiet,
        compile_mode=config.compile_mode,
    )
