"""Corpus sources: fetch raw text, verify it, and read jsonl documents.

Tiny Shakespeare comes from its canonical URL, checked by sha256; a local copy (`source`) or a
mirror folder (NEOXLAB_DATA_MIRROR) replaces the download, for offline machines and CI.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from neoxlab.errors import NeoxlabError

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_RELATIVE_PATH = Path("tinyshakespeare") / "input.txt"
DOWNLOAD_TIMEOUT_SECONDS = 30
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Document:
    text: str
    split: str | None  # "train", "validation", "test", or None: the preparer decides


def cache_dir() -> Path:
    """Where downloads are kept: $NEOXLAB_CACHE, $XDG_CACHE_HOME/neoxlab or ~/.cache/neoxlab."""
    if os.environ.get("NEOXLAB_CACHE"):
        return Path(os.environ["NEOXLAB_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "neoxlab"
    return Path.home() / ".cache" / "neoxlab"


def fetch_shakespeare(source: str | Path | None = None) -> Path:
    """A verified copy of Tiny Shakespeare in the cache, from `source`, the mirror or the web."""
    cached = cache_dir() / SHAKESPEARE_RELATIVE_PATH
    if source is not None:
        origin = Path(source)
        if not origin.is_file():
            raise NeoxlabError(f"Tiny Shakespeare source not found: {origin}")
    elif os.environ.get("NEOXLAB_DATA_MIRROR"):
        origin = Path(os.environ["NEOXLAB_DATA_MIRROR"]) / SHAKESPEARE_RELATIVE_PATH
        if not origin.is_file():
            raise NeoxlabError(
                f"NEOXLAB_DATA_MIRROR has no {SHAKESPEARE_RELATIVE_PATH}: {origin} not found",
                hint="put input.txt there or unset NEOXLAB_DATA_MIRROR to download it",
            )
    elif cached.is_file() and _sha256(cached) == SHAKESPEARE_SHA256:
        return cached
    else:
        # A cached copy that fails its checksum is ours to replace, not the user's problem.
        _download_verified(SHAKESPEARE_URL, cached, SHAKESPEARE_SHA256)
        return cached
    _check_sha256(origin, SHAKESPEARE_SHA256)
    if origin.resolve() != cached.resolve():
        _copy_atomically(origin, cached)
    return cached


def write_shakespeare_jsonl(
    text: str, out: Path, *, chunk_chars: int = 256, train_fraction: float = 0.9
) -> Path:
    """Write `text` as jsonl chunks: document 0 is the training split, document 1 validation.

    The split falls exactly at int(train_fraction * len(text)) characters, as in nanoGPT, so
    char-level losses compare with its numbers. Chunks follow a grid of `chunk_chars` from the
    start; the one that straddles the split is cut in two. Joining all texts gives `text` back.
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must lie between 0 and 1, got {train_fraction}")
    boundary = int(train_fraction * len(text))
    cuts = sorted({*range(0, len(text), chunk_chars), boundary, len(text)})
    lines = []
    for start, end in itertools.pairwise(cuts):
        in_train = start < boundary
        record = {
            "text": text[start:end],
            "split": "train" if in_train else "validation",
            "document": 0 if in_train else 1,
        }
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    temporary.write_text("".join(lines), encoding="utf-8")
    os.replace(temporary, out)
    return out


def read_jsonl_documents(path: Path, *, text_key: str = "text") -> list[Document]:
    """Read a jsonl file into documents; consecutive records with one "document" id are one."""
    path = Path(path)
    if not path.is_file():
        raise NeoxlabError(f"no such file: {path}")
    content = path.read_bytes()
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        line_number = content.count(b"\n", 0, error.start) + 1
        raise NeoxlabError(
            f"{path}:{line_number}: not UTF-8 (invalid byte at offset {error.start})",
            hint="convert it to UTF-8 (e.g. iconv -t utf-8)",
        ) from None
    documents: list[Document] = []
    parts: list[str] = []
    current_id: object = None
    current_split: str | None = None
    # Split on "\n" only: str.splitlines would also cut at U+2028 and friends, which JSON
    # (and json.dumps with ensure_ascii=False) leaves unescaped inside strings.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        record = _parse_record(path, line_number, line, text_key)
        document_id = record.get("document")
        split = record.get("split")
        if parts and document_id is not None and document_id == current_id:
            if split != current_split:
                raise NeoxlabError(
                    f"{path}:{line_number}: document {document_id!r} continues with split "
                    f"{split!r} after {current_split!r}",
                    hint="all records of one document must carry the same split",
                )
        elif parts:
            documents.append(Document("".join(parts), current_split))
            parts = []
        parts.append(record[text_key])
        current_id, current_split = document_id, split
    if parts:
        documents.append(Document("".join(parts), current_split))
    if not documents:
        raise NeoxlabError(f"{path} holds no documents", hint="write one JSON object per line")
    return documents


def _parse_record(path: Path, line_number: int, line: str, text_key: str) -> dict:
    where = f"{path}:{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise NeoxlabError(f"{where}: invalid JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(record, dict):
        raise NeoxlabError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_key not in record:
        raise NeoxlabError(
            f"{where}: the record has no '{text_key}' key",
            hint=f"its keys are {sorted(record)}; choose one with the text key option",
        )
    if not isinstance(record[text_key], str):
        raise NeoxlabError(
            f"{where}: '{text_key}' must be a string, got {type(record[text_key]).__name__}"
        )
    split = record.get("split")
    if split is not None and split not in SPLITS:
        raise NeoxlabError(
            f"{where}: unknown split {split!r}", hint=f"use one of {', '.join(SPLITS)}"
        )
    return record


def _download_verified(url: str, destination: Path, sha256: str) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f"{destination.name}.tmp-{os.getpid()}")
    try:
        with (
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response,
            open(temporary, "wb") as file,
        ):
            shutil.copyfileobj(response, file)
    except (OSError, http.client.HTTPException) as error:
        # URLError, timeouts and SSL errors are OSErrors; a cut connection is an HTTPException.
        temporary.unlink(missing_ok=True)
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        raise NeoxlabError(
            f"could not download Tiny Shakespeare from {url}: {reason}",
            hint="pass a local copy with `neoxlab prepare shakespeare --source FILE` or set "
            "NEOXLAB_DATA_MIRROR to a folder holding tinyshakespeare/input.txt",
        ) from None
    actual = _sha256(temporary)
    if actual != sha256:
        temporary.unlink()
        raise NeoxlabError(
            f"the download from {url} has sha256 {actual}, expected {sha256}",
            hint="try again later or pass a verified local copy with --source FILE",
        )
    os.replace(temporary, destination)


def _check_sha256(path: Path, expected: str) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise NeoxlabError(
            f"{path} has sha256 {actual}, expected {expected}",
            hint="this is not the canonical Tiny Shakespeare input.txt; replace the file",
        )


def _copy_atomically(origin: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f"{destination.name}.tmp-{os.getpid()}")
    shutil.copyfile(origin, temporary)
    os.replace(temporary, destination)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
