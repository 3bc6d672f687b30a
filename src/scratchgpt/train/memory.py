"""Process memory settings for CPU training.

glibc serves each allocation above its mmap threshold (adaptive, at most 32 MiB) with a fresh mapping
and unmaps it on free. A language model's logits, log-probabilities and head/embedding gradients are
100-150 MB at gpt2-small, so every training step page-faults ~0.7 GB of zeroed pages and slows the
matmuls that first write them. Keeping freed memory in the heap removes that (measured +30 % training
throughput here, bench/train_speed.py). PyTorch's CPU tuning guide reaches the same end with
jemalloc/tcmalloc; mallopt needs no preload.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import platform
from collections.abc import Callable, Iterator

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
GLIBC_DEFAULT_MMAP_MAX, GLIBC_DEFAULT_TRIM_THRESHOLD = 65536, 128 * 1024


def glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt`, or None (another libc, another OS)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return getattr(libc, "mallopt", None)


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[None]:
    """Serve every allocation from glibc's heap and never give freed memory back to the kernel.

    By default glibc mmaps each allocation above its (adaptive, at most 32 MiB) threshold and unmaps
    it on free; gpt2-small's logits, log-probabilities and head and embedding gradients are 100-150 MB
    each, so every training step page-faults ~0.7 GB of fresh zeroed pages. PyTorch's CPU tuning
    guide suggests jemalloc or tcmalloc for this; mallopt does it without a preload. On exit glibc's
    defaults are restored (its adaptive threshold stays frozen) and the free memory is trimmed.
    """
    mallopt = glibc_mallopt()
    if mallopt is None:
        raise RuntimeError("keep_freed_memory needs glibc")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        mallopt(M_MMAP_MAX, GLIBC_DEFAULT_MMAP_MAX)
        mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_TRIM_THRESHOLD)
        gc.collect()
        libc.malloc_trim(0)


