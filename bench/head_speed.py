"""The output head and loss of a gpt2-small training step: the plain product vs the padded one.

`scratchgpt.nn.fastpath.head` multiplies by the head's weight padded with zero rows to a multiple of 64 (50,304
for GPT-2's 50,257). This times forward and backward of the head and the cross-entropy alone, as the book
preset's step runs them (2 x 256 tokens, emb_dim 768, fp32, glibc's heap kept as `Trainer.fit` keeps it):
both contenders in one process on the same tensors, in interleaved rounds (median and best reported), with
the loss and gradients compared. MFU: the head's 3 products (forward, input and weight gradients) of
2 * 512 * 768 * 50,257 FLOPs each against the fp32 matmul peak. Results go to `bench/results/head_speed.json`.

    python bench/head_speed.py            # ~1 min
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import best_peaks, log_machine, measure_peaks, utilisation
from torch.nn import functional as F

from scratchgpt.nn import fastpath
from scratchgpt.plumbing import cli
from scratchgpt.plumbing.fileio import write_json
from scratchgpt.train.memory import keep_freed_memory

log = logging.getLogger("bench.head_speed")
RESULTS = Path(__file__).parent / "results" / "head_speed.json"
ROWS, EMB, VOCAB = 512, 768, 50257


def step(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, plain: bool) -> Callable[[], list]:
    """Forward and backward of the head and the loss; returns the loss and the gradients."""
    def run() -> list[torch.Tensor]:
        old = fastpath.HEAD_PAD_MIN_ROWS
        fastpath.HEAD_PAD_MIN_ROWS = 2**62 if plain else old
        try:
            head.weight.grad = None
            x = hidden.clone().requires_grad_()
            loss = F.cross_entropy(fastpath.head(head, x), targets)
            loss.backward()
            return [loss.detach(), x.grad, head.weight.grad]
        finally:
            fastpath.HEAD_PAD_MIN_ROWS = old

    return run


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cli.setup_logging()
    machine = log_machine(log)
    peaks_start = measure_peaks()
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(EMB, VOCAB, bias=False)
    hidden = torch.randn(ROWS, EMB, generator=gen)
    targets = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    runs = {"plain": step(head, hidden, targets, plain=True), "padded": step(head, hidden, targets, plain=False)}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    with keep_freed_memory():
        outputs = {name: run() for name, run in runs.items()}  # warm-up, and the results compared
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    peaks = best_peaks(peaks_start, measure_peaks())
    flops = 3 * 2 * ROWS * EMB * VOCAB
    results = {name: {"seconds_median": round(statistics.median(s), 4), "seconds_best": round(min(s), 4),
                      "all_seconds": [round(x, 4) for x in s],
                      "mfu_fp32": utilisation(flops / statistics.median(s) / 1e9, peaks["fp32"])}
               for name, s in seconds.items()}  # fmt: skip
    same = [bool(torch.equal(a, b)) for a, b in zip(outputs["plain"], outputs["padded"], strict=True)]
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {
        "benchmark": "gpt2-small output head + cross-entropy, forward and backward: plain vs padded product",
        "command": "python bench/head_speed.py",
        "machine": machine,
        "matmul_gflops": {"start": peaks_start, "peak": peaks},
        "shape": {"rows": ROWS, "emb_dim": EMB, "vocab": VOCAB, "padded_to": -(-VOCAB // 64) * 64},
        "head_flops": flops,
        "bit_identical": dict(zip(("loss", "input_grad", "weight_grad"), same, strict=True)),
        "saved_s_median": round(results["plain"]["seconds_median"] - results["padded"]["seconds_median"], 4),
        "results": results,
    }
    write_json(args.output, report)
    log.info("%s", {k: v for k, v in report.items() if k not in ("machine", "matmul_gflops")})


if __name__ == "__main__":
    main()
