"""
Administration: ``lucid filespace init``, ``lucid user add|remove|passwd|list``
and ``lucid key export``.

Keys never leave the client: ``filespace init`` makes the master key here
and sends the server only the admin's wrapped copy; ``user add`` derives
the new user's credentials here from their passphrase and wraps the key for
them; ``key export`` writes an offline recovery copy to a local file.  The
new user's passphrase comes from ``--new-passphrase-file``, else
``LUCID_NEW_PASSPHRASE``, else a prompt.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer

from lucidlink.cli.common import (
    add_session_options,
    client_config,
    passphrase_for,
    prompt_passphrase,
    read_passphrase_file,
    with_filespace,
)
from lucidlink.cli.runner import run_on_reactor
from lucidlink.errors import AlreadyExists, InvalidArgument
from lucidlink.protocol.messages import Role

NEW_PASSPHRASE_VARIABLE = "LUCID_NEW_PASSPHRASE"
ROLES = {role.name.lower(): role for role in Role}
SIZE_SUFFIXES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def add_admin_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``filespace``, ``user`` and ``key`` on the top-level subparsers."""
    filespace = subparsers.add_parser("filespace", help="create a filespace", description="Create a filespace.")
    filespace_commands = filespace.add_subparsers(dest="filespace_command", metavar="COMMAND", required=True)
    init = filespace_commands.add_parser(
        "init", help="initialise a new filespace on its metadata server",
        description=(
            "Initialise FILESPACE: make its master key on this machine, make NAME its first admin,"
            " and hand the server the one-time bootstrap token it wrote to its data folder."
        ),
    )
    init.add_argument("filespace", metavar="FILESPACE")
    init.add_argument("--bootstrap-token-file", type=Path, required=True, metavar="FILE",
                      help="the server's bootstrap-token file")
    init.add_argument("--admin", required=True, metavar="NAME", help="the first user, with the admin role")
    init.add_argument("--chunk-size", type=_size, default=4 * 1024**2, metavar="SIZE",
                      help="chunk size, fixed for the filespace's life (default 4M)")
    add_session_options(init)
    init.set_defaults(func=run_filespace_init)

    user = subparsers.add_parser("user", help="manage the users of a filespace",
                                 description="Manage the users of a filespace.")
    user_commands = user.add_subparsers(dest="user_command", metavar="COMMAND", required=True)
    add = user_commands.add_parser("add", help="add a user", description="Add a user with a role.")
    add.add_argument("filespace", metavar="FILESPACE")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--role", choices=sorted(ROLES), default="writer", help="default: writer")
    add.add_argument("--new-passphrase-file", type=Path, metavar="FILE", help="the new user's passphrase")
    remove = user_commands.add_parser("remove", help="remove a user", description="Remove a user; their sessions end.")
    remove.add_argument("filespace", metavar="FILESPACE")
    remove.add_argument("name", metavar="NAME")
    passwd = user_commands.add_parser("passwd", help="change a passphrase",
                                      description="Change your passphrase, or (as an admin) another user's.")
    passwd.add_argument("filespace", metavar="FILESPACE")
    passwd.add_argument("name", metavar="NAME", nargs="?", help="default: yourself")
    passwd.add_argument("--new-passphrase-file", type=Path, metavar="FILE", help="the new passphrase")
    listing = user_commands.add_parser("list", help="list users and roles", description="List users and their roles.")
    listing.add_argument("filespace", metavar="FILESPACE")
    for parser, run in ((add, run_user_add), (remove, run_user_remove), (passwd, run_user_passwd),
                        (listing, run_user_list)):
        add_session_options(parser)
        parser.set_defaults(func=run)

    key = subparsers.add_parser("key", help="export the filespace key", description="Export the filespace key.")
    key_commands = key.add_subparsers(dest="key_command", metavar="COMMAND", required=True)
    export = key_commands.add_parser(
        "export", help="write an offline recovery copy of the key",
        description="Write an offline recovery copy of FILESPACE's master key to FILE (readable by you alone).",
    )
    export.add_argument("filespace", metavar="FILESPACE")
    export.add_argument("file", type=Path, metavar="FILE")
    export.add_argument("--force", action="store_true", help="overwrite FILE")
    add_session_options(export)
    export.set_defaults(func=run_key_export)


def _size(text: str) -> int:
    number, suffix = text.strip().lower(), ""
    if number and number[-1] in "kmg":
        number, suffix = number[:-1], number[-1]
    try:
        value = int(number) * SIZE_SUFFIXES[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4M") from None
    return value


def _new_passphrase(args: argparse.Namespace, who: str) -> str:
    if args.new_passphrase_file is not None:
        return read_passphrase_file(args.new_passphrase_file)
    from_environment = os.environ.get(NEW_PASSPHRASE_VARIABLE)
    if from_environment:
        return from_environment
    return prompt_passphrase(f"New passphrase for {who}: ", confirm=True)


def _session_work(args: argparse.Namespace, work: Any) -> int:
    return int(run_on_reactor(
        lambda reactor: with_filespace(reactor, args, args.filespace, lambda fs: work(fs.session), needs_store=False)
    ) or 0)


def run_filespace_init(args: argparse.Namespace) -> int:
    """``lucid filespace init X --bootstrap-token-file F --admin NAME``."""
    from lucidlink.client.resolver import Resolver, connect_to_filespace, tls_connector
    from lucidlink.client.session import initialise_filespace

    config = client_config(args)
    config.require_discovery()
    ca_file = config.require_ca()
    token = args.bootstrap_token_file.read_text().strip()
    if not token:
        raise InvalidArgument(f"the bootstrap token file {args.bootstrap_token_file} is empty")
    passphrase = passphrase_for(args, config, f"Passphrase for {args.admin} (the admin of {args.filespace}): ",
                                confirm=True)

    @defer.inlineCallbacks
    def work(reactor: Any) -> Generator[Any, Any, int]:
        resolver = Resolver.from_config(reactor, config)
        connection = None
        try:
            connect = tls_connector(reactor, ca_file, filespace=args.filespace, peer_name="lucid filespace init")
            connection = yield connect_to_filespace(
                resolver, args.filespace, connect, deadline=reactor.seconds() + args.timeout
            )
            yield initialise_filespace(
                reactor, connection=connection, token=token, admin=args.admin, passphrase=passphrase,
                chunk_size=args.chunk_size,
            )
        finally:
            if connection is not None:
                yield connection.close("done")
            yield resolver.close()
        print(f"filespace {args.filespace} initialised; {args.admin} is its admin")
        return 0

    return int(run_on_reactor(work))


def run_user_add(args: argparse.Namespace) -> int:
    """``lucid user add X NAME --role ROLE``."""
    new_passphrase = _new_passphrase(args, args.name)

    @defer.inlineCallbacks
    def work(session: Any) -> Generator[Any, Any, int]:
        yield session.add_user(args.name, ROLES[args.role], new_passphrase)
        print(f"added {args.name} to {args.filespace} as {args.role}")
        return 0

    return _session_work(args, work)


def run_user_remove(args: argparse.Namespace) -> int:
    """``lucid user remove X NAME``."""

    @defer.inlineCallbacks
    def work(session: Any) -> Generator[Any, Any, int]:
        yield session.remove_user(args.name)
        print(f"removed {args.name} from {args.filespace}")
        return 0

    return _session_work(args, work)


def run_user_passwd(args: argparse.Namespace) -> int:
    """``lucid user passwd X [NAME]``."""
    config = client_config(args)
    name = args.name or config.user
    if not name:
        raise InvalidArgument("whose passphrase? give NAME or --user")
    new_passphrase = _new_passphrase(args, name)

    @defer.inlineCallbacks
    def work(session: Any) -> Generator[Any, Any, int]:
        yield session.change_passphrase(name, new_passphrase)
        print(f"changed the passphrase of {name} on {args.filespace}")
        return 0

    return _session_work(args, work)


def run_user_list(args: argparse.Namespace) -> int:
    """``lucid user list X``."""

    @defer.inlineCallbacks
    def work(session: Any) -> Generator[Any, Any, int]:
        users = yield session.list_users()
        for user in users:
            print(f"{user.name}\t{user.role.name.lower()}")
        return 0

    return _session_work(args, work)


def run_key_export(args: argparse.Namespace) -> int:
    """``lucid key export X FILE``: refuses to overwrite without ``--force``."""
    if args.file.exists() and not args.force:
        raise AlreadyExists(f"{args.file} exists; use --force to overwrite it")

    @defer.inlineCallbacks
    def work(session: Any) -> Generator[Any, Any, int]:
        text = yield defer.maybeDeferred(session.export_key)
        temporary = args.file.with_name(f".{args.file.name}.part")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as stream:
            stream.write(text if text.endswith("\n") else text + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, args.file)
        print(f"wrote the key of {args.filespace} to {args.file}; keep it offline: it opens everything")
        return 0

    return _session_work(args, work)
