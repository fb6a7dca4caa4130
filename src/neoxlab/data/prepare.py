"""From `data-path` to token streams: tokenizer training, tokenization, and the .bin/.idx cache.

`data-path` may name
- a `.jsonl` (records with "text"; optional "split"/"document", see corpora.read_jsonl_documents)
  or a `.txt` (one text, split contiguously by the `split` weights): neoxlab trains the tokenizer
  if needed, tokenizes, and caches `<stem>.<8 hex>.<split>.bin/.idx` beside the file, the hex
  being sha256(tokenizer.json + source + options);
- a prepared GPT-NeoX prefix (`PREFIX.bin` + `PREFIX.idx`), split by document with `split`;
- with `data-format: chat`, chat transcripts or their prepared folder (chat.py): whole examples
  with loss labels.
A missing `shakespeare.jsonl` is prepared automatically (Tiny Shakespeare).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from neoxlab.atomic import exclusive_lock, remove_temporaries, write_atomically
from neoxlab.config import Config, parse_split
from neoxlab.data.batches import VALIDATION_SEED, EodMaskedSampler, Sampler
from neoxlab.data.blend import Blend, blend, make_sampler, weights_by_document_count
from neoxlab.data.chat import (
    META_FILE,
    ChatExamples,
    ChatOptions,
    ChatSampler,
    describe,
    load_prepared_chat,
    prepare_chat,
)
from neoxlab.data.corpora import (
    SPLITS,
    STDLIB_STEM,
    Document,
    fetch_shakespeare,
    read_jsonl_documents,
    split_counts,
    write_shakespeare_jsonl,
)
from neoxlab.data.indexed import IndexedDataset, IndexedDatasetWriter, best_dtype, idx_path
from neoxlab.errors import NeoxlabError
from neoxlab.tokenizer import (
    SPECIAL_TOKENS,
    STANDARD_TOKENIZERS,
    gpt2_tokenizer,
    load_tokenizer,
    read_text,
    token_id,
    train_bpe,
    train_char,
)

SHAKESPEARE_JSONL = "shakespeare.jsonl"
TEXT_SUFFIXES = (".jsonl", ".txt")


@dataclass
class PreparedData:
    """Token streams per split (documents back to back, each ended by the eod token)."""

    splits: dict[str, np.ndarray | Blend]  # a Blend: several weighted datasets (data paths)
    tokenizer: Tokenizer
    tokenizer_file: Path
    eod_id: int
    summary: dict = field(default_factory=dict)
    examples: dict[str, ChatExamples] | None = None  # chat data: whole examples with loss labels
    # .jsonl/.txt sources: the validation documents' text (code-metrics completes their lines)
    validation_texts: list[str] | None = None


# What a newcomer types next: a corpus made offline and the key that names it (both paths are
# what `neoxlab prepare python-stdlib` writes and `data-path=` reads, relative to the cwd).
NO_DATA_PATH_HINT = (
    "make a corpus with `neoxlab prepare python-stdlib` (offline Python code), then add "
    f"data-path=data/{STDLIB_STEM}.jsonl to the command (or data-path=data/{SHAKESPEARE_JSONL}, "
    "which neoxlab downloads by itself)"
)


def prepare_data(config: Config, log: Callable[[str], None] = print) -> PreparedData:
    _check_tokenizer_files(config)
    if config.train_data_paths:
        return _open_blends(config)
    if not config.data_path:
        raise NeoxlabError("no data-path in the config", hint=NO_DATA_PATH_HINT)
    if config.data_format == "chat":
        return _prepare_chat_data(config, log)
    path = Path(config.data_path)
    if path.suffix in TEXT_SUFFIXES:
        return _prepare_text_source(config, path, log)
    return _open_prefix(config, path)


def build_samplers(config: Config, data: PreparedData) -> tuple[Sampler, Sampler]:
    """The train and validation samplers: random windows, or whole chat examples; with
    eod-mask-loss, both leave out the loss gpt-neox masks (training and validation alike)."""
    if data.examples is not None:
        samplers: tuple[Sampler, Sampler] = _chat_samplers(config, data)
    else:
        samplers = (
            make_sampler(data.splits["train"], config.seq_length, config.seed, "train"),
            make_sampler(
                data.splits["validation"], config.seq_length, VALIDATION_SEED, "validation"
            ),
        )
    if config.eod_mask_loss:
        return EodMaskedSampler(samplers[0], data.eod_id), EodMaskedSampler(
            samplers[1], data.eod_id
        )
    return samplers


# ---- tokenizer files ---------------------------------------------------------------------------


def _check_tokenizer_files(config: Config) -> None:
    """hf and gpt2 load a published tokenizer: --dry-run assumes its size, training needs it."""
    standard = STANDARD_TOKENIZERS.get(config.tokenizer_type)
    if standard is None:
        return
    keys = ["vocab_file", "merge_file"] if config.tokenizer_type == "gpt2" else ["vocab_file"]
    for key in keys:
        path = getattr(config, key)
        if not path or not Path(path).is_file():
            where = f"{path} does not exist" if path else "it is not set"
            raise NeoxlabError(
                f"tokenizer-type {config.tokenizer_type} needs {key.replace('_', '-')} ({where}); "
                f"gpt-neox configs that name no file mean {standard.name}",
                hint=f"download {standard.download} and set "
                + " and ".join(f"{k.replace('_', '-')}=PATH" for k in keys),
            )


def _tokenizer_json(config: Config) -> Path:
    """The tokenizer.json the config names. GPT-2's vocab.json + merges.txt are converted once,
    to `<vocab stem>.tokenizer.json` beside them (checkpoints carry a tokenizer.json)."""
    vocab = Path(config.vocab_file or "")
    if config.tokenizer_type != "gpt2":
        return vocab
    converted = vocab.with_name(f"{vocab.stem}.tokenizer.json")
    if not converted.is_file():
        tokenizer = gpt2_tokenizer(vocab, config.merge_file or "")
        write_atomically(converted, tokenizer.to_str(pretty=True))
    return converted


# ---- raw text sources ------------------------------------------------------------------------


def _missing_source_hint(path: Path) -> str:
    """The command that makes a missing corpus where neoxlab makes it, else how paths resolve."""
    if path.name == f"{STDLIB_STEM}.jsonl":
        out = "" if path.parent == Path.cwd() / "data" else f" --out {path.parent}"
        return f"make it with `neoxlab prepare python-stdlib{out}`"
    return (
        "check the path: in a config file it is relative to the file's folder, on the command "
        "line to the current folder"
    )


@dataclass
class _TextCache:
    """A text source's tokenizer and the names of its tokenized splits."""

    tokenizer_file: Path
    tokenizer: Tokenizer
    prefix: Path  # the splits are `<prefix>.<split>.bin/.idx`
    splits: list[str]  # those with documents

    def is_tokenized(self) -> bool:
        return all(idx_path(f"{self.prefix}.{split}").exists() for split in self.splits)


def _prepare_text_source(config: Config, path: Path, log: Callable[[str], None]) -> PreparedData:
    if not path.exists():
        if path.name != SHAKESPEARE_JSONL:
            raise NeoxlabError(f"data-path {path} does not exist", hint=_missing_source_hint(path))
        log(f"preparing Tiny Shakespeare -> {path}")
        text = read_text(fetch_shakespeare())
        path.parent.mkdir(parents=True, exist_ok=True)
        write_shakespeare_jsonl(text, path)  # atomic, and the same file whoever writes it
    documents = _read_documents(path, config)  # a broken source stops here: nothing written
    cache = _find_text_cache(config, path, documents)
    if cache is None:
        # Runs started together on a new corpus (a sweep's first trials, say) take turns: the
        # first builds what is missing, the others wait, then find it built. So the corpus is
        # tokenized once, with one tokenizer, and no two builders race on the same files.
        lock = path.with_name(f"{path.name}.lock")
        waiting = f"waiting for another process preparing {path.name} (it holds {lock.name})"
        with exclusive_lock(lock, on_wait=functools.partial(log, waiting)) as locked:
            if locked:  # no other process builds these files now: temporaries are orphans
                _remove_killed_builds(path, _tokenizer_path(config, path))
            cache = _find_text_cache(config, path, documents) or _build_text_cache(
                config, path, documents, log
            )
    splits = {s: IndexedDataset(f"{cache.prefix}.{s}").tokens for s in cache.splits}
    _check_validation(splits, path)
    tokenizer = cache.tokenizer
    summary = {
        "source": str(path),
        "tokenizer": str(cache.tokenizer_file),
        "vocab_size": tokenizer.get_vocab_size(),
        **{f"{s}_tokens": len(t) for s, t in splits.items()},
    }
    validation_texts = [d.text for d in documents if d.split == "validation"]
    eod_id = token_id(tokenizer, config.eod_token)
    return PreparedData(
        splits, tokenizer, cache.tokenizer_file, eod_id, summary, validation_texts=validation_texts
    )


def _remove_killed_builds(path: Path, tokenizer_file: Path) -> None:
    """Delete the temporaries a killed build of `path` left: of its tokenized splits
    (`<stem>.<8 hex>.<split>.bin/.idx`, see _text_cache) and of its tokenizer."""
    split_file = re.compile(rf"{re.escape(path.stem)}\.[0-9a-f]{{8}}\.\w+\.(bin|idx)")
    remove_temporaries(path.parent, lambda name: split_file.fullmatch(name) is not None)
    remove_temporaries(tokenizer_file.parent, lambda name: name == tokenizer_file.name)


def _find_text_cache(config: Config, path: Path, documents: list[Document]) -> _TextCache | None:
    """The source's tokenizer and tokenized splits, when all of them exist."""
    tokenizer_file = _tokenizer_path(config, path)
    if not tokenizer_file.exists():
        return None
    cache = _text_cache(config, path, documents, tokenizer_file)
    return cache if cache.is_tokenized() else None


def _build_text_cache(
    config: Config, path: Path, documents: list[Document], log: Callable[[str], None]
) -> _TextCache:
    """Whatever of the tokenizer and the tokenized splits is missing."""
    tokenizer_file = _tokenizer_path(config, path)
    if not tokenizer_file.exists():
        _train_tokenizer(config, documents, tokenizer_file, log)
    cache = _text_cache(config, path, documents, tokenizer_file)
    if not cache.is_tokenized():
        log(f"tokenizing {path.name} with {tokenizer_file.name} -> {cache.prefix.name}.*.bin/.idx")
        eod_id = token_id(cache.tokenizer, config.eod_token)
        _write_splits(cache.prefix, documents, cache.splits, cache.tokenizer, eod_id)
    return cache


def _text_cache(
    config: Config, path: Path, documents: list[Document], tokenizer_file: Path
) -> _TextCache:
    """Where the splits of `path` tokenized with `tokenizer_file` are cached: named by a hash
    of the tokenizer, the source and the options."""
    tokenizer = load_tokenizer(tokenizer_file)
    digest = hashlib.sha256()
    digest.update(tokenizer_file.read_bytes())
    digest.update(_file_digest(path))
    options = {"split": config.split, "eod": config.eod_token, "format": 1}
    digest.update(json.dumps(options, sort_keys=True).encode())
    prefix = path.with_name(f"{path.stem}.{digest.hexdigest()[:8]}")
    present = [s for s in SPLITS if any(d.split == s for d in documents)]
    return _TextCache(tokenizer_file, tokenizer, prefix, present)


def _read_documents(path: Path, config: Config) -> list[Document]:
    if path.suffix == ".txt":
        text = read_text(path)
        if not text:
            raise NeoxlabError(f"data file {path} is empty")
        # One text: split contiguously (as Tiny Shakespeare is) by the split weights.
        fractions = parse_split(config.split)
        bounds = [0]
        for fraction in fractions:
            bounds.append(bounds[-1] + int(fraction * len(text)))
        bounds[-1] = len(text)
        spans = zip(SPLITS, itertools.pairwise(bounds), strict=True)
        return [Document(text[a:b], name) for name, (a, b) in spans if b > a]
    documents = read_jsonl_documents(path)
    if not any(d.text for d in documents):
        raise NeoxlabError(f"data file {path} holds only empty texts")
    if any(d.split is None for d in documents):
        documents = _assign_splits(documents, config.split)
    return documents


def _assign_splits(documents: list[Document], split: str) -> list[Document]:
    """Documents without an explicit split: contiguous ranges by index, as gpt-neox splits."""
    counts = split_counts(len(documents), split)
    names = [name for name, count in zip(SPLITS, counts, strict=True) for _ in range(count)]
    return [
        d if d.split is not None else Document(d.text, name)
        for d, name in zip(documents, names, strict=True)
    ]


def _tokenizer_path(config: Config, data: Path) -> Path:
    """vocab-file, else `<stem>.bpe-<vocab-size>` or `<stem>.char` (.tokenizer.json) beside
    the data, with 8 hex of the special tokens when they are not the default: configs that
    differ there train different tokenizers and must not share one."""
    if config.vocab_file:
        return _tokenizer_json(config)
    kind = "char" if config.tokenizer_type == "char" else f"bpe-{config.vocab_size}"
    specials = _special_tokens(config)
    if specials != SPECIAL_TOKENS:
        kind += "-" + hashlib.sha256(json.dumps(specials).encode()).hexdigest()[:8]
    return data.with_name(f"{data.stem}.{kind}.tokenizer.json")


def _special_tokens(config: Config) -> tuple[str, ...]:
    return tuple(config.special_tokens or SPECIAL_TOKENS)


def _train_tokenizer(
    config: Config, documents: list[Document], out: Path, log: Callable[[str], None]
) -> None:
    specials = _special_tokens(config)
    train_texts = [d.text for d in documents if d.split == "train"]
    if config.tokenizer_type == "char":
        log(f"building a character tokenizer -> {out}")
        tokenizer = train_char("".join(d.text for d in documents), special_tokens=specials)
    else:
        log(f"training a byte-level BPE tokenizer (vocab {config.vocab_size}) -> {out}")
        tokenizer = train_bpe(train_texts, config.vocab_size, special_tokens=specials)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written by Python, not Tokenizer.save: its I/O errors are bare Exceptions with no path.
    write_atomically(out, tokenizer.to_str(pretty=True))


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()


def _write_splits(
    prefix: Path,
    documents: list[Document],
    splits: list[str],
    tokenizer: Tokenizer,
    eod_id: int,
) -> None:
    dtype = best_dtype(tokenizer.get_vocab_size())
    for split in splits:
        texts = [d.text for d in documents if d.split == split]
        with IndexedDatasetWriter(f"{prefix}.{split}", dtype) as writer:
            for start in range(0, len(texts), 256):
                batch = tokenizer.encode_batch(texts[start : start + 256], add_special_tokens=False)
                for encoding in batch:
                    writer.add_document([*encoding.ids, eod_id])


# ---- chat data -------------------------------------------------------------------------------


def _prepare_chat_data(config: Config, log: Callable[[str], None]) -> PreparedData:
    """`data-format: chat`: the prepared examples of data-path, tokenized as the model's."""
    if not config.vocab_file:
        raise NeoxlabError(
            "chat data is tokenized with the model's tokenizer, and none is set",
            hint="set init-from (a Hugging Face directory or neoxlab run) or vocab-file",
        )
    tokenizer_file = _tokenizer_json(config)
    tokenizer = load_tokenizer(tokenizer_file)
    options = ChatOptions.from_config(config)
    path = Path(config.data_path or "")
    is_prepared = (path / META_FILE).is_file()
    folder = path if is_prepared else prepare_chat(path, tokenizer, options, log=log)
    examples, meta = load_prepared_chat(folder, tokenizer, options)
    log(describe(meta))
    summary = {
        "source": meta["source"],
        "prepared": str(folder),
        "tokenizer": str(tokenizer_file),
        "vocab_size": tokenizer.get_vocab_size(),
        **{f"{split}_examples": counts["examples"] for split, counts in meta["splits"].items()},
    }
    return PreparedData(
        splits={split: chat.tokens.tokens for split, chat in examples.items()},
        tokenizer=tokenizer,
        tokenizer_file=tokenizer_file,
        eod_id=token_id(tokenizer, config.eod_token),
        summary=summary,
        examples=examples,
    )


def _chat_samplers(config: Config, data: PreparedData) -> tuple[ChatSampler, ChatSampler]:
    """Train and validation samplers over prepared chat examples."""
    assert data.examples is not None  # built by _prepare_chat_data
    pad_id = token_id(data.tokenizer, config.pad_token)
    seeds = {"train": config.seed, "validation": VALIDATION_SEED}
    return tuple(  # type: ignore[return-value]
        ChatSampler(
            data.examples[split], config.seq_length, seeds[split], pad_id, config.pack_examples
        )
        for split in ("train", "validation")
    )


# ---- prepared GPT-NeoX prefixes ---------------------------------------------------------------


def _open_prefix(config: Config, prefix: Path) -> PreparedData:
    dataset = IndexedDataset(prefix)  # first: a mistyped prefix is "not found", not "prepared"
    if not config.vocab_file:
        raise NeoxlabError(
            f"data-path {prefix} is a prepared dataset, so the tokenizer cannot be trained from it",
            hint="set vocab-file to the tokenizer.json it was prepared with",
        )
    tokenizer_file = _tokenizer_json(config)
    tokenizer = load_tokenizer(tokenizer_file)
    _check_token_ids(dataset, prefix, tokenizer, tokenizer_file)
    counts = split_counts(len(dataset), config.split)
    pointers = dataset.pointers // dataset.dtype.itemsize
    ends = np.concatenate([pointers, [len(dataset.tokens)]])
    splits = {}
    first = 0
    for name, count in zip(SPLITS, counts, strict=True):
        if count:
            splits[name] = dataset.tokens[int(ends[first]) : int(ends[first + count])]
        first += count
    _check_validation(splits, prefix)
    summary = {
        "source": str(prefix),
        "tokenizer": str(tokenizer_file),
        "vocab_size": tokenizer.get_vocab_size(),
        **{f"{s}_tokens": len(t) for s, t in splits.items()},
    }
    eod_id = token_id(tokenizer, config.eod_token)
    return PreparedData(splits, tokenizer, tokenizer_file, eod_id, summary)


# Token ids checked against the vocabulary: a prefix of the data, so that opening a corpus of
# hundreds of GB (on every rank of a cluster job) does not read all of it.
CHECKED_TOKENS = 1 << 26


def _check_token_ids(
    dataset: IndexedDataset, prefix: Path, tokenizer: Tokenizer, tokenizer_file: Path
) -> None:
    head = dataset.tokens[:CHECKED_TOKENS]
    if not len(head):
        return
    # Signed token dtypes (int8/16/32/64) can hold negative values: no tokenizer made those.
    low, high = int(head.min()), int(head.max())
    if low < 0 or high >= tokenizer.get_vocab_size():
        raise NeoxlabError(
            f"{prefix} holds token id {low if low < 0 else high}, outside the tokenizer's "
            f"vocabulary (0 to {tokenizer.get_vocab_size() - 1}) in {tokenizer_file}",
            hint="the data was prepared with a different tokenizer, or is damaged",
        )


def _open_blends(config: Config) -> PreparedData:
    """gpt-neox's train/valid/test-data-paths: whole prepared datasets per split, blended by
    their weights (equal when no weights are given)."""
    if not config.vocab_file:
        raise NeoxlabError(
            "train-data-paths are prepared datasets, so the tokenizer cannot be trained from them",
            hint="set vocab-file to the tokenizer.json they were prepared with",
        )
    tokenizer_file = _tokenizer_json(config)
    tokenizer = load_tokenizer(tokenizer_file)
    splits: dict[str, np.ndarray | Blend] = {}
    summary: dict = {"source": "train/valid/test-data-paths", "tokenizer": str(tokenizer_file)}
    for name, key in zip(SPLITS, ("train", "valid", "test"), strict=True):
        paths = getattr(config, f"{key}_data_paths")
        if not paths:
            continue
        datasets = [IndexedDataset(path) for path in paths]
        for dataset, path in zip(datasets, paths, strict=True):
            _check_token_ids(dataset, Path(path), tokenizer, tokenizer_file)
        weights = getattr(config, f"{key}_data_weights") or [1.0] * len(paths)
        if config.weight_by_num_documents:  # replaces the given weights, as in gpt-neox
            counts = [len(dataset) for dataset in datasets]
            weights = weights_by_document_count(counts, config.weighted_sampler_alpha)
        mixed = blend([dataset.tokens for dataset in datasets], weights, list(paths))
        splits[name] = mixed.streams[0] if len(mixed.streams) == 1 else mixed
        summary[f"{name}_tokens"] = len(mixed)
    _check_validation(splits, Path(config.train_data_paths[0]))
    eod_id = token_id(tokenizer, config.eod_token)
    return PreparedData(splits, tokenizer, tokenizer_file, eod_id, summary)


def _check_validation(splits: dict[str, np.ndarray], source: Path) -> None:
    for name in ("train", "validation"):
        if name not in splits or not len(splits[name]):
            raise NeoxlabError(
                f"{source} has no {name} data",
                hint="give it more documents or change `split` (e.g. 900,100,0)",
            )
