"""Experiment tracking: W&B runs (offline, read back with `wandb leet inspect`), TensorBoard, and
the tracking keys. No test needs a network or a W&B account."""

import functools
import json
import re
import subprocess
import sys
import types

import pytest

from neoxlab import cli, tracking
from neoxlab.checkpoint import read_state
from neoxlab.config import load_config
from neoxlab.errors import NeoxlabError
from neoxlab.optim import lr_at
from neoxlab.tracking import Tracker, colab_secret, read_metrics, read_summary, wandb_plan
from neoxlab.trainer import train

# A well-formed but fake key: it must never reach a file.
FAKE_KEY = "local-neoxlab_fake_secret_0123456789abcdefghij"


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """W&B's settings, netrc, staging and caches inside tmp_path (so the user's credentials are
    never seen and nothing lands in their home), a server address that refuses connections, and
    a fresh wandb session (wandb reads its environment once per session)."""
    import wandb

    home = tmp_path / "wandb-home"
    for variable, folder in (
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        monkeypatch.setenv(variable, str(home / folder))
    monkeypatch.setenv("NETRC", str(home / "netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)  # W&B files in the run folder, unless set
    wandb.teardown()
    yield home
    wandb.teardown()


def leet(*args) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return done.stdout


def records(folder) -> list[dict]:
    """An offline run's records as `wandb leet inspect --json` prints them (one per line)."""
    return [json.loads(line) for line in leet("--json", folder).splitlines() if line.strip()]


def of_type(logged: list[dict], kind: str) -> list[dict]:
    found = [record[kind] for record in logged if record["type"] == kind]
    return [item["item"] for item in found] if kind == "history" else found


def offline_folders(run_dir) -> list:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def assert_key_never_written(root) -> None:
    secret = FAKE_KEY.encode()
    leaked = [p for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"


def test_offline_run_logs_config_metrics_samples_and_model(
    tiny_overrides, wandb_home, tmp_path, capsys
):
    (tmp_path / "exp_tiny.yml").write_text("seed: 1234\n")
    argv = ["train", "exp_tiny.yml", *tiny_overrides, "use-tensorboard=true"]
    assert cli.main([*argv, "--wandb", "--no-progress", "--name", "tracked"]) == 0
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    # No key and no WANDB_MODE: offline, said once, with the command that uploads it later.
    said = [line for line in out.splitlines() if "W&B" in line]
    assert said == [
        "W&B: no API key found, so this run logs offline; upload it later with: "
        f"wandb sync runs/{run_dir.name}/wandb/offline-run-*"
    ]
    (folder,) = offline_folders(run_dir)
    summary = json.loads(leet("--summary", "--json", folder))
    assert summary["project"] == "exp_tiny"  # the first config file's stem
    assert summary["name"] == run_dir.name
    assert summary["state"] == "finished"
    config = summary["config"]
    assert config["lr"] == 3e-3 and config["hidden-size"] == 32 and config["use-wandb"] is True
    info = config["run-info"]
    assert info["parameters"] > 0 and info["device"]["type"] == "cpu"
    assert info["versions"]["torch"] and info["data"]["train_tokens"] > 0
    assert info["git"] is None or len(info["git"]["commit"]) == 40  # None outside a checkout

    metrics = read_metrics(run_dir)
    logged_records = records(folder)
    logged = of_type(logged_records, "history")
    train_loss = {m["step"]: m["train/loss"] for m in metrics if "train/loss" in m}
    assert {h["train/step"]: h["train/loss"] for h in logged if "train/loss" in h} == train_loss
    assert all(h["_step"] == h["train/step"] for h in logged)  # W&B's step is the train step
    tokens = {h["train/step"]: h["train/tokens"] for h in logged}
    assert tokens[1] == 4 * 32 and tokens[20] == 20 * 4 * 32
    val_losses = [m["val/loss"] for m in metrics if "val/loss" in m]
    assert summary["summary"]["val/loss"] == {"min": min(val_losses)}
    assert summary["summary"]["best_val_loss"] == min(val_losses)
    assert summary["summary"]["wall_seconds"] == read_summary(run_dir)["wall_seconds"]
    for key in ("val/ppl", "val/acc", "train/lr", "train/grad_norm", "train/tokens_per_second"):
        assert key in summary["summary"]
    defined = of_type(logged_records, "metric")
    assert any(m.get("glob_name") == "val/*" and m["step_metric"] == "train/step" for m in defined)
    assert any(m.get("name") == "val/loss" and m["summary"] == {"min": True} for m in defined)

    table_file = folder / "files" / summary["summary"]["samples"]["path"]
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["step", "sample"]
    assert [row[0] for row in table["data"]] == [0, 10, 20]
    assert table["data"][-1][1] == (run_dir / "samples" / "step_0000020.txt").read_text()

    (model,) = [a for a in of_type(logged_records, "artifact") if a["type"] == "model"]
    assert model["name"] == f"model-{summary['run_id']}"
    assert sorted(model["aliases"]) == ["latest", "step-20"]
    files = {entry["path"] for entry in model["manifest"]["contents"]}
    assert files == {"model.safetensors", "tokenizer.json", "config.yml", "tokenizer_config.json"}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tb_loss = {event.step: event.value for event in events.Scalars("train/loss")}
    assert tb_loss == pytest.approx(train_loss)
    assert [event.step for event in events.Scalars("val/loss")] == [0, 10, 20]
    assert {"train/tokens", "train/lr", "val/ppl"} <= set(events.Tags()["scalars"])


def test_resume_continues_the_same_wandb_run(tiny_overrides, wandb_home, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    config = load_config([], [*tiny_overrides, "use-wandb=true"])
    messages: list[str] = []
    stopped = load_config([], [*tiny_overrides, "use-wandb=true", "exit-interval=10"])
    first = train(stopped, progress=False, log=messages.append)
    assert first.step == 10
    resumed = train(config, resume=first.run_dir, progress=False, log=messages.append)
    assert resumed.finished
    run_dir = first.run_dir

    first_part, second_part = offline_folders(run_dir)
    parts = [records(first_part), records(second_part)]
    run_ids = {of_type(logged, "run")[0]["run_id"] for logged in parts}
    saved = read_state(run_dir / "checkpoints" / "step_0000020")["wandb_run"]
    assert run_ids == {saved["id"]} and saved["project"] == "neoxlab"
    steps = [h["train/step"] for logged in parts for h in of_type(logged, "history")]
    assert steps == [0, 1, 5, 10, 15, 20]  # one row per step, continuing after the checkpoint
    for logged, step in zip(parts, (10, 20), strict=True):
        models = [a for a in of_type(logged, "artifact") if a["type"] == "model"]
        assert [sorted(a["aliases"]) for a in models] == [["latest", f"step-{step}"]]
    (table_file,) = (second_part / "files" / "media" / "table").glob("samples_20_*.table.json")
    table = json.loads(table_file.read_text())
    assert [row[0] for row in table["data"]] == [0, 10, 20]  # the whole run's samples
    sync_lines = [m for m in messages if "wandb sync" in m]
    assert len(sync_lines) == 2 and all("WANDB_MODE=offline" in m for m in sync_lines)
    assert all(
        m.endswith(f"wandb sync runs/{run_dir.name}/wandb/offline-run-*") for m in sync_lines
    )
    assert_key_never_written(tmp_path)


def test_wandb_dir_when_set_holds_the_wandb_files(wandb_home, tmp_path, monkeypatch):
    """WANDB_DIR (W&B's own convention; unset, the run directory holds them, as above) takes
    every run's W&B files, and each run's upload hint names its own folders only."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "local"))
    config = load_config([], ["use-wandb=true"])
    for name in ("first", "second"):
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True)
        messages: list[str] = []
        tracker = Tracker(run_dir, config=config, log=messages.append)
        tracker.log({"step": 1, "tokens": 8, "train/loss": 1.0})
        tracker.finish({"step": 1}, None)
        assert not (run_dir / "wandb").exists()
        pattern = f"local/wandb/offline-run-*-{tracker.wandb_run['id']}"
        (said,) = messages
        assert said.endswith(f"upload it later with: wandb sync {pattern}")
        (folder,) = tmp_path.glob(pattern)
        assert [h["train/loss"] for h in of_type(records(folder), "history")] == [1.0]
    assert len(list((tmp_path / "local" / "wandb").glob("offline-run-*"))) == 2


def fake_colab(monkeypatch, get) -> types.ModuleType:
    """google.colab.userdata as Colab has it, with `get` answering for the secrets panel."""
    userdata = types.ModuleType("google.colab.userdata")
    userdata.SecretNotFoundError = type("SecretNotFoundError", (Exception,), {})
    userdata.NotebookAccessError = type("NotebookAccessError", (Exception,), {})
    userdata.get = get
    colab = types.ModuleType("google.colab")
    colab.userdata = userdata
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)
    return userdata


def test_unreachable_server_falls_back_to_offline(
    tiny_overrides, wandb_home, tmp_path, monkeypatch
):
    # A key makes the run try online; the server (wandb_home's address) refuses connections.
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    messages: list[str] = []
    overrides = [*tiny_overrides, "use-wandb=true", "train-iters=2", "save=false"]
    result = train(load_config([], overrides), progress=False, log=messages.append)
    assert result.finished
    (said,) = [m for m in messages if m.startswith("W&B")]
    assert "the W&B server is unreachable" in said and "logs offline" in said
    (folder,) = offline_folders(result.run_dir)
    assert [h["train/step"] for h in of_type(records(folder), "history")] == [0, 1, 2]
    assert_key_never_written(tmp_path)


def test_colab_secret_is_used_and_never_written(wandb_home, tmp_path, monkeypatch):
    fake_colab(monkeypatch, {"WANDB_API_KEY": FAKE_KEY}.__getitem__)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    messages: list[str] = []
    tracker = Tracker(tmp_path, config=load_config([], ["use-wandb=true"]), log=messages.append)
    tracker.log({"step": 1, "tokens": 8, "train/loss": 1.0})
    tracker.finish({"step": 1}, None)
    # The key was found (the run tried online) and handed to wandb in memory only.
    (said,) = messages
    assert "the W&B server is unreachable" in said
    assert_key_never_written(tmp_path)


def test_colab_secret_absent_or_not_shared(monkeypatch):
    assert colab_secret("WANDB_API_KEY") is None  # not on Colab

    def refuse(name):
        raise userdata.NotebookAccessError(name)

    userdata = fake_colab(monkeypatch, refuse)
    assert colab_secret("WANDB_API_KEY") is None


def test_wandb_mode_disabled_means_no_wandb_run(tmp_path):
    messages: list[str] = []
    config = load_config([], ["use-wandb=true"])
    tracker = Tracker(tmp_path, config=config, log=messages.append)
    tracker.log({"step": 1, "tokens": 8, "train/loss": 1.0})
    tracker.finish({"step": 1, "best_val_loss": None}, None)
    assert messages == ["W&B: off (WANDB_MODE=disabled)"]
    assert not (tmp_path / "wandb").exists() and tracker.wandb_run is None
    assert read_metrics(tmp_path) == [{"step": 1, "tokens": 8, "train/loss": 1.0}]


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        ("", "W&B: no API key found, so runs log offline"),
        ("offline", "W&B: WANDB_MODE=offline, so runs log offline"),
        ("disabled", "W&B: off (WANDB_MODE=disabled)"),
    ],
)
def test_wandb_plan_says_what_runs_will_do_and_asks_nothing(wandb_home, monkeypatch, mode, said):
    """What a notebook prints before training, instead of a login prompt."""
    if mode:
        monkeypatch.setenv("WANDB_MODE", mode)
    assert wandb_plan().startswith(said)


def test_wandb_plan_online_without_a_key_is_a_clear_error(wandb_home, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(NeoxlabError, match="no W&B API key"):
        wandb_plan()


@pytest.mark.parametrize(
    ("override", "module", "hint"),
    [
        ("use-wandb=true", "wandb", "neoxlab[wandb]"),
        ("use-tensorboard=true", "torch.utils.tensorboard", "neoxlab[tensorboard]"),
        ("tensorboard-dir=logs/tb", "torch.utils.tensorboard", "neoxlab[tensorboard]"),
    ],
)
def test_missing_tracking_package_is_a_clear_error(tmp_path, monkeypatch, override, module, hint):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    with pytest.raises(NeoxlabError) as raised:
        Tracker(tmp_path, config=load_config([], [override]))
    assert hint in raised.value.hint
    assert not (tmp_path / "metrics.jsonl").exists()


def test_tensorboard_dir_resolves_inside_the_run(tmp_path):
    tracker = Tracker(tmp_path, config=load_config([], ["tensorboard-dir=logs/tb"]))
    tracker.log({"step": 1, "tokens": 8, "train/loss": 1.0})
    tracker.finish({"step": 1}, None)
    assert list((tmp_path / "logs" / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("wandb-project=team/project", "not a valid W&B project name"),
        ("wandb-tags=" + "x" * 65, "1 to 64 characters"),
        ("wandb-run-name=' '", "must not be empty"),
    ],
)
def test_invalid_tracking_keys(override, message):
    with pytest.raises(NeoxlabError, match=message):
        load_config([], [override])


def test_wandb_tags_from_the_command_line():
    config = load_config([], ["wandb-tags=adamw cosine", "wandb-group=lr-sweep"])
    assert config.wandb_tags == ["adamw", "cosine"] and config.wandb_group == "lr-sweep"


def test_progress_bar_changes_every_step_and_prints_its_end_once(
    tiny_overrides, monkeypatch, capsys
):
    """Between log steps the postfix still moves, from values on the host (each step's lr, the
    last logged loss, tokens/s from wall time); the 12/12 bar is printed once, above the final
    evaluation, with the last logged loss."""
    # tqdm redraws at most every 0.1 s: here every update, so each step's postfix is seen
    monkeypatch.setattr(
        tracking, "tqdm", functools.partial(tracking.tqdm, mininterval=0, miniters=1)
    )
    overrides = [*tiny_overrides, "train-iters=12", "log-interval=100", "eval-interval=100"]
    config = load_config([], [*overrides, "save=false", "sample-tokens=0"])
    result = train(config, progress=True, log=lambda _: None)
    frames = [
        f for f in re.split(r"[\r\n]", capsys.readouterr().err) if "step/s" in f or "s/step" in f
    ]
    shown = {int(m.group(1)): f for f in frames if (m := re.search(r"\| (\d+)/12 ", f))}
    for step in range(2, 12):  # the step's own lr, and step 1's loss
        assert f"lr={lr_at(step - 1, config):.2e}" in shown[step] and "loss=" in shown[step]
    assert all("tok_s=" in shown[step] for step in range(3, 12))
    final = [f for f in frames if "12/12" in f]
    assert len(final) == 1 and f"loss={result.train_loss:.4f}" in final[0], frames[-3:]
