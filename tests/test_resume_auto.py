"""`neoxlab train ... --resume auto`: continue the newest complete checkpoint, else start fresh.

The same command is what a preempted cloud job, a Slurm requeue and a torchrun restart run
again, so it must pick the right checkpoint in every state a stop can leave behind."""

import json
import shutil

from neoxlab.checkpoint import is_complete, list_checkpoints, read_state
from neoxlab.cli import main
from neoxlab.tracking import read_metrics, runs_under


def train_auto(tiny_overrides, *extra):
    return main(["train", *tiny_overrides, *extra, "--resume", "auto", "--no-progress"])


def runs(tmp_path, name=None):
    return sorted(runs_under(tmp_path / "runs", name))


def trained_steps(run_dir):
    return [m["step"] for m in read_metrics(run_dir) if "train/loss" in m]


def test_empty_folder_starts_a_new_run(tiny_overrides, tmp_path, capsys):
    assert train_auto(tiny_overrides, "--name", "fresh") == 0
    assert "no run named fresh under" in capsys.readouterr().err
    (run,) = runs(tmp_path)
    assert trained_steps(run)[0] == 1
    assert [c.name for c in list_checkpoints(run / "checkpoints")][-1] == "step_0000020"


def test_three_checkpoints_resume_from_the_newest(tiny_overrides, tmp_path, capsys):
    three = ["train-iters=30", "keep-last-k=3"]
    assert train_auto(tiny_overrides, *three, "--name", "base") == 0
    (run,) = runs(tmp_path)
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == [
        "step_0000010",
        "step_0000020",
        "step_0000030",
    ]
    capsys.readouterr()
    assert train_auto(tiny_overrides, "train-iters=40", "keep-last-k=3", "--name", "base") == 0
    assert f"resuming {run.name} from step_0000030" in capsys.readouterr().out
    assert runs(tmp_path) == [run]  # continued, not a new run
    assert read_state(list_checkpoints(run / "checkpoints")[-1])["step"] == 40
    assert trained_steps(run)[-2:] == [35, 40]


def test_half_written_checkpoints_are_never_picked(tiny_overrides, tmp_path, capsys):
    assert train_auto(tiny_overrides, "train-iters=30", "keep-last-k=3", "--name", "cut") == 0
    (run,) = runs(tmp_path)
    root = run / "checkpoints"
    # step 30 copied file by file and cut short (an object-store rename); a killed save's
    # temporary folder beside it holds a newer, complete-looking checkpoint
    shutil.copytree(root / "step_0000030", root / "step_0000040.tmp-123")
    weights = root / "step_0000030" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert not is_complete(root / "step_0000030")
    capsys.readouterr()
    assert train_auto(tiny_overrides, "train-iters=30", "keep-last-k=3", "--name", "cut") == 0
    assert f"resuming {run.name} from step_0000020" in capsys.readouterr().out
    steps = trained_steps(run)
    assert steps[-2:] == [25, 30] and steps.count(25) == 1  # metrics after 20 were redone


def test_only_runs_of_the_given_name_and_complete_files_count(tiny_overrides, tmp_path, capsys):
    assert train_auto(tiny_overrides, "--name", "mine") == 0
    assert train_auto(tiny_overrides, "--name", "other") == 0  # newer, but another name
    (mine,) = runs(tmp_path, "mine")
    capsys.readouterr()
    assert train_auto(tiny_overrides, "train-iters=30", "--name", "mine") == 0
    assert f"resuming {mine.name} from step_0000020" in capsys.readouterr().out
    # a checkpoint without its state.json (or without the sizes it records) is incomplete
    newest = list_checkpoints(mine / "checkpoints")[-1]
    state = json.loads((newest / "state.json").read_text())
    del state["file_sizes"]
    (newest / "state.json").write_text(json.dumps(state))
    assert is_complete(newest)  # an older checkpoint: every file present is enough
    (newest / "optimizer.pt").unlink()
    assert not is_complete(newest)
    (newest / "state.json").unlink()
    assert not is_complete(newest)


def test_auto_needs_the_config(capsys):
    assert main(["train", "--resume", "auto"]) == 2
    assert "--resume auto" in capsys.readouterr().err
