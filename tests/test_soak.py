"""Soak: many save/resume cycles in one process (a notebook that trains, stops and resumes all
day) hold memory and open files constant. The default budget is short, so the test runs in the
normal suite; NEOXLAB_SOAK_CYCLES=500 python -m pytest -m soak makes it a long soak."""

import gc
import os
from pathlib import Path

import pytest

from neoxlab.config import load_config
from neoxlab.tracking import read_metrics
from neoxlab.trainer import train

CYCLES = int(os.environ.get("NEOXLAB_SOAK_CYCLES", "10"))
STEPS_PER_CYCLE = 2
MAX_GROWTH_BYTES = 50 * 2**20
PROC = Path("/proc/self")


def resident_bytes() -> int:
    resident_pages = int((PROC / "statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def open_files() -> int:
    return len(list((PROC / "fd").iterdir()))


@pytest.mark.soak
@pytest.mark.skipif(not (PROC / "statm").is_file(), reason="reads memory from Linux's /proc")
def test_save_resume_cycles_keep_memory_and_open_files_flat(tiny_overrides):
    assert CYCLES >= 4
    overrides = [
        *tiny_overrides,
        "train-iters=1000000",
        f"exit-interval={STEPS_PER_CYCLE}",  # each part stops at the next multiple of it
        f"save-interval={STEPS_PER_CYCLE}",
        "keep-last-k=2",
        "log-interval=1",
        "eval-interval=4",
        "eval-iters=1",
        "sample-tokens=4",
    ]
    config = load_config([], overrides)
    run_dir = None
    resident, files = [], []
    for cycle in range(1, CYCLES + 1):
        result = train(config, resume=run_dir, progress=False, log=lambda _: None)
        run_dir = result.run_dir
        assert result.step == cycle * STEPS_PER_CYCLE and not result.finished
        gc.collect()
        resident.append(resident_bytes())
        files.append(open_files())
    growth = resident[-1] - resident[2]  # from the third cycle: caches and arenas are warm
    assert growth < MAX_GROWTH_BYTES, [f"{r / 2**20:.0f} MB" for r in resident]
    assert files[-1] <= files[2], files
    steps = [m["step"] for m in read_metrics(run_dir) if "train/loss" in m]
    assert steps == list(range(1, CYCLES * STEPS_PER_CYCLE + 1))  # every step once
    assert len(list((run_dir / "checkpoints").iterdir())) == 2
