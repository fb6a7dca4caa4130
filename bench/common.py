"""What every benchmark shares: its command line, the device it ran on, neoxlab's config loaded
quietly, a scratch folder, and the report that prints its table and adds it to bench/RESULTS.md.

Every script takes `--smoke` (a seconds-long CPU run with tiny shapes; tests/test_bench.py runs
each one so none can rot) and `--record [FILE]` (append its rows to bench/RESULTS.md, or FILE,
with the date, device, commit and exact command). Without a GPU a script still runs, on the
CPU, and says so in its device column. Corpora are in corpora.py, timed training runs in
throughput.py and the transformers baseline in hf_baseline.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from neoxlab.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
CONFIGS = REPO / "configs"
# Devices the targets were set on (dense bf16 peak 989 TFLOP/s).
TARGET_DEVICES = ("H100", "H200")
# Tiny shapes for --smoke: seconds on a CPU.
SMOKE_MODEL = [
    "hidden-size=32",
    "num-layers=2",
    "num-attention-heads=2",
    "seq-length=32",
    "max-position-embeddings=32",
    "micro-batch-size=4",
    "global-batch-size=4",
    "device=cpu",
]


def parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU, seconds (tests use it)"
    )
    parser.add_argument(
        "--record",
        nargs="?",
        const=RESULTS,
        type=Path,
        metavar="FILE",
        help=f"append the rows to FILE (default {RESULTS.relative_to(REPO)})",
    )
    return parser


def bench_device(smoke: bool) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, "
            f"CUDA {torch.version.cuda})"
        )
    return f"CPU {cpu_model()}, {os.cpu_count()} cores (torch {torch.__version__})"


def cpu_model() -> str:
    """The processor's marketing name (Linux), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def on_target_device(device: torch.device) -> bool:
    """Whether the issue's targets apply to this device (they were set on an H100)."""
    return device.type == "cuda" and any(
        name in torch.cuda.get_device_name(device) for name in TARGET_DEVICES
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    # RESULTS.md itself changes with every recorded row: it says nothing about the code measured
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/RESULTS.md")
    return f"{head}+uncommitted" if changed else head


def command(script: str, argv: Sequence[str] | None) -> str:
    """The command line that runs `script` with `argv` (default: this process's arguments)."""
    path = Path(script).resolve()
    with contextlib.suppress(ValueError):
        path = path.relative_to(REPO)
    return shlex.join(["python", str(path), *(sys.argv[1:] if argv is None else argv)])


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


RECORD_COLUMNS = ("date", "device", "commit", "command")
NO_ROWS_YET = "No rows yet"  # RESULTS.md's placeholder line in a section without results


def record(
    path: Path,
    section: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    device: torch.device,
    command_line: str,
) -> None:
    """Append rows (prefixed with date, device, commit and command) to the table under the
    `## section` heading of `path`; a missing section or file is created with its header."""
    where = (
        datetime.date.today().isoformat(),
        describe_device(device),
        commit(),
        f"`{command_line}`",
    )
    new_table = table([*RECORD_COLUMNS, *headers], [[*where, *row] for row in rows]).splitlines()
    body = (
        path.read_text(encoding="utf-8").splitlines() if path.exists() else ["# Benchmark results"]
    )
    heading = f"## {section}"
    if heading not in body:
        body += ["", heading, "", *new_table]
    else:
        start = body.index(heading)
        end = next((i for i in range(start + 1, len(body)) if body[i].startswith("## ")), len(body))
        table_lines = [i for i in range(start, end) if body[i].startswith("|")]
        if table_lines:  # below the last row: older rows stay
            body[table_lines[-1] + 1 : table_lines[-1] + 1] = new_table[2:]
        else:  # the section's first table, after its text (and instead of "No rows yet")
            kept = [line for line in body[start:end] if not line.startswith(NO_ROWS_YET)]
            while len(kept) > 1 and not kept[-1].strip():
                kept.pop()
            after = [""] if end < len(body) else []  # a blank line before the next section
            body[start:end] = [*kept, "", *new_table, *after]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(body) + "\n", encoding="utf-8")
    tmp.replace(path)


def report(
    record_path: Path | None,
    section: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    device: torch.device,
    script: str,
    argv: Sequence[str] | None,
) -> None:
    """Print the table; with `--record` also append it to `record_path` (see `record`)."""
    print(table(headers, rows))
    if record_path:
        record(record_path, section, headers, rows, device, command(script, argv))


def number(value: float | None, form: str = "{:,.0f}") -> str:
    return "-" if value is None or not math.isfinite(value) else form.format(value)


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A temporary working folder (runs/ lands there), removed afterwards."""
    previous = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="neoxlab-bench-") as folder:
        os.chdir(folder)
        try:
            yield Path(folder)
        finally:
            os.chdir(previous)


def quiet(message: str) -> None:
    """The trainer's log, unprinted: the scripts print their own tables."""


def neoxlab_config(files: Sequence[Path], overrides: Sequence[str]) -> Config:
    return load_config([str(f) for f in files], list(overrides), notice=quiet)
