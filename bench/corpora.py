"""The benchmarks' corpora: Tiny Shakespeare as neoxlab prepares it, and random tokens for
runs where only the shapes matter."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neoxlab.data.corpora import fetch_shakespeare, write_shakespeare_jsonl
from neoxlab.data.indexed import IndexedDatasetWriter, best_dtype
from neoxlab.tokenizer import read_text


def shakespeare_jsonl(folder: Path, characters: int | None = None) -> Path:
    """Tiny Shakespeare (its first `characters`) as neoxlab's split jsonl in `folder`."""
    text = read_text(fetch_shakespeare())
    return write_shakespeare_jsonl(text[:characters], folder / "shakespeare.jsonl")


def synthetic_corpus(
    folder: Path, vocab_size: int, tokens: int, documents: int = 200, predictable: float = 0.0
) -> list[str]:
    """Uniformly random token ids as a prepared GPT-NeoX dataset, with a word-level tokenizer
    of `vocab_size` tokens (the last two special): for speed and memory, where only the shapes
    matter. With `predictable` > 0, that share of the tokens is instead the fixed successor of
    the random token before it: something to learn, so that runs compared step by step move
    apart if one computes wrongly. Returns the config overrides that train on it."""
    from tokenizers import Tokenizer, models

    specials = ["<|endoftext|>", "<|padding|>"]
    words = {f"t{i}": i for i in range(vocab_size - len(specials))}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tokenizer.add_special_tokens(specials)
    tokenizer_file = folder / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    eod = tokenizer.token_to_id(specials[0])
    rng = np.random.default_rng(0)
    words = vocab_size - len(specials)
    successor = rng.permutation(words)
    prefix = folder / "random_text_document"
    per_document = max(1, tokens // documents)
    with IndexedDatasetWriter(prefix, best_dtype(vocab_size)) as writer:
        for _ in range(documents):
            body = rng.integers(0, words, size=per_document - 1)
            follows = rng.random(body.size - 1) < predictable
            body[1:][follows] = successor[body[:-1][follows]]
            writer.add_document(np.append(body, eod))
    return [f"data-path={prefix}", f"vocab-file={tokenizer_file}", "tokenizer-type=hf"]
