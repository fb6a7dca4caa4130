"""Faults while data is prepared: two runs that start together on a new corpus, a disk that
fills during `neoxlab prepare jsonl`, a kill between the renames of a .bin/.idx pair, a pair
replaced while it is read. No run crashes or reads a half-written file, none takes a .bin/.idx
pair that is not a finished, matching one, and a failure leaves what was there before."""

import errno
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL, tiny_shakespeare_file
from test_reliability import unwritable

from neoxlab import atomic
from neoxlab.cli import main
from neoxlab.config import load_config
from neoxlab.data import indexed
from neoxlab.data.corpora import write_shakespeare_jsonl
from neoxlab.data.indexed import IndexedDataset, IndexedDatasetWriter
from neoxlab.data.jsonl import prepare_jsonl
from neoxlab.data.prepare import prepare_data
from neoxlab.errors import NeoxlabError
from neoxlab.tokenizer import train_bpe

TIMEOUT = 180  # seconds any one process of these tests may take: none can hang the suite

# `neoxlab` with test hooks (none of them in neoxlab itself):
# - START=FOLDER: wait until both processes of the test are ready (FOLDER/ready-*, two of
#   them), then start together, to the millisecond;
# - NAME: this process's name, written into FOLDER/ready-NAME;
# - TRAIN_MIN_FREQUENCY=N: a BPE trainer whose result depends on the process, as tokenizers
#   trained with different library versions on two machines sharing a folder can be;
# - HOLD_AFTER_BIN=FILE: hold the process (FILE written) between the rename of the .bin and
#   that of the .idx of a pair it writes.
LAUNCHER = r"""
import os, sys, time
from pathlib import Path
import neoxlab.data.indexed as indexed
import neoxlab.data.prepare as prepare
from neoxlab.cli import main

if "TRAIN_MIN_FREQUENCY" in os.environ:
    train_bpe = prepare.train_bpe
    minimum = int(os.environ["TRAIN_MIN_FREQUENCY"])
    prepare.train_bpe = lambda *args, **kwargs: train_bpe(*args, **kwargs, min_frequency=minimum)

if "HOLD_AFTER_BIN" in os.environ:
    replace = os.replace

    def replace_and_hold(source, destination):
        replace(source, destination)
        if str(destination).endswith(".bin"):
            Path(os.environ["HOLD_AFTER_BIN"]).write_text("held")
            time.sleep(600)

    indexed.os.replace = replace_and_hold

if "START" in os.environ:
    start = Path(os.environ["START"])
    (start / f"ready-{os.environ['NAME']}").write_text("ready")
    deadline = time.monotonic() + 120
    while len(list(start.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
sys.exit(main(sys.argv[1:]))
"""

RUN = [
    "seq-length=32",
    "hidden-size=32",
    "num-layers=2",
    "num-attention-heads=2",
    "micro-batch-size=2",
    "global-batch-size=4",
    "vocab-size=300",
    "train-iters=3",
    "eval-interval=1000",
    "eval-iters=1",
    "log-interval=1",
    "save-interval=1000",
    "sample-tokens=0",
    "device=cpu",
]


def start(arguments: list[str], cwd: Path, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, *arguments],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:  # timed out: leave no orphan
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=TIMEOUT)
    return process.returncode, out, err


def digests(folder: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
        if path.is_file()
    }


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


@pytest.mark.slow
def test_two_runs_started_together_on_a_new_corpus_share_one_preparation(tmp_path):
    """Case 4. Two runs (a sweep's first two trials) start at the same moment on a corpus that
    has no tokenizer and no .bin/.idx yet. Each would train a different tokenizer (see
    TRAIN_MIN_FREQUENCY). One of them builds both, the other waits on the source's lock and
    reads what it built: both train on the same tokens, and the same losses come out."""
    text = tiny_shakespeare_file().read_text(encoding="utf-8")
    corpus = write_shakespeare_jsonl(text[:200_000], tmp_path / "data" / "new.jsonl")
    (tmp_path / "start").mkdir()
    processes = {
        name: start(
            ["train", *RUN, f"data-path={corpus}", "--name", name, "--no-progress"],
            tmp_path,
            START=str(tmp_path / "start"),
            NAME=name,
            TRAIN_MIN_FREQUENCY=str(frequency),
        )
        for name, frequency in (("a", 2), ("b", 4))
    }
    outputs = {}
    for name, process in processes.items():
        code, out, err = finish(process)
        assert code == 0, err[-3000:]
        outputs[name] = out
    built = [name for name, out in outputs.items() if "training a byte-level BPE" in out]
    tokenized = [name for name, out in outputs.items() if "tokenizing new.jsonl" in out]
    assert len(built) == 1 and tokenized == built, outputs
    (waited,) = set(outputs) - set(built)
    assert "waiting for another process preparing new.jsonl" in outputs[waited]

    runs = {name: next((tmp_path / "runs").glob(f"{name}-*")) for name in outputs}
    tokenizers = {(run / "tokenizer.json").read_bytes() for run in runs.values()}
    assert len(tokenizers) == 1  # one tokenizer for both
    assert losses(runs["a"]) == losses(runs["b"])  # the same tokens, step for step
    data = sorted(path.name for path in corpus.parent.iterdir())
    assert len([name for name in data if name.endswith((".bin", ".idx"))]) == 4  # one cache
    assert not [name for name in data if ".tmp-" in name]


def limited_file_size(limit: int):
    """For a subprocess: the kernel refuses to grow any of its files past `limit` bytes (EFBIG),
    as a full disk refuses (ENOSPC), and does not kill it for trying (SIGXFSZ ignored)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    return apply


@pytest.fixture
def tokenizer_file(tmp_path) -> Path:
    text = tiny_shakespeare_file().read_text(encoding="utf-8")
    path = tmp_path / "tokenizer.json"
    train_bpe([text[:20_000]], vocab_size=300).save(str(path))
    return path


def write_corpus(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def prepare_command(corpus: Path, tokenizer_file: Path, out: Path) -> list[str]:
    options = ["--out", str(out), "--workers", "2", "--no-progress"]
    return ["prepare", "jsonl", str(corpus), "--tokenizer", str(tokenizer_file), *options]


@pytest.mark.parametrize("filling", ["bin", "idx"])
def test_a_disk_that_fills_during_prepare_jsonl_leaves_the_previous_files(
    filling, tokenizer_file, tmp_path
):
    """Case 5. `neoxlab prepare jsonl` of a large file (two tokenizer processes) over an earlier
    preparation, while the disk fills: in the .bin (long texts), or in the .idx once the .bin
    is complete (a great many short ones: their index is larger than their tokens). One line,
    exit 2, no temporaries, and the earlier .bin/.idx as they were."""
    text = tiny_shakespeare_file().read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    out = tmp_path / "data"
    out.mkdir()
    prepare_jsonl(
        [write_corpus(tmp_path / "small.jsonl", paragraphs[:10])],
        tokenizer_file,
        out / "c",
        progress=False,
        log=lambda _: None,
    )
    before = digests(out)
    if filling == "bin":
        large = write_corpus(tmp_path / "large.jsonl", paragraphs * 2)  # 2.2 MB, .bin 1 MB
        limit = 500_000
    else:
        large = write_corpus(tmp_path / "large.jsonl", ["to be"] * 40_000)  # .bin 400 kB
        limit = 600_000  # .idx: 800 kB
    process = subprocess.Popen(
        [sys.executable, "-m", "neoxlab", *prepare_command(large, tokenizer_file, out / "c")],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limited_file_size(limit),
        start_new_session=True,
    )
    code, _, err = finish(process)
    assert code == 2, err
    prefix = out / "c_text_document"
    assert err.startswith(f"error: could not write {prefix}.{filling}: File too large (hint: ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert digests(out) == before  # the earlier pair byte for byte, nothing else
    assert len(IndexedDataset(prefix)) == 10


def test_a_kill_between_the_renames_of_a_pair_leaves_no_mismatched_pair(tokenizer_file, tmp_path):
    """`neoxlab prepare jsonl` rewrites an earlier preparation with the same documents in
    another order (as many tokens, so the sizes of the files agree) and is killed after its
    .bin is in place, before its .idx is. No reader may take the earlier .idx for the new .bin:
    their sizes agree, but the document boundaries are not those of these tokens."""
    text = tiny_shakespeare_file().read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()][:50]
    out = tmp_path / "data"
    out.mkdir()
    first = write_corpus(tmp_path / "first.jsonl", paragraphs)
    prepare_jsonl([first], tokenizer_file, out / "c", progress=False, log=lambda _: None)
    prefix = out / "c_text_document"
    earlier = IndexedDataset(prefix)
    sizes, tokens = list(earlier.sizes), earlier.num_tokens
    del earlier

    reversed_corpus = write_corpus(tmp_path / "reversed.jsonl", paragraphs[::-1])
    held = tmp_path / "held"
    process = start(
        prepare_command(reversed_corpus, tokenizer_file, out / "c"),
        tmp_path,
        HOLD_AFTER_BIN=str(held),
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not held.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.01)
        assert (prefix.parent / f"{prefix.name}.bin").stat().st_size == 2 * tokens
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=TIMEOUT)
    assert sizes[::-1] != sizes
    with pytest.raises(
        NeoxlabError, match=r"indexed dataset file not found: .*c_text_document\.idx"
    ):
        IndexedDataset(prefix)


def test_a_pair_replaced_while_it_is_opened_is_read_again(tmp_path, monkeypatch):
    """A reader opens the .idx of a pair; before it opens the .bin, a writer puts a new pair in
    place. What the reader returns is the new pair, whole, never the old index over the new
    tokens (of the same size)."""
    prefix = tmp_path / "d"
    old = [[1, 2, 3], [4, 5, 6, 7, 8]]
    new = [[9, 9, 9, 9], [7, 7, 7, 7]]  # as many tokens, other boundaries

    def write(documents):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            for document in documents:
                writer.add_document(document)

    write(old)
    real_open = open
    replaced = []

    def open_and_replace(file, *args, **kwargs):
        if str(file).endswith(".bin") and not replaced:  # the reader has the old .idx open
            replaced.append(file)
            write(new)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(indexed, "open", open_and_replace, raising=False)
    dataset = IndexedDataset(prefix)
    assert replaced
    assert [list(dataset[i]) for i in range(len(dataset))] == new


def killed_build_leftovers(folder: Path) -> tuple[list[Path], list[Path]]:
    """(temporaries a killed build of copy.jsonl left, temporaries of other writers)."""
    orphans = [
        folder / "copy.0123abcd.train.bin.tmp-99999",
        folder / "copy.0123abcd.validation.idx.tmp-99999",
        folder / "copy.bpe-300.tokenizer.json.tmp-99999",
    ]
    others = [folder / "copy.jsonl.tmp-99999", folder / "other.0123abcd.train.bin.tmp-99999"]
    for path in [*orphans, *others]:
        path.write_bytes(b"half")
    return orphans, others


def test_a_build_under_the_lock_deletes_what_killed_builds_left(tiny_corpus, tmp_path):
    corpus = tmp_path / "copy.jsonl"
    corpus.write_bytes(tiny_corpus.read_bytes())
    orphans, others = killed_build_leftovers(tmp_path)
    config = load_config([], [*TINY_MODEL, f"data-path={corpus}"])
    assert len(prepare_data(config, log=lambda _: None).splits["train"])
    assert [path for path in orphans if path.exists()] == []
    assert all(path.exists() for path in others)  # the source's own file, another corpus


def test_configs_that_differ_only_in_special_tokens_train_their_own_tokenizers(
    tiny_corpus, tmp_path
):
    corpus = tmp_path / "copy.jsonl"
    corpus.write_bytes(tiny_corpus.read_bytes())
    default = load_config([], [*TINY_MODEL, f"data-path={corpus}"])
    extra = load_config([], [*TINY_MODEL, f"data-path={corpus}", SEPARATOR_TOKENS])
    plain, separated = (prepare_data(c, log=lambda _: None) for c in (default, extra))
    # the default keeps the name that caches and docs have (copy.bpe-300.tokenizer.json)
    assert plain.tokenizer_file == tmp_path / "copy.bpe-300.tokenizer.json"
    assert separated.tokenizer_file.name.startswith("copy.bpe-300-")
    assert plain.tokenizer.token_to_id("<|sep|>") is None
    assert separated.tokenizer.token_to_id("<|sep|>") == 2


SEPARATOR_TOKENS = "special-tokens=[<|endoftext|>,<|padding|>,<|sep|>]"


def test_preparing_on_a_filesystem_without_locks(tiny_corpus, tmp_path, monkeypatch):
    """Lustre mounted without `flock` answers ENOSYS: the source is prepared unlocked (each
    file still written atomically) instead of failing; and with no lock to tell a killed
    build from a running one, no temporary is deleted."""

    def no_locks(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(atomic.fcntl, "flock", no_locks)
    corpus = tmp_path / "copy.jsonl"
    corpus.write_bytes(tiny_corpus.read_bytes())
    orphans, _ = killed_build_leftovers(tmp_path)
    config = load_config([], [*TINY_MODEL, f"data-path={corpus}"])
    assert len(prepare_data(config, log=lambda _: None).splits["train"])
    assert all(path.exists() for path in orphans)


def test_a_source_in_a_folder_without_write_permission(tiny_corpus, tmp_path, capsys):
    """Nothing can be built beside it: one line, exit 2, from the lock file on."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    corpus = folder / "copy.jsonl"
    corpus.write_bytes(tiny_corpus.read_bytes())
    with unwritable(folder):
        assert main(["train", *TINY_MODEL, f"data-path={corpus}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not write {corpus}.lock: ") and err.count("\n") == 1
    assert sorted(p.name for p in folder.iterdir()) == ["copy.jsonl"]
