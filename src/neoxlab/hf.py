"""Hugging Face interop: export to, and start from, transformers' `GPTNeoXForCausalLM` and
`LlamaForCausalLM` folders.

model.py computes what GPTNeoXForCausalLM computes, with the parameter names transformers writes
to disk (`gpt_neox.…`, fused per-head QKV, `embed_out.weight`), so both directions copy tensors
and translate config.json. A Llama-shaped model (RMSNorm, SwiGLU, sequential residual, full
rotary) goes to and from LlamaForCausalLM through hf_llama.py, which splits and renames the
fused tensors. Loading never unpickles code: safetensors, or `torch.load` with
`weights_only=True` for old `pytorch_model.bin` files.

- export: `neoxlab export RUN --out DIR` writes model.safetensors, config.json,
  generation_config.json, tokenizer.json, tokenizer_config.json (with the chat template) and a
  model card README.md, for the class that computes the model (`export_class`); a model
  neither class computes (say RMSNorm with a GELU MLP) is refused, naming the key.
- import: an HF folder (a downloaded Pythia or Llama-architecture model) works wherever a
  checkpoint does (`generate`, `eval`), and as `init-from` in a training config (architecture,
  tokenizer and weights). So this module, not checkpoint.py (which knows only neoxlab's own
  folders), opens any trained model: `load_trained` takes a run, a checkpoint or an HF folder.
- LoRA runs (adapters.py): their checkpoints hold the adapters alone, with the init-from model's
  path and the sha256 of its weights (`base_fingerprint`); loading one rebuilds the base, checks
  the hash and merges the adapters in. `neoxlab export --adapter` writes them as a PEFT adapter
  folder instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from neoxlab import __version__
from neoxlab.adapters import LoraSpec, add_lora, load_adapter_weights, merged, save_peft_adapter
from neoxlab.atomic import give_default_permissions
from neoxlab.benchmark_results import latest_results, markdown_table, run_of
from neoxlab.checkpoint import (
    TORCH_LOAD_ERRORS,
    TrainedModel,
    is_hf_directory,
    load_checkpoint_model,
    load_model_state,
    load_weights,
    read_safetensors,
    read_state,
    refused_pickle,
    resolve_checkpoint,
)
from neoxlab.config import FIELDS, Config, config_from_dict, model_config
from neoxlab.data.chat import ChatFormat
from neoxlab.errors import NeoxlabError
from neoxlab.hf_llama import (
    from_llama_weights,
    llama_config,
    llama_mismatches,
    read_llama_config,
    to_llama_weights,
)
from neoxlab.model import GPTNeoX, ModelConfig
from neoxlab.tokenizer import load_tokenizer, save_tokenizer, token_id
from neoxlab.tracking import display_path, read_metrics

# transformers' hidden_act -> ours. Pythia trained with tanh GELU, but its config.json files say
# "gelu" (exact); we honour what the file says, as transformers does.
IMPORT_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}

# Config fields an HF folder decides (the architecture); init-from overrides them.
MODEL_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "num_kv_heads",
    "intermediate_size",
    "mlp_multiple_of",
    "max_position_embeddings",
    "rotary_pct",
    "rotary_emb_base",
    "gpt_j_residual",
    "norm",
    "layernorm_epsilon",
    "rms_norm_epsilon",
    "activation",
    "no_weight_tying",
    "use_bias_in_norms",
    "use_bias_in_attn_linear",
    "use_bias_in_mlp",
)
GPT_NEOX, LLAMA = "GPTNeoXForCausalLM", "LlamaForCausalLM"
MODEL_TYPES = {"gpt_neox": GPT_NEOX, "llama": LLAMA}  # config.json's model_type -> class
REQUIRED_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)
# Buffers older transformers saved beside Pythia's weights; model.py recomputes them.
BUFFER_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# ---- reading an HF folder --------------------------------------------------------------------


def read_hf_config(directory: Path) -> tuple[dict[str, Any], int]:
    """(neoxlab config fields, embedding rows) from a GPTNeoX or Llama config.json."""
    raw = _read_json(directory / "config.json")
    if raw.get("model_type") not in MODEL_TYPES:
        raise NeoxlabError(
            f"{directory} holds a {raw.get('model_type', 'unknown')!r} model; neoxlab runs "
            "GPT-NeoX models (model_type gpt_neox, e.g. Pythia) and Llama-architecture ones "
            "(model_type llama)"
        )
    missing = [key for key in REQUIRED_HF_KEYS if key not in raw]
    if missing:
        raise NeoxlabError(f"{directory / 'config.json'} lacks {', '.join(missing)}")
    if raw["model_type"] == "llama":
        return read_llama_config(raw, str(directory)), raw["vocab_size"]
    return _read_gpt_neox_config(raw, directory), raw["vocab_size"]


def _read_gpt_neox_config(raw: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Reads both transformers 4 (`rotary_pct`, `rotary_emb_base`) and 5 (`rope_parameters`)."""
    unsupported = []
    rope = raw.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
        unsupported.append("rope scaling")
    activation = IMPORT_ACTIVATIONS.get(raw.get("hidden_act", "gelu"))
    if activation is None:
        unsupported.append(f"hidden_act {raw['hidden_act']!r}")
    if unsupported:
        raise NeoxlabError(
            f"{directory} uses {', '.join(unsupported)}, which neoxlab's GPT-NeoX does not have"
        )
    return {
        "hidden_size": raw["hidden_size"],
        "num_layers": raw["num_hidden_layers"],
        "num_attention_heads": raw["num_attention_heads"],
        "intermediate_size": raw["intermediate_size"],
        "max_position_embeddings": raw["max_position_embeddings"],
        "rotary_pct": float(
            rope.get(
                "partial_rotary_factor",
                raw.get("partial_rotary_factor", raw.get("rotary_pct", 0.25)),
            )
        ),
        "rotary_emb_base": float(
            rope.get("rope_theta", raw.get("rope_theta", raw.get("rotary_emb_base", 10000.0)))
        ),
        "gpt_j_residual": raw.get("use_parallel_residual", True),
        "layernorm_epsilon": float(raw.get("layer_norm_eps", 1e-5)),
        "activation": activation,
        "use_bias_in_attn_linear": raw.get("attention_bias", True),
        "no_weight_tying": not raw.get("tie_word_embeddings", False),
    }


def read_hf_weights(directory: Path, model: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights of an HF folder (one file or shards) for `model`, named and laid out as
    model.py's."""
    files = _weight_files(directory)
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            weights.update(read_safetensors(file, "weights"))
        else:
            weights.update(_load_bin(file))
    if _read_json(directory / "config.json").get("model_type") == "llama":
        return from_llama_weights(weights, model)
    if "lm_head.weight" in weights:  # the in-memory name of transformers 5
        weights["embed_out.weight"] = weights.pop("lm_head.weight")
    if model.tie_word_embeddings:  # the head is the embedding: a copy of it is not a weight
        weights.pop("embed_out.weight", None)
    return {name: t for name, t in weights.items() if not name.endswith(BUFFER_SUFFIXES)}


def _weight_files(directory: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
        index = directory / f"{name}.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            return [directory / file for file in sorted(set(weight_map.values()))]
    raise NeoxlabError(
        f"{directory} has no weights (model.safetensors or pytorch_model.bin, or their shards)"
    )


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: a pickle that would construct arbitrary objects is refused
        return torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as err:
        hint = "neoxlab never unpickles code; convert it to model.safetensors"
        raise refused_pickle(path, "file", err, hint) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NeoxlabError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NeoxlabError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise NeoxlabError(f"{path} must hold a JSON object")
    return value


def _special_tokens(directory: Path) -> dict[str, str]:
    """eod-token / pad-token from tokenizer_config.json, where it names them."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    raw = _read_json(path)
    tokens = {}
    for ours, theirs in (("eod_token", "eos_token"), ("pad_token", "pad_token")):
        value = raw.get(theirs)
        if isinstance(value, dict):  # an AddedToken, as older transformers wrote them
            value = value.get("content")
        if isinstance(value, str):
            tokens[ours] = value
    return tokens


def _check_vocab(tokenizer: Tokenizer, rows: int, origin: Path) -> None:
    if tokenizer.get_vocab_size() > rows:
        raise NeoxlabError(
            f"the tokenizer of {origin} has {tokenizer.get_vocab_size()} tokens but the model's "
            f"embedding only {rows} rows",
            hint="the tokenizer belongs to another model",
        )


# ---- models to start from --------------------------------------------------------------------


@dataclass
class ModelSource:
    """A model to start from: HF folder or neoxlab checkpoint, described as config fields."""

    path: Path
    fields: dict[str, Any]  # architecture and special tokens, as Config field names
    tokenizer_file: Path
    vocab_rows: int

    @property
    def is_hf(self) -> bool:
        return is_hf_directory(self.path)

    def weights(self, model: ModelConfig) -> dict[str, torch.Tensor]:
        """The weights, for `model` (built from `fields`), in model.py's names and layout."""
        return read_hf_weights(self.path, model) if self.is_hf else load_weights(self.path)


def model_source(path: Path) -> ModelSource:
    """Describe an HF folder, a neoxlab checkpoint, or a run (its newest checkpoint)."""
    path = resolve_checkpoint(path).resolve()
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise NeoxlabError(
            f"{path} has no tokenizer.json",
            hint="save the fast tokenizer beside the model (AutoTokenizer.save_pretrained)",
        )
    if is_hf_directory(path):
        fields, rows = read_hf_config(path)
        return ModelSource(path, {**fields, **_special_tokens(path)}, tokenizer_file, rows)
    state = read_state(path)
    if state.get("base_model"):
        raise NeoxlabError(
            f"{path} holds LoRA adapters, not a whole model",
            hint=f"merge them into one first: neoxlab export {path} --out DIR, then use DIR",
        )
    config = config_from_dict(state["config"])
    fields = {name: getattr(config, name) for name in (*MODEL_FIELDS, "eod_token", "pad_token")}
    fields["max_position_embeddings"] = config.context_length
    return ModelSource(path, fields, tokenizer_file, _embedding_rows(path / "model.safetensors"))


def _embedding_rows(weights_file: Path) -> int:
    try:
        with safe_open(str(weights_file), "pt") as weights:
            return weights.get_slice("gpt_neox.embed_in.weight").get_shape()[0]
    except (SafetensorError, OSError) as err:
        raise NeoxlabError(f"checkpoint weights {weights_file} are unreadable: {err}") from None


def load_hf_model(directory: Path, device: torch.device) -> TrainedModel:
    """An HF folder ready to generate or evaluate; seq-length defaults to its full context."""
    source = model_source(directory)
    tokenizer = load_tokenizer(source.tokenizer_file)
    _check_vocab(tokenizer, source.vocab_rows, directory)
    config = config_from_dict(
        {
            **source.fields,
            "tokenizer_type": "hf",
            "vocab_file": str(source.tokenizer_file),
            "seq_length": source.fields["max_position_embeddings"],
        }
    )
    model = GPTNeoX(model_config(config, source.vocab_rows))
    load_model_state(model, source.weights(model.config), directory)
    model.to(device).eval()
    return TrainedModel(model, tokenizer, config, directory, {"step": None})


def load_trained(path: Path, device: torch.device) -> TrainedModel:
    """The model at `path` ready to generate or evaluate: a run (its newest checkpoint), a
    neoxlab checkpoint, or a Hugging Face folder."""
    checkpoint = resolve_checkpoint(path)
    if is_hf_directory(checkpoint):
        return load_hf_model(checkpoint, device)
    if read_state(checkpoint).get("base_model"):
        trained, lora = load_lora_checkpoint(checkpoint)
        trained.model = merged(lora).to(device).eval()
        return trained
    return load_checkpoint_model(checkpoint, device)


def apply_init_from(config: Config, log: Callable[[str], None] = print) -> Config:
    """The config with init-from's architecture and tokenizer (a no-op without init-from).

    A model or tokenizer key the config sets to a value other than its default and other than
    the source's is a conflict, and an error: the source decides the architecture.
    """
    if not config.init_from:
        return config
    source = model_source(_existing_init_from(Path(config.init_from)))
    wanted = {
        **source.fields,
        "tokenizer_type": "hf",
        "vocab_file": str(source.tokenizer_file),
    }
    conflicts = [
        f"{name.replace('_', '-')} {getattr(config, name)!r} (it has {value!r})"
        for name, value in wanted.items()
        if getattr(config, name) not in (value, FIELDS[name].default)
    ]
    if conflicts:
        raise NeoxlabError(
            f"the config disagrees with init-from {source.path}: {'; '.join(conflicts)}",
            hint="leave model and tokenizer keys out: init-from brings them",
        )
    updated = dataclasses.replace(config, **wanted)
    if updated.seq_length > updated.context_length:
        # max-position-embeddings is the source's to decide: seq-length is what can change
        raise NeoxlabError(
            f"init-from {source.path} has a context of {updated.context_length} tokens: "
            f"seq-length {updated.seq_length} must be at most that",
            hint=f"set seq-length={updated.context_length} or lower",
        )
    updated.validate()
    log(
        f"init-from {source.path}: {updated.num_layers} layers, hidden {updated.hidden_size}, "
        f"{updated.num_attention_heads} heads, context {updated.context_length}, "
        f"{updated.activation}, vocabulary {source.vocab_rows} rows"
    )
    return updated


def init_from_rows(config: Config) -> int | None:
    """The embedding rows of init-from's model (Pythia: 50,304), None without init-from."""
    return model_source(Path(config.init_from)).vocab_rows if config.init_from else None


def _existing_init_from(path: Path) -> Path:
    """`path`, or an error saying how to download the model it names (configs name a local
    folder, so that training never needs the Hub)."""
    if path.expanduser().exists():
        return path
    shown = display_path(path)
    # Pythia folders are named after their Hub repositories, as the configs' headers show
    repo = f"EleutherAI/{path.name}" if path.name.startswith("pythia-") else "ORG/MODEL"
    raise NeoxlabError(
        f"init-from {shown} does not exist",
        hint=f"download it once with: hf download {repo} --local-dir {shown}; or set init-from "
        "to a Hugging Face GPTNeoX or Llama folder or a neoxlab run",
    )


def init_model(
    config: Config,
    tokenizer: Tokenizer,
    device: torch.device,
    train_device_type: str | None = None,
) -> GPTNeoX:
    """The model of init-from (config already through apply_init_from) with its weights, to
    train on `train_device_type`."""
    assert config.init_from is not None
    source = model_source(Path(config.init_from))
    _check_vocab(tokenizer, source.vocab_rows, source.path)
    model = GPTNeoX(model_config(config, source.vocab_rows, train_device_type))
    if device.type == "meta":
        return model.to(device)  # shapes only: a sharded run receives the weights from rank 0
    load_model_state(model, source.weights(model.config), source.path)
    return model.to(device)


# ---- LoRA runs: adapters on an init-from model ----------------------------------------------


def init_lora_model(
    config: Config,
    tokenizer: Tokenizer,
    train_device_type: str | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Any:
    """init-from's model on the CPU, frozen, with the LoRA adapters of the config's lora-* keys
    beside it; PEFT's LoraModel (its `.model` is the GPTNeoX to train or merge)."""
    spec = LoraSpec.from_options(config)
    assert spec is not None and config.init_from  # adapters.check_lora_runtime says so
    base = init_model(config, tokenizer, torch.device("cpu"), train_device_type)
    return add_lora(base, spec, compute_dtype)


def base_fingerprint(init_from: str) -> dict[str, str]:
    """What a LoRA checkpoint records of the model its adapters belong to: the init-from path
    and the sha256 of its weight files (read once per run: seconds for Pythia-1.4B)."""
    source = model_source(Path(init_from))
    files = _weight_files(source.path) if source.is_hf else [source.path / "model.safetensors"]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return {"path": str(source.path), "sha256": digest.hexdigest()}


def check_base(recorded: dict[str, str] | None, current: dict[str, str], origin: Path) -> None:
    """Adapters fit only the weights they were trained beside: another base is an error."""
    if recorded is None:
        raise NeoxlabError(
            f"{origin} was trained without LoRA (lora-rank 0): it holds a whole model",
            hint="continue it with its own config, or start a LoRA run from it as init-from",
        )
    if recorded["sha256"] != current["sha256"]:
        raise NeoxlabError(
            f"{origin} holds LoRA adapters trained on {recorded['path']} (weights sha256 "
            f"{recorded['sha256'][:12]}...), but {current['path']} now holds other weights "
            f"(sha256 {current['sha256'][:12]}...)",
            hint="adapters only fit the model they were trained on: put that model back at "
            "that path, or start a new run",
        )


def load_lora_checkpoint(checkpoint: Path) -> tuple[TrainedModel, Any]:
    """A LoRA checkpoint on the CPU: its base model (hash checked) with its adapters loaded,
    unmerged; (what it was trained with, PEFT's LoraModel)."""
    state = read_state(checkpoint)
    config = config_from_dict(state["config"])
    check_base(state["base_model"], base_fingerprint(str(config.init_from)), checkpoint)
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    lora = init_lora_model(config, tokenizer)
    load_adapter_weights(lora.model, load_weights(checkpoint), checkpoint)
    return TrainedModel(lora.model, tokenizer, config, checkpoint, state), lora


# ---- export ----------------------------------------------------------------------------------


def export_hf(path: Path, out: Path, log: Callable[[str], None] = print) -> Path:
    """Write run / checkpoint `path` as a transformers folder `out`, for GPTNeoXForCausalLM or
    LlamaForCausalLM (`export_class`; a LoRA run's adapters merged into its base model's
    weights)."""
    _check_new_folder(out)
    trained = load_trained(path, torch.device("cpu"))
    hf_class = export_class(trained.model.config)
    out = _write_new_folder(out, lambda tmp: _fill_hf_folder(tmp, trained, path, hf_class))
    log(f"exported {trained.checkpoint} -> {out} ({hf_class})")
    return out


def export_adapter(path: Path, out: Path, log: Callable[[str], None] = print) -> Path:
    """Write a LoRA run's adapters as a PEFT adapter folder `out`, for
    `peft.PeftModel.from_pretrained(<its base model in transformers>, out)`."""
    _check_new_folder(out)
    checkpoint = resolve_checkpoint(path)
    if is_hf_directory(checkpoint) or not read_state(checkpoint).get("base_model"):
        raise NeoxlabError(
            f"{checkpoint} was not trained with LoRA: it has no adapters to export",
            hint=f"export the whole model: neoxlab export {path} --out {out}",
        )
    trained, lora = load_lora_checkpoint(checkpoint)
    if export_class(trained.model.config) != GPT_NEOX:
        # PEFT names the layers it adapts: model.py's fused ones exist in GPTNeoX only
        raise NeoxlabError(
            f"the adapters of {checkpoint} adapt fused layers (query_key_value, dense_h_to_4h) "
            "that LlamaForCausalLM does not have",
            hint=f"export the merged model: neoxlab export {path} --out {out}",
        )
    base = trained.state["base_model"]

    def fill(tmp: Path) -> None:
        save_peft_adapter(lora, tmp, base["path"])
        card = ADAPTER_CARD.format(name=path.name, version=__version__, **base)
        (tmp / "README.md").write_text(card, encoding="utf-8")

    out = _write_new_folder(out, fill)
    log(f"exported the adapters of {checkpoint} -> {out}")
    return out


def _check_new_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NeoxlabError(f"{out} already exists", hint="choose a new --out folder")


def _write_new_folder(out: Path, fill: Callable[[Path], None]) -> Path:
    """Create folder `out` (absent or empty) with what `fill` writes into a temporary folder,
    renamed to `out` once complete; a failure leaves nothing behind."""
    out = out.resolve()
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        if out.exists():
            out.rmdir()  # empty, checked before
        tmp.rename(out)
    except OSError as err:
        raise NeoxlabError(f"could not write {out}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there if something failed
    return out


def _fill_hf_folder(tmp: Path, trained: TrainedModel, path: Path, hf_class: str) -> None:
    weights_file = tmp / "model.safetensors"
    # transformers refuses safetensors files without format metadata
    save_file(export_weights(trained), str(weights_file), metadata={"format": "pt"})
    give_default_permissions(weights_file)
    _write_config_and_tokenizer(trained, tmp, hf_class)
    (tmp / "README.md").write_text(_model_card(trained, path, hf_class), encoding="utf-8")


def export_weights(
    trained: TrainedModel, weights: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The weights an export holds, by the names and layout of the class that computes the
    model (`export_class`): `weights` in neoxlab's names (a sharded run's gathered copy, a LoRA
    run's merged weights) or the model's own tensors."""
    if weights is None:
        weights = {n: t.detach().contiguous() for n, t in trained.model.state_dict().items()}
    if export_class(trained.model.config) == LLAMA:
        weights = to_llama_weights(weights, trained.model.config)
    return weights


def _write_config_and_tokenizer(trained: TrainedModel, folder: Path, hf_class: str) -> None:
    """What an export holds besides its weights and model card: config.json,
    generation_config.json, tokenizer.json and tokenizer_config.json (with the chat template)."""
    config = trained.config
    eod_id = token_id(trained.tokenizer, config.eod_token)
    pad_id = token_id(trained.tokenizer, config.pad_token)
    _write_json(folder / "config.json", _hf_config(trained, hf_class, eod_id, pad_id))
    _write_json(
        folder / "generation_config.json",
        {"bos_token_id": eod_id, "eos_token_id": eod_id, "pad_token_id": pad_id},
    )
    save_tokenizer(
        trained.tokenizer,
        folder,
        eod_token=config.eod_token,
        pad_token=config.pad_token,
        model_max_length=config.context_length,
    )
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    chat = ChatFormat(config.chat_user_name, config.chat_agent_name, config.eod_token)
    tokenizer_config["chat_template"] = chat.template()
    _write_json(folder / "tokenizer_config.json", tokenizer_config)


def transformers_model(
    trained: TrainedModel, weights: dict[str, torch.Tensor] | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) as transformers loads `neoxlab export`'s folder of `trained`
    (AutoConfig, AutoTokenizer, the class config.json names), built in memory: the export's
    config and tokenizer files pass through a temporary folder, the weights do not. They are
    `weights` (a sharded run's gathered copy) or the model's own tensors, shared, not copied
    (a Llama-shaped model's fused projections are split into Llama's).

    Going through the export's files and transformers' own loading is what makes a tool that
    takes a transformers model (lm-eval's HFLM) score exactly what it scores on the export."""
    import transformers

    with tempfile.TemporaryDirectory(prefix="neoxlab-hf-") as folder:
        _write_config_and_tokenizer(trained, Path(folder), export_class(trained.model.config))
        config = transformers.AutoConfig.from_pretrained(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model_class = getattr(transformers, config.architectures[0])
    weights = export_weights(trained, weights)
    model, loading = model_class.from_pretrained(
        None, config=config, state_dict=weights, output_loading_info=True
    )
    # transformers fills a weight it was not given with random values, and only warns
    wrong = [f"{kind} {sorted(map(str, names))[:3]}" for kind, names in loading.items() if names]
    if wrong:
        raise NeoxlabError(
            f"the weights of {trained.checkpoint} do not fit {model_class.__name__}: "
            + "; ".join(wrong)
        )
    model.config.name_or_path = str(trained.checkpoint)  # what lm-eval reports as the model
    return model.eval(), tokenizer


def export_class(model: ModelConfig) -> str:
    """The transformers class that computes `model`: GPTNeoXForCausalLM or LlamaForCausalLM.

    A mixture of the two (RMSNorm with a GELU MLP, grouped key/value heads with LayerNorm, ...)
    is neither, and an error naming the key that keeps it from the closer of the two."""
    candidates = {GPT_NEOX: _gpt_neox_mismatches(model), LLAMA: llama_mismatches(model)}
    for hf_class, mismatches in candidates.items():
        if not mismatches:
            return hf_class
    closer = min(candidates, key=lambda name: len(candidates[name]))
    key, value, wanted = candidates[closer][0]
    raise NeoxlabError(
        f"neither {GPT_NEOX} nor {LLAMA} computes this model: the closer, {closer}, needs "
        f"{key} {_yaml(wanted)}, this model has {key} {_yaml(value)}",
        hint="export supports the two architectures as transformers has them; the checkpoint "
        "itself works with neoxlab generate and eval",
    )


def _gpt_neox_mismatches(model: ModelConfig) -> list[tuple[str, Any, Any]]:
    """(config key, this model's value, what GPTNeoXForCausalLM needs) for what it lacks."""
    mismatches = []
    if model.norm != "layernorm":
        mismatches.append(("norm", model.norm, "layernorm"))
    if model.activation not in EXPORT_ACTIVATIONS:
        mismatches.append(("activation", model.activation, " or ".join(EXPORT_ACTIVATIONS)))
    if model.num_kv_heads != model.num_attention_heads:
        heads = model.num_attention_heads
        mismatches.append(("num-kv-heads", model.num_kv_heads, heads))
    if not model.norm_bias:
        mismatches.append(("use-bias-in-norms", False, True))
    if not model.mlp_bias:
        mismatches.append(("use-bias-in-mlp", False, True))
    return mismatches


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _hf_config(trained: TrainedModel, hf_class: str, eod_id: int, pad_id: int) -> dict[str, Any]:
    """config.json for `hf_class`, readable by transformers 5 (rope_parameters) and 4."""
    model = trained.model.config
    architecture = llama_config(model) if hf_class == LLAMA else _gpt_neox_config(model)
    return {
        **architecture,
        "initializer_range": 0.02,
        "bos_token_id": eod_id,
        "eos_token_id": eod_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _gpt_neox_config(model: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": [GPT_NEOX],
        "model_type": "gpt_neox",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "intermediate_size": model.intermediate_size,
        "max_position_embeddings": model.max_position_embeddings,
        "hidden_act": EXPORT_ACTIVATIONS[model.activation],
        "layer_norm_eps": model.layernorm_eps,
        "use_parallel_residual": model.parallel_residual,
        "rotary_pct": model.rotary_pct,
        "rotary_emb_base": model.rotary_emb_base,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": model.rotary_emb_base,
            "partial_rotary_factor": model.rotary_pct,
        },
        "attention_bias": model.attention_bias,
        "tie_word_embeddings": model.tie_word_embeddings,
        "hidden_dropout": model.hidden_dropout,
        "attention_dropout": model.attention_dropout,
    }


# The fixed text of an export's README.md: front matter and title above the training facts, and
# the usage section below the facts, metrics and chat format.
MODEL_CARD_HEAD = """\
---
library_name: transformers
pipeline_tag: text-generation
tags: [{model_type}, neoxlab]
---

# {name}

A model trained with neoxlab {version} and exported to transformers' `{hf_class}`.

## Training
"""
MODEL_CARD_USE = """
## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

Training config (as resolved by neoxlab):

```json
{config_json}
```
"""


ADAPTER_CARD = """\
---
library_name: peft
tags: [gpt_neox, neoxlab, lora]
---

# {name} (LoRA adapters)

LoRA adapters trained with neoxlab {version} on the base model `{path}` (sha256 of its weights
`{sha256}`). They fit that model only.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained("{path}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
```
"""


def _model_card(trained: TrainedModel, source: Path, hf_class: str) -> str:
    """README.md of an export: what was trained, on what, how well, and how to load it."""
    config = trained.config
    model_type = next(key for key, name in MODEL_TYPES.items() if name == hf_class)
    head = MODEL_CARD_HEAD.format(
        name=source.name, version=__version__, hf_class=hf_class, model_type=model_type
    )
    parts = [
        head,
        *_training_facts(trained),
        *_final_metrics_table(trained),
        *_benchmark_table(trained),
        *_chat_format_section(config),
        MODEL_CARD_USE.format(config_json=json.dumps(config.to_dict(), indent=2)),
    ]
    return "\n".join(parts)


def _training_facts(trained: TrainedModel) -> list[str]:
    config, state = trained.config, trained.state
    facts = [
        f"- architecture: {config.num_layers} layers, hidden size {config.hidden_size}, "
        f"{config.num_attention_heads} heads ({trained.model.config.num_kv_heads} key/value), "
        f"{config.norm}, {config.activation} MLP, context {config.context_length}, "
        f"{trained.model.num_parameters():,} parameters",
    ]
    if config.init_from:
        facts.append(f"- started from: `{config.init_from}`")
    if config.lora_rank:
        facts.append(
            f"- LoRA rank {config.lora_rank}, alpha {config.lora_alpha}"
            f"{', 4-bit base (QLoRA)' if config.load_in_4bit else ''}: adapters merged into "
            "these weights"
        )
    if config.data_path:
        facts.append(f"- data: `{config.data_path}` ({config.data_format})")
    return [
        *facts,
        f"- steps: {state.get('step')}, tokens: {state.get('tokens')}, "
        f"sequence length {config.seq_length}",
        f"- optimizer: {config.optimizer['type']}, lr {config.lr}, "
        f"schedule {config.lr_decay_style}, warmup {config.warmup}",
    ]


def _final_metrics_table(trained: TrainedModel) -> list[str]:
    metrics = _final_metrics(trained.checkpoint, trained.state.get("step"))
    if not metrics:
        return []
    rows = [f"| {key} | {value:.4f} |" for key, value in metrics.items()]
    return ["", "## Final metrics", "", "| metric | value |", "|---|---|", *rows]


def _benchmark_table(trained: TrainedModel) -> list[str]:
    """The run's latest lm-eval results at or before the checkpoint's step (neoxlab eval --tasks,
    eval-tasks), as a table."""
    step, run_dir = trained.state.get("step"), run_of(trained.checkpoint)
    latest = latest_results(run_dir, step) if step is not None and run_dir else None
    if latest is None:
        return []
    benchmark_step, results = latest
    return [
        "",
        "## Benchmarks",
        "",
        f"lm-evaluation-harness {results.get('lm_eval_version', '')} at step "
        f"{benchmark_step}, {_benchmark_setting(results)}:",
        "",
        *markdown_table(results),
    ]


def _benchmark_setting(results: dict[str, Any]) -> str:
    shots = sorted({str(n) for n in results.get("n-shot", {}).values()})
    limit = results.get("config", {}).get("limit")
    documents = "all documents" if limit is None else f"at most {limit:g} documents per task"
    return f"{'/'.join(shots) or '0'}-shot, {documents}"


def _chat_format_section(config: Config) -> list[str]:
    if config.data_format != "chat":
        return []
    chat = ChatFormat(config.chat_user_name, config.chat_agent_name, config.eod_token)
    example = chat.text([], add_generation_prompt=True)
    return [
        "",
        "## Chat format",
        "",
        f"`{config.chat_user_name}: ...` and `{example} ...` turns separated by a blank line, "
        f"the reply ending with `{config.eod_token}`; tokenizer_config.json carries it as a "
        "chat template (`tokenizer.apply_chat_template`).",
    ]


def _final_metrics(checkpoint: Path, step: int | None) -> dict[str, float]:
    """The checkpoint's last evaluation, from its run (runs/<run>/checkpoints/step_N)."""
    run_dir = checkpoint.parent.parent
    if step is None or not (run_dir / "metrics.jsonl").is_file():
        return {}
    evaluations = [m for m in read_metrics(run_dir) if "val/loss" in m and m["step"] <= step]
    if not evaluations:
        return {}
    last = evaluations[-1]
    return {k: v for k, v in last.items() if k.startswith("val/") and isinstance(v, float)}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
