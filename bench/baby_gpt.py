"""Training throughput of nanoGPT's "baby GPT": neoxlab's trainer vs transformers + a plain loop.

configs/shakespeare_char.yml as it is: 6 layers, 384 hidden, 6 heads, context 256, batch 64,
dropout 0.2, Tiny Shakespeare characters (65 + 2 special tokens, padded to 128 rows); bf16 and
torch.compile on an sm >= 8 GPU. neoxlab is timed by its own metrics.jsonl (the logged windows
after the warm-up steps); the transformers baseline (same shapes and optimizer) runs in the same
process afterwards. Variants change one speed setting each, to measure what it buys.

    python bench/baby_gpt.py [--steps 300] [--variants default cuda-graphs host-batches] [--record]
"""

from __future__ import annotations

import common
import corpora
import hf_baseline
import throughput

CONFIG = common.CONFIGS / "shakespeare_char.yml"
TARGET_TOKENS_PER_SECOND = 2.5e6  # the target on an H100
# name -> (config overrides, small corpora on the GPU)
VARIANTS = {
    "default": ([], True),
    "cuda-graphs": (["compile-mode=reduce-overhead"], True),
    "host-batches": ([], False),  # batches built on the host and prefetched in pinned memory
}
HEADERS = ["implementation", "variant", "tokens/s", "ms/step", "MFU", "peak GiB", "vs HF", "target"]


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=100, help="steps left out of the timing")
    parser.add_argument(
        "--variants", nargs="+", default=["default", "cuda-graphs"], choices=VARIANTS
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup = 6, 2
    device = common.bench_device(args.smoke)
    log_every = 2 if args.smoke else 50
    rows: list[list[object]] = []
    with common.scratch() as folder:
        data = corpora.shakespeare_jsonl(folder, 20_000 if args.smoke else None)
        overrides = [
            f"data-path={data}",
            f"vocab-file={folder / 'char.json'}",
            *throughput.timed_run_overrides(args.steps, log_every, args.smoke),
        ]
        measured, baseline, config = hf_baseline.neoxlab_variants_then_hf(
            CONFIG, overrides, VARIANTS, args.variants, args.steps, args.warmup, args.smoke
        )
    on_target = common.on_target_device(device)
    for implementation, name, result in measured:
        step_ms = 1e3 * result.global_batch * config.seq_length / result.tokens_per_second
        met = "-"
        if on_target and implementation == "neoxlab":
            met = "met" if result.tokens_per_second >= TARGET_TOKENS_PER_SECOND else "not met"
        rows.append(
            [
                implementation,
                name,
                common.number(result.tokens_per_second),
                common.number(step_ms, "{:.2f}"),
                common.number(result.mfu, "{:.1%}"),
                common.number(result.peak_memory_gib, "{:.2f}"),
                f"{result.tokens_per_second / baseline.tokens_per_second:.2f}x",
                met,
            ]
        )
    print(f"baby GPT on {common.describe_device(device)}; target >= 2.5M tokens/s on an H100")
    common.report(
        args.record, "Baby GPT training throughput", HEADERS, rows, device, __file__, argv
    )
    return rows


if __name__ == "__main__":
    main()
