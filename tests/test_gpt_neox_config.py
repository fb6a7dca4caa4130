"""gpt-neox's configs: loaded as gpt-neox reads them, or refused naming the key.

Each config below has the keys and values of the gpt-neox file it stands for (configs/ of
EleutherAI/gpt-neox), written here rather than read from the network; gpt-neox's own comments are
left out.
"""

import gzip
import itertools
import json
import math
import re

import numpy as np
import pytest
import yaml

from neoxlab import neox_compat
from neoxlab.cli import main
from neoxlab.config import FIELDS, load_config, model_config
from neoxlab.data.blend import Blend
from neoxlab.data.corpora import split_counts
from neoxlab.data.indexed import IndexedDataset, IndexedDatasetWriter
from neoxlab.data.jsonl import prepare_jsonl
from neoxlab.data.prepare import build_samplers, prepare_data
from neoxlab.errors import NeoxlabError
from neoxlab.memory import describe
from neoxlab.model import GPTNeoX, ModelConfig
from neoxlab.tokenizer import gpt2_tokenizer, train_bpe
from neoxlab.tracking import read_metrics
from neoxlab.trainer import train

# ---- gpt-neox's files -------------------------------------------------------------------------

ZERO_STAGE_1 = {
    "stage": 1,
    "allgather_partitions": True,
    "allgather_bucket_size": 500000000,
    "overlap_comm": True,
    "reduce_scatter": True,
    "reduce_bucket_size": 500000000,
    "contiguous_gradients": True,
    "cpu_offload": False,
}
PYTHIA_FP16 = {
    "fp16": True,
    "enabled": True,
    "loss_scale": 0,
    "loss_scale_window": 1000,
    "initial_scale_power": 12,
    "hysteresis": 2,
    "min_loss_scale": 1,
}
# The keys and values every configs/pythia/*.yml shares.
PYTHIA_COMMON = {
    "seq_length": 2048,
    "max_position_embeddings": 2048,
    "pos_emb": "rotary",
    "rotary_pct": 0.25,
    "no_weight_tying": True,
    "gpt_j_residual": True,
    "output_layer_parallelism": "column",
    "scaled_upper_triang_masked_softmax_fusion": True,
    "bias_gelu_fusion": True,
    "data_impl": "mmap",
    "checkpoint_num_layers": 1,
    "synchronize_each_layer": True,
    "gradient_clipping": 1.0,
    "weight_decay": 0.1,
    "hidden_dropout": 0,
    "attention_dropout": 0,
    "train_iters": 143000,
    "lr_decay_iters": 143000,
    "distributed_backend": "nccl",
    "lr_decay_style": "cosine",
    "warmup": 0.01,
    "checkpoint_factor": 1000,
    "extra_save_iters": [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
    "eval_iters": 10,
    "log_interval": 10,
    "steps_per_print": 10,
    "wall_clock_breakdown": True,
    "tokenizer_type": "HFTokenizer",
}
PILE = ["/mnt/ssd-2/pile_deduped/pile_20B_tokenizer_text_document"]


def pythia_size(layers, hidden, heads, lr, min_lr, micro, **rest):
    """The keys in which configs/pythia/<size>.yml differ from the others."""
    optimizer = {"type": "Adam", "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1.0e-8}}
    return {
        "pipe_parallel_size": 1,
        "model_parallel_size": 1,
        "num_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "attention_config": [[["flash"], layers]],
        "init_method": "small_init",
        "output_layer_init_method": "wang_init",
        "optimizer": optimizer,
        "min_lr": min_lr,
        "zero_optimization": ZERO_STAGE_1,
        "train_micro_batch_size_per_gpu": micro,
        "num_workers": 1,
        "checkpoint_activations": True,
        "partition_activations": True,
        "fp16": PYTHIA_FP16,
        "eval_interval": 143000,
        **rest,
    }


SMALL_PYTHIA = {
    "pipe_parallel_size": 0,
    "zero_optimization": {**ZERO_STAGE_1, "stage": 0},
    "checkpoint_activations": False,
    "partition_activations": False,
    "eval_interval": 100000,
    "train_data_paths": PILE,
    "valid_data_paths": PILE,
    "test_data_paths": PILE,
    "vocab_file": "/mnt/ssd-2/pile/20B_tokenizer.json",
}
BIG_PYTHIA = {  # 6-9B and 12B: no init keys (gpt-neox's normal / scaled_normal), tensor-parallel
    "norm": "layernorm",
    "init_method": None,
    "output_layer_init_method": None,
    "zero_optimization": {
        **ZERO_STAGE_1,
        "allgather_bucket_size": 1260000000,
        "reduce_bucket_size": 1260000000,
    },
    "gradient_accumulation_steps": 2,
    "num_workers": None,
}
PYTHIA_1B_FP16 = {
    "enabled": True,
    "type": "bfloat16",
    "auto_cast": True,
    "loss_scale": 0,
    "loss_scale_window": 1000,
    "initial_scale_power": 12,
    "hysteresis": 2,
    "min_loss_scale": 1,
}
# file -> (its keys, the released model's parameter count)
PYTHIA = {
    "14M.yml": (
        pythia_size(
            6,
            128,
            4,
            0.001,
            0.0001,
            32,
            **{
                **SMALL_PYTHIA,
                "zero_optimization": {
                    **SMALL_PYTHIA["zero_optimization"],
                    "allgather_bucket_size": 50000000,
                    "reduce_bucket_size": 50000000,
                },
            },
            num_workers=4,
        ),
        14_067_712,
    ),
    "31M.yml": (
        pythia_size(6, 256, 8, 0.001, 0.0001, 32, **SMALL_PYTHIA, num_workers=2),
        30_494_720,
    ),
    "70M.yml": (pythia_size(6, 512, 8, 0.001, 0.0001, 32, eval_interval=100000), 70_426_624),
    "160M.yml": (pythia_size(12, 768, 12, 0.0006, 0.00006, 32), 162_322_944),
    "410M.yml": (pythia_size(24, 1024, 16, 0.0003, 0.00003, 32), 405_334_016),
    "1B.yml": (
        pythia_size(
            16,
            2048,
            8,
            0.00025,
            0.000025,
            4,
            attention_config=None,
            zero_optimization={**ZERO_STAGE_1, "stage": 0},
            fp16=PYTHIA_1B_FP16,
            fp32_allreduce=True,
            gradient_accumulation_steps=4,
        ),
        1_011_781_632,
    ),
    "1-4B.yml": (pythia_size(24, 2048, 16, 0.0002, 0.00002, 16), 1_414_647_808),
    "2-8B.yml": (
        pythia_size(
            32, 2560, 32, 0.00016, 0.000016, 8, gradient_accumulation_steps=2, eval_interval=40000
        )
        | {"log_grad_norm": True},
        2_775_208_960,
    ),
    "6-9B.yml": (
        pythia_size(32, 4096, 32, 0.00012, 0.000012, 8, **BIG_PYTHIA, model_parallel_size=2),
        6_857_302_016,
    ),
    "12B.yml": (
        pythia_size(36, 5120, 40, 0.00012, 0.000012, 8, **BIG_PYTHIA, model_parallel_size=4)
        | {"log_grad_norm": True},
        11_846_072_320,
    ),
}

GPT_NEOX_125M = {
    "pipe_parallel_size": 1,
    "model_parallel_size": 1,
    "num_layers": 12,
    "hidden_size": 768,
    "num_attention_heads": 12,
    "seq_length": 2048,
    "max_position_embeddings": 2048,
    "norm": "layernorm",
    "pos_emb": "rotary",
    "no_weight_tying": True,
    "gpt_j_residual": False,
    "output_layer_parallelism": "column",
    "scaled_upper_triang_masked_softmax_fusion": False,
    "bias_gelu_fusion": False,
    "rope_fusion": False,
    "layernorm_fusion": False,
    "init_method": "small_init",
    "output_layer_init_method": "wang_init",
    "optimizer": {"type": "Adam", "params": {"lr": 0.0006, "betas": [0.9, 0.95], "eps": 1.0e-8}},
    "min_lr": 0.00006,
    "zero_optimization": {k: v for k, v in ZERO_STAGE_1.items() if k != "cpu_offload"},
    "train_micro_batch_size_per_gpu": 4,
    "data_impl": "mmap",
    "checkpoint_activations": True,
    "checkpoint_num_layers": 1,
    "partition_activations": True,
    "synchronize_each_layer": True,
    "gradient_clipping": 1.0,
    "weight_decay": 0.1,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "fp16": {
        "enabled": True,
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "train_iters": 320000,
    "lr_decay_iters": 320000,
    "distributed_backend": "nccl",
    "lr_decay_style": "cosine",
    "warmup": 0.01,
    "checkpoint_factor": 10000,
    "eval_interval": 1000,
    "eval_iters": 10,
    "log_interval": 100,
    "steps_per_print": 10,
    "keep_last_n_checkpoints": 4,
    "wall_clock_breakdown": True,
    "hostfile": "/mock_path",
}
LOCAL_SETUP = {
    "data_path": "data/enwik8/enwik8_text_document",
    "vocab_file": "data/gpt2-vocab.json",
    "merge_file": "data/gpt2-merges.txt",
    "save": "checkpoints",
    "load": "checkpoints",
    "checkpoint_validation_with_forward_pass": False,
    "tensorboard_dir": "tensorboard",
    "log_dir": "logs",
}
LLAMA_7B = {
    "pipe_parallel_size": 1,
    "model_parallel_size": 1,
    "make_vocab_size_divisible_by": 1,
    "num_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 32768,
    "num_attention_heads": 32,
    "seq_length": 2048,
    "max_position_embeddings": 2048,
    "pos_emb": "rotary",
    "rotary_pct": 1,
    "no_weight_tying": True,
    "gpt_j_residual": False,
    "output_layer_parallelism": "column",
    "norm": "rmsnorm",
    "rms_norm_epsilon": 1.0e-6,
    "use_bias_in_mlp": False,
    "scaled_upper_triang_masked_softmax_fusion": True,
    "bias_gelu_fusion": False,
    "use_bias_in_norms": False,
    "use_bias_in_attn_linear": False,
    "activation": "swiglu",
    "mlp_multiple_of": 256,
}


def pythia_file(name: str) -> dict:
    keys, _ = PYTHIA[name]
    merged = {**PYTHIA_COMMON, **keys}
    return {k: v for k, v in merged.items() if v is not None}


def write(tmp_path, mapping: dict, name: str = "neox.yml"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


def load(tmp_path, mapping: dict, overrides=(), name: str = "neox.yml"):
    notices: list[str] = []
    config = load_config([write(tmp_path, mapping, name)], overrides, notice=notices.append)
    return config, notices


# ---- 1. Pythia's configs as gpt-neox ships them -----------------------------------------------


@pytest.mark.parametrize("name", list(PYTHIA))
def test_pythia_config_unchanged_dry_runs_to_the_released_count(tmp_path, name, capsys):
    path = write(tmp_path, pythia_file(name), name)
    assert main(["train", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {PYTHIA[name][1]:,} " in out
    # no tokenizer file: GPT-NeoX-20B's 50,277 tokens, never neoxlab's 5,000-token BPE
    assert "GPT-NeoX-20B's tokenizer.json" in out


def test_pythia_160m_trains_pythias_network(tmp_path):
    config, notices = load(tmp_path, pythia_file("160M.yml"))
    shape = model_config(config, 50304)
    assert shape.parallel_residual and shape.rotary_ndims == 16 and shape.layernorm_eps == 1e-5
    assert shape.activation == "gelu_tanh" and shape.intermediate_size == 3072
    assert (shape.init_method, shape.output_layer_init_method) == ("small_init", "wang_init")
    assert config.lr == 6e-4 and config.min_lr == 6e-5 and config.weight_decay == 0.1
    assert config.optimizer == {"type": "Adam", "params": {"betas": [0.9, 0.95], "eps": 1e-8}}
    assert config.fp16["enabled"] and config.fp16["hysteresis"] == 2
    assert config.distributed_mode() == "fsdp"  # ZeRO stage 1 shards
    assert config.save_interval == 1000  # checkpoint-factor
    (warning,) = [n for n in notices if n.startswith("warning:")]
    for key in ("pipe-parallel-size", "extra-save-iters", "zero-optimization.overlap-comm"):
        assert key in warning


def test_pythia_6_9b_without_init_keys_uses_gpt_neox_normal_init(tmp_path):
    config, _ = load(tmp_path, pythia_file("6-9B.yml"))
    assert (config.init_method, config.output_layer_init_method) == ("normal", "scaled_normal")
    assert config.make_vocab_size_divisible_by == 256  # model-parallel-size 2
    small = ModelConfig(
        vocab_size=512,
        hidden_size=256,
        num_layers=4,
        num_attention_heads=4,
        init_method=config.init_method,
        output_layer_init_method=config.output_layer_init_method,
        init_method_std=config.init_method_std,
    )
    model = GPTNeoX(small)
    embed = model.gpt_neox.embed_in.weight
    dense = model.gpt_neox.layers[0].attention.dense.weight
    assert float(embed.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert float(dense.detach().std()) == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)


# ---- 2. Pythia-1B's bf16 in the fp16 block ----------------------------------------------------


def test_pythia_1b_bfloat16_fp16_block_trains_in_bf16(tmp_path):
    config, notices = load(tmp_path, pythia_file("1B.yml"))
    assert config.requested_precision() == "bf16"
    assert config.bf16["enabled"] and not config.fp16["enabled"]
    assert "bf16 mixed precision" in describe(config).lines()[1]
    # fp32-allreduce: neoxlab's gradients are fp32 already; it has no tensor parallelism
    assert "fp32-allreduce" in notices[0]


# ---- 3. gpt-neox's defaults for what a gpt-neox config leaves out -----------------------------


def test_gpt_neox_125m_gets_gpt_neox_defaults(tmp_path, capsys):
    config, notices = load(tmp_path, GPT_NEOX_125M, name="125M.yml")
    assert config.rotary_pct == 1.0  # gpt-neox's default; neoxlab's own is 0.25
    assert not config.gpt_j_residual and config.activation == "gelu"
    assert config.split == "969, 30, 1" and config.tokenizer_type == "gpt2"
    assert "layernorm-fusion" in notices[0]  # a kernel choice
    (note,) = [n for n in notices if n.startswith("note:")]
    for shown in ("rotary-pct 1.0 (neoxlab: 0.25)", "split 969, 30, 1", "GPT2BPETokenizer"):
        assert shown in note
    # GPT-2's 50,257 tokens, padded to 50,304: Pythia-160M's shape with a sequential residual
    assert main(["train", str(tmp_path / "125M.yml"), "--dry-run"]) == 0
    assert "parameters: 162,322,944 " in capsys.readouterr().out


def test_neoxlab_configs_keep_neoxlab_defaults():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(configs.rglob("*.yml")):
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict) or "method" in raw:  # sweeps are W&B's files
            continue
        keys = {k.replace("-", "_") for k in raw}
        assert not neox_compat.is_gpt_neox_file(keys, set(FIELDS)), path
    notices: list[str] = []
    config = load_config([configs / "shakespeare.yml"], notice=notices.append)
    assert config.rotary_pct == 0.25 and not [n for n in notices if n.startswith("note:")]


def test_gpt_neox_default_neoxlab_cannot_train_is_refused(tmp_path):
    without = {k: v for k, v in GPT_NEOX_125M.items() if k != "pos_emb"}
    with pytest.raises(NeoxlabError, match="pos-emb 'learned' in gpt-neox's defaults"):
        load(tmp_path, without)


def test_setup_file_alone_lacks_what_gpt_neox_requires(tmp_path):
    with pytest.raises(NeoxlabError, match="gpt-neox needs num-layers, hidden-size"):
        load(tmp_path, LOCAL_SETUP, name="local_setup.yml")
    model, setup = write(tmp_path, GPT_NEOX_125M, "125M.yml"), write(tmp_path, LOCAL_SETUP, "s.yml")
    config = load_config([model, setup], notice=lambda _: None)
    assert config.data_path == str(tmp_path / "data/enwik8/enwik8_text_document")
    assert config.merge_file == str(tmp_path / "data/gpt2-merges.txt")


# ---- 4. keys that change training: implemented or refused, never ignored ----------------------

TRAINING_KEYS = (
    "eod_mask_loss",
    "weight_by_num_documents",
    "weighted_sampler_alpha",
    "finetune",
    "override_lr_scheduler",
    "use_checkpoint_lr_scheduler",
    "hysteresis",  # the fp16 block's (the top-level key is unread by gpt-neox)
    "init_method_std",
    "no_load_optim",
    "fp16_lm_cross_entropy",
)


def test_training_keys_are_never_ignored():
    for key in TRAINING_KEYS:
        if key == "hysteresis":
            assert key in FIELDS["fp16"].default_factory()
            continue
        assert key not in neox_compat.IGNORED_KEYS, key
        assert key in FIELDS or key in neox_compat.MERGED_KEYS or key in neox_compat.UNSUPPORTED


# Every key the YAMLs of gpt-neox's configs/ use, as of its May 2026 tree.
GPT_NEOX_CONFIG_KEYS = [
    "activation",
    "attention_config",
    "attention_dropout",
    "bf16",
    "bias_gelu_fusion",
    "checkpoint_activations",
    "checkpoint_factor",
    "checkpoint_num_layers",
    "checkpoint_validation_with_forward_pass",
    "comet_experiment_name",
    "comet_others",
    "comet_project",
    "comet_tags",
    "data_impl",
    "data_path",
    "data_types",
    "deepspeed_extra_args",
    "deepspeed_slurm",
    "distributed_backend",
    "eval_interval",
    "eval_iters",
    "extra_save_iters",
    "finetune",
    "fp16",
    "fp32_allreduce",
    "global_num_gpus",
    "gmlp_attn_dim",
    "gpt_j_residual",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "hidden_dropout",
    "hidden_size",
    "hostfile",
    "init_method",
    "intermediate_size",
    "keep_last_n_checkpoints",
    "launcher",
    "layernorm_fusion",
    "load",
    "log_dir",
    "log_grad_norm",
    "log_interval",
    "lr_decay_iters",
    "lr_decay_style",
    "make_vocab_size_divisible_by",
    "mamba_causal_conv_fusion",
    "mamba_inner_func_fusion",
    "mamba_selective_scan_fusion",
    "max_position_embeddings",
    "maximum_tokens",
    "memory_profiling",
    "memory_profiling_path",
    "merge_file",
    "min_lr",
    "mlp_multiple_of",
    "model_parallel_size",
    "moe_num_experts",
    "no_weight_tying",
    "norm",
    "num_attention_heads",
    "num_kv_heads",
    "num_layers",
    "num_samples",
    "num_workers",
    "optimizer",
    "output_layer_init_method",
    "output_layer_parallelism",
    "override_lr_scheduler",
    "partition_activations",
    "pipe_parallel_size",
    "pos_emb",
    "precision",
    "profile",
    "profile_step_start",
    "profile_step_stop",
    "prompt_end",
    "recompute",
    "rms_norm_epsilon",
    "rope_fusion",
    "rotary_emb_base",
    "rotary_pct",
    "sample_input_file",
    "sample_output_file",
    "save",
    "scaled_upper_triang_masked_softmax_fusion",
    "seq_length",
    "sliding_window_width",
    "sparsity_config",
    "split",
    "steps_per_print",
    "synchronize_each_layer",
    "te_columnparallel",
    "te_fp8_amax_compute_algo",
    "te_fp8_amax_history_len",
    "te_fp8_format",
    "te_fp8_margin",
    "te_fp8_mha",
    "te_fp8_wgrad",
    "te_layernorm_mlp",
    "te_mha",
    "te_rowparallel",
    "temperature",
    "tensorboard_dir",
    "test_data_paths",
    "text_gen_type",
    "tokenizer_type",
    "top_k",
    "top_p",
    "train_data_paths",
    "train_iters",
    "train_micro_batch_size_per_gpu",
    "use_bias_in_attn_linear",
    "use_bias_in_mlp",
    "use_bias_in_norms",
    "use_bnb_optimizer",
    "use_comet",
    "use_wandb",
    "valid_data_paths",
    "vocab_file",
    "wall_clock_breakdown",
    "wandb_group",
    "wandb_host",
    "wandb_project",
    "wandb_team",
    "warmup",
    "weight_decay",
    "zero_optimization",
]


def test_every_key_of_gpt_neox_configs_has_a_place():
    from neoxlab.config import ALIASES

    places = (
        set(FIELDS)
        | set(ALIASES)
        | set(neox_compat.IGNORED_KEYS)
        | set(neox_compat.UNSUPPORTED)
        | neox_compat.TRANSLATED_KEYS
        | neox_compat.MERGED_KEYS
        | {"deepspeed_extra_args", "norm"}
    )
    assert [key for key in GPT_NEOX_CONFIG_KEYS if key not in places] == []
    assert all(reason for reason in neox_compat.IGNORED_KEYS.values())
    # a key is in one group only
    assert not set(neox_compat.IGNORED_KEYS) & set(neox_compat.UNSUPPORTED)


# ---- 6. what neoxlab cannot train: refused, naming the key ------------------------------------


# one line from a gpt-neox config (file: key, value) on top of the 125M config
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("norm", "scalenorm", "norm must be one of layernorm, rmsnorm"),
        ("activation", "geglu", "activation must be one of"),
        ("sliding_window_width", 1024, "shorter than the context"),  # mistral/7B: 4096 of 8192
        ("moe_num_experts", 8, "a mixture of experts"),  # 125M-dmoe
        ("te_mha", True, "TransformerEngine"),  # 1-3B-transformer-engine
        ("attention_config", [[["gmlp"], 12]], "attention type 'gmlp'"),  # gmlp_small
        ("pos_emb", "none", "pos-emb 'none'"),  # mamba
        ("use_qk_layernorm", True, "LayerNorm on queries and keys"),
    ],
)
def test_what_neoxlab_cannot_train_is_refused(tmp_path, key, value, message):
    with pytest.raises(NeoxlabError, match=message):
        load(tmp_path, {**GPT_NEOX_125M, key: value})


def test_bnb_optimizer_is_8bit_adamw_as_in_gpt_neox(tmp_path, capsys):
    # bnb_125M.yml: gpt-neox swaps its Adam for bitsandbytes' Adam8bit (= AdamW8bit)
    bnb_125m = {
        **GPT_NEOX_125M,
        "use_bnb_optimizer": True,
        "optimizer": {"type": "Adam", "params": {"lr": 0.0006, "betas": [0.9, 0.999]}},
        "zero_optimization": {"stage": 0},
    }
    config, _ = load(tmp_path, bnb_125m)
    assert config.optimizer == {"type": "AdamW8bit", "params": {"betas": [0.9, 0.999]}}
    assert config.lr == 0.0006
    # other optimizer types ignore the key, as gpt-neox's do
    lion = {**bnb_125m, "optimizer": {"type": "Lion", "params": {"lr": 0.0001}}}
    assert load(tmp_path, lion)[0].optimizer["type"] == "Lion"
    with pytest.raises(NeoxlabError, match=r"use-bnb-optimizer in .* must be true or false"):
        load(tmp_path, {**bnb_125m, "use_bnb_optimizer": "yes"})
    # the estimate counts 8-bit moments: 2 bytes a weight instead of AdamW's 8
    plain = write(tmp_path, {**bnb_125m, "use_bnb_optimizer": False}, "plain.yml")
    eight_bit = write(tmp_path, bnb_125m, "bnb.yml")
    for path in (plain, eight_bit):
        assert main(["train", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    adamw, adamw_8bit = (
        float(number) * {"MiB": 1, "GiB": 1024}[unit]
        for number, unit in re.findall(r"Adam\w* state ([\d.]+) ([MG]iB)", out)
    )
    assert adamw / adamw_8bit == pytest.approx(4, rel=0.03)  # small tensors keep 32-bit moments


def test_accepted_at_the_value_neoxlab_trains(tmp_path):
    same = {"num_kv_heads": 12, "use_bias_in_mlp": True, "moe_num_experts": 1, "amp": None}
    config, _ = load(tmp_path, {**GPT_NEOX_125M, **same, "expansion_factor": 2})
    assert config.intermediate_size == 2 * 768


def test_model_parallel_size_pads_the_vocabulary_as_gpt_neox(tmp_path):
    config, _ = load(tmp_path, pythia_file("12B.yml"))
    assert config.make_vocab_size_divisible_by == 512  # 128 x 4: Pythia-12B's 50,688 rows


def test_distributed_key_and_zero_stage(tmp_path):
    config, _ = load(tmp_path, pythia_file("160M.yml"), ["distributed=ddp"])
    assert config.distributed_mode() == "ddp"  # an explicit choice wins
    config, _ = load(tmp_path, pythia_file("70M.yml"))
    assert config.distributed_mode() == "fsdp"


# ---- tokenizers a gpt-neox config names without a file -----------------------------------------


def test_training_without_the_tokenizer_file_names_the_download(tmp_path):
    config, _ = load(tmp_path, pythia_file("70M.yml"), ["data-path=corpus.jsonl"])
    with pytest.raises(NeoxlabError, match=r"huggingface.co/EleutherAI/gpt-neox-20b"):
        prepare_data(config, log=lambda _: None)
    config, _ = load(tmp_path, GPT_NEOX_125M, ["data-path=corpus.jsonl"])
    with pytest.raises(NeoxlabError, match=r"gpt2-vocab.json and .*gpt2-merges.txt"):
        prepare_data(config, log=lambda _: None)


def test_gpt2_vocab_and_merges_tokenize_as_the_bpe_they_hold(tmp_path):
    text = "Hello world, hello GPT-2 tokenizer! Spaces  and\nnewlines too."
    bpe = train_bpe([text * 30], vocab_size=320, special_tokens=("<|endoftext|>",))
    vocab, merges = bpe.model.save(str(tmp_path))
    gpt2 = gpt2_tokenizer(vocab, merges)
    assert gpt2.encode(text).ids == bpe.encode(text).ids
    assert gpt2.decode(gpt2.encode(text).ids) == text
    assert gpt2.token_to_id("<|padding|>") == bpe.get_vocab_size()  # added after its tokens


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


def gpt_neox_weights_by_num_docs(counts: list[int], alpha: float) -> list[float]:
    """gpt-neox's data_utils.weights_by_num_docs, restated."""
    total = sum(counts)
    probs = [(c / total) ** alpha for c in counts]
    probs = [p / sum(probs) for p in probs]
    weights = [p * (1 - c / total) for p, c in zip(probs, counts, strict=True)]
    return [w / sum(weights) for w in weights]


def test_weight_by_num_documents_weighs_as_gpt_neox(tmp_path, vocab_file):
    """local_setup.yml's weighted example: weight_by_num_documents with alpha 0.3."""
    small = write_prefix(tmp_path / "small", [list(range(0, 50))] * 10)
    large = write_prefix(tmp_path / "large", [list(range(100, 150))] * 40)
    setup = {
        "train-data-paths": [small, large],
        "valid-data-paths": [small, large],
        "test-data-paths": [small, large],
        "train-data-weights": [1.0, 2.0],
        "valid-data-weights": [0.5, 0.4],
        "test-data-weights": [2.0, 1.0],
        "weight_by_num_documents": True,
        "weighted_sampler_alpha": 0.3,
        "vocab_file": str(vocab_file),
        "log_dir": "logs",
    }
    files = [write(tmp_path, pythia_file("70M.yml"), "70M.yml"), write(tmp_path, setup)]
    config = load_config(files, ["seq-length=8"], notice=lambda _: None)
    data = prepare_data(config, log=lambda _: None)
    expected = gpt_neox_weights_by_num_docs([10, 40], 0.3)
    assert data.splits["train"].weights == pytest.approx(expected)
    assert data.splits["validation"].weights == pytest.approx(expected)  # given weights replaced


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
    """Pythia-160M's config (its keys shrunk to a tiny model) trains end to end on a blend."""
    train_prefix = write_prefix(tmp_path / "train_text_document", [list(range(3, 200))] * 30)
    valid_prefix = write_prefix(tmp_path / "valid_text_document", [list(range(3, 200))] * 4)
    config, _ = load(
        tmp_path,
        pythia_file("160M.yml"),
        [
            f"vocab-file={vocab_file}",
            f"train-data-paths=[{train_prefix}]",
            f"valid-data-paths=[{valid_prefix}]",
            "train-data-weights=[1.0]",
            "num-layers=2",
            "hidden-size=32",
            "num-attention-heads=2",
            "attention-config=[[[flash], 2]]",
            "seq-length=32",
            "max-position-embeddings=32",
            "train-micro-batch-size-per-gpu=2",
            "train-iters=3",
            "eval-interval=3",
            "eval-iters=1",
            "log-interval=1",
            "sample-tokens=0",
            "device=cpu",
        ],
    )
    result = train(config, progress=False, log=lambda _: None)
    assert result.finished
    assert [m["step"] for m in read_metrics(result.run_dir) if "train/loss" in m] == [1, 2, 3]


# ---- 5. C4's .json.gz files -------------------------------------------------------------------


def test_c4_json_gz_files_are_json_lines(tmp_path, vocab_file):
    records = "".join(json.dumps({"text": f"document {i}", "url": "u"}) + "\n" for i in range(5))
    (tmp_path / "c4" / "en").mkdir(parents=True)
    (tmp_path / "c4" / "en" / "c4-train.00000-of-01024.json.gz").write_bytes(
        gzip.compress(records.encode())
    )
    (tmp_path / "plain.jsonl").write_text(records)
    quiet = {"progress": False, "log": lambda _: None}
    from_c4 = prepare_jsonl([tmp_path / "c4" / "en"], vocab_file, tmp_path / "c4out", **quiet)
    plain = prepare_jsonl([tmp_path / "plain.jsonl"], vocab_file, tmp_path / "plain", **quiet)
    assert from_c4.documents == 5
    assert (
        from_c4.prefix.with_suffix(".bin").read_bytes()
        == plain.prefix.with_suffix(".bin").read_bytes()
    )
    assert len(IndexedDataset(from_c4.prefix)) == 5


def test_docs_give_every_ignored_and_refused_key_its_reason():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "gpt-neox-configs.md").read_text()
    for key in [*neox_compat.IGNORED_KEYS, *neox_compat.UNSUPPORTED]:
        assert f"`{key.replace('_', '-')}`" in doc, key
