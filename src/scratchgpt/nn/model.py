"""The GPT-2-style model of the book's chapter 4, readable in one sitting.

Module and parameter names follow the book (`tok_emb`, `pos_emb`, `trf_blocks`, `att.W_query`,
`ff.layers`, `norm1.scale`, ...), so a state_dict saved by the book's `GPTModel` loads directly.
Attention runs through `scaled_dot_product_attention`; inference can use a pre-allocated KV cache. The
matrix products go through `scratchgpt.nn.fastpath` (oneDNN for decoding, a padded output head).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from scratchgpt.nn.fastpath import fast_decode, head, linear, onednn_linear
from scratchgpt.plumbing.fileio import write_json
from scratchgpt.plumbing.params import check_bool, check_int, check_ratio


@dataclass(frozen=True)
class GPTConfig:
    """Architecture of a GPT model. Validated on construction."""

    vocab_size: int = 50257
    """Number of token ids (GPT-2's BPE has 50,257)."""
    context_length: int = 1024
    """Longest sequence the positional embedding covers."""
    emb_dim: int = 768
    """Width of the residual stream."""
    n_heads: int = 12
    """Attention heads per layer; must divide `emb_dim`."""
    n_layers: int = 12
    """Number of transformer blocks."""
    drop_rate: float = 0.1
    """Dropout on embeddings, attention weights and shortcut branches, in [0, 1)."""
    qkv_bias: bool = False
    """Bias on the query/key/value projections (True for OpenAI's GPT-2 weights)."""
    tie_weights: bool = False
    """Share the output head's weight with the token embedding (as OpenAI's GPT-2 does)."""

    def __post_init__(self) -> None:
        try:
            self._validate()
        except ValueError as exc:  # name the class: a GPTConfig is also built outside params.yaml
            raise ValueError(f"GPTConfig.{exc}") from None

    def _validate(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            check_int(self, name, 1)
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        check_ratio(self, "drop_rate", zero=True)
        check_bool(self, "qkv_bias")
        check_bool(self, "tie_weights")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named preset (`gpt2-small`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `cpu-small`), optionally
        with some fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_json(self, path: str | os.PathLike[str]) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> GPTConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


_GPT2 = {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.1, "qkv_bias": False}
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": {**_GPT2, "emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium": {**_GPT2, "emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large": {**_GPT2, "emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl": {**_GPT2, "emb_dim": 1600, "n_layers": 48, "n_heads": 25},
    # Small enough to pretrain on the-verdict in about a minute on 2 CPU cores.
    "cpu-small": {**_GPT2, "context_length": 128, "emb_dim": 128, "n_layers": 4, "n_heads": 4},
}


class KVCache:
    """Keys and values of one attention layer, pre-allocated for the whole context window.

    New entries are written in place at `pos`; attention reads the prefix `[:pos]`, so decoding a
    token allocates nothing.
    """

    def __init__(
        self,
        batch_size: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch_size, n_heads, max_len, head_dim)
        # Only `[:pos]` is ever read, so the buffers need no zeroing (at gpt2-small, 6 MB a layer).
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.pos = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store `keys`/`values` (B, H, T, D) after the cached ones; return all cached so far."""
        end = self.pos + keys.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.keys[:, :, self.pos : end] = keys
        self.values[:, :, self.pos : end] = values
        self.pos = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def reset(self) -> None:
        self.pos = 0


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with dropout on the attention weights."""

    def __init__(self, d_in: int, d_out: int, n_heads: int, drop_rate: float, qkv_bias: bool = False) -> None:
        super().__init__()
        if d_out % n_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.head_dim = d_out // n_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.drop_rate = drop_rate
        self._fused_qkv: tuple[tuple[int, ...], Tensor, Tensor | None] | None = None

    def forward(self, x: Tensor, cache: KVCache | None = None, mask: Tensor | None = None) -> Tensor:
        """`mask` (B, 1, T, S), True where a query may attend to a key, replaces the causal mask
        (left-padded batches, see `GPTModel.forward`)."""
        b, t, _ = x.shape
        q, k, v = (self._split_heads(y, b, t) for y in self._project(x))
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.append(k, v)
        dropout = self.drop_rate if self.training else 0.0
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        elif start == 0:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif t == 1:  # one new token may attend to everything cached: no mask needed
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # a chunk after a cached prefix: row i sees keys up to start + i
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return linear(self.out_proj, out.transpose(1, 2).reshape(b, t, -1))

    def _project(self, x: Tensor) -> tuple[Tensor, ...]:
        """Queries, keys and values of `x`; when decoding, by one matrix-vector product with the three
        weights stacked (one pass over memory and one parallel region instead of three)."""
        layers = (self.W_query, self.W_key, self.W_value)
        if fast_decode(x, *layers) and (fused := self._stacked_qkv()) is not None:
            return onednn_linear(x, *fused).split(self.W_query.out_features, dim=-1)
        return tuple(linear(w, x) for w in layers)

    def _stacked_qkv(self) -> tuple[Tensor, Tensor | None] | None:
        """The query, key and value weights (and biases) stacked, a copy (7 MB a layer at gpt2-small)
        kept until the module is put in training mode and rebuilt whenever a weight changed
        (another tensor, or an in-place update such as an optimizer step). None, so unstacked, for
        inference tensors (they keep no version to check) and for biases on some projections only."""
        layers = (self.W_query, self.W_key, self.W_value)
        biases = [w.bias for w in layers]
        params = [w.weight for w in layers] + [b for b in biases if b is not None]
        if any(p.is_inference() for p in params) or len(params) not in (3, 6):
            return None
        key = tuple(v for p in params for v in (p.data_ptr(), p._version))
        if self._fused_qkv is None or self._fused_qkv[0] != key:
            bias = torch.cat(biases) if len(params) == 6 else None
            self._fused_qkv = (key, torch.cat([w.weight for w in layers]), bias)
        return self._fused_qkv[1], self._fused_qkv[2]

    def train(self, mode: bool = True) -> MultiHeadAttention:
        """`nn.Module.train`; training mode drops the stacked weights (training would make them stale)."""
        if mode:
            self._fused_qkv = None
        return super().train(mode)

    def _split_heads(self, x: Tensor, b: int, t: int) -> Tensor:
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)


class LayerNorm(nn.Module):
    """Layer normalisation with the book's parameter names (`scale`, `shift`) and eps 1e-5."""

    def __init__(self, emb_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GELU, tanh approximation (the form GPT-2 was trained with)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """Position-wise MLP with a 4x expansion."""

    def __init__(self, emb_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(emb_dim, 4 * emb_dim), GELU(), nn.Linear(4 * emb_dim, emb_dim))

    def forward(self, x: Tensor) -> Tensor:
        up, act, down = self.layers
        return linear(down, act(linear(up, x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ff(norm(x)), dropout on each branch."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.att = MultiHeadAttention(cfg.emb_dim, cfg.emb_dim, cfg.n_heads, cfg.drop_rate, cfg.qkv_bias)
        self.ff = FeedForward(cfg.emb_dim)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: Tensor, cache: KVCache | None = None, mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, mask))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """Token + absolute position embeddings, `n_layers` transformer blocks, final norm, output head."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*(TransformerBlock(cfg) for _ in range(cfg.n_layers)))
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight

    def forward(
        self,
        idx: Tensor,
        caches: list[KVCache] | None = None,
        *,
        last_only: bool = False,
        left_pad: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, vocab) for token ids `idx` (B, T). With `caches` (one per layer, from
        `new_kv_cache`), `idx` continues the cached sequence and its keys/values are appended.
        `last_only` computes the output head for the last position only (B, 1, vocab): generation needs
        no more, and the head is the largest matmul. `left_pad` (B,) says how many leading tokens of each
        row (of the whole sequence, cached part included) are padding: positions then count from each
        row's first real token and no real token attends to padding, so a row computes what it would
        alone (batched generation of prompts of different lengths)."""
        start = caches[0].pos if caches else 0
        t = idx.shape[1]
        if start + t > self.cfg.context_length:
            raise ValueError(
                f"sequence of {start + t} tokens exceeds the context length {self.cfg.context_length}"
            )
        pos = torch.arange(start, start + t, device=idx.device)
        mask = None
        if left_pad is not None:
            mask = _padded_causal_mask(left_pad, start, t)
            pos = (pos.unsqueeze(0) - left_pad.unsqueeze(1)).clamp(min=0)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))
        for i, block in enumerate(self.trf_blocks):
            x = block(x, caches[i] if caches else None, mask)
        if last_only:
            x = x[:, -1:]
        return head(self.out_head, self.final_norm(x))

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """Empty per-layer caches on the model's device and dtype."""
        weight = self.tok_emb.weight  # not out_head's: a LoRA-wrapped head has no `.weight`
        return [
            KVCache(
                batch_size,
                self.cfg.n_heads,
                max_len or self.cfg.context_length,
                self.cfg.head_dim,
                dtype=weight.dtype,
                device=weight.device,
            )
            for _ in range(self.cfg.n_layers)
        ]

    def num_parameters(self, *, include_head: bool = True) -> int:
        """Parameters counted once each (a tied head is not counted twice)."""
        total = sum(p.numel() for p in self.parameters())
        if not include_head and not self.cfg.tie_weights:
            total -= self.out_head.weight.numel()
        return total



def _padded_causal_mask(left_pad: Tensor, start: int, t: int) -> Tensor:
    """(B, 1, t, start + t) attention mask: causal, padding keys hidden; each query also sees itself,
    so a padding query's row is never empty (its output is unused, but must not be NaN)."""
    queries = torch.arange(start, start + t, device=left_pad.device).unsqueeze(1)
    keys = torch.arange(start + t, device=left_pad.device).unsqueeze(0)
    visible = (keys <= queries).unsqueeze(0) & (keys >= left_pad.view(-1, 1, 1))
    return (visible | (keys == queries).unsqueeze(0)).unsqueeze(1)
