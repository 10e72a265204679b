"""
The one error hierarchy of lucidlink.

Every error that can cross the wire is a subclass of :class:`LucidError` with
its wire ``code`` and the POSIX ``errno_name`` it stands for as class
attributes.  :data:`ERRORS_BY_CODE` is the single table from wire codes to
classes; the FUSE layer alone turns ``errno_name`` into a number.

``retryable`` tells a client whether the same request may succeed later
(a busy discovery instance, a metadata server that is restoring).
"""

from __future__ import annotations

from typing import ClassVar


class LucidError(Exception):
    """Base of every lucidlink error; carries a wire code and an errno name."""

    code: ClassVar[int] = 0
    errno_name: ClassVar[str] = "EIO"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str = "", retry_after_ms: int = 0) -> None:
        super().__init__(message or self.default_message())
        self.message = message or self.default_message()
        self.retry_after_ms = retry_after_ms

    @classmethod
    def default_message(cls) -> str:
        doc = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
        return doc.rstrip(".")

    def __str__(self) -> str:
        return self.message


class ProtocolError(LucidError):
    """The peer broke the wire protocol."""

    code = 1
    errno_name = "EPROTO"


class VersionMismatch(LucidError):
    """The peers speak different protocol versions."""

    code = 2
    errno_name = "EPROTONOSUPPORT"


class Busy(LucidError):
    """The service is over capacity; retry after the given delay."""

    code = 3
    errno_name = "EAGAIN"
    retryable = True


class RequestTimeout(LucidError):
    """No answer arrived in time."""

    code = 4
    errno_name = "ETIMEDOUT"
    retryable = True


class ConnectionClosed(LucidError):
    """The connection ended before an answer arrived."""

    code = 5
    errno_name = "ENOTCONN"
    retryable = True


class NotFound(LucidError):
    """No such file or directory."""

    code = 6
    errno_name = "ENOENT"


class AlreadyExists(LucidError):
    """File exists."""

    code = 7
    errno_name = "EEXIST"


class NotEmpty(LucidError):
    """Directory not empty."""

    code = 8
    errno_name = "ENOTEMPTY"


class NotADirectory(LucidError):
    """Not a directory."""

    code = 9
    errno_name = "ENOTDIR"


class IsADirectory(LucidError):
    """Is a directory."""

    code = 10
    errno_name = "EISDIR"


class AccessDenied(LucidError):
    """Permission denied."""

    code = 11
    errno_name = "EACCES"


class NotPermitted(LucidError):
    """Operation not permitted."""

    code = 12
    errno_name = "EPERM"


class InvalidArgument(LucidError):
    """Invalid argument."""

    code = 13
    errno_name = "EINVAL"


class NameTooLong(LucidError):
    """File name too long."""

    code = 14
    errno_name = "ENAMETOOLONG"


class NoSpace(LucidError):
    """No space left on device."""

    code = 15
    errno_name = "ENOSPC"


class Locked(LucidError):
    """The lock is held by another session."""

    code = 16
    errno_name = "EAGAIN"


class Conflict(LucidError):
    """The object changed since it was read; read it again."""

    code = 17
    errno_name = "ESTALE"


class Restoring(LucidError):
    """The metadata server is restoring its database; retry shortly."""

    code = 18
    errno_name = "EAGAIN"
    retryable = True


class Unavailable(LucidError):
    """A service this request needs is unreachable; retry shortly."""

    code = 19
    errno_name = "EIO"
    retryable = True


class AuthenticationFailed(LucidError):
    """Authentication failed."""

    code = 20
    errno_name = "EACCES"


class NotInitialized(LucidError):
    """The filespace has not been initialised."""

    code = 21
    errno_name = "ENODEV"


class UnknownFilespace(LucidError):
    """No such filespace."""

    code = 22
    errno_name = "ENODEV"


class NoAttribute(LucidError):
    """No such extended attribute."""

    code = 23
    errno_name = "ENODATA"


class CrossDevice(LucidError):
    """Invalid cross-device link."""

    code = 24
    errno_name = "EXDEV"


class InternalError(LucidError):
    """The server failed to carry out the request."""

    code = 25
    errno_name = "EIO"


class TooManyLinks(LucidError):
    """Too many levels of symbolic links."""

    code = 26
    errno_name = "ELOOP"


class OutOfRange(LucidError):
    """Result out of range."""

    code = 27
    errno_name = "ERANGE"


class FileTooLarge(LucidError):
    """File too large."""

    code = 28
    errno_name = "EFBIG"


class ReadOnly(LucidError):
    """Read-only file system."""

    code = 29
    errno_name = "EROFS"


class NotSupported(LucidError):
    """Operation not supported."""

    code = 30
    errno_name = "EOPNOTSUPP"


class Deadlock(LucidError):
    """Resource deadlock avoided."""

    code = 31
    errno_name = "EDEADLK"


class BadFileHandle(LucidError):
    """Bad file handle."""

    code = 32
    errno_name = "EBADF"


class TLSVerificationError(LucidError):
    """The peer's TLS certificate was not accepted."""

    code = 33
    errno_name = "EACCES"


class IntegrityError(LucidError):
    """The data was altered or does not belong here."""

    code = 34
    errno_name = "EIO"


def _collect() -> dict[int, type[LucidError]]:
    table: dict[int, type[LucidError]] = {}
    pending: list[type[LucidError]] = [LucidError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.code:
            if cls.code in table and table[cls.code] is not cls:
                raise RuntimeError(f"error code {cls.code} used twice")
            table[cls.code] = cls
    return table


ERRORS_BY_CODE: dict[int, type[LucidError]] = _collect()


def error_from_wire(code: int, message: str, retry_after_ms: int = 0) -> LucidError:
    """Rebuild the error a peer sent; an unknown code becomes a ProtocolError."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        return ProtocolError(f"peer sent unknown error code {code}: {message}")
    return cls(message, retry_after_ms=retry_after_ms)
