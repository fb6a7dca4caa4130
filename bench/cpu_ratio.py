"""neoxlab's training step vs transformers' on the CPU, interleaved in one process.

Two shapes: the README quickstart (configs/shakespeare.yml as `neoxlab train` runs it on a CPU:
4 x 256, 4 layers, 5,000-token BPE padded to 5,120, batch 8 x 256 as 4 micro-batches of 2) and
Pythia-14M (configs/pythia/14M.yml: 6 x 128, 4 heads, context 2048, 50,304 vocabulary rows,
tanh GELU), here at a CPU-sized batch of 2 sequences of 2,048 tokens (2 micro-batches of 1).

neoxlab is its real trainer step (`Trainer._train_step`: learning rate, batch sampling from the
prepared .bin/.idx, accumulation, the chunked loss, clipping, fused AdamW, the health record)
with the fp32 matmul precision its CPU runtime sets. transformers is GPTNeoXForCausalLM (SDPA
attention) with torch.optim.AdamW, the same hyperparameters, micro-batches and clipping, on
random batches made beforehand (no data loading: its best case), twice: as a user runs it
(torch's defaults: IEEE fp32 matmuls, AdamW's per-parameter loop), and given neoxlab's two
process settings (the same matmul precision, fused AdamW), which shows how much of the gap they
are. All run in fp32 with the same torch thread count. Rounds alternate the order so that a
machine getting busier or quieter shifts all alike; the table gives the median tokens/s over
rounds, the spread (min-max), and the median of the per-round ratios to neoxlab.

`--compile` adds neoxlab's step with the model through torch.compile (`compile: true`:
inductor's C++ kernels fuse the norms, GELU, rotary and the loss's elementwise work; fused AdamW
stays one kernel per tensor either way) and the seconds its first step took, compilation
included; its rows go to a section of their own.

    python bench/cpu_ratio.py [--shapes quickstart pythia14m] [--rounds 7] [--steps 3]
        [--compile] [--record]
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import statistics
import time
from collections.abc import Callable

import common
import corpora
import hf_baseline
import torch
import torch.nn.functional as F

from neoxlab.config import Config
from neoxlab.trainer import Trainer

SHAPES = {
    # name -> (config file, vocabulary of the random corpus, overrides for a CPU-sized batch)
    "quickstart": (common.CONFIGS / "shakespeare.yml", 5000, []),
    "pythia14m": (
        common.CONFIGS / "pythia" / "14M.yml",
        50277,
        ["micro-batch-size=1", "global-batch-size=2"],
    ),
}
HEADERS = [
    "shape",
    "tokens/step",
    "threads",
    "neoxlab tokens/s (spread)",
    "transformers tokens/s (spread)",
    "neoxlab / transformers",
    "transformers + neoxlab's settings tokens/s (spread)",
    "neoxlab / that",
]
COMPILED_HEADERS = [
    *HEADERS,
    "neoxlab compiled tokens/s (spread)",
    "compiled / transformers",
    "compiled / neoxlab",
    "first compiled step, s",
]
SECTION = "CPU: neoxlab vs transformers training step"
COMPILED_SECTION = "CPU: neoxlab's compiled training step vs transformers"
DEFAULT_MATMUL_PRECISION = "highest"  # torch's default for fp32 matmuls


def neoxlab_step(trainer: Trainer) -> Callable[[], None]:
    """The trainer's step on the model as its runtime runs it (compiled with compile=true)."""
    precision = torch.get_float32_matmul_precision()  # what the trainer's runtime set
    model = trainer.runtime.compiled(trainer.model)

    def step() -> None:
        torch.set_float32_matmul_precision(precision)
        trainer._train_step(model)
        trainer.step += 1

    return step


def compiled_neoxlab_step(config: Config) -> tuple[Callable[[], None], float]:
    """neoxlab's step with `compile: true`, and the seconds of its first call (compilation)."""
    config = dataclasses.replace(config, compile="true")
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(config, progress=False, log=common.quiet)
    step = neoxlab_step(trainer)
    torch._dynamo.reset()  # compile now even if this process compiled the same model before
    start = time.perf_counter()
    step()
    return step, time.perf_counter() - start


def transformers_step(trainer: Trainer, matmul_precision: str, fused: bool) -> Callable[[], None]:
    """The same step in transformers: same shapes, micro-batches, optimizer and clipping."""
    config: Config = trainer.config
    torch.manual_seed(0)
    model = hf_baseline.hf_model(trainer.model.config, torch.device("cpu")).train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        betas=tuple(config.optimizer.get("params", {}).get("betas", (0.9, 0.999))),
        weight_decay=config.weight_decay,
        fused=fused or None,
    )
    vocab, micro, accumulation = model.config.vocab_size, trainer.micro_batch, trainer.accumulation
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(
        0, vocab, (accumulation, micro, config.seq_length + 1), generator=generator
    )

    def step() -> None:
        torch.set_float32_matmul_precision(matmul_precision)
        for micro_batch in windows:
            logits = model(input_ids=micro_batch[:, :-1]).logits
            loss = F.cross_entropy(logits.view(-1, vocab), micro_batch[:, 1:].reshape(-1))
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clipping or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def seconds_per_step(step: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure(
    shape: str, folder, rounds: int, steps: int, smoke: bool, compiled: bool
) -> list[object]:
    config_file, vocab, batch = SHAPES[shape]
    (folder / shape).mkdir()
    corpus = corpora.synthetic_corpus(folder / shape, 300 if smoke else vocab, 200_000)
    overrides = [*corpus, *batch, "device=cpu", "compile=false", "save=false", "train-iters=100000"]
    config = common.neoxlab_config(
        [config_file], [*overrides, *(common.SMOKE_MODEL if smoke else [])]
    )
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(config, progress=False, log=common.quiet)
    contenders = {
        "neoxlab": neoxlab_step(trainer),
        "transformers": transformers_step(trainer, DEFAULT_MATMUL_PRECISION, fused=False),
        "transformers+settings": transformers_step(
            trainer, torch.get_float32_matmul_precision(), fused=True
        ),
    }
    first_compiled_step = None
    if compiled:
        contenders["neoxlab compiled"], first_compiled_step = compiled_neoxlab_step(config)
    for step in contenders.values():
        step()  # warm-up: allocator, oneDNN primitives
    timings: dict[str, list[float]] = {name: [] for name in contenders}
    for round_index in range(rounds):
        order = list(contenders.items())
        for name, step in order if round_index % 2 == 0 else reversed(order):
            timings[name].append(seconds_per_step(step, steps))
    torch.set_float32_matmul_precision(DEFAULT_MATMUL_PRECISION)
    tokens = trainer.global_batch * config.seq_length

    def rate(name: str) -> str:
        rates = [tokens / seconds for seconds in timings[name]]
        spread = f"{common.number(min(rates))}-{common.number(max(rates))}"
        return f"{common.number(statistics.median(rates))} ({spread})"

    def ratio(name: str, versus: str = "neoxlab") -> str:
        """How many times faster `versus` ran than `name` (per round, median and spread)."""
        ratios = [t / o for o, t in zip(timings[versus], timings[name], strict=True)]
        return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"

    row = [
        shape,
        f"{trainer.global_batch} x {config.seq_length}",
        torch.get_num_threads(),
        rate("neoxlab"),
        rate("transformers"),
        ratio("transformers"),
        rate("transformers+settings"),
        ratio("transformers+settings"),
    ]
    if compiled:
        row += [
            rate("neoxlab compiled"),
            ratio("transformers", "neoxlab compiled"),
            ratio("neoxlab", "neoxlab compiled"),
            f"{first_compiled_step:.1f}",
        ]
    return row


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--rounds", type=int, default=7, help="A/B rounds (at least 5)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per turn")
    parser.add_argument(
        "--compile", action="store_true", help="also time neoxlab's step with compile: true"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps = 2, 1
    with common.scratch() as folder:
        rows = [
            measure(shape, folder, args.rounds, args.steps, args.smoke, args.compile)
            for shape in args.shapes
        ]
    device = torch.device("cpu")
    print(f"training step on {common.describe_device(device)}, {args.rounds} rounds")
    section, headers = (COMPILED_SECTION, COMPILED_HEADERS) if args.compile else (SECTION, HEADERS)
    common.report(args.record, section, headers, rows, device, __file__, argv)
    return rows


if __name__ == "__main__":
    main()
