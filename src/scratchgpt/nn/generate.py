"""Text generation: greedy decoding, temperature, top-k and top-p sampling, with or without a KV cache.

`generate_stream` yields one token column at a time; `generate` collects them. Both crop the input
to the model's context window the way the book does, so cached and uncached greedy decoding give the
same tokens even once the sequence outgrows the window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from scratchgpt.nn.model import GPTModel, KVCache


def generate(
    model: GPTModel,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Return `idx` (B, T) followed by up to `max_new_tokens` generated ids (B, T + n).

    `temperature == 0` is greedy (argmax); otherwise logits are filtered by `top_k`, divided by the
    temperature, filtered by `top_p` (nucleus) and sampled with `generator`. Generation stops early
    once every row has produced `eos_id`; the final `eos_id` is not appended (as in the book), and a
    row that finished before the others is padded with `eos_id`.
    """
    out = torch.empty(idx.shape[0], idx.shape[1] + max_new_tokens, dtype=idx.dtype, device=idx.device)
    out[:, : idx.shape[1]] = idx
    n = idx.shape[1]
    for token in generate_stream(
        model,
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
        use_cache=use_cache,
        generator=generator,
    ):
        out[:, n : n + 1] = token
        n += 1
    return out[:, :n]


@torch.inference_mode()
def generate_stream(
    model: GPTModel,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yield the next token ids (B, 1) one step at a time; see `generate` for the arguments."""
    _check_args(idx, max_new_tokens, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    try:
        context = model.cfg.context_length
        caches = model.new_kv_cache(idx.shape[0]) if use_cache else None
        seq = idx
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits = _next_logits(model, seq, context, caches)
            token = next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if eos_id is not None:
                token = token.masked_fill(finished.unsqueeze(1), eos_id)
                finished |= token.squeeze(1) == eos_id
                if finished.all():
                    return
            seq = torch.cat([seq, token], dim=1)
            yield token
    finally:
        model.train(was_training)


@torch.inference_mode()
def generate_batch(
    model: GPTModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """The tokens generated after each prompt (up to `max_new_tokens`, ending before `eos_id`).

    Prompts of different lengths run together: left-padded with `pad_id`, with a padding mask and
    per-row positions (`GPTModel.forward(left_pad=...)`) and one KV cache, so each row gets the tokens
    it would get alone. A prompt longer than the context leaves room for keeps its last
    `context_length - max_new_tokens` tokens.
    """
    if not prompts:
        return []
    keep = model.cfg.context_length - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the context "
                         f"of {model.cfg.context_length} tokens")  # fmt: skip
    rows = [list(p)[-keep:] for p in prompts]
    if any(not r for r in rows):
        raise ValueError("every prompt needs at least one token")
    device = model.tok_emb.weight.device
    width = max(len(r) for r in rows)
    idx = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        idx[i, width - len(r) :] = torch.tensor(r, dtype=torch.long, device=device)
    left_pad = torch.tensor([width - len(r) for r in rows], device=device)
    _check_args(idx, max_new_tokens, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    try:
        caches = model.new_kv_cache(len(rows), width + max_new_tokens)
        logits = model(idx, caches, last_only=True, left_pad=left_pad)[:, -1]
        tokens = []
        finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            tokens.append(token)
            if eos_id is not None:
                finished |= token.squeeze(1) == eos_id
                if finished.all():
                    break
            if step + 1 < max_new_tokens:
                logits = model(token, caches, left_pad=left_pad)[:, -1]
    finally:
        model.train(was_training)
    out = torch.cat(tokens, dim=1).tolist() if tokens else [[] for _ in rows]
    return [r[: r.index(eos_id)] if eos_id is not None and eos_id in r else r for r in out]


def _next_logits(model: GPTModel, seq: Tensor, context: int, caches: list[KVCache] | None) -> Tensor:
    """Logits (B, vocab) for the token after `seq`, seeing at most the last `context` tokens."""
    if caches is None:
        return model(seq[:, -context:], last_only=True)[:, -1]
    position = caches[0].pos
    if position == 0 or position >= context:
        # First step, or the window is full and slides: positions shift, so the cache is rebuilt
        # from the cropped window (exactly what the uncached model sees).
        for cache in caches:
            cache.reset()
        return model(seq[:, -context:], caches, last_only=True)[:, -1]
    return model(seq[:, -1:], caches)[:, -1]


def next_token(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token id (B, 1) from last-position logits (B, vocab)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        probs = _nucleus(probs, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches `top_p`."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def _check_args(
    idx: Tensor, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be a non-empty (batch, tokens) tensor, got shape {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def text_sampler(
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    start_context: str = "Every effort moves you",
    max_new_tokens: int = 50,
) -> Callable[[nn.Module, torch.device], str]:
    """A `sampler` that continues `start_context` greedily with `generate`, for the `Trainer`'s `sampler` hook."""
    def sample(model: nn.Module, device: torch.device) -> str:
        idx = torch.tensor([encode(start_context)], dtype=torch.long, device=device)
        out = generate(model, idx, max_new_tokens, temperature=0.0)
        return decode(out[0].tolist())

    return sample
