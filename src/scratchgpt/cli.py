"""What every command-line entry point (stage scripts, benchmarks, `python -m scratchgpt.*`) shares."""

from __future__ import annotations

import argparse
import logging
from typing import Any

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Timestamped `logger LEVEL message` lines on stderr."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def parser(doc: str | None, *, params: bool = False, **kwargs: Any) -> argparse.ArgumentParser:
    """An argument parser whose --help shows the module docstring as written (and, for stages, --params)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    if params:
        p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    return p
