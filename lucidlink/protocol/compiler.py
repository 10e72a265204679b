"""
Compiles :class:`~lucidlink.protocol.records.Record` declarations into fast
parse and build functions.

construct's own parsers walk a tree of objects for every message; on the hot
path of a metadata server that costs more than the network.  This module
reads the same declarations once and generates straight-line Python that
works on offsets into a ``bytes`` object: consecutive fixed-size fields
(and the length prefix that follows them) become one ``struct`` call, and
nested records are inlined.  Given the layout of the frame head, it also
writes a function that makes a whole frame; for a message without lists
that is one ``struct`` call, joined with the byte strings of the message.

Only the building blocks the protocol uses are understood: big-endian
integers, ``Flag``, ``Prefixed(N, GreedyBytes)``, ``PascalString``,
:class:`IntEnumField`, :class:`ListOf` and nested :class:`Record`\\ s.
Anything else is refused when compiling, never misread.  The tests check
that the compiled functions agree with construct byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import construct as c

from lucidlink.protocol.records import IntEnumField, ListOf, Record


class ShortBuffer(ValueError):
    """A length inside the data points past its end."""


class WrongLength(Exception):
    """A record's fields ended at ``end``, not where its frame said it would."""

    def __init__(self, end: int) -> None:
        super().__init__(end)
        self.end = end


@dataclass
class CompiledRecord:
    """``parse(data, start, end) -> obj`` and ``build(obj, parts)`` for one Record.

    ``parse`` reads the record from ``data[start:end]`` and raises
    :class:`WrongLength` unless its fields end exactly at ``end``.

    ``frame(obj, request_id, flags, version) -> bytes`` makes the whole frame,
    length prefix and header included, when the record was compiled with a
    :class:`FrameHead`.
    """

    parse: Callable[[bytes, int, int], Any]
    build: Callable[[Any, list[bytes]], None]
    source: str
    frame: Callable[[Any, int, int, int], bytes] | None = None


@dataclass(frozen=True)
class FrameHead:
    """What precedes a message body: the length prefix, then the header.

    ``format`` is the struct format (big-endian, without the byte order) of
    the length prefix and the header fields, in this order: length, version,
    message type, request id, flags.  ``header_size`` is what the length
    counts besides the body.
    """

    format: str
    header_size: int
    message_type: int


@dataclass
class _Run:
    """Fixed-size fields waiting to become one struct call."""

    formats: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)


class _Generator:
    """Writes the source of the parse, build and frame functions of a record.

    Nested records are inlined: their fixed fields join the struct call of
    the fields around them, so a record costs one call however deep it is.
    """

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"ShortBuffer": ShortBuffer, "WrongLength": WrongLength}
        self._counter = 0

    def name(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}_{self._counter}"

    def constant(self, prefix: str, value: Any) -> str:
        name = self.name(prefix)
        self.namespace[name] = value
        return name

    def parse_function(self, record: Record) -> list[str]:
        out = ["def parse(data, pos, end):"]
        run = _Run()
        self._parse_record(record, "obj", run, out, ())
        self._flush_parse(run, out)
        out.append("    if pos != end: raise WrongLength(pos)")
        out.append("    return obj")
        return out

    def build_function(self, record: Record) -> list[str]:
        out = ["def build(obj, parts):"]
        run = _Run()
        self._build_record(record, "obj", run, out, ())
        self._flush_build(run, out)
        out.append("    return None")
        return out

    def frame_function(self, record: Record, head: FrameHead) -> list[str]:
        """Straight-line code for records without lists; else around ``build``."""
        out = ["def frame(obj, request_id, flags, version):"]
        items: list[tuple[str, str]] = []
        straight: list[str] = []
        if self._plan(record, "obj", items, straight, ()):
            return out + straight + self._pack_plan(items, head)
        packer = self.constant("head", struct.Struct(">" + head.format))
        return out + [
            "    parts = [b'']",
            "    build(obj, parts)",
            f"    parts[0] = {packer}.pack({head.header_size} + sum(map(len, parts)), "
            f"version, {head.message_type}, request_id, flags)",
            "    return b''.join(parts)",
        ]

    # -- parsing -------------------------------------------------------------

    def _parse_record(self, record: Record, variable: str, run: _Run, out: list[str], seen: tuple[int, ...]) -> None:
        seen = _inside(record, seen)
        values = []
        for subcon in record.subcons:
            value = self.name("v")
            values.append(value)
            self._parse_field(subcon, value, run, out, seen)
        cls = self.constant("cls", record.cls)
        _after(run, out, f"    {variable} = {cls}({', '.join(values)})")

    def _parse_field(self, subcon: c.Construct, variable: str, run: _Run, out: list[str], seen: tuple[int, ...]) -> None:
        fixed = _fixed_format(subcon)
        if fixed is not None:
            run.formats.append(fixed)
            run.targets.append(variable)
            if isinstance(subcon, IntEnumField):
                members = self.constant("members", {int(m): m for m in subcon.enum_class})
                what = subcon.enum_class.__name__
                run.after.append(f"    try: {variable} = {members}[{variable}]")
                run.after.append(f"    except KeyError: raise ValueError(f'{{{variable}}} is not a valid {what}') from None")
            return
        prefixed = _prefixed(subcon)
        if prefixed is not None:
            length_format, encoding = prefixed
            length = self.name("n")
            run.formats.append(length_format)
            run.targets.append(length)
            self._flush_parse(run, out)
            out.append(f"    {variable} = data[pos:pos + {length}]")
            out.append(f"    if len({variable}) != {length}: raise ShortBuffer('a length points past the end')")
            out.append(f"    pos += {length}")
            if encoding is not None:
                out.append(f"    {variable} = {variable}.decode({encoding!r})")
            return
        if isinstance(subcon, Record):
            self._parse_record(subcon, variable, run, out, seen)
            return
        if not isinstance(subcon, ListOf):
            raise TypeError(f"cannot compile {subcon!r}")
        count = self.name("count")
        run.formats.append(_count_format(subcon))
        run.targets.append(count)
        self._flush_parse(run, out)
        item = self.name("item")
        out.append(f"    {variable} = []")
        out.append(f"    for _ in range({count}):")
        out.extend(self._loop_body(self._parse_field, self._flush_parse, subcon.element, item, seen))
        out.append(f"        {variable}.append({item})")

    def _flush_parse(self, run: _Run, out: list[str]) -> None:
        if not run.formats:
            return
        packer = struct.Struct(">" + "".join(run.formats))
        name = self.constant("fixed", packer)
        targets = ", ".join(run.targets) + ("," if len(run.targets) == 1 else "")
        out.append(f"    {targets} = {name}.unpack_from(data, pos)")
        out.append(f"    pos += {packer.size}")
        out.extend(run.after)
        run.formats.clear()
        run.targets.clear()
        run.after.clear()

    # -- building ------------------------------------------------------------

    def _build_record(self, record: Record, expression: str, run: _Run, out: list[str], seen: tuple[int, ...]) -> None:
        seen = _inside(record, seen)
        target = _bound(self, expression, out)
        for name, subcon in zip(record.field_names, record.subcons):
            self._build_field(subcon, f"{target}.{name}", run, out, seen)

    def _build_field(self, subcon: c.Construct, expression: str, run: _Run, out: list[str], seen: tuple[int, ...]) -> None:
        fixed = _fixed_format(subcon)
        if fixed is not None:
            run.formats.append(fixed)
            run.targets.append(expression)
            return
        prefixed = _prefixed(subcon)
        if prefixed is not None:
            payload = self._payload(expression, prefixed[1], out)
            run.formats.append(prefixed[0])
            run.targets.append(f"len({payload})")
            self._flush_build(run, out)
            out.append(f"    parts.append({payload})")
            return
        if isinstance(subcon, Record):
            self._build_record(subcon, expression, run, out, seen)
            return
        if not isinstance(subcon, ListOf):
            raise TypeError(f"cannot compile {subcon!r}")
        items = self.name("items")
        item = self.name("item")
        out.append(f"    {items} = {expression}")
        run.formats.append(_count_format(subcon))
        run.targets.append(f"len({items})")
        self._flush_build(run, out)
        out.append(f"    for {item} in {items}:")
        out.extend(self._loop_body(self._build_field, self._flush_build, subcon.element, item, seen))

    def _loop_body(
        self,
        field: Callable[[c.Construct, str, _Run, list[str], tuple[int, ...]], None],
        flush: Callable[[_Run, list[str]], None],
        element: c.Construct,
        item: str,
        seen: tuple[int, ...],
    ) -> list[str]:
        """The lines that parse or build one ``element`` of a list, indented for its loop."""
        body: list[str] = []
        run = _Run()
        field(element, item, run, body, seen)
        flush(run, body)
        return ["    " + line for line in body]

    def _payload(self, expression: str, encoding: str | None, out: list[str]) -> str:
        payload = self.name("b")
        if encoding is not None:
            out.append(f"    {payload} = {expression}.encode({encoding!r})")
        else:
            out.append(f"    {payload} = {expression}")
        return payload

    def _flush_build(self, run: _Run, out: list[str]) -> None:
        if not run.formats:
            return
        name = self.constant("fixed", struct.Struct(">" + "".join(run.formats)))
        out.append(f"    parts.append({name}.pack({', '.join(run.targets)}))")
        run.formats.clear()
        run.targets.clear()

    # -- whole frames ----------------------------------------------------------

    def _plan(self, subcon: c.Construct, expression: str, items: list[tuple[str, str]], out: list[str], seen: tuple[int, ...]) -> bool:
        """Lay ``subcon`` out as fixed fields and byte strings; False if it has a list."""
        fixed = _fixed_format(subcon)
        if fixed is not None:
            items.append((fixed, expression))
            return True
        prefixed = _prefixed(subcon)
        if prefixed is not None:
            payload = self._payload(expression, prefixed[1], out)
            items.append((prefixed[0], f"len({payload})"))
            items.append(("", payload))
            return True
        if isinstance(subcon, Record):
            inside = _inside(subcon, seen)
            target = _bound(self, expression, out)
            return all(
                self._plan(sub, f"{target}.{name}", items, out, inside)
                for name, sub in zip(subcon.field_names, subcon.subcons)
            )
        return False

    def _pack_plan(self, items: list[tuple[str, str]], head: FrameHead) -> list[str]:
        fixed_size = struct.calcsize(">" + "".join(f for f, _ in items))
        payloads = [value for f, value in items if not f]
        length = " + ".join([str(head.header_size + fixed_size), *(f"len({p})" for p in payloads)])
        header = [(f, value) for f, value in zip(
            head.format, ["length", "version", str(head.message_type), "request_id", "flags"]
        )]
        pieces: list[str] = []
        run: list[tuple[str, str]] = []
        for f, value in [*header, *items, ("", "")]:
            if f:
                run.append((f, value))
                continue
            if run:
                packer = self.constant("fixed", struct.Struct(">" + "".join(f for f, _ in run)))
                pieces.append(f"{packer}.pack({', '.join(v for _, v in run)})")
                run = []
            if value:
                pieces.append(value)
        joined = " + ".join(pieces) if len(pieces) <= 2 else f"b''.join(({', '.join(pieces)}))"
        return [f"    length = {length}", f"    return {joined}"]


def _inside(record: Record, seen: tuple[int, ...]) -> tuple[int, ...]:
    """The records being compiled once inside ``record``; a record inside itself is refused."""
    if id(record) in seen:
        raise TypeError(f"cannot compile the recursive record {record.cls.__name__}")
    return (*seen, id(record))


def _after(run: _Run, out: list[str], line: str) -> None:
    """Emit ``line`` once the fields still waiting in ``run`` are unpacked."""
    (run.after if run.formats else out).append(line)


def _bound(generator: _Generator, expression: str, out: list[str]) -> str:
    """A local name for ``expression``, so that its fields are read cheaply."""
    if expression.isidentifier():
        return expression
    name = generator.name("r")
    out.append(f"    {name} = {expression}")
    return name


def _fixed_format(subcon: c.Construct) -> str | None:
    """The struct format of a fixed-size big-endian field, or None."""
    if isinstance(subcon, IntEnumField):
        return _fixed_format(subcon.subcon)
    if isinstance(subcon, c.FormatField):
        if subcon.fmtstr[0] != ">":
            raise TypeError(f"only big-endian fields are compiled, not {subcon.fmtstr!r}")
        return subcon.fmtstr[1:]
    if subcon is c.Flag:
        return "?"
    return None


def _count_format(subcon: ListOf) -> str:
    count_format = _fixed_format(subcon.countfield)
    if count_format is None:
        raise TypeError(f"cannot compile the count of {subcon!r}")
    return count_format


def _prefixed(subcon: c.Construct) -> tuple[str, str | None] | None:
    """(length format, text encoding or None) of length-prefixed bytes or text."""
    encoding = None
    if isinstance(subcon, c.StringEncoded):
        encoding = subcon.encoding
        subcon = subcon.subcon
    if isinstance(subcon, c.Prefixed) and subcon.subcon is c.GreedyBytes and not subcon.includelength:
        length_format = _fixed_format(subcon.lengthfield)
        if length_format is not None:
            return length_format, encoding
    if encoding is not None:
        raise TypeError(f"cannot compile text field {subcon!r}")
    return None


def compile_record(record: Record, head: FrameHead | None = None) -> CompiledRecord:
    """Generate and load the fast functions of ``record`` (and of its frames, given ``head``)."""
    generator = _Generator()
    lines = generator.parse_function(record) + [""] + generator.build_function(record) + [""]
    if head is not None:
        lines += generator.frame_function(record, head) + [""]
    source = "\n".join(lines)
    namespace = dict(generator.namespace)
    exec(compile(source, f"<compiled {record.cls.__name__}>", "exec"), namespace)  # noqa: S102
    return CompiledRecord(namespace["parse"], namespace["build"], source, namespace.get("frame"))
