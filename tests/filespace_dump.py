"""
A full logical dump of a filespace, taken through the client core: what
fault tests compare before and after, instead of counting entries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from typing import Any

from twisted.internet import defer

from lucidlink.client.filespace import Filespace
from lucidlink.protocol import messages as w
from lucidlink.protocol.messages import FileKind


@defer.inlineCallbacks
def dump_filespace(fs: Filespace, root: str = "/") -> Generator[defer.Deferred[Any], Any, dict[str, dict[str, Any]]]:
    """Every entry under ``root`` by path: its attributes, symlink target, extended attributes and chunk map.

    Attributes are as the server keeps them (inode, kind, mode, links, owner,
    size, times, version); the chunk map lists ``(index, object id, length,
    object length)`` for every chunk.  Names, targets and xattrs are
    decrypted, so two dumps are equal only if the filespaces are.
    """
    dump: dict[str, dict[str, Any]] = {}
    root_attributes = yield fs.resolve(root)
    dump[root] = (yield _entry(fs, root, root_attributes))
    pending = [root]
    while pending:
        directory = pending.pop()
        for name, attributes in sorted((yield fs.listdir(directory))):
            path = f"{directory.rstrip('/')}/{name}"
            dump[path] = yield _entry(fs, path, attributes)
            if attributes.kind == FileKind.DIRECTORY:
                pending.append(path)
    return dump


@defer.inlineCallbacks
def _entry(fs: Filespace, path: str, attributes: w.Attributes) -> Generator[defer.Deferred[Any], Any, dict[str, Any]]:
    inodes = fs.inodes
    entry: dict[str, Any] = {"attributes": dataclasses.asdict(attributes)}
    names = yield inodes.listxattr(attributes.inode)
    xattrs = {}
    for name in sorted(names):
        xattrs[bytes(name)] = bytes((yield inodes.getxattr(attributes.inode, name)))
    entry["xattrs"] = xattrs
    if attributes.kind == FileKind.SYMLINK:
        entry["target"] = yield fs.readlink(path)
    if attributes.kind == FileKind.FILE:
        chunk_size = fs.session.chunk_size
        count = attributes.size // chunk_size + 1
        chunk_map = yield fs.session.call(w.ChunkMapRead(attributes.inode, 0, count))
        entry["chunks"] = [(chunk.index, bytes(chunk.object_id), chunk.length, chunk.object_length)
                           for chunk in chunk_map.chunks]
        entry["chunk_map_version"] = chunk_map.version
    return entry
