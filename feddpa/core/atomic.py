"""The one durable, atomic file writer every module uses (no torch here: datasets and serving
import it cheaply). A file written through it holds its old bytes or its new ones, never a torn
write, and the rename is itself made durable by fsyncing the directory."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _read_umask() -> int:
    current = os.umask(0)  # the only way to read it; done once, at import, before any thread
    os.umask(current)
    return current


_UMASK = _read_umask()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write and fsync a file that nobody reads yet (inside a temp directory renamed whole)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(
    path: Path, data: bytes, *, exclusive: bool = False, mode: int | None = None
) -> None:
    """Replace `path` with `data` atomically and durably. `exclusive`: never overwrite — fail with
    FileExistsError if `path` exists, even if it appears while this call runs. `mode`: the file's
    permissions (default: the temp file's 0o600 widened by the umask as for a new file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if exclusive and path.exists():
        raise FileExistsError(f"{path} exists")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, path)  # unlike rename, fails if `path` appeared meanwhile
        else:
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(Path(dirpath) / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))
