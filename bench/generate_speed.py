"""Greedy generation speed: scratchgpt's KV-cache decoder vs Hugging Face `generate` vs the book's loop.

All three run in one process on the same random GPT-2 124M weights (a random Hugging Face
`GPT2LMHeadModel`, converted with `load_hf_gpt2` and loaded into the book's `GPTModel`), batch 1,
a 32-token prompt and 100 new tokens. Results (tokens/s and ratios to Hugging Face) go to
`bench/results/generate_speed.json`.

    python bench/generate_speed.py            # the full measurement quoted in the README
    python bench/generate_speed.py --quick    # a small model, for a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scratchgpt.nn.checkpoint import load_hf_gpt2
from scratchgpt.nn.generate import generate
from scratchgpt.plumbing import cli
from scratchgpt.plumbing.fileio import write_json

log = logging.getLogger("bench.generate_speed")
RESULTS = Path(__file__).parent / "results" / "generate_speed.json"


def parse_args() -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender (median is reported)")
    parser.add_argument("--book-repeats", type=int, default=1, help="timed runs of the slow book loop")
    parser.add_argument("--quick", action="store_true", help="a 4-layer model and 20 new tokens (smoke test)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args()


def build_models(quick: bool, workdir: Path):
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


def time_runs(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds over `repeats` timed runs, after one untimed warm-up run."""
    out = fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), out


def main() -> None:
    cli.setup_logging()
    args = parse_args()
    new_tokens = 20 if args.quick else args.new_tokens
    from llms_from_scratch.ch04 import generate_text_simple

    with tempfile.TemporaryDirectory() as tmp:
        hf, ours, book = build_models(args.quick, Path(tmp))
    prompt = torch.randint(0, 50257, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    context = ours.cfg.context_length
    log.info("model: %d layers, %.1fM parameters (tied head); prompt %d tokens, %d new tokens, %d threads",
             ours.cfg.n_layers, ours.num_parameters() / 1e6, args.prompt_tokens, new_tokens, torch.get_num_threads())

    bf16_fast = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16).eval()

    def run_hf() -> torch.Tensor:
        with torch.inference_mode():
            return hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=50256,
            )

    def run_book() -> torch.Tensor:
        with torch.inference_mode():
            return generate_text_simple(book, prompt, new_tokens, context)

    contenders: dict[str, tuple[Callable[[], torch.Tensor], int]] = {
        "huggingface_generate_fp32": (run_hf, args.repeats),
        "book_no_cache_fp32": (run_book, args.book_repeats),
        "scratchgpt_kv_cache_fp32": (lambda: generate(ours, prompt, new_tokens), args.repeats),
        # Decoding one token is bound by memory bandwidth: bf16 weights and cache halve the bytes read.
        "scratchgpt_kv_cache_bf16": (lambda: generate(ours_bf16, prompt, new_tokens), args.repeats),
    }
    results: dict[str, dict[str, float]] = {}
    outputs: dict[str, torch.Tensor] = {}
    for name, (fn, repeats) in contenders.items():
        log.info("timing %s (%d runs)", name, repeats)
        seconds, outputs[name] = time_runs(fn, repeats)
        results[name] = {"seconds": round(seconds, 4), "tokens_per_s": round(new_tokens / seconds, 2)}
        log.info("%s: %.1f tokens/s", name, new_tokens / seconds)

    reference = results["huggingface_generate_fp32"]["tokens_per_s"]
    for entry in results.values():
        entry["ratio_vs_huggingface"] = round(entry["tokens_per_s"] / reference, 3)
    fp32_agrees = all(
        torch.equal(outputs[name], outputs["huggingface_generate_fp32"])
        for name in ("book_no_cache_fp32", "scratchgpt_kv_cache_fp32")
    )
    report = {
        "benchmark": "greedy generation, batch 1, random GPT-2 weights",
        "model_layers": ours.cfg.n_layers,
        "parameters": ours.num_parameters(),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": new_tokens,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "fp32_outputs_identical": fp32_agrees,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_fast_path_available": bool(bf16_fast),
        "bf16_tokens_matching_fp32": int(
            (outputs["scratchgpt_kv_cache_bf16"] == outputs["scratchgpt_kv_cache_fp32"])[0, args.prompt_tokens :]
            .cumprod(0)
            .sum()
        ),
        "results": results,
    }
    write_json(args.output, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
