"""
``lucid``: the administration and file command line.

Each command family lives in its own module and registers its subcommands
here.  ``--config FILE`` (before the command) names the client config file
for every command that reads one (see :mod:`lucidlink.client.config`).
Every failure ends with one line on stderr, ``lucid: <what went
wrong>``, and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lucidlink.cli.admin import add_admin_commands
from lucidlink.cli.conflicts import add_conflicts_command
from lucidlink.cli.demo import add_demo_command
from lucidlink.cli.discovery import add_discovery_commands
from lucidlink.cli.files import add_file_commands
from lucidlink.cli.tls import add_tls_commands
from lucidlink.errors import LucidError


def build_parser() -> argparse.ArgumentParser:
    """The parser for every ``lucid`` subcommand."""
    parser = argparse.ArgumentParser(
        prog="lucid",
        description="Administer and use lucidlink filespaces.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the client config file (default: $LUCID_CONFIG, else ~/.config/lucid/client.ini)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_file_commands(commands)
    add_conflicts_command(commands)
    add_admin_commands(commands)
    add_tls_commands(commands)
    add_discovery_commands(commands)
    add_demo_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lucid`` with ``argv`` (default: the process arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LucidError as error:
        print(f"lucid: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        print(f"lucid: {error.strerror or error}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lucid: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
