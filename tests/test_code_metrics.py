"""Code metrics: bits per byte and line completion (exact match, edit similarity, BLEU)."""

import io
import json
import math
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from torch import nn

from neoxlab.cli import main
from neoxlab.data.batches import Batch
from neoxlab.errors import NeoxlabError
from neoxlab.evaluate import (
    LineSample,
    edit_similarity,
    evaluate,
    levenshtein,
    line_completion,
    line_completion_scores,
    sample_lines,
    token_byte_lengths,
)
from neoxlab.runtime import resolve_runtime
from neoxlab.tokenizer import train_bpe, train_char

CODE = """import os


def area(width, height):
    \"\"\"Area of a rectangle.\"\"\"
    return width * height


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y
"""


# ---- edit similarity and BLEU on hand-made answers ----------------------------------------------


def test_levenshtein_and_edit_similarity():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("same", "same") == 0
    assert edit_similarity("abc", "abd") == pytest.approx(2 / 3)
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("", "x = 1") == 0.0


def test_line_completion_scores_hand_made():
    predictions = ["x = 1", "return a + b", "foo("]
    targets = ["x = 1", "return a - b", "bar()"]
    scores = line_completion_scores(predictions, targets)
    assert scores["line_exact_match"] == pytest.approx(1 / 3)
    # one substitution in 12 characters; foo( -> bar(): 3 substitutions + 1 insertion in 5
    assert scores["line_edit_similarity"] == pytest.approx((1 + 11 / 12 + 1 / 5) / 3)
    assert line_completion_scores(targets, targets)["bleu"] == pytest.approx(100.0)
    assert line_completion_scores(["p q r s"], ["w x y z"])["bleu"] == 0.0


def test_bleu_uses_whitespace_tokens():
    """tokenize="none": `f(x)` is one token, so `f(x)` against `f( x )` shares nothing."""
    scores = line_completion_scores(["f(x) + g(y)"], ["f( x ) + g( y )"])
    none = sacrebleu.corpus_bleu(["f(x) + g(y)"], [["f( x ) + g( y )"]], tokenize="none")
    default = sacrebleu.corpus_bleu(["f(x) + g(y)"], [["f( x ) + g( y )"]])
    assert scores["bleu"] == pytest.approx(none.score)
    assert none.score != pytest.approx(default.score)


# ---- sampling lines -----------------------------------------------------------------------------


def test_sample_lines_cuts_inside_nonblank_lines():
    samples = sample_lines([CODE], 100)
    nonblank = [line.rstrip() for line in CODE.split("\n") if line.strip()]
    assert len(samples) == len(nonblank)  # capped at the lines there are, each once
    for sample in samples:
        assert CODE.startswith(sample.prefix + sample.target)
        line_start = sample.prefix.rfind("\n") + 1
        line = CODE[line_start:].split("\n", 1)[0]
        assert sample.target  # something left to complete
        assert line.rstrip() == line[: len(sample.prefix) - line_start] + sample.target
        indent = len(line) - len(line.lstrip())
        assert len(sample.prefix) - line_start >= indent  # cut after the indentation
    # a fixed seed: the same lines and cuts every time
    assert sample_lines([CODE], 5) == sample_lines([CODE], 5)
    assert sample_lines([CODE], 5, seed=1) != sample_lines([CODE], 5)


# ---- line completion with a model whose answers are known ---------------------------------------


class ScriptedModel(nn.Module):
    """Answers each prompt with a scripted continuation, token by token (greedy or not)."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.answers = answers
        self.prompts: list[list[int]] = []

    def generate(self, input_ids, max_new_tokens, *, temperature, eos_token_id):
        assert temperature == 0.0  # line completion is greedy
        ids = input_ids[0].tolist()
        self.prompts.append(ids)
        prefix = self.tokenizer.decode(ids, skip_special_tokens=True)
        answer = self.answers[prefix]
        for token in self.tokenizer.encode(answer).ids[:max_new_tokens]:
            yield torch.tensor([token])


@pytest.fixture
def char_tokenizer():
    return train_char(CODE + "XYZ0123456789=")


def test_line_completion_exact_answers(char_tokenizer):
    samples = [
        LineSample("def area(width, ", "height): return width * height"),
        LineSample("class Po", "int: x = y = 0"),
    ]
    # The scripted model goes on past the line: everything after the newline is ignored.
    answers = {s.prefix: s.target + "\n    XYZ" for s in samples}
    model = ScriptedModel(char_tokenizer, answers)
    eod_id = char_tokenizer.token_to_id("<|endoftext|>")
    scores = line_completion(model, char_tokenizer, samples, eod_id, prompt_tokens=1000)
    assert scores == pytest.approx(
        {"line_exact_match": 1.0, "line_edit_similarity": 1.0, "bleu": 100.0}
    )
    # each prompt is the document so far, after an end-of-document token (as in training)
    assert [prompt[0] for prompt in model.prompts] == [eod_id, eod_id]


def test_line_completion_wrong_answers(char_tokenizer):
    samples = [LineSample("x = ", "width"), LineSample("y = ", "height")]
    answers = {"x = ": "width\n", "y = ": "heXYZ  \nheight"}  # trailing spaces do not count
    model = ScriptedModel(char_tokenizer, answers)
    eod_id = char_tokenizer.token_to_id("<|endoftext|>")
    scores = line_completion(model, char_tokenizer, samples, eod_id, prompt_tokens=1000)
    assert scores["line_exact_match"] == 0.5
    # heXYZ vs height: 3 substitutions and 1 insertion over 6 characters
    assert scores["line_edit_similarity"] == pytest.approx((1 + (1 - 4 / 6)) / 2)


def test_line_completion_keeps_the_last_prompt_tokens(char_tokenizer):
    samples = [LineSample(CODE[:40], CODE[40:45])]
    model = ScriptedModel(char_tokenizer, {CODE[30:40]: CODE[40:45]})
    eod_id = char_tokenizer.token_to_id("<|endoftext|>")
    scores = line_completion(model, char_tokenizer, samples, eod_id, prompt_tokens=10)
    assert len(model.prompts[0]) == 10
    assert scores["line_exact_match"] == 1.0


def test_line_completion_needs_lines(char_tokenizer):
    model = ScriptedModel(char_tokenizer, {})
    with pytest.raises(NeoxlabError, match="no non-blank line"):
        line_completion(model, char_tokenizer, [], 0, prompt_tokens=10)


# ---- bits per byte ------------------------------------------------------------------------------


def test_token_byte_lengths_count_utf8_bytes():
    tokenizer = train_bpe([CODE * 3, "naïve = '世界'\n"], 400)
    lengths = token_byte_lengths(tokenizer)
    text = CODE + "naïve = '世界'  # ünïcode\n"
    ids = tokenizer.encode(text).ids
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[tokenizer.token_to_id("<|endoftext|>")] == 0
    char = train_char("héllo")
    assert int(token_byte_lengths(char)[char.encode("héllo").ids].sum()) == 6


class UniformModel(nn.Module):
    """Predicts every token with the same probability: the loss is ln(vocab) per token."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, inputs, targets):
        logits = torch.zeros(*inputs.shape, self.vocab) + self.weight
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class FixedSampler:
    def __init__(self, ids):
        self.ids = torch.tensor([ids])

    def batch(self, step, count, stream=0):
        return Batch(self.ids[:, :-1], self.ids[:, 1:])


def test_bits_per_byte_hand_made():
    tokenizer = train_bpe([CODE], 300)
    eod_id = tokenizer.token_to_id("<|endoftext|>")
    # The targets are the tokens of "é = 1": 6 bytes ('é' takes 2), whatever the tokens are.
    ids = [eod_id, *tokenizer.encode("é = 1").ids]
    vocab = tokenizer.get_vocab_size()
    runtime = resolve_runtime("cpu", "auto", "false")
    lengths = token_byte_lengths(tokenizer)
    result = evaluate(UniformModel(vocab), FixedSampler(ids), 1, 1, runtime, token_bytes=lengths)
    expected = (len(ids) - 1) * math.log(vocab) / math.log(2) / 6
    assert result["bits_per_byte"] == pytest.approx(expected)
    assert "bits_per_byte" not in evaluate(UniformModel(vocab), FixedSampler(ids), 1, 1, runtime)


# ---- in training and `neoxlab eval` -------------------------------------------------------------


def code_folder(root: Path) -> Path:
    root.mkdir()
    for index in range(30):
        (root / f"module_{index}.py").write_text(
            f"import os\n\n\ndef function_{index}(value):\n    if value > {index}:\n"
            f"        return value - {index}\n    return os.sep * value\n\n\n"
            f"class Thing{index}:\n    size = {index}\n"
        )
    return root


class Terminal(io.StringIO):
    """stderr as a terminal: tqdm shows its bars there (and hides them in pipes and files)."""

    def isatty(self) -> bool:
        return True


def test_code_metrics_in_training_and_eval(tiny_overrides, tmp_path, capsys, monkeypatch):
    assert main(["prepare", "code", str(code_folder(tmp_path / "src")), "--out", "data"]) == 0
    data = Path("data/src_code.jsonl").resolve()
    overrides = [o for o in tiny_overrides if not o.startswith("data-path=")]
    argv = [
        "train",
        *overrides,
        f"data-path={data}",
        "code-metrics=true",
        "line-completion-samples=2",
        "eval-interval=20",
        "--name",
        "code",
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "bits/byte" in out and "line exact match" in out and "BLEU (tokenize=none)" in out
    run = next(Path("runs").glob("code-*"))
    evals = [
        record
        for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "val/loss" in record
    ]
    keys = ("val/bits_per_byte", "val/line_exact_match", "val/line_edit_similarity", "val/bleu")
    for record in evals:
        assert all(key in record for key in keys)
        assert 0 <= record["val/line_edit_similarity"] <= 1
        assert 0 < record["val/bits_per_byte"] < 20

    assert main(["eval", str(run), "--eval-iters", "2"]) == 0
    first = capsys.readouterr().out
    assert "line exact match" in first and "(2 validation lines, greedy)" in first
    assert main(["eval", str(run), "--eval-iters", "2"]) == 0
    assert capsys.readouterr().out == first  # fixed seeds: the same numbers every time
    # the last training evaluation and `neoxlab eval` see the same windows and lines
    last = evals[-1]
    assert f"bits/byte {last['val/bits_per_byte']:.3f}" in first
    assert f"edit similarity {last['val/line_edit_similarity']:.3f}" in first

    # on a terminal, bars over the batches and the lines say that work is going on
    for argv, bars in ((["eval", str(run)], True), (["eval", str(run), "--no-progress"], False)):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main([*argv, "--eval-iters", "2"]) == 0
        shown = terminal.getvalue()
        assert ("validation batches:" in shown and "/2 [" in shown) == bars, shown
        assert ("line completions:" in shown) == bars, shown
        assert capsys.readouterr().out == first


def test_code_metrics_need_document_text(tmp_path):
    from neoxlab.config import Config
    from neoxlab.data.prepare import PreparedData
    from neoxlab.evaluate import evaluate_run

    tokenizer = train_bpe([CODE], 300)
    data = PreparedData({}, tokenizer, tmp_path / "t.json", 0)  # a prepared prefix: no texts
    config = Config(code_metrics=True, eval_iters=1)
    ids = tokenizer.encode(CODE).ids
    runtime = resolve_runtime("cpu", "auto", "false")
    model = UniformModel(tokenizer.get_vocab_size())
    with pytest.raises(NeoxlabError, match="code-metrics needs the validation documents"):
        evaluate_run(model, FixedSampler(ids), data, config, 1, runtime)
