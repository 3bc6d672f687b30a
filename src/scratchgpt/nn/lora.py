"""Low-rank adaptation (LoRA; Hu et al. 2021, the book's appendix E) of a model's linear layers.

Fine-tuning changes a weight W (out x in) by some ΔW. LoRA assumes that change has low rank and learns it
as two thin matrices instead: A (in x r) and B (r x out), so a wrapped layer computes
`x W^T + b + scale * (x A B)` with `scale = alpha / r`. B starts at zero, so a freshly wrapped model
computes exactly what its base did; only A and B are trained (GPT-2 small at rank 16: about 2.7M
parameters instead of 124M), and the frozen base carries no gradients or optimizer state. After
training, `merge_lora` folds the update into the weight (W + scale * (A B)^T), so inference costs nothing extra.

Scale convention: `alpha / rank`, as in the LoRA paper, PEFT and litgpt. The book's appendix E code
multiplies by `alpha` alone, so its rank-16, alpha-16 run corresponds to rank 16, alpha 256 here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from numbers import Real
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from scratchgpt.nn.model import GPTModel

ADAPTER_NAMES = ("A", "B")


class LoRALinear(nn.Module):
    """An `nn.Linear` plus a trainable low-rank update: `linear(x) + (alpha / rank) * (x @ A @ B)`.

    The wrapped layer stays a submodule (`self.linear`), so its parameters keep their tensors (a weight
    tied to another module stays tied). A and B take the base weight's device and dtype; under autocast
    they are cast like any matmul operand.
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(linear).__name__}")
        check_hyperparameters(rank, alpha)
        self.linear = linear
        self.rank = rank
        self.alpha = alpha if isinstance(alpha, int) else float(alpha)
        self.scale = alpha / rank
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.A = nn.Parameter(torch.empty(linear.in_features, rank, **factory))
        self.B = nn.Parameter(torch.zeros(rank, linear.out_features, **factory))
        # The same initialisation nn.Linear gives its weight; with B = 0 the update starts at zero.
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        # Scaling the (..., rank) intermediate is cheaper than scaling the (..., out) result.
        return self.linear(x) + (x @ self.A).mul(self.scale) @ self.B

    def delta_weight(self) -> Tensor:
        """The update in the layout of `linear.weight` (out x in): `scale * (A @ B)^T`, in fp32 or fp64."""
        dtype = torch.promote_types(self.A.dtype, torch.float32)
        return (self.A.to(dtype) @ self.B.to(dtype)).T.mul(self.scale)

    def merged(self) -> nn.Linear:
        """A new plain `nn.Linear` computing the same function. Its weight is a new tensor W + ΔW (a tied
        base weight is left as it was); its bias is the base layer's bias parameter itself."""
        base = self.linear
        with torch.no_grad():
            delta = self.delta_weight()
            weight = (base.weight.to(delta.dtype) + delta).to(base.weight.dtype)
        with torch.device("meta"):  # no allocation or initialisation for tensors replaced right away
            linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        linear.weight = nn.Parameter(weight, requires_grad=base.weight.requires_grad)
        linear.bias = base.bias
        return linear

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}"


def check_hyperparameters(rank: Any, alpha: Any) -> None:
    """Raise ValueError unless `rank` is an int >= 1 and `alpha` a finite positive number."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")


class _Site(NamedTuple):
    """One place a module is attached: `getattr(parent, attr)` is `module`, reached as `name`."""

    parent: nn.Module
    attr: str
    name: str
    module: nn.Module


def _sites(model: nn.Module, kind: type[nn.Module]) -> list[_Site]:
    """Every attachment of a `kind` submodule, shared modules once per path they are reached by."""
    found = []
    for prefix, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent.named_children():
            if isinstance(child, kind):
                found.append(_Site(parent, attr, f"{prefix}.{attr}" if prefix else attr, child))
    return found


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by qualified name (the names `model.state_dict()` uses)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _patterns(targets: str | Iterable[str] | None) -> list[str] | None:
    if targets is None:
        return None
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise ValueError("LoRA targets is empty; pass None to wrap every nn.Linear")
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"LoRA targets must be module-name patterns (strings), got {patterns!r}")
    return patterns


def _select(sites: list[_Site], patterns: list[str] | None) -> list[_Site]:
    """The sites whose name matches a pattern; every pattern must match at least one nn.Linear."""
    if patterns is None:
        return sites
    unmatched = [p for p in patterns if not any(fnmatchcase(s.name, p) for s in sites)]
    if unmatched:
        examples = ", ".join(s.name for s in sites[:4])
        raise ValueError(
            f"LoRA target pattern(s) {unmatched} match no nn.Linear in the model "
            f"(patterns are fnmatch-style on qualified names such as {examples})"
        )
    return [s for s in sites if any(fnmatchcase(s.name, p) for p in patterns)]


def apply_lora(model: nn.Module, rank: int, alpha: float, *, targets: str | Iterable[str] | None = None) -> int:
    """Wrap the model's `nn.Linear` layers in `LoRALinear`, in place, and freeze everything else.

    `targets` restricts the wrapping to layers whose qualified name matches one of the fnmatch patterns
    (e.g. `"trf_blocks.*.att.W_*"`, `"out_head"`; `*` also matches dots); None wraps every Linear, an output
    head included. Afterwards only the A and B matrices have `requires_grad`. Returns that number of
    trainable parameters. Raises ValueError, leaving the model untouched, for a bad rank or alpha, a model
    that already holds LoRA layers, or targets that match no Linear.
    """
    check_hyperparameters(rank, alpha)
    patterns = _patterns(targets)
    if isinstance(model, nn.Linear):
        raise ValueError("apply_lora needs a model containing nn.Linear layers; wrap a lone layer in LoRALinear")
    if lora_layers(model):
        raise ValueError(
            "the model already holds LoRA layers; merge_lora() it first or start again from the base model"
        )
    sites = _sites(model, nn.Linear)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to adapt")
    wrappers: dict[int, LoRALinear] = {}  # a Linear reached by several paths gets one wrapper
    for site in _select(sites, patterns):
        if id(site.module) not in wrappers:
            wrappers[id(site.module)] = LoRALinear(site.module, rank, alpha)
        setattr(site.parent, site.attr, wrappers[id(site.module)])
    mark_only_lora_trainable(model)
    return trainable_parameters(model)


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Set `requires_grad` on the LoRA A and B matrices only."""
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.A.requires_grad_(True)
        layer.B.requires_grad_(True)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` by a plain `nn.Linear` with weight W + (alpha / rank) * (A @ B)^T, in place.

    The result computes the same function and has no LoRA parameters; biases are kept as they are. A base
    weight tied to another module (GPT-2's head and token embedding) is not modified: the merged layer gets
    its own weight, and a `GPTModel`'s `cfg.tie_weights` becomes False so that checkpoints store that head.
    Returns the model (or, for a lone `LoRALinear`, its merged Linear).
    """
    if isinstance(model, LoRALinear):
        return model.merged()
    sites = _sites(model, LoRALinear)
    if not sites:
        raise ValueError(f"{type(model).__name__} holds no LoRA layers to merge")
    merged: dict[int, nn.Linear] = {}
    for site in sites:
        if id(site.module) not in merged:
            merged[id(site.module)] = site.module.merged()
        setattr(site.parent, site.attr, merged[id(site.module)])
    if isinstance(model, GPTModel) and model.cfg.tie_weights and model.out_head.weight is not model.tok_emb.weight:
        model.cfg = dataclasses.replace(model.cfg, tie_weights=False)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with `requires_grad` (a shared parameter counted once)."""
    return count_parameters(model)[0]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; `parameters()` yields a shared parameter once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors only (every LoRA layer's A and B), named as in `model.state_dict()`.

    Like `state_dict()`, the tensors are detached but share storage with the model; clone them to keep a
    snapshot while training goes on.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no LoRA layers")
    return {f"{name}.{attr}": getattr(layer, attr).detach() for name, layer in layers.items() for attr in ADAPTER_NAMES}


def load_lora_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy adapter tensors (from `lora_state_dict`) into a model wrapped with the same LoRA layout.

    Strict: every adapter of the model must be given, with its shape, and nothing else.
    """
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"LoRA state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    wrong = [
        f"{k}: {tuple(state[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"LoRA state dict shapes do not fit the model: {wrong}")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name])


def lora_config(model: nn.Module) -> dict[str, Any]:
    """`{"rank", "alpha", "targets"}` of a wrapped model, JSON-ready for a checkpoint's config.json.

    `targets` lists the qualified names of the wrapped layers, so `apply_lora(base, **lora_config(model))`
    rebuilds the same adapters on a freshly loaded base model.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no LoRA layers")
    settings = {(layer.rank, layer.alpha) for layer in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"the model's LoRA layers differ in (rank, alpha): {sorted(settings)}")
    ((rank, alpha),) = settings
    return {"rank": rank, "alpha": alpha, "targets": list(layers)}
