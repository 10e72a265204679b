"""
Object stores: where encrypted chunks, journal segments and snapshots live.

:class:`~lucidlink.objectstore.interface.IObjectStore` is the interface;
:func:`open_store` opens a store from its URL.  Backends: ``file:///path``
(:mod:`lucidlink.objectstore.local`) and ``s3://bucket/prefix?endpoint=…``
(:mod:`lucidlink.objectstore.s3`).  :mod:`lucidlink.objectstore.faults`
wraps any store to inject failures in tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from lucidlink import errors
from lucidlink.objectstore.interface import IObjectStore, ObjectInfo, check_key, check_prefix

__all__ = ["IObjectStore", "ObjectInfo", "check_key", "check_prefix", "open_store"]


def _open_file(url: str, reactor: Any, create: bool) -> IObjectStore:
    from lucidlink.objectstore.local import LocalObjectStore

    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise errors.InvalidArgument(
            f"object store URL {url!r} names host {parts.netloc!r}; a local folder is file:///path"
        )
    if parts.query or parts.fragment:
        raise errors.InvalidArgument(f"object store URL {url!r} has a query or fragment; file URLs take none")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise errors.InvalidArgument(f"object store URL {url!r} needs an absolute path: file:///path")
    return LocalObjectStore(Path(path), reactor, create=create)  # type: ignore[return-value]


def _open_s3(url: str, reactor: Any, create: bool) -> IObjectStore:
    from lucidlink.objectstore.s3 import open_s3

    return open_s3(url, reactor, create)  # type: ignore[return-value]


_OPENERS: dict[str, Callable[[str, Any, bool], IObjectStore]] = {
    "file": _open_file,
    "s3": _open_s3,
}


def open_store(url: str, reactor: Any, create: bool = False) -> IObjectStore:
    """
    Open the object store that ``url`` names.

    ``file:///path`` is a local folder, which must exist unless ``create``;
    ``s3://bucket/prefix?…`` a bucket (see :mod:`lucidlink.objectstore.s3`),
    which must exist whatever ``create`` says.
    A URL of another scheme is refused with NotSupported naming the scheme.
    """
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise errors.InvalidArgument(f"object store URL {url!r} has no scheme; a local folder is file:///path")
    opener = _OPENERS.get(scheme)
    if opener is None:
        known = ", ".join(f"{name}://" for name in sorted(_OPENERS))
        raise errors.NotSupported(f"object store scheme {scheme!r} is not supported yet (supported: {known})")
    return opener(url, reactor, create)
