import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from neoxlab.cli import main
from neoxlab.data.corpora import (
    SHAKESPEARE_SHA256,
    SHAKESPEARE_URL,
    Document,
    cache_dir,
    fetch_shakespeare,
    read_jsonl_documents,
    write_shakespeare_jsonl,
)
from neoxlab.errors import NeoxlabError


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test writes to the home cache, sees the caller's mirror, or reaches the network."""
    monkeypatch.setenv("NEOXLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NEOXLAB_DATA_MIRROR", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def test_cache_dir_order(tmp_path, monkeypatch):
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("NEOXLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "neoxlab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "neoxlab"


def test_fetch_from_mirror_verifies_and_caches(shakespeare_mirror, monkeypatch, tmp_path):
    monkeypatch.setenv("NEOXLAB_DATA_MIRROR", str(shakespeare_mirror))
    path = fetch_shakespeare()
    assert path == tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    assert path.read_bytes() == (shakespeare_mirror / "tinyshakespeare" / "input.txt").read_bytes()
    # Next time the verified cache serves it, with no mirror and no network.
    monkeypatch.delenv("NEOXLAB_DATA_MIRROR")
    assert fetch_shakespeare() == path


def test_fetch_from_explicit_source(shakespeare_mirror, tmp_path, monkeypatch, capsys):
    """The source itself is used (and named); the cache gets a copy when it can be written."""
    source = shakespeare_mirror / "tinyshakespeare" / "input.txt"
    assert fetch_shakespeare(str(source)) == source
    cached = tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    assert cached.read_bytes() == source.read_bytes()
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("NEOXLAB_CACHE", str(tmp_path / "not-a-folder"))
    assert main(["prepare", "shakespeare", "--source", str(source), "--out", "d"]) == 0
    assert f"wrote d/shakespeare.jsonl (from {source})" in capsys.readouterr().out
    # without a source, a cache that cannot be written is one line, not a traceback
    assert main(["prepare", "shakespeare", "--out", "d"]) == 2
    err = capsys.readouterr().err
    assert "in the neoxlab cache: Not a directory (hint: set NEOXLAB_CACHE" in err, err


def test_fetch_missing_source(tmp_path):
    with pytest.raises(NeoxlabError, match=r"source not found: .*absent\.txt"):
        fetch_shakespeare(tmp_path / "absent.txt")


def test_fetch_mirror_without_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NEOXLAB_DATA_MIRROR", str(tmp_path / "empty"))
    with pytest.raises(NeoxlabError, match="NEOXLAB_DATA_MIRROR"):
        fetch_shakespeare()


def test_fetch_corrupted_source_names_both_hashes(shakespeare_text, tmp_path):
    source = tmp_path / "input.txt"
    source.write_text(shakespeare_text.replace("Citizen", "Citizan", 1), encoding="utf-8")
    with pytest.raises(NeoxlabError, match=f"input.txt has sha256 .*expected {SHAKESPEARE_SHA256}"):
        fetch_shakespeare(source)
    assert not (tmp_path / "cache" / "tinyshakespeare" / "input.txt").exists()


def test_offline_without_copy_says_how_to_supply_one(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(NeoxlabError) as caught:
        fetch_shakespeare()
    assert caught.value.message == (
        f"could not download Tiny Shakespeare from {SHAKESPEARE_URL}: "
        "[Errno -3] Temporary failure in name resolution"
    )
    assert "--source FILE" in caught.value.hint
    assert "NEOXLAB_DATA_MIRROR" in caught.value.hint


class FakeResponse:
    """Stands in for urlopen's response: a readable context manager."""

    def __init__(self, content):
        self.content = content

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None

    def read(self, size=-1):
        chunk, self.content = self.content[:size], self.content[size:]
        return chunk


def test_download_is_verified_then_cached(shakespeare_text, monkeypatch, tmp_path):
    requests = []

    def serve(url, timeout):
        requests.append((url, timeout))
        return FakeResponse(shakespeare_text.encode())

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    path = fetch_shakespeare()
    assert requests == [(SHAKESPEARE_URL, 30)]
    assert path.read_text(encoding="utf-8") == shakespeare_text
    # A damaged cached copy is downloaded again.
    path.write_text("damaged")
    assert fetch_shakespeare().read_text(encoding="utf-8") == shakespeare_text
    assert len(requests) == 2


def test_download_with_wrong_checksum(monkeypatch, tmp_path):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: FakeResponse(b"oops"))
    with pytest.raises(NeoxlabError, match=f"has sha256 .*expected {SHAKESPEARE_SHA256}"):
        fetch_shakespeare()
    assert list((tmp_path / "cache" / "tinyshakespeare").iterdir()) == []


# --- shakespeare.jsonl -----------------------------------------------------------------------


def read_records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def test_jsonl_reproduces_the_text_and_splits_at_nanogpt_boundary(shakespeare_text, tmp_path):
    out = write_shakespeare_jsonl(shakespeare_text, tmp_path / "shakespeare.jsonl")
    records = read_records(out)
    assert "".join(record["text"] for record in records) == shakespeare_text
    boundary = int(0.9 * len(shakespeare_text))
    train = "".join(record["text"] for record in records if record["split"] == "train")
    assert train == shakespeare_text[:boundary]
    assert {record["document"] for record in records if record["split"] == "train"} == {0}
    assert {record["document"] for record in records if record["split"] == "validation"} == {1}
    lengths = [len(record["text"]) for record in records]
    straddling = boundary // 256
    assert lengths[straddling] == boundary % 256
    assert lengths[straddling] + lengths[straddling + 1] == 256
    assert set(lengths[:straddling] + lengths[straddling + 2 : -1]) == {256}
    assert list(records[0]) == ["text", "split", "document"]


def test_jsonl_escapes_quotes_backslashes_and_newlines(tmp_path):
    text = 'He said "hi"\\n\n\tand\r\nleft\u2028é' * 3
    out = write_shakespeare_jsonl(text, tmp_path / "s.jsonl", chunk_chars=7)
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    assert "".join(json.loads(line)["text"] for line in lines[:-1]) == text
    assert "é" in out.read_text(encoding="utf-8")  # ensure_ascii=False
    documents = read_jsonl_documents(out)
    assert "".join(document.text for document in documents) == text


def test_jsonl_write_is_atomic(tmp_path):
    out = write_shakespeare_jsonl("abc" * 10, tmp_path / "deep" / "s.jsonl")
    assert [path.name for path in out.parent.iterdir()] == ["s.jsonl"]


def test_read_merges_chunks_into_two_documents(shakespeare_text, tmp_path):
    out = write_shakespeare_jsonl(shakespeare_text, tmp_path / "shakespeare.jsonl")
    boundary = int(0.9 * len(shakespeare_text))
    assert read_jsonl_documents(out) == [
        Document(shakespeare_text[:boundary], "train"),
        Document(shakespeare_text[boundary:], "validation"),
    ]


# --- reading jsonl ---------------------------------------------------------------------------


def write_lines(tmp_path, *lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_plain_records_and_splits(tmp_path):
    path = write_lines(
        tmp_path,
        '{"text": "one"}',
        "",
        '{"text": "two", "split": "test", "meta": 1}',
        '{"text": "three", "split": null}',
    )
    assert read_jsonl_documents(path) == [
        Document("one", None),
        Document("two", "test"),
        Document("three", None),
    ]


def test_read_merges_consecutive_records_of_one_document(tmp_path):
    path = write_lines(
        tmp_path,
        '{"content": "a", "document": 7}',
        '{"content": "b", "document": 7}',
        '{"content": "c", "document": 8}',
        '{"content": "d", "document": 7}',
    )
    assert read_jsonl_documents(path, text_key="content") == [
        Document("ab", None),
        Document("c", None),
        Document("d", None),
    ]


def test_records_without_document_id_stay_separate(tmp_path):
    path = write_lines(tmp_path, '{"text": "a"}', '{"text": "a"}')
    assert len(read_jsonl_documents(path)) == 2


@pytest.mark.parametrize(
    ("lines", "message", "hint"),
    [
        (['{"text": "ok"}', '{"text": broken}'], r"data\.jsonl:2: invalid JSON", None),
        (['{"body": "x", "id": 3}'], r"data\.jsonl:1: the record has no 'text' key", "body"),
        (['{"text": 3}'], r"data\.jsonl:1: 'text' must be a string, got int", None),
        (['["text"]'], r"data\.jsonl:1: expected a JSON object, got list", None),
        (
            ['{"text": "x", "split": "valid"}'],
            r"data\.jsonl:1: unknown split 'valid'",
            "validation",
        ),
        (
            ['{"text": "a", "document": 1, "split": "train"}', '{"text": "b", "document": 1}'],
            r"data\.jsonl:2: document 1 continues with split None after 'train'",
            None,
        ),
        (["", "  "], r"data\.jsonl holds no documents", None),
    ],
)
def test_read_errors_name_file_and_line(tmp_path, lines, message, hint):
    path = write_lines(tmp_path, *lines)
    with pytest.raises(NeoxlabError, match=message) as caught:
        read_jsonl_documents(path)
    if hint:
        assert hint in caught.value.hint


def test_read_empty_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"")
    with pytest.raises(NeoxlabError, match="holds no documents"):
        read_jsonl_documents(path)


def test_read_non_utf8_names_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(NeoxlabError, match=r"data\.jsonl:2: not UTF-8 .*offset 28"):
        read_jsonl_documents(path)


def test_read_missing_file(tmp_path):
    with pytest.raises(NeoxlabError, match="no such file"):
        read_jsonl_documents(Path(tmp_path / "absent.jsonl"))
