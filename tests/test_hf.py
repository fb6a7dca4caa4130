"""Hugging Face interop: import a Pythia-shaped folder, finetune on chat data, export, reload.

transformers cannot reach the Hub here, so the "Pythia" is a tiny random GPTNeoXForCausalLM with
a BPE tokenizer trained on the chat example file (<|endoftext|> = 0, <|padding|> = 1), saved the
way a downloaded Pythia is laid out.
"""

import io
import json
import os
import pickle
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch

from neoxlab.cli import main
from neoxlab.config import load_config
from neoxlab.data.chat import ChatFormat, Turn
from neoxlab.data.prepare import build_samplers
from neoxlab.errors import NeoxlabError
from neoxlab.hf import load_trained
from neoxlab.tokenizer import save_tokenizer, train_bpe
from neoxlab.tracking import read_metrics
from neoxlab.trainer import Trainer

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
CHAT_EXAMPLE = REPO / "data" / "chat_example.txt"
CHAT_CONFIG = REPO / "configs" / "chat_finetune.yml"
VOCAB_ROWS = 320  # more rows than tokens and not a multiple of 128, as Pythia's 50304 / 50277
PROMPT = "User: What is the capital of France?\n\nAgent:"


def make_tiny_pythia(folder: Path, hidden_act: str = "gelu", seed: int = 0) -> Path:
    tokenizer = train_bpe([CHAT_EXAMPLE.read_text(encoding="utf-8")], 300)
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB_ROWS,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        rotary_pct=0.5,
        rotary_emb_base=500.0,
        hidden_act=hidden_act,
        use_parallel_residual=True,
        layer_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(config)
    with torch.no_grad():  # random biases and norms too, so parity checks every parameter
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder


@pytest.fixture
def pythia(tmp_path) -> Path:
    # the chat data beside it: preparing writes its cache beside the source, not in the repo
    shutil.copyfile(CHAT_EXAMPLE, tmp_path / CHAT_EXAMPLE.name)
    return make_tiny_pythia(tmp_path / "tiny-pythia")


def hf_greedy(folder: Path, prompt: str, new_tokens: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=0, pad_token_id=1
        )
    return out[0, ids.size(1) :].tolist()


def neoxlab_greedy(path: Path, prompt: str, new_tokens: int) -> list[int]:
    trained = load_trained(path, torch.device("cpu"))
    ids = torch.tensor([trained.tokenizer.encode(prompt).ids])
    stream = trained.model.generate(ids, new_tokens, temperature=0, eos_token_id=0)
    return [int(token[0]) for token in stream]


def cli_greedy_text(path: Path, prompt: str, new_tokens: int, capsys) -> str:
    argv = ["generate", str(path), "--prompt", prompt, "--temperature", "0"]
    assert main([*argv, "--max-new-tokens", str(new_tokens), "--device", "cpu"]) == 0
    return capsys.readouterr().out


def finetune_overrides(pythia: Path, *extra: str) -> list[str]:
    return [
        f"init-from={pythia}",
        f"data-path={pythia.parent / CHAT_EXAMPLE.name}",
        "seq-length=96",
        "micro-batch-size=4",
        "global-batch-size=8",
        "train-iters=12",
        "lr=3e-3",
        "warmup=2",
        "eval-interval=6",
        "eval-iters=1",
        "save-interval=12",
        "sample-tokens=4",
        "device=cpu",
        *extra,
    ]


# ---- import -----------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_pytorch_tanh"])
def test_import_matches_transformers_greedy(tmp_path, capsys, hidden_act):
    folder = make_tiny_pythia(tmp_path / "pythia", hidden_act)
    trained = load_trained(folder, torch.device("cpu"))
    assert trained.model.config.activation == ("gelu" if hidden_act == "gelu" else "gelu_tanh")
    assert trained.model.config.vocab_size == VOCAB_ROWS
    ours = neoxlab_greedy(folder, PROMPT, 20)
    assert ours == hf_greedy(folder, PROMPT, 20)[: len(ours)]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([trained.tokenizer.encode(PROMPT).ids])
    with torch.no_grad():
        expected = hf_model(ids).logits
        logits, _ = trained.model(ids)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    # the CLI prints the same continuation
    text = cli_greedy_text(folder, PROMPT, 20, capsys)
    assert text == PROMPT + trained.tokenizer.decode(ours, skip_special_tokens=True) + "\n"


def test_legacy_pythia_files_load(pythia, tmp_path):
    """transformers-4 config.json keys and a pytorch_model.bin with fp16 weights and buffers."""
    legacy = tmp_path / "legacy"
    shutil.copytree(pythia, legacy)
    config = json.loads((legacy / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    config.pop("attention_bias")  # absent in old files: means True
    (legacy / "config.json").write_text(json.dumps(config))
    weights = transformers.AutoModelForCausalLM.from_pretrained(pythia).state_dict()
    weights["embed_out.weight"] = weights.pop("lm_head.weight")
    weights = {name: tensor.half() for name, tensor in weights.items()}
    for layer in range(2):  # buffers transformers 4.2x saved with Pythia's weights
        weights[f"gpt_neox.layers.{layer}.attention.bias"] = torch.ones(1, 1, 8, 8).bool().tril()
        weights[f"gpt_neox.layers.{layer}.attention.masked_bias"] = torch.tensor(-1e9)
        weights[f"gpt_neox.layers.{layer}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    (legacy / "model.safetensors").unlink()
    torch.save(weights, legacy / "pytorch_model.bin")

    new = load_trained(pythia, torch.device("cpu"))
    old = load_trained(legacy, torch.device("cpu"))
    assert old.model.config == new.model.config
    ids = torch.tensor([new.tokenizer.encode(PROMPT).ids])
    with torch.no_grad():
        torch.testing.assert_close(old.model(ids)[0], new.model(ids)[0], atol=2e-2, rtol=0)


def test_pickled_code_is_refused(pythia):
    (pythia / "model.safetensors").unlink()

    class Sneaky:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(pythia / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"gpt_neox.embed_in.weight": Sneaky()}, handle)
    with pytest.raises(NeoxlabError, match="refusing"):
        load_trained(pythia, torch.device("cpu"))


def test_shape_and_tokenizer_mismatches_are_clear(pythia, capsys):
    config = json.loads((pythia / "config.json").read_text())
    (pythia / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    assert main(["generate", str(pythia), "--prompt", "User:", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "of shape (32, 64), the model expects (32, 96)" in error, error
    (pythia / "config.json").write_text(json.dumps({**config, "vocab_size": 256}))
    assert main(["generate", str(pythia), "--prompt", "User:", "--device", "cpu"]) == 2
    assert "has 300 tokens but the model's embedding only 256 rows" in capsys.readouterr().err
    (pythia / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    assert main(["eval", str(pythia), "--device", "cpu"]) == 2
    assert "neoxlab runs GPT-NeoX models" in capsys.readouterr().err


def test_eval_a_hf_folder_on_chat_data(pythia, capsys):
    argv = [
        "eval",
        str(pythia),
        "data-format=chat",
        f"data-path={pythia.parent / CHAT_EXAMPLE.name}",
    ]
    assert main([*argv, "--eval-iters", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {pythia}\n" in out and "validation loss" in out


def test_init_from_on_text_data_uses_the_models_tokenizer(pythia, tiny_corpus):
    overrides = [f"init-from={pythia}", f"data-path={tiny_corpus}", "seq-length=32"]
    overrides += ["train-iters=2", "eval-iters=1", "sample-tokens=0", "save=false", "device=cpu"]
    trainer = Trainer(load_config([], overrides), progress=False, log=lambda _: None)
    assert trainer.data.tokenizer_file == pythia / "tokenizer.json"
    assert trainer.run().step == 2


def test_init_from_conflicting_model_key_is_an_error(pythia):
    config = load_config([CHAT_CONFIG], [*finetune_overrides(pythia), "hidden-size=64"])
    with pytest.raises(NeoxlabError, match=r"hidden-size 64 \(it has 32\)"):
        Trainer(config, progress=False, log=lambda _: None)


def test_init_from_context_shorter_than_seq_length_names_the_context(pythia, capsys):
    # chat_finetune.yml's seq-length 280 against a model of 128 positions: max-position-
    # embeddings is init-from's to decide, so the error is about seq-length
    assert main(["train", str(CHAT_CONFIG), f"init-from={pythia}", "device=cpu"]) == 2
    error = capsys.readouterr().err
    assert "has a context of 128 tokens: seq-length 280 must be at most that" in error, error
    assert "hint: set seq-length=128 or lower" in error and "max-position" not in error


def test_missing_default_init_from_names_the_download_command_of_the_config(tmp_path, capsys):
    (tmp_path / "configs").mkdir()
    shutil.copy(CHAT_CONFIG, tmp_path / "configs")  # its init-from: ../models/pythia-160m
    header = next(line for line in CHAT_CONFIG.read_text().splitlines() if "download" in line)
    assert main(["train", "configs/chat_finetune.yml"]) == 2
    error = capsys.readouterr().err
    assert "init-from models/pythia-160m does not exist" in error, error
    assert header.removeprefix("#").strip() in error


# ---- the whole path: import, finetune on chat data, export, reload ---------------------------


@pytest.fixture
def umask_027():
    """A umask that neither 0600 nor 0644 matches: files must get 0640, as open() gives them."""
    before = os.umask(0o027)
    yield
    os.umask(before)


def test_finetune_chat_then_export_round_trip(pythia, tmp_path, capsys, umask_027):
    config = load_config([CHAT_CONFIG], finetune_overrides(pythia))
    trainer = Trainer(config, progress=False, log=lambda _: None)
    # architecture and tokenizer came from the HF folder
    assert trainer.config.hidden_size == 32 and trainer.config.max_position_embeddings == 128
    assert trainer.model.config.vocab_size == VOCAB_ROWS
    imported = trainer.model.state_dict()
    hf_weights = transformers.AutoModelForCausalLM.from_pretrained(pythia).state_dict()
    assert torch.equal(imported["embed_out.weight"], hf_weights["lm_head.weight"])

    # masked tokens contribute nothing: a batch where only the padding differs gives the same
    # loss and the same gradients
    batch = trainer.train_sampler.batch(0, 4)
    padding = batch.targets == -100
    assert padding.any()
    noisy_inputs = torch.where(
        padding & (batch.inputs == 1), torch.randint_like(batch.inputs, 2, 300), batch.inputs
    )
    assert not torch.equal(noisy_inputs, batch.inputs)
    results = []
    for inputs in (batch.inputs, noisy_inputs):
        trainer.model.zero_grad()
        _, loss = trainer.model(inputs, batch.targets)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]))
    trainer.model.zero_grad()
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))

    result = trainer.run()
    metrics = read_metrics(result.run_dir)
    losses = [m["val/loss"] for m in metrics if "val/loss" in m]
    assert losses[-1] < losses[0]
    train_losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert train_losses[-1] < train_losses[0]

    assert main(["eval", str(result.run_dir), "--eval-iters", "1", "--device", "cpu"]) == 0
    assert f"validation loss {losses[-1]:.4f}" in capsys.readouterr().out

    out = tmp_path / "export"
    assert main(["export", str(result.run_dir), "--out", str(out)]) == 0
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    ):
        assert (out / name).is_file(), name
    # the weights (safetensors writes them 0600) are readable by whom the umask allows
    checkpoint = result.run_dir / "checkpoints" / "step_0000012"
    for folder, other in ((checkpoint, "state.json"), (out, "config.json")):
        modes = {
            oct(stat.S_IMODE((folder / n).stat().st_mode)) for n in ("model.safetensors", other)
        }
        assert modes == {"0o640"}, folder
    exported = json.loads((out / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"], exported["pad_token_id"]) == (
        0,
        0,
        1,
    )
    assert exported["vocab_size"] == VOCAB_ROWS and exported["hidden_act"] == "gelu"
    card = (out / "README.md").read_text()
    assert "chat_example.txt" in card and "val/loss" in card

    ours = load_trained(result.run_dir, torch.device("cpu"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf_model).__name__ == "GPTNeoXForCausalLM"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == ours.tokenizer.encode(PROMPT).ids
    hf_state = hf_model.state_dict()
    hf_state["embed_out.weight"] = hf_state.pop("lm_head.weight")
    assert all(torch.equal(hf_state[k], v) for k, v in ours.model.state_dict().items())
    with torch.no_grad():  # same weights, same function: equal up to float rounding
        torch.testing.assert_close(hf_model(ids).logits, ours.model(ids)[0], atol=1e-5, rtol=0)

    # the chat template writes what the chat format writes
    turns = [Turn("user", "Hi there."), Turn("agent", "Hello!"), Turn("user", "And you?")]
    messages = [
        {"role": {"agent": "assistant"}.get(t.role, t.role), "content": t.text} for t in turns
    ]
    rendered = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert rendered == ChatFormat().text(turns, add_generation_prompt=True)
    rendered = hf_tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert rendered == ChatFormat().text(turns[:2])

    # greedy tokens: transformers on the export == neoxlab generate on the run
    ours_greedy = neoxlab_greedy(result.run_dir, PROMPT, 20)
    assert ours_greedy == hf_greedy(out, PROMPT, 20)[: len(ours_greedy)]
    capsys.readouterr()
    assert cli_greedy_text(result.run_dir, PROMPT, 20, capsys) == cli_greedy_text(
        out, PROMPT, 20, capsys
    )

    # the export is an HF folder like any other: it can be started from again
    again = load_config([CHAT_CONFIG], finetune_overrides(out, "train-iters=1"))
    restarted = Trainer(again, progress=False, log=lambda _: None)
    assert all(
        torch.equal(restarted.model.state_dict()[k], v) for k, v in ours.model.state_dict().items()
    )


def test_export_refuses_an_existing_folder(pythia, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(pythia), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_generate_chat_talks_in_the_chat_format(pythia, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is two plus three?\n\nThanks!\n"))
    argv = ["generate", str(pythia), "--chat", "--temperature", "0", "--max-new-tokens", "8"]
    assert main([*argv, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    # a prompt per line read (the blank one is skipped) and one at the end of input; 2 replies
    assert out.count("User: ") == 4 and out.count("Agent: ") == 2
    # the first reply is the greedy continuation of the formatted prompt
    trained = load_trained(pythia, torch.device("cpu"))
    prompt = ChatFormat().text(
        [Turn("user", "What is two plus three?")], add_generation_prompt=True
    )
    expected = neoxlab_greedy(pythia, prompt, 8)
    reply = ChatFormat().reply(trained.tokenizer.decode(expected, skip_special_tokens=True))
    assert f"Agent: {reply}\n" in out


def test_chat_samplers_from_prepared_data(pythia):
    config = load_config([CHAT_CONFIG], finetune_overrides(pythia, "pack-examples=true"))
    trainer = Trainer(config, progress=False, log=lambda _: None)
    train, validation = build_samplers(trainer.config, trainer.data)
    batch = train.batch(3, 8)
    assert set(batch.model_kwargs()) == {"position_ids", "segment_ids"}
    assert len(validation.examples) == trainer.data.summary["validation_examples"] > 0
