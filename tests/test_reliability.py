"""Reliability: full disks and unwritable folders, hostile and broken inputs, no code execution
from data, secrets never written, numerical faults. Every failure is one line, exit 2, and
leaves what was on disk before as it was."""

import ast
import contextlib
import hashlib
import itertools
import json
import math
import os
import pathlib
import pickle
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from test_indexed import replace_at
from test_tracking import FAKE_KEY, leet, offline_folders, wandb_home  # noqa: F401 (fixture)

from neoxlab.checkpoint import list_checkpoints, load_weights
from neoxlab.cli import main
from neoxlab.config import load_config
from neoxlab.data.indexed import IndexedDatasetWriter
from neoxlab.errors import NeoxlabError
from neoxlab.hf import load_trained
from neoxlab.loss_scale import build_grad_scaler
from neoxlab.tokenizer import train_bpe
from neoxlab.tracking import read_metrics
from neoxlab.trainer import Trainer, train

SOURCE = Path(__file__).resolve().parents[1] / "src" / "neoxlab"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def stopped_run(tiny_corpus, tmp_path_factory) -> Path:
    """A tiny run stopped at step 10 with a checkpoint there, trained once for this module."""
    overrides = [*TINY_MODEL, f"data-path={tiny_corpus}", "device=cpu", "sample-tokens=0"]
    config = load_config([], [*overrides, "exit-interval=10"])
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("stopped"))
        return train(config, progress=False, log=lambda _: None).run_dir


@pytest.fixture
def run_dir(stopped_run, tmp_path) -> Path:
    """A copy of that run for one test to resume, damage or fill the disk under."""
    return Path(shutil.copytree(stopped_run, tmp_path / "runs" / stopped_run.name))


def digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def temporaries(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if ".tmp" in path.name]


# ---- disk full, unwritable folders --------------------------------------------------------------


@contextlib.contextmanager
def file_size_limit(limit: int):
    """The kernel refuses to grow a file of this process past `limit` bytes (EFBIG), as a full
    disk refuses (ENOSPC): a real failure of the write inside safetensors, torch or Python."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, keep the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@contextlib.contextmanager
def unwritable(folder: Path):
    """A folder the kernel refuses to write into: read-only permissions (EACCES), or for root,
    who writes through permissions, the immutable attribute (EPERM)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    else:
        if shutil.which("chattr") is None:
            pytest.skip("running as root without chattr: no way to make a folder unwritable")
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("running as root on a filesystem without the immutable attribute")
        undo = ["chattr", "-i", str(folder)]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


@pytest.mark.parametrize("failing", ["model.safetensors", "optimizer.pt"])
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(run_dir, capsys, failing):
    checkpoints = run_dir / "checkpoints"
    before = digests(checkpoints)
    weights = (checkpoints / "step_0000010" / "model.safetensors").stat().st_size
    optimizer = (checkpoints / "step_0000010" / "optimizer.pt").stat().st_size
    assert weights < optimizer  # so a limit between them fails the optimizer file only
    limit = weights // 2 if failing == "model.safetensors" else (weights + optimizer) // 2
    with file_size_limit(limit):
        code = main(["train", "--resume", str(run_dir), "--no-progress"])
    assert code == 2
    err = one_line_error(capsys)
    assert f"could not write {checkpoints / 'step_0000020'}: File too large" in err
    assert digests(checkpoints) == before  # step 10 byte for byte, nothing else
    assert temporaries(run_dir) == []
    # the run is intact: with room again, it resumes from step 10 and finishes
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert [c.name for c in list_checkpoints(checkpoints)] == ["step_0000010", "step_0000020"]


def test_unwritable_checkpoint_folder_keeps_the_previous_checkpoint(run_dir, capsys):
    checkpoints = run_dir / "checkpoints"
    before = digests(checkpoints)
    with unwritable(checkpoints):
        assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert f"could not write {checkpoints / 'step_0000020'}: " in err
    assert "Permission denied" in err or "Operation not permitted" in err
    assert digests(checkpoints) == before and temporaries(run_dir) == []


@pytest.fixture
def jsonl_tokenizer(tmp_path, tiny_corpus) -> Path:
    path = tmp_path / "tokenizer.json"
    train_bpe([tiny_corpus.read_text()[:20_000]], vocab_size=300).save(str(path))
    return path


def test_prepared_data_write_failures_keep_the_previous_files(
    tiny_corpus, jsonl_tokenizer, tmp_path, capsys
):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(tiny_corpus.read_text().splitlines(keepends=True)[:3]))
    out = tmp_path / "data"
    out.mkdir()
    argv = ["prepare", "jsonl", "--tokenizer", str(jsonl_tokenizer), "--no-progress"]
    assert main([*argv, str(small), "--out", str(out / "c")]) == 0
    capsys.readouterr()
    before = digests(out)
    prefix = out / "c_text_document"
    with file_size_limit(16_000):  # the whole corpus makes a .bin of ~100 kB
        assert main([*argv, str(tiny_corpus), "--out", str(out / "c")]) == 2
    err = one_line_error(capsys)
    assert f"could not write {prefix}.bin: File too large" in err
    assert digests(out) == before  # the earlier .bin/.idx, and no temporaries
    with unwritable(out):
        assert main([*argv, str(tiny_corpus), "--out", str(out / "d")]) == 2
    err = one_line_error(capsys)
    assert f"could not write {out / 'd_text_document'}.bin: " in err
    assert digests(out) == before


def test_unwritable_working_directory_is_one_line(tiny_overrides, tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    with unwritable(tmp_path / "runs"):
        assert main(["train", *tiny_overrides, "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert str(tmp_path / "runs") in err and "fix the permissions" in err


def test_writer_failures_are_errors_that_leave_nothing(tmp_path):
    with (
        file_size_limit(1000),
        pytest.raises(NeoxlabError, match=r"could not write .*d\.bin: File too large"),
        IndexedDatasetWriter(tmp_path / "d", np.uint16) as writer,
    ):
        for _ in range(100):
            writer.add_document(list(range(100)))
    assert list(tmp_path.iterdir()) == []


def test_a_line_torn_by_a_kill_does_not_break_resume_or_reading(run_dir, tiny_overrides):
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 11, "tokens": 1408, "train/lo')  # what a SIGKILL can leave
    assert read_metrics(run_dir)[-1]["step"] == 10
    config = load_config([], tiny_overrides)
    result = train(config, resume=run_dir, progress=False, log=lambda _: None)
    steps = [m["step"] for m in read_metrics(result.run_dir) if "train/loss" in m]
    assert steps == [1, 5, 10, 15, 20]


# ---- hostile and broken inputs ------------------------------------------------------------------


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("model:\n  hidden-size: [1, 2\n", "not valid YAML at line 3, column 1"),
        ("model: [hidden-size]\n", "section 'model' .* must be a mapping"),
        ("hidden-size: [64]\n", "hidden-size .* must be an integer, got \\[64\\]"),
        ("fp16:\n  enabled: 'false'\n", "fp16.enabled must be true or false"),
        ("fp16:\n  initial_scale_power: 1000\n", "initial_scale_power must be at most 127"),
        ("fp16:\n  loss_scale: -1\n", "fp16.loss_scale must be a number >= 0"),
        ("optimizer:\n  optimizer: []\n", "optimizer .* must be a mapping"),
        ("hidden-size: 4000000000\nnum-attention-heads: 1\n", "parameters, above the 1e\\+13"),
        ("num-layers: 100000\n", "num-layers 100000 is above 1024"),
        ("distributed-timeout: 0\n", "distributed-timeout must be a number of seconds in"),
        ("distributed-timeout: .nan\n", "distributed-timeout must be a number of seconds in"),
        ("vocab-file: ~nosuchuser/tokenizer.json\n", "cannot expand '~nosuchuser"),
        ("\x00\x01binary", "not valid YAML"),
    ],
)
def test_broken_configs_are_one_line_errors(tmp_path, capsys, yaml_text, message):
    config = write(tmp_path / "bad.yml", yaml_text)
    assert main(["train", str(config), "--dry-run"]) == 2
    err = one_line_error(capsys)
    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def prefix_data(tmp_path, jsonl_tokenizer):
    """A prepared GPT-NeoX prefix (50 documents) and its tokenizer, as train overrides."""
    prefix = tmp_path / "data" / "corpus"
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for index in range(50):
            writer.add_document([(index + k) % 200 for k in range(40)])
    return prefix, [f"data-path={prefix}", f"vocab-file={jsonl_tokenizer}", "tokenizer-type=hf"]


def damage(prefix: Path, kind: str) -> None:
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    if kind == "truncated idx":
        idx.write_bytes(idx.read_bytes()[:-9])
    elif kind == "wrong magic":
        idx.write_bytes(b"NOTANIDX!" + idx.read_bytes()[9:])
    elif kind == "bin size mismatch":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif kind == "pointer past the end":
        data = idx.read_bytes()
        count = struct.unpack_from("<Q", data, 18)[0]
        last_pointer = 34 + 4 * count + 8 * (count - 1)
        idx.write_bytes(replace_at(data, last_pointer, struct.pack("<q", 1 << 40)))
    elif kind == "id beyond the vocabulary":
        bin_.write_bytes(np.full(50 * 40, 60000, np.uint16).tobytes())
    elif kind == "negative id":
        # an int16 dataset (a signed dtype gpt-neox also writes) with a negative id in it
        with IndexedDatasetWriter(prefix, np.int16) as writer:
            for index in range(50):
                writer.add_document([-3 if index == 7 else 5] * 40)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated idx", r"corpus\.idx is truncated"),
        ("wrong magic", r"corpus\.idx is not a GPT-NeoX mmap index"),
        ("bin size mismatch", r"corpus\.bin has 3998 bytes but its index"),
        ("pointer past the end", r"sequence 49 starts at byte 1099511627776"),
        ("id beyond the vocabulary", "holds token id 60000, outside the tokenizer's vocabulary"),
        ("negative id", "holds token id -3, outside the tokenizer's vocabulary"),
    ],
)
def test_damaged_prepared_data_is_a_one_line_error(
    prefix_data, tiny_overrides, capsys, kind, message
):
    prefix, data = prefix_data
    damage(prefix, kind)
    assert main(["train", *tiny_overrides, *data, "--no-progress"]) == 2
    assert re.search(message, one_line_error(capsys))
    assert not Path("runs").exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "fine"}\n{"text": "cut\n', r"bad\.jsonl:2: invalid JSON"),
        ("list.jsonl", '{"text": "fine"}\n[1, 2]\n', r"list\.jsonl:2: expected a JSON object"),
        ("nokey.jsonl", '{"body": "x"}\n', r"nokey\.jsonl:1: the record has no 'text' key"),
        ("latin1.jsonl", '{"text": "café"}\n'.encode("latin-1"), r"latin1\.jsonl:1: not UTF-8"),
        ("empty.jsonl", "", r"empty\.jsonl holds no documents"),
        ("blank.jsonl", '{"text": ""}\n{"text": ""}\n', r"blank\.jsonl holds only empty texts"),
        ("empty.txt", "", r"empty\.txt is empty"),
    ],
)
def test_broken_or_empty_corpora_are_one_line_errors(
    tmp_path, tiny_overrides, capsys, name, content, message
):
    data = write(tmp_path / "corpus" / name, content)
    assert main(["train", *tiny_overrides, f"data-path={data}", "--no-progress"]) == 2
    assert re.search(message, one_line_error(capsys))
    assert sorted(p.name for p in data.parent.iterdir()) == [name]  # no tokenizer, no cache


def test_empty_inputs_to_prepare_jsonl_write_nothing(tmp_path, jsonl_tokenizer, capsys):
    corpus = write(tmp_path / "in" / "empty.jsonl", '{"text": ""}\n\n')
    argv = ["prepare", "jsonl", str(corpus), "--tokenizer", str(jsonl_tokenizer)]
    assert main([*argv, "--out", str(tmp_path / "out" / "e"), "--no-progress"]) == 2
    assert "no text in" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()  # nor the folder --out would have made


def test_code_corpus_of_only_binary_files_is_an_error(tmp_path, capsys):
    source = tmp_path / "code"
    write(source / "blob.py", random.Random(0).randbytes(256))  # not UTF-8: undecodable
    write(source / "model.py", b"\x00\x01\x02" * 200)  # decodes, but is control characters
    assert main(["prepare", "code", str(source), "--out", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    assert "no file kept" in err and "1 non_text, 1 undecodable" in err
    assert not (tmp_path / "out").exists()


def test_tokenizer_file_that_is_not_json(tmp_path, tiny_overrides, capsys):
    vocab = write(tmp_path / "tokenizer.json", b"\x89PNG\r\n\x1a\n not a tokenizer")
    argv = ["train", *tiny_overrides, f"vocab-file={vocab}", "tokenizer-type=hf"]
    assert main([*argv, "--no-progress"]) == 2
    assert "is not a tokenizer.json file" in one_line_error(capsys)


def test_resume_with_another_model_shape_or_tokenizer(run_dir, tmp_path, capsys):
    config_before = (run_dir / "config.yml").read_bytes()
    resume = ["train", "--resume", str(run_dir), "--no-progress"]
    assert main([*resume, "hidden-size=64"]) == 2
    assert re.search(r"has \S+ of shape \(.*\), the model expects", one_line_error(capsys))
    # Another tokenizer pads to the same 384 embedding rows: only its content tells it apart.
    other = train_bpe(["a completely different text to learn merges from " * 40], 300)
    other.save(str(tmp_path / "other.json"))
    assert main([*resume, f"vocab-file={tmp_path / 'other.json'}"]) == 2
    assert "was trained with another tokenizer" in one_line_error(capsys)
    assert (run_dir / "config.yml").read_bytes() == config_before  # nothing rewritten


def test_generation_prompt_longer_than_the_context(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "long " * 200, "--device", "cpu"]) == 2
    assert "longer than" in one_line_error(capsys)


def test_options_between_key_value_overrides(tiny_overrides, capsys):
    """`neoxlab train a=1 --wandb b=2`: argparse ends the list at an option; it must go on."""
    head, tail = tiny_overrides[:5], tiny_overrides[5:]
    assert main(["train", *head, "--dry-run", *tail, "train-iters=7"]) == 0
    assert "optimizer steps: 7;" in capsys.readouterr().out
    assert main(["train", *head, "--dry-run", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in one_line_error(capsys)


# ---- no code execution from data ----------------------------------------------------------------


class _Payload:
    """Pickles as a call that writes `marker`: what a hostile optimizer.pt would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.marker, "code ran"))


def record_size(planted: Path) -> None:
    """What an attacker who swaps a checkpoint file also does: record its size in state.json,
    so the checkpoint passes as complete and the file reaches the loader."""
    state_file = planted.with_name("state.json")
    state = json.loads(state_file.read_text())
    state["file_sizes"][planted.name] = planted.stat().st_size
    state_file.write_text(json.dumps(state))


def test_pickle_bomb_checkpoint_is_refused_on_resume_and_never_runs(run_dir, tmp_path, capsys):
    optimizer = run_dir / "checkpoints" / "step_0000010" / "optimizer.pt"
    # The bomb is live: an unguarded torch.load runs it.
    armed = tmp_path / "armed"
    torch.save({"optimizer": _Payload(armed)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert armed.read_text() == "code ran"
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Payload(marker), "scaler": {}, "rng": {}}, optimizer)
    record_size(optimizer)
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert f"refusing to load {optimizer}" in err and "never unpickles code" in err
    assert not marker.exists()
    # weights that are a pickle instead of safetensors are refused too (eval, generate, export)
    weights = optimizer.with_name("model.safetensors")
    weights.write_bytes(pickle.dumps(_Payload(marker)))
    record_size(weights)
    assert main(["generate", str(run_dir), "--device", "cpu"]) == 2
    assert "unreadable" in one_line_error(capsys)
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_source_loads_data_only_through_safe_loaders():
    """The audit as a test: every torch.load says weights_only=True; no pickle, marshal,
    yaml.load/unsafe_load/full_load, numpy allow_pickle, eval or exec anywhere in neoxlab."""
    forbidden = {"pickle.load", "pickle.loads", "marshal.load", "marshal.loads", "eval", "exec"}
    forbidden |= {"yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"}
    torch_loads = 0
    for path in sorted(SOURCE.rglob("*.py")):
        for call, name in _calls(ast.parse(path.read_text())):
            where = f"{path.relative_to(SOURCE)}:{call.lineno}"
            assert name not in forbidden, f"{where} calls {name}"
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if name == "torch.load":
                torch_loads += 1
                assert keywords.get("weights_only") == "True", f"{where}: torch.load unguarded"
            assert keywords.get("allow_pickle") != "True", f"{where}: allow_pickle"
            assert keywords.get("trust_remote_code") != "True", f"{where}: trust_remote_code"
    assert torch_loads >= 2  # checkpoint optimizer.pt and Hugging Face pytorch_model.bin


# ---- secrets --------------------------------------------------------------------------------


SECRETS = {
    "WANDB_API_KEY": FAKE_KEY,
    "HF_TOKEN": "hf_neoxlabFakeToken0123456789abcdefghijk",
    "HUGGING_FACE_HUB_TOKEN": "hf_neoxlabFakeHubToken0123456789abcdefgh",
}


@pytest.mark.usefixtures("wandb_home")  # W&B's own files inside tmp_path, scanned below
def test_tokens_and_keys_are_never_written_or_printed(tiny_overrides, tmp_path, monkeypatch, capfd):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    train_argv = ["train", *tiny_overrides, "train-iters=10", "--wandb", "--name", "secret"]
    assert main([*train_argv, "--no-progress"]) == 0
    (run_dir,) = (tmp_path / "runs").glob("secret-*")
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    (folder,) = offline_folders(run_dir)
    summary = leet("--summary", "--json", folder)  # the run's config, as W&B stored it
    assert json.loads(summary)["config"]["hidden-size"] == 32
    wandb_view = summary + leet("--json", folder)
    printed = capfd.readouterr()
    assert (tmp_path / "export" / "README.md").is_file()
    for name, value in SECRETS.items():
        assert value not in printed.out + printed.err, f"{name} was printed"
        assert value not in wandb_view, f"{name} is in the W&B run"
        leaked = [
            p for p in tmp_path.rglob("*") if p.is_file() and value.encode() in p.read_bytes()
        ]
        assert not leaked, f"{name} was written to {leaked}"


# ---- numerical faults -----------------------------------------------------------------------


def test_nan_stops_at_its_step_and_names_a_finite_last_checkpoint(
    tiny_overrides, monkeypatch, capsys
):
    """A weight turns NaN right after the step-10 checkpoint (the real forward and backward
    carry it); the run must stop at step 11, before step 12's checkpoint could save it."""
    save = Trainer.save

    def save_then_poison(self):
        path = save(self)
        if self.step == 10:
            with torch.no_grad():
                self.model.gpt_neox.final_layer_norm.weight[0] = math.nan
        return path

    monkeypatch.setattr(Trainer, "save", save_then_poison)
    overrides = [*tiny_overrides, "save-interval=2", "sample-tokens=0", "--no-progress"]
    assert main(["train", *overrides, "--name", "nan"]) == 2
    err = one_line_error(capsys)
    (run_dir,) = Path("runs").glob("nan-*")
    last = (run_dir / "checkpoints" / "step_0000010").resolve()
    assert "training stopped at step 11: the loss became non-finite (nan)" in err
    assert f"last good checkpoint: {last}" in err
    assert list_checkpoints(run_dir / "checkpoints")[-1].resolve() == last
    assert all(torch.isfinite(t).all() for t in load_weights(last).values())
    trained = load_trained(last, torch.device("cpu"))  # and it loads as a model
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(trained.model(ids)[0]).all()


def fp16_trainer(overrides, scale_power, min_scale, overflow_steps):
    """fp16 loss scaling as far as a CPU goes. fp16 autocast needs a GPU, so the run computes in
    fp32 with the trainer's own fp16 GradScaler, and a hook makes the gradients of
    `overflow_steps` (1-based) non-finite, as an fp16 overflow makes them."""
    config = load_config(
        [],
        [
            *overrides,
            "log-interval=1",
            "sample-tokens=0",
            "save-interval=1",
            f"fp16.initial_scale_power={scale_power}",
            f"fp16.min_loss_scale={min_scale}",
            "fp16.loss_scale_window=1000",
        ],
    )
    trainer = Trainer(config, progress=False, log=lambda _: None)
    assert trainer.runtime.precision == "fp32" and not trainer.scaler.is_enabled()
    trainer.scaler = build_grad_scaler(trainer.runtime.device.type, True, config.fp16)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0**scale_power
    backward_passes = itertools.count()

    def overflow(grad):
        step = next(backward_passes) // trainer.accumulation + 1
        return torch.full_like(grad, math.inf) if step in overflow_steps else grad

    trainer.model.gpt_neox.embed_in.weight.register_hook(overflow)
    return trainer


def test_fp16_overflow_skips_and_counts_steps_then_trains_on(tiny_overrides):
    trainer = fp16_trainer(
        [*tiny_overrides, "train-iters=8"], scale_power=16, min_scale=1, overflow_steps={3, 5}
    )
    result = trainer.run()
    assert result.finished
    metrics = [m for m in read_metrics(result.run_dir) if "train/loss" in m]
    assert [m["train/skipped_steps"] for m in metrics] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert all(math.isfinite(m["train/loss"]) for m in metrics)
    assert trainer.scaler.get_scale() == 2.0 ** (16 - 2)  # halved once per skipped step
    checkpoints = result.run_dir / "checkpoints"

    def weights(step):
        return load_weights(checkpoints / f"step_{step:07d}")

    for step in (3, 5):  # a skipped step leaves the weights as they were; the others move them
        before, after = weights(step - 1), weights(step)
        assert all(torch.equal(before[k], after[k]) for k in before)
    before, after = weights(3), weights(4)
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_fp16_scale_below_min_loss_scale_stops_the_run(tiny_overrides):
    every_step = set(range(1, 21))  # a real divergence: every step overflows
    trainer = fp16_trainer(tiny_overrides, scale_power=3, min_scale=2, overflow_steps=every_step)
    message = r"step 3: the fp16 loss scale fell below min-loss-scale .*/step_0000002"
    with pytest.raises(NeoxlabError, match=message):
        trainer.run()  # scale 8 -> 4 -> 2 -> 1 < 2
