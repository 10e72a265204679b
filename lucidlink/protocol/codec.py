"""
The sans-IO codec: bytes in, typed messages out, and back.

:class:`FrameDecoder` is fed whatever arrived from the network and returns
the complete frames in it; :func:`encode_frame` turns a message into bytes.
Nothing here does I/O or knows about Twisted, so every path is tested with
plain byte strings.  This is the only module where construct's exceptions
exist: anything malformed leaves it as a :class:`~lucidlink.errors.ProtocolError`
that says what was wrong.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import construct as c

from lucidlink.errors import ProtocolError
from lucidlink.protocol.compiler import CompiledRecord, compile_record
from lucidlink.protocol.messages import (
    DEFAULT_MAX_FRAME_LENGTH,
    HEADER,
    HEADER_SIZE,
    LENGTH_PREFIX_FORMAT,
    LENGTH_PREFIX_SIZE,
    MESSAGE_CLASSES,
    PROTOCOL_VERSION,
    Flags,
    MessageType,
)

_HELLO_TYPE = int(MessageType.HELLO)
_ERROR_TYPE = int(MessageType.ERROR)
_GOODBYE_TYPE = int(MessageType.GOODBYE)
# These keep their layout in every version, so mismatched peers can still talk.
_VERSION_INDEPENDENT = frozenset({_HELLO_TYPE, _ERROR_TYPE, _GOODBYE_TYPE})
_KNOWN_FLAGS = int(Flags.RESPONSE | Flags.PUSH)
_PARSE_ERRORS = (c.ConstructError, ValueError, OverflowError, UnicodeError, struct.error, TypeError, AttributeError)

# The length prefix and the header, compiled from the Header declaration.
_FRAME_HEAD = struct.Struct(
    ">" + LENGTH_PREFIX_FORMAT + "".join(sc.fmtstr[1:] for sc in HEADER.subcons)
)
assert _FRAME_HEAD.size == LENGTH_PREFIX_SIZE + HEADER_SIZE
_LENGTH = struct.Struct(">" + LENGTH_PREFIX_FORMAT)


@dataclass(slots=True)
class Frame:
    """One decoded frame: its header fields and the message it carries."""

    request_id: int
    flags: int  # Flags bits, kept a plain int on the hot path
    message: Any
    version: int = PROTOCOL_VERSION


class _CompiledMessages(dict[type, CompiledRecord]):
    """Compiled parsers and builders, made once per message class on first use."""

    def __missing__(self, cls: type) -> CompiledRecord:
        compiled = self[cls] = compile_record(cls.RECORD)  # type: ignore[attr-defined]
        return compiled


_COMPILED = _CompiledMessages()


def encode_frame(
    message: Any,
    request_id: int = 0,
    flags: Flags = Flags.NONE,
    version: int = PROTOCOL_VERSION,
) -> bytes:
    """The bytes of one frame carrying ``message``, length prefix included."""
    cls = type(message)
    parts: list[bytes] = [b""]
    try:
        _COMPILED[cls].build(message, parts)
        length = HEADER_SIZE + sum(map(len, parts))
        parts[0] = _FRAME_HEAD.pack(length, version, cls.TYPE, request_id, flags)
    except _PARSE_ERRORS as error:
        raise ProtocolError(f"cannot encode {cls.__name__}: {error}") from None
    return b"".join(parts)


def decode_body(message_type: int, body: bytes) -> Any:
    """Parse ``body`` as the message ``message_type`` names; all of it, no more."""
    return _decode_at(message_type, body, 0, len(body))


def _decode_at(message_type: int, data: bytes, start: int, end: int) -> Any:
    """Parse the message body in ``data[start:end]``, reading nothing outside it."""
    cls = MESSAGE_CLASSES.get(message_type)
    if cls is None:
        raise ProtocolError(f"unknown message type 0x{message_type:04x}")
    try:
        message, parsed_to = _COMPILED[cls].parse(data, start)
    except _PARSE_ERRORS as error:
        raise ProtocolError(f"malformed {cls.__name__} body: {_first_line(error)}") from None
    if parsed_to != end:
        if parsed_to > end:
            raise ProtocolError(f"malformed {cls.__name__} body: its fields run past the end of the frame")
        raise ProtocolError(f"{end - parsed_to} trailing bytes after a {cls.__name__} body")
    return message


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


class FrameDecoder:
    """Turns a byte stream into frames; refuses anything malformed.

    ``versions`` are the protocol versions accepted for ordinary messages;
    :class:`Hello`, ``Error`` and ``Goodbye`` are accepted in any version so
    that a version mismatch can be reported in words both sides understand.
    After a :class:`ProtocolError` the decoder is broken and refuses more.
    """

    def __init__(
        self,
        max_frame_length: int = DEFAULT_MAX_FRAME_LENGTH,
        versions: frozenset[int] = frozenset({PROTOCOL_VERSION}),
    ) -> None:
        self.max_frame_length = max_frame_length
        self.versions = versions
        self._buffer = bytearray()
        self._needed = 0
        self._broken: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data`` and return every frame it completes, in order."""
        frames: list[Frame] = []
        self.feed_each(data, lambda request_id, flags, message, version: frames.append(
            Frame(request_id, flags, message, version)
        ))
        return frames

    def feed_each(self, data: bytes, on_frame: Callable[[int, int, Any, int], object]) -> None:
        """Add ``data`` and call ``on_frame(request_id, flags, message, version)`` per frame.

        A ProtocolError raised by ``on_frame`` breaks the decoder like a malformed frame.
        """
        if self._broken is not None:
            raise self._broken
        if self._buffer:
            self._buffer += data
            if len(self._buffer) < self._needed:
                return  # still inside one large frame: no copying until it is whole
            data = bytes(self._buffer)
        offset = 0
        available = len(data)
        self._needed = 0
        unpack_head = _FRAME_HEAD.unpack_from
        try:
            while available - offset >= LENGTH_PREFIX_SIZE:
                (length,) = _LENGTH.unpack_from(data, offset)
                if length > self.max_frame_length:
                    raise ProtocolError(
                        f"frame of {length} bytes is over the limit of "
                        f"{self.max_frame_length} bytes"
                    )
                if length < HEADER_SIZE:
                    raise ProtocolError(
                        f"frame of {length} bytes is shorter than its {HEADER_SIZE}-byte header"
                    )
                end = offset + LENGTH_PREFIX_SIZE + length
                if end > available:
                    self._needed = end - offset
                    break
                _, version, message_type, request_id, flags = unpack_head(data, offset)
                if version not in self.versions and message_type not in _VERSION_INDEPENDENT:
                    raise ProtocolError(
                        f"frame of protocol version {version}; this peer speaks "
                        f"{', '.join(str(v) for v in sorted(self.versions))}"
                    )
                if flags & ~_KNOWN_FLAGS:
                    raise ProtocolError(f"unknown header flags 0x{flags:02x}")
                message = _decode_at(message_type, data, offset + _FRAME_HEAD.size, end)
                offset = end
                on_frame(request_id, flags, message, version)
        except ProtocolError as error:
            self._broken = error
            raise
        finally:
            if self._broken is not None:
                self._buffer = bytearray()
            else:
                self._buffer = bytearray(data[offset:]) if offset < available else bytearray()
