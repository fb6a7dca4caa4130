"""`neoxlab prepare jsonl`: gpt-neox-identical .bin/.idx from plain, gzip and zstd jsonl."""

import gzip
import json
import struct

import numpy as np
import pytest
import zstandard

from neoxlab.cli import main
from neoxlab.data.indexed import IndexedDataset
from neoxlab.data.jsonl import prepare_jsonl, read_chunks
from neoxlab.tokenizer import train_bpe

TEXTS = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "All: Speak, speak.",
    "",  # gpt-neox skips empty texts
    "Ünïcödé — and\nnew lines\ttoo.",
    "You are all resolved rather to die than to famish?",
    "Resolved. resolved.",
]


@pytest.fixture
def tokenizer_file(tmp_path):
    tokenizer = train_bpe([" ".join(TEXTS) * 20], vocab_size=300)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def write_lines(path, lines: list[str]) -> None:
    data = "".join(f"{line}\n" for line in lines).encode()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    elif path.name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path.write_bytes(data)


@pytest.fixture
def corpus(tmp_path):
    """Six records over three files of three formats, in a folder (read in sorted order)."""
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    records = [json.dumps({"text": t, "meta": {"i": i}}) for i, t in enumerate(TEXTS)]
    write_lines(folder / "a.jsonl", records[:2])
    write_lines(folder / "b.jsonl.gz", records[2:4])
    write_lines(folder / "sub" / "c.jsonl.zst", [*records[4:], ""])  # a blank line is no record
    (folder / "notes.txt").write_text("not a corpus file")
    return folder


def reference_files(texts: list[str], tokenizer_file, append_eod: bool) -> tuple[bytes, bytes]:
    """What gpt-neox's preprocess_data.py writes, built from the format's definition."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eod = tokenizer.token_to_id("<|endoftext|>")
    documents = [tokenizer.encode(t).ids + ([eod] if append_eod else []) for t in texts if t]
    sizes = [len(d) for d in documents]
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1]) * 2])  # uint16 tokens: 2 bytes each
    header = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
    header += struct.pack("<QQ", len(sizes), len(sizes) + 1)
    index = (
        header
        + np.asarray(sizes, "<i4").tobytes()
        + np.asarray(pointers, "<i8").tobytes()
        + np.arange(len(sizes) + 1, dtype="<i8").tobytes()
    )
    tokens = np.concatenate([np.asarray(d, "<u2") for d in documents]).tobytes()
    return tokens, index


@pytest.mark.parametrize("workers", [1, 2])
def test_writes_gpt_neox_files_byte_for_byte(corpus, tokenizer_file, tmp_path, workers):
    result = prepare_jsonl(
        [corpus], tokenizer_file, tmp_path / "out" / "c4", workers=workers, progress=False
    )
    prefix = tmp_path / "out" / "c4_text_document"
    assert result.prefix == prefix
    assert [p.name for p in result.files] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst"]
    tokens, index = reference_files(TEXTS, tokenizer_file, append_eod=True)
    assert (tmp_path / "out" / "c4_text_document.bin").read_bytes() == tokens
    assert (tmp_path / "out" / "c4_text_document.idx").read_bytes() == index
    assert result.documents == 5 and result.empty == 1
    assert result.tokens == len(tokens) // 2
    assert IndexedDataset(prefix)[0][-1] == 0  # <|endoftext|> ends each document


def test_text_key_and_no_eod(tmp_path, tokenizer_file):
    source = tmp_path / "docs.jsonl"
    write_lines(source, [json.dumps({"content": t}) for t in TEXTS])
    prepare_jsonl(
        [source],
        tokenizer_file,
        tmp_path / "x",
        text_key="content",
        append_eod=False,
        progress=False,
    )
    tokens, index = reference_files(TEXTS, tokenizer_file, append_eod=False)
    assert (tmp_path / "x_content_document.bin").read_bytes() == tokens
    assert (tmp_path / "x_content_document.idx").read_bytes() == index


def test_chunks_keep_line_numbers(tmp_path):
    source = tmp_path / "n.jsonl"
    write_lines(source, [json.dumps({"text": f"line {i}"}) for i in range(1, 8)])
    chunks = list(read_chunks([source], chunk_bytes=40))
    assert len(chunks) > 2
    for chunk in chunks:
        for offset, line in enumerate(chunk.lines):
            assert json.loads(line)["text"] == f"line {chunk.first_line + offset}"


def bad_corpus(tmp_path):
    source = tmp_path / "bad.jsonl"
    write_lines(
        source,
        [
            json.dumps({"text": "fine"}),
            json.dumps({"text": "also fine"}),
            '{"text": "broken',
            json.dumps({"title": "no text key"}),
            json.dumps({"text": 42}),
            json.dumps({"text": "last"}),
        ],
    )
    return source


def test_bad_line_fails_and_leaves_nothing(tmp_path, tokenizer_file, capsys):
    source = bad_corpus(tmp_path)
    out = tmp_path / "out"
    code = main(
        [
            "prepare",
            "jsonl",
            str(source),
            "--tokenizer",
            str(tokenizer_file),
            "--out",
            str(out / "bad"),
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"{source}:3: invalid JSON (Invalid control character at: column 17)" in err
    assert "--on-error skip" in err
    assert not out.exists()  # not even the folder --out named


def test_a_cut_off_zstd_file_is_named_as_such(tmp_path, tokenizer_file, capsys):
    """A .jsonl.zst whose download stopped: zstandard's stream reader ends quietly mid-frame,
    and the cut line used to be reported as invalid JSON."""
    source = tmp_path / "cut.jsonl.zst"
    records = [json.dumps({"text": f"record {i} " * 8}) for i in range(3000)]
    write_lines(source, records)
    whole = source.read_bytes()
    source.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out" / "cut"
    argv = ["prepare", "jsonl", str(source), "--tokenizer", str(tokenizer_file), "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {source}: the compressed stream is cut off" in err, err
    assert "download or copy it again" in err and not out.parent.exists()
    # frames one after another (as pzstd and zstd -B write them) are one stream
    compressor = zstandard.ZstdCompressor()
    data = [f"{line}\n".encode() for line in records]
    source.write_bytes(
        compressor.compress(b"".join(data[:1000])) + compressor.compress(b"".join(data[1000:]))
    )
    assert [line for chunk in read_chunks([source]) for line in chunk.lines] == data


def test_bad_lines_skipped_and_reported(tmp_path, tokenizer_file, capsys):
    source = bad_corpus(tmp_path)
    code = main(
        [
            "prepare",
            "jsonl",
            str(source),
            "--tokenizer",
            str(tokenizer_file),
            "--out",
            str(tmp_path / "ok"),
            "--on-error",
            "skip",
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert f"{source}:3: invalid JSON" in out
    assert f"{source}:4: no 'text' key" in out
    assert f"{source}:5: 'text' is int, not text" in out
    assert "3 documents" in out and "3 bad lines skipped" in out and "MB/s" in out
    assert len(IndexedDataset(tmp_path / "ok_text_document")) == 3


def test_missing_and_unsupported_inputs(tmp_path, tokenizer_file, capsys):
    (tmp_path / "data.csv").write_text("a,b")
    for given in (tmp_path / "missing.jsonl", tmp_path / "data.csv"):
        code = main(
            [
                "prepare",
                "jsonl",
                str(given),
                "--tokenizer",
                str(tokenizer_file),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        assert code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "is not a jsonl file" in err
