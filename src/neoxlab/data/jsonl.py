"""`neoxlab prepare jsonl`: jsonl corpora (plain, .gz, .zst) -> one GPT-NeoX .bin/.idx, streamed.

`.json` files are read as JSON lines too (C4 ships `c4-train.*.json.gz`, one record a line).

Writes what gpt-neox's tools/datasets/preprocess_data.py writes for the same tokenizer.json and
key: each record's text encoded as HF tokenizers encode it (`Tokenizer.encode(text).ids`, as
gpt-neox's HFTokenizer does), the end-of-document token appended, empty texts skipped, one
sequence per document, token dtype by vocabulary size, `PREFIX_{key}_document.bin/.idx`.

Memory stays flat whatever the corpus size: files are read line by line in ~1 MB chunks, at most
two chunks per worker are in flight, and tokens go straight to the .bin (the writer keeps only the
per-document sizes). Chunks are tokenized with `encode_batch_fast` (Rust threads) in this
process, or in worker processes, and written back in input order, so the output does not depend
on --workers.
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import zstandard
from tokenizers import Tokenizer
from tqdm import tqdm

from neoxlab.data.indexed import IndexedDatasetWriter, best_dtype
from neoxlab.errors import NeoxlabError
from neoxlab.tokenizer import load_tokenizer, token_id

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")
CHUNK_BYTES = 1 << 20
ZSTD_READ_BYTES = 1 << 17  # compressed bytes per read: a few MB once decompressed
ON_ERROR = ("fail", "skip")
REPORTED_BAD_LINES = 20  # with --on-error skip, the first ones are printed; all are counted


@dataclass
class Chunk:
    """Consecutive raw lines of one file; `first_line` is the 1-based number of lines[0]."""

    path: str
    first_line: int
    lines: list[bytes]


@dataclass
class EncodedChunk:
    tokens: np.ndarray  # every document's ids (and eod) back to back
    sizes: list[int]  # tokens per document
    bad_lines: list[str]  # "file:line: reason"
    empty: int  # records whose text is empty (skipped, as gpt-neox skips them)
    text_bytes: int


@dataclass
class PrepareResult:
    prefix: Path
    files: list[Path]
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    empty: int = 0
    bad_lines: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, encoded: EncodedChunk) -> None:
        """Count one written chunk (its bad lines are counted as they are reported)."""
        self.documents += len(encoded.sizes)
        self.tokens += len(encoded.tokens)
        self.text_bytes += encoded.text_bytes
        self.empty += encoded.empty

    @property
    def megabytes_per_second(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)


def input_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Files to read, in order: each given file, and each folder's jsonl files sorted by path."""
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
            if not found:
                raise NeoxlabError(f"{path} holds no {', '.join(SUFFIXES)} files")
            files += found
        elif path.is_file():
            if not path.name.endswith(SUFFIXES):
                raise NeoxlabError(
                    f"{path} is not a jsonl file",
                    hint=f"give files ending in {', '.join(SUFFIXES)}",
                )
            files.append(path)
        else:
            raise NeoxlabError(f"input {path} does not exist")
    return files


def _open_binary(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        return io.BufferedReader(ZstdFrames(path))
    return open(path, "rb")


class ZstdFrames(io.RawIOBase):
    """A .zst file decompressed as it is read, frame after frame (never held whole in memory).

    A file that ends inside a frame (a download or copy cut short) raises EOFError, as gzip
    does; zstandard's own stream_reader just stops there, and the cut line looked like bad JSON.
    """

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame: Any = None  # the decompressobj of the frame being read; None between frames
        self._ready = memoryview(b"")  # decompressed, not yet read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._ready:
            compressed = self._file.read(ZSTD_READ_BYTES)
            if not compressed:
                if self._frame is not None:
                    raise EOFError("the compressed stream is cut off (the file ends mid-frame)")
                return 0
            self._ready = memoryview(self._decompress(compressed))
        count = min(len(buffer), len(self._ready))
        buffer[:count] = self._ready[:count]
        self._ready = self._ready[count:]  # a view: no copy of the rest
        return count

    def _decompress(self, compressed: bytes) -> bytes:
        parts = []
        while compressed:
            if self._frame is None:
                self._frame = self._decompressor.decompressobj()
            parts.append(self._frame.decompress(compressed))
            if not self._frame.eof:
                break
            compressed, self._frame = self._frame.unused_data, None  # the next frame's bytes
        return b"".join(parts)

    def close(self) -> None:
        self._file.close()
        super().close()


def read_chunks(files: Sequence[Path], chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    for path in files:
        try:
            with _open_binary(path) as handle:
                lines: list[bytes] = []
                size, first = 0, 1
                for number, line in enumerate(handle, start=1):
                    lines.append(line)
                    size += len(line)
                    if size >= chunk_bytes:
                        yield Chunk(str(path), first, lines)
                        lines, size, first = [], 0, number + 1
                if lines:
                    yield Chunk(str(path), first, lines)
        except EOFError as err:
            hint = "the file is incomplete: download or copy it again"
            raise NeoxlabError(f"cannot read {path}: {err}", hint=hint) from None
        except (OSError, zstandard.ZstdError) as err:
            raise NeoxlabError(f"cannot read {path}: {err}") from None


# ---- tokenizing (in this process or in workers) -----------------------------------------------

_worker: dict = {}


def _init_worker(tokenizer_file: str, text_key: str, eod_id: int | None, dtype: str) -> None:
    if multiprocessing.parent_process() is not None:
        # Worker processes are the parallelism: one Rust thread each, no oversubscription.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(
        tokenizer=Tokenizer.from_file(tokenizer_file),
        text_key=text_key,
        eod_id=eod_id,
        dtype=np.dtype(dtype),
    )


def encode_chunk(chunk: Chunk) -> EncodedChunk:
    """Parse and tokenize one chunk with the state `_init_worker` set."""
    key = _worker["text_key"]
    named_json = ".jsonl" not in Path(chunk.path).name  # C4's .json(.gz): JSON lines as well
    json_hint = " (a .json input must hold one record per line)" if named_json else ""
    texts: list[str] = []
    bad: list[str] = []
    empty = text_bytes = 0
    for offset, raw in enumerate(chunk.lines):
        where = f"{chunk.path}:{chunk.first_line + offset}"
        text_bytes += len(raw)
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except UnicodeDecodeError:
            bad.append(f"{where}: not UTF-8")
            continue
        except json.JSONDecodeError as err:
            bad.append(f"{where}: invalid JSON ({err.msg}: column {err.colno}){json_hint}")
            continue
        if not isinstance(record, dict) or key not in record:
            bad.append(f"{where}: no {key!r} key")
            continue
        text = record[key]
        if not isinstance(text, str):
            bad.append(f"{where}: {key!r} is {type(text).__name__}, not text")
            continue
        if not text:
            empty += 1
            continue
        texts.append(text)
    eod_id = _worker["eod_id"]
    # Default add_special_tokens, as gpt-neox's HFTokenizer.tokenize calls encode(text). The
    # _fast variant gives the same ids without tracking character offsets, which nothing here
    # reads: 15-25% faster (bench/prepare_jsonl.py measures both).
    encodings = _worker["tokenizer"].encode_batch_fast(texts) if texts else []
    end = [] if eod_id is None else [eod_id]
    ids = [[*encoding.ids, *end] for encoding in encodings]
    sizes = [len(document) for document in ids]
    tokens = np.fromiter(
        (token for document in ids for token in document), dtype=_worker["dtype"], count=sum(sizes)
    )
    return EncodedChunk(tokens, sizes, bad, empty, text_bytes)


def _encoded_in_order(
    chunks: Iterator[Chunk], workers: int, init_args: tuple
) -> Iterator[EncodedChunk]:
    if workers <= 1:
        _init_worker(*init_args)
        yield from map(encode_chunk, chunks)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode_chunk, (chunk,)))
            # Bounded look-ahead: reading never runs far ahead of tokenizing.
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---- the command ------------------------------------------------------------------------------


def output_prefix(out: str | Path, text_key: str) -> Path:
    """gpt-neox's naming: `{out}_{key}_document`."""
    return Path(f"{out}_{text_key}_document")


def prepare_jsonl(
    inputs: Sequence[str | Path],
    tokenizer_file: str | Path,
    out: str | Path,
    *,
    text_key: str = "text",
    append_eod: bool = True,
    eod_token: str = "<|endoftext|>",
    workers: int = 1,
    on_error: str = "fail",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PrepareResult:
    """Tokenize every record of `inputs` into `{out}_{text_key}_document.bin/.idx`.

    A bad line (invalid JSON, missing key, text not a string) fails the run (`on_error="fail"`:
    nothing is left on disk) or is reported and skipped (`"skip"`).
    """
    _check_options(on_error, workers)
    files = input_files(inputs)
    tokenizer_path = Path(tokenizer_file).expanduser()
    tokenizer = load_tokenizer(tokenizer_path)
    eod_id = token_id(tokenizer, eod_token) if append_eod else None
    dtype = best_dtype(tokenizer.get_vocab_size())
    result = PrepareResult(output_prefix(out, text_key), files)
    init_args = (str(tokenizer_path), text_key, eod_id, dtype.str)
    bar = tqdm(unit=" docs", disable=not progress, mininterval=1.0, file=sys.stderr)
    start = time.perf_counter()
    try:
        with IndexedDatasetWriter(result.prefix, dtype) as writer:
            chunks = read_chunks(files)
            for encoded in _encoded_in_order(chunks, workers, init_args):
                _take_bad_lines(encoded.bad_lines, result, on_error, log)
                _write_documents(writer, encoded)
                result.add(encoded)
                result.seconds = time.perf_counter() - start
                _show_progress(bar, len(encoded.sizes), result)
            if not result.documents:  # raised inside the writer: it writes nothing
                raise _no_text_error(result, text_key)
    finally:
        bar.close()
    result.seconds = time.perf_counter() - start
    return result


def _check_options(on_error: str, workers: int) -> None:
    if on_error not in ON_ERROR:
        raise NeoxlabError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if workers < 1:
        raise NeoxlabError(f"--workers must be at least 1, got {workers}")


def _take_bad_lines(
    bad_lines: list[str], result: PrepareResult, on_error: str, log: Callable[[str], None]
) -> None:
    """Fail on the first bad line, or report the first few and count them all."""
    if not bad_lines:
        return
    if on_error == "fail":
        raise NeoxlabError(
            f"{bad_lines[0]}; nothing was written",
            hint="fix the line, or pass --on-error skip to skip bad lines",
        )
    for line in bad_lines:
        if len(result.bad_lines) < REPORTED_BAD_LINES:
            log(f"skipping {line}")
        result.bad_lines.append(line)


def _write_documents(writer: IndexedDatasetWriter, encoded: EncodedChunk) -> None:
    offset = 0
    for size in encoded.sizes:
        writer.add_document(encoded.tokens[offset : offset + size])
        offset += size


def _show_progress(bar: tqdm, documents: int, result: PrepareResult) -> None:
    bar.update(documents)
    bar.set_postfix_str(
        f"{result.tokens:,} tokens, {result.megabytes_per_second:.1f} MB/s", refresh=False
    )


def _no_text_error(result: PrepareResult, text_key: str) -> NeoxlabError:
    return NeoxlabError(
        f"no text in {', '.join(map(str, result.files))} ({result.empty} empty texts, "
        f"{len(result.bad_lines)} bad lines); nothing was written",
        hint=f"each line should be a JSON object with a non-empty {text_key!r}",
    )
