"""A run's benchmark results: lm-eval's results JSON per step, and what neoxlab reads from it.

`neoxlab eval RUN --tasks ...` and `eval-tasks` during training write lm-eval's results JSON,
unchanged in shape (`{"results": {task: {"acc,none": ..., ...}}, ...}`), to
`RUN/benchmarks/step_NNNNNNN.json`. From it come the `benchmarks/<task>/<metric>` metrics
(metrics.jsonl, W&B, TensorBoard, `neoxlab compare`) and the table of an export's model card.
Reading needs no lm-eval: a run benchmarked on one machine exports on another.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from neoxlab.atomic import write_atomically

BENCHMARKS_DIR = "benchmarks"
METRIC_PREFIX = "benchmarks/"
STEP_FILE_PREFIX = "step_"
# lm-eval names a metric "metric,filter"; "none" is the filter of every loglikelihood task.
NO_FILTER = ",none"
STDERR_SUFFIX = "_stderr"
TABLE_COLUMNS = ["task", "metric", "value", "stderr"]


def results_path(run_dir: Path, step: int) -> Path:
    return run_dir / BENCHMARKS_DIR / f"{STEP_FILE_PREFIX}{step:07d}.json"


def run_of(checkpoint: Path) -> Path | None:
    """The run directory that holds `checkpoint` (in whatever `save` folder); None for a model
    outside a run (a Hugging Face folder)."""
    return next((p for p in checkpoint.resolve().parents if (p / "config.yml").is_file()), None)


def default_results_path(checkpoint: Path, step: int | None) -> Path | None:
    """Where the results of `checkpoint` go: RUN/benchmarks/step_NNNNNNN.json of its run."""
    run_dir = run_of(checkpoint)
    if step is None or run_dir is None:
        return None
    return results_path(run_dir, step)


def write_results(path: Path, text: str) -> None:
    """Write a results JSON atomically: a benchmark killed mid-way leaves the old file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, text)


def latest_results(run_dir: Path, up_to_step: int) -> tuple[int, dict[str, Any]] | None:
    """(step, results) of the run's newest benchmark at or before `up_to_step`; None if none."""
    found = []
    for path in (run_dir / BENCHMARKS_DIR).glob(f"{STEP_FILE_PREFIX}*.json"):
        step = path.stem.removeprefix(STEP_FILE_PREFIX)
        if step.isdigit() and int(step) <= up_to_step:
            found.append((int(step), path))
    if not found:
        return None
    step, path = max(found)
    return step, json.loads(path.read_text(encoding="utf-8"))


def metric_name(task: str, key: str) -> str:
    """`benchmarks/<task>/<metric>` for lm-eval's key "metric,filter" (",none" dropped, as
    lm-eval's own W&B logger does)."""
    return f"{METRIC_PREFIX}{task}/{key.removesuffix(NO_FILTER)}"


def metric_values(results: dict[str, Any]) -> dict[str, float]:
    """Every number of lm-eval's results (stderr included) as `benchmarks/<task>/<metric>`."""
    values = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if _is_metric(key, value):
                values[metric_name(task, key)] = float(value)
    return values


def _is_metric(key: str, value: Any) -> bool:
    """A metric's number: lm-eval names every metric "metric,filter" (and beside them keeps
    bookkeeping such as sample_len, and "N/A" where a standard error has no value)."""
    return "," in key and isinstance(value, (int, float)) and not isinstance(value, bool)


def table_rows(results: dict[str, Any]) -> list[list[Any]]:
    """[task, metric, value, stderr] per metric (stderr None where lm-eval has none): the rows
    of the model card's table and of the W&B summary table."""
    rows = []
    for task, metrics in sorted(results["results"].items()):
        for key, value in sorted(metrics.items()):
            metric = key.removesuffix(NO_FILTER)
            name, _, filter_name = key.partition(",")
            if name.endswith(STDERR_SUFFIX) or not _is_metric(key, value):
                continue
            stderr = metrics.get(f"{name}{STDERR_SUFFIX},{filter_name}")
            rows.append([task, metric, value, stderr if isinstance(stderr, float) else None])
    return rows


def markdown_table(results: dict[str, Any]) -> list[str]:
    """The results as a markdown table (one line per metric)."""
    lines = ["| task | metric | value | stderr |", "|---|---|---:|---:|"]
    for task, metric, value, stderr in table_rows(results):
        shown_stderr = "" if stderr is None else _shown(stderr)
        lines.append(f"| {task} | {metric} | {_shown(value)} | {shown_stderr} |")
    return lines


def _shown(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4e}"  # word perplexities get huge
