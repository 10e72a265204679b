"""
Write-back journals that could not be committed, and getting their writes back.

When a mount starts, it commits the writes an earlier run journaled and did
not commit (:meth:`~lucidlink.client.filespace.Inodes.recover`).  A journal
whose file changed meanwhile (another client committed first) or is gone is
not merged blindly: it is kept in a slot's ``writeback/conflicts/`` with a
``.why`` note.  This module lists those journals (:func:`kept_journals`)
and saves one as a new file of the filespace (:func:`save_as`): the
journalled file's content as it is now (nothing if it is gone), with the
journal's writes and truncations laid over it in order, which for the usual
whole-file save is exactly what the user wrote.  Saved or discarded, the
journal and its note go.

A journal is named ``SLOT:NUMBER-INODE`` here (``1:12-345``): the slot of the
local folder it was kept in and its file name without ``.journal``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer

from lucidlink import crypto
from lucidlink.client.writeback import CONFLICTS, Truncate, Write, read_journal, remove_journal
from lucidlink.errors import IntegrityError, InvalidArgument, NotFound

_JOURNAL_ID = re.compile(r"^(\d+):(\d+-\d+)$")
COPY_BLOCK = 4 * 1024 * 1024


@dataclass(frozen=True)
class KeptJournal:
    """A journal kept in a ``conflicts`` folder, read back."""

    id: str
    """``SLOT:NUMBER-INODE`` (see the module)."""
    path: Path
    inode: int
    version: int
    """The chunk map version the writes were made on."""
    modified: float
    """When the journal was last written (seconds since the epoch)."""
    why: str
    """The note saying why it was kept."""
    writes: int = 0
    written: int = 0
    """Bytes written (counting rewrites of the same bytes)."""
    truncations: int = 0
    damage: str = ""
    """Why it cannot be read ("" if it can): a damaged journal can only be discarded."""

    @property
    def summary(self) -> str:
        if self.damage:
            return f"{self.id}: damaged, cannot be saved: {self.damage}"
        changes = f"{self.writes} writes ({self.written} bytes)"
        if self.truncations:
            changes += f" and {self.truncations} truncations"
        return f"{self.id}: inode {self.inode}, {changes} made on version {self.version}; {self.why}"


def _conflict_folders(root: Path) -> list[tuple[str, Path]]:
    """(slot, conflicts folder) of every slot of the local folder ``root`` (``cache_dir/<filespace id>``)."""
    if not root.is_dir():
        return []
    slots = sorted((slot for slot in root.iterdir() if slot.name.isdigit()), key=lambda slot: int(slot.name))
    return [(slot.name, slot / "writeback" / CONFLICTS) for slot in slots if (slot / "writeback" / CONFLICTS).is_dir()]


def _why(path: Path) -> str:
    try:
        return path.with_suffix(".why").read_text(encoding="utf-8").strip()
    except OSError:
        return "no note says why"


def kept_journals(root: Path, keys: crypto.FilespaceKeys) -> list[KeptJournal]:
    """Every journal kept in the conflicts folders under ``root``, oldest first."""
    found = []
    for slot, folder in _conflict_folders(root):
        for path in folder.glob("*.journal"):
            journal_id = f"{slot}:{path.stem}"
            try:
                journal = read_journal(path, keys)
            except IntegrityError as error:
                found.append(KeptJournal(journal_id, path, 0, 0, path.stat().st_mtime, _why(path), damage=str(error)))
                continue
            writes = [record for record in journal.records if isinstance(record, Write)]
            found.append(KeptJournal(
                journal_id, path, journal.inode, journal.version, journal.written, _why(path),
                writes=len(writes), written=sum(len(record.data) for record in writes),
                truncations=sum(isinstance(record, Truncate) for record in journal.records),
            ))
    return sorted(found, key=lambda kept: (kept.modified, kept.id))


def find_journal(root: Path, keys: crypto.FilespaceKeys, journal_id: str) -> KeptJournal:
    """The kept journal ``journal_id`` names; InvalidArgument or NotFound saying why not."""
    if not _JOURNAL_ID.match(journal_id):
        raise InvalidArgument(f"{journal_id!r} does not name a kept journal (SLOT:NUMBER-INODE, as listed)")
    for kept in kept_journals(root, keys):
        if kept.id == journal_id:
            return kept
    raise NotFound(f"no kept journal {journal_id} in {root}")


def discard(kept: KeptJournal) -> None:
    """Delete a kept journal and its note: its writes are gone for good."""
    remove_journal(kept.path)
    kept.path.with_suffix(".why").unlink(missing_ok=True)


@defer.inlineCallbacks
def save_as(fs: Any, kept: KeptJournal, target: str) -> Generator[defer.Deferred[Any], Any, int]:
    """
    Write a new file ``target`` (which must not exist): the journalled file now, with the journal laid over it.

    Fires with the new file's size.  The journal is discarded once the new
    file is committed; if anything fails before, it stays.
    """
    if kept.damage:
        raise IntegrityError(f"the kept journal {kept.id} is damaged ({kept.damage}); it can only be discarded")
    journal = read_journal(kept.path, fs.session.keys)
    handle = yield fs.open_path(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        size = yield _copy_current(fs, journal.inode, handle)
        chunk_size = fs.inodes.chunk_size
        for record in journal.records:
            if isinstance(record, Write):
                offset = record.index * chunk_size + record.offset
                yield handle.write(offset, record.data)
                size = max(size, offset + len(record.data))
            elif isinstance(record, Truncate):
                yield handle.truncate(record.size)
                size = record.size
    finally:
        yield handle.close()
    discard(kept)
    return size


@defer.inlineCallbacks
def _copy_current(fs: Any, inode: int, into: Any) -> Generator[defer.Deferred[Any], Any, int]:
    """Copy what ``inode`` holds now into the handle ``into``; its size (0 if the inode is gone)."""
    try:
        source = yield fs.inodes.open(inode, os.O_RDONLY)
    except NotFound:
        return 0
    try:
        offset = 0
        while block := (yield source.read(offset, COPY_BLOCK)):
            yield into.write(offset, block)
            offset += len(block)
    finally:
        yield source.close()
    return offset
