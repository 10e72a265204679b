"""
``lucid tls``: make a private CA and issue certificates from it.

``lucid tls init-ca DIR`` writes ``DIR/ca.pem`` and ``DIR/ca.key``;
``lucid tls issue --ca DIR --name NAME --out PREFIX`` writes ``PREFIX.pem``
and ``PREFIX.key`` for a server or client.  The work is done by
:mod:`lucidlink.tls`; errors are :class:`~lucidlink.errors.LucidError`\\ s,
which the top-level command reports.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lucidlink import tls


def add_tls_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``tls init-ca`` and ``tls issue`` on the top-level subparsers."""
    tls_parser = subparsers.add_parser(
        "tls",
        help="make a private CA and issue certificates",
        description="Make a private certificate authority and issue certificates from it.",
    )
    tls_commands = tls_parser.add_subparsers(dest="tls_command", metavar="COMMAND", required=True)

    init_ca = tls_commands.add_parser(
        "init-ca",
        help="create a private CA",
        description="Create a private CA: DIR/ca.pem and DIR/ca.key (readable by you alone).",
    )
    init_ca.add_argument("directory", metavar="DIR", type=Path, help="where to write the CA")
    init_ca.add_argument("--days", type=_positive_int, default=3650, help="validity (default 3650)")
    init_ca.add_argument("--force", action="store_true", help="overwrite an existing CA")
    init_ca.set_defaults(func=run_init_ca)

    issue = tls_commands.add_parser(
        "issue",
        help="issue a certificate signed by the CA",
        description=(
            "Issue a certificate for one or more DNS names or IP addresses, usable by"
            " servers and clients: PREFIX.pem and PREFIX.key."
        ),
    )
    issue.add_argument("--ca", required=True, type=Path, metavar="DIR", help="the CA directory")
    issue.add_argument(
        "--name",
        dest="names",
        required=True,
        action="append",
        metavar="NAME",
        help="a DNS name or IP address; repeat for more (the first is the common name)",
    )
    issue.add_argument("--out", required=True, type=Path, metavar="PREFIX", help="output path prefix")
    issue.add_argument("--days", type=_positive_int, default=825, help="validity (default 825)")
    issue.add_argument("--force", action="store_true", help="overwrite existing files")
    issue.set_defaults(func=run_issue)


def run_init_ca(args: argparse.Namespace) -> int:
    """Carry out ``lucid tls init-ca``."""
    cert_path, key_path = tls.init_ca(args.directory, days=args.days, force=args.force)
    print(f"wrote CA certificate {cert_path} and key {key_path}")
    return 0


def run_issue(args: argparse.Namespace) -> int:
    """Carry out ``lucid tls issue``."""
    cert_path, key_path = tls.issue_certificate(
        args.ca, args.names, args.out, days=args.days, force=args.force
    )
    print(f"wrote certificate {cert_path} and key {key_path} for {', '.join(args.names)}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of days, not {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of days, not {text}")
    return value
