"""
Construct building blocks that map wire bytes straight onto Python classes.

:class:`Record` parses a sequence of fields into a dataclass and builds one
back; :class:`ListOf` is a counted list; :class:`IntEnumField` turns an
integer into a member of an :class:`enum.IntEnum` and refuses unknown values.
Their own parse and build are the reference; :mod:`lucidlink.protocol.compiler`
turns the same declarations into fast straight-line code for the hot path.

Adapters here only change representation: nothing in this module knows about
keys, sockets or JSON.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import construct as c


def wire(subcon: c.Construct, **kwargs: Any) -> Any:
    """Declare a dataclass field together with its wire representation."""
    metadata = dict(kwargs.pop("metadata", {}))
    metadata["wire"] = subcon
    return dataclasses.field(metadata=metadata, **kwargs)


class Record(c.Construct):
    """The fields of dataclass ``cls``, in declaration order, each as ``wire()`` says."""

    def __init__(self, cls: type) -> None:
        super().__init__()
        self.cls = cls
        self.field_names = [f.name for f in dataclasses.fields(cls)]
        self.subcons = [f.metadata["wire"] for f in dataclasses.fields(cls)]
        self.name = None

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        return self.cls(*[sc._parsereport(stream, context, path) for sc in self.subcons])

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        for name, sc in zip(self.field_names, self.subcons):
            sc._build(getattr(obj, name), stream, context, path)
        return obj


class IntEnumField(c.Construct):
    """An integer on the wire, a member of ``enum_class`` in Python."""

    def __init__(self, subcon: c.Construct, enum_class: type[enum.IntEnum]) -> None:
        super().__init__()
        self.subcon = subcon
        self.enum_class = enum_class

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        value = self.subcon._parsereport(stream, context, path)
        return self._decode(value)

    def _decode(self, value: int) -> enum.IntEnum:
        try:
            return self.enum_class(value)
        except ValueError:
            raise c.MappingError(
                f"{value} is not a valid {self.enum_class.__name__}"
            ) from None

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        self.subcon._build(int(self.enum_class(obj)), stream, context, path)
        return obj


class ListOf(c.Construct):
    """A count, then that many ``element``\\ s; a Python ``list``."""

    def __init__(self, countfield: c.Construct, element: c.Construct) -> None:
        super().__init__()
        self.countfield = countfield
        self.element = element

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        count = self.countfield._parsereport(stream, context, path)
        return [self.element._parsereport(stream, context, path) for _ in range(count)]

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        self.countfield._build(len(obj), stream, context, path)
        for item in obj:
            self.element._build(item, stream, context, path)
        return obj
