"""Every bench script runs end to end in its tiny CPU smoke mode and records its rows, so none
can rot between the GPU sessions that measure with them."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
# script -> (extra smoke arguments, RESULTS.md section, rows expected)
SCRIPTS = {
    "baby_gpt": (["--variants", "default"], "Baby GPT training throughput", 2),
    "pythia160m": (
        ["--variants", "default", "chunked-loss"],
        "Pythia-160M shape: throughput and MFU",
        3,
    ),
    # --stop-below 10: the first evaluation stops each run, exercising the early stop
    "shakespeare_time_to_loss": (
        ["--stop-below", "10"],
        "Tiny Shakespeare: time to validation loss",
        2,
    ),
    "generate": ([], "Generation with the KV cache", 8),
    "t4_path": ([], "T4 path: fp16 without flash attention", 2),
    "prepare_jsonl": ([], "Data preparation: `neoxlab prepare jsonl`", 2),
    "prepare_ceiling": ([], "Data preparation: pipeline vs tokenizer ceiling, peak memory", 5),
    "cpu_ratio": ([], "CPU: neoxlab vs transformers training step", 2),
    "lm_eval_tasks": ([], "Benchmarks: neoxlab's offline lm-eval tasks, quickstart model", 3),
    "model_before_after": ([], "CPU: model.py before and after a change", 2),
    "finetune_memory": (
        ["--options", "lora", "qlora"],
        "Finetuning Pythia-1.4B on one GPU: peak memory vs estimate",
        2,
    ),
}


def load(name: str):
    """Import bench/NAME.py as the scripts import each other: with bench/ on sys.path."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_bench_script_smoke_run_records_rows(name, tmp_path, capsys):
    extra, section, expected_rows = SCRIPTS[name]
    results = tmp_path / "RESULTS.md"
    results.write_text(
        f"# Benchmark results\n\n## {section}\n\nWhat it measures.\n\nNo rows yet: needs a GPU.\n"
    )
    argv = ["--smoke", *extra, "--record", str(results)]
    rows = load(name).main(argv)
    assert len(rows) == expected_rows
    printed = capsys.readouterr().out
    assert all(str(row[0]) in printed for row in rows)  # the table is printed
    text = results.read_text()
    assert text.index(f"## {section}") < text.index("What it measures.") < text.index("| date |")
    assert "No rows yet" not in text
    recorded = [line for line in text.splitlines() if line.startswith("| 20")]
    assert len(recorded) == expected_rows
    assert all(f"`python bench/{name}.py --smoke" in line and "CPU" in line for line in recorded)


def test_record_appends_below_older_rows_and_creates_missing_sections(tmp_path):
    common = load("common")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Old\n\n| a |\n|---|\n| 1 |\n\nNotes.\n")
    device = common.bench_device(smoke=True)
    common.record(results, "Old", ["x"], [[2]], device, "python bench/x.py")
    common.record(results, "New", ["x"], [[5]], device, "python bench/x.py")
    text = results.read_text()
    assert text.index("| 1 |") < text.index("| 2 |") < text.index("Notes.") < text.index("## New")
    assert text.index("## New") < text.index("| 5 |")
    assert "| `python bench/x.py` | 5 |" in text


def test_cpu_ratio_times_the_compiled_step_in_a_section_of_its_own(tmp_path):
    """`--compile`: neoxlab's step with compile: true (inductor on the CPU) beside eager and
    transformers, and the seconds its first, compiling, step took."""
    cpu_ratio = load("cpu_ratio")
    results = tmp_path / "RESULTS.md"
    argv = ["--smoke", "--shapes", "quickstart", "--compile", "--record", str(results)]
    (row,) = cpu_ratio.main(argv)
    assert len(row) == len(cpu_ratio.COMPILED_HEADERS)
    assert re.fullmatch(r"[\d,]+ \([\d,]+-[\d,]+\)", row[-4])  # compiled tokens/s (spread)
    assert float(row[-1]) > 0
    text = results.read_text()
    assert text.index(f"## {cpu_ratio.COMPILED_SECTION}") < text.index("| compiled / neoxlab |")
