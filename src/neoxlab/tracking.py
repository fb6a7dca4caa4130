"""Run directories, metrics.jsonl, the console progress bar, and the W&B and TensorBoard sinks.

metrics.jsonl is always written; W&B (`use-wandb`) and TensorBoard (`use-tensorboard` or
`tensorboard-dir`) receive the same records when enabled. wandb and tensorboard are imported only
when enabled, so `neoxlab` starts fast without them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from neoxlab.atomic import write_atomically, write_error
from neoxlab.errors import NeoxlabError

if TYPE_CHECKING:
    from neoxlab.config import Config
    from neoxlab.runtime import Runtime

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


def runs_under(base: Path, name: str | None = None) -> list[Path]:
    """The run directories under `base`; with `name`, only those new_run_dir made for it."""
    named = re.compile(rf"{re.escape(name)}-\d{{10}}(-\d+)?") if name else None
    return [
        path.parent
        for path in base.glob("*/config.yml")
        if named is None or named.fullmatch(path.parent.name)
    ]


def find_run(spec: str | Path, base: Path | None = None) -> Path:
    """A run directory given as a path or as `latest` (newest run under runs/)."""
    base = base or Path.cwd() / RUNS_DIR
    if str(spec) == "latest":
        runs = runs_under(base)
        if not runs:
            raise NeoxlabError(
                f"no runs under {base} to resume",
                hint="train one first, e.g. neoxlab train configs/shakespeare.yml",
            )
        return max(runs, key=lambda run: (run / "config.yml").stat().st_mtime)
    path = Path(spec).expanduser()
    if not path.exists():
        raise NeoxlabError(
            f"run {path} does not exist",
            hint=f"runs are the folders under {RUNS_DIR}/ (ls {RUNS_DIR}), or `latest`",
        )
    if not (path / "config.yml").is_file():
        raise NeoxlabError(
            f"{path} is not a neoxlab run directory (no config.yml)",
            hint=f"runs are the folders under {RUNS_DIR}/ (ls {RUNS_DIR}), or `latest`",
        )
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
        try:
            # Held open for the whole run (one line per log step); closed by close().
            self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as err:
            raise write_error(path, err) from None

    def _truncate_after(self, step: int) -> None:
        # Lines logged after the checkpoint we resume from will be logged again: drop them
        # (and a line a killed process left half-written).
        kept = [record for record in _parse_metrics(self.path) if record.get("step", 0) <= step]
        write_atomically(self.path, "".join(f"{json.dumps(record)}\n" for record in kept))

    def write(self, record: dict[str, Any]) -> None:
        clean = {key: _json_safe(value) for key, value in record.items()}
        try:
            self._handle.write(json.dumps(clean) + "\n")
            self._handle.flush()
        except OSError as err:
            raise write_error(self.path, err) from None

    def close(self) -> None:
        self._handle.close()


SUMMARY_FILE = "summary.json"
SAMPLES_DIR = "samples"
# W&B writes one offline folder per process; a resumed run adds another with the same run id.
WANDB_OFFLINE_GLOB = "wandb/offline-run-*"
SAMPLE_COLUMNS = ["step", "sample"]
VERSIONED_PACKAGES = ("neoxlab", "torch", "tokenizers", "safetensors", "numpy", "wandb")


class Tracker:
    """Fans a run's records out to its sinks: metrics.jsonl always, TensorBoard and W&B when the
    config enables them, and summary.json at the end. Only the main process of a distributed
    run constructs one (the trainer gives the other ranks a no-op stand-in), so only rank 0 logs.
    """

    def __init__(
        self,
        run_dir: Path,
        resume_step: int | None = None,
        *,
        config: Config | None = None,
        config_files: Sequence[str] = (),
        info: dict[str, Any] | None = None,
        wandb_run: dict[str, str] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.run_dir = run_dir
        self.started = time.perf_counter()
        resumed = resume_step is not None
        self.previous_wall_seconds = (
            read_summary(run_dir).get("wall_seconds", 0.0) if resumed else 0.0
        )
        self.tensorboard: TensorBoardSink | None = None
        self.wandb: WandbSink | None = None
        if config is not None:
            log_dir = tensorboard_dir(config, run_dir)
            if log_dir is not None:
                self.tensorboard = TensorBoardSink(log_dir, resume_step)
            if config.use_wandb:
                self.wandb = open_wandb(
                    config, run_dir, config_files, info or {}, wandb_run, resume_step, log
                )
        # Kept when this part of the run does not use W&B, so a later part can still continue it.
        self.wandb_run = self.wandb.reference if self.wandb else wandb_run
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step)

    def log(self, record: dict[str, Any]) -> None:
        """One record with `step` and `tokens`: train/* at log steps, val/* at evaluations."""
        self.metrics.write(record)
        if self.tensorboard:
            self.tensorboard.log(record)
        if self.wandb:
            self.wandb.log(record)

    def log_sample(self, step: int, text: str) -> None:
        samples = self.run_dir / SAMPLES_DIR
        samples.mkdir(exist_ok=True)
        write_atomically(samples / f"step_{step:07d}.txt", text)
        if self.wandb:
            self.wandb.log_sample(step, text)

    def finish(self, summary: dict[str, Any], checkpoint: Path | None) -> None:
        """End of the run (also after an early exit): `summary` holds best val loss etc."""
        self.metrics.close()
        wall_seconds = self.previous_wall_seconds + time.perf_counter() - self.started
        summary = {**summary, "wall_seconds": wall_seconds}
        _write_json(self.run_dir / SUMMARY_FILE, summary)
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish(summary, checkpoint)

    def abandon(self) -> None:
        """The run failed (a peer process died, a crash): close the sinks and mark the W&B run
        failed, but write no summary.json, which says that a run ended."""
        self.metrics.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.run.finish(exit_code=1)


def read_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json of a run that has finished (or stopped early) at least once; else {}."""
    path = run_dir / SUMMARY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    clean = {key: _json_safe(item) for key, item in value.items()}
    write_atomically(path, json.dumps(clean, indent=2) + "\n")


def display_path(path: Path) -> str:
    """`path` relative to the working directory when inside it (shorter commands to copy)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ---- what a tracked run records beside its config ---------------------------------------------


def run_info(runtime: Runtime, parameters: int, data: dict[str, Any]) -> dict[str, Any]:
    """Code version, libraries, hardware, model size and data: enough to compare runs later."""
    device = runtime.device
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "git": git_state(),
        "versions": package_versions(),
        "device": {
            "type": device.type,
            "name": device_name,
            "precision": runtime.precision,
            "compile": runtime.compile,
        },
        "parameters": parameters,
        "data": data,
    }


def git_state() -> dict[str, Any] | None:
    """The commit neoxlab's source is at and whether tracked files changed (None: no git)."""
    source = str(Path(__file__).resolve().parent)

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", source, *args], capture_output=True, text=True, check=True, timeout=10
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit, "dirty": bool(changes)}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


# ---- TensorBoard -------------------------------------------------------------------------------


def tensorboard_dir(config: Config, run_dir: Path) -> Path | None:
    """`tensorboard-dir` inside the run directory (`tb` when only use-tensorboard is set)."""
    if config.tensorboard_dir:
        return run_dir / config.tensorboard_dir
    return run_dir / "tb" if config.use_tensorboard else None


class TensorBoardSink:
    """The scalars of metrics.jsonl as TensorBoard events (`tensorboard --logdir DIR`)."""

    def __init__(self, log_dir: Path, resume_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise NeoxlabError(
                "TensorBoard logging is on but tensorboard is not installed",
                hint='pip install "neoxlab[tensorboard]", or unset use-tensorboard/tensorboard-dir',
            ) from None
        # On resume, events logged after the checkpoint (by the part that crashed) are dropped.
        purge_step = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar("train/tokens" if key == "tokens" else key, value, step)

    def close(self) -> None:
        self.writer.close()


# ---- Weights & Biases --------------------------------------------------------------------------


def colab_secret(name: str) -> str | None:
    """A secret from Colab's key panel; None outside Colab or when not shared with the notebook."""
    try:
        from google.colab import userdata
    except ImportError:
        return None
    try:
        return userdata.get(name) or None
    except (userdata.SecretNotFoundError, userdata.NotebookAccessError):
        return None


def wandb_project(config: Config, config_files: Sequence[str], resumed: dict | None) -> str:
    """`wandb-project`, else the project the resumed run lives in, else the first config's stem."""
    if config.wandb_project:
        return config.wandb_project
    if resumed and resumed.get("project"):
        return resumed["project"]
    return Path(config_files[0]).stem if config_files else "neoxlab"


def open_wandb(
    config: Config,
    run_dir: Path,
    config_files: Sequence[str],
    info: dict[str, Any],
    resumed: dict[str, str] | None,
    resume_step: int | None,
    log: Callable[[str], None],
) -> WandbSink | None:
    """Start the run's W&B run, or continue it on resume; None when WANDB_MODE=disabled.

    Online when an API key is configured (WANDB_API_KEY, `wandb login`, or a Colab secret named
    WANDB_API_KEY), offline otherwise or when the server cannot be reached; WANDB_MODE decides
    when set. The key is handed to wandb in memory only, never written anywhere by neoxlab.
    """
    wandb = _import_wandb()
    requested = os.environ.get("WANDB_MODE", "").strip().lower()
    if requested == "disabled":
        log("W&B: off (WANDB_MODE=disabled)")
        return None
    mode, reason, colab_key = _choose_wandb_mode(wandb, requested)
    settings: dict[str, Any] = {"silent": True}  # neoxlab prints the one line that matters
    if colab_key:
        settings["api_key"] = colab_key
    arguments = {
        **_wandb_init_arguments(config, run_dir, config_files, info, resumed),
        "settings": wandb.Settings(**settings),
    }
    run = _start_wandb_run(wandb, mode, reason, arguments, run_dir, log)
    return WandbSink(wandb, run, run_dir, _saved_samples(run_dir, resume_step))


def wandb_plan() -> str:
    """What runs with use-wandb will do with W&B, in one line, asking for no key: a notebook
    prints it before training, so W&B never holds *Run all* at a login prompt."""
    requested = os.environ.get("WANDB_MODE", "").strip().lower()
    if requested == "disabled":
        return "W&B: off (WANDB_MODE=disabled); runs write metrics.jsonl only"
    mode, reason, colab_key = _choose_wandb_mode(_import_wandb(), requested)
    if mode == "online":
        source = "the Colab secret WANDB_API_KEY" if colab_key else "WANDB_API_KEY or wandb login"
        return f"W&B: an API key is set ({source}), so runs log online"
    plan = f"W&B: {reason}, so runs log offline into their run folders (wandb sync uploads them)"
    if not requested:  # no key: say how to get one in
        plan += "; to log online, set WANDB_API_KEY (on Colab: a secret of that name)"
    return plan


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise NeoxlabError(
            "use-wandb is set but wandb is not installed",
            hint='pip install "neoxlab[wandb]", or drop use-wandb/--wandb',
        ) from None
    return wandb


def _choose_wandb_mode(wandb: Any, requested: str) -> tuple[str, str, str | None]:
    """(online or offline, why offline, the Colab secret's API key when that is the key)."""
    if requested in ("offline", "dryrun"):
        return "offline", f"WANDB_MODE={requested}", None
    if wandb.login(prompt=False, verify=False):
        return "online", "", None
    if key := colab_secret("WANDB_API_KEY"):
        return "online", "", key
    if requested == "online":
        raise NeoxlabError(
            "WANDB_MODE=online but no W&B API key is configured",
            hint="run `wandb login`, set WANDB_API_KEY, or unset WANDB_MODE to log offline",
        )
    return "offline", "no API key found", None


def _wandb_init_arguments(
    config: Config,
    run_dir: Path,
    config_files: Sequence[str],
    info: dict[str, Any],
    resumed: dict[str, str] | None,
) -> dict[str, Any]:
    """`wandb.init`'s arguments that name the run, say where it lives and what it logs."""
    return {
        "project": wandb_project(config, config_files, resumed),
        "entity": config.wandb_entity,
        "group": config.wandb_group,
        "tags": config.wandb_tags,
        "name": config.wandb_run_name or run_dir.name,
        # W&B's own convention: WANDB_DIR, when set, says where its files go (a local disk, say,
        # while the run directory lives on a bucket mount); otherwise beside the run's files.
        "dir": None if os.environ.get("WANDB_DIR") else str(run_dir),
        "config": {**config.to_dict(), "run-info": info},
        # Offline runs cannot look the run up: the saved id is what continues it.
        "id": resumed["id"] if resumed else None,
        "resume": "allow" if resumed else None,
        # The tracker logs through its own run object: never hijack or finish a user's run.
        "reinit": "create_new",
    }


def _start_wandb_run(
    wandb: Any,
    mode: str,
    reason: str,
    arguments: dict[str, Any],
    run_dir: Path,
    log: Callable[[str], None],
) -> Any:
    """`wandb.init` online when `mode` says so, offline when asked or the server is unreachable."""
    run = None
    if mode == "online":
        try:
            run = wandb.init(mode="online", **arguments)
        except wandb.errors.CommError as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else "no answer"
            reason = f"the W&B server is unreachable ({first_line})"
    if run is None:
        run = wandb.init(mode="offline", **arguments)
        log(
            f"W&B: {reason}, so this run logs offline; upload it later with: "
            f"wandb sync {_offline_folders(run, run_dir)}"
        )
    else:
        log(f"W&B: logging to {run.url}")
    return run


def _offline_folders(run: Any, run_dir: Path) -> str:
    """The folders `wandb sync` uploads this run from: all of its parts (a resumed run adds
    one) and no other run's, which share a WANDB_DIR but not a run directory."""
    if not os.environ.get("WANDB_DIR"):
        return f"{display_path(run_dir)}/{WANDB_OFFLINE_GLOB}"
    wandb_folder = Path(run.dir).parents[1]  # run.dir is <folder>/offline-run-<time>-<id>/files
    return f"{display_path(wandb_folder)}/offline-run-*-{run.id}"


def _saved_samples(run_dir: Path, up_to: int | None) -> list[list[Any]]:
    """Samples of the run so far (on resume), so its W&B table shows the whole run."""
    if up_to is None:
        return []
    rows = []
    for path in sorted((run_dir / SAMPLES_DIR).glob("step_*.txt")):
        step = int(path.stem.removeprefix("step_"))
        if step <= up_to:
            rows.append([step, path.read_text(encoding="utf-8")])
    return rows


class WandbSink:
    """One W&B run: train/* and val/* against a `train/step` axis, a table of samples, the
    summary, and the final model (weights, config, tokenizer) as a `model` artifact."""

    def __init__(self, wandb: Any, run: Any, run_dir: Path, samples: list[list[Any]]) -> None:
        self.wandb = wandb
        self.run = run
        self.run_dir = run_dir
        self.samples = samples
        run.define_metric("train/step")
        for pattern in ("train/*", "val/*"):
            run.define_metric(pattern, step_metric="train/step")
        run.define_metric("val/loss", step_metric="train/step", summary="min")

    @property
    def reference(self) -> dict[str, str]:
        """What a checkpoint keeps so that `--resume` continues this W&B run."""
        return {"id": self.run.id, "project": self.run.project}

    def log(self, record: dict[str, Any]) -> None:
        # W&B's own step is the training step too, so a resumed run's history (online or synced
        # from offline folders) continues where the checkpoint left off.
        step = record["step"]
        data = {"train/step": step, "train/tokens": record["tokens"]}
        data.update((key, value) for key, value in record.items() if key not in ("step", "tokens"))
        self.run.log(data, step=step)

    def log_sample(self, step: int, text: str) -> None:
        self.samples.append([step, text])
        table = self.wandb.Table(columns=SAMPLE_COLUMNS, data=[list(row) for row in self.samples])
        self.run.log({"samples": table}, step=step)

    def finish(self, summary: dict[str, Any], checkpoint: Path | None) -> None:
        for key in ("best_val_loss", "train_seconds", "wall_seconds"):
            if summary.get(key) is not None:
                self.run.summary[key] = summary[key]
        if checkpoint is not None:
            state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
            artifact = self.wandb.Artifact(
                f"model-{self.run.id}",
                type="model",
                description="neoxlab model: weights (safetensors), resolved config, tokenizer",
                metadata={
                    "step": state["step"],
                    "tokens": state["tokens"],
                    "best_val_loss": state.get("best_val_loss"),
                },
            )
            artifact.add_file(str(checkpoint / "model.safetensors"))
            artifact.add_file(str(checkpoint / "tokenizer.json"))
            artifact.add_file(str(self.run_dir / "config.yml"))
            artifact.add_file(str(self.run_dir / "tokenizer_config.json"))
            self.run.log_artifact(artifact, aliases=["latest", f"step-{state['step']}"])
        self.run.finish()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise NeoxlabError(f"{run_dir} has no metrics.jsonl")
    return _parse_metrics(path)


def _parse_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl. A last line without its newline is what a process killed
    mid-write leaves: it is skipped when it does not parse; any other bad line is an error."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: torn by a kill
                continue
            raise NeoxlabError(f"{path}:{number} is not a JSON line") from None
        if not isinstance(record, dict):
            raise NeoxlabError(f"{path}:{number} is not a JSON object")
        records.append(record)
    return records


class Progress:
    """A tqdm bar over optimizer steps showing loss, lr, tokens/s and MFU (ETA from tqdm).

    Its postfix changes every step from values already on the host, so the bar never waits
    for the GPU: the loss and MFU of the last logged step, the step's lr (a host-side
    schedule), and tokens/s from tqdm's smoothed step rate, which is host wall time, until a
    log step brings the measured one (evaluation and checkpoints left out, as logged). The
    final state prints once, when the bar closes."""

    def __init__(
        self, total: int, initial: int, tokens_per_step: int, enabled: bool = True
    ) -> None:
        self.bar = tqdm(
            total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True
        )
        self.tokens_per_step = tokens_per_step
        self.postfix: dict[str, str] = {}

    def advance(self, lr: float) -> None:
        """One optimizer step done, trained with `lr`."""
        if self.bar.disable:
            return
        rate = self.bar.format_dict["rate"]  # steps/s, tqdm's moving average
        self.postfix["lr"] = f"{lr:.2e}"
        if rate:
            self.postfix["tok_s"] = f"{rate * self.tokens_per_step:,.0f}"
        self._set_postfix()
        if self.bar.n + 1 < self.bar.total:
            self.bar.update(1)  # redraws at most every 0.1 s (tqdm's mininterval)
        else:
            self.bar.n += 1  # the last step: shown once, by close()

    def logged(self, loss: float, tokens_per_second: float, mfu: float | None = None) -> None:
        """The values of a log step (read from the device by that step's one sync)."""
        self.postfix["loss"] = f"{loss:.4f}"
        self.postfix["tok_s"] = f"{tokens_per_second:,.0f}"
        if mfu is not None:  # only where the GPU's peak is known
            self.postfix["mfu"] = f"{mfu:.1%}"
        self._set_postfix()

    def _set_postfix(self) -> None:
        order = ("loss", "lr", "tok_s", "mfu")
        shown = {key: self.postfix[key] for key in order if key in self.postfix}
        self.bar.set_postfix(shown, refresh=False)

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
