"""Run directories, metrics.jsonl, and the console progress bar."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from neoxlab.errors import NeoxlabError

ADJECTIVES = (
    "bold",
    "brave",
    "bright",
    "calm",
    "clever",
    "curious",
    "eager",
    "gentle",
    "happy",
    "keen",
    "lively",
    "lucid",
    "merry",
    "nimble",
    "patient",
    "quiet",
    "rapid",
    "sharp",
    "steady",
    "swift",
    "tidy",
    "vivid",
    "warm",
    "wise",
    "witty",
    "zesty",
)
SCIENTISTS = (
    "curie",
    "darwin",
    "dirac",
    "euler",
    "fermi",
    "feynman",
    "franklin",
    "gauss",
    "hopper",
    "hypatia",
    "kepler",
    "lovelace",
    "maxwell",
    "meitner",
    "noether",
    "pascal",
    "planck",
    "ramanujan",
    "shannon",
    "turing",
    "volta",
    "wiles",
    "yonath",
)
RUNS_DIR = "runs"


def new_run_dir(name: str | None, base: Path | None = None) -> Path:
    """`runs/<name>-<yymmddHHMM>/`, name generated as adjective_scientist unless given."""
    base = base or Path.cwd() / RUNS_DIR
    name = name or f"{random.choice(ADJECTIVES)}_{random.choice(SCIENTISTS)}"
    if "/" in name or name in (".", ".."):
        raise NeoxlabError(f"run name {name!r} must be a plain folder name")
    stamp = time.strftime("%y%m%d%H%M")
    path = base / f"{name}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = base / f"{name}-{stamp}-{suffix}"
    path.mkdir(parents=True)
    return path


def find_run(spec: str | Path, base: Path | None = None) -> Path:
    """A run directory given as a path or as `latest` (newest run under runs/)."""
    base = base or Path.cwd() / RUNS_DIR
    if str(spec) == "latest":
        runs = [p for p in base.glob("*/config.yml")] if base.is_dir() else []
        if not runs:
            raise NeoxlabError(f"no runs under {base} to resume", hint="train one first")
        return max(runs, key=lambda p: p.stat().st_mtime).parent
    path = Path(spec).expanduser()
    if not (path / "config.yml").is_file():
        raise NeoxlabError(f"{path} is not a neoxlab run directory (no config.yml)")
    return path.resolve()


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (flushed, so a crash loses nothing)."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            self._truncate_after(resume_step)
        # Held open for the whole run (one line per log step); closed by close().
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def _truncate_after(self, step: int) -> None:
        # Lines logged after the checkpoint we resume from will be logged again: drop them.
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        clean = {key: _json_safe(value) for key, value in record.items()}
        self._handle.write(json.dumps(clean) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class Tracker:
    """Fans a run's metrics out to its sinks: metrics.jsonl always."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.run_dir = run_dir
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step)

    def log(self, record: dict[str, Any]) -> None:
        """One record with `step` and `tokens`: train/* at log steps, val/* at evaluations."""
        self.metrics.write(record)

    def log_sample(self, step: int, text: str) -> None:
        samples = self.run_dir / "samples"
        samples.mkdir(exist_ok=True)
        (samples / f"step_{step:07d}.txt").write_text(text, encoding="utf-8")

    def finish(self, summary: dict[str, Any], checkpoint: Path | None) -> None:
        """End of the run (also after an early exit): `summary` holds best val loss etc."""
        self.metrics.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise NeoxlabError(f"{run_dir} has no metrics.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class Progress:
    """A tqdm bar over optimizer steps showing loss, lr and tokens/s (ETA comes with tqdm)."""

    def __init__(self, total: int, initial: int, enabled: bool = True) -> None:
        self.bar = tqdm(
            total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True
        )

    def advance(self) -> None:
        self.bar.update(1)

    def show(self, loss: float, lr: float, tokens_per_second: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}")

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
