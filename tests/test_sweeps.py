"""configs/sweeps/*.yml: W&B sweep definitions whose every command the agent can build is a valid
`neoxlab train` command line (known keys, valid values, parsable arguments)."""

import itertools
import math
from pathlib import Path

import pytest
import yaml

from neoxlab.cli import build_parser
from neoxlab.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yml"))
MACRO = "${args_no_hyphens}"


def candidates(name: str, spec: dict) -> list:
    """Values the sweep can hand a run: every listed value, or a distribution's two ends."""
    if "values" in spec:
        return spec["values"]
    if "value" in spec:
        return [spec["value"]]
    distribution = spec.get("distribution")
    if distribution in ("uniform", "log_uniform_values", "int_uniform", "q_uniform"):
        assert spec["min"] < spec["max"], name
        if distribution == "log_uniform_values":
            assert spec["min"] > 0, name
        return [spec["min"], spec["max"]]
    if distribution == "log_uniform":  # min/max are natural logs
        return [math.exp(spec["min"]), math.exp(spec["max"])]
    pytest.fail(f"{name}: no candidates for {spec}")


def agent_commands(sweep: dict):
    """The command lines a W&B agent would run: `${args_no_hyphens}` -> `key=value` (W&B writes
    each value with Python's str()), one per combination of candidate values."""
    names = list(sweep["parameters"])
    choices = [candidates(name, sweep["parameters"][name]) for name in names]
    for values in itertools.product(*choices):
        arguments = [f"{name}={value}" for name, value in zip(names, values, strict=True)]
        command: list[str] = []
        for part in sweep["command"]:
            command += arguments if part == MACRO else [part]
        yield command


def test_the_documented_sweeps_exist():
    assert {p.name for p in SWEEPS} >= {"lr_optimizer_grid.yml", "random_lr_warmup_wd.yml"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_runs_are_valid_neoxlab_commands(path, monkeypatch):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"] == {"name": "best_val_loss", "goal": "minimize"}  # in every summary
    assert sweep["command"][:2] == ["neoxlab", "train"] and MACRO in sweep["command"]
    if sweep["method"] != "grid":
        assert sweep.get("run_cap"), "a random search needs a run cap"
    monkeypatch.chdir(ROOT)  # `wandb agent` runs from the repository root
    commands = list(agent_commands(sweep))
    assert len(commands) >= 2
    for command in commands:
        args = build_parser().parse_args(command[1:])
        assert args.wandb, "sweep runs must log to W&B"
        files = [item for item in args.items if "=" not in item]
        overrides = [item for item in args.items if "=" in item]
        assert files and all(Path(f).is_file() for f in files)
        config = load_config(files, overrides)  # unknown keys or invalid values raise here
        for override in overrides:
            key, value = override.split("=", 1)
            resolved = config.to_dict()
            for part in key.split("."):
                resolved = resolved[part.replace("_", "-")]
            assert str(resolved) == value or float(resolved) == pytest.approx(float(value))
