"""
``lucid conflicts FILESPACE``: writes a mount could not commit, and getting them back.

A mount that finds writes an earlier run left uncommitted, on a file that
changed or went meanwhile, keeps them (see :mod:`lucidlink.client.conflicts`)
and says so when it starts.  This command lists them, saves one as a new
file of the filespace (``--save ID --to /PATH``: the file as it is now with
those writes laid over it), or discards one (``--discard ID``).  It reads the
local folder of the mounts on this machine (``--cache-dir``, else the
config's ``cache_dir``) and logs in like every file command, since the
journals are sealed with the filespace's keys.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer

from lucidlink.cli.common import add_session_options, with_filespace
from lucidlink.cli.runner import run_on_reactor
from lucidlink.client.config import load_config
from lucidlink.errors import InvalidArgument


def add_conflicts_command(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``lucid conflicts``."""
    parser = subparsers.add_parser(
        "conflicts", help="list, save or discard writes a mount could not commit",
        description="List the writes a mount kept because their file changed or went before they could be "
                    "committed; save one as a new file (the file as it is now with those writes over it), "
                    "or discard one.")
    add_session_options(parser)
    parser.add_argument("filespace", metavar="FILESPACE")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="the mounts' cache folder (default: the config's cache_dir)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--save", metavar="ID", help="save the kept writes ID (as listed) as a new file, see --to")
    action.add_argument("--discard", metavar="ID", help="delete the kept writes ID for good")
    parser.add_argument("--to", metavar="/PATH", help="with --save: the new file's path in the filespace")
    parser.set_defaults(func=run_conflicts)


def run_conflicts(args: argparse.Namespace) -> int:
    """``lucid conflicts FILESPACE [--save ID --to /PATH | --discard ID]``."""
    from lucidlink.client import conflicts

    if args.save and not args.to:
        raise InvalidArgument("--save needs --to /PATH, the new file's path in the filespace")
    if args.to and not args.save:
        raise InvalidArgument("--to goes with --save")
    cache_dir = load_config(args.config, overrides={"cache_dir": args.cache_dir}).cache_dir

    @defer.inlineCallbacks
    def work(fs: Any) -> Generator[Any, Any, int]:
        root = Path(cache_dir) / fs.session.filespace_id.hex()
        keys = fs.session.keys
        if args.save:
            kept = conflicts.find_journal(root, keys, args.save)
            size = yield conflicts.save_as(fs, kept, args.to)
            print(f"saved {kept.id} as {args.filespace}:{args.to} ({size} bytes); the kept writes are gone")
        elif args.discard:
            kept = conflicts.find_journal(root, keys, args.discard)
            conflicts.discard(kept)
            print(f"discarded {kept.id}")
        else:
            found = conflicts.kept_journals(root, keys)
            for kept in found:
                print(kept.summary)
            if not found:
                print(f"no kept writes of {args.filespace} in {root}", file=sys.stderr)
        return 0

    return int(run_on_reactor(
        lambda reactor: with_filespace(reactor, args, args.filespace, work, needs_store=bool(args.save))
    ))
