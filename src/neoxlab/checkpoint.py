"""Checkpoints: atomic folders that hold everything needed for an exact resume.

A checkpoint is `step_NNNNNNN/` with `model.safetensors` (weights), `optimizer.pt` (optimizer,
loss scaler and RNG states: tensors and plain Python values only, so it loads with
`torch.load(weights_only=True)`), `state.json` (step, tokens, config, ...) and the run's
`tokenizer.json`, so a checkpoint folder alone is enough to generate or evaluate. Folders are
written under a temporary name and renamed (and renamed before they are deleted), so a crash
never leaves a half-written or half-deleted checkpoint where a reader would find it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from neoxlab.atomic import (
    fsync_directory,
    give_default_permissions,
    is_temporary,
    remove_temporaries,
    temporary_path,
    write_error,
)
from neoxlab.config import Config, config_from_dict, model_config, padded_vocab_size, read_yaml
from neoxlab.errors import NeoxlabError
from neoxlab.model import GPTNeoX
from neoxlab.tokenizer import load_tokenizer
from neoxlab.tracking import RUNS_DIR, runs_under

STEP_PREFIX = "step_"
FILES = ("model.safetensors", "optimizer.pt", "state.json", "tokenizer.json")


def checkpoint_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary and incomplete folders are
    ignored)."""
    return [path for path in _step_folders(root) if is_complete(path)]


def _step_folders(root: Path) -> list[Path]:
    """The checkpoint folders under `root`, complete or not, oldest first (no temporaries)."""
    if not root.is_dir():
        return []
    found = [
        path
        for path in root.iterdir()
        if path.is_dir() and path.name.startswith(STEP_PREFIX) and not is_temporary(path)
    ]
    return sorted(found, key=lambda p: p.name)


def is_complete(checkpoint: Path) -> bool:
    """Every file of the checkpoint is there, as large as its state.json says."""
    return incomplete_reason(checkpoint) is None


def incomplete_reason(checkpoint: Path) -> str | None:
    """Why `checkpoint` is not complete, in a few words; None when it is.

    state.json is written last and records the other files' sizes, so a folder that was copied
    or renamed file by file (an object-store mount renames that way) and cut short is refused,
    whichever files it already holds. Checkpoints from before the sizes were recorded need
    every file present."""
    try:
        state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "it has no state.json"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "its state.json is unreadable"
    sizes = state.get("file_sizes") if isinstance(state, dict) else None
    for name in FILES:
        if name == "state.json":
            continue
        try:
            size = (checkpoint / name).stat().st_size
        except OSError:
            return f"it has no {name}"
        expected = sizes.get(name) if isinstance(sizes, dict) else size
        if size != expected:
            recorded = f"{expected:,}" if isinstance(expected, int) else "another size"
            return f"its {name} is {size:,} bytes, state.json says {recorded} (cut short)"
    return None


def latest_checkpoint(root: Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module | Mapping[str, torch.Tensor],
    training_state: dict[str, Any],
    state: dict[str, Any],
    tokenizer_file: Path,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint `step` under `root` atomically; prune to the newest `keep_last`.

    `model` is the module or its full state dict (what a sharded run gathers on rank 0).
    A failed write (disk full, no permission) is a NeoxlabError and leaves every earlier
    checkpoint as it was."""
    final = root / checkpoint_name(step)
    tmp = temporary_path(final)
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_temporaries(root)  # what a killed save or prune left behind
        tmp.mkdir()
        state_dict = model if isinstance(model, Mapping) else model.state_dict()
        weights = {name: t.detach().contiguous().cpu() for name, t in state_dict.items()}
        save_file(weights, str(tmp / "model.safetensors"))
        give_default_permissions(tmp / "model.safetensors")
        _save_training_state(training_state, tmp / "optimizer.pt")
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        # last, with the other files' sizes: what is_complete checks
        sizes = {path.name: path.stat().st_size for path in tmp.iterdir()}
        text = json.dumps({**state, "file_sizes": sizes}, indent=2)
        (tmp / "state.json").write_text(text, encoding="utf-8")
        _fsync_dir_files(tmp)
        if final.exists():
            # Only when a resumed run re-saves the step it resumed from. A kill from here to
            # the rename leaves the earlier checkpoints, never a half-deleted one.
            _discard(final)
        tmp.rename(final)
        fsync_directory(root)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(final, err) from None
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            with contextlib.suppress(OSError):  # pruning is tidying: it never stops a run
                _discard(old)
    return final


def _save_training_state(training_state: dict[str, Any], path: Path) -> None:
    # Unbuffered, so that a failed write (ENOSPC, ...) reaches torch as the OSError itself;
    # torch's zip writer then fails once more while closing and raises a RuntimeError about
    # file positions: the OSError it was handling is the reason to report.
    with open(path, "wb", buffering=0) as handle:
        try:
            torch.save(training_state, handle)
        except RuntimeError as err:
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise


def _discard(checkpoint: Path) -> None:
    """Delete a checkpoint folder; renamed to a temporary name first, so that a kill halfway
    through the deletion leaves a folder no reader takes for a checkpoint."""
    doomed = temporary_path(checkpoint, "-deleted")
    checkpoint.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir_files(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "state.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NeoxlabError(f"{checkpoint} is not a neoxlab checkpoint (no state.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NeoxlabError(f"checkpoint state {path} is unreadable: {err}") from None


# What torch.load(weights_only=True) raises for a file that is not plain tensors (or no file).
TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, OSError, EOFError)


def load_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Weights through safetensors: loading never runs code from the file."""
    path = checkpoint / "model.safetensors"
    if not path.is_file():
        raise NeoxlabError(f"checkpoint {checkpoint} has no model.safetensors")
    return read_safetensors(path, "checkpoint weights")


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """Optimizer/scaler/RNG states with `weights_only=True`: pickled code is refused."""
    path = checkpoint / "optimizer.pt"
    if not path.is_file():
        raise NeoxlabError(f"checkpoint {checkpoint} has no optimizer.pt, so it cannot resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as err:
        hint = "neoxlab never unpickles code; re-create the checkpoint with neoxlab"
        raise refused_pickle(path, "checkpoint", err, hint) from None


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A .safetensors file (loading never runs code); unreadable -> `what` PATH are unreadable."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise NeoxlabError(f"{what} {path} are unreadable: {err}") from None


def refused_pickle(path: Path, kind: str, err: Exception, hint: str) -> NeoxlabError:
    """The error for a torch file that `torch.load(weights_only=True)` refused."""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return NeoxlabError(
        f"refusing to load {path}: not a plain tensor {kind} ({first_line})", hint=hint
    )


def load_model_state(model: nn.Module, weights: dict[str, torch.Tensor], origin: Path) -> None:
    """Copy weights into `model`, turning shape/name mismatches into one clear error."""
    check_model_state(model, weights, origin)
    model.load_state_dict(weights)


def check_model_state(model: nn.Module, weights: dict[str, torch.Tensor], origin: Path) -> None:
    """Names and shapes of `weights` against `model` (global shapes, also when sharded)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise NeoxlabError(
            f"checkpoint {origin} does not match the model: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}",
            hint="use the config the checkpoint was trained with",
        )
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise NeoxlabError(
                f"checkpoint {origin} has {name} of shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[name].shape)}",
                hint="the checkpoint comes from a different model shape or tokenizer",
            )


@dataclass
class TrainedModel:
    """A model ready for generation or evaluation, with what it was trained with."""

    model: GPTNeoX
    tokenizer: Tokenizer
    config: Config
    checkpoint: Path
    state: dict[str, Any]


def is_hf_directory(path: Path) -> bool:
    """A Hugging Face model folder (config.json), as transformers' save_pretrained writes."""
    return (path / "config.json").is_file() and not (path / "state.json").is_file()


def checkpoint_folder(run: Path) -> Path | None:
    """The `save` folder that run directory `run`'s config.yml names; None when it saves none."""
    saved = config_from_dict(read_yaml(run / "config.yml"))
    return run / saved.save if saved.save else None


def run_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of run directory `run`; None when it saves none or has
    none yet."""
    root = checkpoint_folder(run)
    return latest_checkpoint(root) if root else None


def print_note(message: str) -> None:
    """A note for the person at the terminal, on stderr (stdout may be generated text)."""
    print(f"note: {message}", file=sys.stderr)


def resumable_run(run_name: str | None, base: Path | None = None) -> Path | None:
    """The run under runs/ (named `run_name`, when set) holding the newest complete checkpoint;
    None when there is none.

    `--resume auto` and the notebooks' resume use it: the same command, rerun after any stop (a
    preempted VM, a Slurm requeue, a disconnected Colab), continues where the last complete
    checkpoint left off, and a name keeps it to that run (never a newer run of another shape)."""
    written = []  # (when its newest complete checkpoint was written, run)
    for run in runs_under(base or Path.cwd() / RUNS_DIR, run_name):
        checkpoint = run_checkpoint(run)
        if checkpoint is not None:
            written.append(((checkpoint / "state.json").stat().st_mtime, run))
    return max(written)[1] if written else None


def resolve_checkpoint(path: Path, notice: Callable[[str], None] = print_note) -> Path:
    """A checkpoint folder or Hugging Face folder, or a run directory (-> newest complete
    checkpoint; `notice` names each newer one that is skipped, and why)."""
    path = path.expanduser()
    if (path / "state.json").is_file() or is_hf_directory(path):
        return path
    if (path / "config.yml").is_file():
        root = checkpoint_folder(path)
        checkpoint = latest_checkpoint(root) if root else None
        newer = [
            folder
            for folder in (_step_folders(root) if root else [])
            if checkpoint is None or folder.name > checkpoint.name
        ]
        instead = f"using {checkpoint.name}" if checkpoint else "no complete checkpoint is left"
        for folder in newer:
            notice(f"skipping {folder}: {incomplete_reason(folder)}; {instead}")
        if checkpoint is None:
            raise NeoxlabError(
                f"run {path} has no {'complete ' if newer else ''}checkpoint yet",
                hint="wait for the first save-interval, or train longer",
            )
        return checkpoint
    if not path.exists():
        raise NeoxlabError(
            f"{path} does not exist",
            hint="give a run (a folder under runs/: ls runs), a checkpoint or a Hugging Face "
            "model folder",
        )
    raise NeoxlabError(
        f"{path} is neither a neoxlab run directory, a checkpoint folder, "
        "nor a Hugging Face model folder (config.json)"
    )


def load_checkpoint_model(checkpoint: Path, device: torch.device) -> TrainedModel:
    """A neoxlab checkpoint folder ready to generate or evaluate (hf.load_trained takes any
    model folder or run)."""
    state = read_state(checkpoint)
    config = config_from_dict(state["config"])
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    weights = load_weights(checkpoint)
    vocab = padded_vocab_size(tokenizer.get_vocab_size(), config.make_vocab_size_divisible_by)
    embedding = weights.get("gpt_neox.embed_in.weight")
    if config.init_from and embedding is not None:
        # a model started from another keeps its embedding rows (Pythia: 50304 for 50277 tokens)
        vocab = embedding.shape[0]
    model = GPTNeoX(model_config(config, vocab))
    load_model_state(model, weights, checkpoint)
    model.to(device).eval()
    return TrainedModel(model, tokenizer, config, checkpoint, state)
