"""What a config will cost before it runs: parameters, memory per GPU, tokens and steps.

`describe(config)` builds the model on PyTorch's `meta` device (shapes only: no memory, no data,
no GPU), so it works for any size, Pythia's included; `neoxlab train ... --dry-run` prints it.
The memory figures are estimates of what training holds at its peak, without the CUDA context
(about 0.3-0.5 GB) and the allocator's slack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from neoxlab.config import Config, mlp_width, model_config, padded_vocab_size
from neoxlab.model import GPTNeoX
from neoxlab.optim import block_matrices
from neoxlab.tokenizer import STANDARD_TOKENIZERS, gpt2_tokenizer, load_tokenizer

GIB = 1024**3
RESIDUAL_BYTES = 4  # the residual stream stays fp32 under autocast (fp32 embeddings and adds)
LOG_SOFTMAX_BYTES = 4  # the loss takes its softmax in fp32 (model.py)


@dataclass
class TrainingPlan:
    """The numbers `--dry-run` prints; byte counts are per GPU."""

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
    weight_bytes: int
    half_weight_bytes: int  # 16-bit copies of the matmul weights that autocast makes
    gradient_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int  # one micro-batch

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_length

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.train_iters

    @property
    def total_bytes(self) -> int:
        return (
            self.weight_bytes
            + self.half_weight_bytes
            + self.gradient_bytes
            + self.optimizer_state_bytes
            + self.activation_bytes
        )

    def lines(self) -> list[str]:
        checkpointing = "on" if self.checkpoint_activations else "off"
        return [
            f"parameters: {self.parameters:,} ({self._embedding_note()}; vocab "
            f"{self.vocab_size:,} padded, {self.vocab_source})",
            f"precision: {self.precision}; activation checkpointing {checkpointing}",
            f"memory per GPU (estimate): {_gib(self.total_bytes)}",
            f"  weights (fp32) {_gib(self.weight_bytes)} + 16-bit copies "
            f"{_gib(self.half_weight_bytes)} + gradients {_gib(self.gradient_bytes)} + "
            f"{self.optimizer} state {_gib(self.optimizer_state_bytes)}",
            f"  activations per micro-batch of {self.micro_batch} x {self.seq_length} tokens: "
            f"{_gib(self.activation_bytes)}",
            f"tokens per step: {self.tokens_per_step:,} ({self.global_batch} sequences = "
            f"{self.accumulation} micro-batches of {self.micro_batch} x {self.seq_length})",
            f"optimizer steps: {self.train_iters:,}; tokens in total: {self.total_tokens:,}",
        ]

    def _embedding_note(self) -> str:
        if self.parameters == self.non_embedding_parameters:
            return "the input embedding is also the output layer"
        return f"{self.non_embedding_parameters:,} without the input embedding"


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


def describe(config: Config, world_size: int = 1) -> TrainingPlan:
    """Parameter count, memory estimate, tokens and steps for `config`, without training."""
    raw_vocab, source = vocab_size(config)
    vocab = padded_vocab_size(raw_vocab, config.make_vocab_size_divisible_by)
    with torch.device("meta"):
        model = GPTNeoX(model_config(config, vocab))
    micro, accumulation, global_batch = config.batch_geometry(world_size)
    requested = config.requested_precision()
    sixteen_bit = requested != "fp32"
    precision = {
        "fp32": "fp32",
        "auto": "auto: estimated as 16-bit mixed precision (fp32 on a CPU)",
    }.get(requested, f"{requested} mixed precision")
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    matmul_weights = sum(
        p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()
    )
    if model.embed_out is None:  # tied: the head's matmul takes a 16-bit copy of the embedding
        matmul_weights += model.output_weight.numel()
    return TrainingPlan(
        parameters=model.num_parameters(),
        non_embedding_parameters=model.num_parameters(exclude_embeddings=True),
        vocab_size=vocab,
        vocab_source=source,
        precision=precision,
        micro_batch=micro,
        accumulation=accumulation,
        global_batch=global_batch,
        seq_length=config.seq_length,
        train_iters=config.train_iters,
        checkpoint_activations=config.checkpoint_activations,
        optimizer=config.optimizer["type"],
        weight_bytes=parameter_bytes,
        half_weight_bytes=2 * matmul_weights if sixteen_bit else 0,
        gradient_bytes=parameter_bytes,
        optimizer_state_bytes=optimizer_state_bytes(model, config),
        activation_bytes=activation_bytes(config, vocab, micro, 2 if sixteen_bit else 4),
    )


def optimizer_state_bytes(model: nn.Module, config: Config) -> int:
    """Bytes of state torch keeps for each parameter after the first step (state has the
    parameter's dtype; the scalar step counters are left out)."""
    name = config.optimizer["type"]
    options = config.optimizer.get("params") or {}
    muon = {id(p) for p in block_matrices(model)} if name == "Muon" else set()
    total = 0
    for parameter in model.parameters():
        if name == "Adafactor" and parameter.dim() >= 2:
            # factored second moment: one row and one column vector per matrix
            rows, columns = parameter.shape[-2:]
            elements = parameter.numel() // (rows * columns) * (rows + columns)
        elif name == "Adafactor" or name == "Lion" or id(parameter) in muon:
            elements = parameter.numel()  # one tensor: variance / momentum
        elif name == "SGD":
            elements = parameter.numel() if options.get("momentum") else 0
        else:  # Adam, AdamW, and Muon's AdamW companion: two moments
            elements = 2 * parameter.numel()
        total += elements * parameter.element_size()
    return total


def activation_bytes(config: Config, vocab: int, micro_batch: int, size: int) -> int:
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
                   (chunked-cross-entropy: instead 4*h, the loss's gradient for the final
                   norm output, plus 4*V*h once per micro-batch for the head's)
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
    if config.chunked_cross_entropy == "true":  # auto: off on a GPU
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
