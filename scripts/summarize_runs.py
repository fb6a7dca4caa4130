"""Mean and spread across seeds of finished runs, grouped by config keys, as a Markdown table.

    python scripts/summarize_runs.py runs/* [--by optimizer.type --by lr-decay-style]

Runs whose config differs only in `seed` fall into one group. Each cell is the mean over the
group's runs ± half their range (so with two seeds both values are mean ± spread), of the value
at each run's last evaluation; `best val loss` is each run's lowest val/loss. `--by run-name`
groups by the run's name without its `-s<seed>` ending (the scripts name runs NAME-s<seed>).
scripts/compare_algorithms.sh and compare_architectures.sh use it for docs/algorithms.md and
docs/architectures.md; `neoxlab compare` lists the single runs.
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections.abc import Callable
from pathlib import Path

from neoxlab.compare import RunRecord, load_run

DEFAULT_GROUP_KEYS = ("optimizer.type", "lr-decay-style")
# (column, how to read it from a run); lower is better for the first two, higher for the rest.
COLUMNS: tuple[tuple[str, Callable[[RunRecord], float | None]], ...] = (
    ("final val loss", lambda run: last(run, "val/loss")),
    ("best val loss", lambda run: run.best_val_loss),
    ("bits/byte", lambda run: last(run, "val/bits_per_byte")),
    ("next-token acc", lambda run: last(run, "val/acc")),
    ("line exact match", lambda run: last(run, "val/line_exact_match")),
    ("edit similarity", lambda run: last(run, "val/line_edit_similarity")),
    ("tokens/s", lambda run: run.tokens_per_second),
)


def last(run: RunRecord, metric: str) -> float | None:
    series = run.series(metric)
    return series[-1][metric] if series else None


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """The mean and half the range: every value lies within mean ± spread."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def _cell(values: list[float], column: str) -> str:
    if not values:
        return "-"
    mean, spread = mean_and_spread(values)
    if column == "tokens/s":
        return f"{mean:,.0f} ± {spread:,.0f}"
    return f"{mean:.3f} ± {spread:.3f}"


def group_value(run: RunRecord, key: str) -> object:
    """The run's value of config `key`; for run-name, the name without its -s<seed> ending."""
    value = run.config.get(key)
    if key == "run-name" and isinstance(value, str):
        return re.sub(r"-s\d+$", "", value)
    return value


def summarize(runs: list[RunRecord], group_keys: list[str]) -> str:
    """One Markdown row per group of runs, lowest mean final val loss first."""
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        key = tuple(group_value(run, name) for name in group_keys)
        groups.setdefault(key, []).append(run)

    def values(members: list[RunRecord], read: Callable[[RunRecord], float | None]) -> list[float]:
        return [value for value in map(read, members) if value is not None]

    def rank(members: list[RunRecord]) -> tuple[bool, float]:
        losses = values(members, COLUMNS[0][1])  # groups without an evaluation go last
        return (not losses, statistics.fmean(losses) if losses else 0.0)

    ranked = sorted(groups.items(), key=lambda item: rank(item[1]))
    header = [*group_keys, "seeds", *(name for name, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, members in ranked:
        seeds = ",".join(str(run.config.get("seed")) for run in members)
        cells = [_cell(values(members, read), name) for name, read in COLUMNS]
        lines.append("| " + " | ".join([*map(str, key), seeds, *cells]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--by", action="append", help="config key to group by (repeatable)")
    args = parser.parse_args()
    print(summarize([load_run(path) for path in args.runs], args.by or list(DEFAULT_GROUP_KEYS)))


if __name__ == "__main__":
    main()
