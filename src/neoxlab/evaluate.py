"""Validation metrics: loss, perplexity and next-token accuracy on fixed windows; for code, also
bits per byte and line completion (exact match, edit similarity, BLEU).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
from tokenizers import Tokenizer, decoders
from torch import nn
from tqdm import tqdm

from neoxlab.data.batches import EVAL_STREAM, IGNORE_INDEX, Sampler
from neoxlab.errors import NeoxlabError
from neoxlab.runtime import Runtime
from neoxlab.tokenizer import encode

if TYPE_CHECKING:
    from neoxlab.config import Config
    from neoxlab.data.prepare import PreparedData

# The code metrics, as `evaluate_run` returns them (metrics.jsonl prefixes them with val/).
CODE_METRICS = ("bits_per_byte", "line_exact_match", "line_edit_similarity", "bleu")
# Fixed, not the config's seed: runs with different seeds still complete the same lines.
LINE_COMPLETION_SEED = 0
# A completion stops at the first newline; this caps one that never produces one.
LINE_MAX_NEW_TOKENS = 64
T = TypeVar("T")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    sampler: Sampler,
    iters: int,
    batch_size: int,
    runtime: Runtime,
    token_bytes: torch.Tensor | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Mean token loss, perplexity and accuracy over `iters` batches; with `token_bytes` (see
    token_byte_lengths) also bits per byte; with `progress`, a bar over the batches.

    The windows are the same at every call (fixed stream, indices and validation seed), so
    evaluations along a run, and across runs of any seed on the same data, are comparable.
    """
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=runtime.device)
    correct = torch.zeros((), dtype=torch.int64, device=runtime.device)
    byte_count = torch.zeros((), dtype=torch.int64, device=runtime.device)
    token_count = torch.zeros((), dtype=torch.int64, device=runtime.device)  # no sync per batch
    for index in progress_bar(range(iters), "validation batches", "batch", progress):
        batch = sampler.batch(index, batch_size, stream=EVAL_STREAM).to(runtime.device)
        with runtime.autocast():
            logits, loss = model(batch.inputs, batch.targets, **batch.model_kwargs())
        counted = batch.targets != IGNORE_INDEX
        tokens = counted.sum()
        total_loss += loss.double() * tokens
        correct += ((logits.argmax(dim=-1) == batch.targets) & counted).sum()
        if token_bytes is not None:
            byte_count += token_bytes[batch.targets.clamp(min=0)][counted].sum()
        token_count += tokens
    model.train(was_training)
    count = token_count.item()
    loss = total_loss.item() / count
    result = {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "acc": correct.item() / count,
    }
    if token_bytes is not None and byte_count.item():
        # Nats over all predicted tokens (end-of-document included) per byte of their text.
        result["bits_per_byte"] = total_loss.item() / math.log(2) / byte_count.item()
    return result


def evaluate_run(
    model: nn.Module,
    sampler: Sampler,
    data: PreparedData,
    config: Config,
    batch_size: int,
    runtime: Runtime,
    *,
    iters: int | None = None,
    generate: bool = True,
    progress: bool = False,
) -> dict[str, float]:
    """`evaluate` on the validation windows and, with `code-metrics` on, the code metrics:
    bits per byte and (unless `generate` is false) line completion on validation documents;
    `progress` shows bars over the batches and the lines (`neoxlab eval`, not the trainer's
    evaluations, which its own bar surrounds)."""
    token_bytes = None
    if config.code_metrics:
        token_bytes = token_byte_lengths(data.tokenizer).to(runtime.device)
    iters = iters or config.eval_iters
    result = evaluate(model, sampler, iters, batch_size, runtime, token_bytes, progress)
    if config.code_metrics and generate:
        if data.validation_texts is None:
            raise NeoxlabError(
                "code-metrics needs the validation documents' text for line completion",
                hint="set data-path to a .jsonl or .txt file (e.g. neoxlab prepare python-stdlib)",
            )
        prompt_tokens = line_prompt_tokens(config.seq_length)
        samples = sample_lines(data.validation_texts, config.line_completion_samples)
        completions = line_completion(
            model, data.tokenizer, samples, data.eod_id, prompt_tokens, progress=progress
        )
        result.update(completions)
    return result


def progress_bar(items: Iterable[T], description: str, unit: str, enabled: bool) -> Iterable[T]:
    """`items` with a tqdm bar on stderr when `enabled` and stderr is a terminal (tqdm's own
    rule); the bar is gone once done, leaving the results alone on the screen."""
    return tqdm(items, desc=description, unit=unit, disable=None if enabled else True, leave=False)


def format_code_metrics(result: dict[str, float]) -> str:
    """The code metrics in `result` for a console line ('' when there are none)."""
    labels = {
        "bits_per_byte": ("bits/byte", "{:.3f}"),
        "line_exact_match": ("line exact match", "{:.3f}"),
        "line_edit_similarity": ("edit similarity", "{:.3f}"),
        "bleu": ("BLEU (tokenize=none)", "{:.1f}"),
    }
    return "".join(
        f" | {label} {form.format(result[name])}"
        for name, (label, form) in labels.items()
        if name in result
    )


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """The UTF-8 length of the text each token id stands for; special tokens count 0 bytes.

    Bits per byte divide a loss by these bytes, so tokenizers of any vocabulary compare.
    """
    added = tokenizer.get_added_tokens_decoder()
    byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
    lengths = []
    for identifier in range(tokenizer.get_vocab_size()):
        token = added.get(identifier)
        if token is not None:
            lengths.append(0 if token.special else len(token.content.encode("utf-8")))
        elif byte_level:
            # A byte-level token spells one character per byte (GPT-2's byte-to-unicode map).
            lengths.append(len(tokenizer.id_to_token(identifier)))
        else:
            lengths.append(len(tokenizer.decode([identifier]).encode("utf-8")))
    return torch.tensor(lengths, dtype=torch.int64)


@dataclass(frozen=True)
class LineSample:
    """A line cut at a random point: the model sees `prefix` and should write `target`."""

    prefix: str  # the document up to the cut
    target: str  # the rest of the line, without the newline and trailing whitespace


def sample_lines(
    texts: Sequence[str], count: int, seed: int = LINE_COMPLETION_SEED
) -> list[LineSample]:
    """`count` non-blank lines drawn (with `seed`) from `texts`, each cut at a random point
    between its indentation and its last non-blank character."""
    lines = []  # (text index, start, end) of every non-blank line
    for index, text in enumerate(texts):
        start = 0
        for line in text.split("\n"):
            if line.strip():
                lines.append((index, start, start + len(line.rstrip())))
            start += len(line) + 1
    rng = random.Random(seed)
    samples = []
    for index, start, end in rng.sample(lines, min(count, len(lines))):
        text = texts[index]
        line = text[start:end]
        cut = start + rng.randrange(len(line) - len(line.lstrip()), len(line))
        samples.append(LineSample(text[:cut], text[cut:end]))
    return samples


@torch.no_grad()
def line_completion(
    model: nn.Module,
    tokenizer: Tokenizer,
    samples: Sequence[LineSample],
    eod_id: int,
    prompt_tokens: int,
    progress: bool = False,
) -> dict[str, float]:
    """Greedy completion of each sample's line: exact match rate, mean edit similarity and
    corpus BLEU (sacrebleu, tokenize="none": tokens are the whitespace-separated words);
    `progress` shows a bar over the lines."""
    if not samples:
        raise NeoxlabError("the validation documents have no non-blank line to complete")
    was_training = model.training
    model.eval()
    predictions = [
        complete_line(model, tokenizer, sample.prefix, eod_id, prompt_tokens)
        for sample in progress_bar(samples, "line completions", "line", progress)
    ]
    model.train(was_training)
    return line_completion_scores(predictions, [sample.target for sample in samples])


@torch.no_grad()
def complete_line(
    model: nn.Module, tokenizer: Tokenizer, prefix: str, eod_id: int, prompt_tokens: int
) -> str:
    """The model's greedy completion of the line `prefix` ends in, as line completion scores
    it: at most LINE_MAX_NEW_TOKENS tokens, up to the first newline, trailing spaces dropped."""
    # Training saw each document after an end-of-document token: so does the prompt.
    ids = [eod_id, *encode(tokenizer, prefix)][-prompt_tokens:]
    device = next(model.parameters()).device
    stream = model.generate(
        torch.tensor([ids], device=device),
        LINE_MAX_NEW_TOKENS,
        temperature=0.0,
        eos_token_id=eod_id,
    )
    new_ids: list[int] = []
    completion = ""
    for token in stream:
        new_ids.append(int(token[0]))
        completion = tokenizer.decode(new_ids, skip_special_tokens=True)
        if "\n" in completion:
            break
    return completion.split("\n", 1)[0].rstrip()


def line_prompt_tokens(seq_length: int) -> int:
    """How many tokens of the file a line-completion prompt keeps: room is left for the
    completion inside the context the model was trained on."""
    return max(seq_length - LINE_MAX_NEW_TOKENS, seq_length // 2)


def line_completion_scores(predictions: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """Exact match rate, mean edit similarity and corpus BLEU (0-100) of predicted line ends."""
    import sacrebleu  # only code runs need it

    pairs = list(zip(predictions, targets, strict=True))
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(targets)], tokenize="none")
    return {
        "line_exact_match": sum(p == t for p, t in pairs) / len(pairs),
        "line_edit_similarity": sum(edit_similarity(p, t) for p, t in pairs) / len(pairs),
        "bleu": bleu.score,
    }


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein distance / length of the longer string (1.0 for two empty strings)."""
    if not a and not b:
        return 1.0
    return 1.0 - levenshtein(a, b) / max(len(a), len(b))


def levenshtein(a: str, b: str) -> int:
    """Fewest single-character insertions, deletions and substitutions turning a into b."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            )
        previous = current
    return previous[-1]
