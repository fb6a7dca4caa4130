"""The one config schema: GPT-NeoX key names, YAML loading, merging and CLI overrides.

Every key neoxlab understands is a field of `Config`. Files may be flat (as gpt-neox writes them)
or grouped in sections (`model:`, `training:`, ...); `-` and `_` are the same; several files merge
left to right and `key=value` overrides merge last. The field docs double as the key reference
printed by `neoxlab train --help` and listed in the README.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from neoxlab import neox_compat
from neoxlab.atomic import write_atomically
from neoxlab.errors import NeoxlabError
from neoxlab.model import ACTIVATIONS, INIT_METHODS, NORMS, ModelConfig
from neoxlab.optim import OPTIMIZERS, SCHEDULES

# Sections only group keys; their children are ordinary keys.
SECTIONS = (
    "model",
    "tokenizer",
    "data",
    "training",
    "evaluation",
    "logging",
    "checkpointing",
)

# Keys whose value is a mapping (not a section).
MAPPING_KEYS = ("optimizer", "fp16", "bf16", "zero_optimization")

# Every accepted spelling -> the one canonical name that is stored.
ALIASES = {
    "micro_batch_size": "train_micro_batch_size_per_gpu",
    "global_batch_size": "train_batch_size",
    "lr_schedule": "lr_decay_style",
    "keep_last_k": "keep_last_n_checkpoints",
    "gas": "gradient_accumulation_steps",
    "layernorm_eps": "layernorm_epsilon",
    # gpt-neox spellings
    "checkpoint_factor": "save_interval",
    "clip_grad": "gradient_clipping",
}

# Keys that hold file paths: relative values resolve against the folder of the file that set them
# (or the working directory for CLI overrides).
INPUT_PATH_KEYS = (
    "data_path",
    "vocab_file",
    "merge_file",
    "init_from",
    "train_data_paths",
    "valid_data_paths",
    "test_data_paths",
    "eval_tasks_include_path",
)

# The names come from optim.py's registries (optim never imports config).
LR_DECAY_STYLES = tuple(SCHEDULES)
OPTIMIZER_TYPES = tuple(OPTIMIZERS)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
TOKENIZER_TYPES = ("bpe", "char", "hf", "gpt2")
DISTRIBUTED_MODES = ("auto", "ddp", "fsdp")
# Switches whose default depends on the hardware: auto | true | false (YAML booleans accepted).
AUTO_SWITCHES = ("compile", "chunked_cross_entropy")
# torch.compile's modes; the two with CUDA graphs (reduce-overhead, max-autotune) are single-GPU
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# zero_optimization keys neoxlab honours: stage >= 1 shards with FSDP2; offload (DeepSpeed's
# `offload_optimizer` / `offload_param: {device: cpu}`) is FSDP2's CPU offload (distributed.py).
ZERO_KEYS = ("stage", "offload_optimizer", "offload_param")
OFFLOAD_DEVICES = ("none", "cpu")
DATA_WEIGHT_KEYS = ("train_data_weights", "valid_data_weights", "test_data_weights")

MAX_SCALE_POWER = 127  # fp16.initial_scale_power: 2 ** 128 overflows fp32
MAX_LAYERS = 1024
MAX_PARAMETERS = 10**13
MAX_DISTRIBUTED_TIMEOUT = 7 * 24 * 3600  # a week: longer is a typo (and overflows timedelta)

FP16_DEFAULTS = {
    "enabled": False,
    "loss_scale": 0,  # 0 = dynamic loss scaling (GradScaler)
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "min_loss_scale": 1.0,
    # overflows in a row (since the scale last grew) before the scale halves: DeepSpeed's
    # delayed backoff, 2 in gpt-neox configs; 1 halves at every overflow, as torch's GradScaler
    "hysteresis": 1,
    "consecutive_hysteresis": False,  # DeepSpeed: True refills hysteresis at every clean step
}


def _help(text: str, section: str) -> dict[str, str]:
    return {"help": text, "section": section}


@dataclass
class Config:
    """A fully resolved neoxlab configuration."""

    # model
    hidden_size: int = field(default=256, metadata=_help("width of the residual stream", "model"))
    num_layers: int = field(default=4, metadata=_help("number of transformer blocks", "model"))
    num_attention_heads: int = field(
        default=4, metadata=_help("attention heads; must divide hidden-size", "model")
    )
    max_position_embeddings: int | None = field(
        default=None,
        metadata=_help("longest context the model supports (default: seq-length)", "model"),
    )
    intermediate_size: int | None = field(
        default=None,
        metadata=_help(
            "MLP width (default: 4 x hidden-size); swiglu, as gpt-neox, builds two halves of "
            "⌊⅔ x this⌋ / 2 each",
            "model",
        ),
    )
    mlp_multiple_of: int = field(
        default=1,
        metadata=_help("round the MLP width up to a multiple of this, as gpt-neox", "model"),
    )
    num_kv_heads: int | None = field(
        default=None,
        metadata=_help(
            "key/value heads, shared by groups of query heads: fewer than num-attention-heads is "
            "grouped-query attention, 1 multi-query (default: num-attention-heads)",
            "model",
        ),
    )
    rotary_pct: float = field(
        default=0.25,
        metadata=_help("fraction of each head's dims that get rotary embeddings", "model"),
    )
    rotary_emb_base: float = field(
        default=10000.0, metadata=_help("rotary frequency base", "model")
    )
    gpt_j_residual: bool = field(
        default=True,
        metadata=_help("parallel attention + MLP residual (Pythia); false = sequential", "model"),
    )
    norm: str = field(
        default="layernorm", metadata=_help("layernorm (GPT-NeoX) | rmsnorm (Llama)", "model")
    )
    layernorm_epsilon: float = field(default=1e-5, metadata=_help("LayerNorm epsilon", "model"))
    rms_norm_epsilon: float = field(default=1e-8, metadata=_help("RMSNorm epsilon", "model"))
    activation: str = field(
        default="gelu",
        metadata=_help(
            "MLP activation: gelu (exact) | gelu_tanh (Pythia) | swiglu (Llama's gated MLP)",
            "model",
        ),
    )
    no_weight_tying: bool = field(
        default=True,
        metadata=_help(
            "an output head of its own (Pythia); false: the input embedding serves as the head",
            "model",
        ),
    )
    use_bias_in_norms: bool = field(
        default=True, metadata=_help("LayerNorm with a bias (RMSNorm has none)", "model")
    )
    use_bias_in_attn_linear: bool = field(
        default=True, metadata=_help("biases in the QKV and attention output layers", "model")
    )
    use_bias_in_mlp: bool = field(default=True, metadata=_help("biases in the MLP", "model"))
    hidden_dropout: float = field(
        default=0.0, metadata=_help("dropout on residual branches", "model")
    )
    attention_dropout: float = field(
        default=0.0, metadata=_help("dropout on attention probabilities", "model")
    )
    make_vocab_size_divisible_by: int = field(
        default=128, metadata=_help("pad the embedding rows to a multiple of this", "model")
    )
    pos_emb: str = field(
        default="rotary", metadata=_help("position embedding; only rotary", "model")
    )
    init_method: str = field(
        default="small_init",
        metadata=_help(
            "init of every weight but the residual outputs: small_init (Pythia) | wang_init | "
            "normal (std init-method-std) | scaled_normal (that / sqrt(2 x num-layers))",
            "model",
        ),
    )
    output_layer_init_method: str = field(
        default="wang_init",
        metadata=_help("init of attention dense and MLP down-projection: as init-method", "model"),
    )
    init_method_std: float = field(
        default=0.02, metadata=_help("std of init-method normal and scaled_normal", "model")
    )
    checkpoint_activations: bool = field(
        default=False, metadata=_help("recompute activations in backward to save memory", "model")
    )
    chunked_cross_entropy: str = field(
        default="auto",
        metadata=_help(
            "training loss: output layer + cross-entropy in row chunks, never all logits at "
            "once (less memory for large vocabularies; same loss): auto (on a CPU, where it is "
            "faster) | true | false",
            "model",
        ),
    )
    init_from: str | None = field(
        default=None,
        metadata=_help(
            "start from a Hugging Face GPTNeoX or Llama folder or a neoxlab run/checkpoint: its "
            "architecture, tokenizer and weights",
            "model",
        ),
    )
    # finetuning with adapters (adapters.py)
    lora_rank: int = field(
        default=0,
        metadata=_help(
            "LoRA: train rank-r adapters beside the frozen init-from model (0 = full finetuning)",
            "model",
        ),
    )
    lora_alpha: float = field(
        default=16.0, metadata=_help("LoRA: adapters add (lora-alpha / lora-rank) B A x", "model")
    )
    lora_dropout: float = field(
        default=0.05, metadata=_help("LoRA: dropout on the adapters' input", "model")
    )
    lora_targets: list[str] | None = field(
        default=None,
        metadata=_help(
            "LoRA: names of the layers to adapt (default: every linear layer in the blocks: "
            "query_key_value dense dense_h_to_4h dense_4h_to_h)",
            "model",
        ),
    )
    load_in_4bit: bool = field(
        default=False,
        metadata=_help(
            "QLoRA: frozen block weights in 4-bit nf4 (bitsandbytes, CUDA); needs lora-rank",
            "model",
        ),
    )

    # tokenizer
    tokenizer_type: str = field(
        default="bpe",
        metadata=_help(
            "bpe (byte-level, trained on the data) | char | hf (vocab-file: a tokenizer.json; "
            "gpt-neox's HFTokenizer) | gpt2 (GPT-2's vocab-file + merge-file; GPT2BPETokenizer)",
            "tokenizer",
        ),
    )
    vocab_file: str | None = field(
        default=None,
        metadata=_help("tokenizer.json to use; trained and written here if missing", "tokenizer"),
    )
    vocab_size: int = field(
        default=5000, metadata=_help("BPE vocabulary size to train", "tokenizer")
    )
    special_tokens: list[str] | None = field(
        default=None,
        metadata=_help(
            "special tokens for a trained BPE (default <|endoftext|> <|padding|>)", "tokenizer"
        ),
    )
    eod_token: str = field(
        default="<|endoftext|>", metadata=_help("end-of-document token", "tokenizer")
    )
    pad_token: str = field(default="<|padding|>", metadata=_help("padding token", "tokenizer"))
    merge_file: str | None = field(
        default=None,
        metadata=_help("gpt2: GPT-2's merges.txt (vocab-file is its vocab.json)", "tokenizer"),
    )

    # data
    data_path: str | None = field(
        default=None,
        metadata=_help(".jsonl / .txt to tokenize, or a prepared .bin/.idx prefix", "data"),
    )
    seq_length: int = field(default=256, metadata=_help("tokens per training sequence", "data"))
    split: str = field(
        default="900,100,0", metadata=_help("train,validation,test weights by document", "data")
    )
    data_format: str = field(
        default="text",
        metadata=_help("text (windows of documents) | chat (User/Agent examples)", "data"),
    )
    chat_user_name: str = field(
        default="User", metadata=_help("chat: speaker name of the user turns", "data")
    )
    chat_agent_name: str = field(
        default="Agent", metadata=_help("chat: speaker name of the replies learned", "data")
    )
    train_on_prompt: bool = field(
        default=False, metadata=_help("chat: learn the user turns too, not only replies", "data")
    )
    pack_examples: bool = field(
        default=False,
        metadata=_help("chat: pack several examples a row instead of padding each", "data"),
    )
    train_data_paths: list[str] | None = field(
        default=None,
        metadata=_help("prepared .bin/.idx prefixes to train on, blended (not data-path)", "data"),
    )
    valid_data_paths: list[str] | None = field(
        default=None, metadata=_help("prepared prefixes to validate on (train-data-paths)", "data")
    )
    test_data_paths: list[str] | None = field(
        default=None, metadata=_help("prepared prefixes to test on (train-data-paths)", "data")
    )
    train_data_weights: list[float] | None = field(
        default=None,
        metadata=_help("sampling weight of each train-data-paths entry (default: equal)", "data"),
    )
    valid_data_weights: list[float] | None = field(
        default=None, metadata=_help("sampling weight of each valid-data-paths entry", "data")
    )
    test_data_weights: list[float] | None = field(
        default=None, metadata=_help("sampling weight of each test-data-paths entry", "data")
    )
    weight_by_num_documents: bool = field(
        default=False,
        metadata=_help(
            "weigh each split's *-data-paths by their document counts (gpt-neox's formula with "
            "weighted-sampler-alpha), instead of *-data-weights",
            "data",
        ),
    )
    weighted_sampler_alpha: float = field(
        default=1.0,
        metadata=_help(
            "weight-by-num-documents' alpha: below 1 samples small datasets more often",
            "data",
        ),
    )
    eod_mask_loss: bool = field(
        default=False,
        metadata=_help("no loss on the token that follows an end-of-document token", "data"),
    )

    # training
    train_micro_batch_size_per_gpu: int = field(
        default=4,
        metadata=_help("sequences per forward pass per GPU (alias micro-batch-size)", "training"),
    )
    train_batch_size: int | None = field(
        default=None,
        metadata=_help(
            "sequences per optimizer step, all GPUs (alias global-batch-size)", "training"
        ),
    )
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata=_help("micro-batches per step (default: from the batch sizes)", "training"),
    )
    train_iters: int = field(default=1000, metadata=_help("optimizer steps to train", "training"))
    lr: float = field(default=6e-4, metadata=_help("peak learning rate", "training"))
    min_lr: float = field(
        default=0.0, metadata=_help("learning rate at the end of decay", "training")
    )
    lr_decay_style: str = field(
        default="cosine",
        metadata=_help(
            "constant | linear | cosine | wsd | inverse_sqrt (alias lr-schedule)", "training"
        ),
    )
    lr_decay_iters: int | None = field(
        default=None,
        metadata=_help("steps over which lr decays (default: train-iters)", "training"),
    )
    warmup: float = field(
        default=0.01,
        metadata=_help("warmup: < 1 is a fraction of lr-decay-iters, >= 1 is steps", "training"),
    )
    wsd_decay_fraction: float = field(
        default=0.2,
        metadata=_help("wsd: final fraction of lr-decay-iters that decays to min-lr", "training"),
    )
    optimizer: dict = field(
        default_factory=lambda: {"type": "Adam", "params": {}},
        metadata=_help(
            "{type: Adam|AdamW|AdamW8bit|SGD|Lion|Adafactor|Muon, params: {betas, eps, ...}}",
            "training",
        ),
    )
    weight_decay: float = field(
        default=0.0, metadata=_help("decoupled weight decay on >= 2-D weights", "training")
    )
    weight_decay_embeddings: bool = field(
        default=True,
        metadata=_help("weight decay on the input embedding too (false = not)", "training"),
    )
    gradient_clipping: float = field(
        default=1.0, metadata=_help("clip gradients to this norm or value (0 = off)", "training")
    )
    gradient_clipping_type: str = field(
        default="norm",
        metadata=_help("norm (global gradient norm) | value (each element)", "training"),
    )
    seed: int = field(
        default=1234, metadata=_help("seed for init, data order and dropout", "training")
    )
    precision: str = field(
        default="auto", metadata=_help("auto | fp32 | fp16 | bf16 (auto: by hardware)", "training")
    )
    fp16: dict = field(
        default_factory=lambda: dict(FP16_DEFAULTS),
        metadata=_help(
            "{enabled, loss_scale (> 0: static), initial_scale_power, loss_scale_window, "
            "min_loss_scale, hysteresis (overflows before the scale halves), "
            "consecutive_hysteresis}",
            "training",
        ),
    )
    bf16: dict = field(
        default_factory=lambda: {"enabled": False}, metadata=_help("{enabled}", "training")
    )
    compile: str = field(
        default="auto",
        metadata=_help("torch.compile: auto (CUDA sm >= 8.0) | true | false", "training"),
    )
    compile_mode: str = field(
        default="default",
        metadata=_help(
            "torch.compile mode: default | reduce-overhead (CUDA graphs: one GPU, small "
            "models) | max-autotune | max-autotune-no-cudagraphs",
            "training",
        ),
    )
    device: str = field(default="auto", metadata=_help("auto | cpu | cuda | mps", "training"))
    distributed: str = field(
        default="auto",
        metadata=_help(
            "under torchrun: ddp | fsdp (FSDP2 sharding) | auto (fsdp when zero stage >= 1)",
            "training",
        ),
    )
    distributed_timeout: float = field(
        default=1800,
        metadata=_help(
            "under torchrun: seconds a rank waits in a collective for the others before it "
            "fails the job (a lost or frozen rank); above rank 0's longest lone step (data "
            "preparation on first use, one checkpoint write)",
            "training",
        ),
    )
    zero_optimization: dict = field(
        default_factory=lambda: {"stage": 0},
        metadata=_help(
            "gpt-neox/DeepSpeed {stage, offload_optimizer: {device: cpu}}: stage >= 1 shards "
            "with FSDP2; offload keeps weights, gradients and optimizer state in host memory",
            "training",
        ),
    )

    # evaluation
    eval_interval: int = field(default=1000, metadata=_help("evaluate every N steps", "evaluation"))
    eval_iters: int = field(
        default=100, metadata=_help("validation batches per evaluation", "evaluation")
    )
    sample_prompt: str = field(
        default="\n",
        metadata=_help("prompt for the sample generated at each evaluation", "evaluation"),
    )
    sample_tokens: int = field(
        default=200, metadata=_help("tokens generated for that sample (0 = none)", "evaluation")
    )
    code_metrics: bool = field(
        default=False,
        metadata=_help(
            "also bits per byte and line completion (exact match, edit similarity, BLEU)",
            "evaluation",
        ),
    )
    line_completion_samples: int = field(
        default=64,
        metadata=_help("validation lines completed per evaluation (code-metrics)", "evaluation"),
    )

    # benchmarks: lm-eval tasks during training (benchmarks.py)
    eval_tasks: list[str] | None = field(
        default=None,
        metadata=_help(
            "lm-eval tasks to benchmark during training (names separated by spaces or commas); "
            'needs pip install "neoxlab[eval]"',
            "evaluation",
        ),
    )
    eval_tasks_interval: int | None = field(
        default=None,
        metadata=_help(
            "benchmark eval-tasks every N steps (and always at the end of training)", "evaluation"
        ),
    )
    eval_tasks_limit: float | None = field(
        default=None,
        metadata=_help(
            "documents per task, as lm-eval's --limit (< 1: a fraction; default: all)",
            "evaluation",
        ),
    )
    eval_tasks_include_path: str | None = field(
        default=None,
        metadata=_help(
            "folder of task YAML files for eval-tasks, e.g. the repository's benchmarks/",
            "evaluation",
        ),
    )

    # logging
    log_interval: int = field(
        default=10, metadata=_help("log training metrics every N steps", "logging")
    )
    run_name: str | None = field(
        default=None, metadata=_help("run directory name (default: adjective_scientist)", "logging")
    )
    use_wandb: bool = field(
        default=False,
        metadata=_help(
            "log to W&B (online with an API key, else offline); also --wandb", "logging"
        ),
    )
    wandb_project: str | None = field(
        default=None,
        metadata=_help("W&B project (default: the first config file's name)", "logging"),
    )
    wandb_group: str | None = field(
        default=None, metadata=_help("W&B group, e.g. one experiment's runs", "logging")
    )
    wandb_entity: str | None = field(
        default=None, metadata=_help("W&B team or user (default: your default entity)", "logging")
    )
    wandb_tags: list[str] | None = field(
        default=None, metadata=_help("W&B tags (a list, or words separated by spaces)", "logging")
    )
    wandb_run_name: str | None = field(
        default=None, metadata=_help("W&B run name (default: the run directory's name)", "logging")
    )
    use_tensorboard: bool = field(
        default=False, metadata=_help("write TensorBoard events to tensorboard-dir", "logging")
    )
    tensorboard_dir: str | None = field(
        default=None,
        metadata=_help(
            "TensorBoard folder inside the run directory; setting it turns TensorBoard on "
            "(default tb with use-tensorboard)",
            "logging",
        ),
    )

    # checkpointing
    save: str | None = field(
        default="checkpoints",
        metadata=_help(
            "checkpoint folder inside the run directory (false = none)", "checkpointing"
        ),
    )
    save_interval: int = field(
        default=1000, metadata=_help("checkpoint every N steps", "checkpointing")
    )
    keep_last_n_checkpoints: int | None = field(
        default=None,
        metadata=_help("keep only the newest N checkpoints (alias keep-last-k)", "checkpointing"),
    )
    exit_interval: int | None = field(
        default=None,
        metadata=_help("stop (with a checkpoint) at each multiple of this step", "checkpointing"),
    )
    load: str | None = field(
        default=None,
        metadata=_help(
            "run directory to continue (a new run while it has no checkpoint); latest: as "
            "--resume auto; absent: a new run (with finetune: true, the init-from model)",
            "checkpointing",
        ),
    )
    override_lr_scheduler: bool = field(
        default=False,
        metadata=_help(
            "on resume, the config's lr schedule wherever it differs from the checkpoint's, "
            "without a notice",
            "checkpointing",
        ),
    )
    use_checkpoint_lr_scheduler: bool = field(
        default=False,
        metadata=_help(
            "on resume, the checkpoint's lr, min-lr, warmup, decay steps and style",
            "checkpointing",
        ),
    )

    # ---- derived values -------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings or self.seq_length

    def batch_geometry(self, world_size: int = 1) -> tuple[int, int, int]:
        """(micro batch, accumulation steps, global batch) for `world_size` processes."""
        micro = self.train_micro_batch_size_per_gpu
        if self.train_batch_size is None:
            gas = self.gradient_accumulation_steps or 1
            return micro, gas, micro * gas * world_size
        per_step = micro * world_size
        if self.train_batch_size % per_step:
            raise NeoxlabError(
                f"global batch {self.train_batch_size} is not divisible by micro batch {micro} x "
                f"world size {world_size} = {per_step}",
                hint="make train-batch-size a multiple of train-micro-batch-size-per-gpu x GPUs",
            )
        gas = self.train_batch_size // per_step
        if self.gradient_accumulation_steps not in (None, gas):
            raise NeoxlabError(
                f"gradient-accumulation-steps {self.gradient_accumulation_steps} disagrees with "
                f"global batch {self.train_batch_size} / (micro {micro} x world {world_size}) "
                f"= {gas}",
                hint="set only two of the three batch keys",
            )
        return micro, gas, self.train_batch_size

    def warmup_iters(self) -> int:
        decay_iters = self.lr_decay_iters or self.train_iters
        if self.warmup < 1:
            return int(self.warmup * decay_iters)
        return int(self.warmup)

    def requested_precision(self) -> str:
        """What the config asks for: auto, fp32, fp16 or bf16 (hardware decides `auto`)."""
        if self.precision != "auto":
            return self.precision
        if self.fp16.get("enabled"):
            return "fp16"
        if self.bf16.get("enabled"):
            return "bf16"
        return "auto"

    def to_dict(self) -> dict[str, Any]:
        """The resolved config with canonical, hyphenated keys (what config.yml holds)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    # ---- validation ----------------------------------------------------------------------

    def validate(self) -> None:
        """Check values that types alone do not catch. Raises NeoxlabError."""
        self._check_model_shape()
        self._check_tokenizer()
        self._check_batch_arithmetic()
        self._check_schedule()
        self._check_optimizer()
        self._check_precision()
        self._check_runtime()
        self._check_data()
        self._check_chat()
        self._check_lora()
        self._check_evaluation()
        self._check_logging()
        self._check_checkpointing()

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise NeoxlabError(f"{_key(name)} must be positive, got {value}")

    def _check_non_negative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise NeoxlabError(f"{_key(name)} must be a non-negative number, got {value}")

    def _check_model_shape(self) -> None:
        self._check_positive(
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "seq_length",
            "make_vocab_size_divisible_by",
            "max_position_embeddings",
            "intermediate_size",
        )
        self._check_architecture()
        self._check_model_size()
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise NeoxlabError(f"{_key(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise NeoxlabError(
                f"hidden-size {self.hidden_size} is not divisible by num-attention-heads "
                f"{self.num_attention_heads}",
                hint="pick a head count that divides the hidden size",
            )
        if not 0 < self.rotary_pct <= 1:
            raise NeoxlabError(f"rotary-pct must be in (0, 1], got {self.rotary_pct}")
        if self.seq_length > self.context_length:
            raise NeoxlabError(
                f"seq-length {self.seq_length} is above max-position-embeddings "
                f"{self.max_position_embeddings}",
                hint="lower seq-length or raise max-position-embeddings",
            )
        _check_choice("pos_emb", self.pos_emb, ("rotary",))

    def _check_architecture(self) -> None:
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("norm", self.norm, NORMS)
        self._check_positive("num_kv_heads", "mlp_multiple_of", "rms_norm_epsilon")
        if self.num_kv_heads and self.num_attention_heads % self.num_kv_heads:
            raise NeoxlabError(
                f"num-kv-heads {self.num_kv_heads} does not divide num-attention-heads "
                f"{self.num_attention_heads}",
                hint="each key/value head serves an equal group of query heads",
            )
        for name in ("init_method", "output_layer_init_method"):
            _check_choice(name, getattr(self, name), tuple(INIT_METHODS))
        self._check_positive("init_method_std")

    def _check_tokenizer(self) -> None:
        self._check_positive("vocab_size")
        _check_choice("tokenizer_type", self.tokenizer_type, TOKENIZER_TYPES)
        specials = self.special_tokens or ["<|endoftext|>", "<|padding|>"]
        if self.tokenizer_type == "bpe" and self.vocab_size <= len(specials):
            raise NeoxlabError(
                f"vocab-size {self.vocab_size} is not larger than the {len(specials)} special "
                "tokens"
            )
        if self.special_tokens is not None and self.eod_token not in self.special_tokens:
            raise NeoxlabError(
                f"eod-token {self.eod_token!r} is not among special-tokens {self.special_tokens}",
                hint="add it to special-tokens or set eod-token to one of them",
            )

    def _check_batch_arithmetic(self) -> None:
        self._check_positive(
            "train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"
        )
        self.batch_geometry(1)  # raises when the three batch keys disagree

    def _check_schedule(self) -> None:
        self._check_positive("train_iters", "lr_decay_iters")
        self._check_non_negative("lr", "min_lr", "warmup")
        if self.min_lr > self.lr:
            raise NeoxlabError(f"min-lr {self.min_lr} is larger than lr {self.lr}")
        _check_choice("lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        if not 0 < self.wsd_decay_fraction <= 1:
            raise NeoxlabError(
                f"wsd-decay-fraction must be in (0, 1], got {self.wsd_decay_fraction}"
            )

    def _check_optimizer(self) -> None:
        _check_choice("optimizer.type", self.optimizer["type"], OPTIMIZER_TYPES)
        self._check_non_negative("weight_decay", "gradient_clipping")
        _check_choice("gradient_clipping_type", self.gradient_clipping_type, ("norm", "value"))

    def _check_precision(self) -> None:
        _check_choice("precision", self.precision, PRECISIONS)
        self._check_precision_blocks()
        if self.fp16.get("enabled") and self.bf16.get("enabled"):
            raise NeoxlabError("fp16 and bf16 are both enabled", hint="enable at most one")

    def _check_runtime(self) -> None:
        _check_choice("device", self.device, DEVICES)
        for name in AUTO_SWITCHES:
            _check_choice(name, getattr(self, name), ("auto", "true", "false"))
        _check_choice("compile_mode", self.compile_mode, COMPILE_MODES)
        _check_choice("distributed", self.distributed, DISTRIBUTED_MODES)
        if not 0 < self.distributed_timeout <= MAX_DISTRIBUTED_TIMEOUT:  # NaN fails too
            raise NeoxlabError(
                f"distributed-timeout must be a number of seconds in (0, "
                f"{MAX_DISTRIBUTED_TIMEOUT}], got {self.distributed_timeout}"
            )
        stage = self.zero_optimization.get("stage", 0)
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
            raise NeoxlabError(f"zero-optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
        for key in ("offload_optimizer", "offload_param"):
            block = self.zero_optimization.get(key)
            if block is not None and (
                not isinstance(block, dict) or block.get("device", "none") not in OFFLOAD_DEVICES
            ):
                raise NeoxlabError(
                    f"zero-optimization.{key} must be {{device: cpu}} or {{device: none}}, "
                    f"got {block!r}",
                    hint="neoxlab offloads to host memory (FSDP2's CPU offload), not to NVMe",
                )

    def _check_data(self) -> None:
        _check_choice("data_format", self.data_format, ("text", "chat"))
        self._check_non_negative("weighted_sampler_alpha")
        parse_split(self.split)
        self._check_data_paths()

    def _check_chat(self) -> None:
        for name in ("chat_user_name", "chat_agent_name"):
            value = getattr(self, name)
            if not value.strip() or value != value.strip() or ":" in value or "\n" in value:
                raise NeoxlabError(
                    f"{_key(name)} must be a name without ':', newlines or outer spaces; "
                    f"got {value!r}"
                )
        if self.chat_user_name == self.chat_agent_name:
            raise NeoxlabError("chat-user-name and chat-agent-name must differ")

    def _check_lora(self) -> None:
        if self.lora_rank < 0:
            raise NeoxlabError(
                f"lora-rank must be >= 0 (0 = full finetuning), got {self.lora_rank}"
            )
        if not self.lora_rank:
            if self.load_in_4bit:
                raise NeoxlabError(
                    "load-in-4bit freezes the base model in 4 bits: it needs LoRA adapters",
                    hint="add lora-rank=8 (QLoRA)",
                )
            return
        self._check_positive("lora_alpha")
        if not 0 <= self.lora_dropout < 1:
            raise NeoxlabError(f"lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_targets is not None and not self.lora_targets:
            raise NeoxlabError("lora-targets is empty", hint="leave it out for every linear layer")
        if self.offload_optimizer():
            raise NeoxlabError(
                "offload_optimizer with LoRA: the adapters' optimizer state is megabytes",
                hint="drop zero-optimization.offload-optimizer, or train fully (lora-rank=0)",
            )

    def _check_evaluation(self) -> None:
        self._check_positive("eval_interval", "eval_iters", "line_completion_samples")
        self._check_non_negative("sample_tokens")
        self._check_eval_tasks()

    def _check_eval_tasks(self) -> None:
        self._check_positive("eval_tasks_interval")
        limit = self.eval_tasks_limit
        if limit is not None and not (math.isfinite(limit) and limit > 0):
            raise NeoxlabError(f"eval-tasks-limit must be a positive number, got {limit}")
        if not self.eval_tasks:
            for name in ("eval_tasks_interval", "eval_tasks_limit", "eval_tasks_include_path"):
                if getattr(self, name) is not None:
                    raise NeoxlabError(f"{_key(name)} is set but eval-tasks is not")

    def _check_checkpointing(self) -> None:
        self._check_positive("save_interval", "keep_last_n_checkpoints", "exit_interval")
        if self.override_lr_scheduler and self.use_checkpoint_lr_scheduler:
            raise NeoxlabError(
                "override-lr-scheduler and use-checkpoint-lr-scheduler are both true",
                hint="the first continues with the config's schedule, the second with the "
                "checkpoint's: set one",
            )

    def _check_model_size(self) -> None:
        # Far past any GPT-NeoX-family model: such a value is a typo, and building it (even on
        # the meta device for --dry-run) would take hours or overflow the allocator.
        if self.num_layers > MAX_LAYERS:
            raise NeoxlabError(f"num-layers {self.num_layers} is above {MAX_LAYERS}")
        width = mlp_width(self)
        matrices = 3 if self.activation == "swiglu" else 2
        per_layer = 4 * self.hidden_size**2 + matrices * self.hidden_size * width
        vocab = self.vocab_size if self.tokenizer_type == "bpe" else 0
        parameters = self.num_layers * per_layer + 2 * vocab * self.hidden_size
        if parameters > MAX_PARAMETERS:
            raise NeoxlabError(
                f"hidden-size {self.hidden_size}, num-layers {self.num_layers}, "
                f"MLP width {width} and vocab-size {self.vocab_size} make about "
                f"{parameters:.1e} parameters, above the {MAX_PARAMETERS:.0e} neoxlab builds",
                hint="check these keys for a typo",
            )

    def _check_precision_blocks(self) -> None:
        for block in ("fp16", "bf16"):
            enabled = getattr(self, block).get("enabled", False)
            if not isinstance(enabled, bool):
                raise NeoxlabError(f"{block}.enabled must be true or false, got {enabled!r}")
        fp16 = self.fp16

        def number(name: str, low: float, integer: bool = False) -> None:
            value = fp16[name]
            exact = isinstance(value, int) or not integer
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < low
                or not exact
            ):
                kind = "an integer" if integer else "a number"
                raise NeoxlabError(f"fp16.{name} must be {kind} >= {low}, got {value!r}")

        number("loss_scale", 0)
        number("min_loss_scale", 0)
        number("loss_scale_window", 1, integer=True)
        number("initial_scale_power", 0, integer=True)
        number("hysteresis", 1, integer=True)
        if not isinstance(fp16["consecutive_hysteresis"], bool):
            raise NeoxlabError("fp16.consecutive_hysteresis must be true or false")
        # 2 ** 128 is already infinite in fp32 (and 2.0 ** huge overflows Python floats)
        if fp16["initial_scale_power"] > MAX_SCALE_POWER:
            raise NeoxlabError(
                f"fp16.initial_scale_power must be at most {MAX_SCALE_POWER}, "
                f"got {fp16['initial_scale_power']}"
            )

    def _check_logging(self) -> None:
        self._check_positive("log_interval")
        # W&B rejects these only once a run starts: catch them before training does.
        project = self.wandb_project
        if project is not None and (
            not project.strip() or len(project) > 128 or any(c in project for c in "/\\#?%:")
        ):
            raise NeoxlabError(
                f"wandb-project {project!r} is not a valid W&B project name",
                hint="use up to 128 letters, digits, '-', '_' or '.'",
            )
        for tag in self.wandb_tags or []:
            if not 0 < len(tag) <= 64:
                raise NeoxlabError(
                    f"wandb-tags: each tag must have 1 to 64 characters; got {tag!r}"
                )
        for name in ("wandb_group", "wandb_entity", "wandb_run_name", "tensorboard_dir"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise NeoxlabError(f"{_key(name)} must not be empty")

    def _check_data_paths(self) -> None:
        if self.train_data_paths is None:
            for name in ("valid_data_paths", "test_data_paths", *DATA_WEIGHT_KEYS):
                if getattr(self, name) is not None:
                    raise NeoxlabError(f"{_key(name)} is set but train-data-paths is not")
            return
        if self.data_path:
            raise NeoxlabError(
                "data-path and train-data-paths are both set",
                hint="use data-path (split by `split`) or train/valid/test-data-paths, not both",
            )
        if not self.train_data_paths or not self.valid_data_paths:
            raise NeoxlabError(
                "train-data-paths needs valid-data-paths (each a non-empty list of prefixes)"
            )
        for split in ("train", "valid", "test"):
            paths = getattr(self, f"{split}_data_paths")
            weights = getattr(self, f"{split}_data_weights")
            if weights is None:
                continue
            if paths is None or len(weights) != len(paths):
                raise NeoxlabError(
                    f"{split}-data-weights has {len(weights)} entries for "
                    f"{len(paths or [])} {split}-data-paths",
                    hint="give one weight per path",
                )
            if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
                raise NeoxlabError(f"{split}-data-weights must be non-negative with a positive sum")

    def offload_optimizer(self) -> bool:
        """DeepSpeed's `offload_optimizer` (or `offload_param`) `{device: cpu}`: keep weights,
        gradients and optimizer state in host memory and step there (FSDP2's CPU offload,
        which moves the parameters with the optimizer: one switch for both keys)."""
        return any(
            isinstance(block := self.zero_optimization.get(key), dict)
            and block.get("device") == "cpu"
            for key in ("offload_optimizer", "offload_param")
        )

    def distributed_mode(self) -> str:
        """ddp or fsdp: how a multi-process run shares work (ZeRO stage >= 1 means sharding)."""
        if self.distributed != "auto":
            return self.distributed
        return "fsdp" if self.zero_optimization.get("stage", 0) >= 1 else "ddp"


def parse_split(split: str) -> tuple[float, float, float]:
    """`"969,30,1"` -> normalised (train, validation, test) fractions, as gpt-neox reads it."""
    parts = [p.strip() for p in str(split).split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if (
        len(weights) != 3
        or any(w < 0 or not math.isfinite(w) for w in weights)
        or sum(weights) <= 0
    ):
        raise NeoxlabError(
            f"split {split!r} is not three non-negative weights",
            hint='write it as "train,validation,test", e.g. "900,100,0"',
        )
    total = sum(weights)
    return weights[0] / total, weights[1] / total, weights[2] / total


def _key(name: str) -> str:
    return name.replace("_", "-")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise NeoxlabError(
            f"{_key(name)} must be one of {', '.join(choices)}; got {value!r}",
        )


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)


# ---- reading files ----------------------------------------------------------------------------


def canonical_key(raw: Any) -> str:
    """`Hidden-Size` / `hidden_size` / alias -> canonical field name."""
    name = str(raw).strip().replace("-", "_").lower()
    return ALIASES.get(name, name)


def _unknown_key(key: str, origin: str) -> NeoxlabError:
    candidates = [*FIELDS, *ALIASES, *SECTIONS]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f"did you mean '{_key(close[0])}'?" if close else "see `neoxlab train --help` for keys"
    return NeoxlabError(f"unknown config key '{_key(key)}' in {origin}", hint=hint)


def _normalise_mapping(value: Any, key: str, origin: str) -> dict:
    if value is True or value is False:
        return {"enabled": value}
    if not isinstance(value, dict):
        raise NeoxlabError(
            f"{_key(key)} in {origin} must be a mapping or true/false, got {value!r}"
        )
    return {canonical_key(k): v for k, v in value.items()}


# Adds one key to the layer being flattened (an error when it is already set differently).
_Put = typing.Callable[[str, Any], None]


def flatten_layer(
    raw: dict, origin: str, base_dir: Path | None, ignored: list[str] | None = None
) -> dict[str, Any]:
    """One file's (or the CLI's) keys -> {canonical key: value}, sections flattened.

    `base_dir` resolves relative input paths (None: leave them as written). gpt-neox keys are
    translated; those that only steer DeepSpeed/Megatron internals are dropped and appended to
    `ignored` (the caller reports them).
    """
    if not isinstance(raw, dict):
        raise NeoxlabError(f"{origin} must hold a mapping of config keys, got {type(raw).__name__}")
    flat: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if key in flat and flat[key] != value:
            raise NeoxlabError(f"'{_key(key)}' is set twice in {origin} with different values")
        flat[key] = value

    _flatten_sections(raw, put, origin)
    _resolve_save_dir(flat, origin)
    for key in MAPPING_KEYS:
        if key in flat and key != "optimizer":
            flat[key] = _normalise_mapping(flat[key], key, origin)
    _lift_optimizer_params(flat, origin)
    dropped = _translate_neox_keys(flat, put, origin)
    if ignored is not None:
        ignored += dropped
    for key in flat:
        if key not in FIELDS and key not in neox_compat.MERGED_KEYS:
            raise _unknown_key(key, origin)
        flat[key] = neox_compat.translate_value(key, flat[key])
    if base_dir is not None:
        _resolve_input_paths(flat, base_dir)
    return flat


def _flatten_sections(raw: dict, put: _Put, origin: str) -> None:
    """Put every key of `raw`, a section's children as top-level keys."""
    for raw_key, value in raw.items():
        key = canonical_key(raw_key)
        if key == "deepspeed_extra_args" and isinstance(value, dict):
            # gpt-neox merges these into the DeepSpeed config: they are keys like any other
            _flatten_sections(value, put, origin)
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise NeoxlabError(f"section '{key}' in {origin} must be a mapping")
            for child_key, child_value in value.items():
                child = canonical_key(child_key)
                if child in SECTIONS:
                    raise NeoxlabError(f"section '{child}' nested inside '{key}' in {origin}")
                if child == "optimizer":
                    _put_optimizer(put, child_value, origin)
                else:
                    put(child, child_value)
        elif key == "optimizer":
            _put_optimizer(put, value, origin)
        else:
            put(key, value)


def _resolve_save_dir(flat: dict, origin: str) -> None:
    """`save: true` + `save-dir: X` (a common habit) means `save: X`; `save: false` means none."""
    save_dir = flat.pop("save_dir", None)
    if save_dir is not None:
        if flat.get("save") is False:
            raise NeoxlabError(f"save is false but save-dir is set in {origin}")
        flat["save"] = save_dir
    elif flat.get("save") is True:
        flat["save"] = FIELDS["save"].default
    elif flat.get("save") is False:
        flat["save"] = None


def _translate_neox_keys(flat: dict, put: _Put, origin: str) -> list[str]:
    """gpt-neox keys -> neoxlab's, in place; returns the DeepSpeed/Megatron keys dropped."""
    dropped: list[str] = []
    for key in list(flat):
        if key in neox_compat.TRANSLATED_KEYS:
            for new_key, new_value in neox_compat.translate(key, flat.pop(key), origin).items():
                put(new_key, new_value)
        elif key in neox_compat.UNSUPPORTED:
            neox_compat.check_supported(key, flat[key], origin)
            if key not in FIELDS:
                flat.pop(key)  # at the one value that means what neoxlab does anyway
        elif key in neox_compat.IGNORED_KEYS and key not in FIELDS:
            flat.pop(key)
            dropped.append(key)
    if isinstance(flat.get("zero_optimization"), dict):
        zero = dict(flat["zero_optimization"])
        if zero.get("cpu_offload") is True:  # DeepSpeed's older spelling of the same offload
            zero.pop("cpu_offload")
            zero.setdefault("offload_optimizer", {"device": "cpu"})
        dropped += [f"zero_optimization.{k}" for k in zero if k not in ZERO_KEYS]
        flat["zero_optimization"] = {k: v for k, v in zero.items() if k in ZERO_KEYS}
    return dropped


def _resolve_input_paths(flat: dict, base_dir: Path) -> None:
    for key in INPUT_PATH_KEYS:
        if isinstance(flat.get(key), str) and flat[key]:
            flat[key] = _resolve(base_dir, flat[key])
        elif isinstance(flat.get(key), list):
            flat[key] = [_resolve(base_dir, v) if isinstance(v, str) else v for v in flat[key]]


def _resolve(base_dir: Path, path: str) -> str:
    if "\0" in path:  # no filesystem takes one (os functions raise ValueError)
        raise NeoxlabError(f"path {path!r} contains a NUL character")
    try:
        expanded = Path(path).expanduser()
    except RuntimeError:  # ~name of a user this machine does not know
        raise NeoxlabError(f"cannot expand {path!r}: no such user's home folder") from None
    return str((base_dir / expanded).resolve())


def _put_optimizer(put: _Put, value: Any, origin: str) -> None:
    """`optimizer:` holds {type, params}; any other child (lr-schedule, warmup) is a plain key."""
    if isinstance(value, str):
        put("optimizer", {"type": value})
        return
    if not isinstance(value, dict):
        raise NeoxlabError(f"optimizer in {origin} must be a mapping {{type, params}} or a name")
    optimizer = {}
    for raw_key, child in value.items():
        key = canonical_key(raw_key)
        if key in ("type", "params"):
            optimizer[key] = child
        else:
            put(key, child)
    if optimizer:
        put("optimizer", optimizer)


def _lift_optimizer_params(flat: dict, origin: str) -> None:
    """`optimizer.params.lr` / `weight_decay` are the same as top-level `lr` / `weight-decay`."""
    optimizer = flat.get("optimizer")
    if not isinstance(optimizer, dict):
        return  # absent, or not a mapping: _coerce reports it with the others
    params = optimizer.get("params")
    if params is None:
        return
    if not isinstance(params, dict):
        raise NeoxlabError(f"optimizer.params in {origin} must be a mapping, got {params!r}")
    params = {canonical_key(k): v for k, v in params.items()}
    for key in ("lr", "weight_decay"):
        if key not in params:
            continue
        value = params.pop(key)
        if key in flat and _coerce(key, flat[key], origin) != _coerce(key, value, origin):
            raise NeoxlabError(
                f"{_key(key)} ({flat[key]}) and optimizer.params.{key} ({value}) differ "
                f"in {origin}",
                hint="set it in one place",
            )
        flat[key] = value
    optimizer["params"] = params


def _merge(base: dict, layer: dict) -> dict:
    merged = dict(base)
    for key, value in layer.items():
        if key == "optimizer" and _switches_optimizer(merged.get(key), value):
            merged[key] = value  # params belong to their optimizer: a new type starts afresh
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _switches_optimizer(base: Any, layer: Any) -> bool:
    """True when `layer` names a different optimizer type than `base` (both mappings)."""
    if not (isinstance(base, dict) and isinstance(layer, dict)):
        return False
    old, new = base.get("type"), layer.get("type")
    return old is not None and new is not None and str(old).lower() != str(new).lower()


# ---- types ------------------------------------------------------------------------------------


def _coerce(name: str, value: Any, origin: str) -> Any:
    """Check/convert one value to its field's type. YAML reads 5e-4 as a string: accept it."""
    expected, optional = _unwrap_optional(_TYPES[name])
    if value is None:
        if optional:
            return None
        raise NeoxlabError(f"{_key(name)} in {origin} must not be empty")
    if typing.get_origin(expected) is list and isinstance(value, str):
        value = value.split()  # a list may be written as words separated by spaces
    converted = _convert(name, expected, value)
    if converted is None:
        raise NeoxlabError(
            f"{_key(name)} in {origin} must be {_TYPE_NAMES.get(expected, 'a value')}, "
            f"got {value!r}"
        )
    return converted


def _unwrap_optional(expected: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True); `int` -> (int, False)."""
    if isinstance(expected, types.UnionType) or typing.get_origin(expected) is typing.Union:
        args = [a for a in typing.get_args(expected) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(expected))
    return expected, False


def _convert(name: str, expected: Any, value: Any) -> Any:
    """`value` as an `expected`, or None when it is not one (and cannot be read as one)."""
    if expected is bool:
        return value if isinstance(value, bool) else None
    if expected is int:
        return _to_int(value)
    if expected is float:
        return None if isinstance(value, bool) else _number(value)
    if expected is str:
        return _to_str(name, value)
    if expected is dict:
        return value if isinstance(value, dict) else None
    if typing.get_origin(expected) is list:
        return _to_list(expected, value)
    raise AssertionError(f"no coercion for {expected}")


def _to_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    number = _number(value)
    if number is not None and math.isfinite(number) and number == int(number):
        return int(number)
    return None


def _to_str(name: str, value: Any) -> str | None:
    if name in AUTO_SWITCHES and isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _to_list(expected: Any, value: Any) -> list | None:
    if not isinstance(value, list):
        return None
    if typing.get_args(expected) == (float,):
        numbers = [None if isinstance(v, bool) else _number(v) for v in value]
        return None if any(n is None for n in numbers) else numbers
    if all(isinstance(v, str) for v in value):
        return list(value)
    return None


_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    dict: "a mapping",
}


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _build(merged: dict, origin: str) -> Config:
    combined = ("train_iters", "hidden_size", "make_vocab_size_divisible_by", "seq_length")
    merged = neox_compat.translate_merged(
        merged, origin, {name: FIELDS[name].default for name in combined}
    )
    values = {name: _coerce(name, value, origin) for name, value in merged.items()}
    if "optimizer" in values:
        optimizer = {"type": "Adam", "params": {}, **values["optimizer"]}
        optimizer["type"] = _canonical_optimizer(optimizer["type"])
        if not isinstance(optimizer["params"], dict):
            raise NeoxlabError(f"optimizer.params in {origin} must be a mapping")
        optimizer["params"] = {k: _numeric(v) for k, v in optimizer["params"].items()}
        values["optimizer"] = optimizer
    if "fp16" in values:
        values["fp16"] = {**FP16_DEFAULTS, **values["fp16"]}
        for name in (
            "loss_scale",
            "initial_scale_power",
            "loss_scale_window",
            "min_loss_scale",
            "hysteresis",
        ):
            values["fp16"][name] = _numeric(values["fp16"][name])  # YAML reads 1e-4 as text
        unknown = set(values["fp16"]) - set(FP16_DEFAULTS)
        if unknown:
            raise NeoxlabError(
                f"unknown fp16 option(s) {sorted(unknown)} in {origin}",
                hint=f"known: {', '.join(FP16_DEFAULTS)}",
            )
    return Config(**values)


def _numeric(value: Any) -> Any:
    """Optimizer params have no schema: turn YAML's numeric strings ("1e-8") into numbers."""
    if isinstance(value, list):
        return [_numeric(v) for v in value]
    if isinstance(value, str):
        number = _number(value)
        return value if number is None else number
    return value


def _canonical_optimizer(name: Any) -> str:
    by_lower = {n.lower(): n for n in OPTIMIZER_TYPES}
    return by_lower.get(str(name).lower(), str(name))


# ---- public entry points ---------------------------------------------------------------------


def read_yaml(path: Path) -> Any:
    """safe_load a YAML file (never constructs Python objects), with clear errors."""
    if not path.is_file():
        raise NeoxlabError(
            f"config file {path} does not exist",
            hint="neoxlab's own configs are in configs/ (e.g. neoxlab train "
            "configs/shakespeare.yml); command-line paths are relative to the current folder",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise NeoxlabError(f"config file {path} is not UTF-8 text ({err.reason})") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise NeoxlabError(f"config file {path} is not valid YAML{where}: {problem}") from None


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}} with value parsed as a YAML scalar."""
    key, sep, raw_value = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise NeoxlabError(f"override {text!r} is not key=value")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
        value = raw_value
    if isinstance(value, dict) and not raw_value.lstrip().startswith("{"):
        # `sample-prompt=ROMEO:` means the text, not YAML's block mapping {ROMEO: null}
        value = raw_value
    parts = key.split(".")
    nested: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def load_config(
    paths: typing.Sequence[str | Path] = (),
    overrides: typing.Sequence[str] = (),
    *,
    cwd: Path | None = None,
    notice: typing.Callable[[str], None] | None = None,
) -> Config:
    """Read, merge (left to right, then overrides) and validate config files.

    When a file is a gpt-neox config (neox_compat.is_gpt_neox_file), the keys no file or
    override sets take gpt-neox's defaults instead of neoxlab's, gpt-neox's required keys must be
    set and the MLP must be one gpt-neox can build. `notice` (default: print to stderr) receives
    at most three lines: SwiGLU MLPs with biases (Llama's have none), the gpt-neox keys ignored,
    and the gpt-neox defaults that differ from neoxlab's and applied."""
    notice = notice or _print_notice
    merged: dict = {}
    ignored: list[str] = []
    seen: set[str] = set()  # every key any layer named, before translation and after
    neox_files: list[str] = []
    for raw_path in paths:
        path = Path(raw_path).expanduser().resolve()
        raw = read_yaml(path)
        layer = flatten_layer(raw, str(raw_path), path.parent, ignored)
        raw_keys = {canonical_key(k) for k in raw} if isinstance(raw, dict) else set()
        seen |= raw_keys | set(layer)
        if neox_compat.is_gpt_neox_file(raw_keys, set(FIELDS)):
            neox_files.append(str(raw_path))
        merged = _merge(merged, layer)
    if overrides:
        cli: dict = {}
        for text in overrides:
            cli = _merge(cli, parse_override(text))
        layer = flatten_layer(cli, "command-line overrides", cwd or Path.cwd(), ignored)
        seen |= {canonical_key(k) for k in cli} | set(layer)
        merged = _merge(merged, layer)
    origin = _origin(paths, overrides)
    defaulted: dict = {}
    if neox_files:  # gpt-neox's defaults under the layers, and its MLP rounding checked below
        merged, defaulted = _with_gpt_neox_defaults(merged, seen, neox_files)
    config = _build(merged, origin)
    config.validate()
    if neox_files:
        _check_gpt_neox_mlp(config, neox_files, notice)
    if ignored:
        notice(
            "warning: ignoring gpt-neox keys that change nothing neoxlab computes (kernels, "
            "parallel layout, logging; docs/gpt-neox-configs.md says why each): "
            + ", ".join(_key(k) for k in dict.fromkeys(ignored))
        )
    if defaulted:
        listed = ", ".join(
            f"{name} {value} (neoxlab: {_format_default(_neoxlab_default(name))})"
            for name, value in defaulted.items()
        )
        notice(
            f"note: {_gpt_neox_files(neox_files)}, so the keys no file sets take gpt-neox's "
            f"defaults, not neoxlab's: {listed}"
        )
    return config


def _origin(paths: typing.Sequence[str | Path], overrides: typing.Sequence[str]) -> str:
    """Where a merged config came from, as errors name it."""
    origin = ", ".join(str(p) for p in paths) or "defaults"
    return origin + " + command-line overrides" if overrides else origin


def _check_gpt_neox_mlp(
    config: Config, neox_files: list[str], notice: typing.Callable[[str], None]
) -> None:
    """gpt-neox rounds the MLP's two layers separately (`mlp_widths`); where the roundings
    disagree it fails on a shape mismatch, and a gpt-neox config must not train here what
    gpt-neox cannot. SwiGLU MLPs with biases get a note: Llama's have none."""
    first, second = mlp_widths(config)
    gated = config.activation == "swiglu"
    if first == (2 * second if gated else second):
        if gated and config.use_bias_in_mlp:
            notice(
                f"note: {_gpt_neox_files(neox_files)} with SwiGLU MLPs that have biases "
                "(use-bias-in-mlp is true unless set, in gpt-neox too); Llama's and Mistral's "
                "have none: add use-bias-in-mlp=false for them (gpt-neox's llama/ configs do, "
                "its llama2/ and mistral/ ones were written before the key existed)"
            )
        return
    width = config.intermediate_size or 4 * config.hidden_size
    halves = f" (two halves of {first // 2:,})" if gated else ""
    raise NeoxlabError(
        f"{_gpt_neox_files(neox_files)}, and with activation {config.activation}, "
        f"intermediate-size {width} and mlp-multiple-of {config.mlp_multiple_of} gpt-neox "
        f"builds an MLP whose first layer gives {first:,} values{halves} and whose second "
        f"takes {second:,}, which it cannot run",
        hint=f"if {width} is each half's width, as transformers counts it, write "
        f"intermediate-size {3 * width} (gpt-neox sizes a SwiGLU MLP at ⅔ of it); or set "
        "mlp-multiple-of (Llama: 256)"
        if gated
        else "choose an intermediate-size that is a multiple of 2 x mlp-multiple-of",
    )


def _with_gpt_neox_defaults(
    merged: dict, seen: set[str], neox_files: list[str]
) -> tuple[dict, dict[str, str]]:
    """`merged` over gpt-neox's defaults for the keys nothing set, after checking gpt-neox's
    required keys; also {hyphenated key: value} of the defaults that differ from neoxlab's."""
    missing = neox_compat.missing_required(seen)
    if missing:
        raise NeoxlabError(
            f"{_gpt_neox_files(neox_files)}, and gpt-neox needs {', '.join(missing)}, which no "
            "file sets (it has no default for them)",
            hint="set them, or give this file after the model's config, as gpt-neox takes "
            "several (e.g. neoxlab train 125M.yml local_setup.yml)",
        )
    defaults = neox_compat.gpt_neox_defaults(seen, merged)
    origin = f"gpt-neox's defaults (for keys no file of {', '.join(neox_files)} sets)"
    layer = flatten_layer(defaults, origin, None)
    differing = {}
    for name, value in layer.items():
        if name == "fp16":
            fp16 = merged.get("fp16", {})
            if fp16.get("enabled") and "hysteresis" not in fp16:  # it matters with fp16 only
                differing["fp16.hysteresis"] = str(value["hysteresis"])
        elif name == "split" and merged.get("train_data_paths"):
            continue  # whole datasets per split: `split` does not apply
        elif value != FIELDS[name].default:
            differing[_key(name)] = _format_default(defaults.get(name, value))  # as gpt-neox says
    return _merge(layer, merged), differing


def _gpt_neox_files(files: list[str]) -> str:
    return f"{', '.join(files)}: gpt-neox config{'s' if len(files) > 1 else ''}"


def _neoxlab_default(name: str) -> Any:
    if name == "fp16.hysteresis":
        return FP16_DEFAULTS["hysteresis"]
    field_ = FIELDS[canonical_key(name)]
    return field_.default_factory() if field_.default is dataclasses.MISSING else field_.default  # type: ignore[misc]


def _print_notice(message: str) -> None:
    print(message, file=sys.stderr)


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config from a saved config.yml mapping (canonical keys, absolute paths)."""
    config = _build(flatten_layer(values, "saved config", None), "saved config")
    config.validate()
    return config


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML (reloadable with `load_config`)."""
    write_atomically(path, yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))


def key_reference() -> list[tuple[str, str, str, str]]:
    """(section, key, default, help) for every config key, in schema order."""
    rows = []
    for f in dataclasses.fields(Config):
        missing = f.default is dataclasses.MISSING
        default = f.default_factory() if missing else f.default  # type: ignore[misc]
        rows.append(
            (f.metadata["section"], _key(f.name), _format_default(default), f.metadata["help"])
        )
    return rows


def _format_default(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value) if value.strip() != value or not value else value
    return str(value)


def model_config(
    config: Config, vocab_size: int, train_device_type: str | None = None
) -> ModelConfig:
    """The network's shape from a config and the (already padded) vocabulary size;
    `train_device_type` is where it will train (None: inference), which decides
    chunked-cross-entropy's auto: on a CPU, where it measured faster (bench/RESULTS.md)."""
    chunked = {"true": True, "false": False}.get(
        config.chunked_cross_entropy, train_device_type == "cpu"
    )
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.context_length,
        intermediate_size=mlp_width(config),
        num_kv_heads=config.num_kv_heads,
        rotary_pct=config.rotary_pct,
        rotary_emb_base=config.rotary_emb_base,
        parallel_residual=config.gpt_j_residual,
        norm=config.norm,
        layernorm_eps=config.layernorm_epsilon,
        rms_norm_eps=config.rms_norm_epsilon,
        activation=config.activation,
        norm_bias=config.use_bias_in_norms,
        attention_bias=config.use_bias_in_attn_linear,
        mlp_bias=config.use_bias_in_mlp,
        tie_word_embeddings=not config.no_weight_tying,
        hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout,
        checkpoint_activations=config.checkpoint_activations,
        chunked_cross_entropy=chunked,
        init_method=config.init_method,
        output_layer_init_method=config.output_layer_init_method,
        init_method_std=config.init_method_std,
    )


def mlp_widths(config: Config) -> tuple[int, int]:
    """(output of the MLP's first layer, input of its second) as gpt-neox sizes them.

    gpt-neox (megatron/model/transformer.py, ParallelMLP) starts from intermediate-size (4 x
    hidden-size by default); a gated MLP (swiglu) takes ⌊⅔⌋ of it for its two halves together;
    then the first layer is rounded up to a multiple of 2 x mlp-multiple-of and the second's
    input, half of that for swiglu, to a multiple of mlp-multiple-of. The two roundings can
    disagree (gpt-neox then fails on a shape mismatch): `mlp_width` builds the second's width.
    """
    width = config.intermediate_size or 4 * config.hidden_size
    inner = width
    if config.activation == "swiglu":
        width = int(width * 2 / 3)
        inner = width // 2
    multiple = config.mlp_multiple_of
    return 2 * multiple * -(-width // (2 * multiple)), multiple * -(-inner // multiple)


def mlp_width(config: Config) -> int:
    """The MLP's hidden width (each SwiGLU half's): its second layer's input, as gpt-neox
    sizes it (`mlp_widths`)."""
    return mlp_widths(config)[1]


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Embedding rows: the tokenizer's size rounded up to a multiple (fast matmuls)."""
    return -(-vocab_size // multiple) * multiple
