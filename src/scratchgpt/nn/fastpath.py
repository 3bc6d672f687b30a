"""Faster paths for GPTModel's matrix products on CPU, each equal to the plain layer up to float rounding.

- `linear`: decoding (a few rows, no autograd) runs an fp32 `nn.Linear`'s matrix-vector product through
  oneDNN, which reads the weight with every thread (PyTorch's default BLAS reads it with one).
- `head`: training and evaluation multiply by the output head's weight padded to a multiple of 64 rows,
  which the default BLAS runs near its peak (GPT-2's 50,257 rows: about 60% of it).

`set_fast_decode(False)` switches the first off. Measured in docs/speed.md (bench/generate_speed.py,
bench/head_speed.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

FAST_DECODE_MAX_ROWS = 16
"""`linear` uses oneDNN for inputs of at most this many rows (tokens x batch); above it, compute-bound
matmuls are as fast through PyTorch's default BLAS."""
FAST_DECODE_MIN_WEIGHTS = 2**18
"""... and for weights of at least this many elements (1 MB of fp32): sharing a smaller product among
threads costs more than it saves."""


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN_LINEAR = _onednn_linear_available()


def set_fast_decode(enabled: bool) -> bool:
    """Switch `linear`'s oneDNN path on or off (it is on where oneDNN is available); returns the old setting."""
    global _ONEDNN_LINEAR
    old = _ONEDNN_LINEAR
    _ONEDNN_LINEAR = bool(enabled) and _onednn_linear_available()
    return old


def fast_decode(x: Tensor, *layers: nn.Module) -> bool:
    """Whether `linear` runs `layers` on `x` through oneDNN: plain fp32 `nn.Linear`s of at least
    `FAST_DECODE_MIN_WEIGHTS` weights each on CPU, at most `FAST_DECODE_MAX_ROWS` rows, no autograd."""
    return (
        _ONEDNN_LINEAR
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.numel() <= FAST_DECODE_MAX_ROWS * x.shape[-1]
        and all(
            type(layer) is nn.Linear
            and layer.weight.dtype == torch.float32
            and layer.weight.numel() >= FAST_DECODE_MIN_WEIGHTS
            for layer in layers
        )
    )


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear(x, weight, bias)` by oneDNN's inner product (see `linear`)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(layer: nn.Module, x: Tensor) -> Tensor:
    """`layer(x)`, with an fp32 `nn.Linear` on a few rows without autograd (decoding) run by oneDNN.

    A matrix-vector product is bound by reading the weight from memory. PyTorch's default BLAS reads it
    with one thread on CPU (and is slower still for 2-16 rows); oneDNN's inner product uses every
    intra-op thread, and reads GPT-2's weights at about the machine's memory bandwidth. The result
    equals `F.linear` up to float rounding (a different summation order). Any other layer (a LoRA
    wrapper, bf16 weights, training) is simply called.
    """
    if fast_decode(x, layer):
        return onednn_linear(x, layer.weight, layer.bias)
    return layer(x)


HEAD_PAD_MULTIPLE = 64
"""`head` multiplies by the output head's weight padded with zero rows to a multiple of this many."""
HEAD_PAD_MIN_ROWS = 4096
"""... if the head has at least this many rows (a vocabulary, not a classifier's few classes)."""


class _PaddedLinear(torch.autograd.Function):
    """`x @ weight.T` (no bias) through the weight padded with zero rows, the padding's columns cut off.

    The backward pass is `F.linear`'s own (`grad @ weight`, `grad.T @ x`): only the forward product
    changes shape, and a padded row only ever makes a zero column, which is cut off."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, rows: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        padded = torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])
        return (x.flatten(0, -2) @ padded.T)[:, : weight.shape[0]].unflatten(0, x.shape[:-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, weight = ctx.saved_tensors
        grad = grad.flatten(0, -2)
        return (grad @ weight).unflatten(0, x.shape[:-1]), grad.T @ x.flatten(0, -2), None


def head(layer: nn.Module, x: Tensor) -> Tensor:
    """The output head `layer(x)`; on CPU in fp32 (training and evaluation) a vocabulary-sized head
    multiplies by its weight padded to a multiple of `HEAD_PAD_MULTIPLE` rows.

    PyTorch's default BLAS runs the forward product at GPT-2's 50,257 rows at about 60% of the matmul
    peak on an AVX2 CPU; at 50,304 rows near the peak. That saves ~0.1 s of a 3.1 s gpt2-small step
    (context 256, batch 2) even after copying the weight: the same numbers up to float rounding (the
    same dot products; here bit for bit), the same gradients, no change to the parameter or checkpoints.
    """
    if (
        type(layer) is nn.Linear
        and layer.bias is None
        and layer.out_features >= HEAD_PAD_MIN_ROWS
        and layer.out_features % HEAD_PAD_MULTIPLE
        and x.device.type == "cpu"
        and x.dtype == layer.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not fast_decode(x, layer)
    ):
        rows = -(-layer.out_features // HEAD_PAD_MULTIPLE) * HEAD_PAD_MULTIPLE
        return _PaddedLinear.apply(x, layer.weight, rows)
    return linear(layer, x)
