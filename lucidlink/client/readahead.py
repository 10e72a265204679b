"""
Read-ahead: telling a sequential reader from a random one, and which chunks to fetch for it.

Each open file handle has a :class:`SequentialReads`.  A read that starts
where the handle's previous read ended continues a run; after
``STREAK`` such reads in a row the reader is taken as sequential, and the
chunk it reads and the ``depth`` chunks after it are asked for (each only
once while the run lasts), so the fetches stay ahead of the reader and it
never waits a round trip per chunk.  Any other read ends the run: random
reads fetch only what they read.
"""

from __future__ import annotations

STREAK = 2
"""Reads in a row, each starting where the last ended, that make a reader sequential."""


class SequentialReads:
    """The read pattern of one handle (see the module); ``depth`` 0 turns read-ahead off."""

    def __init__(self, chunk_size: int, depth: int) -> None:
        self.chunk_size = chunk_size
        self.depth = depth
        self.streak = 0
        self._next: int | None = None
        self._ahead_until = 0

    @property
    def sequential(self) -> bool:
        return self.streak >= STREAK

    def observe(self, offset: int, size: int, file_size: int) -> range:
        """Note a read of ``size`` bytes at ``offset``; the chunks to fetch ahead now (often none)."""
        if self._next is not None and offset == self._next:
            self.streak += 1
        else:
            self.streak = 0
            self._ahead_until = 0
        self._next = offset + size
        if self.depth <= 0 or not self.sequential or file_size <= 0:
            return range(0)
        current = offset // self.chunk_size
        last = min(current + self.depth, (file_size - 1) // self.chunk_size)
        start = max(current, self._ahead_until)
        if start > last:
            return range(0)
        self._ahead_until = last + 1
        return range(start, last + 1)
