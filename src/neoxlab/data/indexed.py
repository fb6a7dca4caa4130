"""GPT-NeoX / Megatron mmap indexed datasets: token ids in PREFIX.bin, their index in PREFIX.idx.

Byte-compatible with what gpt-neox's tools/preprocess_data.py writes and reads, so either side can
train on the other's files. The .idx layout (all little-endian):

    9 bytes  magic b"MMIDIDX\\x00\\x00"
    u64      version (1)
    u8       dtype code of the tokens in .bin
    u64      n, the number of sequences
    u64      d, the length of doc_idx
    int32    sizes[n]      tokens per sequence
    int64    pointers[n]   byte offset of each sequence in .bin
    int64    doc_idx[d]    index of the first sequence of each document, then n

neoxlab writes one sequence per document, so doc_idx is [0, 1, ..., n], as gpt-neox does.
"""

from __future__ import annotations

import contextlib
import operator
import os
import struct
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from neoxlab.atomic import make_folders, remove_empty_folders, temporary_path, write_error
from neoxlab.errors import NeoxlabError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n sequences, len(doc_idx)

# Integer codes only: codes 6 and 7 are float types whose meaning differs between
# implementations (fairseq, gpt-neox, Megatron-LM), and token ids are integers anyway.
DTYPE_BY_CODE = {
    1: np.dtype("<u1"),
    2: np.dtype("<i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    8: np.dtype("<u2"),
}
CODE_BY_DTYPE = {dtype: code for code, dtype in DTYPE_BY_CODE.items()}
FLOAT_CODES = (6, 7)

PREPARE_HINT = (
    "make it with `neoxlab prepare jsonl FILES --tokenizer TOKENIZER.json --out PREFIX` "
    "(data-path is then PREFIX_text_document), or fix data-path"
)
CORRUPT_HINT = "the file is damaged or was not written by gpt-neox/neoxlab: prepare it again"
PAIR_ATTEMPTS = 3  # a pair replaced while it is opened is read again, up to this many times


def best_dtype(vocab_size: int) -> np.dtype:
    """The token dtype gpt-neox picks: uint16 while every id fits, else int32."""
    # gpt-neox's threshold, kept so that the same tokenizer gives byte-identical files.
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix: str | Path) -> Path:
    # Appended, not Path.with_suffix: prefixes such as "shakespeare.1a2b3c4d" contain dots.
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


class IndexedDatasetWriter:
    """Write PREFIX.bin / PREFIX.idx, one sequence per document, atomically.

    Tokens stream to a temporary .bin beside the final one (memory holds only the per-document
    sizes). `close()` (or leaving the with-block normally) writes the .idx and renames both into
    place; an exception in the with-block (or `discard()`) deletes the temporaries and leaves any
    existing PREFIX.bin / PREFIX.idx untouched. A failed write (disk full, no permission) is a
    NeoxlabError naming the file and the reason, with the temporaries already deleted.
    """

    def __init__(self, prefix: str | Path, dtype: npt.DTypeLike) -> None:
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype not in CODE_BY_DTYPE:
            supported = ", ".join(str(dtype) for dtype in CODE_BY_DTYPE)
            raise ValueError(f"cannot write tokens as {self.dtype}; use one of {supported}")
        self.bin_path = bin_path(prefix)
        self.idx_path = idx_path(prefix)
        # Same folder as the final files, so os.replace is an atomic rename.
        self._bin_temporary = temporary_path(self.bin_path)
        self._idx_temporary = temporary_path(self.idx_path)
        self._sizes = array("q")
        self._doc_idx = array("q", [0])
        self._created_folders: list[Path] = []  # removed again, when empty, by discard()
        try:
            self._created_folders = make_folders(self.bin_path.parent)
            # Open across add_document calls; close() or discard() closes it.
            self._bin_file = open(self._bin_temporary, "wb")  # noqa: SIM115
        except OSError as err:
            remove_empty_folders(self._created_folders)
            raise write_error(self.bin_path, err) from None
        self._closed = False

    def add_document(self, tokens: np.ndarray | Sequence[int]) -> None:
        """Append one document (its token ids, end-of-document token included if wanted)."""
        if self._closed:
            raise ValueError(f"writer for {self.bin_path} is already closed")
        values = np.asarray(tokens)
        if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
            raise ValueError(f"a document must be a 1-D sequence of integers, got {values.dtype}")
        if values.size:
            limits = np.iinfo(self.dtype)
            low, high = int(values.min()), int(values.max())
            if low < limits.min or high > limits.max:
                raise ValueError(
                    f"token id {high if high > limits.max else low} does not fit in {self.dtype}; "
                    "choose the dtype with best_dtype(vocab_size)"
                )
            if values.size > np.iinfo(np.int32).max:
                raise ValueError(f"a document of {values.size} tokens exceeds the int32 size field")
            try:
                self._bin_file.write(values.astype(self.dtype, copy=False).tobytes())
            except OSError as err:
                self.discard()
                raise write_error(self.bin_path, err) from None
            self._sizes.append(values.size)
        # gpt-neox ends a document even when it produced no sequence (an empty text without
        # an end-of-document token), which repeats the previous doc_idx entry; so do we.
        self._doc_idx.append(len(self._sizes))

    def close(self) -> None:
        """Finish: write the index and move both files into place."""
        if self._closed:
            return
        self._closed = True
        failing = self.bin_path  # the file a failure is reported for
        try:
            # fsync before the renames: after a power cut the new names never point at data
            # that did not reach the disk.
            self._bin_file.flush()
            os.fsync(self._bin_file.fileno())
            self._bin_file.close()
            failing = self.idx_path
            with open(self._idx_temporary, "wb") as index:
                index.write(self._index_bytes())
                index.flush()
                os.fsync(index.fileno())
            # Two renames are not one atomic step, and the .idx is what a reader opens first:
            # take the old one away before the new .bin goes in, so that whatever stops this
            # process (a kill, a failed rename), the .idx in place, if any, is the one written
            # for the .bin in place, never an old .idx beside a new .bin.
            self.idx_path.unlink(missing_ok=True)
            os.replace(self._bin_temporary, self.bin_path)
            os.replace(self._idx_temporary, self.idx_path)
        except OSError as err:
            self.discard()
            raise write_error(failing, err) from None

    def discard(self) -> None:
        """Abandon the write: delete the temporaries, keep whatever was in place before."""
        self._closed = True
        # Closing flushes what is buffered, which fails again on a full disk: the file is
        # thrown away anyway.
        with contextlib.suppress(OSError):
            self._bin_file.close()
        self._remove_temporaries()
        remove_empty_folders(self._created_folders)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def _index_bytes(self) -> bytes:
        sizes = np.frombuffer(self._sizes, dtype=np.int64)
        pointers = np.zeros(len(sizes), dtype="<i8")
        np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        header = HEADER.pack(
            MAGIC, VERSION, CODE_BY_DTYPE[self.dtype], len(sizes), len(self._doc_idx)
        )
        return b"".join(
            [
                header,
                sizes.astype("<i4").tobytes(),
                pointers.tobytes(),
                np.frombuffer(self._doc_idx, dtype=np.int64).astype("<i8").tobytes(),
            ]
        )

    def _remove_temporaries(self) -> None:
        self._bin_temporary.unlink(missing_ok=True)
        self._idx_temporary.unlink(missing_ok=True)


class IndexedDataset:
    """Read PREFIX.bin / PREFIX.idx through np.memmap; every inconsistency is a NeoxlabError.

    A writer replaces a pair as IndexedDatasetWriter does (old .idx removed, new .bin, new
    .idx), so the pair a reader opened is a matching one when the .idx it read is still the
    one in place once both files are open; otherwise it reads the new pair."""

    def __init__(self, prefix: str | Path) -> None:
        self.idx_path = idx_path(prefix)
        self.bin_path = bin_path(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise NeoxlabError(f"indexed dataset file not found: {path}", hint=PREPARE_HINT)
        for attempt in range(PAIR_ATTEMPTS):
            if self._open_pair():
                return
            time.sleep(0.01 * (attempt + 1))
        raise NeoxlabError(
            f"{self.idx_path} and {self.bin_path.name} were replaced while they were read",
            hint="another process is writing them: let it finish, then start again",
        )

    def _open_pair(self) -> bool:
        """Map the .idx, then the .bin; False when a writer replaced the pair meanwhile."""
        try:
            with open(self.idx_path, "rb") as index, open(self.bin_path, "rb") as tokens:
                self._dtype, self._sizes, self._pointers, self._doc_idx = _read_index(
                    index, self.idx_path
                )
                if not _still_in_place(index, self.idx_path):
                    return False
                self._tokens = self._map_tokens(tokens)
        except FileNotFoundError:  # between a writer's removal of the .idx and its rename
            return False
        return True

    def _map_tokens(self, tokens: BinaryIO) -> np.ndarray:
        _check_sequences(self.idx_path, self._dtype, self._sizes, self._pointers, self._doc_idx)
        expected_bytes = int(self._sizes.sum(dtype=np.int64)) * self._dtype.itemsize
        actual_bytes = os.fstat(tokens.fileno()).st_size
        if actual_bytes != expected_bytes:
            raise NeoxlabError(
                f"{self.bin_path} has {actual_bytes} bytes but its index {self.idx_path.name} "
                f"describes {expected_bytes}",
                hint=CORRUPT_HINT,
            )
        # np.memmap cannot map an empty file; an empty dataset is a valid (if useless) one.
        if not actual_bytes:
            return np.zeros(0, dtype=self._dtype)
        return np.memmap(tokens, dtype=self._dtype, mode="r")

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def sizes(self) -> np.ndarray:
        """Tokens per sequence (int32)."""
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        """Byte offset of each sequence in the .bin (int64)."""
        return self._pointers

    @property
    def doc_idx(self) -> np.ndarray:
        """Index of each document's first sequence, then the number of sequences (int64)."""
        return self._doc_idx

    @property
    def num_tokens(self) -> int:
        return int(self._tokens.size)

    @property
    def tokens(self) -> np.ndarray:
        """All token ids back to back, as one read-only 1-D memmap."""
        return self._tokens

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, index: int) -> np.ndarray:
        """The tokens of sequence `index`, a view into the memmap (negative indices count back)."""
        position = range(len(self))[operator.index(index)]
        start = int(self._pointers[position]) // self._dtype.itemsize
        return self._tokens[start : start + int(self._sizes[position])]


def _still_in_place(opened: BinaryIO, path: Path) -> bool:
    """`path` still names the file `opened` was opened from (not replaced, not removed)."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    then = os.fstat(opened.fileno())
    return (now.st_dev, now.st_ino) == (then.st_dev, then.st_ino)


def _read_index(file: BinaryIO, path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    header = file.read(HEADER.size)
    if header[: len(MAGIC)] != MAGIC:
        raise NeoxlabError(
            f"{path} is not a GPT-NeoX mmap index (it does not start with {MAGIC!r})",
            hint=CORRUPT_HINT,
        )
    if len(header) < HEADER.size:
        raise NeoxlabError(
            f"{path} is truncated: {len(header)} bytes, shorter than the {HEADER.size}-byte header",
            hint=CORRUPT_HINT,
        )
    _, version, code, count, doc_count = HEADER.unpack(header)
    if version != VERSION:
        raise NeoxlabError(
            f"{path} has index version {version}; neoxlab reads version {VERSION}",
            hint=CORRUPT_HINT,
        )
    if code in FLOAT_CODES:
        raise NeoxlabError(
            f"{path} stores tokens as float (dtype code {code}), whose meaning differs between "
            "implementations; token ids must be integers",
            hint="prepare the data again with integer token ids",
        )
    if code not in DTYPE_BY_CODE:
        raise NeoxlabError(f"{path} has an unknown dtype code {code}", hint=CORRUPT_HINT)
    # Checked before touching the arrays, in Python integers: a garbage header can claim
    # 2**64 sequences, which must not turn into an allocation or an overflow.
    expected = HEADER.size + count * (4 + 8) + doc_count * 8
    actual = os.fstat(file.fileno()).st_size
    if actual < expected:
        raise NeoxlabError(
            f"{path} is truncated: its header announces {count} sequences and {doc_count} "
            f"document entries ({expected} bytes), but the file has {actual} bytes",
            hint=CORRUPT_HINT,
        )
    if actual > expected:
        raise NeoxlabError(
            f"{path} has {actual - expected} bytes after the end of its index arrays",
            hint=CORRUPT_HINT,
        )
    content = np.memmap(file, dtype=np.uint8, mode="r")
    sizes = np.frombuffer(content, dtype="<i4", count=count, offset=HEADER.size)
    pointers_offset = HEADER.size + 4 * count
    pointers = np.frombuffer(content, dtype="<i8", count=count, offset=pointers_offset)
    doc_idx_offset = pointers_offset + 8 * count
    doc_idx = np.frombuffer(content, dtype="<i8", count=doc_count, offset=doc_idx_offset)
    return DTYPE_BY_CODE[code], sizes, pointers, doc_idx


def _check_sequences(
    path: Path, dtype: np.dtype, sizes: np.ndarray, pointers: np.ndarray, doc_idx: np.ndarray
) -> None:
    if sizes.size and int(sizes.min()) < 0:
        bad = int(np.argmax(sizes < 0))
        raise NeoxlabError(
            f"{path}: sequence {bad} has a negative size {int(sizes[bad])}", hint=CORRUPT_HINT
        )
    # Sequences lie back to back from offset 0; anything else means a damaged index.
    expected = np.zeros(sizes.size, dtype=np.int64)
    np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=expected[1:])
    mismatched = np.flatnonzero(pointers != expected)
    if mismatched.size:
        bad = int(mismatched[0])
        raise NeoxlabError(
            f"{path}: sequence {bad} starts at byte {int(pointers[bad])}, but the sizes before "
            f"it put it at byte {int(expected[bad])}",
            hint=CORRUPT_HINT,
        )
    if doc_idx.size and (
        int(doc_idx.min()) < 0 or int(doc_idx.max()) > sizes.size or np.any(np.diff(doc_idx) < 0)
    ):
        raise NeoxlabError(
            f"{path}: the document index is not an increasing list of sequence numbers "
            f"between 0 and {sizes.size}",
            hint=CORRUPT_HINT,
        )
