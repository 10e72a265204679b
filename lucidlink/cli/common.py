"""
What the commands that work on a filespace share: ``X:/path`` arguments,
the user and passphrase, and opening a logged-in session with its object
store.

The passphrase comes from the first of: ``--passphrase-file``, the
``LUCID_PASSPHRASE`` environment variable (for scripts), the
``passphrase_file`` of the config, a prompt on the terminal.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer

from lucidlink.client.config import ClientConfig, load_config
from lucidlink.errors import InvalidArgument, NotFound

PASSPHRASE_VARIABLE = "LUCID_PASSPHRASE"
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class RemotePath:
    """``FILESPACE:/some/path`` split in two."""

    filespace: str
    path: str

    def __str__(self) -> str:
        return f"{self.filespace}:{self.path}"


def remote_path(text: str) -> RemotePath:
    """Parse ``FILESPACE:/path`` (argparse type)."""
    filespace, colon, path = text.partition(":")
    if not colon or not filespace:
        raise argparse.ArgumentTypeError(f"{text!r} is not FILESPACE:/path")
    if not path.startswith("/"):
        path = "/" + path
    return RemotePath(filespace, path)


def add_session_options(parser: argparse.ArgumentParser) -> None:
    """Options every command that logs in understands."""
    parser.add_argument("--user", help="the user to log in as (default: LUCID_USER, else the config's user)")
    parser.add_argument(
        "--passphrase-file", type=Path, metavar="FILE",
        help=f"read the passphrase from FILE (else {PASSPHRASE_VARIABLE}, the config's passphrase_file, a prompt)",
    )
    parser.add_argument("--store", metavar="URL", help="the object store (default: LUCID_STORE, else the config's store)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help=f"give up when the filespace cannot be reached for this long (default {DEFAULT_TIMEOUT:g})",
    )


def client_config(args: argparse.Namespace) -> ClientConfig:
    """The client settings, with this command's options first."""
    return load_config(
        getattr(args, "config", None),
        overrides={
            "user": getattr(args, "user", None),
            "store": getattr(args, "store", None),
        },
    )


def require_user(config: ClientConfig) -> str:
    """The user to log in as; raise saying how to give one."""
    if not config.user:
        raise InvalidArgument("no user given: use --user NAME, set LUCID_USER, or add 'user = ...' to the config")
    return config.user


def prompt_passphrase(prompt: str, *, confirm: bool = False) -> str:
    """Ask on the terminal; refuse when there is none."""
    if not sys.stdin.isatty():
        raise InvalidArgument(
            f"a passphrase is needed and there is no terminal to ask on: use --passphrase-file FILE"
            f" or set {PASSPHRASE_VARIABLE}"
        )
    passphrase = getpass.getpass(prompt)
    if confirm and getpass.getpass("Again: ") != passphrase:
        raise InvalidArgument("the two passphrases differ")
    if not passphrase:
        raise InvalidArgument("an empty passphrase is not allowed")
    return passphrase


def read_passphrase_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"no passphrase file at {path}") from None
    passphrase = text.rstrip("\r\n")
    if not passphrase:
        raise InvalidArgument(f"the passphrase file {path} is empty")
    return passphrase


def passphrase_for(args: argparse.Namespace, config: ClientConfig, prompt: str, *, confirm: bool = False) -> str:
    """The passphrase: ``--passphrase-file``, ``LUCID_PASSPHRASE``, the configured file, a prompt.

    ``args.passphrase``, when set, is one asked for already (``lucid-mount`` asks
    before it goes to the background, where there is no terminal).
    """
    asked = getattr(args, "passphrase", None)
    if asked:
        return str(asked)
    option = getattr(args, "passphrase_file", None)
    if option is not None:
        return read_passphrase_file(option)
    from_environment = os.environ.get(PASSPHRASE_VARIABLE)
    if from_environment:
        return from_environment
    if config.passphrase_file is not None:
        return read_passphrase_file(config.passphrase_file)
    return prompt_passphrase(prompt, confirm=confirm)


@defer.inlineCallbacks
def with_filespace(
    reactor: Any,
    args: argparse.Namespace,
    filespace: str,
    work: Callable[[Any], defer.Deferred[Any]],
    *,
    needs_store: bool = True,
) -> Generator[defer.Deferred[Any], Any, Any]:
    """Log in to ``filespace``, run ``work(fs)`` with a :class:`~lucidlink.client.filespace.Filespace`, close."""
    from lucidlink.client.filespace import Filespace
    from lucidlink.client.resolver import Resolver
    from lucidlink.client.session import open_session
    from lucidlink.objectstore import open_store

    config = client_config(args)
    user = require_user(config)
    config.require_discovery()
    ca_file = config.require_ca()
    store_url = config.require_store() if needs_store else config.store
    passphrase = passphrase_for(args, config, f"Passphrase for {user} on {filespace}: ")
    resolver = Resolver.from_config(reactor, config)
    store = open_store(store_url, reactor) if store_url else None
    session = None
    try:
        session = yield open_session(
            reactor, filespace=filespace, user=user, passphrase=passphrase, resolver=resolver,
            ca_file=ca_file, deadline=args.timeout,
        )
        result = yield work(Filespace(session, store))
    finally:
        if session is not None:
            yield session.close()
        yield resolver.close()
        if store is not None:
            yield defer.maybeDeferred(store.close)
    return result
