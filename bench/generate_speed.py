"""Greedy generation speed: scratchgpt's KV-cache decoder vs Hugging Face `generate` vs the book's loop.

All run in one process on the same random GPT-2 124M weights (a random Hugging Face
`GPT2LMHeadModel`, converted with `load_hf_gpt2` and loaded into the book's `GPTModel`), batch 1,
a 32-token prompt and 100 new tokens, in fp32 and with bf16 weights (each library's model cast with
`.to(torch.bfloat16)`). The contenders are timed in interleaved rounds, so that load from other
processes on a shared machine hits them alike; the median run is reported, the best run too.

  huggingface_generate_{fp32,bf16}   the reference of each precision (bf16: one run where the CPU has
                                     no fast bf16 matmul, it is slow)
  book_no_cache_fp32                 the book's `generate_text_simple` (no cache; one run, it is slow)
  scratchgpt_kv_cache_{fp32,bf16}    `scratchgpt.nn.generate.generate`, as the stages call it
  scratchgpt_kv_cache_fp32_default_blas
                                     the same with `set_fast_decode(False)`: matrix-vector products by
                                     PyTorch's default BLAS instead of oneDNN (the decoder before issue 19)

Each entry has tokens/s, the ratio to the reference of its precision and to Hugging Face fp32, and
two utilisations: MFU, the model FLOPs (2 per weight of every Linear, plus attention over the cached
tokens) against the measured matmul peak of its precision, and MBU, the bytes a token must read (every
weight once, and the KV cache) against the measured memory bandwidth. Decoding one token at batch 1 is
bound by memory, so MBU is the meaningful one. Results go to `bench/results/generate_speed.json`.

    python bench/generate_speed.py            # the full measurement quoted in docs/speed.md (~3 min)
    python bench/generate_speed.py --quick    # a small model, for a smoke run
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from machine import best_peaks, bf16_fast, log_machine, measure_peaks, memory_bandwidth, utilisation

from scratchgpt.nn.checkpoint import load_hf_gpt2
from scratchgpt.nn.fastpath import set_fast_decode
from scratchgpt.nn.generate import generate
from scratchgpt.nn.model import GPTModel
from scratchgpt.plumbing import cli
from scratchgpt.plumbing.fileio import write_json

log = logging.getLogger("bench.generate_speed")
RESULTS = Path(__file__).parent / "results" / "generate_speed.json"
TARGET_RATIO = 1.5  # issue 19: >= 1.5x Hugging Face at batch 1, in fp32 and in bf16
REFERENCE = {"fp32": "huggingface_generate_fp32", "bf16": "huggingface_generate_bf16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (median is reported)")
    parser.add_argument("--no-book", dest="book_loop", action="store_false", help="skip the book's slow loop")
    parser.add_argument("--quick", action="store_true", help="a 4-layer model and 20 new tokens (smoke test)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def build_models(quick: bool, workdir: Path) -> tuple[torch.nn.Module, GPTModel, torch.nn.Module]:
    import transformers
    from llms_from_scratch.ch04 import GPTModel as BookGPTModel

    layers = 4 if quick else 12
    hf_config = transformers.GPT2Config(n_layer=layers, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    torch.manual_seed(123)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    hf.save_pretrained(workdir, safe_serialization=True)
    ours = load_hf_gpt2(workdir, drop_rate=0.0).eval()
    book = BookGPTModel({**ours.cfg.to_dict(), "drop_rate": 0.0}).eval()
    missing, unexpected = book.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("att.mask") for k in missing), (missing, unexpected)
    return hf, ours, book


def default_blas(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`fn` run with `linear`'s oneDNN path switched off."""
    def run() -> torch.Tensor:
        old = set_fast_decode(False)
        try:
            return fn()
        finally:
            set_fast_decode(old)

    return run


@dataclass
class Contender:
    """A way to generate `new_tokens` after the prompt; `slow` ones run once, in the first round only,
    without a warm-up run (a one-time cost then stays in their time: it only flatters the others less)."""

    precision: str
    run: Callable[[], torch.Tensor]
    slow: bool = False
    seconds: list[float] = field(default_factory=list)
    output: torch.Tensor | None = None

    def time(self) -> None:
        start = time.perf_counter()
        self.output = self.run()
        self.seconds.append(time.perf_counter() - start)


def contenders(hf: torch.nn.Module, ours: GPTModel, book: torch.nn.Module, prompt: torch.Tensor,
               new_tokens: int, book_loop: bool) -> dict[str, Contender]:  # fmt: skip
    """Every contender, by name (the book's loop only with `book_loop`)."""
    from llms_from_scratch.ch04 import generate_text_simple

    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16).eval()
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16).eval()

    @torch.inference_mode()
    def hf_generate(model: torch.nn.Module) -> torch.Tensor:
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=50256)  # fmt: skip

    out = {
        "huggingface_generate_fp32": Contender("fp32", partial(hf_generate, hf)),
        "scratchgpt_kv_cache_fp32": Contender("fp32", partial(generate, ours, prompt, new_tokens)),
        "scratchgpt_kv_cache_fp32_default_blas": Contender(
            "fp32", default_blas(partial(generate, ours, prompt, new_tokens))
        ),
        # Without a fast bf16 matmul (no AVX512-BF16/AMX) Hugging Face's bf16 Conv1D products are slow.
        "huggingface_generate_bf16": Contender("bf16", partial(hf_generate, hf_bf16), slow=not bf16_fast()),
        "scratchgpt_kv_cache_bf16": Contender("bf16", partial(generate, ours_bf16, prompt, new_tokens)),
    }
    if book_loop:
        book_run = torch.inference_mode()(partial(generate_text_simple, book, prompt, new_tokens,
                                                  ours.cfg.context_length))  # fmt: skip
        out["book_no_cache_fp32"] = Contender("fp32", book_run, slow=True)
    return out


def decode_costs(ours: GPTModel, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """FLOPs and fp32 bytes a generated token costs on average: every Linear weight once (2 FLOPs each),
    attention over the cached tokens (4 FLOPs per cached key and value element), the cache read."""
    matmul_weights = sum(m.weight.numel() for m in {id(m): m for m in ours.modules()
                                                     if isinstance(m, torch.nn.Linear)}.values())  # fmt: skip
    cached = prompt_tokens + new_tokens / 2  # the mean cache length while decoding
    kv_elements = 2 * ours.cfg.n_layers * cached * ours.cfg.emb_dim
    return {"flops_per_token": 2 * matmul_weights + 2 * kv_elements,
            "elements_read_per_token": matmul_weights + kv_elements}  # fmt: skip


def first_difference(a: torch.Tensor, b: torch.Tensor, start: int) -> int:
    """How many generated tokens (after `start`) the two outputs share before they first differ."""
    return int((a == b)[0, start:].cumprod(0).sum())


def main(argv: list[str] | None = None) -> None:
    cli.setup_logging()
    args = parse_args(argv)
    machine = log_machine(log)
    peaks_start = measure_peaks(args.quick)
    bandwidth_start = memory_bandwidth()
    new_tokens = 20 if args.quick else args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours, book = build_models(args.quick, Path(tmp))
    prompt = torch.randint(0, 50257, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    log.info("model: %d layers, %.1fM parameters (tied head); prompt %d tokens, %d new tokens, %d threads",
             ours.cfg.n_layers, ours.num_parameters() / 1e6, args.prompt_tokens, new_tokens, torch.get_num_threads())

    runs = contenders(hf, ours, book, prompt, new_tokens, args.book_loop)
    for c in runs.values():
        if not c.slow:
            c.run()  # warm-up
    for r in range(args.rounds):
        for c in runs.values():
            if r == 0 or not c.slow:
                c.time()
        log.info("round %d/%d: %s (load %.1f)", r + 1, args.rounds,
                 {k: round(new_tokens / c.seconds[-1], 1) for k, c in runs.items()}, os.getloadavg()[0])  # fmt: skip
    peaks = best_peaks(peaks_start, measure_peaks(args.quick))
    # Like the peaks, measured before and after: other processes can lower a measurement, never raise it.
    bandwidth = max(bandwidth_start, memory_bandwidth())

    costs = decode_costs(ours, args.prompt_tokens, new_tokens)
    results = {name: entry(c, new_tokens, costs, peaks, bandwidth) for name, c in runs.items()}
    for r in results.values():
        r["ratio_vs_reference"] = round(r["tokens_per_s"] / results[REFERENCE[r["precision"]]]["tokens_per_s"], 3)
        r["ratio_vs_huggingface_fp32"] = round(r["tokens_per_s"] / results[REFERENCE["fp32"]]["tokens_per_s"], 3)
    start = args.prompt_tokens
    same = {name: first_difference(c.output, runs[REFERENCE[c.precision]].output, start) for name, c in runs.items()}
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {
        "benchmark": "greedy generation, batch 1, random GPT-2 weights",
        "command": shlex.join(["python", "bench/generate_speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine,
        "matmul_gflops": {"start": peaks_start, "peak": peaks},
        "memory_bandwidth_gbs": bandwidth,
        "memory_bandwidth_gbs_start": bandwidth_start,
        "model_layers": ours.cfg.n_layers,
        "parameters": ours.num_parameters(),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": new_tokens,
        "rounds": args.rounds,
        **costs,
        "tokens_same_as_reference": same,
        "fp32_outputs_identical": all(same[n] == new_tokens for n, c in runs.items() if c.precision == "fp32"),
        "bf16_tokens_matching_fp32": first_difference(
            runs["scratchgpt_kv_cache_bf16"].output, runs["scratchgpt_kv_cache_fp32"].output, start
        ),
        "target": target(results),
        "results": results,
    }
    write_json(args.output, report)
    log.info("results: %s", {k: (v["tokens_per_s"], v["ratio_vs_reference"]) for k, v in results.items()})
    log.info("target: %s; wrote %s", report["target"], args.output)


def entry(c: Contender, new_tokens: int, costs: dict[str, float], peaks: dict[str, float],
          bandwidth: float) -> dict[str, Any]:  # fmt: skip
    """One contender's JSON: tokens/s of the median and best run, MFU and MBU."""
    median = statistics.median(c.seconds)
    tps = new_tokens / median
    bytes_per_element = 4 if c.precision == "fp32" else 2
    return {
        "precision": c.precision,
        "seconds": round(median, 4),
        "all_seconds": [round(s, 4) for s in c.seconds],
        "tokens_per_s": round(tps, 2),
        "tokens_per_s_best": round(new_tokens / min(c.seconds), 2),
        "mfu": utilisation(tps * costs["flops_per_token"] / 1e9, peaks[c.precision]),
        "mbu": utilisation(tps * costs["elements_read_per_token"] * bytes_per_element / 1e9, bandwidth),
        "timed_runs": len(c.seconds),
    }


def target(results: dict[str, Any]) -> dict[str, Any]:
    """Issue 19's target, >= 1.5x Hugging Face in each precision, against what was measured."""
    out: dict[str, Any] = {"ratio": TARGET_RATIO}
    for precision in REFERENCE:
        ratio = results[f"scratchgpt_kv_cache_{precision}"]["ratio_vs_reference"]
        out[precision] = {"ratio_vs_reference": ratio, "met": ratio >= TARGET_RATIO}
    return out


if __name__ == "__main__":
    main()
