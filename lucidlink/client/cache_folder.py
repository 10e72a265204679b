"""
A filespace's local folder, shared safely by the client processes of one machine.

``cache_dir/<filespace id>/`` holds numbered slots (``1/``, ``2/``, ...),
each with its chunk cache and its write-back journals.  A client process
takes the first slot no live process holds (an exclusive ``flock`` on the
slot's ``lock`` file, held until it closes or dies), so one mount after
another reuses slot 1 and finds its cache, while two mounts at once never
share an index or replay each other's live journals.  The slots of
processes that died can be taken by the next client to commit the writes
they left (:meth:`CacheFolder.orphans`), and their chunk caches are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lucidlink.errors import InvalidArgument

LOCK_NAME = "lock"
MAX_SLOTS = 64


def _try_lock(slot: Path) -> int | None:
    """An open, exclusively locked descriptor of the slot's lock file; None if a live process holds it."""
    slot.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(slot / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


class CacheFolder:
    """This process's slot of a filespace's local folder ``root`` (see the module)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for number in range(1, MAX_SLOTS + 1):
            descriptor = _try_lock(self.root / str(number))
            if descriptor is not None:
                self.slot = self.root / str(number)
                self._lock: int | None = descriptor
                with contextlib.suppress(OSError):  # a note for people: a full disk must not stop the mount here
                    os.ftruncate(descriptor, 0)
                    os.write(descriptor, f"{os.getpid()}\n".encode())
                return
        raise InvalidArgument(f"all {MAX_SLOTS} slots of the cache folder {self.root} are in use by live processes")

    def __repr__(self) -> str:
        return f"<CacheFolder {self.slot}>"

    @property
    def chunks(self) -> Path:
        return self.slot / "chunks"

    @property
    def writeback(self) -> Path:
        return self.slot / "writeback"

    @contextmanager
    def orphans(self) -> Iterator[list[Path]]:
        """
        The write-back folders of the other slots no live process holds, locked (so not taken) while in use.

        Their chunk caches are removed: one process's cache is bound by its
        size, the disk would not be if every dead slot kept its own.
        """
        taken: list[tuple[Path, int]] = []
        try:
            for slot in sorted(self.root.iterdir()):
                if slot == self.slot or not slot.name.isdigit():
                    continue
                descriptor = _try_lock(slot)
                if descriptor is not None:
                    taken.append((slot, descriptor))
                    shutil.rmtree(slot / "chunks", ignore_errors=True)
            yield [slot / "writeback" for slot, _ in taken if (slot / "writeback").is_dir()]
        finally:
            for _, descriptor in taken:
                os.close(descriptor)

    def close(self) -> None:
        """Let the slot go (the next process may take it)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
