"""EleutherAI gpt-neox's config vocabulary, and how each of its keys maps onto neoxlab.

A gpt-neox config either trains here what gpt-neox would train, or stops with an error that names
the key. Every gpt-neox key falls in exactly one of these groups (docs/gpt-neox-configs.md lists
them all with the reasons):

- keys neoxlab's schema shares (`num-layers`, `lr`, `eod-mask-loss`, ...): config.py;
- IGNORED_KEYS: gpt-neox computes the same loss, data order and updates without them (kernels,
  parallel layout, logging) or they only tune a feature that UNSUPPORTED refuses; listed in one
  warning;
- translated here: per file by `translate` (TRANSLATED_KEYS), after all files are merged by
  `translate_merged` (MERGED_KEYS: finetune, lr-decay-fraction, ...);
- UNSUPPORTED: features neoxlab does not have, accepted only at the value that means what
  neoxlab does. The architecture keys neoxlab has (norm, rms-norm-epsilon, activation swiglu,
  mlp-multiple-of, num-kv-heads, no-weight-tying, the use-bias-in-* keys) are schema keys;
  sliding-window attention is accepted only where its window covers the whole context.

A file that names a key only gpt-neox uses is a gpt-neox config (`is_gpt_neox_file`): the keys
it leaves out take gpt-neox's defaults (GPT_NEOX_DEFAULTS), not neoxlab's, and the keys gpt-neox
cannot do without (REQUIRED_KEYS) must be set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from neoxlab.errors import NeoxlabError


def _because(reason: str, *keys: str) -> dict[str, str]:
    return dict.fromkeys(keys, reason)


# Key -> why gpt-neox computes the same loss, data order and updates without it.
IGNORED_KEYS: dict[str, str] = {
    **_because(
        "parallel layout, launcher and process bookkeeping: the same model and updates on any "
        "layout (neoxlab runs torchrun with DDP or FSDP2)",
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
        "force_multi",
        "autotuning_run",
        "no_ssh_check",
        "comment",
        "account",
        "deepspeed",
        "deepspeed_mpi",
        "deepspeed_slurm",
        "deepscale",
        "deepscale_config",
        "use_shared_fs",
        "lazy_mpu_init",
        "global_num_gpus",
        "world_size",
        "local_rank",
        "rank",
        "is_pipe_parallel",
        "user_script",
        "iteration",
        "do_train",
        "do_valid",
        "do_test",
        "onnx_safe",
        "adlr_autoresume",
        "adlr_autoresume_interval",
        "config_files",
        "fused_kernels_build_path",
    ),
    **_because(
        "derived by gpt-neox from other keys, which neoxlab reads instead",
        "batch_size",
        "optimizer_type",
        "padded_vocab_size",
        "dynamic_loss_scale",
        "zero_stage",
        "zero_reduce_scatter",
        "zero_contiguous_gradients",
        "zero_reduce_bucket_size",
        "zero_allgather_bucket_size",
        "curriculum_seqlen",
    ),
    **_because(
        "a kernel or communication choice that computes the same function (neoxlab keeps fp32 "
        "weights and gradients under autocast, and has no tensor parallelism to reduce over)",
        "scaled_upper_triang_masked_softmax_fusion",
        "scaled_masked_softmax_fusion",
        "bias_dropout_fusion",
        "rope_fusion",
        "layernorm_fusion",
        "rmsnorm_fusion",
        "use_flashattn_swiglu",
        "attention_softmax_in_fp32",
        "apply_query_key_layer_scaling",
        "use_cpu_initialization",
        "fp32_allreduce",
        "communication_data_type",
        "prescale_gradients",
        "gradient_predivide_factor",
        "sparse_gradients",
        "data_types",
    ),
    **_because(
        "how data files are read, not which tokens",
        "data_impl",
        "num_workers",
        "mmap_warmup",
    ),
    **_because(
        "how activations are recomputed, not what (neoxlab recomputes whole blocks)",
        "checkpoint_num_layers",
        "partition_activations",
        "synchronize_each_layer",
        "contiguous_checkpointing",
        "checkpoint_in_cpu",
        "profile_backward",
        "deepspeed_activation_checkpointing",
        "activation_checkpointing",
    ),
    **_because(
        "what a checkpoint holds and when one is written, not the training",
        "extra_save_iters",
        "checkpoint_scale",
        "checkpoint_validation_with_forward_pass",
        "no_save_optim",
        "no_save_rng",
        "s3_path",
        "s3_chunk_size",
        "rotary_save_freqs_buffer",
        "checkpoint",
    ),
    **_because(
        "DeepSpeed's engine reports, profilers and tuners",
        "steps_per_print",
        "wall_clock_breakdown",
        "dump_state",
        "autotuning",
        "flops_profiler",
        "comms_logger",
        "csv_monitor",
        "tensorboard",
        "wandb",
        "memory_profiling",
        "memory_profiling_path",
        "profile",
        "profile_step_start",
        "profile_step_stop",
    ),
    **_because(
        "logging, evaluation harness, serving and text generation (neoxlab has its own)",
        "log_dir",
        "git_hash",
        "log_grad_norm",
        "log_param_norm",
        "log_grad_pct_zeros",
        "log_optimizer_states",
        "log_gradient_noise_scale",
        "gradient_noise_scale_n_batches",
        "gradient_noise_scale_cpu_offload",
        "wandb_host",
        "wandb_init_all_ranks",
        "use_comet",
        "comet_workspace",
        "comet_project",
        "comet_experiment_name",
        "comet_tags",
        "comet_others",
        "peak_theoretical_tflops",
        "text_gen_type",
        "temperature",
        "top_p",
        "top_k",
        "return_logits",
        "maximum_tokens",
        "prompt_end",
        "sample_input_file",
        "sample_output_file",
        "num_samples",
        "recompute",
        "eval_results_prefix",
        "char_level_ppl",
        "precompute_model_name",
        "serve_model_weights",
        "weight_server_port",
    ),
    **_because(
        "not read by gpt-neox's training (DeepSpeed reads the fp16 block's; BERT-only)",
        "hysteresis",
        "loss_scale",
        "loss_scale_window",
        "min_scale",
        "short_seq_prob",
    ),
    **_because(
        "only read by a feature UNSUPPORTED refuses (the key that turns it on fails first)",
        "scalenorm_epsilon",  # norm: scalenorm
        "gmlp_attn_dim",  # attention-config gmlp
        "rpe_num_buckets",  # pos-emb: rpe
        "rpe_max_distance",
        "opt_pos_emb_offset",  # pos-emb: learned
        "sparsity_config",  # sparse attention types
        "sparse_attention",
        "mamba_selective_scan_fusion",  # attention-config mamba
        "mamba_causal_conv_fusion",
        "mamba_inner_func_fusion",
        "mamba_selective_fp32_params",
        "mamba_use_bias_in_conv",
        "mamba_use_bias_in_linears",
        "dim_att",  # attention-config rwkv
        "head_size",
        "ffn_dim",
        "moe_expert_interval",  # moe-num-experts > 1
        "moe_top_k",
        "moe_router_type",
        "moe_lbl_in_fp32",
        "moe_jitter_eps",
        "te_fp8_format",  # te-* TransformerEngine layers
        "te_fp8_wgrad",
        "te_fp8_amax_history_len",
        "te_fp8_amax_compute_algo",
        "te_fp8_margin",
        "te_fp8_mha",
        "mup_init_scale",  # use-mup
        "mup_attn_temp",
        "mup_output_temp",
        "mup_embedding_mult",
        "mup_rp_embedding_mult",
        "mup_width_scale",
        "coord_check",
        "save_base_shapes",
        "base_shapes_file",
        "dpo_fp32",  # train-impl dpo / kto / rm / reinforce
        "dpo_reference_free",
        "dpo_beta",
        "kto_fp32",
        "kto_desirable_weight",
        "kto_undesirable_weight",
        "kto_beta",
        "z_loss",
        "fp32_reinforce",
        "kl_impl",
        "kl_div_beta",
        "reinforce_leave_one_out",
        "allow_chopped",  # pack-impl other than packed
        "online_dataserver_ips",  # dataset-impl online
        "online_dataserver_ports",
        "scheduler",  # optimizer OneBitAdam
        "param_sharing_style",  # num-unique-layers
    ),
}


@dataclass(frozen=True)
class Unsupported:
    """A gpt-neox key neoxlab matches at its `accepted` values only: what neoxlab does."""

    accepted: tuple[Any, ...]
    other_values: str  # what the other values would train, which neoxlab cannot


# The architecture entries first (the rest of the architecture is schema keys, see config.py).
UNSUPPORTED: dict[str, Unsupported] = {
    "pos_emb": Unsupported(("rotary",), "another position embedding than rotary"),
    "gpt_j_tied": Unsupported((False,), "one LayerNorm shared by attention and MLP"),
    "use_qk_layernorm": Unsupported((False,), "LayerNorm on queries and keys"),
    "num_unique_layers": Unsupported((None,), "layers that share parameters"),
    "moe_num_experts": Unsupported((1,), "a mixture of experts"),
    "soft_prompt_tuning": Unsupported((None,), "soft prompt tuning"),
    "use_mup": Unsupported((False,), "muP parametrisation"),
    "te_columnparallel": Unsupported((False,), "TransformerEngine layers"),
    "te_rowparallel": Unsupported((False,), "TransformerEngine layers"),
    "te_layernorm_mlp": Unsupported((False,), "TransformerEngine layers"),
    "te_mha": Unsupported((False,), "TransformerEngine attention"),
    "train_impl": Unsupported(("normal",), "DPO, KTO, reward-model or REINFORCE training"),
    "dataset_impl": Unsupported(("gpt2",), "pairwise or online datasets"),
    "pack_impl": Unsupported(("packed",), "unpacked documents (neoxlab packs them as gpt2)"),
    "train_epochs": Unsupported((None,), "a length in epochs (set train-iters)"),
    "fp16_lm_cross_entropy": Unsupported((False,), "the loss computed in fp16"),
    "no_load_optim": Unsupported((False,), "a resume without the optimizer state"),
    "no_load_rng": Unsupported((False,), "a resume without the random state"),
    "curriculum_learning": Unsupported((None,), "curriculum learning (growing sequences)"),
    "data_efficiency": Unsupported((None,), "DeepSpeed's data efficiency library"),
    "elasticity": Unsupported((None,), "elastic batch sizes"),
    "compression_training": Unsupported((None,), "compression training"),
    "amp": Unsupported((None,), "apex AMP (use fp16 or bf16)"),
    **{
        f"{split}_{kind}_data_paths": Unsupported((None,), f"{kind} data")
        for split in ("train", "valid", "test")
        for kind in ("label", "reward")
    },
    **{
        f"{sign}_{split}{label}_data_paths": Unsupported((None,), "pairwise data")
        for sign in ("pos", "neg")
        for split in ("train", "valid", "test")
        for label in ("", "_label")
    },
}

# gpt-neox keys translated to neoxlab keys (or checked and dropped) in each file, by `translate`.
TRANSLATED_KEYS = frozenset({"bias_gelu_fusion", "attention_config", "wandb_team"})

# gpt-neox keys read once all files are merged, by `translate_merged` (they combine with keys
# another file may set: finetune with load, lr-decay-fraction with train-iters, ...).
MERGED_KEYS = frozenset(
    {
        "model_parallel_size",
        "finetune",
        "lr_decay_fraction",
        "expansion_factor",
        "sliding_window_width",
        "use_bnb_optimizer",
    }
)

# DeepSpeed's options in the fp16 block that neoxlab has no key for but reads (fp16.type).
FP16_EXTRA_OPTIONS = frozenset({"fp16", "type", "auto_cast"})

ATTENTION_TYPES = ("global", "flash")  # flash is an implementation of global causal attention
TOKENIZER_TYPES = {"hftokenizer": "hf", "gpt2bpetokenizer": "gpt2"}
PRECISIONS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}

# gpt-neox's defaults where they differ from neoxlab's (gpt-neox's key: its default). A gpt-neox
# config that leaves one out gets gpt-neox's; neoxlab's own configs keep neoxlab's defaults.
GPT_NEOX_DEFAULTS: dict[str, Any] = {
    "pos_emb": "learned",
    "rotary_pct": 1.0,
    "gpt_j_residual": False,
    "no_weight_tying": False,
    "init_method": "normal",
    "output_layer_init_method": "scaled_normal",
    "lr": 0.001,  # from optimizer.params, else 0.001
    "lr_decay_style": "linear",
    "weight_decay": 0.1,
    "split": "969, 30, 1",
    "tokenizer_type": "GPT2BPETokenizer",
}
FP16_HYSTERESIS = 2  # DeepSpeed's default delayed loss-scale backoff
# Without fp16, bf16 or precision, gpt-neox trains in fp32 (neoxlab: by hardware).
GPT_NEOX_PRECISION = "fp32"

# gpt-neox stops without these (no default): a gpt-neox config must set them, in some file.
REQUIRED_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "seq_length",
    "max_position_embeddings",
    "train_iters",
    "optimizer",
)
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "train_batch_size")


def is_gpt_neox_file(raw_keys: set[str], neoxlab_keys: set[str]) -> bool:
    """Is a file with these (canonical) keys a gpt-neox config? Yes when it names a key of
    gpt-neox's vocabulary that neoxlab's own schema lacks (every file in gpt-neox's configs/
    does; neoxlab's configs never do), or DeepSpeed's zero-optimization block."""
    if neoxlab_keys <= raw_keys:
        return False  # a run's own config.yml (what --resume reads): every key, zero_* included
    markers = (set(IGNORED_KEYS) | set(UNSUPPORTED) | TRANSLATED_KEYS | MERGED_KEYS) - neoxlab_keys
    return bool(raw_keys & (markers | {"zero_optimization"}))


def check_supported(key: str, value: Any, origin: str) -> None:
    """Raise when `value` of UNSUPPORTED `key` asks for what neoxlab does not have."""
    rule = UNSUPPORTED[key]
    if _is_accepted(value, rule.accepted):
        return
    accepted = rule.accepted[0]
    trains = (
        f"without it (leave {_key(key)} out)"
        if accepted is None
        else f"with {_key(key)}: {_yaml(accepted)}"
    )
    raise NeoxlabError(
        f"{_key(key)} {_yaml(value)} in {origin} asks for {rule.other_values}, which neoxlab "
        "does not support",
        hint=f"neoxlab trains {trains}; docs/gpt-neox-configs.md lists what it supports",
    )


def _is_accepted(value: Any, accepted: tuple[Any, ...]) -> bool:
    if isinstance(value, dict) and value.get("enabled") is False:
        return None in accepted  # a DeepSpeed block that is switched off
    for candidate in accepted:
        if isinstance(candidate, str) and isinstance(value, str):
            if value.lower() == candidate:
                return True
        elif type(value) is type(candidate) and value == candidate:
            return True
    return False


def translate(key: str, value: Any, origin: str) -> dict[str, Any]:
    """One gpt-neox key from TRANSLATED_KEYS -> the neoxlab keys it sets (maybe none)."""
    if key == "bias_gelu_fusion":
        # gpt-neox's fused bias+GELU kernel uses the tanh approximation.
        if not isinstance(value, bool):
            raise NeoxlabError(f"bias-gelu-fusion in {origin} must be true or false")
        return {"activation": "gelu_tanh"} if value else {}
    if key == "attention_config":
        _check_attention_config(value, origin)
        return {}
    if key == "wandb_team":
        return {"wandb_entity": value}
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


# ---- after all files are merged ---------------------------------------------------------------


def translate_merged(
    merged: dict[str, Any], origin: str, defaults: dict[str, Any]
) -> dict[str, Any]:
    """The merged layers with MERGED_KEYS turned into neoxlab keys and DeepSpeed's bf16 spelling
    of the fp16 block read as bf16; `defaults` holds the schema's defaults of the keys they
    combine with (train-iters, hidden-size, make-vocab-size-divisible-by)."""
    merged = dict(merged)

    def value(key: str) -> Any:
        return merged.get(key, defaults[key])

    _finetune(merged, origin)
    _bnb_optimizer(merged, origin)
    degree = merged.pop("model_parallel_size", 1)
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise NeoxlabError(f"model-parallel-size in {origin} must be a positive integer")
    if degree > 1:
        # gpt-neox pads the vocabulary to a multiple of make-vocab-size-divisible-by x the
        # tensor-parallel degree (Pythia 6.9B: 256, 12B: 512); the same shapes need the same.
        key = "make_vocab_size_divisible_by"
        merged[key] = int(_number(value(key), _key(key), origin)) * degree
    fraction = merged.pop("lr_decay_fraction", None)
    if fraction is not None and merged.get("lr_decay_iters") is None:
        # gpt-neox: lr-decay-iters wins; else floor(train-iters x fraction), at least 1
        iters = _number(value("train_iters"), "train-iters", origin)
        share = _number(fraction, "lr-decay-fraction", origin)
        merged["lr_decay_iters"] = max(1, math.floor(iters * share))
    expansion = merged.pop("expansion_factor", None)
    if expansion is not None:
        if merged.get("intermediate_size") is not None:
            raise NeoxlabError(
                f"intermediate-size and expansion-factor are both set in {origin}",
                hint="gpt-neox takes one of them",
            )
        hidden = _number(value("hidden_size"), "hidden-size", origin)
        merged["intermediate_size"] = int(_number(expansion, "expansion-factor", origin) * hidden)
    window = merged.pop("sliding_window_width", None)
    if window is not None:
        context = merged.get("max_position_embeddings") or value("seq_length")
        _check_window(window, _number(context, "max-position-embeddings", origin), origin)
    _bf16_in_fp16_block(merged)
    return merged


def _check_window(window: Any, context: float, origin: str) -> None:
    """Sliding-window attention (Mistral: each token sees the last `window` tokens) is full
    causal attention wherever the window covers the context, and only there neoxlab has it: a
    window needs an explicit mask, which takes SDPA's flash and memory-efficient kernels away,
    while the contexts trained on one GPU (up to 4,096 tokens) fit inside Mistral's window."""
    width = _number(window, "sliding-window-width", origin)
    if width < context:
        raise NeoxlabError(
            f"sliding-window-width {window} in {origin} is shorter than the context "
            f"({context:,.0f} tokens, max-position-embeddings or seq-length): that asks for "
            "sliding-window attention, which neoxlab does not support",
            hint=f"set seq-length and max-position-embeddings to at most {window}: there the "
            "window covers every token and the attention is the same",
        )


def _finetune(merged: dict[str, Any], origin: str) -> None:
    """gpt-neox's `finetune: true` + `load: X`: X's weights only, at step 0, with a fresh
    optimizer and the config's schedule; neoxlab's init-from does exactly that."""
    finetune = merged.pop("finetune", False)
    if not isinstance(finetune, bool):
        raise NeoxlabError(f"finetune in {origin} must be true or false, got {finetune!r}")
    if not finetune:
        return
    load = merged.pop("load", None)
    if not load:
        raise NeoxlabError(
            f"finetune is true in {origin} but no load names the checkpoint to start from",
            hint="set load to a Hugging Face model folder or a neoxlab run or checkpoint",
        )
    if merged.get("init_from") not in (None, load):
        raise NeoxlabError(f"finetune's load and init-from name different models in {origin}")
    merged["init_from"] = load


def _bnb_optimizer(merged: dict[str, Any], origin: str) -> None:
    """gpt-neox's `use-bnb-optimizer: true` swaps its Adam for bitsandbytes' Adam8bit (other
    optimizer types ignore the key). bitsandbytes' Adam8bit and AdamW8bit are the same optimizer
    (one kernel, weight decay decoupled), which neoxlab calls AdamW8bit. gpt-neox also makes
    learned position embeddings bitsandbytes' StableEmbedding; neoxlab refuses those anyway."""
    use_bnb = merged.pop("use_bnb_optimizer", False)
    if not isinstance(use_bnb, bool):
        raise NeoxlabError(f"use-bnb-optimizer in {origin} must be true or false, got {use_bnb!r}")
    optimizer = merged.get("optimizer") or {}
    if use_bnb and str(optimizer.get("type", "Adam")).lower() == "adam":
        merged["optimizer"] = {**optimizer, "type": "AdamW8bit"}


def _bf16_in_fp16_block(merged: dict[str, Any]) -> None:
    """DeeperSpeed's `fp16: {enabled: true, type: bfloat16, ...}` (gpt-neox's Pythia-1B) trains
    in bf16; its loss-scale options then do nothing. `auto_cast` is what neoxlab always does."""
    fp16 = merged.get("fp16")
    if not isinstance(fp16, dict):
        return
    fp16 = {k: v for k, v in fp16.items() if k not in FP16_EXTRA_OPTIONS - {"type"}}
    kind = str(fp16.pop("type", "fp16")).lower()
    if kind in ("bfloat16", "bf16") and fp16.get("enabled"):
        merged["bf16"] = {**(merged.get("bf16") or {}), "enabled": True}
        fp16["enabled"] = False
    merged["fp16"] = fp16


def gpt_neox_defaults(seen: Iterable[str], merged: dict[str, Any]) -> dict[str, Any]:
    """gpt-neox's defaults for the keys no file (nor override) set in `merged`: GPT_NEOX_DEFAULTS,
    fp32 unless a precision key or an enabled fp16/bf16 block says otherwise, and DeepSpeed's
    loss-scale hysteresis in the fp16 block."""
    seen = set(seen)
    defaults = {k: v for k, v in GPT_NEOX_DEFAULTS.items() if k not in seen}
    blocks = [merged.get(name) for name in ("fp16", "bf16")]
    if "precision" not in seen and not any(
        isinstance(b, dict) and b.get("enabled") for b in blocks
    ):
        defaults["precision"] = GPT_NEOX_PRECISION
    defaults["fp16"] = {"hysteresis": FP16_HYSTERESIS}
    return defaults


def missing_required(seen: Iterable[str]) -> list[str]:
    """The keys gpt-neox cannot train without that no file sets (hyphenated)."""
    seen = set(seen)
    missing = [_key(k) for k in REQUIRED_KEYS if k not in seen]
    if not seen & set(BATCH_KEYS):
        missing.append(f"{_key(BATCH_KEYS[0])} (or {_key(BATCH_KEYS[1])})")
    return missing


def _number(value: Any, name: str, origin: str) -> float:
    """`value` as a finite positive number (YAML may give "1e-3" as text)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise NeoxlabError(f"{name} in {origin} must be a positive number, got {value!r}")
    return number


def _key(name: str) -> str:
    return name.replace("_", "-")


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)
