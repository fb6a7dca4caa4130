"""Fuzzing the two places where outside files enter: the config loader (YAML files and KEY=VALUE
overrides) and the GPT-NeoX .idx/.bin reader, each through what consumes it. Whatever the input,
the only exception is NeoxlabError (the CLI's one-line error). test_indexed.py fuzzes the reader
with random and mutated bytes; here the index is well-formed in layout and wrong in content, and
goes on through the training data path."""

import contextlib

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from neoxlab import neox_compat
from neoxlab.config import ALIASES, FIELDS, SECTIONS, load_config, model_config
from neoxlab.data.indexed import DTYPE_BY_CODE, HEADER, MAGIC
from neoxlab.data.prepare import build_samplers, prepare_data
from neoxlab.errors import NeoxlabError
from neoxlab.loss_scale import build_grad_scaler
from neoxlab.memory import describe
from neoxlab.model import GPTNeoX, ModelConfig
from neoxlab.optim import build_optimizer, lr_at
from neoxlab.tokenizer import train_char

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# ---- the config loader ----------------------------------------------------------------------

GPT_NEOX_KEYS = [*neox_compat.TRANSLATED_KEYS, *neox_compat.MERGED_KEYS, *neox_compat.UNSUPPORTED]
KEYS = sorted({key.replace("_", "-") for key in [*FIELDS, *ALIASES, *GPT_NEOX_KEYS, "save-dir"]})
# children of the mapping keys (optimizer, fp16, bf16, zero-optimization) and of optimizer.params
CHILDREN = [
    *("type", "params", "enabled", "stage", "loss_scale", "min_loss_scale", "hysteresis"),
    *("initial_scale_power", "loss_scale_window", "betas", "eps", "momentum", "muon_lr"),
    *("ns_steps", "nesterov", "weight_decay", "lr", "lr-schedule", "warmup"),
    *("consecutive_hysteresis", "auto_cast"),
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["1e-3", "nan", "-inf", "0", "true", "~nobody/x", "Adam", "Muon", "Lion"]),
    st.sampled_from(["cosine", "wsd", "gelu_tanh", "fp16", "cpu", "969,30,1", "1,0,0", "1e30"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from([*CHILDREN, *KEYS]), inner, max_size=3),
    ),
    max_leaves=6,
)
SECTION = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4)
DOCUMENTS = st.dictionaries(
    st.sampled_from([*KEYS, *SECTIONS, "unknown-key"]), st.one_of(VALUES, SECTION), max_size=6
)
OVERRIDES = st.lists(
    st.tuples(
        st.sampled_from([*KEYS, *(f"{a}.{b}" for a in ("optimizer", "fp16") for b in CHILDREN)]),
        st.text(max_size=8) | st.sampled_from(["[1, 2]", "{a: 1}", "-1", "null", "[]", "1e400"]),
    ).map("=".join),
    max_size=4,
)
MODEL = GPTNeoX(
    ModelConfig(
        vocab_size=128,
        hidden_size=16,
        num_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
    )
)


def use(config) -> None:
    """What the trainer and --dry-run derive from a config, without data or training."""
    config.requested_precision()
    config.batch_geometry(1)
    config.batch_geometry(8)
    for step in (0, 1, config.train_iters // 2, config.train_iters, config.train_iters + 3):
        lr_at(step, config)
    build_optimizer(MODEL, config)
    build_grad_scaler("cpu", True, config.fp16)
    model_config(config, 128)
    describe(config).lines()


def load_and_use(files=(), overrides=()) -> None:
    with contextlib.suppress(NeoxlabError):
        use(load_config(files, overrides, notice=lambda _: None))


@FUZZ
@given(document=DOCUMENTS, overrides=OVERRIDES)
# bugs this fuzzing found, kept as fixed examples
@example(document={"optimizer": {"optimizer": []}}, overrides=[])
@example(document={"vocab-file": "~nosuchuser/tokenizer.json"}, overrides=[])
@example(document={"optimizer": {"params": {"betas": 5}}}, overrides=[])
@example(document={"fp16": {"enabled": "false"}}, overrides=[])
@example(document={"fp16": {"initial_scale_power": 2000}}, overrides=[])
@example(document={"hidden-size": 4_000_000_000, "num-attention-heads": 1}, overrides=[])
@example(document={"num-layers": 10**8}, overrides=[])
@example(document={}, overrides=["valid-data-paths=\x00"])
def test_config_files_and_overrides(tmp_path, document, overrides):
    path = tmp_path / "fuzz.yml"
    path.write_text(yaml.safe_dump(document))
    load_and_use([path], overrides)


@FUZZ
@given(text=st.text(max_size=200))
@example(text="lr: !!python/object/apply:os.system ['echo pwned']\n")
@example(text="a: &x [*x]\n")
@example(text="- 1\n- 2\n")
def test_arbitrary_yaml_text(tmp_path, text):
    path = tmp_path / "fuzz.yml"
    path.write_text(text, encoding="utf-8")
    load_and_use([path])


# ---- the .idx / .bin reader, through the training data path ---------------------------------

VOCAB = 19  # the char tokenizer below: 2 special tokens and 17 characters


@st.composite
def indexed_files(draw):
    """An index laid out as the format says (so the reader gets past its length checks) with
    contents that may be anything: dtype code, sizes, pointers, document index, token ids."""
    code = draw(st.sampled_from(sorted(DTYPE_BY_CODE)) | st.integers(0, 255))
    itemsize = DTYPE_BY_CODE.get(code, np.dtype(np.uint8)).itemsize
    count = draw(st.integers(0, 6))
    sizes = draw(
        st.lists(
            st.integers(0, 12) | st.integers(-(2**31), 2**31 - 1), min_size=count, max_size=count
        )
    )
    if draw(st.booleans()):  # pointers consistent with the sizes, or anything
        pointers = np.concatenate([[0], np.cumsum(np.array(sizes, np.int64) * itemsize)])[:count]
    else:
        pointers = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=count, max_size=count))
    doc_idx = draw(
        st.lists(st.integers(-2, count + 2), max_size=count + 2) | st.just(list(range(count + 1)))
    )
    version = draw(st.sampled_from([1, 1, 1, 2]))
    index = b"".join(
        [
            HEADER.pack(MAGIC, version, code, count, len(doc_idx)),
            np.array(sizes, "<i4").tobytes(),
            np.array(pointers, "<i8").tobytes(),
            np.array(doc_idx, "<i8").tobytes(),
        ]
    )
    total = sum(max(size, 0) for size in sizes if size < 4096)
    if code in DTYPE_BY_CODE and draw(st.booleans()):  # token ids of the right length
        dtype = DTYPE_BY_CODE[code]
        low = max(-3, int(np.iinfo(dtype).min))
        ids = draw(st.lists(st.integers(low, VOCAB + 3), min_size=total, max_size=total))
        tokens = np.array(ids, dtype).tobytes()
    else:
        tokens = draw(st.binary(max_size=64))
    return index, tokens


@pytest.fixture
def char_tokenizer(tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer = train_char("abcdefghijklmnopq")
    assert tokenizer.get_vocab_size() == VOCAB
    tokenizer.save(str(path))
    return path


@FUZZ
@given(files=indexed_files(), seq_length=st.integers(1, 6))
def test_indexed_data_through_training_batches(tmp_path, char_tokenizer, files, seq_length):
    index, tokens = files
    prefix = tmp_path / "fuzz"
    prefix.with_name("fuzz.idx").write_bytes(index)
    prefix.with_name("fuzz.bin").write_bytes(tokens)
    overrides = [
        f"data-path={prefix}",
        f"vocab-file={char_tokenizer}",
        "tokenizer-type=hf",
        f"seq-length={seq_length}",
        "split=1,1,0",
    ]
    try:
        config = load_config([], overrides)
        data = prepare_data(config, log=lambda _: None)
        train_sampler, validation_sampler = build_samplers(config, data)
    except NeoxlabError:
        return
    vocab = data.tokenizer.get_vocab_size()
    for sampler in (train_sampler, validation_sampler):
        batch = sampler.batch(0, 3)
        assert batch.inputs.shape == (3, seq_length)
        assert int(batch.inputs.min()) >= 0 and int(batch.inputs.max()) < vocab
