"""scripts/summarize_runs.py: mean ± spread across seeds, grouped by config keys."""

import importlib.util
import json
from pathlib import Path

from neoxlab.compare import load_run
from neoxlab.config import load_config, save_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "summarize_runs.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("summarize_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(root: Path, name: str, overrides: list[str], evals: list[dict]) -> Path:
    run_dir = root / name
    run_dir.mkdir()
    save_config(load_config([], overrides), run_dir / "config.yml")
    lines = [{"step": 10 * i, "tokens": 100 * i, **metrics} for i, metrics in enumerate(evals)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


def test_seeds_are_averaged_per_optimizer_and_schedule(tmp_path):
    summarize = _load_script().summarize
    runs = []
    for seed, final in ((1, 2.0), (2, 2.4)):
        evals = [{"val/loss": 1.5}, {"val/loss": final, "val/bits_per_byte": final / 2}]
        runs.append(_run(tmp_path, f"sgd{seed}", ["optimizer.type=SGD", f"seed={seed}"], evals))
    for seed in (1, 2):
        evals = [{"val/loss": 1.8, "val/line_exact_match": 0.25 * seed}]
        runs.append(_run(tmp_path, f"lion{seed}", ["optimizer.type=Lion", f"seed={seed}"], evals))
    runs.append(_run(tmp_path, "lion_wsd", ["optimizer.type=Lion", "lr-decay-style=wsd"], []))
    keys = ["optimizer.type", "lr-decay-style"]
    header, rule, *rows = summarize([load_run(r) for r in runs], keys).splitlines()
    assert header.startswith("| optimizer.type | lr-decay-style | seeds | final val loss |")
    assert rule.count("---") == len(header.split("|")) - 2
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    # lowest mean final val loss first; a group without an evaluation last, its cells empty
    lion, sgd, lion_wsd = cells
    assert lion[:5] == ["Lion", "cosine", "1,2", "1.800 ± 0.000", "1.800 ± 0.000"]
    assert lion[header.split("|").index(" line exact match ") - 1] == "0.375 ± 0.125"
    assert sgd[:6] == ["SGD", "cosine", "1,2", "2.200 ± 0.200", "1.500 ± 0.000", "1.100 ± 0.100"]
    assert lion_wsd[:3] == ["Lion", "wsd", "1234"] and set(lion_wsd[3:]) == {"-"}


def test_runs_group_by_name_without_the_seed(tmp_path):
    summarize = _load_script().summarize
    runs = [
        _run(tmp_path, f"{name}{seed}", [f"run-name={name}-s{seed}", f"seed={seed}"], evals)
        for name, evals in (("rmsnorm", [{"val/loss": 2.0}]), ("swiglu", [{"val/loss": 1.0}]))
        for seed in (1, 2)
    ]
    _, _, *rows = summarize([load_run(r) for r in runs], ["run-name"]).splitlines()
    assert [row.split("|")[1:3] for row in rows] == [[" swiglu ", " 1,2 "], [" rmsnorm ", " 1,2 "]]
