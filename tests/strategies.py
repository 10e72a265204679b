"""
Hypothesis strategies for every wire message, derived from its declaration.

Field types come from the dataclass annotations; integer ranges from the
construct field that carries them, so a new message needs no new strategy.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import typing

import construct as c
from hypothesis import strategies as st

from lucidlink.protocol.messages import MESSAGE_CLASSES

_INT_FORMATS = {"B", "H", "L", "Q", "b", "h", "l", "q"}


def _integers(subcon: c.Construct | None) -> st.SearchStrategy[int]:
    if isinstance(subcon, c.FormatField) and subcon.fmtstr[-1] in _INT_FORMATS:
        bits = struct.calcsize(subcon.fmtstr) * 8
        if subcon.fmtstr[-1].islower():
            return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return st.integers(0, 2**bits - 1)
    raise TypeError(f"no integer strategy for {subcon!r}")


def for_annotation(annotation: typing.Any, subcon: c.Construct | None) -> st.SearchStrategy[typing.Any]:
    """A strategy for values of ``annotation`` carried by ``subcon``."""
    if typing.get_origin(annotation) is list:
        (element,) = typing.get_args(annotation)
        return st.lists(for_annotation(element, None), max_size=4)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return st.sampled_from(list(annotation))
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return _integers(subcon)
    if annotation is str:
        return st.text(max_size=40)
    if annotation is bytes:
        return st.binary(max_size=80)
    if dataclasses.is_dataclass(annotation):
        return records(annotation)
    raise TypeError(f"no strategy for {annotation!r}")


def records(cls: type) -> st.SearchStrategy[typing.Any]:
    """Instances of the wire dataclass ``cls`` with every field drawn."""
    hints = typing.get_type_hints(cls)
    fields = {
        field.name: for_annotation(hints[field.name], field.metadata["wire"])
        for field in dataclasses.fields(cls)
    }
    return st.builds(cls, **fields)


messages = st.sampled_from(sorted(MESSAGE_CLASSES.values(), key=lambda cls: cls.TYPE)).flatmap(records)
"""Any message of any type."""
