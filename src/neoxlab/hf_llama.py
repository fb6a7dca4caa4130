"""Llama-shaped models to and from transformers' `LlamaForCausalLM`.

RMSNorm, the SwiGLU MLP, a sequential residual and rotary embedding on every dim of a head make
Llama's block; grouped key/value heads, tied embeddings and biases in the attention or the MLP
are options of LlamaConfig too. model.py names every model's parameters as GPTNeoX does, with
one fused QKV projection and one fused up/gate projection; this module splits and renames them
for LlamaForCausalLM (`to_llama_weights`) and joins them back (`from_llama_weights`), and
writes and reads the architecture part of a Llama config.json. hf.py decides which class a
model exports as and handles everything else (tokenizer, model card, the folder).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from neoxlab.errors import NeoxlabError
from neoxlab.model import ModelConfig

HIDDEN_ACT = "silu"  # transformers' name for the gate's activation in a SwiGLU MLP

# What makes a ModelConfig Llama's block: field -> (required value, the config key that sets it).
LLAMA_BLOCK = {
    "norm": ("rmsnorm", "norm"),
    "activation": ("swiglu", "activation"),
    "parallel_residual": (False, "gpt-j-residual"),
    "rotary_pct": (1.0, "rotary-pct"),
}

# Whole-model names: GPTNeoX's (model.py's) -> LlamaForCausalLM's.
TOP_LEVEL = {
    "gpt_neox.embed_in.weight": "model.embed_tokens.weight",
    "gpt_neox.final_layer_norm.weight": "model.norm.weight",
    "embed_out.weight": "lm_head.weight",
}
# Per-layer names that only change, after `gpt_neox.layers.{i}.` -> `model.layers.{i}.`.
RENAMED = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "attention.dense.weight": "self_attn.o_proj.weight",
    "attention.dense.bias": "self_attn.o_proj.bias",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
    "mlp.dense_4h_to_h.bias": "mlp.down_proj.bias",
}
QKV = "attention.query_key_value"
SPLIT_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
UP_GATE = "mlp.dense_h_to_4h"
SPLIT_UP_GATE = ("mlp.up_proj", "mlp.gate_proj")  # gpt-neox's order: [up | gate]


def llama_mismatches(model: ModelConfig) -> list[tuple[str, Any, Any]]:
    """(config key, this model's value, Llama's) for each way `model` is not Llama's block."""
    return [
        (key, getattr(model, name), value)
        for name, (value, key) in LLAMA_BLOCK.items()
        if getattr(model, name) != value
    ]


def llama_config(model: ModelConfig) -> dict[str, Any]:
    """The architecture entries of a LlamaForCausalLM config.json (transformers 4 and 5)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_kv_heads,
        "head_dim": model.head_dim,
        "intermediate_size": model.intermediate_size,
        "hidden_act": HIDDEN_ACT,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.rms_norm_eps,
        "rope_theta": model.rotary_emb_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rotary_emb_base},
        "attention_bias": model.attention_bias,
        "mlp_bias": model.mlp_bias,
        "tie_word_embeddings": model.tie_word_embeddings,
        "attention_dropout": model.attention_dropout,
    }


def read_llama_config(raw: dict[str, Any], origin: str) -> dict[str, Any]:
    """neoxlab config fields (gpt-neox's keys) from a Llama config.json's architecture entries.

    The MLP width is written as gpt-neox sizes a SwiGLU MLP: intermediate-size 3 x Llama's
    per-half width, of which gpt-neox's ⅔ rule builds two halves of exactly that width.
    """
    unsupported = []
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        unsupported.append(f"rope type {rope.get('rope_type', rope.get('type'))!r}")
    if raw.get("hidden_act", HIDDEN_ACT) != HIDDEN_ACT:
        unsupported.append(f"hidden_act {raw['hidden_act']!r} (SwiGLU's is silu)")
    heads = raw["num_attention_heads"]
    if raw.get("head_dim", raw["hidden_size"] // heads) * heads != raw["hidden_size"]:
        unsupported.append(f"head_dim {raw['head_dim']} (neoxlab's is hidden_size / heads)")
    if unsupported:
        raise NeoxlabError(
            f"{origin} uses {', '.join(unsupported)}, which neoxlab's Llama block does not have"
        )
    return {
        "hidden_size": raw["hidden_size"],
        "num_layers": raw["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_kv_heads": raw.get("num_key_value_heads") or heads,
        "intermediate_size": 3 * raw["intermediate_size"],
        "mlp_multiple_of": 1,
        "max_position_embeddings": raw["max_position_embeddings"],
        "norm": "rmsnorm",
        "rms_norm_epsilon": float(raw.get("rms_norm_eps", 1e-6)),
        "activation": "swiglu",
        "gpt_j_residual": False,
        "rotary_pct": 1.0,
        "rotary_emb_base": float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        "use_bias_in_attn_linear": bool(raw.get("attention_bias", False)),
        "use_bias_in_mlp": bool(raw.get("mlp_bias", False)),
        "no_weight_tying": not raw.get("tie_word_embeddings", False),
    }


def _qkv_parts(tensor: Tensor, model: ModelConfig) -> list[Tensor]:
    """The fused QKV weight or bias as [q, k, v]: rows [kv head][group's q heads, k, v][dim]."""
    group = model.heads_per_kv_head
    rows = tensor.unflatten(0, (model.num_kv_heads, group + 2, model.head_dim))
    return [rows[:, :group].flatten(0, 2), rows[:, group].flatten(0, 1), rows[:, -1].flatten(0, 1)]


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, model: ModelConfig) -> Tensor:
    """The inverse of _qkv_parts."""
    kv_heads, head_dim = model.num_kv_heads, model.head_dim
    groups = q.unflatten(0, (kv_heads, model.heads_per_kv_head, head_dim))
    shared = [t.unflatten(0, (kv_heads, 1, head_dim)) for t in (k, v)]
    return torch.cat([groups, *shared], dim=1).flatten(0, 2)


def to_llama_weights(state: dict[str, Tensor], model: ModelConfig) -> dict[str, Tensor]:
    """model.py's state_dict of a Llama-shaped model -> LlamaForCausalLM's tensors."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name in TOP_LEVEL:
            out[TOP_LEVEL[name]] = tensor
            continue
        layer, local = _layer_name(name)
        prefix = f"model.layers.{layer}."
        module, kind = local.rsplit(".", 1)
        if module == QKV:
            for target, part in zip(SPLIT_QKV, _qkv_parts(tensor, model), strict=True):
                out[f"{prefix}{target}.{kind}"] = part.contiguous()
        elif module == UP_GATE:
            for target, part in zip(SPLIT_UP_GATE, tensor.chunk(2, dim=0), strict=True):
                out[f"{prefix}{target}.{kind}"] = part.contiguous()
        else:
            out[prefix + RENAMED[local]] = tensor
    return out


def from_llama_weights(weights: dict[str, Tensor], model: ModelConfig) -> dict[str, Tensor]:
    """LlamaForCausalLM's tensors -> model.py's names and fused layouts (names that do not fit
    pass through unchanged, for the state_dict check to report)."""
    names = {llama: ours for ours, llama in TOP_LEVEL.items()}
    if model.tie_word_embeddings:
        weights = {k: t for k, t in weights.items() if k != "lm_head.weight"}
    for layer in range(model.num_layers):
        ours, theirs = f"gpt_neox.layers.{layer}.", f"model.layers.{layer}."
        names |= {theirs + llama: ours + local for local, llama in RENAMED.items()}
        for kind in ("weight", "bias"):
            parts = [weights.pop(f"{theirs}{p}.{kind}", None) for p in SPLIT_QKV]
            if all(part is not None for part in parts):
                weights[f"{ours}{QKV}.{kind}"] = _fuse_qkv(*parts, model)  # type: ignore[arg-type]
            halves = [weights.pop(f"{theirs}{p}.{kind}", None) for p in SPLIT_UP_GATE]
            if all(half is not None for half in halves):
                weights[f"{ours}{UP_GATE}.{kind}"] = torch.cat(halves)  # type: ignore[arg-type]
    return {names.get(name, name): tensor for name, tensor in weights.items()}


def _layer_name(name: str) -> tuple[int, str]:
    """`gpt_neox.layers.3.attention.dense.weight` -> (3, `attention.dense.weight`)."""
    layer, local = name.removeprefix("gpt_neox.layers.").split(".", 1)
    return int(layer), local
