"""What the benchmarks record about the machine they ran on (imported by the scripts beside it).

    python bench/machine.py     # this machine's facts as JSON: CPU flags (AVX-512 BF16, AMX), threads, load
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
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


def main(argv: list[str] | None = None) -> None:
    cli.parser(__doc__).parse_args(argv)
    print(json.dumps(machine_facts(), indent=2))


if __name__ == "__main__":
    main()
