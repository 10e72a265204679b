"""
``twistd lucid-meta --filespace X --config PATH``: the options and the service tree.

:func:`makeService` reads the configuration (:mod:`lucidlink.meta.config`)
and returns a :class:`~lucidlink.meta.server.MetaServer`.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from lucidlink.listening import ListenOption
from lucidlink.meta.config import load_config
from lucidlink.meta.server import MetaServer


class Options(ListenOption, usage.Options):
    """``twistd lucid-meta --filespace NAME --config PATH [--data-dir DIR] [--listen ENDPOINT]...``"""

    synopsis = "--filespace NAME --config PATH [--data-dir DIR] [--listen ENDPOINT]..."
    longdesc = (
        "Serve the metadata of one filespace: its tree, chunk maps, users and locks, "
        "kept in SQLite in the data folder, to clients over TLS."
    )
    optParameters = [
        ["filespace", "f", None, "The filespace to serve (its certificate names <filespace>.meta.lucid)."],
        ["config", "c", None, "The configuration file (see etc/lucid-meta.ini)."],
        ["data-dir", "d", None, "The data folder, instead of the configuration's data_dir."],
    ]

    def postOptions(self) -> None:
        if not self["filespace"]:
            raise usage.UsageError("--filespace NAME is required")
        if not self["config"]:
            raise usage.UsageError("--config PATH is required")
        self["meta"] = load_config(
            self["config"], self["filespace"], data_dir=self["data-dir"], listen=self["listen"]
        )


def makeService(options: Any) -> MetaServer:
    """The metadata server for parsed ``options``."""
    from twisted.internet import reactor

    config = options.get("meta") or load_config(
        options["config"], options["filespace"], data_dir=options.get("data-dir"), listen=options.get("listen", ())
    )
    return MetaServer(config, reactor)
