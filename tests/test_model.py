import math

import pytest
import torch
from torch.nn import functional as F

from scratchgpt.nn.fastpath import (
    FAST_DECODE_MAX_ROWS,
    FAST_DECODE_MIN_WEIGHTS,
    HEAD_PAD_MIN_ROWS,
    HEAD_PAD_MULTIPLE,
    fast_decode,
    head,
    linear,
    set_fast_decode,
)
from scratchgpt.nn.model import PRESETS, GPTConfig, GPTModel, MultiHeadAttention

TINY = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_round_trips(name, tmp_path):
    cfg = GPTConfig.from_name(name)
    cfg.save_json(tmp_path / "c.json")
    assert GPTConfig.load_json(tmp_path / "c.json") == cfg


@pytest.mark.parametrize(
    ("name", "emb_dim", "n_layers", "n_heads"),
    [
        ("gpt2-small", 768, 12, 12),
        ("gpt2-medium", 1024, 24, 16),
        ("gpt2-large", 1280, 36, 20),
        ("gpt2-xl", 1600, 48, 25),
    ],
)
def test_gpt2_presets_have_the_books_sizes(name, emb_dim, n_layers, n_heads):
    cfg = GPTConfig.from_name(name)
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads) == (emb_dim, n_layers, n_heads)
    assert (cfg.vocab_size, cfg.context_length, cfg.drop_rate, cfg.qkv_bias) == (50257, 1024, 0.1, False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"emb_dim": 100, "n_heads": 3}, "divisible by n_heads"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"vocab_size": -5}, "vocab_size must be a positive integer"),
        ({"context_length": 1.5}, "context_length must be a positive integer"),
        ({"drop_rate": 1.0}, r"drop_rate must be a number in \[0, 1\)"),
        ({"drop_rate": -0.1}, r"drop_rate must be a number in \[0, 1\)"),
        ({"qkv_bias": "yes"}, "qkv_bias must be true or false"),
    ],
)
def test_invalid_config_is_refused_with_a_clear_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig.from_name("gpt2-small", **overrides)


def test_unknown_preset_and_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="unknown model preset 'gpt3'"):
        GPTConfig.from_name("gpt3")
    with pytest.raises(ValueError, match=r"unknown GPTConfig key\(s\) \['emb_size'\]"):
        GPTConfig.from_dict({"emb_size": 3})


def test_gpt2_small_parameter_count_matches_the_book():
    with torch.device("meta"):
        model = GPTModel(GPTConfig.from_name("gpt2-small"))
    assert model.num_parameters() == 163_009_536
    assert model.num_parameters(include_head=False) == 124_412_160
    with torch.device("meta"):
        tied = GPTModel(GPTConfig.from_name("gpt2-small", tie_weights=True))
    assert tied.num_parameters() == 124_412_160
    assert tied.out_head.weight is tied.tok_emb.weight


def test_untrained_loss_is_about_ln_vocab():
    torch.manual_seed(123)
    cfg = GPTConfig.from_name("cpu-small", context_length=64)
    model = GPTModel(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (4, 65))
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
    assert logits.shape == (4, 64, cfg.vocab_size)
    assert abs(loss - math.log(cfg.vocab_size)) < 0.5


def explicit_masked_softmax_attention(att: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """The book's formulation: scores, upper-triangular -inf mask, softmax(scores / sqrt(d)), @ V."""
    b, t, _ = x.shape
    projections = (att.W_query, att.W_key, att.W_value)
    q, k, v = (w(x).view(b, t, att.n_heads, att.head_dim).transpose(1, 2) for w in projections)
    scores = q @ k.transpose(2, 3)
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(mask, float("-inf"))
    weights = torch.softmax(scores / att.head_dim**0.5, dim=-1)
    context = (weights @ v).transpose(1, 2).reshape(b, t, -1)
    return att.out_proj(context)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_sdpa_attention_equals_explicit_masked_softmax(qkv_bias):
    torch.manual_seed(0)
    att = MultiHeadAttention(48, 48, n_heads=6, drop_rate=0.0, qkv_bias=qkv_bias).eval()
    x = torch.randn(3, 11, 48)
    torch.testing.assert_close(att(x), explicit_masked_softmax_attention(att, x), atol=1e-5, rtol=1e-5)


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    a = torch.randint(0, TINY.vocab_size, (1, 10))
    b = a.clone()
    b[0, 7:] = (b[0, 7:] + 1) % TINY.vocab_size  # change only the future
    with torch.no_grad():
        torch.testing.assert_close(model(a)[:, :7], model(b)[:, :7])


def test_dropout_is_active_in_training_and_off_in_eval():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_name("cpu-small", drop_rate=0.5, context_length=16))
    x = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert not torch.equal(model.train()(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


def test_kv_cache_incremental_logits_equal_full_forward():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**{**TINY.to_dict(), "qkv_bias": True})).eval()
    x = torch.randint(0, TINY.vocab_size, (2, 12))
    caches = model.new_kv_cache(2)
    with torch.no_grad():
        full = model(x)
        parts = [model(x[:, :5], caches), model(x[:, 5:6], caches), model(x[:, 6:12], caches)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert caches[0].pos == 12


def test_kv_cache_is_preallocated_and_written_in_place():
    model = GPTModel(TINY).eval()
    caches = model.new_kv_cache(1)
    storage = [c.keys.data_ptr() for c in caches]
    assert caches[0].keys.shape == (1, TINY.n_heads, TINY.context_length, TINY.head_dim)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), caches)
        for t in range(4, 10):
            model(torch.tensor([[t]]), caches)
    assert [c.keys.data_ptr() for c in caches] == storage


def test_too_long_input_is_a_clear_error():
    model = GPTModel(TINY)
    with pytest.raises(ValueError, match="exceeds the context length 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    caches = model.new_kv_cache(1)
    with torch.no_grad():
        model(torch.zeros(1, 16, dtype=torch.long), caches)
        with pytest.raises(ValueError, match="exceeds the context length"):
            model(torch.zeros(1, 1, dtype=torch.long), caches)


def test_last_only_head_equals_the_last_position_of_the_full_logits():
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    x = torch.randint(0, TINY.vocab_size, (2, 9))
    with torch.no_grad():
        last = model(x, last_only=True)
        full = model(x)
    assert last.shape == (2, 1, TINY.vocab_size)
    torch.testing.assert_close(last, full[:, -1:])


@pytest.mark.parametrize("rows", [1, 3, FAST_DECODE_MAX_ROWS, FAST_DECODE_MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [True, False])
def test_decode_linear_equals_f_linear(rows, bias, monkeypatch):
    monkeypatch.setattr("scratchgpt.nn.fastpath.FAST_DECODE_MIN_WEIGHTS", 0)
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 200, bias=bias)
    x = torch.randn(1, rows, 48)
    with torch.no_grad():
        torch.testing.assert_close(linear(layer, x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    old = set_fast_decode(False)
    try:
        with torch.no_grad():
            assert torch.equal(linear(layer, x), F.linear(x, layer.weight, layer.bias))
    finally:
        set_fast_decode(old)


def test_decode_linear_leaves_training_bf16_and_wrapped_layers_to_the_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(1, 1, 8, requires_grad=True)
    out = linear(layer, x)  # autograd on: the layer's own forward, with its gradient
    assert torch.equal(out, layer(x))
    out.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        bf16 = torch.nn.Linear(8, 4).to(torch.bfloat16)
        assert torch.equal(linear(bf16, x.detach().bfloat16()), bf16(x.detach().bfloat16()))
        wrapped = torch.nn.Sequential(layer)
        assert torch.equal(linear(wrapped, x.detach()), layer(x.detach()))


def test_kv_cache_decoding_with_and_without_onednn_gives_the_same_logits(monkeypatch):
    monkeypatch.setattr("scratchgpt.nn.fastpath.FAST_DECODE_MIN_WEIGHTS", 0)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**{**TINY.to_dict(), "qkv_bias": True})).eval()
    x = torch.randint(0, TINY.vocab_size, (1, 10))

    def decode():
        caches = model.new_kv_cache(1)
        with torch.inference_mode():
            return torch.cat([model(x[:, :4], caches)] + [model(x[:, i : i + 1], caches) for i in range(4, 10)], 1)

    fast = decode()
    old = set_fast_decode(False)
    try:
        plain = decode()
    finally:
        set_fast_decode(old)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def test_decoding_stacks_query_key_value_and_follows_weight_updates(monkeypatch):
    monkeypatch.setattr("scratchgpt.nn.fastpath.FAST_DECODE_MIN_WEIGHTS", 0)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**{**TINY.to_dict(), "qkv_bias": True})).eval()
    x = torch.randint(0, TINY.vocab_size, (1, 6))

    def decode_last():
        caches = model.new_kv_cache(1)
        with torch.no_grad():
            model(x[:, :5], caches)
            return model(x[:, 5:], caches)

    torch.testing.assert_close(decode_last(), model(x).detach()[:, 5:], atol=1e-5, rtol=1e-5)
    att = model.trf_blocks[0].att
    with torch.no_grad():
        stacked = fast_decode(torch.ones(1, 1, TINY.emb_dim), att.W_query)
    assert stacked == torch.backends.mkldnn.is_available()
    assert (att._fused_qkv is not None) == stacked
    with torch.no_grad():
        att.W_key.weight.mul_(2.0)  # an in-place update, as an optimizer step makes
        att.W_value.bias.add_(1.0)
    torch.testing.assert_close(decode_last(), model(x).detach()[:, 5:], atol=1e-5, rtol=1e-5)
    model.train()
    assert att._fused_qkv is None


def test_decode_linear_leaves_small_weights_to_the_default_blas():
    layer = torch.nn.Linear(32, 32)
    assert layer.weight.numel() < FAST_DECODE_MIN_WEIGHTS
    with torch.no_grad():
        assert not fast_decode(torch.ones(1, 1, 32), layer)


VOCAB_HEAD = GPTConfig(vocab_size=5003, context_length=16, emb_dim=32, n_heads=4, n_layers=1, drop_rate=0.0)


@pytest.mark.parametrize("tie", [False, True])
def test_padded_head_gives_the_same_loss_and_gradients(tie, monkeypatch):
    """`head` pads a vocabulary-sized weight for the forward product: the loss and every gradient are
    those of the plain `nn.Linear` (up to float rounding)."""
    cfg = GPTConfig(**{**VOCAB_HEAD.to_dict(), "tie_weights": tie})
    assert cfg.vocab_size >= HEAD_PAD_MIN_ROWS and cfg.vocab_size % HEAD_PAD_MULTIPLE
    torch.manual_seed(0)
    model = GPTModel(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 12))
    y = torch.randint(0, cfg.vocab_size, (3, 12))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    padded = loss_and_grads()
    monkeypatch.setattr("scratchgpt.nn.fastpath.HEAD_PAD_MIN_ROWS", 10**9)  # the plain nn.Linear
    plain = loss_and_grads()
    torch.testing.assert_close(padded[0], plain[0], atol=1e-6, rtol=1e-6)
    assert padded[1].keys() == plain[1].keys()
    for name in plain[1]:
        torch.testing.assert_close(padded[1][name], plain[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_padded_head_is_used_only_for_fp32_vocabulary_heads():
    torch.manual_seed(0)
    x = torch.randn(2, 20, 32)
    vocab = torch.nn.Linear(32, VOCAB_HEAD.vocab_size, bias=False)
    with torch.no_grad():
        torch.testing.assert_close(head(vocab, x), F.linear(x, vocab.weight), atol=1e-6, rtol=1e-6)
        assert head(vocab, x).shape == (2, 20, VOCAB_HEAD.vocab_size)
    classifier = torch.nn.Linear(32, 2)
    assert torch.equal(head(classifier, x), classifier(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(head(vocab, x), vocab(x))
