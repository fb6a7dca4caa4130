"""The documents of neoxlab's own benchmark tasks (the YAMLs in the repository's `benchmarks/`).

lm-eval's standard tasks read their datasets from the Hugging Face Hub; these read only data
neoxlab already has, so they run offline and anywhere neoxlab does:

- `shakespeare_last_word` (loglikelihood, as LAMBADA): a speech of Tiny Shakespeare's
  validation text (its last 10%, which neoxlab's Shakespeare runs never train on) without its
  last word; the word is the target.
- `shakespeare_next_line` (multiple choice, as HellaSwag): a speech without its last line; the
  choices are that line and the last lines of three other speeches.
- `python_stdlib_perplexity` (rolling perplexity, as WikiText): the files of this Python's
  standard library that `neoxlab prepare python-stdlib` puts in its validation split (so a
  model trained on that corpus never saw them), up to 8 KiB each.

Each task's documents are built once and kept as jsonl in neoxlab's cache
(`<cache>/benchmarks/`, written atomically), so what a task scores is a file one can read. A
task YAML names its builder as lm-eval's `custom_dataset` (`!function
neoxlab.data.benchmark_data.NAME`), so `lm_eval --include_path benchmarks` runs them too.
"""

from __future__ import annotations

import json
import platform
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neoxlab.atomic import write_atomically
from neoxlab.data.corpora import (
    STDLIB_STEM,
    cache_dir,
    fetch_shakespeare,
    prepare_python_stdlib,
)
from neoxlab.tokenizer import read_text

if TYPE_CHECKING:
    from datasets import DatasetDict

# Bumped whenever a builder changes what it writes, so a cached file of the old kind is not read.
DOCS_VERSION = 1
# As neoxlab's Shakespeare corpus: the first 90% of the text trains, the rest validates.
SHAKESPEARE_TRAIN_FRACTION = 0.9
MIN_SPEECH_WORDS = 12  # a last word with too little before it is a guess, not a test
MIN_SPEECH_LINES = 3  # speaker, at least one line of context, the line to choose
DISTRACTORS = 3
STDLIB_MAX_FILE_BYTES = 8192  # keeps the rolling-perplexity task to seconds on a CPU
# The last word of a speech: letters (with inner apostrophes or hyphens), then punctuation.
LAST_WORD = re.compile(r"(?P<context>.*\S)[ ](?P<word>[A-Za-z]+(?:['-][A-Za-z]+)*)\W*", re.DOTALL)
Record = dict[str, Any]


def shakespeare_last_word(**_metadata: Any) -> DatasetDict:
    """lm-eval's `custom_dataset` of shakespeare_last_word: {"test": documents}."""
    return _dataset("shakespeare_last_word", _last_word_records)


def shakespeare_next_line(**_metadata: Any) -> DatasetDict:
    """lm-eval's `custom_dataset` of shakespeare_next_line: {"test": documents}."""
    return _dataset("shakespeare_next_line", _next_line_records)


def python_stdlib_perplexity(**_metadata: Any) -> DatasetDict:
    """lm-eval's `custom_dataset` of python_stdlib_perplexity: {"test": documents}.

    The documents depend on the running Python's standard library: compare scores measured
    with the same Python version (the cached file's name carries it)."""
    name = f"python_stdlib_perplexity-py{platform.python_version()}"
    return _dataset(name, _stdlib_records)


# ---- building and caching ---------------------------------------------------------------------


def documents_file(name: str, build: Callable[[], list[Record]]) -> Path:
    """The cached jsonl of task `name`, built by `build()` the first time it is asked for."""
    path = cache_dir() / "benchmarks" / f"{name}.v{DOCS_VERSION}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in build())
        write_atomically(path, lines)  # processes building it at once write the same bytes
    return path


def _dataset(name: str, build: Callable[[], list[Record]]) -> DatasetDict:
    from datasets import Dataset, DatasetDict

    path = documents_file(name, build)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    # In memory: nothing is written to the Hugging Face datasets cache.
    return DatasetDict({"test": Dataset.from_list(records)})


def shakespeare_speeches() -> list[str]:
    """The whole speeches (speaker line and lines) of Tiny Shakespeare's validation text."""
    text = read_text(fetch_shakespeare())
    validation = text[int(SHAKESPEARE_TRAIN_FRACTION * len(text)) :]
    # The first block is the end of a speech cut by the split; speeches are separated by a
    # blank line and begin with "NAME:".
    blocks = validation.split("\n\n")[1:]
    return [block.strip("\n") for block in blocks if block.split("\n", 1)[0].endswith(":")]


def _last_word_records() -> list[Record]:
    records = []
    for speech in shakespeare_speeches():
        match = LAST_WORD.fullmatch(speech)
        if match and len(speech.split()) >= MIN_SPEECH_WORDS:
            records.append({"context": match["context"], "target": " " + match["word"]})
    return records


def _next_line_records() -> list[Record]:
    speeches = [s.split("\n") for s in shakespeare_speeches()]
    speeches = [lines for lines in speeches if len(lines) >= MIN_SPEECH_LINES]
    last_lines = [lines[-1] for lines in speeches]
    generator = random.Random(0)  # the same choices, in the same order, everywhere
    records = []
    for lines in speeches:
        others = [line for line in last_lines if line != lines[-1]]
        choices = [lines[-1], *generator.sample(others, DISTRACTORS)]
        generator.shuffle(choices)
        label = choices.index(lines[-1])
        records.append({"context": "\n".join(lines[:-1]), "choices": choices, "label": label})
    return records


def _stdlib_records() -> list[Record]:
    with tempfile.TemporaryDirectory(prefix="neoxlab-stdlib-") as folder:
        prepare_python_stdlib(Path(folder), max_file_bytes=STDLIB_MAX_FILE_BYTES)
        corpus = Path(folder) / f"{STDLIB_STEM}.jsonl"
        records = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    return [
        {"path": record["path"], "text": record["text"]}
        for record in records
        if record["split"] == "validation"
    ]
