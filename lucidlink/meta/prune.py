"""
Retention: deleting the journal segments and snapshots a filespace no longer needs.

A filespace keeps ``retention`` seconds of history in the object store, so
that it can be restored to any moment in that window (``lucid-meta restore
--to-time``).  With ``cutoff = now - retention``:

- the *anchor* is the newest good snapshot taken at or before the cutoff:
  every moment in the window is that snapshot plus later records;
- snapshots older than the anchor, and segments whose every record the
  anchor already holds (``last_seq <= anchor.seq``), may go;
- everything else stays: the anchor, every later snapshot (the newest good
  one among them), and every segment holding a record after the anchor.

Nothing is deleted when that cannot be trusted: when the newest snapshot is
damaged (it does not match its manifest, or does not end where it says:
restore falls back to an older one, and the history that one needs must
stay), when no good snapshot is older than the cutoff (the whole journal is
still needed), or when the segment after the anchor does not chain onto it.

:func:`plan_prune` decides, reading only the store; :func:`prune` carries it
out.  Deletion runs under a credential of its own (see
``docs/operations.rst``): a store that refuses to delete
(:class:`~lucidlink.errors.AccessDenied`) stops the pruning with a message
saying so, and deletes nothing more.  Manifests go before their snapshots
and older objects before newer, so pruning stopped half way leaves nothing
a restore could trip on.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.logger import Logger

from lucidlink.errors import AccessDenied, IntegrityError, LucidError, NotFound
from lucidlink.meta.segments import parse_segment_key, salvage_segment, segment_prefix
from lucidlink.meta.snapshots import (
    Manifest,
    fetch_snapshot,
    manifest_key,
    manifests,
    read_manifest,
    snapshot_key,
    snapshot_object_seq,
    snapshot_prefix,
)

DELETE_BATCH = 1000
"""Keys given to one ``delete_many`` (S3 takes at most 1,000 a request)."""

_log = Logger()


@dataclass(frozen=True)
class PrunePlan:
    """What pruning one filespace would delete, and why the rest stays."""

    filespace: str
    cutoff_ns: int
    newest: Manifest | None = None
    """The newest good snapshot (kept whatever happens)."""
    anchor: Manifest | None = None
    """The newest good snapshot taken at or before the cutoff: the start of the window."""
    segments: tuple[str, ...] = ()
    snapshots: tuple[str, ...] = ()
    """Manifests and snapshot data to delete, manifests first."""
    kept: str = ""
    """Why nothing is deleted, when that is so ("" when the plan may delete)."""
    damaged: bool = False
    """Whether ``kept`` is for damage a person should look at (a bad snapshot, a broken chain)."""

    @property
    def keys(self) -> list[str]:
        """Everything to delete, in the order to delete it."""
        return list(self.snapshots) + list(self.segments)

    @property
    def summary(self) -> str:
        if self.kept:
            return f"{self.filespace}: nothing to delete: {self.kept}"
        assert self.anchor is not None
        window = f"restorable from seq {self.anchor.seq} (snapshot taken {iso(self.anchor.time_ns)})"
        if not self.keys:
            return f"{self.filespace}: nothing to delete; {window}"
        return (f"{self.filespace}: {len(self.segments)} segments and {len(self.snapshots)} snapshot objects "
                f"older than {iso(self.cutoff_ns)} to delete; {window}")


PlanT = TypeVar("PlanT")


@dataclass
class Deletion(Generic[PlanT]):
    """What a deleting job (pruning, chunk collection) did of its plan."""

    plan: PlanT
    deleted: list[str] = field(default_factory=list)
    """The keys deleted, in order."""
    error: str = ""
    """Why it stopped before deleting all the plan names ("" if it did not)."""


@dataclass
class Pruned(Deletion[PrunePlan]):
    """What :func:`prune` did."""

    @property
    def summary(self) -> str:
        plan = self.plan
        if plan.kept or not plan.keys:
            return plan.summary
        text = f"{plan.filespace}: deleted {len(self.deleted)} of {len(plan.keys)} objects older than " \
               f"{iso(plan.cutoff_ns)}"
        assert plan.anchor is not None
        text += f"; restorable from seq {plan.anchor.seq} (snapshot taken {iso(plan.anchor.time_ns)})"
        return f"{text}; stopped: {self.error}" if self.error else text


def iso(time_ns: int) -> str:
    """``time_ns`` as an ISO 8601 UTC time to the second."""
    return datetime.fromtimestamp(time_ns // 1_000_000_000, UTC).isoformat().replace("+00:00", "Z")


@defer.inlineCallbacks
def _good_snapshot(object_store: Any, filespace: str, key: str, scratch: Path) -> Any:
    """The Manifest at ``key`` if its snapshot checks out, else None (logged)."""
    try:
        manifest = yield read_manifest(object_store, filespace, key)
        yield fetch_snapshot(object_store, filespace, manifest, scratch)
    except (IntegrityError, NotFound) as error:
        _log.warn("snapshot {key} is not usable: {error}", key=key, error=str(error))
        return None
    finally:
        scratch.unlink(missing_ok=True)
    return manifest


@defer.inlineCallbacks
def plan_prune(object_store: Any, filespace: str, retention: float, now: float) -> Any:
    """Decide what of ``filespace`` is older than ``retention`` seconds before ``now`` and not needed.

    Reads the store only; fires with a :class:`PrunePlan`.
    """
    cutoff_ns = int((now - retention) * 1_000_000_000)
    found = yield manifests(object_store, filespace)
    if not found:
        return PrunePlan(filespace, cutoff_ns, kept="no snapshot yet: every segment is needed")
    with tempfile.TemporaryDirectory(prefix="lucid-prune-") as folder:
        scratch = Path(folder) / "snapshot.sqlite3"
        newest = yield _good_snapshot(object_store, filespace, found[0][1], scratch)
        if newest is None:
            return PrunePlan(filespace, cutoff_ns, kept=f"the newest snapshot, at seq {found[0][0]}, is damaged; "
                             "a restore falls back to an older one, whose history must stay", damaged=True)
        anchor = newest if newest.time_ns <= cutoff_ns else None
        for _, key in found[1:]:
            if anchor is not None:
                break
            try:
                manifest = yield read_manifest(object_store, filespace, key)
            except (IntegrityError, NotFound) as error:
                _log.warn("snapshot manifest {key} is not usable: {error}", key=key, error=str(error))
                continue
            if manifest.time_ns <= cutoff_ns:
                anchor = yield _good_snapshot(object_store, filespace, key, scratch)
    if anchor is None:
        return PrunePlan(filespace, cutoff_ns, newest,
                         kept=f"no good snapshot was taken before {iso(cutoff_ns)}: every segment is still needed")

    infos = yield object_store.list(segment_prefix(filespace))
    spans = sorted((span, info.key) for info in infos if (span := parse_segment_key(filespace, info.key)))
    later = [(first, key) for (first, last), key in spans if last > anchor.seq]
    if later:
        first, key = later[0]
        if first > anchor.seq + 1:
            return PrunePlan(filespace, cutoff_ns, newest, anchor,
                             kept=f"no segment holds seq {anchor.seq + 1}, the record after the snapshot at seq "
                                  f"{anchor.seq}", damaged=True)
        salvage = salvage_segment((yield object_store.get(key)), anchor.seq, anchor.hash)
        if not salvage.entries:
            return PrunePlan(filespace, cutoff_ns, newest, anchor,
                             kept=f"{key} does not chain onto the snapshot at seq {anchor.seq} "
                                  f"({salvage.problem or 'no record after it'})", damaged=True)

    segments = tuple(key for (_, last), key in spans if last <= anchor.seq)
    old = yield object_store.list(snapshot_prefix(filespace))
    older = sorted({seq for info in old if (seq := snapshot_object_seq(filespace, info.key)) is not None
                    and seq < anchor.seq})
    snapshots = tuple(manifest_key(filespace, seq) for seq in older) + tuple(
        snapshot_key(filespace, seq) for seq in older)
    present = {info.key for info in old}
    return PrunePlan(filespace, cutoff_ns, newest, anchor, segments,
                     tuple(key for key in snapshots if key in present))


@defer.inlineCallbacks
def prune(object_store: Any, filespace: str, retention: float, now: float, dry_run: bool = False) -> Any:
    """Delete what :func:`plan_prune` allows (nothing if ``dry_run``); fires with :class:`Pruned`.

    Never fails for a refused or failed delete: ``Pruned.error`` says what
    stopped it (AccessDenied: this credential may not delete).
    """
    plan = yield plan_prune(object_store, filespace, retention, now)
    done = Pruned(plan)
    if dry_run or not plan.keys:
        return done
    done.error = yield delete_in_order(object_store, plan.keys, done.deleted, "pruning")
    level = _log.warn if done.error else _log.info
    level("{summary}", summary=done.summary)
    return done


@defer.inlineCallbacks
def delete_in_order(object_store: Any, keys: list[str], deleted: list[str], job: str) -> Any:
    """Delete ``keys`` in order (in batches where the store has them), noting each in ``deleted``.

    Fires with "" once all are gone, or with why it stopped: the store
    refused (``job`` needs the deletion credential) or failed.
    """
    batched = getattr(object_store, "delete_many", None)
    try:
        if batched is not None:
            for start in range(0, len(keys), DELETE_BATCH):
                yield batched(keys[start:start + DELETE_BATCH])
                deleted.extend(keys[start:start + DELETE_BATCH])
        else:
            for key in keys:
                yield object_store.delete(key)
                deleted.append(key)
    except AccessDenied as error:
        return f"the object store refused to delete ({error}); {job} needs the deletion credential"
    except LucidError as error:
        return f"deleting failed: {error}"
    return ""
