import json
from pathlib import Path

import pytest

from neoxlab.errors import NeoxlabError
from neoxlab.tokenizer import (
    CHAR_UNKNOWN_TOKEN,
    SPECIAL_TOKENS,
    encode,
    load_tokenizer,
    read_text,
    save_tokenizer,
    token_id,
    train_bpe,
    train_char,
)

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n        x: int = 0\n"
) * 20

SAMPLES = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "def f(x):\n    if x:\n        return  x\n\n\n",
    "   leading spaces and trailing   ",
    "\n\nonly newlines\r\nand a CRLF",
]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([CORPUS], vocab_size=300)


@pytest.fixture(scope="module")
def char():
    return train_char(CORPUS)


def test_bpe_special_tokens_come_first(bpe):
    assert bpe.token_to_id("<|endoftext|>") == 0
    assert bpe.token_to_id("<|padding|>") == 1
    assert bpe.get_vocab_size() == 300


def test_bpe_other_special_tokens_keep_their_order():
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = train_bpe([CORPUS], vocab_size=300, special_tokens=specials)
    assert [tokenizer.token_to_id(token) for token in specials] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("text", [*SAMPLES, "ünïcödé, emoji 😀 and bytes never seen: \x00\x7f"])
def test_bpe_round_trips_text_exactly(bpe, text):
    assert bpe.decode(bpe.encode(text).ids) == text


def test_bpe_learns_merges(bpe):
    text = "Before we proceed"
    assert len(bpe.encode(text).ids) < len(text.encode())


def test_bpe_rejects_a_vocab_smaller_than_the_byte_alphabet():
    with pytest.raises(NeoxlabError, match="at least 258"):
        train_bpe([CORPUS], vocab_size=200)


def test_char_vocab_is_specials_then_sorted_characters(char):
    vocab = char.get_vocab()
    characters = sorted(set(CORPUS))
    assert len(vocab) == len(SPECIAL_TOKENS) + len(characters)
    assert [vocab[token] for token in SPECIAL_TOKENS] == [0, 1]
    assert [vocab[character] for character in characters] == list(range(2, 2 + len(characters)))


@pytest.mark.parametrize("text", SAMPLES[:2])
def test_char_encodes_one_token_per_character_and_round_trips(char, text):
    ids = encode(char, text)
    assert len(ids) == len(text)
    assert char.decode(ids) == text


def test_char_matches_special_tokens_whole(char):
    ids = encode(char, "a<|endoftext|>b")
    assert ids == [char.token_to_id("a"), 0, char.token_to_id("b")]


def test_char_refuses_unknown_characters(char):
    with pytest.raises(NeoxlabError, match="'Z'"):
        encode(char, "aZb")
    # Through the plain tokenizers API it fails loudly too, instead of dropping the character.
    with pytest.raises(Exception, match="not found in the vocabulary"):
        char.encode("aZb")


def test_char_maps_unknown_characters_when_asked():
    tokenizer = train_char("ab", special_tokens=[*SPECIAL_TOKENS, CHAR_UNKNOWN_TOKEN])
    assert encode(tokenizer, "aZb") == [3, 2, 4]


def test_char_needs_some_text():
    with pytest.raises(NeoxlabError, match="empty"):
        train_char("")


def test_save_and_load_round_trip(tmp_path, bpe):
    save_tokenizer(bpe, tmp_path / "tok")
    assert sorted(path.name for path in (tmp_path / "tok").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    for where in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json", str(tmp_path / "tok")):
        loaded = load_tokenizer(where)
        assert loaded.encode(SAMPLES[1]).ids == bpe.encode(SAMPLES[1]).ids


def test_save_writes_transformers_config(tmp_path, bpe):
    save_tokenizer(bpe, tmp_path, model_max_length=128)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == config["bos_token"] == "<|endoftext|>"
    assert config["pad_token"] == "<|padding|>"
    assert config["model_max_length"] == 128
    assert "unk_token" not in config


def test_save_refuses_a_missing_special_token(tmp_path, bpe):
    with pytest.raises(NeoxlabError, match="no token '<pad>'"):
        save_tokenizer(bpe, tmp_path, pad_token="<pad>")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_transformers_loads_the_saved_tokenizer(tmp_path, kind, bpe, char):
    transformers = pytest.importorskip("transformers")
    ours = bpe if kind == "bpe" else char
    save_tokenizer(ours, tmp_path, model_max_length=64)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.eos_token_id == 0
    assert theirs.pad_token_id == 1
    assert theirs.model_max_length == 64
    for text in [*SAMPLES[:2], "speak<|endoftext|>Before"]:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text).ids
        assert theirs.decode(ids) == text


def test_load_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(NeoxlabError, match=r"no tokenizer at .*nowhere"):
        load_tokenizer(tmp_path / "nowhere" / "tokenizer.json")
    with pytest.raises(NeoxlabError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not json at all", "Expecting value"),
        (b"\xff\xfe binary", "utf-8"),
        (b"[1, 2, 3]", "no 'model' object"),
        (b'{"model": {"type": "BPE"}}', "Missing vocab"),
    ],
)
def test_load_rejects_what_is_not_a_tokenizer(tmp_path, content, reason):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(NeoxlabError, match=f"is not a tokenizer.json file: .*{reason}"):
        load_tokenizer(path)


def test_token_id(bpe):
    assert token_id(bpe, "<|padding|>") == 1
    with pytest.raises(NeoxlabError, match="tokenizer has no token '<x>'") as caught:
        token_id(bpe, "<x>")
    assert "<|endoftext|>" in caught.value.hint


def test_read_text_keeps_the_bytes_exactly(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes("line one\r\nlíne two\n".encode())
    assert read_text(path) == "line one\r\nlíne two\n"


def test_read_text_reports_non_utf8_with_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("abc café".encode("latin-1"))
    with pytest.raises(NeoxlabError, match=r"latin1\.txt is not UTF-8: invalid byte at offset 7"):
        read_text(path)


def test_read_text_missing_file(tmp_path):
    with pytest.raises(NeoxlabError, match="no such file"):
        read_text(Path(tmp_path / "absent.txt"))
