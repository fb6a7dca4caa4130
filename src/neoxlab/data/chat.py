"""Chat finetuning data: `User: ...` / `Agent: ...` transcripts -> masked, padded or packed batches.

Sources:
- text: examples end with the end-of-document token, turns are separated by a blank line:

      User: I have a question about life

      Agent: I have the answer to your question.<|endoftext|>

  Text before an example's first turn is a system prefix. The speaker names are options.
- jsonl: one `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}]}` a line.

Every example is written out in one canonical form (the one the exported chat template and
`neoxlab generate --chat` produce) and tokenized as a whole, exactly as a prompt is at generation
time; each token then follows the loss rule of the part its first character falls in
(DESIGN.md, Decisions, Chat): the system prefix and the `Agent:` label are masked, User turns are
masked unless train-on-prompt, and a reply is learned with what ends it (a blank line, or the
end-of-document token after the last reply).

A prepared chat dataset is a folder `<stem>.<8 hex>.chat/`: per split, a GPT-NeoX indexed dataset
of tokens (`{split}_text_document`) and one of labels (`{split}_label_document`: the token where
it is learned, -100 where it is masked; the layout gpt-neox's chat preprocessing writes for its
`label_data_paths`), plus chat.json (options and counts). Examples longer than seq-length are
dropped and counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from neoxlab.config import Config
from neoxlab.data.batches import IGNORE_INDEX, TRAIN_STREAM, Batch
from neoxlab.data.corpora import SPLITS, split_counts
from neoxlab.data.indexed import IndexedDataset, IndexedDatasetWriter, best_dtype
from neoxlab.errors import NeoxlabError
from neoxlab.tokenizer import read_text

META_FILE = "chat.json"
META_FORMAT = "neoxlab-chat"
META_VERSION = 1
TURN_SEPARATOR = "\n\n"
JSONL_ROLES = {"system": "system", "user": "user", "assistant": "agent"}
FORMAT_HINT = (
    "end each example with <|endoftext|>, separate turns with a blank line, and end every "
    "example with an agent turn"
)


@dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "agent"
    text: str


@dataclass(frozen=True)
class ChatFormat:
    """How a conversation is written as text; the one place the chat format is defined."""

    user_name: str = "User"
    agent_name: str = "Agent"
    eod_token: str = "<|endoftext|>"

    def pieces(self, turns: Sequence[Turn]) -> list[tuple[str, str]]:
        """The conversation as (text, part) pieces, part one of system, user, label, reply."""
        pieces = []
        for index, turn in enumerate(turns):
            if turn.role == "system":
                pieces.append((turn.text + TURN_SEPARATOR, "system"))
            elif turn.role == "user":
                pieces.append((f"{self.user_name}: {turn.text}{TURN_SEPARATOR}", "user"))
            else:
                last = index == len(turns) - 1
                pieces.append((f"{self.agent_name}:", "label"))
                ending = self.eod_token if last else TURN_SEPARATOR
                pieces.append((f" {turn.text}{ending}", "reply"))
        return pieces

    def text(self, turns: Sequence[Turn], add_generation_prompt: bool = False) -> str:
        """The conversation's text; with add_generation_prompt, followed by `Agent:`."""
        text = "".join(piece for piece, _ in self.pieces(turns))
        return text + f"{self.agent_name}:" if add_generation_prompt else text

    def reply(self, generated: str) -> str:
        """A generated continuation of `Agent:` cut where the model starts the user's turn."""
        return generated.split(f"{TURN_SEPARATOR}{self.user_name}:")[0].strip()

    def template(self) -> str:
        """The same format as a transformers chat template (Jinja), for tokenizer_config.json."""
        user, agent = json.dumps(f"{self.user_name}: "), json.dumps(f"{self.agent_name}: ")
        separator = json.dumps(TURN_SEPARATOR)
        return (
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'system' -%}"
            f"{{{{ (message['content'] | trim) + {separator} }}}}"
            "{%- elif message['role'] == 'user' -%}"
            f"{{{{ {user} + (message['content'] | trim) + {separator} }}}}"
            "{%- elif message['role'] == 'assistant' -%}"
            f"{{{{ {agent} + (message['content'] | trim) }}}}"
            f"{{{{ eos_token if loop.last else {separator} }}}}"
            "{%- else -%}"
            "{{ raise_exception('unknown role ' + message['role']) }}"
            "{%- endif -%}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{ {json.dumps(self.agent_name + ':')} }}}}"
            "{%- endif -%}"
        )


@dataclass(frozen=True)
class ChatOptions:
    """Everything that decides a prepared chat dataset besides its source and tokenizer."""

    user_name: str = "User"
    agent_name: str = "Agent"
    eod_token: str = "<|endoftext|>"
    seq_length: int = 280
    train_on_prompt: bool = False
    split: str = "900,100,0"

    @classmethod
    def from_config(cls, config: Config) -> ChatOptions:
        return cls(
            user_name=config.chat_user_name,
            agent_name=config.chat_agent_name,
            eod_token=config.eod_token,
            seq_length=config.seq_length,
            train_on_prompt=config.train_on_prompt,
            split=config.split,
        )

    @property
    def format(self) -> ChatFormat:
        return ChatFormat(self.user_name, self.agent_name, self.eod_token)


# ---- reading transcripts ---------------------------------------------------------------------


def read_conversations(path: Path, chat_format: ChatFormat) -> list[list[Turn]]:
    """The conversations in a transcript .txt (any suffix but .jsonl) or a messages .jsonl."""
    if path.suffix == ".jsonl":
        return _read_messages_jsonl(path, chat_format)
    return parse_transcripts(read_text(path), chat_format, str(path))


def parse_transcripts(text: str, chat_format: ChatFormat, origin: str) -> list[list[Turn]]:
    names = "|".join(re.escape(n) for n in (chat_format.user_name, chat_format.agent_name))
    # a turn starts the example or follows a blank line, so "User:" inside a reply is text
    turn_start = re.compile(rf"(?:^|\n[ \t]*\n)({names}):")
    conversations = []
    line = 1
    for chunk in text.split(chat_format.eod_token):
        body = chunk.strip()
        if body:
            first_line = line + chunk[: chunk.index(body)].count("\n")
            where = f"{origin}, example at line {first_line}"
            parts = turn_start.split(body)  # [prefix, name, text, name, text, ...]
            turns = [Turn("system", parts[0].strip())] if parts[0].strip() else []
            for name, content in zip(parts[1::2], parts[2::2], strict=True):
                role = "user" if name == chat_format.user_name else "agent"
                turns.append(Turn(role, content.strip()))
            _check_conversation(turns, where, chat_format)
            conversations.append(turns)
        line += chunk.count("\n")
    return conversations


def _read_messages_jsonl(path: Path, chat_format: ChatFormat) -> list[list[Turn]]:
    conversations = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise NeoxlabError(f"{where} is not valid JSON: {err.msg}") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list):
            raise NeoxlabError(f'{where} has no "messages" list')
        turns = []
        for message in messages:
            role = JSONL_ROLES.get(message.get("role")) if isinstance(message, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if role is None or not isinstance(content, str):
                raise NeoxlabError(
                    f"{where}: a message must be {{role: system|user|assistant, content: text}}, "
                    f"got {message!r}"
                )
            turns.append(Turn(role, content.strip()))
        _check_conversation(turns, where, chat_format)
        conversations.append(turns)
    return conversations


def _check_conversation(turns: list[Turn], where: str, chat_format: ChatFormat) -> None:
    names = {"user": chat_format.user_name, "agent": chat_format.agent_name}
    if not turns or turns[-1].role != "agent":
        raise NeoxlabError(
            f"{where} does not end with an '{chat_format.agent_name}:' turn", hint=FORMAT_HINT
        )
    for index, turn in enumerate(turns):
        if turn.role == "system" and index:
            raise NeoxlabError(f"{where}: a system message may only come first")
        if not turn.text:
            raise NeoxlabError(f"{where} has an empty '{names.get(turn.role, turn.role)}' turn")


# ---- tokenizing ------------------------------------------------------------------------------


def encode_conversation(
    tokenizer: Tokenizer, turns: Sequence[Turn], chat_format: ChatFormat, train_on_prompt: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, labels) of one conversation; labels are IGNORE_INDEX where not learned.

    `tokenizer` must have no post-processor (see `_offsets_tokenizer`): its offsets are then the
    untrimmed character spans, so a token's first character tells which piece it belongs to.
    """
    learned_parts = {"reply", "user"} if train_on_prompt else {"reply"}
    pieces = chat_format.pieces(turns)
    starts = np.cumsum([0] + [len(text) for text, _ in pieces[:-1]])
    learned = np.array([part in learned_parts for _, part in pieces])
    encoding = tokenizer.encode("".join(text for text, _ in pieces))
    ids = np.array(encoding.ids, dtype=np.int64)
    first_characters = [start for start, _ in encoding.offsets]
    piece = np.searchsorted(starts, first_characters, side="right") - 1
    return ids, np.where(learned[piece], ids, IGNORE_INDEX)


def _offsets_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    # ByteLevel's post-processor trims spaces off the offsets (" I" -> "I"), and a template
    # post-processor would add tokens that `encode` at generation time does not: drop it.
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.post_processor = None
    return copy


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


# ---- preparing and loading -------------------------------------------------------------------


def prepare_chat(
    source: Path,
    tokenizer: Tokenizer,
    options: ChatOptions,
    out_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Tokenize `source` into a prepared folder in out_dir (default: beside it); reuse one there."""
    if not source.is_file():
        raise NeoxlabError(f"chat data {source} does not exist")
    digest = hashlib.sha256(tokenizer_digest(tokenizer).encode())
    digest.update(source.read_bytes())
    digest.update(json.dumps(dataclasses.asdict(options), sort_keys=True).encode())
    folder = (out_dir or source.parent) / f"{source.stem}.{digest.hexdigest()[:8]}.chat"
    if (folder / META_FILE).is_file():
        return folder
    log(f"tokenizing chat data {source.name} -> {folder.name}")
    conversations = read_conversations(source, options.format)
    if not conversations:
        raise NeoxlabError(f"chat data {source} holds no examples", hint=FORMAT_HINT)
    counts = split_counts(len(conversations), options.split)
    offsets_tokenizer = _offsets_tokenizer(tokenizer)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:  # written under a temporary name, renamed when complete
        splits = {}
        first = 0
        for split, count in zip(SPLITS, counts, strict=True):
            chunk = conversations[first : first + count]
            first += count
            if chunk:
                splits[split] = _write_split(tmp / split, chunk, offsets_tokenizer, options)
        meta = {
            "format": META_FORMAT,
            "version": META_VERSION,
            "source": str(source),
            "tokenizer_sha256": tokenizer_digest(tokenizer),
            "options": dataclasses.asdict(options),
            "splits": splits,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there if something failed
    return folder


def _write_split(
    prefix: Path, conversations: list[list[Turn]], tokenizer: Tokenizer, options: ChatOptions
) -> dict[str, int]:
    counts = {"examples": 0, "dropped": 0, "tokens": 0, "learned_tokens": 0}
    text_dtype = best_dtype(tokenizer.get_vocab_size())
    with (
        IndexedDatasetWriter(f"{prefix}_text_document", text_dtype) as text,
        # int32 as gpt-neox writes labels: they hold -100
        IndexedDatasetWriter(f"{prefix}_label_document", np.int32) as labels,
    ):
        for turns in conversations:
            ids, example_labels = encode_conversation(
                tokenizer, turns, options.format, options.train_on_prompt
            )
            if len(ids) > options.seq_length:
                counts["dropped"] += 1
                continue
            text.add_document(ids)
            labels.add_document(example_labels)
            counts["examples"] += 1
            counts["tokens"] += len(ids)
            counts["learned_tokens"] += int((example_labels != IGNORE_INDEX).sum())
    return counts


@dataclass
class ChatExamples:
    """The tokenized examples of one split and their labels, one indexed document each."""

    tokens: IndexedDataset
    labels: IndexedDataset

    def __len__(self) -> int:
        return len(self.tokens)

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, next-token targets) of example `index`; both one shorter than it."""
        return self.tokens[index][:-1], self.labels[index][1:]


def load_prepared_chat(
    folder: Path, tokenizer: Tokenizer, options: ChatOptions
) -> tuple[dict[str, ChatExamples], dict]:
    """The examples per split of a prepared folder, checked against tokenizer and options."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise NeoxlabError(f"{folder} is not a prepared chat dataset: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise NeoxlabError(f"{folder / META_FILE} is not a neoxlab chat dataset description")
    if meta["tokenizer_sha256"] != tokenizer_digest(tokenizer):
        raise NeoxlabError(
            f"chat data {folder} was tokenized with a different tokenizer than the model's",
            hint="prepare it again with the model's tokenizer (or give the source file)",
        )
    wanted = dataclasses.asdict(options)
    differ = [k for k, v in meta["options"].items() if wanted.get(k) != v]
    if differ:
        prepared = ", ".join(f"{k.replace('_', '-')} {meta['options'][k]!r}" for k in differ)
        configured = ", ".join(f"{wanted.get(k)!r}" for k in differ)
        raise NeoxlabError(
            f"chat data {folder} was prepared with {prepared}; the config says {configured}",
            hint="use the same values in the config, or give the source file as data-path",
        )
    examples = {
        split: ChatExamples(
            IndexedDataset(folder / f"{split}_text_document"),
            IndexedDataset(folder / f"{split}_label_document"),
        )
        for split, counts in meta["splits"].items()
        if counts["examples"]
    }
    for split in ("train", "validation"):
        if split not in examples:
            raise NeoxlabError(
                f"chat data {meta['source']} has no {split} examples "
                f"of at most seq-length {options.seq_length} tokens",
                hint="add examples, raise seq-length, or change `split` (e.g. 900,100,0)",
            )
    return examples, meta


def describe(meta: dict) -> str:
    """One line: examples per split and how many were dropped for being too long."""
    splits = meta["splits"]
    kept = ", ".join(f"{counts['examples']} {split}" for split, counts in splits.items())
    dropped = sum(counts["dropped"] for counts in splits.values())
    total = dropped + sum(counts["examples"] for counts in splits.values())
    learned = sum(counts["learned_tokens"] for counts in splits.values())
    tokens = sum(counts["tokens"] for counts in splits.values())
    return (
        f"chat examples: {kept}; dropped {dropped} of {total} longer than seq-length "
        f"{meta['options']['seq_length']} tokens; {learned:,} of {tokens:,} tokens learned"
    )


# ---- batches ---------------------------------------------------------------------------------


@dataclass
class PackedBatch(Batch):
    """Rows that hold several examples: positions restart at 0 at each example, and attention
    stays within it (segment_ids number the examples of a row)."""

    position_ids: torch.Tensor
    segment_ids: torch.Tensor

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.inputs, self.targets, self.position_ids, self.segment_ids)

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(*(t.to(device, non_blocking=True) for t in self._tensors()))

    def rows(self, start: int, stop: int) -> PackedBatch:
        return PackedBatch(*(t[start:stop] for t in self._tensors()))

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        return {"position_ids": self.position_ids, "segment_ids": self.segment_ids}


class ChatSampler:
    """Batches of whole examples: one a row, padded (targets masked), or packed several a row.

    Examples are visited in epochs, each a permutation seeded by (seed, stream, epoch); the rows
    of step s are rows [s * count, (s + 1) * count) of that endless sequence, so a batch depends
    only on (step, count, stream): not on world size, nor on the steps before (resume).
    """

    def __init__(
        self, examples: ChatExamples, seq_length: int, seed: int, pad_id: int, pack: bool
    ) -> None:
        self.examples = examples
        self.lengths = examples.tokens.sizes.astype(np.int64) - 1  # inputs per example
        if int(self.lengths.max()) > seq_length:
            raise NeoxlabError(f"a chat example is longer than seq-length {seq_length}")
        self.seq_length = seq_length
        self.seed = seed
        self.pad_id = pad_id
        self.pack = pack
        self._epochs: dict[tuple[int, int], list[list[int]]] = {}

    def epoch_rows(self, epoch: int, stream: int = TRAIN_STREAM) -> list[list[int]]:
        """The examples of each row of one epoch."""
        key = (stream, epoch)
        if key not in self._epochs:
            rng = np.random.default_rng([self.seed, stream, epoch])
            order = [int(i) for i in rng.permutation(len(self.examples))]
            self._epochs[key] = self._pack(order) if self.pack else [[i] for i in order]
        return self._epochs[key]

    def _pack(self, order: list[int]) -> list[list[int]]:
        # in epoch order, a new row whenever the next example does not fit
        rows: list[list[int]] = [[]]
        used = 0
        for index in order:
            if used + self.lengths[index] > self.seq_length:
                rows.append([])
                used = 0
            rows[-1].append(index)
            used += self.lengths[index]
        return rows

    def _rows(self, first: int, count: int, stream: int) -> list[list[int]]:
        selected: list[list[int]] = []
        epoch, epoch_start = 0, 0
        while len(selected) < count:
            rows = self.epoch_rows(epoch, stream)
            wanted = first + len(selected) - epoch_start
            if wanted < len(rows):
                selected.extend(rows[wanted : wanted + count - len(selected)])
            epoch, epoch_start = epoch + 1, epoch_start + len(rows)
        return selected

    def batch(self, step: int, count: int, stream: int = TRAIN_STREAM) -> Batch:
        shape = (count, self.seq_length)
        inputs = np.full(shape, self.pad_id, dtype=np.int64)
        targets = np.full(shape, IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros(shape, dtype=np.int64)
        segments = np.zeros(shape, dtype=np.int64)
        for row, members in enumerate(self._rows(step * count, count, stream)):
            start = 0
            for segment, index in enumerate(members):
                example_inputs, example_targets = self.examples.pair(index)
                end = start + len(example_inputs)
                inputs[row, start:end] = example_inputs
                targets[row, start:end] = example_targets
                positions[row, start:end] = np.arange(end - start)
                segments[row, start:end] = segment
                start = end
            # padding is a segment of its own: no example attends to it, its targets are masked
            positions[row, start:] = np.arange(self.seq_length - start)
            segments[row, start:] = len(members)
        tensors = [torch.from_numpy(a) for a in (inputs, targets, positions, segments)]
        if self.pack:
            return PackedBatch(*tensors)
        # one example a row, from position 0, padding after it: causal attention never
        # reaches the padding, so the default positions and mask are already right
        return Batch(tensors[0], tensors[1])
