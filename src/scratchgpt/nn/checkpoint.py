"""Model checkpoints (safetensors + config.json) and converters for foreign GPT-2 weights.

- `save_model` / `load_model`: our own directory layout, written atomically.
- `load_hf_gpt2`: a Hugging Face GPT-2 checkpoint (Conv1D weights, fused `c_attn`, tied head).
- `load_book_state_dict`: a `state_dict` saved by the book's `GPTModel` (e.g. its `model.pth`).

Nothing here unpickles arbitrary objects: weights come from safetensors, or from `torch.load` with
`weights_only=True`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from scratchgpt.nn.model import GPTConfig, GPTModel
from scratchgpt.plumbing.fileio import atomic_path, write_json

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not fit the model."""


def save_model(model: GPTModel, directory: str | os.PathLike[str], *, extra: dict[str, Any] | None = None) -> None:
    """Write `model.safetensors` and `config.json` (`{"model": <GPTConfig>, **extra}`) into `directory`.

    Each file is written under a temporary name and renamed, so an interrupted save never leaves a
    truncated file behind. A tied output head is stored once (as the token embedding).
    """
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_weights:
        del state["out_head.weight"]
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(directory / CONFIG_FILE, {"model": model.cfg.to_dict(), **(extra or {})})


def load_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The whole `config.json` of a checkpoint directory (CheckpointError naming it if it is unreadable)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in checkpoint directory {Path(directory)}")
    config = read_json(path)
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{path} has no 'model' section")
    return config


def read_json(path: str | os.PathLike[str]) -> Any:
    """A JSON file of a checkpoint; CheckpointError naming it when it is truncated or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt (not valid JSON: {exc})") from exc


def load_model(
    directory: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    *,
    config_overrides: dict[str, Any] | None = None,
) -> GPTModel:
    """Load a model saved with `save_model`, in eval mode (dropout off): call `.train()` to train it.

    `config_overrides` may change non-shape fields such as `drop_rate`.
    """
    directory = Path(directory)
    cfg = GPTConfig.from_dict({**load_config(directory)["model"], **(config_overrides or {})})
    model = GPTModel(cfg)
    load_weights(model, read_safetensors(directory / WEIGHTS_FILE))
    return model.to(map_location).eval()


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """All tensors of a safetensors file, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except SafetensorError as exc:  # a header that is cut short or does not cover the file
        raise CheckpointError(f"{path} is truncated or corrupt (not a readable safetensors file: {exc})") from exc


def load_weights(model: GPTModel, tensors: Mapping[str, Tensor]) -> None:
    """Copy `tensors` into `model`, insisting on exactly the expected names and shapes.

    A tied output head may be absent (it is the token embedding).
    """
    expected = model.state_dict()
    optional = {"out_head.weight"} if model.cfg.tie_weights else set()
    missing = sorted(set(expected) - set(tensors) - optional)
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor(s): {', '.join(missing[:10])}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"checkpoint has unexpected tensor(s): {', '.join(unexpected[:10])}")
    for name, target in expected.items():  # in model order, so the first bad tensor is named
        if name in tensors and tensors[name].shape != target.shape:
            raise CheckpointError(
                f"shape mismatch for {name}: checkpoint has {tuple(tensors[name].shape)}, "
                f"model expects {tuple(target.shape)}"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)


# --- the book's GPTModel ---------------------------------------------------------------------

_BOOK_BUFFER = re.compile(r"^trf_blocks\.\d+\.att\.mask$")  # the book's causal-mask buffer


def load_book_state_dict(
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Tensor], config: GPTConfig
) -> GPTModel:
    """A model built from a state_dict of the book's `GPTModel` (same parameter names as ours).

    A path is read with `torch.load(..., weights_only=True)`; the book's mask buffers are dropped.
    """
    if isinstance(path_or_state_dict, Mapping):
        state = dict(path_or_state_dict)
    else:
        path = Path(path_or_state_dict)
        if not path.is_file():
            raise CheckpointError(f"state_dict file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    state = {k: v for k, v in state.items() if not _BOOK_BUFFER.match(k)}
    model = GPTModel(config)
    load_weights(model, state)
    return model


def load_book_state_dict_inferred(path: str | os.PathLike[str], *, n_heads: int | None = None) -> GPTModel:
    """`load_book_state_dict` with the config read off the tensors' shapes (heads: `n_heads`, else
    OpenAI's for that width); dropout 0.1 as in the book's configs."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or "tok_emb.weight" not in state or "pos_emb.weight" not in state:
        raise CheckpointError(f"{path} is not a state_dict of the book's GPTModel (no tok_emb/pos_emb weights)")
    vocab_size, emb_dim = state["tok_emb.weight"].shape
    heads = n_heads or _HF_HEADS_BY_WIDTH.get(emb_dim)
    if heads is None:
        raise CheckpointError(f"cannot tell the number of heads of {path} (width {emb_dim}): pass n_heads")
    config = GPTConfig(
        vocab_size=vocab_size,
        context_length=state["pos_emb.weight"].shape[0],
        emb_dim=emb_dim,
        n_heads=heads,
        n_layers=len({int(m.group(1)) for k in state if (m := re.match(r"trf_blocks\.(\d+)\.", k))}),
        qkv_bias="trf_blocks.0.att.W_query.bias" in state,
        tie_weights="out_head.weight" not in state,
    )
    return load_book_state_dict(state, config)


# --- Hugging Face GPT-2 ------------------------------------------------------------------------

_HF_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}


def load_hf_gpt2(
    path: str | os.PathLike[str], *, drop_rate: float | None = None, n_heads: int | None = None
) -> GPTModel:
    """Convert a Hugging Face GPT-2 checkpoint into a `GPTModel`.

    `path` is a directory with `config.json` and `model.safetensors`, or the safetensors file alone
    (its sizes are then read from the tensor shapes; `n_heads` defaults to the OpenAI model of that
    width). `drop_rate` defaults to the checkpoint's `resid_pdrop` (0.1 for OpenAI's models).
    Our own checkpoints (written by `save_model`) are refused with a CheckpointError naming `load_model`.
    """
    path = Path(path)
    weights_file = path / WEIGHTS_FILE if path.is_dir() else path
    config_file = weights_file.parent / CONFIG_FILE
    tensors = _strip_hf_prefix(read_safetensors(weights_file))
    hf_config = read_json(config_file) if config_file.is_file() else {}
    if _is_ours(tensors, hf_config):
        raise CheckpointError(
            f"{path} is a scratchgpt checkpoint (written by save_model), not a Hugging Face GPT-2 one: "
            f"load it with scratchgpt.nn.checkpoint.load_model('{weights_file.parent}')"
        )
    cfg = _config_from_hf(tensors, hf_config, drop_rate=drop_rate, n_heads=n_heads, source=weights_file)
    model = GPTModel(cfg)
    load_weights(model, _hf_to_ours(tensors, cfg))
    return model


def _is_ours(tensors: Mapping[str, Tensor], config: dict[str, Any]) -> bool:
    """Our own layout: `config.json` with a "model" section, or our tensor names."""
    return isinstance(config.get("model"), dict) or "tok_emb.weight" in tensors


def _strip_hf_prefix(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """`GPT2LMHeadModel` prefixes the body with `transformer.`; `GPT2Model` does not."""
    return {k.removeprefix("transformer."): v for k, v in tensors.items()}


def _config_from_hf(
    tensors: dict[str, Tensor],
    hf: dict[str, Any],
    *,
    drop_rate: float | None,
    n_heads: int | None,
    source: Path,
) -> GPTConfig:
    for name in ("wte.weight", "wpe.weight"):
        if name not in tensors:
            raise CheckpointError(f"{source} is not a GPT-2 checkpoint: tensor {name} is missing")
    vocab_size, emb_dim = tensors["wte.weight"].shape
    context_length = tensors["wpe.weight"].shape[0]
    n_layers = len({int(m.group(1)) for k in tensors if (m := re.match(r"h\.(\d+)\.", k))})
    heads = n_heads or hf.get("n_head") or _HF_HEADS_BY_WIDTH.get(emb_dim)
    if heads is None:
        raise CheckpointError(f"cannot tell the number of heads of {source}: pass n_heads")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{source}: activation {activation!r} is not GPT-2's tanh GELU")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise CheckpointError(f"{source}: layer_norm_epsilon {eps} differs from the model's 1e-5")
    tied = "lm_head.weight" not in tensors or hf.get("tie_word_embeddings", True)
    return GPTConfig(
        vocab_size=vocab_size,
        context_length=context_length,
        emb_dim=emb_dim,
        n_heads=heads,
        n_layers=n_layers,
        drop_rate=hf.get("resid_pdrop", 0.1) if drop_rate is None else drop_rate,
        qkv_bias=True,
        tie_weights=bool(tied),
    )


def _hf_to_ours(tensors: dict[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """Rename HF GPT-2 tensors to ours; Conv1D weights are (in, out), so they are transposed."""

    def take(name: str) -> Tensor:
        if name not in tensors:
            raise CheckpointError(f"GPT-2 checkpoint is missing tensor {name}")
        return tensors[name]

    ours = {"tok_emb.weight": take("wte.weight"), "pos_emb.weight": take("wpe.weight")}
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        q_w, k_w, v_w = take(h + "attn.c_attn.weight").t().chunk(3, dim=0)
        q_b, k_b, v_b = take(h + "attn.c_attn.bias").chunk(3, dim=0)
        ours |= {
            b + "att.W_query.weight": q_w,
            b + "att.W_key.weight": k_w,
            b + "att.W_value.weight": v_w,
            b + "att.W_query.bias": q_b,
            b + "att.W_key.bias": k_b,
            b + "att.W_value.bias": v_b,
            b + "att.out_proj.weight": take(h + "attn.c_proj.weight").t(),
            b + "att.out_proj.bias": take(h + "attn.c_proj.bias"),
            b + "ff.layers.0.weight": take(h + "mlp.c_fc.weight").t(),
            b + "ff.layers.0.bias": take(h + "mlp.c_fc.bias"),
            b + "ff.layers.2.weight": take(h + "mlp.c_proj.weight").t(),
            b + "ff.layers.2.bias": take(h + "mlp.c_proj.bias"),
            b + "norm1.scale": take(h + "ln_1.weight"),
            b + "norm1.shift": take(h + "ln_1.bias"),
            b + "norm2.scale": take(h + "ln_2.weight"),
            b + "norm2.shift": take(h + "ln_2.bias"),
        }
    ours["final_norm.scale"] = take("ln_f.weight")
    ours["final_norm.shift"] = take("ln_f.bias")
    if not cfg.tie_weights:
        ours["out_head.weight"] = take("lm_head.weight")
    return ours
