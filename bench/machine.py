"""What the benchmarks record about the machine they ran on (imported by the scripts beside it).

The CPU's model and flags, threads and load (`machine_facts`), and what the hardware can do: the matmul
peak of each precision (`measure_peaks`) and the memory bandwidth (`memory_bandwidth`), the denominators
of the benches' MFU (model FLOPs utilisation) and MBU (memory bandwidth utilisation).

    python bench/machine.py             # this machine's facts as JSON: CPU flags (AVX-512 BF16, AMX), threads, load
    python bench/machine.py --measure   # and its fp32/bf16 matmul peaks and memory bandwidth (~10 s)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from scratchgpt.plumbing import cli

# The CPU flags that decide which matmul kernels (fp32 AVX2/AVX-512, bf16 AVX512-BF16/AMX) exist.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and its /proc/cpuinfo flags."""
    name: str | None = None
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and name is None:
                name = value
            elif key == "flags" and not flags:
                flags = set(value.split())
    return name or platform.processor() or "unknown", flags


def bf16_fast() -> bool:
    """True where oneDNN has a native bf16 path on this CPU (AVX512-BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def machine_facts() -> dict[str, Any]:
    """CPU, flags, torch and Python versions, threads, and the load average as the benchmark starts."""
    name, flags = cpu_info()
    return {
        "cpu": name,
        "cpu_count": os.cpu_count(),
        "cpu_flags": {f: f in flags for f in RELEVANT_FLAGS},
        "cpu_simd_flags": sorted(f for f in flags if f.startswith(("sse", "ssse", "avx", "fma", "amx", "f16c"))),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16_supported": bf16_fast(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "libc": "-".join(platform.libc_ver()),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def log_machine(log: logging.Logger) -> dict[str, Any]:
    """`machine_facts()`, logged, with a warning when other processes already load the CPU."""
    machine = machine_facts()
    log.info("machine: %s", machine)
    if machine["load_average_start"][0] > 0.5 * (os.cpu_count() or 1):
        log.warning("load average %s: other processes share the CPU; timings will be noisy",
                    machine["load_average_start"])  # fmt: skip
    return machine


def matmul_gflops(shape: tuple[int, int, int], dtype: torch.dtype, transposed: bool, repeats: int) -> float:
    """Best GFLOP/s of an (m x k) @ (k x n) matmul over `repeats` timed runs after one warm-up.

    `transposed`: the right operand is the transpose of a row-major (n x k) matrix, as a Linear's
    forward multiplies by its weight; otherwise it is row-major (k x n), as the input gradient is.
    """
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, k, generator=gen).to(dtype).t() if transposed else torch.randn(k, n, generator=gen).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def matmul_peak(dtype: torch.dtype, repeats: int, size: int) -> dict[str, float]:
    """GFLOP/s of square `size` matmuls (both layouts of the right operand) and of the MLP's forward
    matmul at gpt2-small (2 x 256 tokens, 768 -> 3072); `peak` is the best of them."""
    shapes = {
        f"square_{size}_nn": ((size, size, size), False),
        f"square_{size}_nt": ((size, size, size), True),
        "mlp_512x768x3072_nt": ((512, 768, 3072), True),
    }
    out = {name: round(matmul_gflops(shape, dtype, t, repeats), 2) for name, (shape, t) in shapes.items()}
    out["peak"] = max(out.values())
    return out


def measure_peaks(quick: bool = False) -> dict[str, dict[str, float]]:
    """fp32 and bf16 matmul GFLOP/s (see `matmul_peak`); each dict's `peak` is the MFU denominator."""
    size = 1024 if quick else 2048
    out = {"fp32": matmul_peak(torch.float32, 2 if quick else 5, size)}
    # Without a fast bf16 path one 2048 matmul takes over a minute; 512 shows the same.
    slow = not bf16_fast()
    out["bf16"] = matmul_peak(torch.bfloat16, 1 if slow else 3, 512 if slow else size)
    return out


def best_peaks(*measured: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each precision's best peak over several `measure_peaks` (load from other processes can lower
    a measurement, never raise it)."""
    return {dtype: max(m[dtype]["peak"] for m in measured) for dtype in measured[0]}


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Best GB/s of reading a `megabytes` fp32 tensor (a sum over it, every intra-op thread): the
    bound on decoding, which reads every weight once per token."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return round(x.numel() * 4 / best / 1e9, 2)


def utilisation(achieved: float, peak: float) -> float:
    """`achieved / peak` rounded for the JSON (MFU from FLOP/s, MBU from bytes/s)."""
    return round(achieved / peak, 4)


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--measure", action="store_true", help="also measure the matmul peaks and memory bandwidth")
    args = parser.parse_args(argv)
    facts = machine_facts()
    if args.measure:
        facts |= {"matmul_gflops": measure_peaks(), "memory_bandwidth_gbs": memory_bandwidth()}
    print(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
