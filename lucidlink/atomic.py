"""
Files replaced atomically and durably: a reader sees the old content or the
new, never half of it, and the new content survives a crash once the call
returns.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_folder(folder: Path | str) -> None:
    """Make a folder's entries (a new file or folder, a rename, a link) durable."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """
    Replace ``path`` with ``data`` so that a crash leaves the old file or the new one.

    A temporary file beside ``path`` is created with ``mode``, written and
    fsynced, renamed over ``path``, and the folder is fsynced so the rename
    itself is durable.  A missing folder is made with mode 0700.

    ``durable=False`` leaves out both fsyncs, for files that only save work
    (caches): a process that dies still leaves the old file or the new one,
    but after a power cut the file may be either, or empty.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            if durable:
                stream.flush()
                os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(path.parent)
