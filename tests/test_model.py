import pytest
import torch

import neoxlab.model
from neoxlab.errors import NeoxlabError
from neoxlab.model import GPTNeoX, ModelConfig

VOCAB = 96


def tiny_model(seed: int = 0, **overrides) -> GPTNeoX:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        intermediate_size=48,
    )
    torch.manual_seed(seed)
    model = GPTNeoX(ModelConfig(**(fields | overrides)))
    # the GPT-NeoX init zeroes biases and sets LayerNorms to identity; randomise them so the
    # parity tests also check that every bias and norm parameter is used the way HF uses it
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def random_tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy_without_cache(model: GPTNeoX, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = input_ids
    for _ in range(steps):
        logits, _ = model(tokens)
        tokens = torch.cat((tokens, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return tokens[:, input_ids.size(1) :]


def generated(model: GPTNeoX, input_ids: torch.Tensor, steps: int, **kwargs) -> torch.Tensor:
    return torch.stack(list(model.generate(input_ids, steps, **kwargs)), dim=1)


def hf_copy(model: GPTNeoX):
    """transformers.GPTNeoXForCausalLM with our weights, loaded strictly."""
    transformers = pytest.importorskip("transformers")
    config = model.config
    hf_config = transformers.GPTNeoXConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        # transformers 5 folds these legacy names into rope_parameters
        # {"partial_rotary_factor", "rope_theta"}; transformers 4 stores them as they are
        rotary_pct=config.rotary_pct,
        rotary_emb_base=config.rotary_emb_base,
        use_parallel_residual=config.parallel_residual,
        hidden_act={"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[config.activation],
        layer_norm_eps=config.layernorm_eps,
        attention_bias=True,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    hf_model = transformers.GPTNeoXForCausalLM(hf_config)
    state = model.state_dict()
    # transformers 5 names the head `lm_head` in memory (files on disk still say `embed_out`)
    if "lm_head.weight" in hf_model.state_dict():
        state["lm_head.weight"] = state.pop("embed_out.weight")
    hf_model.load_state_dict(state, strict=True)
    return hf_model.eval()


@pytest.mark.parametrize(
    ("parallel_residual", "rotary_pct", "activation"),
    [
        (True, 0.25, "gelu"),
        (True, 1.0, "gelu_tanh"),
        (False, 0.25, "gelu_tanh"),
        (False, 1.0, "gelu"),
    ],
)
def test_matches_hugging_face(parallel_residual, rotary_pct, activation):
    model = tiny_model(
        parallel_residual=parallel_residual, rotary_pct=rotary_pct, activation=activation
    )
    hf_model = hf_copy(model)
    input_ids = random_tokens(2, 24)
    labels = input_ids.clone()
    labels[0, :5] = -100
    # HF shifts labels inside the loss; our targets are already the next tokens
    targets = torch.cat((labels[:, 1:], torch.full((2, 1), -100)), dim=1)

    logits, loss = model(input_ids, targets)
    with torch.no_grad():
        hf_out = hf_model(input_ids, labels=labels)

    assert (logits - hf_out.logits).abs().max() <= 1e-5
    assert loss.item() == pytest.approx(hf_out.loss.item(), abs=1e-5)


def test_state_dict_has_only_hf_names():
    names = set(tiny_model(num_layers=1).state_dict())
    layer = "gpt_neox.layers.0."
    expected = {"gpt_neox.embed_in.weight", "embed_out.weight"}
    expected |= {f"gpt_neox.final_layer_norm.{p}" for p in ("weight", "bias")}
    for module in (
        "input_layernorm",
        "post_attention_layernorm",
        "attention.query_key_value",
        "attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    ):
        expected |= {f"{layer}{module}.weight", f"{layer}{module}.bias"}
    assert names == expected


def test_position_ids_shift_rotary():
    model = tiny_model()
    input_ids = random_tokens(1, 8)
    default, _ = model(input_ids)
    explicit, _ = model(input_ids, position_ids=torch.arange(8))
    shifted, _ = model(input_ids, position_ids=torch.arange(8)[None] + 5)
    assert torch.equal(default, explicit)
    assert not torch.allclose(default, shifted)


def test_greedy_with_cache_equals_without_cache_and_hf():
    model = tiny_model()
    prompt = random_tokens(2, 7)
    ours = generated(model, prompt, 20, temperature=0)
    assert torch.equal(ours, greedy_without_cache(model, prompt, 20))

    hf_tokens = hf_copy(model).generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=20,
        min_new_tokens=20,
        pad_token_id=0,
    )
    assert torch.equal(ours, hf_tokens[:, prompt.size(1) :])


def test_sampling_is_reproducible_and_filters():
    model = tiny_model()
    prompt = random_tokens(2, 5)

    def sample(seed: int, **kwargs) -> torch.Tensor:
        return generated(model, prompt, 20, generator=torch.Generator().manual_seed(seed), **kwargs)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    greedy = generated(model, prompt, 20, temperature=0)
    assert torch.equal(sample(0, top_k=1), greedy)
    assert torch.equal(sample(0, top_p=1e-6), greedy)
    assert not torch.equal(sample(0, top_p=0.9), greedy)


def test_eos_stops_when_every_row_has_finished():
    model = tiny_model()
    prompt = random_tokens(2, 5, seed=3)
    reference = generated(model, prompt, 30, temperature=0)
    eos = int(reference[0, 2])
    first_eos = [
        row.tolist().index(eos) if eos in row.tolist() else len(row) - 1 for row in reference
    ]
    steps = max(first_eos) + 1

    out = generated(model, prompt, 30, temperature=0, eos_token_id=eos)

    assert out.size(1) == steps < 30
    row, other = (0, 1) if first_eos[0] < first_eos[1] else (1, 0)
    assert (out[row, first_eos[row] :] == eos).all()  # a finished row keeps yielding eos
    assert torch.equal(out[other], reference[other, :steps])


def test_prompt_longer_than_context_is_an_error():
    model = tiny_model(max_position_embeddings=16)
    with pytest.raises(NeoxlabError, match="prompt is 17 tokens, longer than the model's context"):
        model.generate(random_tokens(1, 17), 5)  # raised at the call, before iterating
    with pytest.raises(NeoxlabError, match="temperature"):
        model.generate(random_tokens(1, 4), 5, temperature=-1)


def test_generation_past_context_slides_the_window():
    context = 16
    model = tiny_model(max_position_embeddings=context)
    prompt = random_tokens(2, context)  # fills the cache: the second step must slide
    out = generated(model, prompt, 40, temperature=0)
    assert out.shape == (2, 40)

    # after the slide the model sees the last context // 2 tokens at positions 0..
    window = torch.cat((prompt, out[:, :1]), dim=1)[:, -context // 2 :]
    assert torch.equal(out[:, 1:5], greedy_without_cache(model, window, 4))


def test_ignored_targets_count_as_dropped():
    model = tiny_model()
    input_ids = random_tokens(2, 12)
    targets = random_tokens(2, 12, seed=2)
    keep = torch.rand(2, 12, generator=torch.Generator().manual_seed(0)) > 0.4
    logits, loss = model(input_ids, targets.masked_fill(~keep, -100))
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("dropout", ["hidden_dropout", "attention_dropout"])
def test_dropout_only_while_training(dropout):
    model = tiny_model(**{dropout: 0.5})
    input_ids = random_tokens(2, 8)
    assert torch.equal(model(input_ids)[0], model(input_ids)[0])
    model.train()
    assert not torch.equal(model(input_ids)[0], model(input_ids)[0])


def test_activation_checkpointing_same_loss_and_grads(monkeypatch):
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(neoxlab.model, "checkpoint", counting_checkpoint)
    input_ids, targets = random_tokens(2, 16), random_tokens(2, 16, seed=2)
    results = []
    for checkpoint_activations in (False, True):
        model = tiny_model(
            checkpoint_activations=checkpoint_activations, hidden_dropout=0.1, attention_dropout=0.1
        ).train()
        torch.manual_seed(42)  # same dropout masks; checkpoint replays the RNG on recompute
        _, loss = model(input_ids, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))

    assert len(calls) == 2  # one per layer, only in the checkpointed run
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss_plain, loss_ckpt)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(hidden_size=30, num_attention_heads=4), "not divisible"),
        (dict(num_layers=0), "num-layers must be positive"),
        (dict(rotary_pct=0.0), "rotary-pct must be in"),
        (dict(hidden_size=16, rotary_pct=0.25), "even number"),
        (dict(activation="relu"), "unknown activation"),
    ],
)
def test_bad_config_is_an_error(overrides, message):
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4) | overrides
    with pytest.raises(NeoxlabError, match=message):
        ModelConfig(**fields)


def test_init_is_gpt_neox_and_deterministic():
    model = tiny_model(num_layers=4)
    torch.manual_seed(0)
    fresh = GPTNeoX(model.config)
    torch.manual_seed(0)
    again = GPTNeoX(model.config)
    for (name, param), other in zip(fresh.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(param, other), name
    layer = fresh.gpt_neox.layers[0]
    assert torch.equal(layer.attention.query_key_value.bias, torch.zeros(96))
    assert torch.equal(layer.input_layernorm.weight, torch.ones(32))
    # small_init std sqrt(2 / (5 * 32)) = 0.112; wang_init std 2 / (4 * sqrt(32)) = 0.088
    assert fresh.embed_out.weight.std().item() == pytest.approx(0.112, rel=0.1)
    assert layer.mlp.dense_4h_to_h.weight.std().item() == pytest.approx(0.088, rel=0.1)


def test_pythia_160m_counts():
    config = ModelConfig(
        vocab_size=50304,
        hidden_size=768,
        num_layers=12,
        num_attention_heads=12,
        max_position_embeddings=2048,
    )
    with torch.device("meta"):
        model = GPTNeoX(config)
    assert model.num_parameters() == 162_322_944
    assert model.num_parameters(exclude_embeddings=True) == 162_322_944 - 50304 * 768
    non_embedding = 162_322_944 - 50304 * 768
    assert model.flops_per_token(2048) == 6 * non_embedding + 12 * 12 * 768 * 2048
