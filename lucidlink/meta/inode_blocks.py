"""
Inode ids set aside for named clients, so that a client can give its own new files their ids.

A client asks for a block (``ReserveInodes``); the store moves its next
inode id past it in a journaled change, so no id is given twice, even after
a restore.  The server remembers here, in memory, which ids of which blocks
each client has used: a creation that names an id must use one of its own
client's, once.  A restarted server remembers no block, so a client whose
server restarted asks for a new one.
"""

from __future__ import annotations

from lucidlink.errors import InvalidArgument


class InodeBlocks:
    """Every named client's blocks, and the ids of each it has used."""

    def __init__(self) -> None:
        self._blocks: dict[bytes, dict[range, set[int]]] = {}

    def add(self, client: bytes, first: int, count: int) -> None:
        """Ids ``first`` to ``first + count - 1`` are ``client``'s."""
        self._blocks.setdefault(client, {})[range(first, first + count)] = set()

    def remove(self, client: bytes, first: int, count: int) -> None:
        """Undo :meth:`add` (the change that reserved them was rolled back)."""
        self._blocks.get(client, {}).pop(range(first, first + count), None)

    def check(self, client: bytes | None, inode: int) -> None:
        """InvalidArgument unless ``inode`` is an id of ``client``'s it has not used."""
        block = self._block_of(client, inode)
        if block is None or inode in self._blocks[client][block]:  # type: ignore[index]
            raise InvalidArgument(f"inode id {inode} is not one this client reserved and has not used")

    def take(self, client: bytes | None, inode: int) -> range:
        """Use ``inode`` (see :meth:`check`); its block, which is forgotten once all its ids are used."""
        self.check(client, inode)
        block = self._block_of(client, inode)
        assert client is not None and block is not None
        used = self._blocks[client][block]
        used.add(inode)
        if len(used) == len(block):
            del self._blocks[client][block]
        return block

    def give_back(self, client: bytes, inode: int, block: range) -> None:
        """Undo :meth:`take` of ``inode`` from ``block`` (the creation was rolled back), even of a forgotten block."""
        blocks = self._blocks.setdefault(client, {})
        used = blocks.get(block)
        if used is None:
            used = blocks[block] = set(block)
        used.discard(inode)

    def _block_of(self, client: bytes | None, inode: int) -> range | None:
        for block in self._blocks.get(client, {}) if client is not None else ():
            if inode in block:
                return block
        return None
