"""Configs written for EleutherAI's gpt-neox load unchanged, and its data keys behave as there."""

import itertools

import numpy as np
import pytest

from neoxlab.config import load_config, model_config
from neoxlab.data.blend import Blend
from neoxlab.data.corpora import split_counts
from neoxlab.data.indexed import IndexedDatasetWriter
from neoxlab.data.prepare import build_samplers, prepare_data
from neoxlab.errors import NeoxlabError
from neoxlab.tokenizer import train_bpe
from neoxlab.tracking import read_metrics
from neoxlab.trainer import train

# A gpt-neox-style file in its own dialect: a YAML flow mapping with comments, quoted hyphenated
# and underscored keys, a DeepSpeed fp16 block, ZeRO settings and Megatron fusion switches.
NEOX_160M = """
{
  # parallelism
  "pipe-parallel-size": 1,
  "model-parallel-size": 1,

  # the network
  "num-layers": 12,
  "hidden-size": 768,
  "num-attention-heads": 12,
  "seq-length": 2048,
  "max-position-embeddings": 2048,
  "norm": "layernorm",
  "pos-emb": "rotary",
  "rotary_pct": 0.25,
  "no-weight-tying": true,
  "gpt_j_residual": true,
  "output-layer-parallelism": "column",
  "attention-config": [[["flash"], 12]],
  "scaled-upper-triang-masked-softmax-fusion": true,
  "bias-gelu-fusion": true,
  "init_method": "small_init",
  "output_layer_init_method": "wang_init",

  # optimizer
  "optimizer": {
    "type": "Adam",
    "params": {"lr": 0.0006, "betas": [0.9, 0.95], "eps": 1.0e-8}
  },
  "min_lr": 0.00006,
  "zero_optimization": {
    "stage": 1,
    "allgather_partitions": true,
    "reduce_bucket_size": 500000000,
    "contiguous_gradients": true
  },

  # batch
  "train_micro_batch_size_per_gpu": 32,
  "gradient_accumulation_steps": 1,
  "data-impl": "mmap",
  "num_workers": 1,

  "checkpoint-activations": true,
  "checkpoint-num-layers": 1,
  "partition-activations": true,
  "synchronize-each-layer": true,

  "gradient_clipping": 1.0,
  "weight-decay": 0.1,
  "hidden-dropout": 0,
  "attention-dropout": 0,

  "fp16": {
    "fp16": true,
    "enabled": true,
    "loss_scale": 0,
    "loss_scale_window": 1000,
    "initial_scale_power": 12,
    "hysteresis": 2,
    "min_loss_scale": 1
  },

  "train-iters": 143000,
  "lr-decay-iters": 143000,
  "distributed-backend": "nccl",
  "lr-decay-style": "cosine",
  "warmup": 0.01,
  "checkpoint-factor": 1000,
  "extra-save-iters": [0, 1, 2, 4, 8],
  "eval-interval": 40000,
  "eval-iters": 10,
  "log-interval": 10,
  "steps_per_print": 10,
  "wall_clock_breakdown": true,

  "data-path": "data/pile_text_document",
  "split": "969,30,1",
  "tokenizer-type": "HFTokenizer",
  "vocab-file": "tokenizers/20B_tokenizer.json",
  "save": "checkpoints",
  "load": "runs/pythia-160m",
}
"""


def load(tmp_path, text, overrides=(), name="neox.yml"):
    path = tmp_path / name
    path.write_text(text)
    notices: list[str] = []
    config = load_config([path], overrides, notice=notices.append)
    return config, notices


def test_gpt_neox_file_loads_with_one_warning(tmp_path):
    config, notices = load(tmp_path, NEOX_160M)
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (12, 768, 12)
    assert config.seq_length == 2048 and config.context_length == 2048
    assert config.rotary_pct == 0.25 and config.gpt_j_residual
    assert config.activation == "gelu_tanh"  # bias-gelu-fusion: the tanh approximation
    assert config.lr == 6e-4 and config.min_lr == 6e-5
    assert config.optimizer == {"type": "Adam", "params": {"betas": [0.9, 0.95], "eps": 1e-8}}
    assert config.weight_decay == 0.1 and config.gradient_clipping == 1.0
    assert config.lr_decay_style == "cosine" and config.lr_decay_iters == 143000
    assert config.train_micro_batch_size_per_gpu == 32 and config.gradient_accumulation_steps == 1
    assert config.fp16["enabled"] and config.fp16["initial_scale_power"] == 12
    assert config.requested_precision() == "fp16"
    assert config.save_interval == 1000  # checkpoint-factor
    assert (config.eval_interval, config.eval_iters) == (40000, 10)
    assert config.tokenizer_type == "hf"
    assert config.vocab_file == str(tmp_path / "tokenizers" / "20B_tokenizer.json")
    assert config.data_path == str(tmp_path / "data" / "pile_text_document")
    assert config.split == "969,30,1"
    assert config.save == "checkpoints" and config.load == "runs/pythia-160m"
    assert config.checkpoint_activations
    assert config.zero_optimization == {"stage": 1}
    assert config.distributed_mode() == "fsdp"  # ZeRO stage >= 1 shards
    # every DeepSpeed/Megatron-only key in one warning, nothing else said
    (warning,) = notices
    assert warning.startswith("warning: ignoring gpt-neox keys")
    for key in (
        "pipe-parallel-size",
        "output-layer-parallelism",
        "scaled-upper-triang-masked-softmax-fusion",
        "data-impl",
        "num-workers",
        "checkpoint-num-layers",
        "partition-activations",
        "synchronize-each-layer",
        "distributed-backend",
        "extra-save-iters",
        "steps-per-print",
        "wall-clock-breakdown",
        "zero-optimization.allgather-partitions",
        "zero-optimization.reduce-bucket-size",
    ):
        assert key.replace("-", "_") in warning.replace("-", "_"), key


def test_gpt_neox_file_builds_the_pythia_160m_network(tmp_path):
    config, _ = load(tmp_path, NEOX_160M)
    shape = model_config(config, 50304)
    assert shape.parallel_residual and shape.rotary_ndims == 16 and shape.layernorm_eps == 1e-5
    assert shape.activation == "gelu_tanh" and shape.intermediate_size == 3072


def test_omitted_keys_with_other_gpt_neox_defaults_get_one_notice(tmp_path):
    minimal = '{"num-layers": 2, "hidden-size": 64, "zero_optimization": {"stage": 0},}'
    config, notices = load(tmp_path, minimal)
    (note,) = notices
    assert note.startswith("note:") and "gpt-neox config" in note
    for key, neox_default in (
        ("pos-emb", "learned"),
        ("rotary-pct", "1.0"),
        ("gpt-j-residual", "false"),
        ("no-weight-tying", "false"),
        ("hidden-dropout", "0.1"),
        ("weight-decay", "0.01"),
        ("lr-decay-style", "linear"),
    ):
        assert f"{key} (gpt-neox: {neox_default}" in note
    # neoxlab's Pythia defaults apply
    assert config.rotary_pct == 0.25 and config.gpt_j_residual and config.hidden_dropout == 0
    assert config.distributed_mode() == "ddp"
    # a neoxlab file (no gpt-neox-only key) gets no such notice
    _, notices = load(tmp_path, "num-layers: 2\nhidden-size: 64\n", name="own.yml")
    assert notices == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('"pos-emb": "learned"', "pos-emb must be one of rotary"),
        ('"norm": "rmsnorm"', "norm 'rmsnorm'"),
        ('"no-weight-tying": false', "tied input/output embeddings are not supported"),
        ('"gpt-j-tied": true', "one LayerNorm shared"),
        ('"attention-config": [[["local"], 2]]', "attention type 'local'"),
        ('"init_method": "normal"', "init-method 'normal'"),
        ('"tokenizer-type": "GPT2BPETokenizer"', "tokenizer-type must be one of"),
        ('"zero_optimization": {"stage": 4}', "zero-optimization.stage must be"),
        ('"num-layerz": 2', "unknown config key 'num-layerz'"),
    ],
)
def test_what_neoxlab_cannot_reproduce_is_an_error(tmp_path, line, message):
    with pytest.raises(NeoxlabError, match=message):
        load(tmp_path, "{" + line + ', "data-impl": "mmap"}')


def test_model_parallel_size_pads_the_vocabulary_as_gpt_neox(tmp_path):
    config, _ = load(tmp_path, '{"model-parallel-size": 4, "pipe-parallel-size": 1}')
    assert config.make_vocab_size_divisible_by == 512  # 128 x 4: Pythia-12B's 50688 rows


def test_distributed_key_and_zero_stage(tmp_path):
    config, _ = load(tmp_path, '{"zero_optimization": {"stage": 2}}', ["distributed=ddp"])
    assert config.distributed_mode() == "ddp"  # an explicit choice wins
    config, _ = load(tmp_path, "distributed: fsdp\n", name="own.yml")
    assert config.distributed_mode() == "fsdp"


# ---- data: data-path + split, train/valid/test-data-paths + weights ---------------------------


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    train_bpe(["some text to learn a few merges from " * 50], vocab_size=300).save(str(path))
    return path


def write_prefix(prefix, documents):
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for document in documents:
            writer.add_document(document)
    return str(prefix)


def gpt_neox_split(size: int, split: str) -> list[int]:
    """gpt-neox's get_train_valid_test_split_, restated: rounded bounds, drift taken off."""
    weights = [float(s) for s in split.split(",")]
    weights = [w / sum(weights) for w in weights]
    bounds = [0]
    for weight in weights:
        bounds.append(bounds[-1] + round(weight * float(size)))
    drift = bounds[-1] - size
    bounds = [bounds[0]] + [b - drift for b in bounds[1:]]
    return [b - a for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("size", [1000, 37, 12345, 3])
def test_split_969_30_1_counts_documents_as_gpt_neox(size):
    assert list(split_counts(size, "969,30,1")) == gpt_neox_split(size, "969,30,1")


def test_data_path_prefix_splits_documents_by_969_30_1(tmp_path, vocab_file):
    # document i holds 40 tokens all equal to i % 250
    documents = [[i % 250] * 40 for i in range(1000)]
    prefix = write_prefix(tmp_path / "corpus_text_document", documents)
    config = load_config(
        [],
        [
            f"data-path={prefix}",
            f"vocab-file={vocab_file}",
            "tokenizer-type=hf",
            "split=969,30,1",
            "seq-length=16",
        ],
    )
    data = prepare_data(config, log=lambda _: None)
    assert len(data.splits["train"]) == 969 * 40
    assert len(data.splits["validation"]) == 30 * 40 and len(data.splits["test"]) == 40
    assert data.splits["validation"][0] == 969 % 250


def test_weighted_data_paths_blend_by_weight(tmp_path, vocab_file):
    low = write_prefix(tmp_path / "low", [list(range(0, 50))] * 20)  # ids < 50
    high = write_prefix(tmp_path / "high", [list(range(100, 150))] * 20)  # ids >= 100
    valid = write_prefix(tmp_path / "valid", [list(range(50, 100))] * 5)
    config = load_config(
        [],
        [
            f"train-data-paths=[{low}, {high}]",
            "train-data-weights=[3, 1]",
            f"valid-data-paths=[{valid}]",
            f"vocab-file={vocab_file}",
            "tokenizer-type=hf",
            "seq-length=8",
        ],
    )
    data = prepare_data(config, log=lambda _: None)
    assert isinstance(data.splits["train"], Blend) and data.splits["train"].weights == [0.75, 0.25]
    train_sampler, val_sampler = build_samplers(config, data)
    inputs = train_sampler.batch(0, 4000).inputs
    from_low = float((inputs[:, 0] < 50).float().mean())
    assert from_low == pytest.approx(0.75, abs=0.03)
    # windows never straddle datasets, and a step's batch is a pure function of the step
    assert bool(((inputs < 50).all(1) | (inputs >= 100).all(1)).all())
    assert train_sampler.batch(7, 16).inputs.equal(train_sampler.batch(7, 16).inputs)
    assert int(val_sampler.batch(0, 2).inputs.min()) >= 50


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train-data-paths=[a]"], "needs valid-data-paths"),
        (
            ["train-data-paths=[a]", "valid-data-paths=[b]", "train-data-weights=[1, 2]"],
            "1 train-data-paths",
        ),
        (["valid-data-paths=[b]"], "train-data-paths is not"),
        (["train-data-paths=[a]", "valid-data-paths=[b]", "data-path=c"], "both set"),
    ],
)
def test_data_path_keys_are_checked(overrides, message):
    with pytest.raises(NeoxlabError, match=message):
        load_config([], overrides)


def test_gpt_neox_config_trains(tmp_path, vocab_file):
    """A gpt-neox file (its keys shrunk to a tiny model) trains end to end on a blend."""
    train_prefix = write_prefix(tmp_path / "train_text_document", [list(range(3, 200))] * 30)
    valid_prefix = write_prefix(tmp_path / "valid_text_document", [list(range(3, 200))] * 4)
    text = NEOX_160M.replace('"data-path": "data/pile_text_document",', "")
    text = text.replace(
        '"vocab-file": "tokenizers/20B_tokenizer.json",',
        f'"vocab-file": "{vocab_file}", "train-data-paths": ["{train_prefix}"], '
        f'"valid-data-paths": ["{valid_prefix}"], "train-data-weights": [1.0],',
    ).replace('"load": "runs/pythia-160m",', "")
    config, _ = load(
        tmp_path,
        text,
        [
            "num-layers=2",
            "hidden-size=32",
            "num-attention-heads=2",
            "attention-config=[[[global], 2]]",
            "seq-length=32",
            "max-position-embeddings=32",
            "train-micro-batch-size-per-gpu=2",
            "train-iters=3",
            "eval-interval=3",
            "eval-iters=1",
            "log-interval=1",
            "sample-tokens=0",
            "device=cpu",
            "split=900,100,0",
        ],
    )
    result = train(config, progress=False, log=lambda _: None)
    assert result.finished
    assert [m["step"] for m in read_metrics(result.run_dir) if "train/loss" in m] == [1, 2, 3]


def test_bf16_spellings(tmp_path):
    config, _ = load(tmp_path, '{"bf16": {"enabled": true}, "data-impl": "mmap"}')
    assert config.requested_precision() == "bf16"
    config, _ = load(tmp_path, '{"precision": "bfloat16", "data-impl": "mmap"}')
    assert config.precision == "bf16"
