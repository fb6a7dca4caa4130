"""EleutherAI gpt-neox config vocabulary that differs from neoxlab's own keys.

A config written for gpt-neox loads unchanged: keys whose meaning neoxlab shares are translated
to neoxlab keys here, keys that only steer DeepSpeed/Megatron internals (fusions, bucket sizes,
launcher settings) are collected and reported in one warning, and keys that would change the
model in a way neoxlab cannot reproduce (learned positions, ...) are
errors. `config.py` calls in here; the keys that neoxlab understands still live only there.
"""

from __future__ import annotations

from typing import Any

from neoxlab.errors import NeoxlabError

# Keys gpt-neox (or the DeepSpeed config it forwards) knows that change nothing neoxlab computes:
# kernel fusions, parallel layouts, launcher and logging plumbing. Listed in one warning.
UNUSED_KEYS = frozenset(
    {
        # parallelism layout and launcher (neoxlab: torchrun + DDP/FSDP2)
        "pipe_parallel_size",
        "pipe_partition_method",
        "output_layer_parallelism",
        "sequence_parallel",
        "distributed_backend",
        "launcher",
        "hostfile",
        "include",
        "exclude",
        "num_nodes",
        "num_gpus",
        "master_port",
        "master_addr",
        "deepspeed",
        "deepspeed_mpi",
        "deepspeed_slurm",
        "use_shared_fs",
        "lazy_mpu_init",
        # fused kernels and numerics switches that compute the same function
        "scaled_upper_triang_masked_softmax_fusion",
        "scaled_masked_softmax_fusion",
        "bias_dropout_fusion",
        "rope_fusion",
        "use_flashattn_swiglu",
        "fp16_lm_cross_entropy",
        "attention_softmax_in_fp32",
        "apply_query_key_layer_scaling",
        "use_cpu_initialization",
        "init_method_std",
        # data loading internals
        "data_impl",
        "num_workers",
        "mmap_warmup",
        "merge_file",
        "weight_by_num_documents",
        "weighted_sampler_alpha",
        "eod_mask_loss",
        # activation checkpointing details (neoxlab recomputes every block)
        "checkpoint_num_layers",
        "partition_activations",
        "synchronize_each_layer",
        "contiguous_checkpointing",
        "checkpoint_in_cpu",
        "profile_backward",
        "deepspeed_activation_checkpointing",
        # checkpoint and lr-scheduler bookkeeping
        "extra_save_iters",
        "checkpoint_scale",
        "checkpoint_validation_with_forward_pass",
        "no_save_optim",
        "no_save_rng",
        "no_load_optim",
        "no_load_rng",
        "finetune",
        "override_lr_scheduler",
        "use_checkpoint_lr_scheduler",
        # DeepSpeed engine settings
        "zero_allow_untested_optimizer",
        "zero_stage",
        "zero_reduce_scatter",
        "zero_contiguous_gradients",
        "zero_reduce_bucket_size",
        "zero_allgather_bucket_size",
        "steps_per_print",
        "wall_clock_breakdown",
        "dump_state",
        "amp",
        "autotuning",
        "flops_profiler",
        "comms_logger",
        "csv_monitor",
        "communication_data_type",
        "prescale_gradients",
        "gradient_predivide_factor",
        "sparse_gradients",
        "hysteresis",
        "memory_profiling",
        "memory_profiling_path",
        "scalenorm_epsilon",
        # logging sinks and text generation (neoxlab has its own)
        "log_dir",
        "git_hash",
        "log_grad_norm",
        "log_param_norm",
        "log_grad_pct_zeros",
        "log_optimizer_states",
        "log_gradient_noise_scale",
        "gradient_noise_scale_n_batches",
        "gradient_noise_scale_cpu_offload",
        "use_wandb",
        "wandb_project",
        "wandb_group",
        "wandb_team",
        "wandb_host",
        "wandb_init_all_ranks",
        "tensorboard_dir",
        "text_gen_type",
        "temperature",
        "top_p",
        "top_k",
        "maximum_tokens",
        "sample_input_file",
        "sample_output_file",
        "num_samples",
        "recompute",
        "eval_results_prefix",
        "eval_tasks",
        "char_level_ppl",
    }
)

# gpt-neox keys translated to neoxlab keys (or checked and then dropped) by `translate`.
TRANSLATED_KEYS = frozenset(
    {
        "gpt_j_tied",
        "bias_gelu_fusion",
        "init_method",
        "output_layer_init_method",
        "attention_config",
        "model_parallel_size",
    }
)

# Kept in the flattened config until the layers are merged: config._build folds it into
# make-vocab-size-divisible-by (gpt-neox pads the vocabulary to 128 x tensor-parallel degree).
MODEL_PARALLEL_SIZE = "model_parallel_size"

# neoxlab keys whose default is not gpt-neox's: a gpt-neox file that leaves them out trains a
# different model or schedule there than here, so load_config says so. Value: gpt-neox's default.
DIFFERING_DEFAULTS = {
    "pos_emb": "learned",
    "rotary_pct": "1.0",
    "gpt_j_residual": "false",
    "no_weight_tying": "false (tied embeddings)",
    "init_method": "normal",
    "output_layer_init_method": "scaled_normal",
    "hidden_dropout": "0.1",
    "attention_dropout": "0.1",
    "weight_decay": "0.01",
    "lr_decay_style": "linear",
    "gradient_clipping": "0 (DeepSpeed: off)",
    "split": "969,30,1",
}

TOKENIZER_TYPES = {"hftokenizer": "hf"}
PRECISIONS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
ATTENTION_TYPES = ("global", "flash")  # flash is an implementation of global causal attention
NEOXLAB_INIT = {"init_method": "small_init", "output_layer_init_method": "wang_init"}


def translate(key: str, value: Any, origin: str) -> dict[str, Any]:
    """One gpt-neox key from TRANSLATED_KEYS -> the neoxlab keys it sets (maybe none)."""
    if key == "gpt_j_tied":
        if value is not False:
            raise NeoxlabError(
                f"gpt-j-tied {value!r} in {origin}: one LayerNorm shared per block is unsupported",
                hint="set gpt-j-tied: false (Pythia's layout)",
            )
        return {}
    if key == "bias_gelu_fusion":
        # gpt-neox's fused bias+GELU kernel uses the tanh approximation.
        if not isinstance(value, bool):
            raise NeoxlabError(f"bias-gelu-fusion in {origin} must be true or false")
        return {"activation": "gelu_tanh"} if value else {}
    if key in NEOXLAB_INIT:
        if value != NEOXLAB_INIT[key]:
            raise NeoxlabError(
                f"{key.replace('_', '-')} {value!r} in {origin} is not supported; neoxlab "
                f"initialises with {NEOXLAB_INIT[key]}",
                hint=f"set {key.replace('_', '-')}: {NEOXLAB_INIT[key]} (Pythia's init)",
            )
        return {}
    if key == "attention_config":
        _check_attention_config(value, origin)
        return {}
    if key == MODEL_PARALLEL_SIZE:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise NeoxlabError(f"model-parallel-size in {origin} must be a positive integer")
        return {MODEL_PARALLEL_SIZE: value}
    raise AssertionError(f"no translation for {key}")


def _check_attention_config(value: Any, origin: str) -> None:
    problem = NeoxlabError(
        f"attention-config {value!r} in {origin} is not a list of [[types], count]",
        hint='e.g. [[["global"], 12]]',
    )
    if not isinstance(value, list):
        raise problem
    for entry in value:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)):
            raise problem
        for kind in entry[0]:
            if kind not in ATTENTION_TYPES:
                raise NeoxlabError(
                    f"attention type {kind!r} in {origin} is not supported; neoxlab has global "
                    "causal attention only",
                    hint='use "global" (or "flash", the same attention)',
                )


def translate_value(key: str, value: Any) -> Any:
    """gpt-neox spellings of values neoxlab names differently (HFTokenizer -> hf, ...)."""
    if key == "tokenizer_type" and isinstance(value, str):
        return TOKENIZER_TYPES.get(value.lower(), value)
    if key == "precision" and isinstance(value, str):
        return PRECISIONS.get(value.lower(), value)
    return value


def is_gpt_neox_file(raw_keys: set[str], neoxlab_keys: set[str]) -> bool:
    """Does a file's (canonical) key set look like a gpt-neox config? Only gpt-neox files carry
    its translated or unused keys (those neoxlab shares, e.g. use-wandb, say nothing) or ZeRO."""
    if neoxlab_keys <= raw_keys:
        return False  # a run's own config.yml (what --resume reads): every key, zero_* included
    markers = (UNUSED_KEYS - neoxlab_keys) | TRANSLATED_KEYS | {"zero_optimization"}
    return bool(raw_keys & markers)
