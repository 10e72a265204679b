"""
Running a command's asynchronous core on the reactor, from synchronous ``main``.

A command that talks to servers is written as a function of the reactor
returning a Deferred, which tests drive on trial's reactor;
:func:`run_on_reactor` is the thin synchronous wrapper the command line uses.
Unlike ``twisted.internet.task.react`` it returns the result, or raises the
error, instead of exiting, so the top-level ``lucid`` reports every failure
the same way (one line on stderr).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

T = TypeVar("T")


def run_on_reactor(work: Callable[[Any], defer.Deferred[T]]) -> T:
    """
    Run the global reactor until ``work(reactor)`` fires; return its result or raise its error.

    The reactor runs once per process, so call this once, from a command
    line.  Ctrl-C stops the reactor and raises KeyboardInterrupt.
    """
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    outcome: list[Any] = []

    def finish(result: Any) -> None:
        outcome.append(result)
        reactor.stop()

    def start() -> None:
        defer.maybeDeferred(work, reactor).addBoth(finish)

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:
        raise KeyboardInterrupt
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[no-any-return]
