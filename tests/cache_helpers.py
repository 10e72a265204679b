"""
Shared pieces of the cache and write-back tests: a running demo per test,
and a file changed step by step next to a bytearray that models it.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer


def pattern(length: int, seed: int) -> bytes:
    """``length`` bytes that differ from one seed to another."""
    return random.Random(seed).randbytes(length)


def change(handle: Any, model: bytearray, step: tuple[Any, ...]) -> defer.Deferred[Any] | None:
    """
    Apply a ``("write", offset, length, seed)`` or ``("truncate", size)`` step to a handle and its model.

    Returns the handle's Deferred, or None for a step of another kind (the caller's).
    """
    if step[0] == "write":
        _, offset, length, seed = step
        data = pattern(length, seed)
        model.extend(bytes(max(0, offset - len(model))))
        model[offset : offset + length] = data
        return handle.write(offset, data)  # type: ignore[no-any-return]
    if step[0] == "truncate":
        del model[step[1] :]
        model.extend(bytes(step[1] - len(model)))
        return handle.truncate(step[1])  # type: ignore[no-any-return]
    return None
