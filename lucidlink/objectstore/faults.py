"""
An object store wrapper that misbehaves on request, for fault tests.

:class:`FaultyObjectStore` passes every operation to the store it wraps,
unless told to fail some (before or after doing them), to delay them on an
injected clock, or to corrupt what reads return.  It records every call, so a
test can also check what was asked of the store.

::

    store = FaultyObjectStore(LocalObjectStore(path, reactor), clock=Clock())
    store.fail_next(2, operations={"put"})       # the next two puts fail
    store.fail_next(after=True)                  # done, but reported as failed
    store.fail_always()                          # everything fails until heal()
    store.set_delay(5.0)                         # every call waits 5 s on the clock
    store.corrupt_next()                         # the next read returns altered bytes
    store.heal()                                 # back to normal
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface import implementer

from lucidlink import errors
from lucidlink.objectstore.interface import IObjectStore, ObjectInfo

OPERATIONS = frozenset({"get", "get_range", "put", "delete", "head", "list"})
_READS = frozenset({"get", "get_range"})

ErrorFactory = Callable[[str, str], Exception]
"""Makes the error an injected fault raises, from the operation and key."""


def unavailable(operation: str, key: str) -> Exception:
    """The default injected error: the store cannot be reached."""
    return errors.Unavailable(f"injected fault: {operation} of {key!r} failed")


def flip_middle_byte(data: bytes) -> bytes:
    """The default corruption: one bit flipped in the middle (a byte added to nothing)."""
    if not data:
        return b"\x00"
    altered = bytearray(data)
    altered[len(altered) // 2] ^= 0x01
    return bytes(altered)


@dataclass
class _Fault:
    operations: frozenset[str]
    remaining: int | None  # None: until healed
    error: ErrorFactory
    after: bool


@implementer(IObjectStore)
class FaultyObjectStore:
    """Wraps another store and injects failures, delays and corruption (see the module)."""

    def __init__(self, inner: Any, clock: IReactorTime | None = None) -> None:
        self.inner = inner
        self.clock = clock
        self.calls: list[tuple[str, str]] = []
        """Every operation asked of this store, as (operation, key or prefix)."""
        self._faults: list[_Fault] = []
        self._delay = 0.0
        self._corruptions: int | None = 0  # None: every read
        self._corrupt: Callable[[bytes], bytes] = flip_middle_byte

    # Steering

    def fail_next(
        self,
        count: int = 1,
        operations: Collection[str] = OPERATIONS,
        error: ErrorFactory = unavailable,
        after: bool = False,
    ) -> None:
        """
        Make the next ``count`` calls of ``operations`` fail with ``error``.

        With ``after`` the operation is carried out first and then reported
        as failed, like a put whose answer is lost.
        """
        if count < 1:
            raise errors.InvalidArgument(f"cannot fail the next {count} calls")
        self._faults.append(_Fault(self._operations(operations), count, error, after))

    def fail_always(
        self,
        operations: Collection[str] = OPERATIONS,
        error: ErrorFactory = unavailable,
        after: bool = False,
    ) -> None:
        """Make every call of ``operations`` fail until :meth:`heal`."""
        self._faults.append(_Fault(self._operations(operations), None, error, after))

    def set_delay(self, seconds: float) -> None:
        """Make every call wait ``seconds`` on the injected clock before it goes through."""
        if seconds and self.clock is None:
            raise errors.InvalidArgument("a FaultyObjectStore needs a clock to delay calls")
        self._delay = seconds

    def corrupt_next(self, count: int = 1, corrupt: Callable[[bytes], bytes] = flip_middle_byte) -> None:
        """Alter what the next ``count`` successful reads (get, get_range) return."""
        self._corruptions, self._corrupt = count, corrupt

    def corrupt_always(self, corrupt: Callable[[bytes], bytes] = flip_middle_byte) -> None:
        """Alter what every read returns until :meth:`heal`."""
        self._corruptions, self._corrupt = None, corrupt

    def heal(self) -> None:
        """End every injected failure, delay and corruption."""
        self._faults.clear()
        self._delay = 0.0
        self._corruptions = 0

    # IObjectStore

    def get(self, key: str) -> Deferred[bytes]:
        return self._call("get", key, lambda: self.inner.get(key))

    def get_range(self, key: str, start: int, length: int) -> Deferred[bytes]:
        return self._call("get_range", key, lambda: self.inner.get_range(key, start, length))

    def put(self, key: str, data: bytes, create_only: bool = False) -> Deferred[None]:
        return self._call("put", key, lambda: self.inner.put(key, data, create_only))

    def delete(self, key: str) -> Deferred[None]:
        return self._call("delete", key, lambda: self.inner.delete(key))

    def head(self, key: str) -> Deferred[ObjectInfo]:
        return self._call("head", key, lambda: self.inner.head(key))

    def list(self, prefix: str = "") -> Deferred[list[ObjectInfo]]:
        return self._call("list", prefix, lambda: self.inner.list(prefix))

    def close(self) -> Deferred[None]:
        return self.inner.close()

    # Inside

    @staticmethod
    def _operations(operations: Collection[str]) -> frozenset[str]:
        chosen = frozenset(operations)
        unknown = chosen - OPERATIONS
        if unknown:
            raise errors.InvalidArgument(f"no object store operations named {', '.join(sorted(unknown))}")
        return chosen

    def _take_fault(self, operation: str) -> _Fault | None:
        for fault in self._faults:
            if operation in fault.operations:
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                return fault
        return None

    def _take_corruption(self) -> Callable[[bytes], bytes] | None:
        if self._corruptions is None:
            return self._corrupt
        if self._corruptions > 0:
            self._corruptions -= 1
            return self._corrupt
        return None

    def _call(self, operation: str, key: str, run: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        self.calls.append((operation, key))
        fault = self._take_fault(operation)
        if self._delay:
            assert self.clock is not None
            waited: Deferred[None] = deferLater(self.clock, self._delay, lambda: None)
        else:
            waited = succeed(None)

        def go(_: None) -> Deferred[Any]:
            if fault is not None and not fault.after:
                raise fault.error(operation, key)
            return run()

        def finish(result: Any) -> Any:
            if fault is not None and fault.after:
                raise fault.error(operation, key)
            if operation in _READS:
                corrupt = self._take_corruption()
                if corrupt is not None:
                    return corrupt(result)
            return result

        return waited.addCallback(go).addCallback(finish)
