"""Corpus sources: fetch raw text, verify it, read jsonl documents, divide them into splits.

Tiny Shakespeare comes from its canonical URL, checked by sha256; a local copy (`source`) or a
mirror folder (NEOXLAB_DATA_MIRROR) replaces the download, for offline machines and CI.

Code corpora (the running interpreter's standard library, a folder of .py files, a jsonl, or a
Hugging Face dataset) are cleaned and written as jsonl records {"text", "split", "path"}, one per
file, split by a stable hash so that a file never appears in two splits.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import itertools
import json
import os
import re
import shutil
import sys
import sysconfig
import time
import tokenize
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from neoxlab.atomic import output_folder, write_atomically
from neoxlab.config import parse_split
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
    """A verified Tiny Shakespeare input.txt: `source` itself when given, else the copy in the
    cache, taken from the mirror or the web. A source or mirror file is copied into the cache
    too, so that later runs find it offline."""
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
    kept = _keep_in_cache(origin, cached)
    return origin if source is not None else kept


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
    write_atomically(out, "".join(lines))
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


# ---- code corpora -------------------------------------------------------------------------------

STDLIB_STEM = "python_stdlib"
# Never read: installed third-party packages (site-packages sits inside the stdlib folder on most
# installs, and its licences are not the PSF's), caches, and hidden folders such as .git or .venv.
SKIPPED_FOLDERS = frozenset({"site-packages", "dist-packages", "__pycache__"})
TEST_FOLDERS = frozenset({"test", "tests", "idle_test"})
# Codex (Chen et al. 2021) dropped GitHub files over 1 MB: past that size a .py file is data.
DEFAULT_MAX_FILE_BYTES = 1_000_000
# Control characters (other than tab, newlines, form feed) and U+FFFD (a failed decoding) do not
# occur in source code; a file where they pass this fraction is binary or data, not code.
NON_TEXT_CHARACTERS = re.compile("[\x00-\x08\x0e-\x1f\x7f\ufffd]")
NON_TEXT_LIMIT = 0.1
DROP_REASONS = ("empty", "too_large", "non_text", "undecodable")
# datasets >= 4 refuses Hub datasets that ship a loading script; the Hub keeps a parquet export of
# many of them under this revision.
HF_PARQUET_EXPORT = "hf://datasets/{name}@refs/convert/parquet/{config}/{split}/*.parquet"


@dataclass
class CodeReport:
    """What a code preparation kept and dropped; written beside the jsonl as NAME.report.json."""

    source: str
    out: str = ""
    files: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    kept_bytes: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    tests_excluded: int = 0
    line_endings_normalised: int = 0
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    seconds: float = 0.0

    @property
    def kept(self) -> int:
        return sum(self.files.values())

    def describe(self) -> str:
        """A few lines for the console."""
        splits = ", ".join(f"{name} {count:,}" for name, count in self.files.items())
        drops = self.dropped
        lines = [
            f"wrote {self.out} from {self.source} in {self.seconds:.1f} s",
            f"kept {self.kept:,} files ({self.kept_bytes / 1e6:,.1f} MB): {splits}",
            f"dropped {sum(drops.values()):,}: {drops['empty']:,} empty, {drops['too_large']:,} "
            f"over {self.max_file_bytes:,} bytes, {drops['non_text']:,} not text, "
            f"{drops['undecodable']:,} undecodable",
        ]
        if self.tests_excluded:
            lines.append(f"excluded {self.tests_excluded:,} test files (--include-tests adds them)")
        if self.line_endings_normalised:
            lines.append(
                f"normalised \\r\\n or \\r line endings in {self.line_endings_normalised:,}"
            )
        return "\n".join(lines)


def stdlib_dir() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def prepare_python_stdlib(
    out_dir: Path,
    *,
    include_tests: bool = False,
    max_files: int | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    split: str = "900,100,0",
) -> CodeReport:
    """The standard library's .py files (PSF licence, always offline) -> python_stdlib.jsonl."""
    root = stdlib_dir()
    report = CodeReport(source=f"{root} (Python {sys.version.split()[0]})")
    candidates = _python_files(root, include_tests, report)
    return _write_code_corpus(
        candidates, Path(out_dir) / f"{STDLIB_STEM}.jsonl", report, max_files, max_file_bytes, split
    )


def prepare_code(
    source: Path | None,
    out_dir: Path,
    *,
    text_field: str = "text",
    hf: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    include_tests: bool = False,
    max_files: int | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    split: str = "900,100,0",
    log: Callable[[str], None] = print,
) -> CodeReport:
    """Code from a folder of .py files, a jsonl (`text_field` of each record) or a Hugging Face
    dataset (`hf`: a Hub name, an hf:// parquet path or a local .parquet) -> STEM_code.jsonl.

    Folders split by the hash of each file's relative path; records by the hash of their text,
    so that copies of one text land in the same split.
    """
    if (source is None) == (hf is None):
        raise NeoxlabError(
            "give either a folder or .jsonl file, or --hf DATASET",
            hint="neoxlab prepare code DIR_OR_JSONL --field content, or --hf NAME --field F",
        )
    if hf is not None:
        report = CodeReport(source=hf + (f" ({hf_config}, {hf_split})" if hf_config else ""))
        candidates = _hf_records(hf, hf_config, hf_split, text_field, log)
        stem = _hf_stem(hf, hf_config)
    else:
        source = Path(source)
        report = CodeReport(source=str(source))
        if source.is_dir():
            if not any(source.iterdir()):
                raise NeoxlabError(f"{source} is an empty directory", hint="point at your code")
            candidates = _python_files(source, include_tests, report)
        elif source.is_file() and source.suffix == ".jsonl":
            candidates = _jsonl_records(source, text_field)
        elif source.exists():
            raise NeoxlabError(
                f"{source} is neither a directory nor a .jsonl file",
                hint="give a folder of .py files, a .jsonl with --field, or --hf for parquet",
            )
        else:
            raise NeoxlabError(f"no such file or directory: {source}")
        stem = source.resolve().name if source.is_dir() else source.stem
    out = Path(out_dir) / f"{stem}_code.jsonl"
    return _write_code_corpus(candidates, out, report, max_files, max_file_bytes, split)


def decode_python_source(raw: bytes) -> str | None:
    """Decode as Python does (BOM or PEP 263 coding line, else UTF-8), like tokenize.open;
    None when that fails."""
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        return raw.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return None


def split_of(key: str, fractions: tuple[float, float, float]) -> str:
    """The split of a document, from the sha256 of `key`: the same on every machine and run."""
    point = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    cumulative = 0.0
    for name, fraction in zip(SPLITS, fractions, strict=True):
        cumulative += fraction
        if point < cumulative:
            return name
    return [name for name, fraction in zip(SPLITS, fractions, strict=True) if fraction][-1]


def split_counts(total: int, split: str) -> tuple[int, int, int]:
    """How many of `total` documents go to train / validation / test (gpt-neox rounding)."""
    fractions = parse_split(split)
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + round(fraction * float(total)))
    diff = bounds[-1] - total
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    train, validation, test = (b - a for a, b in itertools.pairwise(bounds))
    return train, validation, test


# A candidate document: (path shown in the jsonl, key hashed for the split or None for the cleaned
# text, content). Content is bytes for files (decoded here), str for records, None for a null.
_Candidate = tuple[str, str | None, bytes | str | None]


def _write_code_corpus(
    candidates: Iterator[_Candidate],
    out: Path,
    report: CodeReport,
    max_files: int | None,
    max_file_bytes: int,
    split: str,
) -> CodeReport:
    if max_files is not None and max_files < 1:
        raise NeoxlabError(f"--max-files must be positive, got {max_files}")
    fractions = parse_split(split)
    report.max_file_bytes = max_file_bytes
    started = time.perf_counter()
    temporary = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    with output_folder(out.parent):  # a failed run leaves no new folder behind
        try:
            with open(temporary, "w", encoding="utf-8") as file:
                _write_records(candidates, file, report, max_files, max_file_bytes, fractions)
            _check_code_splits(report, fractions)
            os.replace(temporary, out)
        finally:
            temporary.unlink(missing_ok=True)  # nor a half-written corpus
    report.out = str(out)
    report.seconds = time.perf_counter() - started
    write_atomically(
        out.with_name(f"{out.name.removesuffix('.jsonl')}.report.json"),
        json.dumps({**asdict(report), "kept": report.kept}, indent=2) + "\n",
    )
    return report


def _write_records(
    candidates: Iterator[_Candidate],
    file: TextIO,
    report: CodeReport,
    max_files: int | None,
    max_file_bytes: int,
    fractions: tuple[float, float, float],
) -> None:
    """One jsonl record per kept candidate, counted in `report`, up to `max_files`."""
    for path, key, content in candidates:
        text = _clean(content, max_file_bytes, report)
        if text is None:
            continue
        name = split_of(text if key is None else key, fractions)
        report.files[name] += 1
        report.kept_bytes += len(text.encode("utf-8"))
        record = {"text": text, "split": name, "path": path}
        file.write(json.dumps(record, ensure_ascii=False) + "\n")
        if max_files is not None and report.kept >= max_files:
            break


def _clean(content: bytes | str | None, max_file_bytes: int, report: CodeReport) -> str | None:
    """The text to keep (line endings normalised), or None after counting why it was dropped."""
    size = len(content) if isinstance(content, bytes) else len((content or "").encode("utf-8"))
    if size > max_file_bytes:
        report.dropped["too_large"] += 1
        return None
    text = decode_python_source(content) if isinstance(content, bytes) else content or ""
    if text is None:
        report.dropped["undecodable"] += 1
        return None
    if not text.strip():
        report.dropped["empty"] += 1
        return None
    if len(NON_TEXT_CHARACTERS.findall(text)) > NON_TEXT_LIMIT * len(text):
        report.dropped["non_text"] += 1
        return None
    if "\r" in text:
        report.line_endings_normalised += 1
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _check_code_splits(report: CodeReport, fractions: tuple[float, float, float]) -> None:
    if report.kept == 0:
        seen = sum(report.dropped.values()) + report.tests_excluded
        if seen == 0:
            raise NeoxlabError(
                f"no .py files in {report.source}",
                hint="prepare code reads .py files from a folder; for other text give a .jsonl",
            )
        hint = "--include-tests adds test files" if report.tests_excluded else None
        raise NeoxlabError(
            f"no file kept from {report.source}: {report.tests_excluded} tests excluded, "
            + ", ".join(f"{count} {reason}" for reason, count in report.dropped.items()),
            hint=hint,
        )
    for name, fraction in zip(SPLITS[:2], fractions[:2], strict=True):
        if fraction and not report.files[name]:
            raise NeoxlabError(
                f"the {name} split got none of the {report.kept} files kept from "
                f"{report.source} (files are split by a hash of their path or text)",
                hint="use more files (a larger --max-files) or change --split",
            )


def _python_files(root: Path, include_tests: bool, report: CodeReport) -> Iterator[_Candidate]:
    """The .py files under `root` in a fixed order, as (relative path, relative path, bytes)."""
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(
            name for name in subfolders if name not in SKIPPED_FOLDERS and not name.startswith(".")
        )
        relative_folder = Path(folder).relative_to(root)
        in_tests = not TEST_FOLDERS.isdisjoint(relative_folder.parts)
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            if not include_tests and (in_tests or name.startswith("test_")):
                report.tests_excluded += 1
                continue
            relative = (relative_folder / name).as_posix()
            yield relative, relative, (Path(folder) / name).read_bytes()


def _jsonl_records(path: Path, text_field: str) -> Iterator[_Candidate]:
    found = False
    with open(path, "rb") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise NeoxlabError(f"{where}: not a JSON line ({error})") from None
            if not isinstance(record, dict):
                raise NeoxlabError(f"{where}: expected a JSON object, got {type(record).__name__}")
            text = _field_text(record, text_field, where)
            found = True
            yield f"{path.name}:{line_number}", None, text
    if not found:
        raise NeoxlabError(f"{path} holds no records", hint="write one JSON object per line")


def _field_text(record: dict, text_field: str, where: str) -> str | None:
    if text_field not in record:
        raise NeoxlabError(
            f"{where}: the record has no '{text_field}' field",
            hint=f"its fields are {sorted(record)}; choose one with --field",
        )
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise NeoxlabError(f"{where}: '{text_field}' must be a string, got {type(text).__name__}")
    return text


def _hf_records(
    spec: str, config: str | None, split: str, text_field: str, log: Callable[[str], None]
) -> Iterator[_Candidate]:
    try:
        import datasets
    except ImportError:
        raise NeoxlabError(
            "--hf needs the `datasets` package", hint='pip install "neoxlab[data]"'
        ) from None
    # Streaming reads only the records used (see --max-files) and writes no cache.
    if spec.startswith("hf://") or spec.endswith(".parquet"):
        dataset = _load_hf(datasets, spec, path="parquet", data_files=spec, split="train")
    else:
        try:
            dataset = _load_hf(datasets, spec, path=spec, name=config, split=split)
        except RuntimeError as error:
            if "scripts are no longer supported" not in str(error):
                raise
            export = HF_PARQUET_EXPORT.format(name=spec, config=config or "default", split=split)
            log(
                f"note: {spec} has a loading script, which datasets >= 4 cannot run; reading its "
                f"parquet export {export}"
            )
            dataset = _load_hf(datasets, spec, path="parquet", data_files=export, split="train")
    try:
        for index, record in enumerate(dataset):
            text = _field_text(record, text_field, f"{spec} record {index}")
            yield f"{spec}#{index}", None, text
    except OSError as error:
        raise NeoxlabError(f"could not read {spec}: {error}") from None


def _load_hf(datasets: types.ModuleType, spec: str, **kwargs: Any) -> Any:
    try:
        return datasets.load_dataset(streaming=True, **kwargs)
    except (OSError, ValueError) as error:
        # Offline, a missing dataset or file, an unknown config or split.
        raise NeoxlabError(
            f"could not load {spec}: {error}",
            hint="a Hub name needs the network; a local or hf:// .parquet path works too",
        ) from None


def _hf_stem(spec: str, config: str | None) -> str:
    if spec.startswith("hf://"):
        match = re.match(r"hf://datasets/[^/@]+/([^/@]+)", spec)
        stem = match.group(1) if match else "hf"
    elif spec.endswith(".parquet"):
        stem = Path(spec).stem
    else:
        stem = spec.rsplit("/", 1)[-1]
    return f"{stem}_{config}" if config else stem


def _download_verified(url: str, destination: Path, sha256: str) -> None:
    temporary = destination.with_name(f"{destination.name}.tmp-{os.getpid()}")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        file = open(temporary, "wb")  # noqa: SIM115 (closed by the with-block below)
    except OSError as error:
        raise _cache_error(destination, error) from None
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response, file:
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


def _keep_in_cache(origin: Path, cached: Path) -> Path:
    """`cached`, now a copy of the verified `origin`; `origin` itself when the cache cannot be
    written: the copy only spares later runs the download, it is no reason to stop this one."""
    if origin.resolve() == cached.resolve():
        return cached
    temporary = cached.with_name(f"{cached.name}.tmp-{os.getpid()}")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(origin, temporary)
        os.replace(temporary, cached)
    except OSError:
        with contextlib.suppress(OSError):  # there is none when the folder was not made
            temporary.unlink()
        return origin
    return cached


def _cache_error(path: Path, error: OSError) -> NeoxlabError:
    return NeoxlabError(
        f"could not write {path} in the neoxlab cache: {error.strerror or error}",
        hint="set NEOXLAB_CACHE to a folder you can write to",
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
