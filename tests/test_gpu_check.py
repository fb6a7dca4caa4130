"""bench/gpu_check.py on the CPU (--smoke): every check and measurement runs, so a GPU session
spends its minutes on the GPU, not on the script; one failing item never stops the others."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_bench import load

# Left out to keep the test short, their code run by a sibling: compile-cuda-graphs by compile
# (it would add a cold compile of its own), torchrun-ddp by torchrun-fsdp2 (one torchrun more),
# speed-pythia160m by speed-baby-gpt (training_rows), speed-generation's measurement by
# tests/test_bench.py (generate.model_rows).
COVERED_BY_A_SIBLING = (
    "compile-cuda-graphs",
    "torchrun-ddp",
    "speed-pythia160m",
    "speed-generation",
)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_check():
    return load("gpu_check")


def results(out) -> dict[str, dict]:
    report = json.loads((out / "gpu_check.json").read_text())
    return {result["name"]: result for result in report["results"]}


def test_every_check_and_measurement_passes_in_smoke_mode(gpu_check, tmp_path, capsys):
    names = [n for n in [*gpu_check.CHECKS, *gpu_check.SPEED] if n not in COVERED_BY_A_SIBLING]
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--smoke", "--inline", "--only", *names]) == 0
    found = results(out)
    assert list(found) == names
    failed = {name: r["detail"] for name, r in found.items() if r["status"] != "pass"}
    assert failed == {"qlora": "QLoRA needs CUDA (its CPU refusal: tests/test_finetune.py)"}
    speed_rows = [row for r in found.values() for row in r["rows"]]
    implementations = {row[1] for row in speed_rows}
    assert {"neoxlab", "transformers"} <= implementations
    assert len(speed_rows) == 2 + 2  # baby GPT (neoxlab, transformers), the two T4 configs
    # the markdown is written and printed: one row per item, then the speed table
    text = (out / "gpu_check.md").read_text()
    assert text in capsys.readouterr().out
    status = {name: "skip" if name in failed else "pass" for name in names}
    assert all(re.search(rf"^\| {name} \| \w+ \| {status[name]} \|", text, re.M) for name in names)
    assert "| workload | implementation | tokens/s | MFU |" in text


def test_a_failing_check_is_recorded_and_the_others_still_run(gpu_check, tmp_path, monkeypatch):
    def broken(context):
        raise RuntimeError("CUDA error: an illegal memory access | was encountered")

    monkeypatch.setitem(gpu_check.CHECKS, "broken", broken)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--smoke", "--inline", "--only", "broken", "device-sampler"]
    assert gpu_check.main(argv) == 1
    found = results(out)
    assert found["broken"]["status"] == "FAIL"
    assert found["broken"]["detail"] == (
        "RuntimeError: CUDA error: an illegal memory access | was encountered"
    )
    assert "Traceback" in found["broken"]["error"]
    assert found["device-sampler"]["status"] == "pass"
    text = (out / "gpu_check.md").read_text()
    # one line, its | escaped
    row = r"^\| broken \| correctness \| FAIL \| \d+ \| RuntimeError: CUDA error: an illegal"
    assert re.search(row + r" memory access \\\| was encountered \|$", text, re.M)


def test_the_device_call_runs_each_item_in_a_process_of_its_own(gpu_check, tmp_path):
    """bench/gpu_check.sh, as the device call runs it (python3 from the PATH, neoxlab from the
    checkout's src/): each item in a child process whose output lands in gpu_check.log."""
    out = tmp_path / "out"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    script = ["bash", "bench/gpu_check.sh", "--smoke", "--only", "sdpa-kernel"]
    env = {**os.environ, "OUT": str(out), "PATH": path}
    done = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert {name: r["status"] for name, r in results(out).items()} == {"sdpa-kernel": "pass"}
    log = (out / "gpu_check.log").read_text()
    assert log.startswith("\n===== sdpa-kernel =====\n")
    assert "sdpa-kernel: pass" in log  # the child's own report line
    assert done.stdout.rstrip().endswith((out / "gpu_check.md").read_text().rstrip())


def test_items_left_without_time_are_listed_as_not_run(gpu_check, tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--smoke", "--budget", "0", "--only", "fp32"]) == 1
    assert results(out)["fp32"]["status"] == "not run"
    assert "| fp32 | correctness | not run |" in (out / "gpu_check.md").read_text()
