"""`neoxlab compare`: a PNG and a table of differences from run directories alone."""

import json
import re
from pathlib import Path

import pytest
from matplotlib.image import imread

from neoxlab import cli
from neoxlab.compare import compare, config_differences, load_run, plot
from neoxlab.config import load_config, save_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def test_compare_two_tiny_runs(tiny_overrides, tmp_path, capsys):
    common = [*tiny_overrides, "train-iters=10", "eval-interval=5", "sample-tokens=0", "save=false"]
    for name, options in (("adamw", ["optimizer.type=AdamW"]), ("sgd", ["optimizer.type=SGD"])):
        argv = ["train", *common, *options, "lr=0.01", "--name", name, "--no-progress"]
        assert cli.main(argv) == 0
    runs = sorted(str(p) for p in (tmp_path / "runs").iterdir())
    capsys.readouterr()
    argv = ["compare", *runs, "--metric", "val/loss", "--metric", "train/loss", "--out", "c.png"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    png = tmp_path / "c.png"
    assert png.read_bytes().startswith(PNG_MAGIC)
    height, width, _ = imread(png).shape
    assert (width, height) == (1200, 800)  # two metrics x (by step, by tokens)
    header, *rows = out.split("\n\nwrote")[0].splitlines()
    assert header.split("  ")[0] == "run" and "best val loss" in header and "wall time" in header
    assert len(rows) == 2
    assert {row.split()[0].split("-")[0] for row in rows} == {"adamw", "sgd"}
    assert "optimizer.type=AdamW" in out and "optimizer.type=SGD" in out
    assert "lr=" not in out and "run-name" not in out  # only keys that differ and matter
    # best run first: its best val loss is the smallest
    best = [float(row.split()[2]) for row in rows]
    assert best == sorted(best)
    assert out.rstrip().endswith("wrote c.png")


def fake_run(root, name, overrides, val_losses, wall_seconds=None):
    """A run directory as the trainer leaves it, without training."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    save_config(load_config([], overrides), run_dir / "config.yml")
    lines = []
    for index, loss in enumerate(val_losses):
        step = 10 * index
        lines.append({"step": step, "tokens": 100 * step, "val/loss": loss})
        if step:
            rate = 1000.0 * (index + 1)
            train = {"train/loss": loss + 0.1, "train/tokens_per_second": rate}
            lines.append({"step": step, "tokens": 100 * step, **train})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if wall_seconds is not None:
        (run_dir / "summary.json").write_text(json.dumps({"wall_seconds": wall_seconds}))
    return run_dir


def test_table_ranks_runs_and_shows_only_differences(tmp_path):
    a = fake_run(tmp_path, "a", ["lr=1e-3", "warmup=5", "log-interval=1"], [3.0, 2.5, 2.6], 75)
    b = fake_run(tmp_path, "b", ["lr=3e-3", "warmup=5", "log-interval=7"], [3.0, 2.2], 3700)
    table = compare([a, b], ["val/loss"], tmp_path / "out" / "plot.png")
    assert (tmp_path / "out" / "plot.png").is_file()
    lines = table.splitlines()
    assert lines[1].split() == ["b", "lr=0.003", "2.2000", "2.3000", "2,000", "1h01m"]
    assert lines[2].split() == ["a", "lr=0.001", "2.5000", "2.7000", "2,500", "1m15s"]
    # log-interval differs too, but logging keys never change what a run learns
    assert config_differences([load_run(a), load_run(b)]) == ["lr"]


def test_nested_config_values_are_compared_key_by_key(tmp_path):
    a = fake_run(tmp_path, "a", ["optimizer.params.betas=[0.9,0.95]"], [3.0])
    b = fake_run(tmp_path, "b", ["optimizer.params.betas=[0.9,0.99]"], [3.0])
    assert config_differences([load_run(a), load_run(b)]) == ["optimizer.params.betas"]


def test_optimizer_params_show_only_on_the_runs_that_set_them(tmp_path):
    adamw = ["optimizer.type=AdamW", "optimizer.params.betas=[0.9,0.95]"]
    sgd = ["optimizer.type=SGD", "optimizer.params.momentum=0.9"]
    a = fake_run(tmp_path, "a", adamw, [2.0])
    b = fake_run(tmp_path, "b", sgd, [3.0])
    rows = compare([a, b], ["val/loss"], tmp_path / "c.png").splitlines()[1:]
    assert rows[0].split()[1:4] == ["optimizer.type=AdamW", "optimizer.params.betas=[0.9,", "0.95]"]
    assert rows[1].split()[1:3] == ["optimizer.type=SGD", "optimizer.params.momentum=0.9"]
    assert "None" not in "".join(rows)


def test_from_step_leaves_the_first_points_out_of_the_plot_only(tmp_path, capsys):
    run = fake_run(tmp_path, "a", [], [9.0, 3.0, 2.5])
    figure = plot([load_run(run)], ["val/loss"], tmp_path / "c.png", from_step=10)
    by_step, by_tokens = (ax.lines[0] for ax in figure.axes)
    assert list(by_step.get_xdata()) == [10, 20] and list(by_step.get_ydata()) == [3.0, 2.5]
    assert list(by_tokens.get_xdata()) == [1000, 2000]
    assert cli.main(["compare", str(run), "--out", "d.png"]) == 0
    whole = capsys.readouterr().out
    assert cli.main(["compare", str(run), "--from-step", "10", "--out", "d.png"]) == 0
    assert capsys.readouterr().out == whole  # the table is the same


def test_a_key_an_older_run_lacks_counts_as_its_default(tmp_path):
    old = fake_run(tmp_path, "old", [], [3.0])
    config = old / "config.yml"
    lines = config.read_text().splitlines(keepends=True)
    config.write_text("".join(line for line in lines if not line.startswith("warmup:")))
    new = fake_run(tmp_path, "new", [], [3.0])
    assert config_differences([load_run(old), load_run(new)]) == []
    newer = fake_run(tmp_path, "newer", ["warmup=5"], [3.0])
    assert config_differences([load_run(old), load_run(newer)]) == ["warmup"]


def test_unknown_metric_names_the_known_ones(tmp_path, capsys):
    run = fake_run(tmp_path, "a", [], [3.0])
    assert cli.main(["compare", str(run), "--metric", "val/bleu"]) == 2
    err = capsys.readouterr().err
    assert "no run has metric 'val/bleu'" in err and "val/loss" in err
    assert list(tmp_path.iterdir()) == [run]  # no PNG, no comparisons/ folder


def test_the_plot_goes_into_an_ignored_comparisons_folder_unless_out_says(tmp_path, capsys):
    run = fake_run(tmp_path, "a", [], [3.0, 2.5])
    for _ in range(2):  # a second comparison in the same second does not overwrite the first
        assert cli.main(["compare", str(run)]) == 0
    written = sorted((tmp_path / "comparisons").iterdir())
    assert len(written) == 2 and all(p.read_bytes().startswith(PNG_MAGIC) for p in written)
    assert f"wrote comparisons/{written[0].name}" in capsys.readouterr().out
    assert re.fullmatch(r"compare-\d{6}-\d{6}(-2)?\.png", written[0].name)
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "comparisons/" in ignored


def test_not_a_run_directory(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path)]) == 2
    assert "not a neoxlab run directory" in capsys.readouterr().err


@pytest.mark.parametrize("seconds, shown", [(None, "-"), (4.24, "4.2s"), (61, "1m01s")])
def test_wall_time_format(tmp_path, seconds, shown):
    run = fake_run(tmp_path, "a", [], [3.0], seconds)
    assert compare([run], ["val/loss"], tmp_path / "c.png").splitlines()[1].split()[-1] == shown
