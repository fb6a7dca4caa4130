"""The Colab T4 path on a bigger GPU: fp16 + GradScaler, no flash attention, no torch.compile.

A T4 (sm_75) has no bf16, no flash-attention kernel and no official Triton support, so there
neoxlab trains in fp16 with dynamic loss scaling, eagerly, with SDPA's memory-efficient (or
math) kernel. This script forces exactly that (precision=fp16, compile=false, and
torch.nn.attention.sdpa_kernel limited to EFFICIENT_ATTENTION and MATH) and trains
configs/shakespeare.yml and configs/code_completion.yml as written, recording peak GPU memory
(torch.cuda.max_memory_allocated, and reserved, which must stay under 12 GiB of the ~14.5 GiB a
16 GB T4 shows) beside `--dry-run`'s estimate. shakespeare.yml trains on Tiny Shakespeare;
code_completion.yml on random tokens of its 16,384-token vocabulary (memory and speed depend
on shapes, not on which tokens), with code-metrics off (line completion needs real validation
files).

    python bench/t4_path.py [--steps 40] [--record]
"""

from __future__ import annotations

import common
import corpora
import throughput
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from neoxlab.memory import GIB, describe

# "Fits with room": at most 12 GiB reserved of the ~14.5 GiB a T4 shows (as notebooks_t4.py).
T4_LIMIT_GIB = 12.0
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


def corpus_overrides(name: str, folder, smoke: bool) -> list[str]:
    if name == "shakespeare.yml":
        data = corpora.shakespeare_jsonl(folder, 20_000 if smoke else None)
        return [f"data-path={data}", f"vocab-file={folder / 'bpe.json'}"]
    return [
        *corpora.synthetic_corpus(folder, 500 if smoke else 16384, 2_000_000),
        "code-metrics=false",
    ]


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup = 6, 2
    device = common.bench_device(args.smoke)
    rows: list[list[object]] = []
    with common.scratch() as folder:
        for name in ("shakespeare.yml", "code_completion.yml"):
            overrides = [
                *corpus_overrides(name, folder, args.smoke),
                "precision=fp16",
                "compile=false",
                *throughput.timed_run_overrides(args.steps, 2 if args.smoke else 10, args.smoke),
                *(["vocab-size=300"] if args.smoke else []),
            ]
            config = common.neoxlab_config([common.CONFIGS / name], overrides)
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                result = throughput.train_neoxlab(config, args.warmup)
            reserved = (
                torch.cuda.max_memory_reserved(device) / GIB if device.type == "cuda" else None
            )
            estimate = describe(config).device_bytes / GIB
            fits = "-" if reserved is None else ("yes" if reserved <= T4_LIMIT_GIB else "no")
            rows.append(
                [
                    name,
                    result.precision,
                    "efficient/math",
                    common.number(result.tokens_per_second),
                    common.number(result.peak_memory_gib, "{:.2f}"),
                    common.number(reserved, "{:.2f}"),
                    f"{estimate:.2f}",
                    fits,
                ]
            )
    print(f"T4 path (fp16, no flash, eager) on {common.describe_device(device)}")
    common.report(
        args.record, "T4 path: fp16 without flash attention", HEADERS, rows, device, __file__, argv
    )
    return rows


if __name__ == "__main__":
    main()
