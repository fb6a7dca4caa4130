import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neoxlab.data.indexed import IndexedDataset, IndexedDatasetWriter, best_dtype
from neoxlab.errors import NeoxlabError

# Two documents [5, 6, 7] and [65000] as uint16, worked out by hand from the gpt-neox layout.
EXPECTED_IDX = bytes.fromhex(
    "4d4d49444944580000"  # magic b"MMIDIDX\0\0"
    "0100000000000000"  # version 1
    "08"  # dtype code 8 = uint16
    "0200000000000000"  # 2 sequences
    "0300000000000000"  # doc_idx has 3 entries
    "03000000 01000000"  # sizes (int32)
    "0000000000000000 0600000000000000"  # byte pointers (int64)
    "0000000000000000 0100000000000000 0200000000000000"  # doc_idx (int64)
)
EXPECTED_BIN = bytes.fromhex("0500 0600 0700 e8fd")


def write(prefix, documents, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for document in documents:
            writer.add_document(document)


@pytest.fixture
def tiny(tmp_path):
    prefix = tmp_path / "tiny"
    write(prefix, [[5, 6, 7], np.array([65000])])
    return prefix


def test_best_dtype():
    assert best_dtype(50304) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32


def test_layout_is_byte_exact(tiny):
    assert tiny.with_name("tiny.idx").read_bytes() == EXPECTED_IDX
    assert tiny.with_name("tiny.bin").read_bytes() == EXPECTED_BIN


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 70000, size=length) for length in (1, 17, 300, 2)]
    prefix = tmp_path / "corpus.1a2b3c4d"  # a dot in the prefix must not become a suffix
    write(prefix, documents, np.int32)
    dataset = IndexedDataset(prefix)
    assert dataset.dtype == np.int32
    assert len(dataset) == 4
    assert dataset.sizes.dtype == np.int32
    assert dataset.sizes.tolist() == [1, 17, 300, 2]
    assert dataset.pointers.tolist() == [0, 4, 72, 1272]
    assert dataset.doc_idx.tolist() == [0, 1, 2, 3, 4]
    assert dataset.num_tokens == 320
    for index, document in enumerate(documents):
        np.testing.assert_array_equal(dataset[index], document)
    np.testing.assert_array_equal(dataset[-1], documents[-1])
    np.testing.assert_array_equal(dataset.tokens, np.concatenate(documents))
    with pytest.raises(IndexError):
        dataset[4]


def test_reads_every_integer_dtype(tmp_path):
    for dtype in (np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16):
        write(tmp_path / "d", [[1, 2], [3]], dtype)
        dataset = IndexedDataset(tmp_path / "d")
        assert dataset.dtype == dtype
        assert dataset.tokens.tolist() == [1, 2, 3]


def test_empty_document_repeats_doc_idx_as_gpt_neox(tmp_path):
    write(tmp_path / "d", [[1], [], [2, 3]])
    dataset = IndexedDataset(tmp_path / "d")
    assert dataset.sizes.tolist() == [1, 2]
    assert dataset.doc_idx.tolist() == [0, 1, 1, 2]


def test_empty_dataset(tmp_path):
    write(tmp_path / "d", [])
    dataset = IndexedDataset(tmp_path / "d")
    assert len(dataset) == 0
    assert dataset.num_tokens == 0


def test_writer_rejects_ids_that_do_not_fit(tmp_path):
    with (
        pytest.raises(ValueError, match="70000 does not fit in uint16"),
        IndexedDatasetWriter(tmp_path / "d", np.uint16) as writer,
    ):
        writer.add_document([1, 70000])
    with pytest.raises(ValueError, match="cannot write tokens as float32"):
        IndexedDatasetWriter(tmp_path / "d", np.float32)


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), IndexedDatasetWriter(tmp_path / "d", np.uint16) as writer:
        writer.add_document([1, 2, 3])
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_files(tiny):
    with pytest.raises(RuntimeError), IndexedDatasetWriter(tiny, np.int32) as writer:
        writer.add_document(list(range(1000)))
        raise RuntimeError("interrupted")
    assert sorted(path.name for path in tiny.parent.iterdir()) == ["tiny.bin", "tiny.idx"]
    assert tiny.with_name("tiny.idx").read_bytes() == EXPECTED_IDX
    assert tiny.with_name("tiny.bin").read_bytes() == EXPECTED_BIN


def test_temporaries_sit_beside_the_final_files_until_close(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "d", np.uint16)
    writer.add_document([1])
    assert [path.name for path in tmp_path.iterdir()] == [f"d.bin.tmp-{os.getpid()}"]
    writer.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d.bin", "d.idx"]


# --- corruption: every damaged file is a NeoxlabError that names the file ---------------------


def corrupt(prefix, *, idx=None, bin=None):
    if idx is not None:
        prefix.with_name("tiny.idx").write_bytes(idx)
    if bin is not None:
        prefix.with_name("tiny.bin").write_bytes(bin)


def replace_at(data, offset, new):
    return data[:offset] + new + data[offset + len(new) :]


SIZES_AT = 34
POINTERS_AT = SIZES_AT + 2 * 4
DOC_IDX_AT = POINTERS_AT + 2 * 8


@pytest.mark.parametrize(
    ("idx", "bin", "message"),
    [
        (b"TNTIDX\x00\x00" + EXPECTED_IDX[8:], None, r"tiny\.idx is not a GPT-NeoX mmap index"),
        (EXPECTED_IDX[:20], None, r"tiny\.idx is truncated: 20 bytes"),
        (EXPECTED_IDX[:5], None, r"tiny\.idx is not a GPT-NeoX mmap index"),
        (b"", None, r"tiny\.idx is not a GPT-NeoX mmap index"),
        (replace_at(EXPECTED_IDX, 9, struct.pack("<Q", 2)), None, "index version 2"),
        (replace_at(EXPECTED_IDX, 17, b"\x06"), None, "float .dtype code 6"),
        (replace_at(EXPECTED_IDX, 17, b"\x07"), None, "float .dtype code 7"),
        (replace_at(EXPECTED_IDX, 17, b"\x09"), None, "unknown dtype code 9"),
        (replace_at(EXPECTED_IDX, 18, struct.pack("<Q", 3)), None, "announces 3 sequences"),
        (replace_at(EXPECTED_IDX, 18, b"\xff" * 8), None, r"tiny\.idx is truncated"),
        (EXPECTED_IDX[:-4], None, r"tiny\.idx is truncated"),
        (EXPECTED_IDX + b"\x00", None, "1 bytes after the end"),
        (replace_at(EXPECTED_IDX, SIZES_AT, struct.pack("<i", -1)), None, "negative size"),
        (
            replace_at(EXPECTED_IDX, POINTERS_AT + 8, struct.pack("<q", 8)),
            None,
            "sequence 1 starts at byte 8",
        ),
        (
            replace_at(EXPECTED_IDX, POINTERS_AT + 8, struct.pack("<q", 1 << 62)),
            None,
            "sequence 1 starts at byte",
        ),
        (
            replace_at(EXPECTED_IDX, DOC_IDX_AT + 16, struct.pack("<q", 3)),
            None,
            "document index",
        ),
        (None, EXPECTED_BIN[:-2], r"tiny\.bin has 6 bytes .* describes 8"),
        (None, EXPECTED_BIN + b"\x00\x00", r"tiny\.bin has 10 bytes"),
        (replace_at(EXPECTED_IDX, SIZES_AT, struct.pack("<i", 4)), None, "sequence 1 starts"),
    ],
)
def test_corrupt_files_raise_neoxlab_error(tiny, idx, bin, message):
    corrupt(tiny, idx=idx, bin=bin)
    with pytest.raises(NeoxlabError, match=message):
        IndexedDataset(tiny)


@pytest.mark.parametrize("missing", ["tiny.idx", "tiny.bin"])
def test_missing_files(tiny, missing):
    tiny.with_name(missing).unlink()
    with pytest.raises(NeoxlabError, match=f"not found: .*{missing}") as caught:
        IndexedDataset(tiny)
    assert "prepare" in caught.value.hint


# --- fuzzing: any bytes either load or raise NeoxlabError, never a numpy/struct error ----------


def load_everything(prefix):
    try:
        dataset = IndexedDataset(prefix)
    except NeoxlabError:
        return
    for index in range(len(dataset)):
        assert dataset[index].size == dataset.sizes[index]
    assert dataset.num_tokens == int(dataset.sizes.sum())


FUZZ_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ_SETTINGS
@given(idx=st.binary(max_size=200), bin=st.binary(max_size=32), with_magic=st.booleans())
def test_random_bytes_never_crash(tiny, idx, bin, with_magic):
    # With the right magic the fuzzing reaches past the first check.
    corrupt(tiny, idx=EXPECTED_IDX[:9] + idx if with_magic else idx, bin=bin)
    load_everything(tiny)


@FUZZ_SETTINGS
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(EXPECTED_IDX) - 1), st.integers(0, 255)), max_size=4
    ),
    cut=st.integers(0, len(EXPECTED_IDX) + 8),
    bin_size=st.integers(0, 16),
)
def test_mutated_index_never_crashes(tiny, edits, cut, bin_size):
    data = bytearray(EXPECTED_IDX + b"\x00" * 8)
    for offset, value in edits:
        data[offset] = value
    corrupt(tiny, idx=bytes(data[:cut]), bin=(EXPECTED_BIN * 2)[:bin_size])
    load_everything(tiny)
