"""
The ``file:///path`` object store: objects as files in a local directory.

Each key part is a folder, the last one the file: ``chunks/ab/cd`` is
``ROOT/chunks/ab/cd``, so an operator can look at the store with ``ls``.
Writes are atomic and durable: the data goes to a temporary file in the
object's folder (``.tmp-…``; key parts never start with a dot, so these
never look like objects), is fsynced, renamed over the object (or
hard-linked to it for a create-only put, so an existing object is never
replaced), and the folder is fsynced.  A crash leaves at worst a stray
temporary file, never part of an object.

Create-only puts into a folder named ``journal`` (journal segments, which a
metadata server in ``durability = sync`` waits for on every change) are
appended to that folder's pack instead (:mod:`lucidlink.objectstore.pack`:
``ROOT/<filespace>/journal/.pack/00000001-<random>``, …): one ``fdatasync`` of
blocks written ahead, where a new file costs two journal commits of the file
system.  ``packed`` says which folders pack; every operation finds a packed
object wherever it is, so a store opened with another ``packed`` reads the
same objects.  A folder that has packs sends all its create-only puts there
(one lock decides which of two creators wins); a plain put writes a file,
which is newer than a packed object of the same key and hides it.

Blocking file I/O runs in a thread pool: one the store owns (and stops on
:meth:`LocalObjectStore.close` or reactor shutdown) or one it is given.
The one exception is a packed put that is a single write and ``fdatasync``
into a pack already open, which is made in the caller's thread (see
:class:`LocalObjectStore`).
"""

from __future__ import annotations

import builtins
import errno
import os
import secrets
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from lucidlink import errors
from lucidlink.atomic import fsync_folder
from lucidlink.objectstore.interface import (
    KEY_PART,
    IFileObjectStore,
    IObjectStore,
    ObjectInfo,
    check_key,
    check_prefix,
)
from lucidlink.objectstore.pack import PACK_FOLDER, FolderPack, Packed

_T = TypeVar("_T")

DEFAULT_THREADS = 8
_TEMPORARY_PREFIX = ".tmp-"
_FULL = {errno.ENOSPC, errno.EDQUOT}
_NOT_AN_OBJECT = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _write_fully(fd: int, data: memoryview) -> None:
    """Write all of ``data`` to ``fd`` (os.write may write less than asked)."""
    while data:
        written = os.write(fd, data)
        data = data[written:]


def is_journal_folder(folder_key: str) -> bool:
    """Whether create-only puts into ``folder_key`` go to its pack: folders named ``journal``."""
    return folder_key.rpartition("/")[2] == "journal"


@implementer(IObjectStore, IFileObjectStore)
class LocalObjectStore:
    """
    An object store in a local directory (see the module).

    ``root`` must exist unless ``create`` is true: a mistyped path, or a
    disk that is not mounted, must not look like an empty store.  If the
    folder vanishes later, operations fail with Unavailable, not NotFound.
    Objects are created readable by their owner only (mode 0600).
    ``packed(folder_key)`` says which folders keep their create-only puts in
    a pack (``""`` is the root).  With ``appends_in_caller`` a packed put
    that costs one write and one fdatasync (the usual case: see
    :meth:`FolderPack.append_now`) is made at once in the caller's thread,
    where a thread hand-off each way would cost about as much again; every
    other operation runs in the thread pool.
    """

    def __init__(
        self,
        root: Path | str,
        reactor: Any,  # IReactorCore and IReactorFromThreads
        threadpool: ThreadPool | None = None,
        *,
        create: bool = False,
        packed: Callable[[str], bool] = is_journal_folder,
        appends_in_caller: bool = True,
    ) -> None:
        self.root = Path(root).absolute()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        if not self.root.is_dir():
            raise errors.NotFound(f"object store folder {self.root} does not exist")
        self._reactor = reactor
        self._packed = packed
        self._appends_in_caller = appends_in_caller
        self._root = str(self.root)
        self._packs: dict[str, FolderPack] = {}
        self._packs_lock = threading.Lock()
        self._closed = False
        self._shutdown_trigger: Any = None
        if threadpool is None:
            threadpool = ThreadPool(minthreads=0, maxthreads=DEFAULT_THREADS, name=f"object store {self.root}")
            threadpool.start()
            self._shutdown_trigger = reactor.addSystemEventTrigger("during", "shutdown", threadpool.stop)
        self._threadpool = threadpool

    def __repr__(self) -> str:
        return f"<LocalObjectStore at {self.root}>"

    # IObjectStore

    def get(self, key: str) -> Deferred[bytes]:
        return self._run(self._get, check_key, key)

    def get_range(self, key: str, start: int, length: int) -> Deferred[bytes]:
        if start < 0 or length < 0:
            return fail(errors.InvalidArgument(f"no range of {length} bytes at {start} in object {key!r}"))
        return self._run(self._get_range, check_key, key, start, length)

    def put(self, key: str, data: bytes, create_only: bool = False) -> Deferred[None]:
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            return fail(errors.InvalidArgument(f"object {key!r} must be bytes, not {type(data).__name__}"))
        if create_only and self._appends_in_caller and not self._closed:
            done = self._append_now(key, view)
            if done is not None:
                return done
        return self._run(self._put, check_key, key, view, create_only)

    def put_file(self, key: str, path: str) -> Deferred[None]:
        """Store the file at ``path`` as object ``key``, create-only: synced, then hard-linked in (else copied)."""
        return self._run(self._put_file_at, check_key, key, path)

    def file_of(self, key: str) -> Deferred[str | None]:
        """The file of object ``key``, its pages read ahead (see ``IFileObjectStore``); None when packed or missing."""
        return self._run(self._file_of, check_key, key)

    def delete(self, key: str) -> Deferred[None]:
        return self._run(self._delete, check_key, key)

    def head(self, key: str) -> Deferred[ObjectInfo]:
        return self._run(self._head, check_key, key)

    def list(self, prefix: str = "") -> Deferred[list[ObjectInfo]]:
        return self._run(self._list, check_prefix, prefix)

    def close(self) -> Deferred[None]:
        """Stop the thread pool if the store owns it; later operations fail."""
        if not self._closed:
            self._closed = True
            if self._shutdown_trigger is not None:
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
                self._shutdown_trigger = None
                self._threadpool.stop()
            with self._packs_lock:
                packs = list(self._packs.values())
            for pack in packs:
                pack.close()
        return succeed(None)

    def locate(self, key: str) -> tuple[Path, int, int]:
        """Where the bytes of object ``key`` are on disk: a file, and their offset and size in it.

        Blocking, for inspection and tests; raises NotFound if there is no such object.
        """
        check_key(key)
        path = self._path(key)
        if path.is_file():
            return path, 0, path.stat().st_size
        found = self._find_packed(key)
        if found is None:
            raise self._missing(key)
        pack, packed = found
        return Path(pack.pack_path(packed.pack)), packed.offset, packed.size

    # In the reactor thread

    def _run(self, work: Callable[..., _T], check: Callable[[str], str], key: str, *args: Any) -> Deferred[_T]:
        if self._closed:
            return fail(errors.Unavailable(f"object store at {self.root} is closed"))
        try:
            check(key)
        except errors.InvalidArgument as refused:
            return fail(refused)
        return deferToThreadPool(self._reactor, self._threadpool, work, key, *args)

    def _append_now(self, key: str, data: memoryview) -> Deferred[None] | None:
        """A packed create-only put made at once, if it is cheap; None to make it in the thread pool."""
        folder_key, _, name = key.rpartition("/")
        pack = self._packs.get(os.path.join(self._root, *folder_key.split("/")) if folder_key else self._root)
        if pack is None:
            return None  # not used yet in this process: the pool reads it first
        try:
            check_key(key)
        except errors.InvalidArgument as refused:
            return fail(refused)
        file_path = os.path.join(pack.folder, name)
        try:
            appended = pack.append_now(name, data, taken=lambda: os.path.lexists(file_path))
        except OSError as failure:
            return fail(self._error(failure, "writing", key))
        if appended is None:
            return None
        if not appended:
            if os.path.isdir(file_path):
                return fail(self._conflict(key))
            return fail(errors.AlreadyExists(f"object {key!r} already exists in the store at {self.root}"))
        return succeed(None)

    # In the thread pool

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _error(self, failure: OSError, doing: str, key: str) -> errors.LucidError:
        """The lucidlink error an OSError stands for."""
        if failure.errno in _FULL:
            return errors.NoSpace(f"object store at {self.root} is full")
        if failure.errno == errno.EROFS:
            return errors.ReadOnly(f"object store at {self.root} is read-only")
        if isinstance(failure, PermissionError):
            return errors.AccessDenied(f"object store at {self.root}: permission denied {doing} {key!r}")
        return errors.Unavailable(f"object store at {self.root} failed {doing} {key!r}: {failure.strerror}")

    def _missing(self, key: str) -> errors.LucidError:
        if not self.root.is_dir():
            return errors.Unavailable(f"object store folder {self.root} is missing")
        return errors.NotFound(f"no object {key!r} in the store at {self.root}")

    def _conflict(self, key: str) -> errors.LucidError:
        return errors.InvalidArgument(
            f"object key {key!r} clashes with another key used as its folder, or its folder used as a key"
        )

    def _pack(self, folder: Path | str) -> FolderPack:
        folder = str(folder)
        with self._packs_lock:
            pack = self._packs.get(folder)
            if pack is None:
                pack = self._packs[folder] = FolderPack(Path(folder))
            return pack

    def _existing_pack(self, folder: Path | str) -> FolderPack | None:
        """The packs of ``folder``, if it has any."""
        return self._pack(folder) if os.path.isdir(os.path.join(folder, PACK_FOLDER)) else None

    def _find_packed(self, key: str) -> tuple[FolderPack, Packed] | None:
        """The pack holding ``key`` and where in it, if the object is packed."""
        path = self._path(key)
        pack = self._existing_pack(path.parent)
        if pack is None:
            return None
        packed = pack.find(path.name)
        return None if packed is None else (pack, packed)

    def _read_packed(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """A packed object's bytes (the plain file is not there), or NotFound."""
        try:
            found = self._find_packed(key)
            data = None if found is None else found[0].read(found[1], start, length)
        except OSError as failure:
            raise self._error(failure, "reading", key) from failure
        if data is None:
            raise self._missing(key)
        return data

    def _get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as file:
                return file.read()
        except _NOT_AN_OBJECT:
            return self._read_packed(key)
        except OSError as failure:
            raise self._error(failure, "reading", key) from failure

    def _file_of(self, key: str) -> str | None:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # packed, missing or unreadable: a get says which
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            return None
        finally:
            os.close(fd)
        return str(path)

    def _get_range(self, key: str, start: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except _NOT_AN_OBJECT:
            return self._read_packed(key, start, length)
        except OSError as failure:
            raise self._error(failure, "reading", key) from failure
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise self._missing(key)
            parts = []
            while length > 0:
                part = os.pread(fd, length, start)
                if not part:
                    break
                parts.append(part)
                start += len(part)
                length -= len(part)
            return b"".join(parts)
        except OSError as failure:
            raise self._error(failure, "reading", key) from failure
        finally:
            os.close(fd)

    def _make_folders(self, folder: Path, key: str) -> None:
        """Create the folders an object needs, each durably, and refuse a file in the way."""
        missing = []
        while not folder.is_dir():
            if folder == self.root:
                raise errors.Unavailable(f"object store folder {self.root} is missing")
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            pack = self._existing_pack(folder.parent)
            if pack is not None and pack.find(folder.name) is not None:
                raise self._conflict(key)  # a packed object has the folder's name
            try:
                os.mkdir(folder)
            except FileExistsError:
                if not folder.is_dir():
                    raise self._conflict(key) from None
                continue
            except NotADirectoryError:
                raise self._conflict(key) from None
            fsync_folder(folder.parent)

    def _put(self, key: str, data: memoryview, create_only: bool) -> None:
        folder_key, _, name = key.rpartition("/")
        folder = os.path.join(self._root, *folder_key.split("/")) if folder_key else self._root
        file_path = os.path.join(folder, name)
        try:
            pack = self._existing_pack(folder)
            if create_only and (pack is not None or self._packed(folder_key)):
                if pack is None:
                    self._make_folders(Path(folder), key)
                if not self._pack(folder).append(name, data, taken=lambda: os.path.lexists(file_path)):
                    if os.path.isdir(file_path):
                        raise self._conflict(key)
                    raise errors.AlreadyExists(f"object {key!r} already exists in the store at {self.root}")
                return
            path = Path(file_path)
            self._put_file(key, path, data, create_only)
            if pack is not None:
                pack.remove(path.name)  # the file is the object now
        except OSError as failure:
            raise self._error(failure, "writing", key) from failure

    def _put_file_at(self, key: str, source: str) -> None:
        folder_key = key.rpartition("/")[0]
        folder = os.path.join(self._root, *folder_key.split("/")) if folder_key else self._root
        try:
            if self._packed(folder_key) or self._existing_pack(folder) is not None:
                with open(source, "rb") as file:
                    self._put(key, memoryview(file.read()), True)
                return
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            path = Path(folder, key.rpartition("/")[2])
            self._make_folders(path.parent, key)
            try:
                self._link(Path(source), path, key)
            except OSError as failure:
                if failure.errno != errno.EXDEV:
                    raise
                with open(source, "rb") as file:  # on another file system: copied
                    self._put_file(key, path, memoryview(file.read()), True)
                return
            fsync_folder(path.parent)
        except OSError as failure:
            raise self._error(failure, "writing", key) from failure

    def _put_file(self, key: str, path: Path, data: memoryview, create_only: bool) -> None:
        temporary = path.parent / f"{_TEMPORARY_PREFIX}{secrets.token_hex(8)}"
        try:
            self._make_folders(path.parent, key)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_fully(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            if create_only:
                self._link(temporary, path, key)
            else:
                try:
                    os.rename(temporary, path)
                except IsADirectoryError:
                    raise self._conflict(key) from None
            fsync_folder(path.parent)
        except OSError as failure:
            raise self._error(failure, "writing", key) from failure
        finally:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
            except OSError:
                pass  # a stray temporary file is harmless: listings skip it

    def _link(self, temporary: Path, path: Path, key: str) -> None:
        """Give the temporary file the object's name unless that name exists."""
        try:
            os.link(temporary, path)
        except FileExistsError:
            if path.is_dir():
                raise self._conflict(key) from None
            raise errors.AlreadyExists(f"object {key!r} already exists in the store at {self.root}") from None
        except OSError as failure:
            if failure.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise errors.NotSupported(
                    f"object store at {self.root} is on a file system without hard links,"
                    " which create-only writes need"
                ) from failure
            raise

    def _delete(self, key: str) -> None:
        path = self._path(key)
        try:
            pack = self._existing_pack(path.parent)
            if pack is not None:
                pack.remove(path.name)
        except OSError as failure:
            raise self._error(failure, "deleting", key) from failure
        try:
            os.unlink(path)
        except _NOT_AN_OBJECT:
            if not self.root.is_dir():
                raise self._missing(key) from None
            return
        except OSError as failure:
            if failure.errno == errno.EPERM and path.is_dir():
                return  # macOS says EPERM for unlink of a folder: no object by that key
            raise self._error(failure, "deleting", key) from failure
        try:
            fsync_folder(path.parent)
        except OSError as failure:
            raise self._error(failure, "deleting", key) from failure

    def _head(self, key: str) -> ObjectInfo:
        try:
            status = os.stat(self._path(key))
        except _NOT_AN_OBJECT:
            try:
                found = self._find_packed(key)
            except OSError as failure:
                raise self._error(failure, "looking up", key) from failure
            if found is None:
                raise self._missing(key) from None
            return ObjectInfo(key, found[1].size, found[1].modified)
        except OSError as failure:
            raise self._error(failure, "looking up", key) from failure
        if not stat.S_ISREG(status.st_mode):
            raise self._missing(key)
        return ObjectInfo(key, status.st_size, status.st_mtime)

    def _list(self, prefix: str) -> builtins.list[ObjectInfo]:
        if not self.root.is_dir():
            raise errors.Unavailable(f"object store folder {self.root} is missing")
        folder_key, _, name_start = prefix.rpartition("/")
        found: builtins.list[ObjectInfo] = []
        if folder_key:
            pending = [(self._path(folder_key), f"{folder_key}/", name_start)]
        else:
            pending = [(self.root, "", name_start)]
        while pending:
            folder, key_prefix, name_start = pending.pop()
            try:
                entries = os.scandir(folder)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as failure:
                raise self._error(failure, "listing", prefix) from failure
            files: set[str] = set()
            has_packs = False
            with entries:
                for entry in entries:
                    if entry.name == PACK_FOLDER:
                        has_packs = True
                    if not entry.name.startswith(name_start) or not KEY_PART.fullmatch(entry.name):
                        continue
                    key = key_prefix + entry.name
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((Path(entry.path), f"{key}/", ""))
                    elif entry.is_file(follow_symlinks=False):
                        try:
                            status = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue  # deleted while we listed
                        files.add(entry.name)
                        found.append(ObjectInfo(key, status.st_size, status.st_mtime))
            if has_packs:
                try:
                    packed = self._pack(folder).objects()
                except OSError as failure:
                    raise self._error(failure, "listing", prefix) from failure
                found.extend(ObjectInfo(key_prefix + name, where.size, where.modified)
                             for name, where in packed.items() if name.startswith(name_start) and name not in files)
        found.sort(key=lambda info: info.key)
        return found
