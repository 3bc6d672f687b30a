"""LoRA (scratchgpt.nn.lora): the book's parameter count, parity with the book's layer, training, merging,
adapter-only state dicts, validation."""

from __future__ import annotations

import math

import pytest
import torch
from llms_from_scratch.appendix_e import LinearWithLoRA, replace_linear_with_lora
from torch import nn
from torch.nn import functional as F

from scratchgpt.nn.checkpoint import load_model, save_model
from scratchgpt.nn.lora import (
    LoRALinear,
    apply_lora,
    count_parameters,
    load_lora_state_dict,
    lora_config,
    lora_layers,
    lora_state_dict,
    merge_lora,
    trainable_parameters,
)
from scratchgpt.nn.model import GPTConfig, GPTModel
from scratchgpt.train.optim import build_adamw

TINY = GPTConfig(vocab_size=61, context_length=12, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)
BLOCK_LINEARS = ["att.W_query", "att.W_key", "att.W_value", "att.out_proj", "ff.layers.0", "ff.layers.2"]
LINEARS_PER_BLOCK = len(BLOCK_LINEARS)


def tiny_model(seed: int = 0, **overrides: object) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.from_dict({**TINY.to_dict(), **overrides})).eval()


def tokens(seed: int = 1, batch: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (batch, TINY.context_length), generator=generator)


def randomize_adapters(model: nn.Module, seed: int = 2, std: float = 0.2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.A.copy_(torch.randn(layer.A.shape, generator=generator) * std)
            layer.B.copy_(torch.randn(layer.B.shape, generator=generator) * std)


def test_gpt2_small_classifier_has_the_books_trainable_count() -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        model = GPTModel(GPTConfig.from_name("gpt2-small", qkv_bias=True, tie_weights=True))
        model.out_head = nn.Linear(in_features=768, out_features=2)  # the book's spam-classifier head
    assert count_parameters(model) == (124_441_346, 124_441_346)  # the book's count before LoRA

    assert apply_lora(model, rank=16, alpha=16) == 2_666_528
    assert count_parameters(model) == (2_666_528, 124_441_346 + 2_666_528)
    assert len(lora_layers(model)) == 12 * LINEARS_PER_BLOCK + 1
    assert isinstance(model.out_head, LoRALinear)
    assert model.out_head.A.shape == (768, 16) and model.out_head.B.shape == (16, 2)


def test_fresh_adapters_leave_the_output_unchanged() -> None:
    model, x = tiny_model(), tokens()
    with torch.no_grad():
        before = model(x)
        apply_lora(model, rank=4, alpha=8)
        after = model(x)
    assert all(torch.count_nonzero(layer.A) > 0 for layer in lora_layers(model).values())
    assert torch.equal(after, before)


def test_layer_matches_the_books_linear_with_lora() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(24, 12)
    rank, alpha = 4, 8.0
    ours = LoRALinear(linear, rank, alpha)
    book = LinearWithLoRA(linear, rank, alpha / rank)  # the book scales by alpha alone, we by alpha / rank
    with torch.no_grad():
        ours.A.copy_(torch.randn(24, rank))
        ours.B.copy_(torch.randn(rank, 12))
        book.lora.A.copy_(ours.A)
        book.lora.B.copy_(ours.B)
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        expected = book(x)
        torch.testing.assert_close(ours(x), expected, atol=1e-6, rtol=0)
        assert (expected - linear(x)).abs().max() > 1.0  # the adapter path really contributes


def test_model_matches_the_books_replace_linear_with_lora() -> None:
    rank, alpha = 4, 8
    ours, book = tiny_model(), tiny_model()
    apply_lora(ours, rank, alpha)
    randomize_adapters(ours)
    replace_linear_with_lora(book, rank, alpha / rank)
    book_state = {k.replace(".lora.", "."): v for k, v in book.state_dict().items()}
    assert book_state.keys() == ours.state_dict().keys()
    book.load_state_dict({k.replace(".A", ".lora.A").replace(".B", ".lora.B"): v for k, v in ours.state_dict().items()})
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), book(x), atol=1e-6, rtol=0)


def train_steps(model: nn.Module, steps: int = 4) -> None:
    optimizer = build_adamw(
        model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8, device=torch.device("cpu")
    )
    x = tokens(seed=3)
    model.train()
    for _ in range(steps):
        logits = model(x[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def test_training_moves_only_the_adapters_and_merging_keeps_the_function() -> None:
    model = tiny_model()
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    base_params = dict(model.named_parameters())
    apply_lora(model, rank=4, alpha=8)
    adapters_before = {k: v.clone() for k, v in lora_state_dict(model).items()}

    train_steps(model)

    for name, param in base_params.items():  # the wrapped layers kept their very tensors, unchanged
        assert torch.equal(param, base[name]), name
    for name, tensor in lora_state_dict(model).items():
        assert not torch.equal(tensor, adapters_before[name]), name
        assert torch.count_nonzero(tensor) == tensor.numel(), name
    x = tokens()
    with torch.no_grad():
        unmerged = model(x)
        assert merge_lora(model) is model
        merged = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert not lora_layers(model)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert not any(name.endswith((".A", ".B")) for name in model.state_dict())
    assert count_parameters(model)[1] == sum(t.numel() for t in base.values())
    assert model.trf_blocks[0].att.out_proj.bias is base_params["trf_blocks.0.att.out_proj.bias"]
    for name, param in model.named_parameters():
        if name.endswith("weight") and not name.endswith("_emb.weight"):
            assert not torch.equal(param, base[name]), name  # the trained update was folded in


def test_tied_head_stays_tied_and_merges_into_an_untied_checkpoint(tmp_path) -> None:
    model = tiny_model(tie_weights=True)
    embedding = model.tok_emb.weight
    embedding_before = embedding.detach().clone()
    _, total_before = count_parameters(model)

    trainable = apply_lora(model, rank=2, alpha=4)

    assert model.out_head.linear.weight is embedding
    assert count_parameters(model) == (trainable, total_before + trainable)
    train_steps(model)
    assert torch.equal(embedding, embedding_before)
    x = tokens()
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
    assert model.tok_emb.weight is embedding and torch.equal(embedding, embedding_before)
    assert model.out_head.weight is not embedding
    assert model.cfg.tie_weights is False  # so that save_model stores the merged head

    save_model(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path).eval()(x), unmerged, atol=1e-5, rtol=0)


def test_targets_select_layers_by_qualified_name_pattern() -> None:
    model = tiny_model()
    trainable = apply_lora(model, rank=2, alpha=2, targets=["trf_blocks.*.att.W_query", "out_head"])
    assert sorted(lora_layers(model)) == ["out_head", "trf_blocks.0.att.W_query", "trf_blocks.1.att.W_query"]
    emb = TINY.emb_dim
    assert trainable == 2 * 2 * (emb + emb) + 2 * (emb + TINY.vocab_size)
    assert isinstance(model.trf_blocks[0].att.W_key, nn.Linear)
    assert not model.trf_blocks[0].att.W_key.weight.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0, "alpha": 1}, "rank must be an integer >= 1"),
        ({"rank": -2, "alpha": 1}, "rank must be an integer >= 1"),
        ({"rank": 2.0, "alpha": 1}, "rank must be an integer >= 1"),
        ({"rank": True, "alpha": 1}, "rank must be an integer >= 1"),
        ({"rank": 2, "alpha": 0}, "alpha must be a finite number > 0"),
        ({"rank": 2, "alpha": -1.5}, "alpha must be a finite number > 0"),
        ({"rank": 2, "alpha": math.nan}, "alpha must be a finite number > 0"),
        ({"rank": 2, "alpha": "16"}, "alpha must be a finite number > 0"),
        ({"rank": 2, "alpha": 2, "targets": "no_such_layer"}, r"\['no_such_layer'\] match no nn.Linear"),
        ({"rank": 2, "alpha": 2, "targets": ["out_head", "*.W_querry"]}, r"\['\*.W_querry'\] match no nn.Linear"),
        ({"rank": 2, "alpha": 2, "targets": ["tok_emb"]}, r"\['tok_emb'\] match no nn.Linear"),
        ({"rank": 2, "alpha": 2, "targets": []}, "targets is empty"),
    ],
)
def test_bad_arguments_are_refused_and_leave_the_model_untouched(kwargs: dict, message: str) -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        apply_lora(model, **kwargs)
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_lora_is_applied_once_and_merged_only_when_present() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="holds no LoRA layers to merge"):
        merge_lora(model)
    apply_lora(model, rank=2, alpha=2)
    with pytest.raises(ValueError, match="already holds LoRA layers"):
        apply_lora(model, rank=2, alpha=2)
    with pytest.raises(ValueError, match="has no nn.Linear"):
        apply_lora(nn.Sequential(nn.ReLU()), rank=2, alpha=2)


def test_adapter_state_dict_round_trips_into_a_fresh_wrap() -> None:
    trained = tiny_model()
    apply_lora(trained, rank=3, alpha=6, targets="trf_blocks.*")
    randomize_adapters(trained)
    adapters = {k: v.clone() for k, v in lora_state_dict(trained).items()}
    config = lora_config(trained)
    targets = [f"trf_blocks.{i}.{name}" for i in range(TINY.n_layers) for name in BLOCK_LINEARS]
    assert config == {"rank": 3, "alpha": 6, "targets": targets}
    assert set(adapters) == {f"{t}.{m}" for t in config["targets"] for m in "AB"}
    assert set(adapters) <= set(trained.state_dict())
    assert sum(t.numel() for t in adapters.values()) == trainable_parameters(trained)
    x = tokens()
    with torch.no_grad():
        expected = trained(x)

    for load in (load_lora_state_dict, lambda m, s: m.load_state_dict(s, strict=False)):
        fresh = tiny_model()  # the same base weights (same seed), new random A and zero B
        apply_lora(fresh, **config)
        with torch.no_grad():
            assert not torch.allclose(fresh(x), expected)
            result = load(fresh, adapters)
            if result is not None:  # load_state_dict(strict=False): only base weights missing
                assert not result.unexpected_keys and not set(result.missing_keys) & set(adapters)
            torch.testing.assert_close(fresh(x), expected, atol=0, rtol=0)


def test_load_lora_state_dict_is_strict() -> None:
    model = tiny_model()
    apply_lora(model, rank=2, alpha=2)
    adapters = lora_state_dict(model)
    with pytest.raises(ValueError, match=r"missing \['out_head.B'\]"):
        load_lora_state_dict(model, {k: v for k, v in adapters.items() if k != "out_head.B"})
    with pytest.raises(ValueError, match=r"unexpected \['tok_emb.weight'\]"):
        load_lora_state_dict(model, {**adapters, "tok_emb.weight": model.tok_emb.weight})
    with pytest.raises(ValueError, match="out_head.A: \\(16, 3\\), expected \\(16, 2\\)"):
        load_lora_state_dict(model, {**adapters, "out_head.A": torch.zeros(16, 3)})


def test_project_optimizer_sees_only_the_adapters() -> None:
    model = tiny_model()
    trainable = apply_lora(model, rank=2, alpha=2)
    optimizer = build_adamw(
        model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8, device=torch.device("cpu")
    )
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    adapters = [p for layer in lora_layers(model).values() for p in (layer.A, layer.B)]
    assert {id(p) for p in optimized} == {id(p) for p in adapters}
    assert len(optimized) == len(adapters) == 2 * (TINY.n_layers * LINEARS_PER_BLOCK + 1)
    assert sum(p.numel() for p in optimized) == trainable


def test_bf16_autocast_runs_the_adapter_in_bf16_and_keeps_fp32_gradients() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 8), rank=4, alpha=4)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(x), atol=0.1, rtol=0.02)
    out.float().sum().backward()
    assert layer.A.grad is not None and layer.A.grad.dtype == torch.float32
    assert layer.B.grad is not None and layer.B.grad.dtype == torch.float32
