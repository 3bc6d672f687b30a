"""File helpers: atomic output (write to a temporary name beside the target, then rename) and hashing.

A reader (or a crashed run) never sees a half-written file at the final path. A write that fails because
the disk is full (ENOSPC, EDQUOT) or a file-size limit is reached (EFBIG) raises `DiskFullError` naming
the output and its directory; the previous output is left as it was and the temporary one is removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
# How writers that are not Python file objects report the errno: safetensors (Rust) says "(os error 28)",
# Arrow "[errno 28]".
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[errno (\d+)\]", re.IGNORECASE)


class DiskFullError(OSError):
    """An output could not be written: the disk is full, or a file-size limit was reached."""

    def __init__(self, target: str | os.PathLike[str], code: int) -> None:
        target = Path(target)
        where = target.parent.resolve()
        cause = {
            errno.EFBIG: f"the disk is full for a file this large (file too large in {where}: a file-size limit, "
            "`ulimit -f`, or the filesystem's largest file)",
            errno.EDQUOT: f"the disk is full for this user (the quota on {where} is used up)",
        }.get(code, f"the disk is full (no space left on the device holding {where})")
        self.target = target
        self.message = (
            f"cannot write {target}: {cause}. Any previous {target.name} is left as it was and nothing "
            "half-written remains; free some space (or raise the limit) and rerun"
        )
        super().__init__(code, self.message, str(target))

    def __str__(self) -> str:
        return self.message


def disk_full_errno(exc: BaseException) -> int | None:
    """ENOSPC, EFBIG or EDQUOT if `exc`, or an exception it was raised from, reports one; else None.

    Torch's and safetensors' writers wrap the OSError (or only quote its errno in their message).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current.errno
        for match in _ERRNO_IN_TEXT.finditer(str(current)):
            code = int(match.group(1) or match.group(2))
            if code in DISK_FULL_ERRNOS:
                return code
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def _disk_full_names(target: Path) -> Iterator[None]:
    """Re-raise a disk-full error from the block as `DiskFullError` naming `target`."""
    try:
        yield
    except BaseException as exc:
        code = disk_full_errno(exc)
        if code is None or (isinstance(exc, DiskFullError) and exc.target == target):
            raise
        raise DiskFullError(target, code) from exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it to `path` on success.

    On an exception the temporary file is removed and `path` is left untouched (a full disk: `DiskFullError`).
    """
    target = Path(path)
    with _disk_full_names(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            # mkstemp makes 0600 (and writers such as safetensors recreate the file): outputs get the usual
            # permissions
            tmp.chmod(0o666 & ~_umask())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` (an existing directory is swapped out).

    On an exception the temporary directory is removed and `path` is left untouched (a full disk:
    `DiskFullError` naming `path`).
    """
    target = Path(path)
    with _disk_full_names(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700
            yield tmp
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write `data` to `path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write UTF-8 `text` to `path`."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write `obj` as indented, key-sorted JSON (stable diffs for DVC metrics)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()
