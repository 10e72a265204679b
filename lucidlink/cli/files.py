"""
File commands without FUSE: ``lucid ls|stat|cat|mkdir|rm|mv|ln|put|get``.

Paths inside a filespace are written ``FILESPACE:/some/path``.  Each
command logs in (see :mod:`lucidlink.cli.common` for the user, the
passphrase and the store), does its work through
:class:`lucidlink.client.filespace.Filespace` and exits; ``put`` and ``get``
show a progress bar on a terminal.
"""

from __future__ import annotations

import argparse
import os
import stat as stat_module
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from tqdm import tqdm
from twisted.internet import defer

from lucidlink.cli.common import RemotePath, add_session_options, remote_path, with_filespace
from lucidlink.cli.runner import run_on_reactor
from lucidlink.errors import InvalidArgument, IsADirectory, NotFound
from lucidlink.protocol.messages import FileKind

COPY_BLOCK = 4 * 1024 * 1024


def add_file_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register the file commands on the top-level subparsers."""

    def command(name: str, help_text: str, run: Any) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        add_session_options(parser)
        parser.set_defaults(func=run)
        return parser

    ls = command("ls", "list a directory", run_ls)
    ls.add_argument("-l", dest="long", action="store_true", help="one entry a line with its attributes")
    ls.add_argument("path", type=remote_path, metavar="FILESPACE:/PATH")

    stat_parser = command("stat", "show an entry's attributes", run_stat)
    stat_parser.add_argument("paths", type=remote_path, nargs="+", metavar="FILESPACE:/PATH")

    cat = command("cat", "write a file's contents to standard output", run_cat)
    cat.add_argument("paths", type=remote_path, nargs="+", metavar="FILESPACE:/PATH")

    mkdir = command("mkdir", "make directories", run_mkdir)
    mkdir.add_argument("-p", dest="parents", action="store_true", help="make parents as needed; no error if it exists")
    mkdir.add_argument("paths", type=remote_path, nargs="+", metavar="FILESPACE:/PATH")

    rm = command("rm", "remove files (and directories with -r)", run_rm)
    rm.add_argument("-r", dest="recursive", action="store_true", help="remove directories and their contents")
    rm.add_argument("-f", dest="force", action="store_true", help="no error if it does not exist")
    rm.add_argument("paths", type=remote_path, nargs="+", metavar="FILESPACE:/PATH")

    mv = command("mv", "rename or move an entry", run_mv)
    mv.add_argument("source", type=remote_path, metavar="FILESPACE:/FROM")
    mv.add_argument("target", type=remote_path, metavar="FILESPACE:/TO")

    ln = command("ln", "make a hard link (or a symbolic link with -s)", run_ln)
    ln.add_argument("-s", dest="symbolic", action="store_true", help="make a symbolic link whose target is TARGET")
    ln.add_argument("target", metavar="TARGET", help="FILESPACE:/PATH to link to (with -s: any text)")
    ln.add_argument("link", type=remote_path, metavar="FILESPACE:/LINK")

    for name, help_text, run, source, target in (
        ("put", "copy a local file into a filespace", run_put, ("local", Path, "LOCAL"),
         ("remote", remote_path, "FILESPACE:/PATH")),
        ("get", "copy a file out of a filespace", run_get, ("remote", remote_path, "FILESPACE:/PATH"),
         ("local", Path, "LOCAL")),
    ):
        parser = command(name, help_text, run)
        parser.add_argument(source[0], type=source[1], metavar=source[2])
        parser.add_argument(target[0], type=target[1], metavar=target[2])
        parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                            help="show a progress bar (default: when standard error is a terminal)")


def _one_filespace(paths: list[RemotePath]) -> str:
    names = {path.filespace for path in paths}
    if len(names) != 1:
        raise InvalidArgument(f"one command works on one filespace, not {', '.join(sorted(names))}")
    return names.pop()


def _run(args: argparse.Namespace, paths: list[RemotePath], work: Any, needs_store: bool = True) -> int:
    filespace = _one_filespace(paths)
    return int(run_on_reactor(lambda reactor: with_filespace(reactor, args, filespace, work, needs_store=needs_store)) or 0)


# -- ls / stat ------------------------------------------------------------------


def _name(name: Any) -> str:
    return name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else str(name)


def _long_line(name: str, attributes: Any, target: str | None = None) -> str:
    mode = stat_module.filemode(attributes.mode)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(attributes.mtime_ns / 1e9))
    line = f"{mode} {attributes.nlink:>3} {attributes.uid:>5} {attributes.gid:>5} {attributes.size:>12} {when} {name}"
    return line + (f" -> {target}" if target is not None else "")


def run_ls(args: argparse.Namespace) -> int:
    """``lucid ls [-l] X:/path``."""

    @defer.inlineCallbacks
    def work(fs: Any) -> Generator[Any, Any, int]:
        attributes = yield fs.resolve(args.path.path, follow=True)
        if attributes.kind != FileKind.DIRECTORY:
            entries = [(os.path.basename(args.path.path.rstrip("/")) or "/", attributes)]
        else:
            entries = [(_name(name), attrs) for name, attrs in (yield fs.listdir(args.path.path))]
            entries.sort(key=lambda entry: entry[0])
        for name, attrs in entries:
            if not args.long:
                print(name)
                continue
            target = None
            if attrs.kind == FileKind.SYMLINK:
                target = _name((yield fs.readlink(_join(args.path.path, name))))
            print(_long_line(name, attrs, target))
        return 0

    return _run(args, [args.path], work, needs_store=False)


def run_stat(args: argparse.Namespace) -> int:
    """``lucid stat X:/path ...``."""

    @defer.inlineCallbacks
    def work(fs: Any) -> Generator[Any, Any, int]:
        for path in args.paths:
            a = yield fs.resolve(path.path, follow=False)
            print(f"  File: {path}")
            print(f"  Size: {a.size:<12} Inode: {a.inode:<10} Links: {a.nlink}  Type: {a.kind.name.lower()}")
            print(f"Access: ({stat_module.S_IMODE(a.mode):04o}/{stat_module.filemode(a.mode)})  Uid: {a.uid}  Gid: {a.gid}")
            for label, ns in (("Access", a.atime_ns), ("Modify", a.mtime_ns), ("Change", a.ctime_ns)):
                print(f"{label}: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ns / 1e9))}.{ns % 10**9:09d}")
        return 0

    return _run(args, args.paths, work, needs_store=False)


# -- cat / put / get ------------------------------------------------------------


def run_cat(args: argparse.Namespace) -> int:
    """``lucid cat X:/path ...``: the contents, streamed to standard output."""
    out = sys.stdout.buffer

    @defer.inlineCallbacks
    def work(fs: Any) -> Generator[Any, Any, int]:
        for path in args.paths:
            yield fs.copy_out(path.path, out.write, COPY_BLOCK)
        out.flush()
        return 0

    return _run(args, args.paths, work)


def _progress(args: argparse.Namespace, total: int, label: str) -> tqdm:
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=not show, leave=False)


def run_put(args: argparse.Namespace) -> int:
    """``lucid put LOCAL X:/path``."""
    local: Path = args.local
    if local.is_dir():
        raise IsADirectory(f"{local} is a directory; put copies one file")
    size = local.stat().st_size  # raises FileNotFoundError, reported as one line

    @defer.inlineCallbacks
    def work(fs: Any) -> Generator[Any, Any, int]:
        target = args.remote.path
        try:
            existing = yield fs.resolve(target, follow=True)
        except NotFound:
            existing = None
        if existing is not None and existing.kind == FileKind.DIRECTORY:
            target = _join(target, local.name)
        handle = yield fs.open_path(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        progress = _progress(args, size, local.name)
        try:
            with local.open("rb") as source:
                offset = 0
                while block := source.read(COPY_BLOCK):
                    yield handle.write(offset, block)
                    offset += len(block)
                    progress.update(len(block))
            yield handle.close()
        finally:
            progress.close()
        return 0

    return _run(args, [args.remote], work)


def run_get(args: argparse.Namespace) -> int:
    """``lucid get X:/path LOCAL``: written to a temporary file, then renamed into place."""

    @defer.inlineCallbacks
    def work(fs: Any) -> Generator[Any, Any, int]:
        attributes = yield fs.resolve(args.remote.path, follow=True)
        if attributes.kind == FileKind.DIRECTORY:
            raise IsADirectory(f"{args.remote} is a directory; get copies one file")
        local: Path = args.local
        if local.is_dir():
            local = local / os.path.basename(args.remote.path)
        temporary = local.with_name(f".{local.name}.lucid-part")
        progress = _progress(args, attributes.size, local.name)
        try:
            with temporary.open("wb") as sink:

                def write(data: bytes) -> None:
                    sink.write(data)
                    progress.update(len(data))

                yield fs.copy_out(args.remote.path, write, COPY_BLOCK)
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(temporary, local)
        finally:
            progress.close()
            temporary.unlink(missing_ok=True)
        return 0

    return _run(args, [args.remote], work)


# -- mkdir / rm / mv / ln -------------------------------------------------------


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def run_mkdir(args: argparse.Namespace) -> int:
    """``lucid mkdir [-p] X:/path ...``."""

    @defer.inlineCallbacks
    def work(fs: Any) -> Generator[Any, Any, int]:
        for path in args.paths:
            yield fs.mkdir(path.path, parents=args.parents)
        return 0

    return _run(args, args.paths, work, needs_store=False)


def run_rm(args: argparse.Namespace) -> int:
    """``lucid rm [-r] [-f] X:/path ...``."""

    @defer.inlineCallbacks
    def work(fs: Any) -> Generator[Any, Any, int]:
        for path in args.paths:
            try:
                attributes = yield fs.resolve(path.path, follow=False)
                if attributes.kind == FileKind.DIRECTORY:
                    if not args.recursive:
                        raise IsADirectory(f"{path} is a directory (use rm -r)")
                    yield fs.remove_tree(path.path)
                else:
                    yield fs.remove(path.path)
            except NotFound:
                if not args.force:
                    raise
        return 0

    return _run(args, args.paths, work, needs_store=False)


def run_mv(args: argparse.Namespace) -> int:
    """``lucid mv X:/from X:/to``: into ``to`` when it is a directory, as mv(1) does."""

    @defer.inlineCallbacks
    def work(fs: Any) -> Generator[Any, Any, int]:
        target = args.target.path
        try:
            existing = yield fs.resolve(target, follow=True)
        except NotFound:
            existing = None
        if existing is not None and existing.kind == FileKind.DIRECTORY:
            source = yield fs.resolve(args.source.path, follow=False)
            if source.inode != existing.inode:
                target = _join(target, os.path.basename(args.source.path.rstrip("/")))
        yield fs.rename(args.source.path, target)
        return 0

    return _run(args, [args.source, args.target], work, needs_store=False)


def run_ln(args: argparse.Namespace) -> int:
    """``lucid ln X:/target X:/link`` or ``lucid ln -s TARGET X:/link``."""

    @defer.inlineCallbacks
    def work(fs: Any) -> Generator[Any, Any, int]:
        if args.symbolic:
            yield fs.symlink(args.target, args.link.path)
        else:
            try:
                source = remote_path(args.target)
            except argparse.ArgumentTypeError as error:
                raise InvalidArgument(f"{error} (use ln -s for a symbolic link)") from None
            if source.filespace != args.link.filespace:
                raise InvalidArgument("a hard link stays within one filespace")
            yield fs.link(source.path, args.link.path)
        return 0

    return _run(args, [args.link], work, needs_store=False)
