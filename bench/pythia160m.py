"""Training throughput and MFU at the Pythia-160M shape: neoxlab's trainer vs transformers.

configs/pythia/160M.yml's model (12 layers, 768 hidden, 12 heads, context 2048, GPT-NeoX-20B's
50,277 tokens padded to 50,304, tanh GELU) at batch 16 x 2048 on one GPU, without activation
checkpointing (the config turns it on to fit batch 32; recomputation is not model FLOPs).
The data is uniformly random token ids (speed depends on shapes only), prepared as a GPT-NeoX
.bin/.idx dataset with a word-level tokenizer of the same size. MFU = model FLOPs per token
(6 x parameters without the input embedding + 12 x layers x hidden x context) x tokens/s over
the GPU's dense bf16 peak (runtime.PEAK_FLOPS). The transformers baseline runs in the same call.

    python bench/pythia160m.py [--steps 60] [--variants default chunked-loss host-batches]
        [--record]
"""

from __future__ import annotations

import common
import corpora
import hf_baseline
import throughput

CONFIG = common.CONFIGS / "pythia" / "160M.yml"
VOCAB = 50277
TARGET_MFU = 0.50  # the target on an H100
VARIANTS = {
    "default": ([], True),
    "chunked-loss": (["chunked-cross-entropy=true"], True),
    "host-batches": ([], False),  # the memmap path: batches prefetched in pinned memory
}
HEADERS = ["implementation", "variant", "tokens/s", "MFU", "peak GiB", "vs HF", "target"]


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the timing")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument(
        "--variants", nargs="+", default=["default", "chunked-loss"], choices=VARIANTS
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.batch = 6, 2, 4
    device = common.bench_device(args.smoke)
    log_every = 2 if args.smoke else 10
    rows: list[list[object]] = []
    with common.scratch() as folder:
        vocab = 500 if args.smoke else VOCAB
        tokens = 200_000 if args.smoke else 40_000_000
        overrides = [
            *corpora.synthetic_corpus(folder, vocab, tokens),
            f"micro-batch-size={args.batch}",
            f"global-batch-size={args.batch}",
            "checkpoint-activations=false",
            f"lr-decay-iters={args.steps}",
            *throughput.timed_run_overrides(args.steps, log_every, args.smoke),
        ]
        measured, baseline, config = hf_baseline.neoxlab_variants_then_hf(
            CONFIG, overrides, VARIANTS, args.variants, args.steps, args.warmup, args.smoke
        )
    on_target = common.on_target_device(device)
    for implementation, name, result in measured:
        met = "-"
        if on_target and implementation == "neoxlab" and result.mfu is not None:
            met = "met" if result.mfu >= TARGET_MFU else "not met"
        rows.append(
            [
                implementation,
                name,
                common.number(result.tokens_per_second),
                common.number(result.mfu, "{:.1%}"),
                common.number(result.peak_memory_gib, "{:.2f}"),
                f"{result.tokens_per_second / baseline.tokens_per_second:.2f}x",
                met,
            ]
        )
    print(
        f"Pythia-160M shape, batch {args.batch} x {config.seq_length}, on "
        f"{common.describe_device(device)}; target >= 50% MFU on an H100"
    )
    common.report(
        args.record, "Pythia-160M shape: throughput and MFU", HEADERS, rows, device, __file__, argv
    )
    return rows


if __name__ == "__main__":
    main()
