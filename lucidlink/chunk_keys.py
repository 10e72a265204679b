"""
Where chunk objects live in the object store.

Each chunk object is ``<filespace id>/chunks/<object id>``, both in hex: under
the filespace's id rather than its name, so filespaces can share a store and
a name says nothing about what the objects hold.
"""

from __future__ import annotations


def chunk_prefix(filespace_id: bytes) -> str:
    """The prefix of every chunk object of the filespace ``filespace_id``."""
    return f"{filespace_id.hex()}/chunks/"


def chunk_object_key(filespace_id: bytes, object_id: bytes) -> str:
    """The object store key of a chunk object."""
    return f"{chunk_prefix(filespace_id)}{object_id.hex()}"


def parse_chunk_key(filespace_id: bytes, key: str) -> bytes | None:
    """The object id a chunk key names, or None if ``key`` is not one of this filespace's chunks."""
    prefix = chunk_prefix(filespace_id)
    if not key.startswith(prefix):
        return None
    try:
        object_id = bytes.fromhex(key[len(prefix):])
    except ValueError:
        return None
    return object_id if object_id else None
