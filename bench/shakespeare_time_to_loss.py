"""Time to a validation loss on Tiny Shakespeare characters (nanoGPT's shakespeare_char task).

Runs configs/shakespeare_char.yml (nanoGPT's baby GPT recipe) and configs/shakespeare_char_fast.yml
(the tuned one) with neoxlab's trainer. Training time is the summed optimizer-step wall time
after compilation: the trainer's logged windows (evaluation and checkpoints excluded), logging
at every evaluation, with step 1 (which compiles) counted at the mean step time of the next
window. Validation loss is over 200 batches of 64 x 256 characters (eval-iters 200), every
--eval-interval steps. A run stops once it reaches --stop-below (default: the lowest target).

    python bench/shakespeare_time_to_loss.py [--configs A.yml B.yml] [--eval-interval 50] [--record]
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import common
import corpora
import throughput

from neoxlab.tracking import read_metrics
from neoxlab.trainer import Trainer

DEFAULT_CONFIGS = [
    common.CONFIGS / "shakespeare_char.yml",
    common.CONFIGS / "shakespeare_char_fast.yml",
]
TARGETS = (1.47, 1.45)
TARGET_SECONDS = 8.0  # the fast config: val <= 1.45 within 8 s of training on an H100
HEADERS = [
    "config",
    "parameters",
    "steps to 1.47",
    "train s to 1.47",
    "steps to 1.45",
    "train s to 1.45",
    "best val",
    "tokens/s",
    "target",
]


class TargetReached(Exception):
    """Raised from an evaluation whose loss reached the stopping threshold."""


class StopBelow(Trainer):
    """The trainer, stopped at the first evaluation (after step 0) at or below a loss."""

    def __init__(self, config, threshold: float) -> None:
        super().__init__(config, progress=False, log=common.quiet)
        self.threshold = threshold

    def _eval_and_log(self, tracker, progress):
        result = super()._eval_and_log(tracker, progress)
        if self.step > 0 and result["loss"] <= self.threshold:
            raise TargetReached
        return result


def train_seconds_until(run_dir: Path, step: int) -> float:
    """Training seconds of steps 1..step, step 1 (compilation) at the next window's mean."""
    windows = throughput.windows(run_dir)
    seconds = 0.0
    for index, (first, last, window_seconds) in enumerate(windows):
        if last > step:
            break
        if first == last == 1 and index + 1 < len(windows):
            following_first, following_last, following = windows[index + 1]
            window_seconds = following / (following_last - following_first + 1)
        seconds += window_seconds
    return seconds


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", type=Path, default=DEFAULT_CONFIGS)
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--eval-iters", type=int, default=200)
    parser.add_argument("--stop-below", type=float, help="default: the lower target")
    parser.add_argument("--max-iters", type=int, help="cap train-iters (default: the config's)")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides for every run, e.g. compile-mode=reduce-overhead",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.eval_interval, args.eval_iters, args.max_iters = 4, 2, args.max_iters or 12
    stop_below = args.stop_below if args.stop_below is not None else min(TARGETS)
    device = common.bench_device(args.smoke)
    rows: list[list[object]] = []
    with common.scratch() as folder:
        data = corpora.shakespeare_jsonl(folder, 20_000 if args.smoke else None)
        for config_file in args.configs:
            overrides = [
                f"data-path={data}",
                f"vocab-file={folder / 'char.json'}",
                f"eval-interval={args.eval_interval}",
                f"log-interval={args.eval_interval}",
                f"eval-iters={args.eval_iters}",
                "sample-tokens=0",
                "save=false",
                *([f"train-iters={args.max_iters}"] if args.max_iters else []),
                *(common.SMOKE_MODEL if args.smoke else []),
                *args.set,
            ]
            config = common.neoxlab_config([config_file], overrides)
            trainer = StopBelow(config, stop_below)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(TargetReached):
                trainer.run()
            rows.append(summarise(trainer, config_file, device))
    print(f"Tiny Shakespeare characters on {common.describe_device(device)}")
    common.report(
        args.record,
        "Tiny Shakespeare: time to validation loss",
        HEADERS,
        rows,
        device,
        __file__,
        argv,
    )
    return rows


def summarise(trainer: Trainer, config_file: Path, device) -> list[object]:
    metrics = read_metrics(trainer.run_dir)
    evals = [(m["step"], m["val/loss"]) for m in metrics if "val/loss" in m and m["step"] > 0]
    cells: list[object] = [config_file.name, f"{trainer.model.num_parameters():,}"]
    reached = {}
    for target in TARGETS:
        step = next((s for s, loss in evals if loss <= target), None)
        reached[target] = None if step is None else train_seconds_until(trainer.run_dir, step)
        cells += [
            step if step is not None else "not reached",
            common.number(reached[target], "{:.2f}"),
        ]
    best = min((loss for _, loss in evals), default=None)
    windows = throughput.windows(trainer.run_dir)[1:]  # without step 1 (compilation)
    steps = sum(last - first + 1 for first, last, _ in windows)
    seconds = sum(s for *_, s in windows)
    tokens_per_second = (
        steps * trainer.global_batch * trainer.config.seq_length / seconds if seconds else None
    )
    met = "-"
    if common.on_target_device(device) and "fast" in config_file.name:
        fast = reached[min(TARGETS)]
        met = "met" if fast is not None and fast <= TARGET_SECONDS else "not met"
    return [*cells, common.number(best, "{:.4f}"), common.number(tokens_per_second), met]


if __name__ == "__main__":
    main()
