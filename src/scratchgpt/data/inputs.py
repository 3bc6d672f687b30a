"""Where the pipeline's input files live, so that DVC sees every change to them.

The tokenize stage reads every input: the download stage's files in `data/raw/` and the user's own files in
`data/external/`. Both directories are dependencies of the stage in `dvc.yaml`, so editing one row of a user
file reruns tokenize (and, as their inputs change, the stages after it) on the next `dvc repro`; a path
elsewhere could change without DVC noticing and leave a stale result, so `check_input_path` refuses it
before any work. Files fetched by URL are declared in `download.files` and land in `data/raw/`.

A corpus entry may name one file, a directory (every file under it, recursively, in path order; hidden
files skipped) or a glob (`*`, `?`, `[...]`, and `**` for any depth; matches in path order); `expand`
resolves it.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path, PurePosixPath

RAW_DIR = "data/raw"
"""The download stage's output: the pinned sources and the files of `download.files`."""
EXTERNAL_DIR = "data/external"
"""Your own files (a dependency of the tokenize stage in dvc.yaml)."""
INPUT_DIRS = (RAW_DIR, EXTERNAL_DIR)
_GLOB_CHARS = frozenset("*?[")


def check_input_path(path: str, setting: str) -> None:
    """ValueError unless `path` is a relative path (or glob) inside `data/raw/` or `data/external/`."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{setting}: expected a file path, got {path!r}")
    posix = PurePosixPath(path.replace("\\", "/"))
    inside = not posix.is_absolute() and ".." not in posix.parts and any(
        posix.parts[: len(PurePosixPath(d).parts)] == PurePosixPath(d).parts for d in INPUT_DIRS
    )
    if not inside:
        raise ValueError(
            f"{setting}: {path!r} is outside {' and '.join(d + '/' for d in INPUT_DIRS)}, where DVC would not see it "
            f"change; put the file in {EXTERNAL_DIR}/ (or fetch it into {RAW_DIR}/ with download.files)"
        )


def is_pattern(path: str) -> bool:
    """Whether `path` is a glob pattern."""
    return any(c in _GLOB_CHARS for c in path)


def expand(path: str, setting: str) -> list[Path]:
    """The files `path` names: itself, every file under a directory, or a glob's matches; FileNotFoundError
    naming the setting when there is none."""
    if is_pattern(path):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file() and not _hidden(Path(p)))
        what = "matches no file"
    elif Path(path).is_dir():
        files = sorted(p for p in Path(path).rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        what = "is a directory holding no file"
    elif Path(path).is_file():
        return [Path(path)]
    else:
        files, what = [], "not found"
    if not files:
        raise FileNotFoundError(f"{setting}: {path} {what}")
    return files


def _hidden(path: Path) -> bool:
    return any(part.startswith(".") for part in path.parts if part not in (".", ".."))


def display(path: str | os.PathLike[str]) -> str:
    """A path as the params name it (forward slashes)."""
    return Path(path).as_posix()
