"""
Inode ids set aside for named clients, so that a client can give its own new files their ids.

A client asks for a block (``ReserveInodes``); the store moves its next
inode id past it in a journaled change, so no id is given twice, even after
a restore.  The server remembers here, in memory, which ids of which blocks
each client has used: a creation that names an id must use one of its own
client's, once.  The store keeps the blocks on record (not their uses), so
a restarted server knows them again, as blocks whose uses it did not see: a
change in flight across the restart, sent again, still names its id.  A
client asks for a new block after a restart; so does a client that holds
more than ``max_blocks`` blocks (its oldest is forgotten) or has used none
of its ids for ``idle_seconds``.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from lucidlink.errors import InvalidArgument

MAX_BLOCKS = 4
"""Blocks a client holds at most: a fifth makes it forget its oldest."""

IDLE_SECONDS = 3600.0
"""A client that reserved or used no id for this long loses its blocks."""


class InodeBlocks:
    """Every named client's blocks, and the ids of each it has used."""

    def __init__(self, clock: IReactorTime, max_blocks: int = MAX_BLOCKS, idle_seconds: float = IDLE_SECONDS) -> None:
        self.clock = clock
        self.max_blocks = max_blocks
        self.idle_seconds = idle_seconds
        self._blocks: dict[bytes, dict[range, set[int]]] = {}
        self._used_at: dict[bytes, float] = {}
        self._uses_unknown: set[range] = set()
        self._swept_at = 0.0

    def __len__(self) -> int:
        return sum(len(blocks) for blocks in self._blocks.values())

    def add(self, client: bytes, first: int, count: int, uses_known: bool = True) -> None:
        """
        Ids ``first`` to ``first + count - 1`` are ``client``'s.  Not ``uses_known``: a block reserved before
        this server started, whose ids may have been used (:meth:`uses_known` tells).
        """
        self._sweep()
        blocks = self._blocks.setdefault(client, {})
        block = range(first, first + count)
        blocks[block] = set()
        if not uses_known:
            self._uses_unknown.add(block)
        while len(blocks) > self.max_blocks:
            del blocks[next(iter(blocks))]
        self._used_at[client] = self.clock.seconds()

    def remove(self, client: bytes, first: int, count: int) -> None:
        """Undo :meth:`add` (the change that reserved them was rolled back)."""
        self._blocks.get(client, {}).pop(range(first, first + count), None)

    def check(self, client: bytes | None, inode: int) -> None:
        """InvalidArgument unless ``inode`` is an id of ``client``'s it has not used."""
        block = self._block_of(client, inode)
        if block is None or inode in self._blocks[client][block]:  # type: ignore[index]
            raise InvalidArgument(f"inode id {inode} is not one this client reserved and has not used")

    def owns(self, client: bytes | None, inode: int) -> bool:
        """Whether ``inode`` is an id of ``client``'s it has not used (as far as this server knows)."""
        block = self._block_of(client, inode)
        return block is not None and inode not in self._blocks[client][block]  # type: ignore[index]

    def uses_known(self, client: bytes | None, inode: int) -> bool:
        """Whether this server knows every use of the block that holds ``inode`` (reserved since it started)."""
        block = self._block_of(client, inode)
        return block is None or block not in self._uses_unknown

    def take(self, client: bytes | None, inode: int) -> range:
        """Use ``inode`` (see :meth:`check`); its block, which is forgotten once all its ids are used."""
        self.check(client, inode)
        block = self._block_of(client, inode)
        assert client is not None and block is not None
        used = self._blocks[client][block]
        used.add(inode)
        self._used_at[client] = self.clock.seconds()
        if len(used) == len(block):
            del self._blocks[client][block]
            self._uses_unknown.discard(block)
        return block

    def give_back(self, client: bytes, inode: int, block: range) -> None:
        """Undo :meth:`take` of ``inode`` from ``block`` (the creation was rolled back), even of a forgotten block."""
        blocks = self._blocks.setdefault(client, {})
        used = blocks.get(block)
        if used is None:
            used = blocks[block] = set(block)
        used.discard(inode)

    def _sweep(self) -> None:
        """Forget the blocks of clients idle for ``idle_seconds`` (looked at once a minute at most)."""
        now = self.clock.seconds()
        if now - self._swept_at < 60.0:
            return
        self._swept_at = now
        for client in [client for client, at in self._used_at.items() if now - at >= self.idle_seconds]:
            del self._used_at[client]
            self._blocks.pop(client, None)

    def _block_of(self, client: bytes | None, inode: int) -> range | None:
        for block in self._blocks.get(client, {}) if client is not None else ():
            if inode in block:
                return block
        return None
