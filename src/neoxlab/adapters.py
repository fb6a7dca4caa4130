"""LoRA and QLoRA on neoxlab's GPT-NeoX, through PEFT and bitsandbytes.

LoRA (Hu et al. 2021) freezes the base model and trains, beside each chosen linear layer W, two
small matrices A (rank x in) and B (out x rank): the layer computes W x + (alpha / rank) B A x.
B starts at zero, so training starts from the base model exactly. QLoRA (Dettmers et al. 2023)
also stores the frozen linear layers of the blocks in 4-bit NormalFloat (nf4), dequantized to
the compute dtype one layer at a time.

PEFT does the injecting, merging and its adapter file format; bitsandbytes does the 4-bit
weights and the 8-bit AdamW of optim.py. Both are the optional `finetune` extra and are imported
only when a run uses them. model.py names its layers as transformers' GPTNeoX does
(`query_key_value`, `dense`, `dense_h_to_4h`, `dense_4h_to_h`), so adapters trained here load
onto a transformers model unchanged, and the default targets are read from the model itself:
every linear layer inside its blocks, whatever the block's layers are called.

This module knows no config: what it reads from one is the `LoraOptions` protocol.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from safetensors.torch import save_file
from torch import nn

from neoxlab.atomic import give_default_permissions
from neoxlab.errors import NeoxlabError

FINETUNE_EXTRA = 'pip install "neoxlab[finetune]"'
ADAPTER_NAME = "default"  # PEFT's name for a model's one adapter
# Bytes per weight of nf4 with double quantization (bitsandbytes' Linear4bit defaults): 4 bits,
# one 8-bit absmax per block of 64 weights, one fp32 absmax per 256 of those.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
# What PEFT's adapter_model.safetensors names each tensor: the PeftModel's path to the base model.
PEFT_PREFIX = "base_model.model."


class LoraOptions(Protocol):
    """The config values LoRA reads (config.Config has them all)."""

    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: list[str] | None
    load_in_4bit: bool


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...] | None  # layer names; None: every linear layer inside the blocks
    load_in_4bit: bool = False

    @classmethod
    def from_options(cls, options: LoraOptions) -> LoraSpec | None:
        """The spec of a config, or None for full finetuning (lora-rank 0)."""
        if not options.lora_rank:
            return None
        targets = tuple(options.lora_targets) if options.lora_targets else None
        return cls(
            options.lora_rank,
            options.lora_alpha,
            options.lora_dropout,
            targets,
            options.load_in_4bit,
        )


def import_quietly(name: str, purpose: str) -> ModuleType:
    """Import peft or bitsandbytes, or say which extra to install. bitsandbytes logs a warning
    at import on CPUs with AVX512-BF16 when it cannot fetch an optional 4-bit kernel from the
    Hugging Face Hub, telling users to install a package they already have: neoxlab runs
    without that kernel, so the warning is silenced."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        return importlib.import_module(name)
    except ImportError:
        raise NeoxlabError(f"{purpose} needs {name}", hint=FINETUNE_EXTRA) from None


# ---- which layers ------------------------------------------------------------------------------


def block_linear_names(model: nn.Module) -> list[str]:
    """The names of the linear layers inside the repeated blocks (any nn.ModuleList), in the
    order they first appear: for GPT-NeoX query_key_value, dense, dense_h_to_4h, dense_4h_to_h.
    Of a model without adapters (PEFT's layers hold linear layers of their own)."""
    names: dict[str, None] = {}
    for blocks in (m for m in model.modules() if isinstance(m, nn.ModuleList)):
        for name, module in blocks.named_modules():
            if isinstance(module, nn.Linear):
                names[name.rsplit(".", 1)[-1]] = None
    return list(names)


def target_layers(model: nn.Module, spec: LoraSpec) -> dict[str, nn.Linear]:
    """The linear layers LoRA adapts, by full name: those inside the blocks whose own name is
    among the spec's targets (default: all of them). An unknown target is an error."""
    available = block_linear_names(model)
    wanted = spec.targets or tuple(available)
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise NeoxlabError(
            f"lora-targets {', '.join(unknown)}: the model has no such linear layer",
            hint=f"choose among {', '.join(available)}",
        )
    blocks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    inside = {id(m) for b in blocks for m in b.modules() if isinstance(m, nn.Linear)}
    return {
        name: module
        for name, module in model.named_modules()
        if id(module) in inside and name.rsplit(".", 1)[-1] in wanted
    }


def adapter_shapes(model: nn.Module, spec: LoraSpec) -> list[tuple[int, int]]:
    """(in, out) of every adapted layer: its adapter has rank x (in + out) weights."""
    return [(m.in_features, m.out_features) for m in target_layers(model, spec).values()]


# ---- building ----------------------------------------------------------------------------------


def lora_config(spec: LoraSpec, model: nn.Module) -> Any:
    """PEFT's LoraConfig for `spec` on `model` (not yet injected)."""
    peft = import_quietly("peft", "LoRA (lora-rank > 0)")
    targets = spec.targets or tuple(block_linear_names(model))
    return peft.LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(targets),
        task_type="CAUSAL_LM",
    )


def add_lora(model: nn.Module, spec: LoraSpec, compute_dtype: torch.dtype | None = None) -> Any:
    """Freeze `model` and inject LoRA adapters into it, in place; return PEFT's LoraModel
    around it (what merges the adapters back). Call it on the CPU, before moving to the device.

    The frozen weights stay as they are (fp32): under autocast each linear layer computes in
    16 bits as in full finetuning, so a LoRA run's losses compare with a full one's. With
    `spec.load_in_4bit` the blocks' linear layers become nf4 instead, dequantized to
    `compute_dtype` (the run's 16-bit dtype) for each matmul; they are quantized when the
    model moves to the device. The adapters stay fp32: they are what the optimizer updates.
    """
    target_layers(model, spec)  # unknown targets fail here, before anything changes
    model.requires_grad_(False)
    if spec.load_in_4bit:
        _quantize_block_linears(model, compute_dtype or torch.float32)
    tuners = import_quietly("peft.tuners.lora", "LoRA (lora-rank > 0)")
    return tuners.LoraModel(model, lora_config(spec, model), ADAPTER_NAME)


def _quantize_block_linears(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Replace every linear layer inside the blocks with bitsandbytes' nf4 Linear4bit holding
    the same weights (quantized when moved to a device) and the same bias."""
    bnb = import_quietly("bitsandbytes", "load-in-4bit (QLoRA)")
    blocks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    for parent in (m for b in blocks for m in b.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            quantized = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
            )
            quantized.weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, quant_type="nf4"
            )
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data.to(compute_dtype), False)
            setattr(parent, name, quantized)


def check_lora_runtime(
    spec: LoraSpec | None, device_type: str, sharded: bool, init_from: str | None
) -> None:
    """Where LoRA and QLoRA train: on a model (init-from), QLoRA on a CUDA GPU, neither
    under FSDP."""
    if spec is None:
        return
    if not init_from:
        raise NeoxlabError(
            "lora-rank > 0 trains adapters on a model: it needs init-from",
            hint="add init-from=models/pythia-1.4b (a Hugging Face folder or a neoxlab run), "
            "or set lora-rank=0 to train every weight",
        )
    if spec.load_in_4bit and device_type != "cuda":
        raise NeoxlabError(
            f"load-in-4bit (QLoRA) needs a CUDA GPU and bitsandbytes; this run is on {device_type}",
            hint="drop load-in-4bit=true: LoRA alone trains here",
        )
    if sharded:
        raise NeoxlabError(
            "LoRA trains in one process or with DDP, not with FSDP sharding",
            hint="add distributed=ddp: the adapters are small, there is nothing to shard",
        )


# ---- adapter weights ---------------------------------------------------------------------------


def adapter_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (the adapters) by name, detached: what a checkpoint holds."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_adapter_weights(model: nn.Module, weights: dict[str, torch.Tensor], origin: Path) -> None:
    """Copy a checkpoint's adapters into a model that `add_lora` prepared with the same spec;
    other names or shapes are one clear error."""
    expected = adapter_weights(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [n for n in expected if n in weights and weights[n].shape != expected[n].shape]
    if missing or unexpected or wrong:
        raise NeoxlabError(
            f"the adapters in {origin} do not match lora-rank / lora-targets of its config: "
            f"missing {missing[:2]}, unexpected {unexpected[:2]}, other shapes {wrong[:2]}",
            hint="the checkpoint was written by another neoxlab version or edited",
        )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in weights:
                parameter.copy_(weights[name])


def merged(lora_model: Any) -> nn.Module:
    """The base model with the adapters added into its weights (W + (alpha / rank) B A) and
    the LoRA layers removed: a plain model with the base model's layer names again."""
    return lora_model.merge_and_unload()


def save_peft_adapter(lora_model: Any, folder: Path, base: str) -> None:
    """Write `folder` as PEFT's save_pretrained writes it: adapter_config.json and
    adapter_model.safetensors, which `peft.PeftModel.from_pretrained(<base model>, folder)`
    loads onto transformers' GPTNeoXForCausalLM."""
    peft = import_quietly("peft", "an adapter export")
    model = lora_model.model
    config = lora_model.peft_config[ADAPTER_NAME]  # the one the adapters were injected with
    config.base_model_name_or_path = base
    config.save_pretrained(str(folder))
    # save_embedding_layers=False: PEFT would otherwise look the base model up to compare
    # vocabulary sizes; LoRA here never touches the embeddings.
    state = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    tensors = {PEFT_PREFIX + name: t.detach().contiguous() for name, t in state.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    give_default_permissions(folder / "adapter_model.safetensors")
