"""Training throughput of the pretrain stage's step vs the book's chapter-5 loop, and the MFU.

One process, the same random-token batches and the same initial weights for every contender.
Throughput counts forward + backward + optimizer step (batches already in memory), in tokens/s.

  book_fp32       `llms_from_scratch.ch04.GPTModel` trained as the book's `train_model_simple` does:
                  `torch.optim.AdamW(lr=4e-4, weight_decay=0.1)`, the book's `calc_loss_batch`
                  (cross-entropy over flattened logits), `backward()`, `step()`, fp32.
  ours_*          the pretrain stage's own optimizer step, `scratchgpt.train.trainer.Trainer._train_step`
                  (lr schedule, autocast, `lm_loss`, backward, clipping, fused AdamW with the
                  weight-decay groups of `scratchgpt.train.optim`) on `scratchgpt.nn.model.GPTModel`, built
                  from the stage's params with only `precision` / `compile` changed:
                  ours_fp32, ours_bf16 (bf16-mixed autocast), ours_fp32_compile, ours_bf16_compile.
  exp_*           the same step plus a lever the stage has no param for, to see if one is worth adding:
                  exp_vocab64      vocabulary padded to a multiple of 64 (50,304): a bigger model; since
                                   issue 19 ours_* pad only the head's forward product
                                   (`scratchgpt.nn.fastpath.head`, same numbers), so this shows what is left
                  exp_threads1     one intra-op thread instead of one per core (CPU preset only)
                  exp_keep_heap    glibc malloc keeps freed memory (mallopt M_MMAP_MAX=0, no trim), so
                                   the step's big tensors (logits, gradients) are not mmap'ed and
                                   page-faulted afresh every step
                  exp_keep_heap_plain_head
                                   exp_keep_heap with the output head's plain 50,257-row product (the
                                   padded one, `scratchgpt.nn.fastpath.head`, switched off): its effect
                  exp_best         fp32 + keep_heap + each of compile and vocab64 that was over 2%
                                   faster than ours_fp32 in the first phase

Two model configs: `gpt2-small` with the book preset's params (params.yaml + presets/book.yaml:
context 256, batch 2, no clipping, dropout 0.1) and the CPU preset (params.yaml's pretrain section:
cpu-small, windows of `sample.max_length` tokens, its batch size and clipping). Each contender warms
up (`--warmup` steps; a compiled one at least 2, the first being its compile, from an empty inductor
cache unless --warm-compile-cache), then the timed steps run in `--rounds` interleaved rounds so
that load from other processes on a shared machine hits all contenders alike. The median step time
is reported; book_fp32, ours_fp32 and exp_best then run one more step under torch.profiler to show
where the time goes (matmuls vs the rest). The malloc setting is process-wide and keeps memory, so
exp_keep_heap and exp_best run in a second phase, after the others.

Without a fast bf16 matmul (no AVX512-BF16/AMX: oneDNN says so; here bf16 matmuls run at a few
GFLOP/s, far below fp32) eager bf16 is timed on the CPU preset only, for `--slow-steps` steps, and
bf16 + compile not at all, unless `--bf16 yes`.

The matmul peak is measured too, at the start and at the end (square 2048 matmuls with both layouts
of the right operand, and the MLP's forward matmul; the best of all is the peak), fp32 and bf16.
Model FLOPs per token (forward + backward) = 6 * N_matmul + 12 * n_layers * T * emb_dim, N_matmul =
the weights of every Linear (output head included, embeddings not), T = the training context (the
PaLM/nanoGPT convention; the causal mask's skipped half is counted). MFU = tokens/s * FLOPs per
token / the peak of the dtype used.

    python bench/train_speed.py            # the full measurement quoted in the README (~6.5 min on 2 cores)
    python bench/train_speed.py --quick    # CPU preset only, a few eager steps (smoke run, < 1 min)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from machine import best_peaks, bf16_fast, log_machine, measure_peaks, utilisation
from torch.utils.data import TensorDataset

from scratchgpt.data.datasets import SampleParams
from scratchgpt.nn import fastpath
from scratchgpt.nn.model import GPTConfig, GPTModel
from scratchgpt.pipeline.pretrain import PretrainParams
from scratchgpt.plumbing import cli
from scratchgpt.plumbing.fileio import write_json
from scratchgpt.plumbing.params import from_dict, read_params
from scratchgpt.presets import apply_preset, load_preset
from scratchgpt.train.config import TrainConfig
from scratchgpt.train.losses import lm_loss
from scratchgpt.train.memory import glibc_mallopt, keep_freed_memory
from scratchgpt.train.state import seed_everything
from scratchgpt.train.trainer import Trainer

log = logging.getLogger("bench.train_speed")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "train_speed.json"
FLOPS_FORMULA = (
    "model FLOPs per token (forward + backward) = 6 * N_matmul + 12 * n_layers * T * emb_dim; "
    "N_matmul = weights of every Linear incl. the output head (not embeddings, not biases), "
    "T = training context; MFU = tokens/s * FLOPs per token / measured matmul peak of the dtype used"
)
BOOK_LR, BOOK_WEIGHT_DECAY = 4e-4, 0.1  # the book's chapter-5 optimizer
TARGET_FP32_MFU, TARGET_BF16_MFU = 0.70, 0.40  # issue 19's targets at gpt2-small


# ---------------------------------------------------------------------------------------------
# Threads and the compile cache


@contextlib.contextmanager
def plain_head(on: bool) -> Iterator[None]:
    """The output head's plain product (no padding, see `scratchgpt.nn.fastpath.head`) while `on`."""
    old = fastpath.HEAD_PAD_MIN_ROWS
    fastpath.HEAD_PAD_MIN_ROWS = 2**62 if on else old
    try:
        yield
    finally:
        fastpath.HEAD_PAD_MIN_ROWS = old


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `n` (None: unchanged) for the duration."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def fresh_compile_cache(fresh: bool) -> Iterator[None]:
    """An empty inductor cache for this run (the honest first-compile cost) unless not `fresh`."""
    if not fresh:
        yield
        return
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="inductor-") as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


# ---------------------------------------------------------------------------------------------
# FLOPs


def matmul_params(model: torch.nn.Module) -> int:
    """Weights of every Linear (counted once if shared): the parameters each token multiplies."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def flops_per_token(cfg: GPTConfig, context: int, n_matmul: int) -> int:
    return 6 * n_matmul + 12 * cfg.n_layers * context * cfg.emb_dim


def pad_vocab(vocab: int, multiple: int = 64) -> int:
    return -(-vocab // multiple) * multiple


# ---------------------------------------------------------------------------------------------
# Contenders


@dataclass(frozen=True)
class Spec:
    """How a contender trains."""

    name: str
    precision: str = "fp32"
    compile: bool = False
    vocab64: bool = False
    keep_heap: bool = False
    plain_head: bool = False
    threads: int | None = None
    book: bool = False


@dataclass
class Contender:
    """A built contender: `step()` runs one optimizer step on the next batch and returns the loss."""

    spec: Spec
    step: Callable[[], float]
    tokens_per_step: int
    note: str
    timed_steps: int = 0
    warmup: int = 0
    first_step_s: float | None = None
    first_loss: float | None = None
    step_s: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)
    sys_s: list[float] = field(default_factory=list)


def make_batches(vocab: int, batch_size: int, context: int, n: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """`n` batches of random-token windows as (input, target), target = input shifted by one."""
    gen = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, vocab, (n, batch_size, context + 1), generator=gen)
    return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows]


def cycle(items: list[Any]) -> Iterator[Any]:
    while True:
        yield from items


def pad_rows(state: dict[str, torch.Tensor], vocab: int) -> dict[str, torch.Tensor]:
    """`state` with the token embedding and output head grown to `vocab` rows of zeros (never looked
    up; zero logits), so a padded-vocabulary model starts from the same weights."""
    out = dict(state)
    for key in ("tok_emb.weight", "out_head.weight"):
        extra = vocab - out[key].shape[0]
        if extra > 0:
            out[key] = torch.cat([out[key], out[key].new_zeros(extra, out[key].shape[1])])
    return out


def book_contender(spec: Spec, cfg: GPTConfig, state: dict[str, torch.Tensor], data: list, tokens: int) -> Contender:
    """The book's model and the body of its chapter-5 `train_model_simple` loop, fp32."""
    from llms_from_scratch.ch04 import GPTModel as BookGPTModel
    from llms_from_scratch.ch05 import calc_loss_batch

    model = BookGPTModel(cfg.to_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not all(k.endswith("att.mask") for k in missing):
        raise RuntimeError(f"book model state mismatch: missing {missing}, unexpected {unexpected}")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=BOOK_LR, weight_decay=BOOK_WEIGHT_DECAY)
    batches = cycle(data)
    device = torch.device("cpu")

    def step() -> float:
        input_batch, target_batch = next(batches)
        optimizer.zero_grad()
        loss = calc_loss_batch(input_batch, target_batch, model, device)
        loss.backward()
        optimizer.step()
        return loss.item()

    note = "llms_from_scratch.ch04.GPTModel + ch05 loop: AdamW(lr=4e-4, weight_decay=0.1), fp32"
    return Contender(spec, step, tokens, note)


def ours_contender(
    spec: Spec, cfg: GPTConfig, state: dict[str, torch.Tensor], train: TrainConfig, data: list, tokens: int
) -> Contender:
    """A pretrain-stage `Trainer` with `spec`'s precision and compile; its `_train_step` is the step."""
    if spec.vocab64:
        cfg = dataclasses.replace(cfg, vocab_size=pad_vocab(cfg.vocab_size))
    model = GPTModel(cfg)
    model.load_state_dict(pad_rows(state, cfg.vocab_size))
    train = dataclasses.replace(train, precision="bf16-mixed" if spec.precision == "bf16" else "fp32",
                                compile=spec.compile)
    # The Trainer sizes its epochs from the dataset; the timed steps are fed the batches directly.
    dataset = TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
    trainer = Trainer(model, lm_loss, dataset, None, train, None, desc=spec.name)
    trainer.model.train()
    batches = cycle(data)
    extras = [name for name, on in (("compile", spec.compile), ("keep_heap", spec.keep_heap),
                                    (f"vocab_size {cfg.vocab_size}", spec.vocab64),
                                    (f"{spec.threads} thread(s)", spec.threads is not None),
                                    ("plain head", spec.plain_head)) if on]
    note = f"Trainer._train_step, precision {train.precision}" + "".join(f", {x}" for x in extras)

    def step() -> float:
        with plain_head(spec.plain_head):
            return trainer._train_step(batches)

    return Contender(spec, step, tokens * train.grad_accum_steps, note)


def run_step(c: Contender) -> float:
    """One step of `c`; returns its seconds and records its page faults and system time."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    loss = c.step()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    if c.first_loss is None:
        c.first_loss = loss
        c.first_step_s = seconds
    c.faults.append(after.ru_minflt - before.ru_minflt)
    c.sys_s.append(after.ru_stime - before.ru_stime)
    return seconds


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile_step(c: Contender, flops_per_step: float) -> dict[str, Any]:
    """One more step of `c` under torch.profiler: where the time goes (matmuls vs the rest).

    Op times are self times on the calling thread (the autograd engine runs CPU backward there, and
    intra-op threads work inside those ops), so they add up to about the step's wall time.
    """
    from torch.profiler import ProfilerActivity, profile

    with num_threads(c.spec.threads), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        c.step()
        wall = time.perf_counter() - start
    ops = sorted(((e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()), key=lambda kv: -kv[1])
    matmul = sum(t for k, t in ops if k in MATMUL_OPS)
    return {
        "step_s": round(wall, 3),
        "ops_s": round(sum(t for _, t in ops), 3),
        "matmul_s": round(matmul, 3),
        "matmul_gflops": round(flops_per_step / matmul / 1e9, 1) if matmul else None,
        "other_s": round(sum(t for k, t in ops if k not in MATMUL_OPS), 3),
        "top_ops_s": [[k, round(t, 3)] for k, t in ops[:10]],
    }


def measure(contenders: list[Contender], rounds: int) -> None:
    """Warm each contender up, then time its steps in `rounds` interleaved rounds."""
    for c in contenders:
        with num_threads(c.spec.threads):
            for i in range(c.warmup):
                log.info("%s: warm-up step %d/%d %.2f s", c.spec.name, i + 1, c.warmup, run_step(c))
        c.faults.clear()
        c.sys_s.clear()
    for r in range(rounds):
        for c in contenders:
            n = c.timed_steps // rounds + (1 if r < c.timed_steps % rounds else 0)
            if not n:
                continue
            with num_threads(c.spec.threads):
                c.step_s += [run_step(c) for _ in range(n)]
            log.info("%s: round %d/%d, %d steps, median %.3f s/step (load %.1f)",
                     c.spec.name, r + 1, rounds, n, statistics.median(c.step_s), os.getloadavg()[0])


# ---------------------------------------------------------------------------------------------
# One model config


@dataclass
class Setup:
    label: str
    cfg: GPTConfig
    train: TrainConfig
    context: int
    params_source: str


def load_setup(label: str, preset: str | None) -> Setup:
    """The pretrain and sample params of params.yaml, with `presets/<preset>.yaml` merged in."""
    params = read_params(REPO / "params.yaml")
    source = "params.yaml"
    if preset:
        params = apply_preset(params, load_preset(preset, REPO / "presets"))
        source += f" + presets/{preset}.yaml"
    pre = from_dict(PretrainParams, params["pretrain"], "pretrain")
    sample = from_dict(SampleParams, params["sample"], "sample")
    train = dataclasses.replace(pre.train, device="cpu", resume="never", precision="fp32", compile=False)
    return Setup(label, pre.model.config(), train, sample.max_length, source)


def choose_specs(args: argparse.Namespace, big: bool, vocab_padded: bool) -> tuple[list[Spec], dict[str, str]]:
    """The contenders of the default-allocator phase for one config, and those skipped (name -> why)."""
    fast = bf16_fast()
    slow_bf16 = "no fast bf16 matmul on this CPU (no AVX512-BF16/AMX)"
    skipped: dict[str, str] = {}
    specs = [Spec("book_fp32", book=True), Spec("ours_fp32")]
    # Eager bf16 without a fast path: only at the CPU preset (a gpt2-small step would take minutes).
    if args.bf16 == "yes" or (args.bf16 == "auto" and (fast or not big)):
        specs.append(Spec("ours_bf16", precision="bf16"))
    else:
        skipped["ours_bf16"] = "--bf16 no" if args.bf16 == "no" else slow_bf16 + "; timed at the CPU preset"
    if args.no_compile:
        skipped["ours_fp32_compile"] = skipped["ours_bf16_compile"] = "--no-compile"
    else:
        specs.append(Spec("ours_fp32_compile", compile=True))
        if args.bf16 == "yes" or (args.bf16 == "auto" and fast):
            specs.append(Spec("ours_bf16_compile", precision="bf16", compile=True))
        else:
            skipped["ours_bf16_compile"] = "--bf16 no" if args.bf16 == "no" else slow_bf16
    if args.no_experiments:
        skipped["exp_*"] = "--no-experiments"
    else:
        if not vocab_padded:
            specs.append(Spec("exp_vocab64", vocab64=True))
        if not big and torch.get_num_threads() > 1:  # at gpt2-small a 1-thread step costs too much time
            specs.append(Spec("exp_threads1", threads=1))
        if glibc_mallopt() is None:
            skipped["exp_keep_heap"] = skipped["exp_best"] = "needs glibc"
    return only(specs, args, skipped), skipped


def only(specs: list[Spec], args: argparse.Namespace, skipped: dict[str, str]) -> list[Spec]:
    if not args.only:
        return specs
    wanted = set(args.only.split(","))
    skipped |= {s.name: "--only" for s in specs if s.name not in wanted}
    return [s for s in specs if s.name in wanted]


def best_spec(results: dict[str, dict[str, Any]]) -> Spec:
    """fp32 + keep_heap + each lever of the first phase that beat ours_fp32 there by over 2%."""
    def helped(name: str) -> bool:
        return name in results and results[name]["tokens_per_s"] > 1.02 * results["ours_fp32"]["tokens_per_s"]

    return Spec("exp_best", compile=helped("ours_fp32_compile"), vocab64=helped("exp_vocab64"), keep_heap=True)


def run_setup(setup: Setup, args: argparse.Namespace, big: bool) -> dict[str, Any]:
    """Build and time every contender of one model config; return its JSON section.

    Two phases: the default allocator (book, stage settings, most levers), then glibc's heap kept
    (`keep_freed_memory`) for exp_keep_heap and exp_best. The allocator is process-wide and retains
    memory, so it cannot be switched per contender without one contender's heap helping the next.
    """
    cfg, train, context = setup.cfg, setup.train, setup.context
    tokens = train.batch_size * context
    log.info("%s: %s, context %d, batch %d (%d tokens/step), params from %s",
             setup.label, cfg.to_dict(), context, train.batch_size, tokens, setup.params_source)
    seed_everything(train.seed)
    model = GPTModel(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_params, n_matmul = model.num_parameters(), matmul_params(model)
    del model
    data = make_batches(cfg.vocab_size, train.batch_size, context, n=8, seed=train.seed)
    flops = flops_per_token(cfg, context, n_matmul)
    steps = args.steps if big else args.cpu_steps

    def build(spec: Spec) -> Contender:
        if spec.book:
            c = book_contender(spec, cfg, state, data, tokens)
        else:
            c = ours_contender(spec, cfg, state, train, data, tokens)
        slow = spec.precision == "bf16" and not bf16_fast()
        c.timed_steps = min(steps, args.slow_steps) if slow else steps
        c.warmup = 0 if slow else args.warmup
        if spec.compile:
            c.warmup = max(c.warmup, 2)  # the first step compiles forward and backward
        if slow:
            c.note += f"; slow bf16: {c.timed_steps} step(s), no warm-up"
        return c

    specs, skipped = choose_specs(args, big, pad_vocab(cfg.vocab_size) == cfg.vocab_size)
    log.info("%s, phase 1 (default allocator): %s; skipped %s", setup.label, [s.name for s in specs], skipped)
    contenders = [build(spec) for spec in specs]
    measure(contenders, args.rounds)
    results = {c.spec.name: summarize(c, flops, "default_allocator") for c in contenders}
    profile(contenders, results, flops * tokens, args)
    del contenders
    gc.collect()

    if not args.no_experiments and glibc_mallopt() is not None and "ours_fp32" in results:
        plain = Spec("exp_keep_heap_plain_head", keep_heap=True, plain_head=True)
        specs = [Spec("exp_keep_heap", keep_heap=True), plain, best_spec(results)]
        specs = only(specs, args, skipped)
        log.info("%s, phase 2 (glibc heap kept): %s", setup.label, specs)
        with keep_freed_memory():
            contenders = [build(spec) for spec in specs]
            measure(contenders, args.rounds)
            results |= {c.spec.name: summarize(c, flops, "heap_kept") for c in contenders}
            profile(contenders, results, flops * tokens, args)
            del contenders

    book = results.get("book_fp32", {}).get("tokens_per_s")
    ours = results.get("ours_fp32", {}).get("tokens_per_s")
    for r in results.values():
        r["ratio_vs_book"] = round(r["tokens_per_s"] / book, 3) if book else None
        r["ratio_vs_ours_fp32"] = round(r["tokens_per_s"] / ours, 3) if ours else None
    stage = {k: v for k, v in results.items() if k.startswith("ours_")}
    best_stage = max(stage, key=lambda k: stage[k]["tokens_per_s"]) if stage else None
    best_any = max((k for k in results if k != "book_fp32"), key=lambda k: results[k]["tokens_per_s"], default=None)
    return {
        "model": cfg.to_dict(),
        "params_source": setup.params_source,
        "train": {k: getattr(train, k) for k in ("batch_size", "grad_accum_steps", "grad_clip", "lr",
                                                  "weight_decay", "betas", "seed")},
        "context": context,
        "tokens_per_step": tokens,
        "parameters": n_params,
        "matmul_parameters": n_matmul,
        "flops_per_token": flops,
        "contenders": results,
        "skipped": skipped,
        "best_stage_setting": best_stage,
        "best_stage_setting_ratio_vs_book": results[best_stage]["ratio_vs_book"] if best_stage else None,
        "best_with_levers": best_any,
        "best_with_levers_ratio_vs_book": results[best_any]["ratio_vs_book"] if best_any else None,
    }


PROFILED = ("book_fp32", "ours_fp32", "exp_best")


def profile(contenders: list[Contender], results: dict[str, Any], flops_per_step: float,
            args: argparse.Namespace) -> None:
    """Add a profile of one extra step to the book, ours_fp32 and exp_best (unless --no-profile)."""
    for c in contenders:
        if not args.no_profile and c.spec.name in PROFILED:
            results[c.spec.name]["profile"] = prof = profile_step(c, flops_per_step)
            log.info("%s profile: %s", c.spec.name, prof)


def summarize(c: Contender, flops: int, phase: str) -> dict[str, Any]:
    median = statistics.median(c.step_s)
    tps = c.tokens_per_step / median
    achieved = tps * flops / 1e9  # useful FLOPs: a padded vocabulary's extra rows are not counted
    return {
        "tokens_per_s": round(tps, 2),
        "step_s_median": round(median, 4),
        "step_s": [round(s, 4) for s in c.step_s],
        "warmup_steps": c.warmup,
        "first_step_s": round(c.first_step_s, 3) if c.first_step_s is not None else None,
        "compile_s": round(c.first_step_s - median, 1) if c.spec.compile and c.first_step_s else None,
        "first_loss": round(c.first_loss, 4) if c.first_loss is not None else None,
        "page_faults_per_step": int(statistics.median(c.faults)),
        "sys_s_per_step": round(statistics.median(c.sys_s), 3),
        "achieved_gflops": round(achieved, 2),
        "mfu_dtype": c.spec.precision,
        "phase": phase,
        "note": c.note,
    }


def add_mfu(section: dict[str, Any], peaks: dict[str, float]) -> None:
    """MFU of each contender and the fp32 ceiling of one config, from the final matmul peaks."""
    ceiling = peaks["fp32"] * 1e9 / section["flops_per_token"]
    book = section["contenders"].get("book_fp32", {}).get("tokens_per_s")
    section["fp32_ceiling_tokens_per_s"] = round(ceiling, 1)
    section["fp32_ceiling_ratio_vs_book"] = round(ceiling / book, 2) if book else None
    for r in section["contenders"].values():
        r["mfu"] = utilisation(r["achieved_gflops"], peaks[r["mfu_dtype"]])


def goal_summary(configs: dict[str, Any], peaks: dict[str, float]) -> dict[str, Any]:
    """Issue 19's targets at gpt2-small against what was measured: fp32 training at >= 70% of the fp32
    matmul peak; bf16-mixed at >= 40% of the bf16 peak where the CPU has bf16 matrix units."""
    big = configs.get("gpt2-small")
    if not big or not big["best_with_levers"]:
        return {"target_fp32_mfu": TARGET_FP32_MFU, "measured": False}
    fp32 = {k: v for k, v in big["contenders"].items() if v["mfu_dtype"] == "fp32" and k != "book_fp32"}
    best = max(fp32, key=lambda k: fp32[k]["mfu"])
    trainer = "exp_keep_heap" if "exp_keep_heap" in fp32 else "ours_fp32"
    book = big["contenders"].get("book_fp32", {})
    return {
        "target_fp32_mfu": TARGET_FP32_MFU,
        "trainer_fit_setting": trainer,
        "trainer_fit_mfu": fp32[trainer]["mfu"],
        "best_fp32": best,
        "best_fp32_mfu": fp32[best]["mfu"],
        "met": fp32[trainer]["mfu"] >= TARGET_FP32_MFU,
        "book_mfu": book.get("mfu"),
        "fp32_ceiling_ratio_vs_book": big["fp32_ceiling_ratio_vs_book"],
        "target_bf16_mfu": TARGET_BF16_MFU if bf16_fast() else None,
        "bf16": (
            "measured above" if bf16_fast() else
            f"not applicable: no bf16 matrix units (AVX512-BF16/AMX) on this CPU (capability "
            f"{torch.backends.cpu.get_cpu_capability()}); the bf16 matmul peak is {peaks['bf16']:.1f} GFLOP/s "
            f"against {peaks['fp32']:.0f} in fp32, so bf16-mixed training is slower than fp32 here"
        ),
    }


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps per contender at gpt2-small (default: %(default)s)")
    parser.add_argument("--cpu-steps", type=int, default=10,
                        help="timed steps per contender at the CPU preset (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds the timed steps are split into (default: %(default)s)")
    parser.add_argument("--slow-steps", type=int, default=1,
                        help="timed steps of a bf16 contender without a fast bf16 path (default: %(default)s)")
    parser.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                        help="bf16 contenders; auto: with a fast bf16 path all of them, else eager bf16 at the "
                             "CPU preset only (default: %(default)s)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-experiments", action="store_true", help="skip the exp_* contenders")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the profiled extra step of book_fp32, ours_fp32 and exp_best")
    parser.add_argument("--warm-compile-cache", action="store_true",
                        help="reuse inductor's on-disk cache (default: a fresh one, so compile time is cold)")
    parser.add_argument("--only", default="", help="comma-separated contender names (default: all)")
    parser.add_argument("--skip-124m", action="store_true", help="the CPU preset only")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: CPU preset only, 2 timed steps, no compile, no slow bf16")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON to write (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.skip_124m, args.cpu_steps, args.no_compile, args.rounds = True, 2, True, 1
        if args.bf16 == "auto" and not bf16_fast():
            args.bf16 = "no"
    for name in ("steps", "cpu_steps", "rounds", "slow_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def display_path(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> None:
    cli.setup_logging()
    args = parse_args(argv)
    started = time.perf_counter()
    machine = log_machine(log)

    peak_start = measure_peaks(args.quick)
    log.info("matmul GFLOP/s: %s", peak_start)
    setups = [] if args.skip_124m else [(load_setup("gpt2-small", "book"), True)]
    setups.append((load_setup("cpu-small", None), False))
    configs: dict[str, Any] = {}
    for setup, big in setups:
        with fresh_compile_cache(not args.warm_compile_cache):
            configs[setup.label] = run_setup(setup, args, big)
        gc.collect()
        log.info("%s tokens/s (ratio vs book): %s", setup.label,
                 {k: (v["tokens_per_s"], v["ratio_vs_book"]) for k, v in configs[setup.label]["contenders"].items()})
    # Peaks again at the end: a shared machine can lower one measurement, never raise it.
    peak_end = measure_peaks(args.quick)
    log.info("matmul GFLOP/s: %s", peak_end)
    peaks = best_peaks(peak_start, peak_end)
    for section in configs.values():
        add_mfu(section, peaks)
    peak = {k: {"start": peak_start[k], "end": peak_end[k], "peak": peaks[k]} for k in peaks}

    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "benchmark": "pretrain training step (forward + backward + optimizer) vs the book's chapter-5 loop",
        "command": shlex.join(["python", "bench/train_speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine,
        "settings": {k: display_path(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "flops_formula": FLOPS_FORMULA,
        "matmul_gflops": peak,
        "configs": configs,
        "goal": goal_summary(configs, peaks),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    write_json(args.output, result)
    log.info("goal: %s", result["goal"])
    log.info("wrote %s in %.0f s", args.output, result["wall_time_s"])


if __name__ == "__main__":
    main()
