import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from scratchgpt.nn.checkpoint import CheckpointError, load_book_state_dict, load_hf_gpt2, load_model, save_model
from scratchgpt.nn.model import GPTConfig, GPTModel

CFG = GPTConfig(vocab_size=113, context_length=20, emb_dim=48, n_heads=4, n_layers=3, drop_rate=0.0)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (biases and norms too), so a swapped tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def tokens(cfg: GPTConfig, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, cfg.context_length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_round_trip(tmp_path, tie):
    cfg = GPTConfig(**{**CFG.to_dict(), "tie_weights": tie})
    model = GPTModel(cfg).eval()
    randomize_(model, 1)
    save_model(model, tmp_path / "ckpt", extra={"training": {"lr": 0.1}})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config == {"model": cfg.to_dict(), "training": {"lr": 0.1}}
    assert ("out_head.weight" in load_file(tmp_path / "ckpt" / "model.safetensors")) is not tie
    loaded = load_model(tmp_path / "ckpt")
    x = tokens(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    if tie:
        assert loaded.out_head.weight is loaded.tok_emb.weight


def test_load_model_returns_the_model_in_eval_mode(tmp_path):
    cfg = GPTConfig(**{**CFG.to_dict(), "drop_rate": 0.5})
    save_model(GPTModel(cfg), tmp_path)
    loaded = load_model(tmp_path)
    assert not any(m.training for m in loaded.modules())
    x = tokens(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x), loaded(x))  # dropout 0.5 is off
        assert not torch.equal(loaded.train()(x), loaded(x))  # and on again after .train()


def test_save_leaves_no_temporary_files_and_replaces_atomically(tmp_path):
    model = GPTModel(CFG)
    save_model(model, tmp_path)
    save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    save_model(GPTModel(CFG), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["emb_dim"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatch for tok_emb.weight: checkpoint has \(113, 48\), "
                       r"model expects \(113, 64\)"):
        load_model(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    save_model(GPTModel(CFG), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["trf_blocks.1.att.W_key.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): trf_blocks.1.att.W_key.weight"):
        load_model(tmp_path)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="weights file not found"):
        load_hf_gpt2(tmp_path / "nope.safetensors")


# --- parity with Hugging Face transformers -----------------------------------------------------


def hf_model(tie: bool = True):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=CFG.vocab_size,
        n_positions=CFG.context_length,
        n_embd=CFG.emb_dim,
        n_layer=CFG.n_layers,
        n_head=CFG.n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    randomize_(model, 2)
    return model


@pytest.mark.parametrize("as_file", [False, True])
def test_hf_gpt2_logit_parity(tmp_path, as_file):
    reference = hf_model()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_gpt2(tmp_path / "model.safetensors" if as_file else tmp_path, n_heads=CFG.n_heads).eval()
    assert ours.cfg.qkv_bias and ours.cfg.tie_weights
    assert ours.cfg.drop_rate == 0.0
    x = tokens(CFG)
    with torch.no_grad():
        expected = reference(x).logits
        got = ours(x)
    assert (got - expected).abs().max().item() <= 1e-4


def test_hf_gpt2_untied_head_parity(tmp_path):
    reference = hf_model(tie=False)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_gpt2(tmp_path).eval()
    assert not ours.cfg.tie_weights
    x = tokens(CFG)
    with torch.no_grad():
        assert (ours(x) - reference(x).logits).abs().max().item() <= 1e-4


def test_hf_file_alone_needs_heads_for_a_non_openai_width(tmp_path):
    hf_model().save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="cannot tell the number of heads"):
        load_hf_gpt2(tmp_path / "model.safetensors")


def test_hf_checkpoint_missing_a_tensor_names_it(tmp_path):
    hf_model().save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["transformer.h.2.mlp.c_fc.bias"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor h\.2\.mlp\.c_fc\.bias"):
        load_hf_gpt2(tmp_path)


@pytest.mark.parametrize("what", ["directory", "weights file", "weights without config"])
def test_hf_loader_refuses_our_own_checkpoint_and_points_to_load_model(tmp_path, what):
    save_model(GPTModel(CFG), tmp_path / "ckpt")
    if what == "weights without config":
        (tmp_path / "ckpt" / "config.json").unlink()
    path = tmp_path / "ckpt" if what == "directory" else tmp_path / "ckpt" / "model.safetensors"
    with pytest.raises(CheckpointError) as info:
        load_hf_gpt2(path)
    assert "is a scratchgpt checkpoint" in str(info.value)
    assert f"scratchgpt.nn.checkpoint.load_model('{tmp_path / 'ckpt'}')" in str(info.value)


# --- parity with the book's own GPTModel (llms-from-scratch) -----------------------------------


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_book_state_dict_logit_parity(tmp_path, qkv_bias):
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    cfg = GPTConfig(**{**CFG.to_dict(), "qkv_bias": qkv_bias})
    torch.manual_seed(0)
    book = ch04.GPTModel({**cfg.to_dict()}).eval()
    randomize_(book, 3)
    torch.save(book.state_dict(), tmp_path / "model.pth")
    ours = load_book_state_dict(tmp_path / "model.pth", cfg).eval()
    x = tokens(cfg)
    with torch.no_grad():
        assert (ours(x) - book(x)).abs().max().item() <= 1e-4


def test_book_state_dict_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"tok_emb.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights only load failed|unsupported global"):
        load_book_state_dict(tmp_path / "evil.pth", CFG)


def test_book_state_dict_with_wrong_config_names_the_shapes():
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    book = ch04.GPTModel(CFG.to_dict())
    wrong = GPTConfig(**{**CFG.to_dict(), "vocab_size": 100})
    with pytest.raises(CheckpointError, match=r"tok_emb.weight: checkpoint has \(113, 48\), model expects \(100, 48\)"):
        load_book_state_dict(book.state_dict(), wrong)
