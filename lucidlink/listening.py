"""
Listening on endpoint strings, for the services' taps: the repeatable
``--listen ENDPOINT`` option and a service that listens while it runs.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from lucidlink.errors import Unavailable


class ListenOption:
    """A ``usage.Options`` mixin: ``--listen ENDPOINT`` (repeatable) collected in ``self["listen"]``."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[call-arg]
        self["listen"] = []  # type: ignore[index]

    def opt_listen(self, description: str) -> None:
        """Listen on this endpoint instead of the configuration's listen (repeatable)."""
        self["listen"].append(description)  # type: ignore[index]

    opt_l = opt_listen


class EndpointListener(Service):
    """Listens with ``factory`` on ``endpoint`` while running.

    Like Twisted's ``StreamServerEndpointService`` as ``twistd`` sets it up:
    a listen that fails at once (a port in use) raises from
    ``privilegedStartService``, so the process does not start half-deaf.
    :meth:`when_listening` gives the port (tests listen on port 0).
    """

    log = Logger()

    def __init__(self, endpoint: Any, factory: Any, description: str) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.description = description
        self.port: IListeningPort | None = None
        self._listening: defer.Deferred[Any] | None = None
        self._failure: Failure | None = None
        self._waiters: list[defer.Deferred[IListeningPort]] = []

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self._listening is None:
            self._listen()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        listening, self._listening = self._listening, None
        port, self.port = self.port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        if listening is not None:
            listening.cancel()
        return defer.succeed(None)

    def when_listening(self) -> defer.Deferred[IListeningPort]:
        """Fires with the listening port, or fails if listening failed."""
        if self.port is not None:
            return defer.succeed(self.port)
        if self._failure is not None:
            return defer.fail(self._failure)
        waiter: defer.Deferred[IListeningPort] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def _listen(self) -> None:
        self._failure = None
        self._listening = self.endpoint.listen(self.factory)
        failed_now: list[Failure] = []
        self._listening.addCallbacks(self._listened, self._not_listening, errbackArgs=(failed_now,))
        if failed_now:
            raise Unavailable(f"cannot listen on {self.description}: {failed_now[0].getErrorMessage()}")

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        self.log.info("listening on {description}", description=self.description)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(port)

    def _not_listening(self, failure: Failure, failed_now: list[Failure]) -> None:
        self._failure = failure
        if self._listening is None:  # stopped before it listened
            return
        failed_now.append(failure)
        self.log.failure("cannot listen on {description}", failure, description=self.description)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(failure)
