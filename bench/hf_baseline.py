"""The transformers baseline: GPTNeoXForCausalLM in a plain training loop, timed like neoxlab's
trainer, and the comparison baby_gpt.py and pythia160m.py make (neoxlab's variants, then the
baseline at the same shapes)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import common
import throughput
import torch
import torch.nn.functional as F

from neoxlab.config import Config
from neoxlab.model import ModelConfig
from neoxlab.runtime import Runtime, resolve_runtime


def neoxlab_variants_then_hf(
    config_file: Path,
    overrides: Sequence[str],
    variants: dict[str, tuple[list[str], bool]],
    names: Sequence[str],
    steps: int,
    warmup_steps: int,
    smoke: bool,
) -> tuple[list[tuple[str, str, throughput.Throughput]], throughput.Throughput, Config]:
    """Train each named neoxlab variant (name -> (extra overrides, small corpora on the GPU)),
    then the transformers baseline at the same shapes and batch, in this one process: the
    measurements, the baseline's (also last in the list) and the baseline's config."""
    measured = []
    for name in names:
        extra, resident = variants[name]
        config = common.neoxlab_config([config_file], [*overrides, *extra])
        with throughput.device_resident(resident):
            measured.append(("neoxlab", name, throughput.train_neoxlab(config, warmup_steps)))
    config = common.neoxlab_config([config_file], overrides)
    first = measured[0][2]
    baseline = train_hf(
        first.model,
        config,
        runtime_for(config),
        first.global_batch,
        steps=3 if smoke else steps - warmup_steps,
        warmup_steps=1 if smoke else warmup_steps,
    )
    measured.append(("transformers", "plain loop", baseline))
    return measured, baseline, config


def hf_model(model: ModelConfig, device: torch.device) -> torch.nn.Module:
    """transformers' GPTNeoXForCausalLM with the shapes of `model` (random init)."""
    import transformers

    config = transformers.GPTNeoXConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        intermediate_size=model.intermediate_size,
        max_position_embeddings=model.max_position_embeddings,
        rotary_pct=model.rotary_pct,
        rotary_emb_base=model.rotary_emb_base,
        hidden_act={"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[model.activation],
        use_parallel_residual=model.parallel_residual,
        layer_norm_eps=model.layernorm_eps,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        tie_word_embeddings=False,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"  # PyTorch's fused attention, as neoxlab uses
    return transformers.GPTNeoXForCausalLM(config).to(device)


def train_hf(
    model_config: ModelConfig,
    config: Config,
    runtime: Runtime,
    batch: int,
    steps: int,
    warmup_steps: int,
) -> throughput.Throughput:
    """The baseline: GPTNeoXForCausalLM and a plain loop (autocast, loss in fp32, fused AdamW on
    CUDA, gradient clipping, torch.compile where neoxlab compiles), batches of random tokens
    made on the device beforehand (no data loading at all: the baseline's best case)."""
    device = runtime.device
    torch.manual_seed(0)
    model = hf_model(model_config, device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        betas=tuple(config.optimizer.get("params", {}).get("betas", (0.9, 0.999))),
        weight_decay=config.weight_decay,
        fused=device.type == "cuda" or None,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.precision == "fp16")
    step_model = torch.compile(model) if runtime.compile else model
    seq, vocab = config.seq_length, model_config.vocab_size
    batches = [torch.randint(0, vocab, (batch, seq + 1), device=device) for _ in range(4)]
    throughput.reset_peak_memory(device)
    start = 0.0
    for step in range(warmup_steps + steps):
        if step == warmup_steps:
            common.synchronize(device)
            start = time.perf_counter()
        windows = batches[step % len(batches)]
        with runtime.autocast():
            logits = step_model(input_ids=windows[:, :-1]).logits
        loss = F.cross_entropy(logits.float().view(-1, vocab), windows[:, 1:].reshape(-1))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clipping or math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    common.synchronize(device)
    seconds = time.perf_counter() - start
    tokens_per_second = steps * batch * seq / seconds
    flops = model_flops_per_token(model_config, seq)
    result = throughput.Throughput(
        tokens_per_second,
        throughput.mfu(runtime, flops, tokens_per_second),
        steps,
        throughput.peak_memory_gib(device),
        model_config,
        batch,
        runtime.precision,
    )
    del model, step_model, optimizer
    throughput.release(device)
    return result


def model_flops_per_token(model: ModelConfig, seq_length: int) -> int:
    """The issue's formula for the same shapes (neoxlab's GPTNeoX.flops_per_token)."""
    from neoxlab.model import GPTNeoX

    with torch.device("meta"):
        return GPTNeoX(model).flops_per_token(seq_length)


def runtime_for(config: Config) -> Runtime:
    return resolve_runtime(
        config.device,
        config.requested_precision(),
        config.compile,
        notice=common.quiet,
        compile_mode=config.compile_mode,
    )
