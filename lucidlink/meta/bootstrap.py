"""
The one-time token that lets the first client initialise a new filespace.

A server whose filespace is not initialised writes a random token to
``<data>/bootstrap-token`` (mode 0600, readable only by whoever runs the
server) and keeps only its SHA-256 hash in the database.  The operator hands
the file to ``lucid filespace init``; the ``Bootstrap`` request carries the
token (the file's text without surrounding whitespace); once used, the hash
is gone and the file is deleted.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from twisted.logger import Logger

from lucidlink.atomic import write_atomically
from lucidlink.meta.interface import IMetadataStore
from lucidlink.meta.mutations import SetBootstrapToken

TOKEN_FILE_NAME = "bootstrap-token"

_log = Logger()


def token_hash(token: bytes) -> bytes:
    """What the server keeps of a bootstrap token."""
    return hashlib.sha256(token).digest()


def token_matches(token: bytes, expected_hash: bytes | None) -> bool:
    """Whether ``token`` is the one whose hash is ``expected_hash`` (constant time)."""
    return expected_hash is not None and hmac.compare_digest(token_hash(token), expected_hash)


def read_token(path: Path) -> bytes:
    """The token in ``path``, as a ``Bootstrap`` request carries it."""
    return path.read_bytes().strip()


def prepare_token(store: IMetadataStore, path: Path) -> bool:
    """Make sure an uninitialised filespace has a usable token file at ``path``.

    A token file that matches the stored hash is kept (a restart does not
    invalidate what the operator already copied); otherwise a new token is
    written and its hash stored.

    :return: whether the filespace is waiting for its bootstrap.
    """
    if store.initialised:
        return False
    if path.exists() and token_matches(read_token(path), store.bootstrap_token_hash):
        _log.info("filespace not initialised; the bootstrap token is in {path}", path=str(path))
        return True
    token = secrets.token_urlsafe(32).encode("ascii")
    store.apply(SetBootstrapToken(token_hash(token)))
    write_atomically(path, token + b"\n")
    _log.info("filespace not initialised; wrote a new bootstrap token to {path}", path=str(path))
    return True


def remove_token(path: Path) -> None:
    """Delete the used token file."""
    path.unlink(missing_ok=True)
