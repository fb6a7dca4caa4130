"""The Colab T4 path on a bigger GPU: fp16 + GradScaler, no flash attention, no torch.compile.

A T4 (sm_75) has no bf16, no flash-attention kernel and no official Triton support, so there
neoxlab trains in fp16 with dynamic loss scaling, eagerly, with SDPA's memory-efficient (or
math) kernel. This script forces exactly that (precision=fp16, compile=false, and
torch.nn.attention.sdpa_kernel limited to the kernels neoxlab's runtime lists for a T4:
`runtime.attention_kernels("cuda", (7, 5), "fp16")`) and trains configs/shakespeare.yml and
configs/code_completion.yml as written, recording peak GPU memory (torch.cuda.max_memory_allocated,
and reserved, which must stay under 12 GiB of the ~14.5 GiB a 16 GB T4 shows) beside
`--dry-run`'s estimate. Both train on random tokens of their tokenizer's size (5,000 and 16,384:
memory and speed depend on shapes, not on which tokens), code_completion.yml with code-metrics
off (line completion needs real validation files).

    python bench/t4_path.py [--steps 40] [--record]
"""

from __future__ import annotations

import contextlib

import common
import corpora
import throughput
import torch
from torch.nn.attention import sdpa_kernel

from neoxlab.memory import GIB, describe
from neoxlab.runtime import attention_kernels

T4_CAPABILITY = (7, 5)
# "Fits with room": at most 12 GiB reserved of the ~14.5 GiB a T4 shows (as notebooks_t4.py).
T4_LIMIT_GIB = 12.0
# config -> the vocabulary of its tokenizer (the random corpus's)
CONFIGS = {"shakespeare.yml": 5000, "code_completion.yml": 16384}
HEADERS = [
    "config",
    "precision",
    "attention",
    "tokens/s",
    "peak allocated GiB",
    "peak reserved GiB",
    "dry-run estimate GiB",
    "fits a T4",
]


def t4_attention() -> contextlib.AbstractContextManager:
    """SDPA limited to the kernels a T4 has for fp16 (no flash, no cuDNN)."""
    return sdpa_kernel(list(attention_kernels("cuda", T4_CAPABILITY, "fp16")))


def measure(name: str, folder, steps: int, warmup: int, smoke: bool) -> list[object]:
    """Train config `name` as a T4 would for `steps` steps; its row of the table."""
    (folder / name).mkdir()
    vocab = 300 if smoke else CONFIGS[name]
    overrides = [
        *corpora.synthetic_corpus(folder / name, vocab, 2_000_000),
        "code-metrics=false",
        "precision=fp16",
        "compile=false",
        *throughput.timed_run_overrides(steps, 2 if smoke else 10, smoke),
    ]
    config = common.neoxlab_config([common.CONFIGS / name], overrides)
    with t4_attention():
        result = throughput.train_neoxlab(config, warmup)
    device = common.bench_device(smoke)
    reserved = torch.cuda.max_memory_reserved(device) / GIB if device.type == "cuda" else None
    estimate = describe(config).device_bytes / GIB
    fits = "-" if reserved is None else ("yes" if reserved <= T4_LIMIT_GIB else "no")
    return [
        name,
        result.precision,
        "efficient/math",
        common.number(result.tokens_per_second),
        common.number(result.peak_memory_gib, "{:.2f}"),
        common.number(reserved, "{:.2f}"),
        f"{estimate:.2f}",
        fits,
    ]


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup = 6, 2
    device = common.bench_device(args.smoke)
    with common.scratch() as folder:
        rows = [measure(name, folder, args.steps, args.warmup, args.smoke) for name in CONFIGS]
    print(f"T4 path (fp16, no flash, eager) on {common.describe_device(device)}")
    common.report(
        args.record, "T4 path: fp16 without flash attention", HEADERS, rows, device, __file__, argv
    )
    return rows


if __name__ == "__main__":
    main()
