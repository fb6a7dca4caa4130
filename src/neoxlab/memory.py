"""What a config will cost before it runs: parameters, GPU and host memory, tokens and steps.

`describe(config)` builds the model on PyTorch's `meta` device (shapes only: no memory, no data,
no GPU), so it works for any size, Pythia's included; `neoxlab train ... --dry-run` prints it,
and every run compares it with the machine's memory before it starts (memory_check.py). The
memory figures are estimates of what training holds at its peak, without the CUDA context
(about 0.3-0.5 GB) and the allocator's slack. They follow what the run keeps:

- full training: fp32 weights, their 16-bit copies under autocast, fp32 gradients, the
  optimizer's state (8-bit AdamW at its real size) and one micro-batch's activations;
- LoRA: the frozen fp32 base model (QLoRA: its blocks' linear layers in nf4, one dequantized at
  a time) and, for the adapters alone, weights, gradients and optimizer state;
- optimizer offload (FSDP2's CPU offload): weights, gradients and optimizer state in host
  memory; on the GPU the 16-bit copies and gradients of the units computing (the root unit of
  embeddings and head, and two blocks: one computing, one prefetched) and the activations;
- FSDP over N GPUs: weights, gradients and optimizer state divided by N, plus those units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from neoxlab.adapters import NF4_BYTES_PER_WEIGHT, LoraSpec, adapter_shapes, target_layers
from neoxlab.config import Config, mlp_width, model_config, padded_vocab_size
from neoxlab.model import GPTNeoX
from neoxlab.optim import block_matrices
from neoxlab.tokenizer import STANDARD_TOKENIZERS, gpt2_tokenizer, load_tokenizer

GIB = 1024**3
RESIDUAL_BYTES = 4  # the residual stream stays fp32 under autocast (fp32 embeddings and adds)
LOG_SOFTMAX_BYTES = 4  # the loss takes its softmax in fp32 (model.py)
# bitsandbytes' 8-bit optimizers: tensors this small keep fp32 state; larger ones one byte per
# element and moment, an fp32 absmax per block of 256 elements and a 256-entry code per moment.
MIN_8BIT_SIZE = 4096
BLOCK_8BIT = 256
UNITS_IN_FLIGHT = 2  # FSDP blocks on the GPU at once: the one computing and the one prefetched


@dataclass
class TrainingPlan:
    """The numbers `--dry-run` prints; byte counts are per GPU (host: per process)."""

    parameters: int
    non_embedding_parameters: int
    vocab_size: int  # padded embedding rows
    vocab_source: str
    precision: str  # what the estimate assumes: fp32, or 16-bit mixed precision
    micro_batch: int
    accumulation: int
    global_batch: int
    seq_length: int
    train_iters: int
    checkpoint_activations: bool
    optimizer: str
    method: str  # full training, or the LoRA / QLoRA adapters
    trained_parameters: int
    weight_bytes: int  # fp32 weights the optimizer updates (the adapters under LoRA)
    half_weight_bytes: int  # 16-bit copies of the matmul weights that autocast makes
    gradient_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int  # one micro-batch
    frozen_bytes: int = 0  # LoRA's base model
    fsdp_unit_bytes: int = 0  # FSDP: the units computing, all-gathered in the compute dtype
    shards: int = 1  # FSDP ranks sharing weights, gradients and optimizer state
    offload: bool = False  # those live in host memory instead

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_length

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.train_iters

    @property
    def state_bytes(self) -> int:
        """Weights, gradients and optimizer state: what FSDP shards and offload moves."""
        trained = self.weight_bytes + self.gradient_bytes + self.optimizer_state_bytes
        return math.ceil(trained / self.shards)

    @property
    def device_bytes(self) -> int:
        """On the GPU (on a CPU-only machine: in memory, with host_bytes)."""
        on_device = self.frozen_bytes + self.activation_bytes + self.fsdp_unit_bytes
        if self.shards == 1 and not self.offload:
            on_device += self.half_weight_bytes  # FSDP's units hold the 16-bit copies
        return on_device + (0 if self.offload else self.state_bytes)

    @property
    def host_bytes(self) -> int:
        return self.state_bytes if self.offload else 0

    def lines(self, device_type: str | None = None) -> list[str]:
        """The plan as printed; `device_type` cpu says memory instead of GPU memory."""
        checkpointing = "on" if self.checkpoint_activations else "off"
        where = "memory" if device_type == "cpu" else "GPU memory"
        lines = [
            f"parameters: {self.parameters:,} ({self._embedding_note()}; vocab "
            f"{self.vocab_size:,} padded, {self.vocab_source})",
            f"precision: {self.precision}; activation checkpointing {checkpointing}",
            f"training: {self.method}",
            f"{where} (estimate): {_gib(self.device_bytes)}",
            *self._parts(),
            f"  activations per micro-batch of {self.micro_batch} x {self.seq_length} tokens: "
            f"{_gib(self.activation_bytes)}",
        ]
        if self.offload:
            lines.append(
                f"host memory (estimate): {_gib(self.host_bytes)} (fp32 weights, gradients and "
                f"{self.optimizer} state, offloaded)"
            )
        return [
            *lines,
            f"tokens per step: {self.tokens_per_step:,} ({self.global_batch} sequences = "
            f"{self.accumulation} micro-batch{'es' if self.accumulation != 1 else ''} of "
            f"{self.micro_batch} x {self.seq_length})",
            f"optimizer steps: {self.train_iters:,}; tokens in total: {self.total_tokens:,}",
        ]

    def _embedding_note(self) -> str:
        if self.parameters == self.non_embedding_parameters:
            return "the input embedding is also the output layer"
        return f"{self.non_embedding_parameters:,} without the input embedding"

    def _parts(self) -> list[str]:
        state = (
            f"weights (fp32) {_gib(self.weight_bytes)} + gradients {_gib(self.gradient_bytes)} "
            f"+ {self.optimizer} state {_gib(self.optimizer_state_bytes)}"
        )
        if self.shards > 1:
            state = f"1/{self.shards} of: {state}"
        if self.offload:
            return [f"  FSDP units computing {_gib(self.fsdp_unit_bytes)} (the rest offloaded)"]
        if self.shards > 1:
            return [f"  {state} + FSDP units computing {_gib(self.fsdp_unit_bytes)}"]
        half = f" + 16-bit copies {_gib(self.half_weight_bytes)}" if self.half_weight_bytes else ""
        if self.frozen_bytes:
            return [f"  frozen base {_gib(self.frozen_bytes)}{half} + adapters: {state}"]
        return [f"  {state}{half}"]


def _gib(n: int) -> str:
    if n < GIB:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / GIB:.2f} GiB"


def vocab_size(config: Config) -> tuple[int, str]:
    """Unpadded vocabulary size and where it came from: the tokenizer file when it exists; for
    the tokenizer types that load a published tokenizer (hf: gpt-neox's HFTokenizer, gpt2), that
    tokenizer's size; else `vocab-size` (the size a tokenizer trained on first run will have)."""
    files = [Path(f) for f in (config.vocab_file, config.merge_file) if f]
    present = bool(files) and all(f.is_file() for f in files)
    if config.tokenizer_type == "gpt2" and present and len(files) == 2:
        tokenizer = gpt2_tokenizer(config.vocab_file or "", config.merge_file or "")
        return tokenizer.get_vocab_size(), f"from {config.vocab_file} and {config.merge_file}"
    if config.tokenizer_type != "gpt2" and config.vocab_file and present:
        return load_tokenizer(config.vocab_file).get_vocab_size(), f"from {config.vocab_file}"
    standard = STANDARD_TOKENIZERS.get(config.tokenizer_type)
    if standard is not None:
        return standard.vocab_size, f"{standard.name}, not here yet"
    return config.vocab_size, "from vocab-size (no tokenizer file yet)"


def describe(
    config: Config,
    world_size: int = 1,
    precision: str | None = None,
    device_type: str | None = None,
    vocab_rows: int | None = None,
) -> TrainingPlan:
    """Parameter count, memory estimate, tokens and steps for `config`, without training.

    `precision` (fp32 | fp16 | bf16) and `device_type` are the run's when known (else what the
    config asks for, estimated for a GPU); `vocab_rows` the embedding rows when a model decides
    them (init-from)."""
    raw_vocab, source = vocab_size(config)
    vocab = vocab_rows or padded_vocab_size(raw_vocab, config.make_vocab_size_divisible_by)
    with torch.device("meta"):
        model = GPTNeoX(model_config(config, vocab, device_type))
    micro, accumulation, global_batch = config.batch_geometry(world_size)
    requested = precision or config.requested_precision()
    sixteen_bit = requested != "fp32"
    lora = LoraSpec.from_options(config)
    sharded = world_size > 1 and config.distributed_mode() == "fsdp"
    plan = TrainingPlan(
        parameters=model.num_parameters(),
        non_embedding_parameters=model.num_parameters(exclude_embeddings=True),
        vocab_size=vocab,
        vocab_source=source,
        precision={
            "fp32": "fp32",
            "auto": "auto: estimated as 16-bit mixed precision (fp32 on a CPU)",
        }.get(requested, f"{requested} mixed precision"),
        micro_batch=micro,
        accumulation=accumulation,
        global_batch=global_batch,
        seq_length=config.seq_length,
        train_iters=config.train_iters,
        checkpoint_activations=config.checkpoint_activations,
        optimizer=config.optimizer["type"],
        shards=world_size if sharded else 1,
        offload=config.offload_optimizer(),
        **_trained_bytes(model, config, lora, sixteen_bit),
    )
    size = 2 if sixteen_bit else 4
    plan.activation_bytes = activation_bytes(config, vocab, micro, size, device_type)
    if lora is not None:
        plan.activation_bytes += lora_activation_bytes(
            model, config, lora, micro, size, device_type
        )
    if plan.shards > 1 or plan.offload:
        plan.fsdp_unit_bytes = fsdp_unit_bytes(model, size)
    return plan


def _trained_bytes(
    model: nn.Module, config: Config, lora: LoraSpec | None, sixteen_bit: bool
) -> dict[str, int | str]:
    """What the optimizer trains and what it costs: all weights, or LoRA's adapters beside the
    frozen base model."""
    if lora is None:
        parameters = list(model.parameters())
        matmul = sum(
            p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()
        )
        if model.embed_out is None:  # tied: the head's matmul takes a 16-bit copy of the embedding
            matmul += model.output_weight.numel()
        return {
            "method": "full (every weight)",
            "frozen_bytes": 0,
            **_update_bytes(parameters, config, set(block_matrices(model)), matmul, sixteen_bit),
        }
    # Adapters A (rank x in) and B (out x rank) for each adapted layer, as meta tensors.
    adapters = [
        torch.empty(shape, device="meta")
        for fan_in, fan_out in adapter_shapes(model, lora)
        for shape in ((lora.rank, fan_in), (fan_out, lora.rank))
    ]
    adapter_weights = sum(a.numel() for a in adapters)
    layers = sorted({name.rsplit(".", 1)[-1] for name in target_layers(model, lora)})
    kind = "QLoRA (nf4 base)" if lora.load_in_4bit else "LoRA"
    return {
        "method": f"{kind} rank {lora.rank} on {', '.join(layers)}: {adapter_weights:,} "
        f"adapter weights trained, the base model frozen",
        "frozen_bytes": frozen_base_bytes(model, config, lora, sixteen_bit),
        **_update_bytes(adapters, config, set(adapters), adapter_weights, sixteen_bit),
    }


def _update_bytes(
    parameters: list[torch.Tensor],
    config: Config,
    matrices: set,
    matmul_weights: int,
    sixteen_bit: bool,
) -> dict[str, int]:
    weight_bytes = sum(p.numel() * p.element_size() for p in parameters)
    muon = {id(p) for p in matrices} if config.optimizer["type"] == "Muon" else set()
    return {
        "trained_parameters": sum(p.numel() for p in parameters),
        "weight_bytes": weight_bytes,
        "half_weight_bytes": 2 * matmul_weights if sixteen_bit else 0,
        "gradient_bytes": weight_bytes,
        "optimizer_state_bytes": _state_bytes(parameters, config, muon),
        "activation_bytes": 0,
    }


def frozen_base_bytes(model: nn.Module, config: Config, lora: LoraSpec, sixteen_bit: bool) -> int:
    """LoRA's frozen base: fp32 weights, and under autocast the 16-bit copies of the linear
    weights that the backward pass needs (autocast caches the casts of trained weights only; a
    frozen weight is cast at each use and the copy saved for backward: every layer's without
    activation checkpointing, the head's and one block's with it). QLoRA stores the blocks'
    linear weights in nf4 and dequantizes one layer at a time, forward and backward."""
    blocks = model.gpt_neox.layers
    block_linears = [m for m in blocks.modules() if isinstance(m, nn.Linear)]
    in_blocks = {id(m.weight) for m in block_linears}
    total = 0
    for parameter in model.parameters():
        quantized = lora.load_in_4bit and id(parameter) in in_blocks
        per_weight = NF4_BYTES_PER_WEIGHT if quantized else parameter.element_size()
        total += math.ceil(parameter.numel() * per_weight)
    if lora.load_in_4bit:
        return total + 2 * max(m.weight.numel() for m in block_linears)  # one dequantized
    if sixteen_bit:
        block = sum(m.weight.numel() for m in blocks[0].modules() if isinstance(m, nn.Linear))
        copied = block if config.checkpoint_activations else block * len(blocks)
        total += 2 * (copied + model.embed_out.weight.numel())
    return total


def optimizer_state_bytes(model: nn.Module, config: Config) -> int:
    """Bytes of state the optimizer keeps for the model's parameters after the first step (state
    has the parameter's dtype; the scalar step counters are left out)."""
    muon = {id(p) for p in block_matrices(model)} if config.optimizer["type"] == "Muon" else set()
    return _state_bytes(list(model.parameters()), config, muon)


def _state_bytes(parameters: list[torch.Tensor], config: Config, muon: set[int]) -> int:
    name = config.optimizer["type"]
    options = config.optimizer.get("params") or {}
    total = 0
    for parameter in parameters:
        n = parameter.numel()
        if name == "AdamW8bit":
            total += adamw8bit_state_bytes(n)
            continue
        if name == "Adafactor" and parameter.dim() >= 2:
            # factored second moment: one row and one column vector per matrix
            rows, columns = parameter.shape[-2:]
            elements = n // (rows * columns) * (rows + columns)
        elif name == "Adafactor" or name == "Lion" or id(parameter) in muon:
            elements = n  # one tensor: variance / momentum
        elif name == "SGD":
            elements = n if options.get("momentum") else 0
        else:  # Adam, AdamW, and Muon's AdamW companion: two moments
            elements = 2 * n
        total += elements * parameter.element_size()
    return total


def adamw8bit_state_bytes(elements: int) -> int:
    """bitsandbytes' AdamW8bit state of one fp32 tensor: two moments, 8 bits each with block-wise
    fp32 absmax and a 256-entry fp32 code each; small tensors keep fp32 moments."""
    if elements < MIN_8BIT_SIZE:
        return 2 * 4 * elements
    return 2 * (elements + 4 * math.ceil(elements / BLOCK_8BIT) + 4 * 256)


def fsdp_unit_bytes(model: GPTNeoX, size: int) -> int:
    """On the GPU under FSDP (and its offload): the units computing, all-gathered in the compute
    dtype, and their unsharded gradients with an fp32 copy to reduce when the compute dtype is
    16-bit. The root unit (embeddings, final norm, head) stays gathered through forward and
    backward; of the blocks, UNITS_IN_FLIGHT at a time."""
    block = sum(p.numel() for p in model.gpt_neox.layers[0].parameters())
    root = model.num_parameters() - block * len(model.gpt_neox.layers)
    per_weight = 2 * size + (4 if size != 4 else 0)
    return (root + UNITS_IN_FLIGHT * block) * per_weight


def activation_bytes(
    config: Config, vocab: int, micro_batch: int, size: int, device_type: str | None = None
) -> int:
    """Bytes autograd keeps from one micro-batch's forward pass for the backward pass.

    Per token, with h = hidden-size, f = the MLP's width (`mlp_width`), V = padded vocab, a =
    `size` (bytes of an activation: 2 under fp16/bf16 autocast, 4 in fp32) and r = 4 (the
    residual stream is fp32):
      every block    r*h     its input (the first norm's input)
                   + a*2h    the two norm outputs, as inputs of QKV and of the MLP
                   + a*2h    rmsnorm only: each norm's normalised input, before its scale
                   + a*7h    attention: QKV output 3h, rotated q and k 2h, SDPA output h and its
                             reshaped copy h (the fused SDPA kernels keep no seq x seq matrix);
                             with fewer key/value heads 5h: rotated q h, keys and values
                             repeated to every head 2h, SDPA output and its copy 2h
                   + a*2f    MLP: the up-projection output and the GELU output
                             (swiglu: a*4f, up and gate 2f, silu(gate) f, their product f)
                   + r*h     sequential residual only: the second norm's input x + attn
                   + 2h      dropout masks, 1 byte each, when hidden-dropout > 0
      once           r*h + a*h + h (dropout)   final norm input and output, embedding dropout
                   (+ a*h with rmsnorm)
                   + (a + 4)*V                 the logits and their fp32 log-softmax
                   (chunked-cross-entropy, on by default on a CPU: instead 4*h, the loss's
                   gradient for the final norm output, plus 4*V*h once per micro-batch
                   for the head's)
    With checkpoint-activations every block keeps only its input (r*h); the backward pass
    rebuilds one block's activations at a time, so one full block is added back.
    tests/test_algorithms.py checks this against what autograd saves.
    """
    h = config.hidden_size
    f = mlp_width(config)
    r = RESIDUAL_BYTES
    dropout = config.hidden_dropout > 0
    norm_extra = h if config.norm == "rmsnorm" else 0  # per norm
    grouped = config.num_kv_heads not in (None, config.num_attention_heads)
    attention = 5 * h if grouped else 7 * h
    mlp = 4 * f if config.activation == "swiglu" else 2 * f
    block = r * h + size * (2 * h + 2 * norm_extra + attention + mlp)
    if not config.gpt_j_residual:
        block += r * h
    if dropout:
        block += 2 * h
    once = r * h + size * (h + norm_extra) + (h if dropout else 0)
    head = 0  # bytes per micro-batch, whatever its size
    chunked = {"true": True, "false": False}.get(config.chunked_cross_entropy, device_type == "cpu")
    if chunked:
        once += 4 * h
        head = 4 * vocab * h
    else:
        once += (size + LOG_SOFTMAX_BYTES) * vocab
    layers = config.num_layers
    if config.checkpoint_activations:
        per_token = layers * r * h + block + once
    else:
        per_token = layers * block + once
    return micro_batch * config.seq_length * per_token + head


def lora_activation_bytes(
    model: nn.Module,
    config: Config,
    lora: LoraSpec,
    micro_batch: int,
    size: int,
    device_type: str | None = None,
) -> int:
    """What LoRA adds to the activations, per adapted layer and token: A's output (rank values
    of `size` bytes, B's input) and, with lora-dropout, the dropout mask: a byte per input on a
    GPU (fused dropout), the input's fp32 size on a CPU (torch keeps a noise tensor there).
    A's input takes the place of the frozen layer's, which no longer needs saving. With
    activation checkpointing, one block's worth. tests/test_finetune.py checks this against
    what autograd saves."""
    mask = (4 if device_type == "cpu" else 1) if lora.dropout > 0 else 0
    per_token = sum(size * lora.rank + mask * fan_in for fan_in, _ in adapter_shapes(model, lora))
    if config.checkpoint_activations:
        per_token //= config.num_layers
    return micro_batch * config.seq_length * per_token
