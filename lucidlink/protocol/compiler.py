"""
Compiles :class:`~lucidlink.protocol.records.Record` declarations into fast
parse and build functions.

construct's own parsers walk a tree of objects for every message; on the hot
path of a metadata server that costs more than the network.  This module
reads the same declarations once and generates straight-line Python that
works on offsets into a ``bytes`` object: consecutive fixed-size fields
(and the length prefix that follows them) become one ``struct`` call.

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


@dataclass
class CompiledRecord:
    """``parse(data, pos) -> (obj, pos)`` and ``build(obj, parts)`` for one Record."""

    parse: Callable[[bytes, int], tuple[Any, int]]
    build: Callable[[Any, list[bytes]], None]
    source: str


@dataclass
class _Run:
    """Fixed-size fields waiting to become one struct call."""

    formats: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)


class _Generator:
    """Writes the source of the parse and build functions of records."""

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"ShortBuffer": ShortBuffer}
        self.lines: list[str] = []
        self.functions: dict[int, str] = {}
        self._counter = 0

    def name(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}_{self._counter}"

    def constant(self, prefix: str, value: Any) -> str:
        name = self.name(prefix)
        self.namespace[name] = value
        return name

    def record(self, record: Record) -> str:
        """Emit the functions of ``record`` (once) and return their suffix."""
        key = id(record)
        if key in self.functions:
            return self.functions[key]
        suffix = self.name(record.cls.__name__)
        self.functions[key] = suffix
        cls = self.constant("cls", record.cls)
        parse = [f"def parse_{suffix}(data, pos):"]
        values: list[str] = []
        run = _Run()
        for index, subcon in enumerate(record.subcons):
            variable = f"v{index}"
            values.append(variable)
            self._parse_field(subcon, variable, run, parse)
        self._flush_parse(run, parse)
        parse.append(f"    return {cls}({', '.join(values)}), pos")

        build = [f"def build_{suffix}(obj, parts):"]
        run = _Run()
        for name, subcon in zip(record.field_names, record.subcons):
            self._build_field(subcon, f"obj.{name}", run, build)
        self._flush_build(run, build)
        build.append("    return None")
        self.lines.extend(parse + [""] + build + [""])
        return suffix

    # -- parsing -------------------------------------------------------------

    def _parse_field(self, subcon: c.Construct, variable: str, run: _Run, out: list[str]) -> None:
        fixed = _fixed_format(subcon)
        if fixed is not None:
            run.formats.append(fixed)
            run.targets.append(variable)
            if isinstance(subcon, IntEnumField):
                members = self.constant("members", {int(m): m for m in subcon.enum_class})
                what = subcon.enum_class.__name__
                run.after.append(
                    f"    try: {variable} = {members}[{variable}]\n"
                    f"    except KeyError: raise ValueError(f'{{{variable}}} is not a valid {what}') from None"
                )
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
        self._flush_parse(run, out)
        if isinstance(subcon, Record):
            out.append(f"    {variable}, pos = parse_{self.record(subcon)}(data, pos)")
        elif isinstance(subcon, ListOf):
            count = self.name("count")
            run.formats.append(_count_format(subcon))
            run.targets.append(count)
            self._flush_parse(run, out)
            item = self.name("item")
            out.append(f"    {variable} = []")
            out.append(f"    for _ in range({count}):")
            element: list[str] = []
            element_run = _Run()
            self._parse_field(subcon.element, item, element_run, element)
            self._flush_parse(element_run, element)
            out.extend("    " + line for line in element)
            out.append(f"        {variable}.append({item})")
        else:
            raise TypeError(f"cannot compile {subcon!r}")

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

    def _build_field(self, subcon: c.Construct, expression: str, run: _Run, out: list[str]) -> None:
        fixed = _fixed_format(subcon)
        if fixed is not None:
            run.formats.append(fixed)
            run.targets.append(expression)
            return
        prefixed = _prefixed(subcon)
        if prefixed is not None:
            length_format, encoding = prefixed
            payload = self.name("b")
            if encoding is not None:
                out.append(f"    {payload} = {expression}.encode({encoding!r})")
            else:
                out.append(f"    {payload} = {expression}")
            run.formats.append(length_format)
            run.targets.append(f"len({payload})")
            self._flush_build(run, out)
            out.append(f"    parts.append({payload})")
            return
        self._flush_build(run, out)
        if isinstance(subcon, Record):
            out.append(f"    build_{self.record(subcon)}({expression}, parts)")
        elif isinstance(subcon, ListOf):
            items = self.name("items")
            item = self.name("item")
            out.append(f"    {items} = {expression}")
            run.formats.append(_count_format(subcon))
            run.targets.append(f"len({items})")
            self._flush_build(run, out)
            out.append(f"    for {item} in {items}:")
            element: list[str] = []
            element_run = _Run()
            self._build_field(subcon.element, item, element_run, element)
            self._flush_build(element_run, element)
            out.extend("    " + line for line in element)
        else:
            raise TypeError(f"cannot compile {subcon!r}")

    def _flush_build(self, run: _Run, out: list[str]) -> None:
        if not run.formats:
            return
        name = self.constant("fixed", struct.Struct(">" + "".join(run.formats)))
        out.append(f"    parts.append({name}.pack({', '.join(run.targets)}))")
        run.formats.clear()
        run.targets.clear()


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


def compile_record(record: Record) -> CompiledRecord:
    """Generate and load the fast functions of ``record``."""
    generator = _Generator()
    suffix = generator.record(record)
    source = "\n".join(generator.lines)
    namespace = dict(generator.namespace)
    exec(compile(source, f"<compiled {record.cls.__name__}>", "exec"), namespace)  # noqa: S102
    return CompiledRecord(namespace[f"parse_{suffix}"], namespace[f"build_{suffix}"], source)
