"""The GPT-NeoX network and KV-cache generation.

With the default `ModelConfig` (Pythia's architecture) numerically the same function as Hugging
Face's `GPTNeoXForCausalLM`, with the same parameter names, so exporting is a plain state_dict
copy. The pieces:

- LayerNorm with bias before attention and before the MLP, and once more before the output head.
- Fused QKV projection whose output rows are grouped per head as [head][q, k, v][head_dim].
- Rotary position embedding on the first `rotary_pct` of each head's dims (NeoX rotate-half).
- Parallel residual (x + attn(ln1(x)) + mlp(ln2(x))) by default, sequential optionally.
- A GELU MLP, and an untied output head without bias.

The architecture experiments gpt-neox offers swap single pieces, each a small class or function
below: RMSNorm for LayerNorm (`make_norm`), the gated SwiGLU MLP for the GELU one (`SwiGLU`),
fewer key/value heads than query heads (grouped-query and multi-query attention, `Attention`),
an output head that reuses the input embedding (`tie_word_embeddings`), and no biases in the
attention, MLP or norms. RMSNorm + SwiGLU + sequential residual + full rotary is Llama's block,
which hf.py exports as `LlamaForCausalLM`.

For large vocabularies the output head and the loss can run in row chunks
(`chunked_cross_entropy`), so training never holds the (tokens, vocab) logits at once.
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from neoxlab.errors import NeoxlabError

GELU_APPROXIMATIONS = {"gelu": "none", "gelu_tanh": "tanh"}  # name -> F.gelu's `approximate`
ACTIVATIONS = (*GELU_APPROXIMATIONS, "swiglu")
NORMS = ("layernorm", "rmsnorm")
POSITIVE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "intermediate_size",
)
IGNORE_INDEX = -100  # targets with this value add nothing to the loss (as F.cross_entropy's)
# Logits per chunk of the chunked loss: on a GPU 2^26 fp32 values (256 MiB, ~1,300 rows of a
# 50k vocab: few, large matmuls); on a CPU 2^22 (16 MiB), a chunk the caches hold while its
# softmax and gradient are computed, which measured fastest of 2^21..2^26 on a 2-core EPYC
# (Pythia-14M's head and loss: 0.71 s per 2,048 tokens, against 1.2 s for the plain loss).
LOSS_CHUNK_ELEMENTS = {"cpu": 1 << 22, "other": 1 << 26}  # by device type


@dataclass
class ModelConfig:
    """Shape and behaviour of the network; field names follow GPT-NeoX's config keys."""

    vocab_size: int  # rows of the embedding, already padded by the caller
    hidden_size: int = 256
    num_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 256
    # the MLP's hidden width (each of SwiGLU's two halves); None -> 4 * hidden_size
    intermediate_size: int | None = None
    num_kv_heads: int | None = None  # key/value heads; None -> num_attention_heads (no grouping)
    rotary_pct: float = 0.25  # fraction of each head's dims that get rotary embedding
    rotary_emb_base: float = 10000.0
    parallel_residual: bool = True  # gpt-neox `gpt_j_residual`
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    layernorm_eps: float = 1e-5
    rms_norm_eps: float = 1e-8  # gpt-neox's default
    activation: str = "gelu"  # "gelu" (exact) | "gelu_tanh" (HF "gelu_pytorch_tanh") | "swiglu"
    norm_bias: bool = True  # LayerNorm's bias (gpt-neox `use_bias_in_norms`); RMSNorm has none
    attention_bias: bool = True  # QKV and output projection (`use_bias_in_attn_linear`)
    mlp_bias: bool = True  # gpt-neox `use_bias_in_mlp`
    tie_word_embeddings: bool = False  # output head = input embedding (not `no_weight_tying`)
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    checkpoint_activations: bool = False  # recompute each layer in backward to save memory
    chunked_cross_entropy: bool = False  # training loss without materialising all logits
    # gpt-neox's init: `init_method` for every weight but the two that add into the residual
    # stream in each block (attention dense, MLP down-projection), which take the other
    init_method: str = "small_init"
    output_layer_init_method: str = "wang_init"
    init_method_std: float = 0.02  # read by normal and scaled_normal only

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_attention_heads
        for key in (*POSITIVE_FIELDS, "num_kv_heads"):
            if getattr(self, key) <= 0:
                raise NeoxlabError(
                    f"{key.replace('_', '-')} must be positive, got {getattr(self, key)}"
                )
        if self.hidden_size % self.num_attention_heads:
            raise NeoxlabError(
                f"hidden-size {self.hidden_size} is not divisible by "
                f"num-attention-heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_kv_heads:
            raise NeoxlabError(
                f"num-kv-heads {self.num_kv_heads} does not divide "
                f"num-attention-heads {self.num_attention_heads}",
                hint="each key/value head serves an equal group of query heads",
            )
        if not 0 < self.rotary_pct <= 1:
            raise NeoxlabError(f"rotary-pct must be in (0, 1], got {self.rotary_pct}")
        # rotate-half pairs dim i with dim i + n/2, so the rotary part needs an even size
        if self.rotary_ndims < 2 or self.rotary_ndims % 2:
            raise NeoxlabError(
                f"rotary-pct {self.rotary_pct} of head size {self.head_dim} gives "
                f"{self.rotary_ndims} rotary dims; that must be an even number of at least 2"
            )
        for key in ("init_method", "output_layer_init_method"):
            if getattr(self, key) not in INIT_METHODS:
                raise NeoxlabError(
                    f"unknown {key.replace('_', '-')} {getattr(self, key)!r}; choose one of "
                    f"{', '.join(INIT_METHODS)}"
                )
        for key, choices in (("activation", ACTIVATIONS), ("norm", NORMS)):
            if getattr(self, key) not in choices:
                raise NeoxlabError(
                    f"unknown {key} {getattr(self, key)!r}; choose one of {', '.join(choices)}"
                )
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise NeoxlabError(
                    f"{key.replace('_', '-')} must be in [0, 1), got {getattr(self, key)}"
                )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def heads_per_kv_head(self) -> int:
        """Query heads that share one key/value head (1: plain multi-head attention)."""
        assert self.num_kv_heads is not None  # set by __post_init__
        return self.num_attention_heads // self.num_kv_heads


# gpt-neox's init methods: name -> the standard deviation of the normal its weights are drawn from
INIT_METHODS = {
    "small_init": lambda c: math.sqrt(2 / (5 * c.hidden_size)),
    # output projections add into the residual stream once per layer: scale down with depth
    "wang_init": lambda c: 2 / (c.num_layers * math.sqrt(c.hidden_size)),
    "normal": lambda c: c.init_method_std,
    "scaled_normal": lambda c: c.init_method_std / math.sqrt(2 * c.num_layers),
}


def init_std(method: str, config: ModelConfig) -> float:
    """The standard deviation gpt-neox's init `method` draws weights with."""
    return INIT_METHODS[method](config)


def rotary_cos_sin(config: ModelConfig, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of shape (B, 1, T, rotary_ndims) for (B, T) positions, computed in fp32.

    Computed on the fly rather than cached in buffers: it is cheap, and a model built on the meta
    device and materialised later (FSDP) has no buffers left to recompute.
    """
    n = config.rotary_ndims
    exponents = torch.arange(0, n, 2, dtype=torch.float32, device=position_ids.device) / n
    inv_freq = 1.0 / (config.rotary_emb_base**exponents)
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # one angle per dim, shared by heads
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first cos.size(-1) dims of x (B, H, T, head_dim); the rest pass through."""
    n = cos.size(-1)
    x_rot, x_pass = x[..., :n], x[..., n:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated_half = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x_rot * cos + rotated_half * sin, x_pass), dim=-1)


class KVCache:
    """Keys and values of one layer, preallocated to the context size on first use."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.length = 0  # positions [0, length) are filled
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H, T, head_dim) after what is cached; return all keys and values."""
        if self.keys is None or self.values is None:
            # allocated here, not up front, so the cache takes the dtype autocast gives k and v
            batch, heads, _, head_dim = k.shape
            self.keys = k.new_empty(batch, heads, self.size, head_dim)
            self.values = v.new_empty(batch, heads, self.size, head_dim)
        end = self.length + k.size(2)
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class Attention(nn.Module):
    """Causal self-attention with rotary positions.

    With fewer key/value heads than query heads (`num_kv_heads`), each key/value head serves a
    group of consecutive query heads: grouped-query attention, or multi-query with one. The KV
    cache then holds only the shared heads, which is what the grouping saves.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.num_kv_heads is not None  # set by ModelConfig.__post_init__
        self.num_kv_heads = config.num_kv_heads
        self.group = config.heads_per_kv_head
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        qkv_size = (config.num_attention_heads + 2 * self.num_kv_heads) * self.head_dim
        bias = config.attention_bias
        self.query_key_value = nn.Linear(config.hidden_size, qkv_size, bias=bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        batch, seq, hidden = x.shape
        # GPT-NeoX interleaves per head ([head][q, k, v][head_dim]), not [q | k | v] as nanoGPT;
        # with grouping, per key/value head: [kv head][its group's q heads, k, v][head_dim]
        qkv = self.query_key_value(x).view(batch, seq, self.num_kv_heads, -1)
        q, k, v = qkv.transpose(1, 2).split(
            [self.group * self.head_dim, self.head_dim, self.head_dim], dim=-1
        )
        # (B, kv heads, T, group x head_dim) -> (B, heads, T, head_dim); a view without grouping
        q = q.unflatten(-1, (self.group, self.head_dim)).transpose(2, 3).flatten(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        is_causal = mask is None  # a mask (packed examples) is already causal
        if cache is not None:
            # A cached call either fills an empty cache with the prompt (causal), or adds one
            # token that may see every cached key (no mask; SDPA's causal mask is top-left
            # aligned and would hide all keys but the first).
            is_causal = cache.length == 0
            k, v = cache.append(k, v)
        if self.group > 1:
            # repeated here rather than SDPA's enable_gqa, which only some kernels support
            k = k.repeat_interleave(self.group, dim=1)
            v = v.repeat_interleave(self.group, dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        return self.dense(y.transpose(1, 2).reshape(batch, seq, hidden))


class MLP(nn.Module):
    """GPT-NeoX's MLP: up to intermediate_size, GELU, back down."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.intermediate_size is not None  # set by ModelConfig.__post_init__
        bias = config.mlp_bias
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.approximate = GELU_APPROXIMATIONS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    """Llama's gated MLP (gpt-neox `activation: swiglu`): down(up(x) * silu(gate(x))).

    One up-projection computes both halves, [up | gate] as gpt-neox's linear1 orders them (one
    matmul, not two); each half is intermediate_size wide.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.intermediate_size is not None  # set by ModelConfig.__post_init__
        width, bias = config.intermediate_size, config.mlp_bias
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * width, bias=bias)
        self.dense_4h_to_h = nn.Linear(width, config.hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        up, gate = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(up * F.silu(gate))


def make_norm(config: ModelConfig) -> nn.Module:
    """LayerNorm (GPT-NeoX) or RMSNorm (Llama: no centring, no bias; a scale per channel)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps, bias=config.norm_bias)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.post_attention_layernorm = make_norm(config)
        self.attention = Attention(config)
        self.mlp = SwiGLU(config) if config.activation == "swiglu" else MLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.parallel_residual = config.parallel_residual

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        attn = self.dropout(self.attention(self.input_layernorm(x), cos, sin, cache, mask))
        if self.parallel_residual:
            # attention and MLP both read x (not x + attn), so the two can run side by side
            return x + attn + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        x = x + attn
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class GPTNeoX(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # ModuleDict (not a submodule class) only to get HF's `gpt_neox.` name prefix
        self.gpt_neox = nn.ModuleDict(
            {
                "embed_in": nn.Embedding(config.vocab_size, config.hidden_size),
                "layers": nn.ModuleList(Block(config) for _ in range(config.num_layers)),
                "final_layer_norm": make_norm(config),
            }
        )
        # tied: no head of its own, the logits read the input embedding (one parameter, so
        # checkpoints, optimizers and FSDP see it once)
        self.embed_out = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.init_weights()

    @property
    def output_weight(self) -> Tensor:
        """The output head's (vocab, hidden) weight: the input embedding's when tied."""
        head = self.gpt_neox.embed_in if self.embed_out is None else self.embed_out
        return head.weight

    def _head(self, hidden: Tensor) -> Tensor:
        """Next-token scores. An own output layer is called as a module, so that forward hooks
        and adapters on embed_out (LoRA, say) see it; a tied one is the embedding's matrix."""
        if self.embed_out is None:
            return F.linear(hidden, self.gpt_neox.embed_in.weight)
        return self.embed_out(hidden)

    def init_weights(self) -> None:
        """GPT-NeoX's init (Pythia's: "small_init", but "wang_init" for the layers that feed the
        residual stream); biases zero, norms the identity."""
        config = self.config
        std = init_std(config.init_method, config)
        output_std = init_std(config.output_layer_init_method, config)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_output = name.endswith(("attention.dense", "mlp.dense_4h_to_h"))
                nn.init.normal_(
                    module.weight, mean=0.0, std=output_std if is_residual_output else std
                )
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()  # scale 1, bias 0: the identity

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        *,
        position_ids: Tensor | None = None,
        segment_ids: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Logits (B, T, vocab) for input_ids (B, T), and the mean cross-entropy against targets
        (B, T) when given, skipping positions whose target is -100.

        segment_ids (B, T), for rows that pack several examples, keeps attention within each run
        of equal ids (give position_ids restarting at 0 per example along with it).

        With `chunked_cross_entropy` and gradients enabled (training), the loss is computed in
        row chunks together with its gradients and the logits are not returned (None)."""
        hidden = self._hidden(input_ids, position_ids, segment_ids=segment_ids)
        if targets is not None and self.config.chunked_cross_entropy and torch.is_grad_enabled():
            loss = LinearCrossEntropy.apply(
                hidden.flatten(0, 1), self.output_weight, targets.reshape(-1)
            )
            return None, loss
        logits = self._head(hidden)
        if targets is None:
            return logits, None
        # in fp32: a bf16/fp16 softmax over ~50k classes loses too much precision
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )
        return logits, loss

    def _logits(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None,
        caches: list[KVCache] | None = None,
    ) -> Tensor:
        return self._head(self._hidden(input_ids, position_ids, caches))

    def _hidden(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None,
        caches: list[KVCache] | None = None,
        segment_ids: Tensor | None = None,
    ) -> Tensor:
        """The final norm's output (B, T, hidden): what the output head reads."""
        batch, seq = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device)
        cos, sin = rotary_cos_sin(self.config, position_ids.expand(batch, seq))
        mask = None
        if segment_ids is not None:
            # block-diagonal causal mask (B, 1, T, T); the diagonal is always kept, so no row is
            # fully masked (SDPA would return NaN for one)
            causal = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril()
            mask = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal).unsqueeze(1)
        x = self.embedding_dropout(self.gpt_neox.embed_in(input_ids))
        use_checkpoint = self.config.checkpoint_activations and self.training and caches is None
        for i, layer in enumerate(self.gpt_neox.layers):
            if use_checkpoint:
                x = checkpoint(layer, x, cos, sin, None, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, None if caches is None else caches[i], mask)
        return self.gpt_neox.final_layer_norm(x)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; exclude_embeddings drops the input embedding's lookup table but not
        the output head (when the two are tied, the shared matrix counts as the head)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.embed_out is not None:
            total -= self.gpt_neox.embed_in.weight.numel()
        return total

    def flops_per_token(self, seq_length: int) -> int:
        """Training FLOPs (forward + backward) per token, as in PaLM's MFU: 6 per weight of every
        matmul (the head's included), plus attention's scores and weighted sum over seq_length
        keys (per query head, so grouped key/value heads do not change it)."""
        config = self.config
        matmul_flops = 6 * self.num_parameters(exclude_embeddings=True)
        return matmul_flops + 12 * config.num_layers * config.hidden_size * seq_length

    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[Tensor]:
        """Yield the next token ids (B,) for prompts input_ids (B, T), one step at a time.

        temperature 0 is greedy. Stops early once every row has produced eos_token_id; rows that
        finished earlier yield eos_token_id. Call model.eval() first, or dropout stays on.
        Arguments are checked here, before the first step, so mistakes surface at the call.
        """
        context, prompt_length = self.config.max_position_embeddings, input_ids.size(1)
        if prompt_length == 0:
            raise NeoxlabError("the prompt is empty", hint="give at least one token")
        if prompt_length > context:
            raise NeoxlabError(
                f"prompt is {prompt_length} tokens, longer than the model's context of {context}",
                hint="shorten the prompt or keep only its last tokens",
            )
        if temperature < 0:
            raise NeoxlabError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise NeoxlabError(f"top-k must be at least 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise NeoxlabError(f"top-p must be in (0, 1], got {top_p}")
        sample = partial(
            sample_next_token,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        )
        return self._generate(input_ids, max_new_tokens, sample, eos_token_id)

    @torch.no_grad()
    def _generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        sample: Callable[[Tensor], Tensor],
        eos_token_id: int | None,
    ) -> Iterator[Tensor]:
        context = self.config.max_position_embeddings
        caches = [KVCache(context) for _ in range(self.config.num_layers)]
        tokens = input_ids  # the last `context` tokens, kept to refill the cache when it is full
        logits = self._logits(tokens, None, caches)[:, -1]
        finished = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            next_token = sample(logits)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(finished, eos_token_id)
                finished |= next_token == eos_token_id
            yield next_token
            if eos_token_id is not None and bool(finished.all()):
                return
            tokens = torch.cat((tokens, next_token[:, None]), dim=1)[:, -context:]
            if caches[0].length < context:
                position = torch.tensor([caches[0].length], device=tokens.device)
                logits = self._logits(tokens[:, -1:], position, caches)[:, -1]
            else:
                # The cache is full: slide the window. Keep the last half of the context and
                # re-prefill it at positions 0.. (positions past the context were never trained).
                # Half, not context - 1, so the O(context) refill happens once every
                # context / 2 tokens instead of at every step, while keeping half the history.
                tokens = tokens[:, -max(1, context // 2) :]
                for cache in caches:
                    cache.length = 0
                logits = self._logits(tokens, None, caches)[:, -1]


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = hidden @ weight.T (rows, vocab) against targets (rows,),
    computed a chunk of rows at a time, skipping targets equal to IGNORE_INDEX.

    The forward pass also computes each chunk's gradients with respect to hidden and weight
    (d loss / d logits = (softmax - one-hot) / count), so no chunk's logits outlive their loop
    iteration and nothing is recomputed; the backward pass only scales the stored gradients.
    The arithmetic is the plain path's: matmuls in the autocast dtype when autocast is on, the
    softmax in fp32, and the logits' gradient rounded to the matmul dtype before the two
    gradient matmuls. Written here because torch has no fused linear + cross-entropy (Liger
    Kernel's is Triton, CUDA only, and would be a dependency for one function).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = torch.promote_types(hidden.dtype, weight.dtype)
        elements = LOSS_CHUNK_ELEMENTS.get(device_type, LOSS_CHUNK_ELEMENTS["other"])
        rows = max(1, elements // weight.size(0))
        need_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, grad_hidden, grad_weight = chunked_linear_cross_entropy(
            hidden, weight, targets, dtype, rows, need_grads
        )
        if need_grads:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None


# One operator to torch.compile, which neither unrolls its chunk loop into the graph nor fuses
# it: the loop runs as written here, on any device. Unrolled, Pythia-14M's 25 chunks on a CPU
# made the first compiled step take 2.7x the CPU time of the same model with the plain loss.
@torch.library.custom_op("neoxlab::chunked_linear_cross_entropy", mutates_args=())
def chunked_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype, rows: int, grads: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """LinearCrossEntropy's work in chunks of `rows` rows, matmuls in `dtype`: the loss, and
    with `grads` its gradients with respect to hidden and weight (fp32), else empty tensors."""
    hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)
    counted = targets != IGNORE_INDEX
    count = counted.sum()
    # all targets ignored: the plain path's loss is NaN (0 / 0); its gradients are zero
    inverse_count = 1.0 / count.clamp(min=1).float()
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grads else hidden.new_empty(0)
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads else total.new_empty(0)
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit here
        for start in range(0, hidden.size(0), rows):
            chunk = slice(start, start + rows)
            log_probs = (hidden_c[chunk] @ weight_c.T).float().log_softmax(dim=-1)
            targets_c, counted_c = targets[chunk], counted[chunk]
            picked = targets_c.clamp(min=0)[:, None]  # a valid index for ignored rows too
            total -= (log_probs.gather(1, picked).squeeze(1) * counted_c).sum()
            if not grads:
                continue
            grad_logits = log_probs.exp_()
            grad_logits.scatter_add_(1, picked, torch.full_like(grad_logits[:, :1], -1.0))
            grad_logits *= (counted_c * inverse_count)[:, None]
            grad_logits = grad_logits.to(dtype)
            grad_hidden[chunk] = grad_logits @ weight_c
            if dtype == torch.float32:  # accumulated in place: no (vocab, hidden) temporary
                grad_weight.addmm_(grad_logits.T, hidden_c[chunk])
            else:
                grad_weight += (grad_logits.T @ hidden_c[chunk]).float()
    return total / count, grad_hidden, grad_weight


@chunked_linear_cross_entropy.register_fake
def _chunked_linear_cross_entropy_shapes(
    hidden: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype, rows: int, grads: bool
) -> tuple[Tensor, Tensor, Tensor]:
    loss = hidden.new_empty((), dtype=torch.float32)
    if not grads:
        return loss, hidden.new_empty(0), loss.new_empty(0)
    return loss, torch.empty_like(hidden), torch.empty_like(weight, dtype=torch.float32)


def sample_next_token(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row from logits (B, vocab): argmax at temperature 0, else sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None:
        # nucleus: keep the fewest most likely tokens whose probabilities reach top_p; a token
        # goes when those ranked above it already reach it, so the most likely one always stays
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_above >= top_p, float("-inf"))
        logits = logits.scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
