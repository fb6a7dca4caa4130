"""Config schema: loading, sections, aliases, merging, overrides and every error."""

from pathlib import Path

import pytest
import yaml

from neoxlab.config import (
    Config,
    config_from_dict,
    key_reference,
    load_config,
    parse_split,
    save_config,
)
from neoxlab.errors import NeoxlabError

SEED_YAML = """\
model:
  hidden-size: 256
  num-layers: 4
  num-attention-heads: 4
  max-position-embeddings: 256
training:
  micro-batch-size: 2
  global-batch-size: 8
  train-iters: 5000
  lr: 5e-4
optimizer:
  type: Adam
  lr-schedule: cosine
  warmup: 0.01
data:
  data-path: "shakespeare.jsonl"
  seq-length: 256
fp16:
  enabled: true
logging:
  log-interval: 100
checkpointing:
  save: true
  save-interval: 500
  save-dir: "checkpoints/"
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_seed_yaml_loads_verbatim(tmp_path):
    config = load_config([write(tmp_path / "seed.yml", SEED_YAML)])
    assert config.hidden_size == 256 and config.num_layers == 4
    assert config.train_micro_batch_size_per_gpu == 2 and config.train_batch_size == 8
    assert config.lr == 5e-4 and isinstance(config.lr, float)  # YAML reads 5e-4 as a string
    assert config.lr_decay_style == "cosine" and config.warmup == 0.01
    assert config.optimizer == {"type": "Adam", "params": {}}
    assert config.fp16["enabled"] is True and config.requested_precision() == "fp16"
    assert config.save == "checkpoints/" and config.save_interval == 500
    # relative data paths resolve against the config file's folder
    assert config.data_path == str((tmp_path / "shakespeare.jsonl").resolve())
    assert config.batch_geometry(1) == (2, 4, 8)
    assert config.warmup_iters() == 50


def test_flat_gpt_neox_style_and_underscores(tmp_path):
    path = write(
        tmp_path / "flat.yml",
        "hidden_size: 64\nnum_layers: 2\nnum_attention_heads: 4\n"
        "train_micro_batch_size_per_gpu: 3\n"
        "gradient_accumulation_steps: 2\nlr_decay_style: linear\n",
    )
    config = load_config([path])
    assert config.hidden_size == 64 and config.batch_geometry(1) == (3, 2, 6)
    assert config.lr_decay_style == "linear"


def test_files_merge_left_to_right_and_overrides_last(tmp_path):
    base = write(tmp_path / "base.yml", SEED_YAML)
    extra = write(
        tmp_path / "extra.yml",
        "optimizer:\n  type: AdamW\n  params:\n    betas: [0.9, 0.99]\ntrain-iters: 100\n",
    )
    config = load_config(
        [base, extra], ["train-iters=20", "optimizer.params.eps=1e-6", "fp16.enabled=false"]
    )
    assert config.train_iters == 20
    assert config.optimizer == {"type": "AdamW", "params": {"betas": [0.9, 0.99], "eps": 1e-6}}
    assert config.fp16["enabled"] is False
    assert config.lr_decay_style == "cosine"  # kept from the base file


def test_optimizer_params_lr_lifts_and_conflicts(tmp_path):
    same = write(
        tmp_path / "same.yml",
        "lr: 5e-4\noptimizer:\n  type: Adam\n  params:\n    lr: 5e-4\n    weight_decay: 0.01\n",
    )
    config = load_config([same])
    assert config.lr == 5e-4 and config.weight_decay == 0.01
    assert config.optimizer["params"] == {}
    # a later file may change lr without tripping over the earlier params.lr
    later = write(tmp_path / "later.yml", "lr: 1e-3\n")
    assert load_config([same, later]).lr == 1e-3
    clash = write(tmp_path / "clash.yml", "lr: 1e-3\noptimizer:\n  params:\n    lr: 5e-4\n")
    with pytest.raises(NeoxlabError, match="differ"):
        load_config([clash])


def test_fp16_true_shorthand_and_aliases(tmp_path):
    path = write(tmp_path / "a.yml", "fp16: true\ngas: 2\nkeep-last-k: 3\nlr-schedule: linear\n")
    config = load_config([path])
    assert config.fp16["enabled"] is True
    assert config.gradient_accumulation_steps == 2
    assert config.keep_last_n_checkpoints == 3 and config.lr_decay_style == "linear"


def test_unknown_key_names_file_and_closest_key(tmp_path):
    path = write(tmp_path / "typo.yml", "hiden-size: 64\n")
    with pytest.raises(NeoxlabError) as err:
        load_config([path])
    assert "hiden-size" in str(err.value) and "typo.yml" in str(err.value)
    assert "hidden-size" in err.value.hint


def test_unknown_key_in_override(tmp_path):
    with pytest.raises(NeoxlabError, match="train-iter"):
        load_config([], ["train-iter=3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("hidden-size=250", "not divisible by num-attention-heads"),
        ("seq-length=512", "above max-position-embeddings"),
        ("global-batch-size=7", "not divisible by micro batch"),
        ("hidden-size=abc", "must be an integer"),
        ("lr=fast", "must be a number"),
        ("use-bias=1", "unknown config key"),
        ("gpt-j-residual=maybe", "true or false"),
        ("lr=-1", "non-negative"),
        ("num-layers=0", "must be positive"),
        ("seq-length=0", "must be positive"),
        ("lr-decay-style=zigzag", "must be one of"),
        ("pos-emb=learned", "pos-emb .learned. in command-line overrides asks for"),
        ("split=1,2", "three non-negative weights"),
        ("vocab-size=2", "special tokens"),
    ],
)
def test_bad_values_are_clear_errors(tmp_path, override, message):
    base = write(tmp_path / "seed.yml", SEED_YAML)
    with pytest.raises(NeoxlabError, match=message):
        load_config([base], [override])


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = write(tmp_path / "bad.yml", "model:\n  hidden-size: [1, 2\n")
    with pytest.raises(NeoxlabError, match="not valid YAML"):
        load_config([bad])
    with pytest.raises(NeoxlabError, match="does not exist"):
        load_config([tmp_path / "missing.yml"])
    with pytest.raises(NeoxlabError, match="mapping"):
        load_config([write(tmp_path / "list.yml", "- 1\n- 2\n")])


def test_yaml_never_constructs_python_objects(tmp_path):
    evil = write(tmp_path / "evil.yml", "lr: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(NeoxlabError, match="not valid YAML"):
        load_config([evil])


def test_resolved_config_round_trips(tmp_path):
    config = load_config([write(tmp_path / "seed.yml", SEED_YAML)], ["train-iters=20"])
    save_config(config, tmp_path / "config.yml")
    saved = yaml.safe_load((tmp_path / "config.yml").read_text())
    assert saved["train-iters"] == 20 and "hidden-size" in saved
    assert config_from_dict(saved) == config
    # and it loads as an ordinary config file too
    assert load_config([tmp_path / "config.yml"]) == config


def test_cli_paths_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config([], ["data-path=corpus.jsonl"])
    assert config.data_path == str(tmp_path / "corpus.jsonl")


def test_split_parsing():
    assert parse_split("969,30,1") == pytest.approx((0.969, 0.03, 0.001))
    with pytest.raises(NeoxlabError):
        parse_split("a,b,c")


def test_warmup_iterations_and_fraction():
    assert Config(warmup=100, train_iters=1000).warmup_iters() == 100
    assert Config(warmup=0.1, train_iters=1000, lr_decay_iters=500).warmup_iters() == 50


def test_key_reference_covers_schema():
    keys = {row[1] for row in key_reference()}
    assert {"hidden-size", "train-micro-batch-size-per-gpu", "lr-decay-style", "save"} <= keys


def test_readme_key_table_matches_schema():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for _, key, _, _ in key_reference():
        assert f"`{key}`" in readme, f"README's key reference lacks {key}"


def test_override_text_with_a_colon_stays_text():
    config = load_config(
        [], ["sample-prompt=ROMEO:", "optimizer={type: SGD, params: {momentum: 0.9}}"]
    )
    assert config.sample_prompt == "ROMEO:"  # YAML alone would read {ROMEO: null}
    assert config.optimizer == {"type": "SGD", "params": {"momentum": 0.9}}
