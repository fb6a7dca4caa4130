"""Chat data: parsing, loss masks, prepared folders, padded and packed batches."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neoxlab.cli import main
from neoxlab.data.batches import IGNORE_INDEX
from neoxlab.data.chat import (
    ChatFormat,
    ChatOptions,
    ChatSampler,
    Turn,
    encode_conversation,
    load_prepared_chat,
    parse_transcripts,
    prepare_chat,
    read_conversations,
)
from neoxlab.data.indexed import IndexedDataset
from neoxlab.errors import NeoxlabError
from neoxlab.model import GPTNeoX, ModelConfig
from neoxlab.tokenizer import save_tokenizer, train_bpe

CHAT_EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "chat_example.txt"
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([CHAT_EXAMPLE.read_text(encoding="utf-8")], 300)


def learned_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode(
        [int(i) for i in labels if i != IGNORE_INDEX], skip_special_tokens=False
    )


def masked_text(tokenizer, ids, labels) -> str:
    kept = [int(i) for i, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX]
    return tokenizer.decode(kept, skip_special_tokens=False)


# ---- parsing ---------------------------------------------------------------------------------


def test_parses_the_users_format():
    text = (
        "User: I have a question about life\n\nAgent: I have the answer to your question."
        f"{EOT}\n"
        "You are terse.\n\nUser:  hi \n\nAgent: Hello.\nSecond line.\n\nUser: bye\n\n"
        f"Agent: Bye!{EOT}"
    )
    conversations = parse_transcripts(text, ChatFormat(), "x.txt")
    assert conversations == [
        [
            Turn("user", "I have a question about life"),
            Turn("agent", "I have the answer to your question."),
        ],
        [
            Turn("system", "You are terse."),
            Turn("user", "hi"),
            Turn("agent", "Hello.\nSecond line."),
            Turn("user", "bye"),
            Turn("agent", "Bye!"),
        ],
    ]


def test_the_example_file_parses():
    conversations = read_conversations(CHAT_EXAMPLE, ChatFormat())
    assert len(conversations) >= 30
    assert any(len(c) > 2 for c in conversations)  # some are multi-turn


def test_speaker_names_are_configurable():
    chat = ChatFormat(user_name="Human", agent_name="Bot")
    text = f"Human: hi\n\nBot: hello, User: is just text here{EOT}"
    assert parse_transcripts(text, chat, "x") == [
        [Turn("user", "hi"), Turn("agent", "hello, User: is just text here")]
    ]
    assert chat.text([Turn("user", "hi")], add_generation_prompt=True) == "Human: hi\n\nBot:"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f"User: a\n\nAgent: b{EOT}\n\nUser: only a question{EOT}",
            "line 5 does not end with an 'Agent:'",
        ),
        (f"User: a\n\nAgent:{EOT}", "empty 'Agent' turn"),
    ],
)
def test_malformed_examples_are_clear_errors(text, message):
    with pytest.raises(NeoxlabError, match=message):
        parse_transcripts(text, ChatFormat(), "x.txt")


def test_jsonl_messages(tmp_path):
    path = tmp_path / "chat.jsonl"
    records = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_conversations(path, ChatFormat())[1] == [
        Turn("system", "Be brief."),
        Turn("user", "2+2?"),
        Turn("agent", "4"),
    ]
    path.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(NeoxlabError, match="line 1: a message must be"):
        read_conversations(path, ChatFormat())


# ---- masks -----------------------------------------------------------------------------------


def test_only_replies_and_their_end_are_learned(tokenizer):
    turns = [
        Turn("system", "Be nice."),
        Turn("user", "hi"),
        Turn("agent", "Hello there."),
        Turn("user", "bye"),
        Turn("agent", "Bye now."),
    ]
    ids, labels = encode_conversation(tokenizer, turns, ChatFormat(), train_on_prompt=False)
    # the tokens are those of the whole text: what generation sees for the same prefix
    assert ids.tolist() == tokenizer.encode(ChatFormat().text(turns)).ids
    assert learned_text(tokenizer, ids, labels) == f" Hello there.\n\n Bye now.{EOT}"
    assert masked_text(tokenizer, ids, labels) == (
        "Be nice.\n\nUser: hi\n\nAgent:User: bye\n\nAgent:"
    )
    ids, labels = encode_conversation(tokenizer, turns, ChatFormat(), train_on_prompt=True)
    assert masked_text(tokenizer, ids, labels) == "Be nice.\n\nAgent:Agent:"


# ---- prepared folders ------------------------------------------------------------------------


def test_prepare_drops_long_examples_and_writes_gpt_neox_files(tokenizer, tmp_path):
    source = tmp_path / "chat.txt"
    source.write_text(CHAT_EXAMPLE.read_text())
    options = ChatOptions(seq_length=80)
    folder = prepare_chat(source, tokenizer, options, log=lambda _: None)
    examples, meta = load_prepared_chat(folder, tokenizer, options)
    counts = meta["splits"]
    total = len(read_conversations(source, ChatFormat()))
    lengths = [
        len(tokenizer.encode(ChatFormat().text(c)).ids)
        for c in read_conversations(source, ChatFormat())
    ]
    assert sum(c["dropped"] for c in counts.values()) == sum(n > 80 for n in lengths) > 0
    assert sum(c["examples"] + c["dropped"] for c in counts.values()) == total
    assert len(examples["train"]) == counts["train"]["examples"]
    # gpt-neox's layout: tokens and labels as indexed datasets, labels -100 where masked
    text = IndexedDataset(folder / "train_text_document")
    labels = IndexedDataset(folder / "train_label_document")
    assert labels.dtype == np.int32 and (text.sizes == labels.sizes).all()
    first, first_labels = text[0], labels[0]
    assert ((first_labels == first) | (first_labels == IGNORE_INDEX)).all()
    assert first_labels[-1] == first[-1] == tokenizer.token_to_id(EOT)
    assert int(text.sizes.max()) <= 80
    # prepared once: the same inputs reuse the folder, other options make another
    assert prepare_chat(source, tokenizer, options, log=print) == folder
    assert prepare_chat(source, tokenizer, ChatOptions(seq_length=90), log=print) != folder


def test_prepared_folder_must_match_tokenizer_and_options(tokenizer, tmp_path):
    source = tmp_path / "chat.txt"
    source.write_text(CHAT_EXAMPLE.read_text())
    folder = prepare_chat(source, tokenizer, ChatOptions(), log=lambda _: None)
    with pytest.raises(NeoxlabError, match="train-on-prompt False"):
        load_prepared_chat(folder, tokenizer, ChatOptions(train_on_prompt=True))
    other = train_bpe([CHAT_EXAMPLE.read_text()], 280)
    with pytest.raises(NeoxlabError, match="different tokenizer"):
        load_prepared_chat(folder, other, ChatOptions())


def test_prepare_chat_command(tokenizer, tmp_path, capsys):
    save_tokenizer(tokenizer, tmp_path / "tok")
    out = tmp_path / "prepared"
    argv = ["prepare", "chat", str(CHAT_EXAMPLE), "--tokenizer", str(tmp_path / "tok")]
    assert main([*argv, "--out", str(out), "--seq-length", "80"]) == 0
    printed = capsys.readouterr().out
    assert "longer than seq-length 80 tokens" in printed and "dropped" in printed
    assert len(list(out.glob("chat_example.*.chat/chat.json"))) == 1
    assert main([*argv, "--user-name", "A:B"]) == 2
    assert "chat-user-name must be a name" in capsys.readouterr().err


# ---- batches ---------------------------------------------------------------------------------


@pytest.fixture
def examples(tokenizer, tmp_path):
    source = tmp_path / "chat.txt"
    source.write_text(CHAT_EXAMPLE.read_text())
    options = ChatOptions(seq_length=96)
    folder = prepare_chat(source, tokenizer, options, log=lambda _: None)
    return load_prepared_chat(folder, tokenizer, options)[0]["train"]


def test_padded_batches_cover_each_example_once_per_epoch(examples):
    sampler = ChatSampler(examples, 96, seed=7, pad_id=1, pack=False)
    n = len(examples)
    epochs = [index for epoch in (0, 1) for (index,) in sampler.epoch_rows(epoch)]
    assert sorted(epochs[:n]) == list(range(n))  # each example once per epoch
    step = n // 3  # its rows run past the end of the first epoch
    crossing = sampler.batch(step, 3)
    for row, index in enumerate(epochs[3 * step : 3 * step + 3]):
        inputs = examples.pair(index)[0]
        assert crossing.inputs[row, : len(inputs)].tolist() == inputs.tolist()
    batch = sampler.batch(0, 4)
    for row, (index,) in zip(range(4), sampler.epoch_rows(0)[:4], strict=True):
        inputs, targets = examples.pair(index)
        assert batch.inputs[row, : len(inputs)].tolist() == inputs.tolist()
        assert batch.targets[row, : len(inputs)].tolist() == targets.tolist()
        assert (batch.inputs[row, len(inputs) :] == 1).all()  # <|padding|>
        assert (batch.targets[row, len(inputs) :] == IGNORE_INDEX).all()
    # world-size independent: a step's batch is the same whoever asks for it and when
    again = ChatSampler(examples, 96, seed=7, pad_id=1, pack=False)
    assert torch.equal(again.batch(5, 8).inputs, sampler.batch(5, 8).inputs)
    assert torch.equal(sampler.batch(5, 8).rows(2, 4).inputs, sampler.batch(5, 8).inputs[2:4])


def test_packed_rows_restart_positions_and_keep_examples_apart(examples):
    sampler = ChatSampler(examples, 192, seed=7, pad_id=1, pack=True)
    rows = sampler.epoch_rows(0)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert any(len(row) > 1 for row in rows)
    batch = sampler.batch(0, len(rows))
    kwargs = batch.model_kwargs()
    for row, members in enumerate(rows):
        start = 0
        for segment, index in enumerate(members):
            length = len(examples.pair(index)[0])
            span = slice(start, start + length)
            assert kwargs["position_ids"][row, span].tolist() == list(range(length))
            assert (kwargs["segment_ids"][row, span] == segment).all()
            start += length


def tiny_model() -> GPTNeoX:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=384,
        hidden_size=32,
        num_layers=2,
        num_attention_heads=4,
        max_position_embeddings=192,
    )
    return GPTNeoX(config).eval()


def test_packed_loss_equals_padded_loss(examples):
    """The same examples, packed or one a row: the same mean loss (DESIGN: to 1e-5)."""
    model = tiny_model()
    padded = ChatSampler(examples, 192, seed=3, pad_id=1, pack=False)
    packed = ChatSampler(examples, 192, seed=3, pad_id=1, pack=True)
    a = padded.batch(0, len(examples))  # a whole epoch: every example once
    b = packed.batch(0, len(packed.epoch_rows(0)))
    assert b.inputs.size(0) < a.inputs.size(0)
    with torch.no_grad():
        _, padded_loss = model(a.inputs, a.targets, **a.model_kwargs())
        _, packed_loss = model(b.inputs, b.targets, **b.model_kwargs())
    assert abs(float(padded_loss) - float(packed_loss)) < 1e-5


def test_segment_mask_stops_attention_between_packed_examples(examples):
    model = tiny_model()
    sampler = ChatSampler(examples, 192, seed=3, pad_id=1, pack=True)
    row = next(i for i, members in enumerate(sampler.epoch_rows(0)) if len(members) > 1)
    batch = sampler.batch(row, 1)
    kwargs = batch.model_kwargs()
    first = kwargs["segment_ids"][0] == 0
    changed = batch.inputs.clone()
    changed[0, first] = torch.randint(2, 300, (int(first.sum()),))  # rewrite example 0 only
    with torch.no_grad():
        before, _ = model(batch.inputs, **kwargs)
        after, _ = model(changed, **kwargs)
    torch.testing.assert_close(before[0, ~first], after[0, ~first], atol=0, rtol=0)
    # without segment_ids the same rows do see each other
    with torch.no_grad():
        leaky = model(changed, position_ids=kwargs["position_ids"])[0]
        clean = model(batch.inputs, position_ids=kwargs["position_ids"])[0]
    assert not torch.allclose(leaky[0, ~first], clean[0, ~first])


def test_one_segment_mask_is_plain_causal_attention():
    model = tiny_model()
    ids = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain, _ = model(ids)
        masked, _ = model(ids, segment_ids=torch.zeros_like(ids))
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=1e-5)
