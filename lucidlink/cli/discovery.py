"""
``lucid discovery``: ask the discovery service.

``lucid discovery resolve X`` prints what discovery answers for filespace
``X``: its status, the metadata server's endpoints, the TLS identity that
server must present and how long the answer holds; ``--json`` prints the
same as one JSON object.  The discovery endpoints, the CA and the identity
discovery presents come from ``--discovery``, ``--ca`` and
``--discovery-identity``, else the environment, else the config file (see
:mod:`lucidlink.client.config`).  The answer is also stored in the client's
endpoint cache.

When discovery cannot say, the command exits 1 with one line on stderr: no
instance answered before ``--timeout`` (each is named with what went wrong:
refused the connection, certificate refused, busy, ...), or no filespace of
that name is registered.  The work is :func:`resolve_filespace`, a function
of the reactor that tests drive directly; :func:`run_resolve` runs it on
the process's reactor.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer

from lucidlink.cli.runner import run_on_reactor
from lucidlink.client.config import ClientConfig, load_config
from lucidlink.client.endpoint_cache import Location
from lucidlink.client.resolver import Resolver

DEFAULT_TIMEOUT = 10.0


def add_discovery_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``discovery resolve`` on the top-level subparsers."""
    discovery_parser = subparsers.add_parser(
        "discovery",
        help="ask the discovery service",
        description="Ask the discovery service where filespaces are served.",
    )
    commands = discovery_parser.add_subparsers(dest="discovery_command", metavar="COMMAND", required=True)

    resolve = commands.add_parser(
        "resolve",
        help="show where a filespace is served",
        description=(
            "Ask discovery where FILESPACE is served: its status, the metadata server's"
            " endpoints, the TLS identity it presents, and for how long the answer holds."
        ),
    )
    resolve.add_argument("filespace", metavar="FILESPACE", help="the filespace to look up")
    resolve.add_argument("--json", action="store_true", help="print one JSON object")
    resolve.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this long (default {DEFAULT_TIMEOUT:g})",
    )
    resolve.add_argument(
        "--discovery",
        action="extend",
        nargs="+",
        metavar="ENDPOINT",
        help="a discovery endpoint such as tcp:discovery.example:7000 (repeatable; default from the config)",
    )
    resolve.add_argument("--ca", type=Path, metavar="FILE", help="the CA certificate to trust (default from the config)")
    resolve.add_argument(
        "--discovery-identity",
        metavar="NAME",
        help="the TLS identity discovery presents (default from the config, else discovery.lucid)",
    )
    resolve.set_defaults(func=run_resolve)


def run_resolve(args: argparse.Namespace) -> int:
    """Carry out ``lucid discovery resolve``."""
    config = load_config(
        getattr(args, "config", None),
        overrides={"discovery": args.discovery, "ca": args.ca, "discovery_identity": args.discovery_identity},
    )
    # Missing settings are reported before any reactor work starts.
    config.require_discovery()
    config.require_ca()
    location = run_on_reactor(lambda reactor: resolve_filespace(reactor, config, args.filespace, args.timeout))
    print(render_json(location) if args.json else render_text(location))
    return 0


@defer.inlineCallbacks
def resolve_filespace(
    reactor: Any, config: ClientConfig, filespace: str, timeout: float
) -> Generator[defer.Deferred[Any], Any, Location]:
    """Ask discovery, as ``config`` says, where ``filespace`` is; give up after ``timeout`` seconds."""
    resolver = Resolver.from_config(reactor, config, fail_fast=True)
    try:
        location = yield resolver.resolve(filespace, deadline=reactor.seconds() + timeout)
    finally:
        yield resolver.close()
    return location


def render_text(location: Location) -> str:
    """What ``lucid discovery resolve`` prints: the status first, then one fact a line."""
    lines = [f"{location.filespace}: {location.status_name}"]
    lines += [f"endpoint: {endpoint}" for endpoint in location.endpoints] or ["endpoint: (none)"]
    lines.append(f"identity: {location.identity}")
    lines.append(f"ttl: {location.ttl_ms / 1000:g} s")
    if location.source:
        lines.append(f"answered by: {location.source}")
    return "\n".join(lines)


def render_json(location: Location) -> str:
    """What ``lucid discovery resolve --json`` prints: one JSON object."""
    return json.dumps(
        {
            "filespace": location.filespace,
            "status": location.status_name,
            "endpoints": list(location.endpoints),
            "identity": location.identity,
            "ttl_ms": location.ttl_ms,
            "answered_by": location.source,
        }
    )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value
