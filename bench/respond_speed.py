"""Test-response speed: the instruct-finetune stage's batched, KV-cached generation vs the book's loop.

Both answer the 110 test instructions (`data/processed/instruct/test.parquet`) greedily with the same model
(`models/instruct`, loaded into our `GPTModel` and into the book's `llms_from_scratch.ch04.GPTModel`), in
one process:

  book    the book's chapter-7 loop: one prompt at a time through `llms_from_scratch.ch05.generate`
          (no KV cache: every new token re-reads the whole sequence), stopping at end-of-text.
  ours    `scratchgpt.nn.generate.generate_batch` as the stage calls it: `--batch-size` prompts together
          (left-padded, padding mask, per-row positions), one pre-allocated KV cache, the output head on
          the last position only, stopping each row at end-of-text.

Two workloads: `eos` (what the stage does: stop at end-of-text, so a model that answers briefly generates
few tokens) and `full` (no stop: every prompt gets `--max-new-tokens` tokens, a throughput measure). Runs
are interleaved over `--rounds`; the median time is reported, as generated tokens per second, with the
check that both produce the same tokens, and MFU: 2 FLOPs per weight of every Linear per generated token
(the book's loop re-reads the whole sequence, so its real work is larger) against the fp32 matmul peak
measured before and after (`bench/machine.py`, as the machine's CPU model and flags). Results go to
`bench/results/respond_speed.json`.

    python bench/respond_speed.py                 # after `dvc repro instruct-finetune`
    python bench/respond_speed.py --quick         # one round, 24 prompts
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from machine import best_peaks, log_machine, measure_peaks, utilisation

from scratchgpt.apps.instruct import END_OF_TEXT, InstructionDataset
from scratchgpt.nn.checkpoint import load_model
from scratchgpt.nn.generate import generate_batch
from scratchgpt.plumbing import cli
from scratchgpt.plumbing.fileio import write_json
from scratchgpt.plumbing.params import read_params

log = logging.getLogger("bench.respond_speed")
RESULTS = Path(__file__).parent / "results" / "respond_speed.json"


def book_model(ours: torch.nn.Module) -> torch.nn.Module:
    """The book's GPTModel holding our model's weights."""
    from llms_from_scratch.ch04 import GPTModel as BookGPT

    c = ours.cfg
    config = {"vocab_size": c.vocab_size, "context_length": c.context_length, "emb_dim": c.emb_dim,
              "n_heads": c.n_heads, "n_layers": c.n_layers, "drop_rate": 0.0, "qkv_bias": c.qkv_bias}  # fmt: skip
    book = BookGPT(config)
    missing, unexpected = book.load_state_dict(ours.state_dict(), strict=False)
    if unexpected or any(not k.endswith("att.mask") for k in missing):
        raise RuntimeError(f"weights do not fit the book's model: missing {missing}, unexpected {unexpected}")
    return book.eval()


def run_book(model: torch.nn.Module, prompts: list[list[int]], new: int, eos: int | None) -> list[list[int]]:
    from llms_from_scratch.ch05 import generate

    out = []
    for p in prompts:
        idx = torch.tensor([p])
        seq = generate(model=model, idx=idx, max_new_tokens=new, context_size=model.pos_emb.num_embeddings, eos_id=eos)
        out.append(seq[0, len(p) :].tolist())
    return out


def run_ours(
    model: torch.nn.Module, prompts: list[list[int]], new: int, eos: int | None, batch: int
) -> list[list[int]]:
    out = []
    for start in range(0, len(prompts), batch):
        out += generate_batch(model, prompts[start : start + batch], new, eos_id=eos, pad_id=END_OF_TEXT)
    return out


def timed(fn) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/instruct"), help="instruction-tuned model")
    parser.add_argument("--data", type=Path, default=Path("data/processed/instruct/test.parquet"), help="test split")
    parser.add_argument("--max-new-tokens", type=int, help="default: instruct.max_new_tokens of params.yaml")
    parser.add_argument("--batch-size", type=int, help="default: instruct.generate_batch_size of params.yaml")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (median reported)")
    parser.add_argument("--quick", action="store_true", help="one round on 24 prompts")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    args = parser.parse_args(argv)
    cli.setup_logging()
    machine = log_machine(log)
    peaks_start = measure_peaks()
    params = read_params("params.yaml")["instruct"]
    new = args.max_new_tokens or params["max_new_tokens"]
    batch = args.batch_size or params["generate_batch_size"]
    ours = load_model(args.model)
    book = book_model(ours)
    linears = {id(m.weight): m.weight.numel() for m in ours.modules() if isinstance(m, torch.nn.Linear)}
    flops_per_token = 2 * sum(linears.values())
    prompts = [p.tolist() for p in InstructionDataset(args.data).prompts]
    if args.quick:
        prompts, args.rounds = prompts[:24], 1
    log.info("%d prompts, up to %d new tokens, batches of %d, %d threads", len(prompts), new, batch,
             torch.get_num_threads())  # fmt: skip

    results = {}
    for workload, eos in (("eos", END_OF_TEXT), ("full", None)):
        times: dict[str, list[float]] = {"book": [], "ours": []}
        outputs = {}
        for _ in range(args.rounds):
            contenders = (("book", partial(run_book, book, prompts, new, eos)),
                          ("ours", partial(run_ours, ours, prompts, new, eos, batch)))  # fmt: skip
            for name, fn in contenders:
                seconds, outputs[name] = timed(fn)
                times[name].append(seconds)
        tokens = sum(len(t) for t in outputs["ours"])
        entry = {"generated_tokens": tokens, "same_tokens": outputs["book"] == outputs["ours"]}
        for name in times:
            median = statistics.median(times[name])
            entry[name] = {"seconds": round(median, 3), "tokens_per_s": round(tokens / median, 1),
                           "all_seconds": [round(t, 3) for t in times[name]]}  # fmt: skip
        entry["speedup"] = round(entry["ours"]["tokens_per_s"] / entry["book"]["tokens_per_s"], 2)
        results[workload] = entry
        log.info("%s: %d tokens; book %.1f tokens/s, ours %.1f tokens/s: %.2fx; same tokens: %s", workload, tokens,
                 entry["book"]["tokens_per_s"], entry["ours"]["tokens_per_s"], entry["speedup"],
                 entry["same_tokens"])  # fmt: skip

    peaks = best_peaks(peaks_start, measure_peaks())
    for entry in results.values():
        for name in ("book", "ours"):
            entry[name]["mfu_fp32"] = utilisation(entry[name]["tokens_per_s"] * flops_per_token / 1e9, peaks["fp32"])
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out, {
        "benchmark": "110 test responses: batched KV-cached generate_batch vs the book's per-example generate loop",
        "command": "python bench/respond_speed.py" + (" --quick" if args.quick else ""),
        "model": {"path": str(args.model), **json.loads((args.model / "config.json").read_text())["model"]},
        "prompts": len(prompts), "max_new_tokens": new, "batch_size": batch, "rounds": args.rounds,
        "machine": machine, "matmul_gflops": {"start": peaks_start, "peak": peaks},
        "flops_per_token": flops_per_token,
        "results": results,
    })  # fmt: skip
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
