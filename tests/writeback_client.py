"""
A client process for the write-back tests, logged in as ``lucid-mount`` logs in (its config, its cache).

``python -m tests.writeback_client write FILESPACE PATH SIZE SEED``: open (or
create) ``PATH``, write ``SIZE`` pseudo-random bytes of ``SEED`` over it, print
``pending`` and die at once, without closing the file: a client that crashed
with writes buffered.

``python -m tests.writeback_client recover FILESPACE``: log in as a new
mount does, which commits what earlier runs left; print each outcome.

The config comes from ``LUCID_CONFIG``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Generator
from typing import Any

from twisted.internet import defer, task

from lucidlink.cli import mount as cli_mount
from lucidlink.cli.common import with_filespace
from tests.cache_helpers import pattern


def _session_args() -> argparse.Namespace:
    return argparse.Namespace(config=None, user=None, store=None, passphrase_file=None, timeout=None)


def _settings() -> cli_mount.CacheSettings:
    return cli_mount.cache_settings(argparse.Namespace(config=None, cache_dir=None, cache_size=None, read_ahead=None))


def main(reactor: Any, command: str, filespace: str, *rest: str) -> defer.Deferred[Any]:
    @defer.inlineCallbacks
    def write(fs: Any) -> Generator[defer.Deferred[Any], Any, None]:
        cached = yield cli_mount.cached_filespace(fs, _settings())
        path, size, seed = rest[0], int(rest[1]), int(rest[2])
        handle = yield cached.open_path(path, os.O_WRONLY | os.O_CREAT)
        yield handle.write(0, pattern(size, seed))
        print("pending", flush=True)
        os._exit(0)

    @defer.inlineCallbacks
    def recover(fs: Any) -> Generator[defer.Deferred[Any], Any, None]:
        cached = yield cli_mount.cached_filespace(fs, _settings())
        yield cached.close()
        print("recovered", flush=True)

    return with_filespace(reactor, _session_args(), filespace, {"write": write, "recover": recover}[command])


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
