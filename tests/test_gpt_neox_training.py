"""gpt-neox keys that change what training computes: eod-mask-loss, fp16 hysteresis, finetune,
override-lr-scheduler and use-checkpoint-lr-scheduler, each as gpt-neox does it.

The configs have the keys and values of the gpt-neox file named (shrunk to a tiny model by
overrides where a test trains).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY_MODEL

from neoxlab.checkpoint import load_weights, run_checkpoint
from neoxlab.config import load_config
from neoxlab.data.batches import IGNORE_INDEX, EodMaskedSampler, WindowSampler
from neoxlab.data.prepare import build_samplers, prepare_data
from neoxlab.errors import NeoxlabError
from neoxlab.loss_scale import build_grad_scaler
from neoxlab.model import GPTNeoX, ModelConfig
from neoxlab.tokenizer import load_tokenizer, train_bpe
from neoxlab.trainer import Trainer, train

# configs/finetuning_configs/6-9B.yml
FINETUNE_6_9B = {
    "load": "/path/to/checkpoint",
    "finetune": True,
    "pipe-parallel-size": 1,
    "model-parallel-size": 2,
    "num-layers": 32,
    "hidden-size": 4096,
    "num-attention-heads": 32,
    "seq-length": 2048,
    "max-position-embeddings": 2048,
    "norm": "layernorm",
    "pos-emb": "rotary",
    "rotary_pct": 0.25,
    "no-weight-tying": True,
    "gpt_j_residual": True,
    "output_layer_parallelism": "column",
    "attention-config": [[["flash"], 32]],
    "scaled-upper-triang-masked-softmax-fusion": True,
    "bias-gelu-fusion": True,
    "optimizer": {"type": "Adam", "params": {"lr": 0.00012, "betas": [0.9, 0.95], "eps": 1.0e-8}},
    "min_lr": 0.000012,
    "zero_optimization": {
        "stage": 1,
        "allgather_partitions": True,
        "allgather_bucket_size": 1260000000,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 1260000000,
        "contiguous_gradients": True,
        "cpu_offload": False,
        "load_from_fp32_weights": False,
    },
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 2,
    "data-impl": "mmap",
    "checkpoint-activations": True,
    "checkpoint-num-layers": 1,
    "partition-activations": True,
    "synchronize-each-layer": True,
    "gradient_clipping": 1.0,
    "weight-decay": 0.1,
    "hidden-dropout": 0,
    "attention-dropout": 0,
    "fp16": {
        "fp16": True,
        "enabled": True,
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 12,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "train-iters": 143000,
    "lr-decay-iters": 143000,
    "distributed-backend": "nccl",
    "lr-decay-style": "cosine",
    "warmup": 0.01,
    "checkpoint-factor": 1000,
    "extra-save-iters": [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
    "eval-interval": 143000,
    "eval-iters": 10,
    "log-interval": 10,
    "steps_per_print": 10,
    "wall_clock_breakdown": True,
    "tokenizer_type": "HFTokenizer",
}
# The same model shrunk to the tiny run the tests train from (tests/conftest.py's TINY_MODEL).
TINY_NEOX = [
    "num-layers=2",
    "hidden-size=32",
    "num-attention-heads=2",
    "attention-config=[[[flash], 2]]",
    "seq-length=32",
    "max-position-embeddings=32",
    "train-micro-batch-size-per-gpu=2",
    "gradient-accumulation-steps=1",
    "train-iters=2",
    "lr-decay-iters=2",
    "eval-interval=2",
    "eval-iters=1",
    "log-interval=1",
    "sample-tokens=0",
    "device=cpu",
]


def quiet(_: str) -> None:
    """Swallows a log line."""


# ---- eod-mask-loss --------------------------------------------------------------------------


def test_eod_mask_loss_drops_the_loss_on_what_follows_an_eod_input():
    eod = 0
    tokens = np.array([5, 6, 7, eod, 8, 9, eod, 10, 11, 12, 13, eod, 14, 15, 16, 17], np.int64)
    plain = WindowSampler(tokens, seq_length=8, seed=1, split="train")
    masked = EodMaskedSampler(plain, eod)
    before, after = plain.batch(3, 16), masked.batch(3, 16)
    assert after.inputs.equal(before.inputs)
    at_eod = before.inputs == eod
    assert bool(at_eod.any()) and bool((after.targets[at_eod] == IGNORE_INDEX).all())
    assert after.targets[~at_eod].equal(before.targets[~at_eod])  # eod targets stay learned
    # the loss is gpt-neox's: sum(loss x mask) / sum(mask), the mask zero where input == eod
    torch.manual_seed(0)
    model = GPTNeoX(ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_attention_heads=2))
    _, loss = model(after.inputs, after.targets)
    logits, _ = model(before.inputs)
    losses = F.cross_entropy(logits.flatten(0, 1), before.targets.flatten(), reduction="none")
    mask = (~at_eod).flatten().float()
    expected = (losses * mask).sum() / mask.sum()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_eod_mask_loss_key_masks_training_and_validation(tiny_overrides):
    config = load_config([], [*tiny_overrides, "eod-mask-loss=true"])
    data = prepare_data(config, quiet)
    samplers = build_samplers(config, data)
    for sampler in samplers:
        assert isinstance(sampler, EodMaskedSampler) and sampler.eod_id == data.eod_id
    batch = samplers[0].batch(0, 64)
    assert bool((batch.targets[batch.inputs == data.eod_id] == IGNORE_INDEX).all())


# ---- fp16 hysteresis ----------------------------------------------------------------------------


class DeepSpeedLossScale:
    """DeepSpeed's DynamicLossScaler.update_scale, restated (without its min-scale clamp)."""

    def __init__(self, scale: float, window: int, hysteresis: int, consecutive: bool) -> None:
        self.scale, self.window = scale, window
        self.hysteresis, self.left, self.consecutive = hysteresis, hysteresis, consecutive
        self.iteration, self.last_overflow = 0, -1

    def update(self, overflow: bool) -> None:
        if overflow:
            if self.hysteresis == 1 or self.left == 1:
                self.scale /= 2
            else:
                self.left -= 1
            self.last_overflow = self.iteration
        else:
            if self.consecutive:
                self.left = self.hysteresis
            if (self.iteration - self.last_overflow) % self.window == 0:
                if not self.consecutive:
                    self.left = self.hysteresis
                self.scale *= 2
        self.iteration += 1


PATTERN = "OOCCCOCOOOCCCCCCOOCOOO"  # O: the step's gradients overflow, C: clean


def scales(fp16: dict, pattern: str) -> list[float]:
    """The scale after each step of `pattern`, from neoxlab's scaler on the CPU."""
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=0.0)
    scaler = build_grad_scaler("cpu", True, fp16)
    seen = []
    for step in pattern:
        scaler.scale(weight.sum()).backward()
        if step == "O":
            weight.grad.fill_(float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        seen.append(scaler.get_scale())
    return seen


@pytest.mark.parametrize(
    ("hysteresis", "consecutive"), [(2, False), (3, False), (2, True), (1, False)]
)
def test_fp16_hysteresis_backs_off_as_deepspeed(hysteresis, consecutive):
    # gpt-neox's Pythia fp16 block: hysteresis 2 (window shortened to see growth)
    fp16 = {
        "enabled": True,
        "loss_scale": 0,
        "loss_scale_window": 3,
        "initial_scale_power": 12,
        "hysteresis": hysteresis,
        "consecutive_hysteresis": consecutive,
        "min_loss_scale": 1,
    }
    reference = DeepSpeedLossScale(2.0**12, 3, hysteresis, consecutive)
    expected = []
    for step in PATTERN:
        reference.update(step == "O")
        expected.append(reference.scale)
    assert scales(fp16, PATTERN) == expected


def test_static_loss_scale_never_changes_and_hysteresis_state_resumes():
    fp16 = {
        "enabled": True,
        "loss_scale": 128,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "consecutive_hysteresis": False,
    }
    assert set(scales(fp16, "OCOOC")) == {128.0}
    dynamic = {**fp16, "loss_scale": 0, "initial_scale_power": 4}
    scaler = build_grad_scaler("cpu", True, dynamic)
    weight = torch.nn.Parameter(torch.ones(2))
    scaler.scale(weight.sum()).backward()
    weight.grad.fill_(float("inf"))
    scaler.step(torch.optim.SGD([weight], lr=0.0))
    scaler.update()  # one overflow absorbed: one left
    state = scaler.state_dict()
    assert state["hysteresis_left"] == 1 and state["scale"] == 16.0
    resumed = build_grad_scaler("cpu", True, dynamic)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["hysteresis_left"] == 1


# ---- finetune ---------------------------------------------------------------------------------


SOURCE_RUN = ["train-iters=2", "save-interval=2", "sample-tokens=0", "activation=gelu_tanh"]


@pytest.fixture(scope="module")
def source_run(tiny_corpus, tmp_path_factory):
    """A tiny run with a checkpoint at step 2 (Pythia's tanh GELU, as gpt-neox's bias fusion),
    trained once for this module; the tests only read it."""
    overrides = [*TINY_MODEL, f"data-path={tiny_corpus}", "device=cpu", *SOURCE_RUN]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("source"))
        return train(load_config([], overrides), progress=False, log=quiet).run_dir


def finetune_config(tmp_path, load: str, tiny_corpus):
    path = tmp_path / "6-9B.yml"
    path.write_text(yaml.safe_dump({**FINETUNE_6_9B, "load": load}, sort_keys=False))
    return load_config([path], [*TINY_NEOX, f"data-path={tiny_corpus}"], notice=quiet)


def test_finetune_starts_from_the_checkpoint_at_step_0(tmp_path, source_run, tiny_corpus):
    config = finetune_config(tmp_path, str(source_run), tiny_corpus)
    assert config.init_from == str(source_run) and config.load is None
    trainer = Trainer(config, progress=False, log=quiet)
    assert trainer.step == 0 and trainer.run_dir != source_run
    weights = load_weights(run_checkpoint(source_run))
    for name, tensor in trainer.model.state_dict().items():
        assert tensor.equal(weights[name]), name
    assert trainer.run().finished


def test_finetune_from_a_missing_checkpoint_is_an_error(tmp_path, tiny_corpus):
    config = finetune_config(tmp_path, "/path/to/checkpoint", tiny_corpus)  # as gpt-neox ships it
    with pytest.raises(NeoxlabError, match="/path/to/checkpoint does not exist"):
        Trainer(config, progress=False, log=quiet)


# ---- override-lr-scheduler / use-checkpoint-lr-scheduler -------------------------------------


@pytest.mark.parametrize(
    ("key", "lr", "said"),
    [
        (None, 1e-3, "differs from the checkpoint's (lr 0.003 -> 0.001)"),
        ("override-lr-scheduler", 1e-3, None),
        ("use-checkpoint-lr-scheduler", 3e-3, "keeping the checkpoint's schedule"),
    ],
)
def test_resume_with_another_schedule(tiny_overrides, source_run, key, lr, said):
    overrides = [*tiny_overrides, *SOURCE_RUN, "lr=1e-3"]
    if key:
        overrides.append(f"{key}=true")
    log: list[str] = []
    trainer = Trainer(load_config([], overrides), resume=source_run, progress=False, log=log.append)
    assert trainer.step == 2 and trainer.config.lr == lr
    notes = [line for line in log if "schedule" in line]
    assert (said in notes[0]) if said else notes == []


# ---- GPT2BPETokenizer, gpt-neox's default tokenizer ------------------------------------------


def test_gpt_neox_125m_trains_with_gpt2_vocab_and_merges(tmp_path, tiny_corpus, shakespeare_text):
    """configs/125M.yml names no tokenizer: GPT-2's vocab.json + merges.txt (here a small BPE
    saved in that format), given as local_setup.yml gives them."""
    from test_gpt_neox_config import GPT_NEOX_125M

    bpe = train_bpe([shakespeare_text[:50_000]], 400, special_tokens=("<|endoftext|>",))
    vocab, merges = bpe.model.save(str(tmp_path), "gpt2")
    model_file = tmp_path / "125M.yml"
    model_file.write_text(yaml.safe_dump(GPT_NEOX_125M, sort_keys=False))
    setup = [f"vocab-file={vocab}", f"merge-file={merges}", f"data-path={tiny_corpus}"]
    config = load_config([model_file], [*TINY_NEOX, *setup], notice=quiet)
    assert config.tokenizer_type == "gpt2" and config.rotary_pct == 1.0
    result = train(config, progress=False, log=quiet)
    assert result.finished
    saved = load_tokenizer(run_checkpoint(result.run_dir))
    assert saved.encode("ROMEO: hello").ids == bpe.encode("ROMEO: hello").ids
