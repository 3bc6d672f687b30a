"""Benchmark the tokenize stage: end-to-end corpus encoding vs raw tiktoken, and peak memory.

Builds a corpus of at least --size-mb MB in a temporary directory by repeating the texts the
pipeline downloads (the-verdict, the instruction JSON, the SMS collection), split into documents
of --doc-mb MB. Then, each in a fresh subprocess so that peak RSS is its own:

  raw      tiktoken `encode_ordinary_batch` on the documents already in memory (encode time only)
  stream   `scratchgpt.data.corpus.encode_corpus`: read + decode + chunk + encode + Parquet write
  stream   the same on a quarter of the corpus, to show that peak memory does not grow with it

Each worker warms up (a tiny run) before the timed one, so one-time library set-up is not
counted. The runs are interleaved --repeats times; throughput is MB of UTF-8 text per second, best run
kept, peak RSS the largest seen. Writes --out (JSON).

(Not called `tokenize.py`: a script's directory comes first on sys.path, and a `tokenize.py`
there would shadow the standard library module of that name.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from machine import machine_facts

from scratchgpt.plumbing import cli

log = logging.getLogger("bench.tokenize_speed")

MB = 1_000_000


def default_source_dir() -> str:
    return os.environ.get("SCRATCHGPT_MIRROR", "data/raw")


def source_texts(source_dir: Path) -> list[str]:
    """The pipeline's texts, from a download directory or a mirror (the spam file inside its zip)."""
    texts = [(source_dir / n).read_text(encoding="utf-8") for n in ("the-verdict.txt", "instruction-data.json")]
    spam = source_dir / "SMSSpamCollection"
    if spam.is_file():
        texts.append(spam.read_text(encoding="utf-8"))
    else:
        with zipfile.ZipFile(source_dir / "sms+spam+collection.zip") as zf:
            texts.append(zf.read("SMSSpamCollection").decode("utf-8"))
    return texts


def build_corpus(source_dir: Path, out_dir: Path, size_mb: float, doc_mb: float) -> list[Path]:
    """Documents of about `doc_mb` MB each, together at least `size_mb` MB."""
    unit = "\n\n".join(source_texts(source_dir)).encode("utf-8")
    per_doc = max(1, round(doc_mb * MB / len(unit)))
    doc = b"\n\n".join([unit] * per_doc)
    n_docs = max(1, -(-int(size_mb * MB) // len(doc)))
    paths = []
    for i in range(n_docs):
        path = out_dir / f"doc{i:04d}.txt"
        path.write_bytes(doc)
        paths.append(path)
    return paths


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this process; prints a JSON line."""
    from scratchgpt.data.corpus import encode_corpus
    from scratchgpt.data.tokenizer import gpt2_tokenizer

    enc = gpt2_tokenizer(args.vocab_dir)
    paths = [Path(p) for p in args.paths]
    n_bytes = sum(p.stat().st_size for p in paths)
    threads = args.threads or os.cpu_count() or 1
    # Warm up first: one-time library set-up (Arrow's first Parquet write costs ~0.3 s) is not throughput.
    with tempfile.TemporaryDirectory() as tmp:
        if args.worker == "raw":
            enc.encode_ordinary_batch([paths[0].read_text(encoding="utf-8")[:10_000]] * threads, num_threads=threads)
        else:
            (Path(tmp) / "warm.txt").write_text("warm up " * 1000, encoding="utf-8")
            encode_corpus([Path(tmp) / "warm.txt"], enc, Path(tmp) / "warm.parquet", progress=False)
    rss_before = peak_rss_mb()
    if args.worker == "raw":
        texts = [p.read_text(encoding="utf-8") for p in paths]
        start = time.perf_counter()
        ids = enc.encode_ordinary_batch(texts, num_threads=threads)
        seconds = time.perf_counter() - start
        tokens = sum(len(x) for x in ids)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            stats = encode_corpus(
                paths, enc, Path(tmp) / "tokens.parquet", num_threads=threads, chunk_bytes=args.chunk_bytes,
                progress=False,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            tokens = stats.tokens
    return {
        "mode": args.worker,
        "documents": len(paths),
        "mb": round(n_bytes / MB, 2),
        "tokens": tokens,
        "threads": threads,
        "seconds": round(seconds, 3),
        "mb_per_s": round(n_bytes / MB / seconds, 2),
        "rss_before_mb": round(rss_before, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def measure(args: argparse.Namespace, mode: str, paths: list[Path]) -> dict:
    """One fresh subprocess per run (its own peak RSS)."""
    cmd = [
        sys.executable, __file__, "--worker", mode, "--vocab-dir", str(args.vocab_dir), "--threads", str(args.threads),
        "--chunk-bytes", str(args.chunk_bytes), *map(str, paths),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {mode} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    log.info(
        "%-6s %7.1f MB: %6.2f MB/s, peak RSS %7.1f MB", mode, result["mb"], result["mb_per_s"], result["peak_rss_mb"]
    )
    return result


def best_of(runs: list[dict]) -> dict:
    """The fastest run, with every run's time and the largest peak RSS seen."""
    best = dict(max(runs, key=lambda r: r["mb_per_s"]))
    best["seconds"] = [r["seconds"] for r in runs]
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--size-mb", type=float, default=100.0, help="corpus size (default: %(default)s)")
    parser.add_argument("--doc-mb", type=float, default=10.0, help="size of each document (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement, best kept (default: 3)")
    parser.add_argument("--threads", type=int, default=0, help="encoder threads, 0 = one per CPU (default: 0)")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20, help="encode_corpus chunk size (default: 1 MiB)")
    parser.add_argument("--source-dir", default=default_source_dir(), help="texts: $SCRATCHGPT_MIRROR or data/raw")
    parser.add_argument("--vocab-dir", default=None, help="vocab.bpe + encoder.json (default: --source-dir)")
    parser.add_argument("--out", default="bench/results/tokenize.json", help="results JSON (default: %(default)s)")
    parser.add_argument("--worker", choices=["raw", "stream"], help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.vocab_dir = Path(args.vocab_dir or args.source_dir)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    cli.setup_logging()
    from scratchgpt.plumbing.fileio import write_json

    with tempfile.TemporaryDirectory(prefix="tokenize-bench-") as tmp:
        paths = build_corpus(Path(args.source_dir), Path(tmp), args.size_mb, args.doc_mb)
        total = sum(p.stat().st_size for p in paths) / MB
        log.info("corpus: %d documents, %.1f MB in %s", len(paths), total, tmp)
        quarter_paths = paths[: max(1, len(paths) // 4)]
        runs: dict[str, list[dict]] = {"raw": [], "stream": [], "quarter": []}
        for _ in range(args.repeats):  # interleaved, so that load from elsewhere hits both alike
            runs["raw"].append(measure(args, "raw", paths))
            runs["stream"].append(measure(args, "stream", paths))
            runs["quarter"].append(measure(args, "stream", quarter_paths))
        raw, stream, quarter = (best_of(runs[k]) for k in ("raw", "stream", "quarter"))
    if stream["tokens"] != raw["tokens"] + len(paths) - 1:
        raise SystemExit(f"token counts disagree: stream {stream['tokens']}, raw {raw['tokens']} + separators")
    results = {
        "command": " ".join(["python", "bench/tokenize_speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**machine_facts(), "platform": platform.platform()},
        "corpus_mb": round(total, 2),
        "raw_tiktoken": raw,
        "encode_corpus": stream,
        "encode_corpus_quarter": quarter,
        "throughput_ratio": round(stream["mb_per_s"] / raw["mb_per_s"], 3),
        "peak_rss_growth_mb": round(stream["peak_rss_mb"] - quarter["peak_rss_mb"], 1),
    }
    write_json(args.out, results)
    log.info(
        "encode_corpus %.2f MB/s vs raw tiktoken %.2f MB/s: %.2fx; peak RSS %.0f MB (%.0f MB) vs %.0f MB (%.0f MB)",
        stream["mb_per_s"], raw["mb_per_s"], results["throughput_ratio"], stream["peak_rss_mb"], stream["mb"],
        quarter["peak_rss_mb"], quarter["mb"],
    )  # fmt: skip
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
