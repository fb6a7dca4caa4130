"""`neoxlab compare`: runs side by side from their run directories alone (no W&B account).

One PNG plots the chosen metrics against steps and against tokens; a table lists, per run, the
config keys that differ between the runs, the best validation loss, the final training loss,
throughput and wall time, best run first.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from neoxlab.config import FIELDS, Config, canonical_key, read_yaml
from neoxlab.errors import NeoxlabError
from neoxlab.tracking import read_metrics, read_summary

X_AXES = (("step", "step"), ("tokens", "tokens"))
# Where comparisons go unless --out says otherwise: a folder of their own in the current one
# (git-ignored), not loose PNGs in a repository's root.
COMPARISONS_DIR = "comparisons"


@dataclass
class RunRecord:
    name: str
    config: dict[str, Any]  # flattened: optimizer.type, optimizer.params.betas, ...
    metrics: list[dict[str, Any]]
    wall_seconds: float | None

    def series(self, metric: str) -> list[dict[str, Any]]:
        return [m for m in self.metrics if m.get(metric) is not None]

    @property
    def best_val_loss(self) -> float | None:
        losses = [m["val/loss"] for m in self.series("val/loss")]
        return min(losses) if losses else None

    @property
    def final_train_loss(self) -> float | None:
        losses = self.series("train/loss")
        return losses[-1]["train/loss"] if losses else None

    @property
    def tokens_per_second(self) -> float | None:
        # The median ignores the first window, which includes warm-up (and compilation).
        rates = [m["train/tokens_per_second"] for m in self.series("train/tokens_per_second")]
        return statistics.median(rates) if rates else None


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_run(run_dir: Path) -> RunRecord:
    # A key the run's neoxlab did not have yet counts as its default, not as a difference.
    values = {**Config().to_dict(), **read_yaml(run_dir / "config.yml")}
    return RunRecord(
        name=run_dir.name,
        config=_flatten(values),
        metrics=read_metrics(run_dir),
        wall_seconds=read_summary(run_dir).get("wall_seconds"),
    )


def _affects_results(key: str) -> bool:
    # Logging keys (run names, W&B project, intervals of logs) never change what a run learns.
    field = FIELDS.get(canonical_key(key.split(".")[0]))
    return field is None or field.metadata["section"] != "logging"


def config_differences(runs: list[RunRecord]) -> list[str]:
    """Config keys (flattened) whose values are not the same in every run, in schema order."""
    keys: list[str] = []
    for run in runs:
        keys += [key for key in run.config if key not in keys]
    return [
        key
        for key in keys
        if _affects_results(key) and len({repr(run.config.get(key)) for run in runs}) > 1
    ]


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def table(runs: list[RunRecord]) -> str:
    """The comparison as aligned text, best validation loss first."""
    differing = config_differences(runs)
    header = ["run", "differences", "best val loss", "final train loss", "tokens/s", "wall time"]
    rows = [header]
    ranked = sorted(runs, key=lambda r: (r.best_val_loss is None, r.best_val_loss or 0.0))
    for run in ranked:
        # A nested key only some runs have (betas for AdamW, momentum for SGD) shows on those.
        shown = [f"{key}={run.config[key]}" for key in differing if key in run.config]
        differences = " ".join(shown) or "-"
        rate = run.tokens_per_second
        rows.append(
            [
                run.name,
                differences,
                _number(run.best_val_loss),
                _number(run.final_train_loss),
                "-" if rate is None else f"{rate:,.0f}",
                _duration(run.wall_seconds),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def plot(runs: list[RunRecord], metrics: list[str], out: Path, from_step: int = 0) -> Figure:
    """One row per metric, against steps (left) and tokens (right); one line per run; points
    before `from_step` left out (the first losses are far above the rest and squash the curves
    where runs differ)."""
    for metric in metrics:
        if not any(run.series(metric) for run in runs):
            known = sorted({key for run in runs for m in run.metrics for key in m} - {"step"})
            raise NeoxlabError(
                f"no run has metric {metric!r}", hint=f"metrics in these runs: {', '.join(known)}"
            )
    # A Figure without pyplot renders with Agg and leaves the user's matplotlib backend alone.
    figure = Figure(figsize=(12, 4 * len(metrics)), layout="constrained")
    axes = figure.subplots(len(metrics), len(X_AXES), squeeze=False)
    for row, metric in enumerate(metrics):
        for column, (x_key, x_label) in enumerate(X_AXES):
            ax = axes[row][column]
            for run in runs:
                series = [m for m in run.series(metric) if m["step"] >= from_step]
                if series:
                    xs = [m[x_key] for m in series]
                    ax.plot(xs, [m[metric] for m in series], marker=".", label=run.name)
            ax.set_xlabel(x_label)
            ax.set_ylabel(metric)
            ax.set_title(f"{metric} by {x_label}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=100)
    tmp.replace(out)
    return figure


def default_out(base: Path | None = None) -> Path:
    """`comparisons/compare-<yymmdd-HHMMSS>.png` under `base` (the cwd): one file for each
    comparison, an earlier one never overwritten."""
    folder = (base or Path.cwd()) / COMPARISONS_DIR
    stem = f"compare-{time.strftime('%y%m%d-%H%M%S')}"
    out, suffix = folder / f"{stem}.png", 1
    while out.exists():
        suffix += 1
        out = folder / f"{stem}-{suffix}.png"
    return out


def compare(run_dirs: list[Path], metrics: list[str], out: Path, from_step: int = 0) -> str:
    """Write the plot to `out` and return the table."""
    runs = [load_run(path) for path in run_dirs]
    names = [run.name for run in runs]
    if len(set(names)) < len(names):  # same folder name under different parents: show paths
        for run, path in zip(runs, run_dirs, strict=True):
            run.name = str(path)
    plot(runs, metrics, out, from_step)
    return table(runs)
