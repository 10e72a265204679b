"""
Inode ids this client gives its own new files: blocks the metadata server reserved for it.

A file created without waiting for the server (under a directory lease,
``docs/directory-leases.rst``) needs its inode number at once: the kernel
is told it before the ``Create`` is sent.  :class:`InodePool` keeps ids
from blocks the server reserved for this client (``ReserveInodes``, a
journaled change, so no id is given twice), and asks for the next block in
the background when the current one runs low.  The server remembers blocks
in memory and for an hour of idleness (:mod:`lucidlink.meta.inode_blocks`),
so ids reserved under another boot of the server, or long unused, are not
used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from lucidlink.protocol import messages as w

if TYPE_CHECKING:
    from lucidlink.client.session import FilespaceSession

BLOCK_SIZE = 4096
"""Ids asked for at once."""

IDLE_SECONDS = 1800.0
"""Ids unused for this long are not used (the server forgets a client's blocks after an hour of idleness)."""

_log = Logger()


class InodePool:
    """The inode ids reserved for this client and not used yet (see the module)."""

    def __init__(self, session: FilespaceSession, block_size: int = BLOCK_SIZE) -> None:
        self.session = session
        self.clock = session.reactor
        self.block_size = block_size
        self._ids: list[range] = []
        self._boot_id: bytes | None = None
        self._used_at = 0.0
        self._asking = False

    def __len__(self) -> int:
        return sum(len(block) for block in self._ids)

    def take(self) -> int | None:
        """An id of this client's own for a new inode, or None (then one is asked for, for next time)."""
        boot_id = self._current_boot()
        now = self.clock.seconds()
        if boot_id is None or boot_id != self._boot_id or now - self._used_at > IDLE_SECONDS:
            self._ids = []
        self._used_at = now
        if len(self) < self.block_size // 4:
            self._reserve(boot_id)
        inode = None
        if self._ids:
            block = self._ids[0]
            inode = block.start
            if len(block) > 1:
                self._ids[0] = range(block.start + 1, block.stop)
            else:
                self._ids.pop(0)
        return inode

    def prime(self) -> None:
        """Ask for ids now if few are left (new files are expected soon)."""
        if len(self) < self.block_size // 4:
            self._reserve(self._current_boot())

    def _current_boot(self) -> bytes | None:
        live = self.session._live
        if live is None or live.known is None:
            return None  # not connected, or a server that keeps no answers (nor blocks)
        return bytes(live.known.boot_id)

    def _reserve(self, boot_id: bytes | None) -> None:
        if self._asking or boot_id is None or self.session._closed:
            return
        self._asking = True
        self.session.call(w.ReserveInodes(self.block_size)).addCallbacks(
            self._reserved, self._not_reserved, callbackArgs=(boot_id,)
        )

    def _reserved(self, block: w.InodeBlock, boot_id: bytes) -> None:
        self._asking = False
        if self._current_boot() != boot_id:
            return  # reserved under a server that has restarted since
        if self._boot_id != boot_id:
            self._ids, self._boot_id = [], boot_id
        self._ids.append(range(block.first, block.first + block.count))
        self._used_at = self.clock.seconds()  # the server counts a reservation as use

    def _not_reserved(self, failure: Failure) -> Any:
        self._asking = False
        _log.info("no inode ids reserved for new files: {error}", error=failure.value)
