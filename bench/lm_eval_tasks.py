"""How long neoxlab's offline benchmark tasks (benchmarks/*.yaml) take for the README quickstart
model, through `neoxlab eval --tasks`'s code path (lm-eval's HFLM on the model built in memory).

Trains the quickstart model (`neoxlab train configs/shakespeare.yml train-iters=300`, on this
machine's device) unless --run names a run, then times lm-eval's import and task index once,
and each shipped task alone on all its documents: checking and building the task (its
documents come from neoxlab's cache after their first build, ~1 s), converting the model,
lm-eval's evaluation and bootstrap. A row per task: documents, seconds, its metrics.

    python bench/lm_eval_tasks.py [--run runs/<run>] [--batch-size 1] [--record]
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import common
import corpora

from neoxlab.benchmarks import (
    BenchmarkOptions,
    evaluate_model,
    import_lm_eval,
    prepare_tasks,
    summary_line,
    task_manager,
)
from neoxlab.hf import load_trained
from neoxlab.trainer import train

TASKS = ("shakespeare_last_word", "shakespeare_next_line", "python_stdlib_perplexity")
INCLUDE_PATH = str(common.REPO / "benchmarks")
HEADERS = ["task", "documents", "batch size", "seconds", "metrics"]


def quickstart_run(folder: Path, smoke: bool) -> Path:
    """The README quickstart's run (train-iters=300), or a 4-step tiny one with --smoke."""
    overrides = ["train-iters=300", "sample-tokens=0"]
    if smoke:
        data = corpora.shakespeare_jsonl(folder, 50_000)
        overrides = [*common.SMOKE_MODEL, "vocab-size=300", "train-iters=4", f"data-path={data}"]
        overrides += [f"vocab-file={folder / 'tokenizer.json'}"]  # not the repository's
        # a context longer than every answer (lm-eval refuses to score one longer than it)
        overrides += ["seq-length=64", "max-position-embeddings=64"]
        overrides += ["eval-interval=4", "eval-iters=1", "save-interval=4", "sample-tokens=0"]
    config = common.neoxlab_config([common.CONFIGS / "shakespeare.yml"], overrides)
    with contextlib.redirect_stdout(io.StringIO()):
        return train(config, progress=False, log=common.quiet).run_dir


def time_task(run: Path, task: str, batch_size: int, limit: float | None) -> list[object]:
    options = BenchmarkOptions((task,), INCLUDE_PATH, limit, batch_size=batch_size)
    trained = load_trained(run, common.bench_device(smoke=False))
    start = time.perf_counter()
    names = prepare_tasks(options)
    results = evaluate_model(trained, options, names)
    seconds = time.perf_counter() - start
    documents = results["n-samples"][task]["effective"]
    return [task, documents, batch_size, f"{seconds:.1f}", summary_line(results)]


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run (default: train the quickstart)")
    parser.add_argument("--batch-size", type=int, default=1, help="lm-eval's (default 1)")
    args = parser.parse_args(argv)
    limit = 2.0 if args.smoke else None
    with common.scratch() as folder:
        run = args.run.resolve() if args.run else quickstart_run(folder, args.smoke)
        start = time.perf_counter()
        import_lm_eval()
        task_manager(INCLUDE_PATH, lm_eval_tasks=False)
        startup = time.perf_counter() - start
        rows = [time_task(run, task, args.batch_size, limit) for task in TASKS]
    device = common.bench_device(smoke=args.smoke)
    print(f"{run}: lm-eval import and task index {startup:.1f} s")
    common.report(
        args.record,
        "Benchmarks: neoxlab's offline lm-eval tasks, quickstart model",
        HEADERS,
        rows,
        device,
        __file__,
        argv,
    )
    return rows


if __name__ == "__main__":
    main()
