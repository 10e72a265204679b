"""
Garbage collection of chunk objects: deleting the chunks no chunk map needs.

A chunk object is never changed: a rewrite stores a new object, and the
chunk map points to it from then on.  The old object becomes garbage, as do
the chunks of a deleted file; the metadata server notes when, in its
``garbage`` table.  Uploads that were never committed (a client that crashed,
or a commit that lost a conflict) leave objects no chunk map ever named.

Which chunks are needed is decided from the object store alone, like a
restore: the filespace is rebuilt from its newest snapshot and journal into
a scratch database, so collection needs neither the server's disk nor its
cooperation, and runs under the deletion credential (``docs/operations.rst``).
With ``cutoff = now - retention``, a chunk object is kept when:

- a chunk map of the rebuilt filespace names it (live data, including
  files unlinked but still open);
- it became garbage after the cutoff: some moment in the retention window,
  to which ``lucid-meta restore --to-time`` may go, still names it;
- no chunk map ever named it and it was written less than ``grace`` ago:
  its upload may belong to a commit on its way (a client flushing, a server in ``durability = async`` that has
  not shipped the commit yet), which the rebuilt filespace cannot show.

Everything else under the filespace's chunk prefix is deleted.  Nothing is
deleted when the rebuild did not reach the end of the stored journal (a
damaged or missing segment): a chunk map in the unreadable part could name
any object.

:func:`plan_collection` decides; :func:`collect` carries it out.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger

from lucidlink.chunk_keys import chunk_object_key, chunk_prefix, parse_chunk_key
from lucidlink.errors import InvalidArgument
from lucidlink.meta.prune import Deletion, delete_in_order, iso
from lucidlink.meta.snapshots import restore
from lucidlink.meta.store import MetadataStore

MINIMUM_GRACE = 3600.0
"""Seconds: an upload younger than this is never collected, whatever ``grace`` says."""

DEFAULT_GRACE = 7 * 86400.0
"""Seconds an uncommitted upload is kept by default: a client that was away longer uploads again."""

_log = Logger()


@dataclass(frozen=True)
class CollectionPlan:
    """What collecting one filespace's chunks would delete, and what it keeps."""

    filespace: str
    cutoff_ns: int
    seq: int = 0
    """The journal record the decision rests on (the rebuilt filespace's head)."""
    stored: int = 0
    """Chunk objects found under the filespace's prefix."""
    live: int = 0
    """Of those, named by a chunk map."""
    recent_garbage: int = 0
    """Of those, garbage since after the cutoff (kept for the retention window)."""
    young: int = 0
    """Of those, neither, but written within the grace period (kept)."""
    keys: tuple[str, ...] = ()
    """The chunk objects to delete."""
    kept: str = ""
    """Why nothing is deleted, when that is so ("" when the plan may delete)."""

    @property
    def damaged(self) -> bool:
        """Whether ``kept`` is for something a person should look at (it always is)."""
        return bool(self.kept)

    @property
    def summary(self) -> str:
        if self.kept:
            return f"{self.filespace}: nothing to delete: {self.kept}"
        counts = (f"{self.stored} chunk objects: {self.live} in use, {self.recent_garbage} kept for restores "
                  f"after {iso(self.cutoff_ns)}, {self.young} recent uploads kept")
        if not self.keys:
            return f"{self.filespace}: nothing to delete; {counts} (as of seq {self.seq})"
        return f"{self.filespace}: {len(self.keys)} unneeded chunk objects to delete; {counts} (as of seq {self.seq})"


@dataclass
class Collected(Deletion[CollectionPlan]):
    """What :func:`collect` did."""

    @property
    def summary(self) -> str:
        plan = self.plan
        if plan.kept or not plan.keys:
            return plan.summary
        text = f"{plan.filespace}: deleted {len(self.deleted)} of {len(plan.keys)} unneeded chunk objects"
        return f"{text}; stopped: {self.error}" if self.error else text


@dataclass(frozen=True)
class _Rebuilt:
    filespace_id: bytes
    live: set[bytes]
    """Named by a chunk map."""
    recent_garbage: set[bytes]
    """Named by a chunk map after the cutoff, no longer."""
    old_garbage: set[bytes]
    """Named by no chunk map since the cutoff."""


def _read_rebuilt(database: Path, cutoff_ns: int) -> _Rebuilt:
    store = MetadataStore(database, Clock())
    try:
        if not store.initialised:
            raise InvalidArgument("the rebuilt filespace was never initialised")
        recent, old = set(), set()
        for object_id, since_ns in store.garbage_times().items():
            (recent if since_ns > cutoff_ns else old).add(object_id)
        return _Rebuilt(store.filespace_id, store.chunk_objects(), recent, old)
    finally:
        store.close()


@defer.inlineCallbacks
def plan_collection(object_store: Any, filespace: str, retention: float, grace: float, now: float) -> Any:
    """Decide which chunk objects of ``filespace`` no chunk map needs (see the module).

    Reads the store only (the rebuild goes to a temporary folder); fires
    with a :class:`CollectionPlan`.
    """
    if grace < MINIMUM_GRACE:
        raise InvalidArgument(f"a grace period under {MINIMUM_GRACE:g} s could delete uploads of commits "
                              "on their way")
    cutoff_ns = int((now - retention) * 1_000_000_000)
    with tempfile.TemporaryDirectory(prefix="lucid-collect-") as folder:
        database = Path(folder) / "rebuilt.sqlite3"
        rebuilt = yield restore(object_store, filespace, database)
        if not rebuilt.complete:
            return CollectionPlan(filespace, cutoff_ns, rebuilt.seq,
                                  kept=f"the journal could not be read to its end ({rebuilt.problem}); "
                                       "a chunk map past that point could name any chunk")
        if rebuilt.seq == 0:
            return CollectionPlan(filespace, cutoff_ns, kept="the filespace has no journal in the store")
        known = _read_rebuilt(database, cutoff_ns)
    filespace_id = known.filespace_id
    stored = yield object_store.list(chunk_prefix(filespace_id))
    young_before = now - grace
    plan: dict[str, int] = {"live": 0, "recent_garbage": 0, "young": 0}
    doomed = []
    for info in stored:
        object_id = parse_chunk_key(filespace_id, info.key)
        if object_id is None:
            continue  # not a chunk name: not ours to judge
        if object_id in known.live:
            plan["live"] += 1
        elif object_id in known.recent_garbage:
            plan["recent_garbage"] += 1
        elif object_id not in known.old_garbage and info.modified > young_before:
            plan["young"] += 1  # never committed, as far as the store shows: perhaps not yet
        else:
            doomed.append(chunk_object_key(filespace_id, object_id))
    return CollectionPlan(filespace, cutoff_ns, rebuilt.seq, len(stored), keys=tuple(doomed), **plan)


@defer.inlineCallbacks
def collect(object_store: Any, filespace: str, retention: float, now: float, grace: float = DEFAULT_GRACE,
            dry_run: bool = False) -> Any:
    """Delete the chunk objects :func:`plan_collection` finds unneeded (none if ``dry_run``).

    Fires with :class:`Collected`; a store that refuses to delete
    (AccessDenied: this credential may not) or fails stops it, and
    ``Collected.error`` says so.
    """
    plan = yield plan_collection(object_store, filespace, retention, grace, now)
    done = Collected(plan)
    if dry_run or not plan.keys:
        return done
    done.error = yield delete_in_order(object_store, list(plan.keys), done.deleted, "collecting")
    level = _log.warn if done.error else _log.info
    level("{summary}", summary=done.summary)
    return done
