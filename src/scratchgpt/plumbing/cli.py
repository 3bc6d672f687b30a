"""What every command-line entry point (stage scripts, benchmarks, `python -m scratchgpt.*`) shares."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from scratchgpt.plumbing.fileio import DiskFullError, disk_full_errno

T = TypeVar("T")

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Timestamped `logger LEVEL message` lines on stderr."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    # urllib3 logs each retry of MLflow's HTTP client as a WARNING with the whole exception; the tracking
    # module says once, in its own words, what failed (docs/faults.md).
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def parser(doc: str | None, *, params: bool = False, **kwargs: Any) -> argparse.ArgumentParser:
    """An argument parser whose --help shows the module docstring as written (and, for stages, --params)."""
    kwargs.setdefault("prog", _module_prog())
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    if params:
        p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    return p


def _module_prog() -> str | None:
    """`python -m scratchgpt.x` when run so (argparse would say `x.py`), else None (argparse's own choice)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec is not None and spec.name else None


def setup_stage_logging() -> None:
    """`setup_logging`, with only warnings from the processes other than rank 0 under torchrun."""
    setup_logging()
    if int(os.environ.get("RANK", "0")) > 0:
        logging.getLogger().setLevel(logging.WARNING)


def run_stage(
    run: Callable[[], T],
    expected: tuple[type[BaseException], ...],
    log: logging.Logger,
    cleanup: Callable[[], None] | None = None,
) -> T:
    """`run()`; an `expected` error (bad params, missing input, ...) is logged as one line and exits 1.

    A full disk is always expected: `DiskFullError`, or any error that reports ENOSPC/EFBIG/EDQUOT.
    `cleanup` (e.g. `distributed.teardown`) runs in every case.
    """
    try:
        return run()
    except (*expected, DiskFullError) as exc:
        log.error("%s", exc)
        raise SystemExit(1) from exc
    except Exception as exc:
        if disk_full_errno(exc) is None:
            raise
        log.error("%s: the disk is full (%s)", type(exc).__name__, exc)
        raise SystemExit(1) from exc
    finally:
        if cleanup is not None:
            cleanup()
