"""Train, load and save tokenizers; every one is a Hugging Face `tokenizers` model.

Two kinds are trained here: byte-level BPE (as GPT-NeoX-20B's tokenizer) and character-level.
Both are saved as tokenizer.json plus a tokenizer_config.json that `transformers` loads, so an
exported model and its tokenizer travel together.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from neoxlab.atomic import write_atomically
from neoxlab.errors import NeoxlabError

# GPT-NeoX-20B's order: <|endoftext|> is id 0, <|padding|> id 1.
SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>")

# A char tokenizer names this unknown token but (by default) leaves it out of its vocabulary:
# `tokenizers` then raises on a character it has never seen instead of silently dropping it.
# Listing it among the special tokens turns it on: unseen characters then map to it.
CHAR_UNKNOWN_TOKEN = "<|unk|>"

BYTE_ALPHABET_SIZE = 256


@dataclass(frozen=True)
class StandardTokenizer:
    """A published tokenizer that a tokenizer type means when a config names no file."""

    name: str
    vocab_size: int  # tokens, before the embedding is padded
    download: str


# gpt-neox's HFTokenizer configs without a file (Pythia's) mean GPT-NeoX-20B's tokenizer;
# its GPT2BPETokenizer (the default tokenizer-type) means GPT-2's vocabulary and merges.
STANDARD_TOKENIZERS = {
    "hf": StandardTokenizer(
        "GPT-NeoX-20B's tokenizer.json",
        50277,
        "https://huggingface.co/EleutherAI/gpt-neox-20b/resolve/main/tokenizer.json",
    ),
    "gpt2": StandardTokenizer(
        "GPT-2's vocab.json and merges.txt",
        50257,
        "https://s3.amazonaws.com/models.huggingface.co/bert/gpt2-vocab.json and "
        "https://s3.amazonaws.com/models.huggingface.co/bert/gpt2-merges.txt",
    ),
}


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer; the special tokens take the first ids, in order."""
    _check_special_tokens(special_tokens)
    smallest = BYTE_ALPHABET_SIZE + len(special_tokens)
    if vocab_size < smallest:
        raise NeoxlabError(
            f"vocab-size {vocab_size} is too small for a byte-level BPE tokenizer",
            hint=f"use at least {smallest} (256 bytes + {len(special_tokens)} special tokens)",
        )
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: a leading space would change the text and break exact round trips.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        # Every byte in the vocabulary, seen in training or not, so any text stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    # From an iterator, not files: `tokenizers`' file reader fails on non-UTF-8 input.
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def train_char(text: str, *, special_tokens: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
    """Build a character-level tokenizer: special tokens, then the sorted characters of `text`.

    A character missing from the vocabulary makes encoding fail (see `encode`), unless
    CHAR_UNKNOWN_TOKEN is one of the special tokens, in which case it stands for any of them.
    """
    _check_special_tokens(special_tokens)
    characters = sorted(set(text) - set(special_tokens))
    if not characters:
        raise NeoxlabError("cannot build a character vocabulary from an empty text")
    vocab = {token: index for index, token in enumerate([*special_tokens, *characters])}
    # BPE without merges and without a pre-tokenizer splits the text into single characters;
    # it is about twice as fast as WordLevel with a per-character Split.
    tokenizer = Tokenizer(models.BPE(vocab, merges=[], unk_token=CHAR_UNKNOWN_TOKEN))
    # Fuse joins the pieces back without the spaces a plain decode would put between tokens.
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(special_tokens))
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`; a character a char tokenizer cannot encode is a NeoxlabError."""
    if _refuses_unknown_characters(tokenizer):
        unknown = _unknown_characters(tokenizer, text)
        if unknown:
            shown = ", ".join(repr(character) for character in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise NeoxlabError(
                f"the character tokenizer has never seen {shown}{more}",
                hint="train the char tokenizer on a text containing these characters",
            )
    return tokenizer.encode(text).ids


def gpt2_tokenizer(vocab_file: str | Path, merge_file: str | Path) -> Tokenizer:
    """GPT-2's byte-level BPE from its vocab.json and merges.txt, as gpt-neox's GPT2BPETokenizer
    splits text (<|endoftext|> stays an ordinary vocabulary entry, id 50256). <|padding|> is
    added after GPT-2's tokens: neoxlab's runs name a padding token, and the embedding padded to
    a multiple of 128 has that row anyway, so the model's shape does not change."""
    for path in (vocab_file, merge_file):
        if not Path(path).is_file():
            raise NeoxlabError(f"no such tokenizer file: {path}")
    try:
        model = models.BPE.from_file(str(vocab_file), str(merge_file))
    except Exception as error:
        if type(error) is not Exception:  # `tokenizers` reports bad files as bare Exceptions
            raise
        raise NeoxlabError(
            f"{vocab_file} and {merge_file} are not a GPT-2 vocabulary: {error}"
        ) from None
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([SPECIAL_TOKENS[1]])
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load tokenizer.json, given the file itself or the directory that holds it."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise NeoxlabError(
            f"no tokenizer at {file}",
            hint="give a tokenizer.json or a folder holding one: a run (runs/<run>) or a "
            "downloaded model (hf download EleutherAI/pythia-160m "
            "--local-dir models/pythia-160m)",
        )
    try:
        content = file.read_bytes().decode("utf-8")
        parsed = json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NeoxlabError(f"{file} is not a tokenizer.json file: {error}") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("model"), dict):
        raise NeoxlabError(f"{file} is not a tokenizer.json file: it has no 'model' object")
    try:
        return Tokenizer.from_str(content)
    except Exception as error:
        # `tokenizers` reports every deserialisation problem as a bare Exception; anything
        # more specific is not a format problem and goes up unchanged.
        if type(error) is not Exception:
            raise
        raise NeoxlabError(f"{file} is not a tokenizer.json file: {error}") from None


def save_tokenizer(
    tokenizer: Tokenizer,
    directory: Path,
    *,
    eod_token: str = "<|endoftext|>",
    pad_token: str = "<|padding|>",
    model_max_length: int | None = None,
) -> None:
    """Write tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer loads."""
    # Both must exist: transformers would otherwise add them as new tokens with new ids.
    token_id(tokenizer, eod_token)
    token_id(tokenizer, pad_token)
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eod_token,
        "eos_token": eod_token,
        "pad_token": pad_token,
        # Our decoders already reproduce the text exactly; transformers must not "clean" it.
        "clean_up_tokenization_spaces": False,
    }
    unknown_token = getattr(tokenizer.model, "unk_token", None)
    if unknown_token is not None and tokenizer.token_to_id(unknown_token) is not None:
        config["unk_token"] = unknown_token
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / "tokenizer.json", tokenizer.to_str(pretty=True))
    write_atomically(
        directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False)
    )


def token_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of `token` (typically a special token such as the end-of-document token)."""
    identifier = tokenizer.token_to_id(token)
    if identifier is None:
        specials = [added.content for added in tokenizer.get_added_tokens_decoder().values()]
        raise NeoxlabError(
            f"tokenizer has no token '{token}'",
            hint=f"its special tokens are {specials}" if specials else "it has no special tokens",
        )
    return identifier


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file exactly (no newline translation)."""
    path = Path(path)
    if not path.is_file():
        raise NeoxlabError(f"no such file: {path}")
    content = path.read_bytes()
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise NeoxlabError(
            f"{path} is not UTF-8: invalid byte at offset {error.start}",
            hint="convert it to UTF-8 (e.g. iconv -t utf-8)",
        ) from None


def _check_special_tokens(special_tokens: Sequence[str]) -> None:
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special tokens repeat: {list(special_tokens)}")


def _refuses_unknown_characters(tokenizer: Tokenizer) -> bool:
    model = tokenizer.model
    return (
        isinstance(model, models.BPE)
        and model.unk_token == CHAR_UNKNOWN_TOKEN
        and tokenizer.token_to_id(CHAR_UNKNOWN_TOKEN) is None
    )


def _unknown_characters(tokenizer: Tokenizer, text: str) -> list[str]:
    # Special tokens in the text are matched whole, so their characters need not be known.
    for added in tokenizer.get_added_tokens_decoder().values():
        text = text.replace(added.content, "")
    return sorted(character for character in set(text) if tokenizer.token_to_id(character) is None)
