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
from lucidlink.protocol.compiler import CompiledRecord, FrameHead, WrongLength, compile_record
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
_HEAD_FORMAT = LENGTH_PREFIX_FORMAT + "".join(sc.fmtstr[1:] for sc in HEADER.subcons)
_FRAME_HEAD = struct.Struct(">" + _HEAD_FORMAT)
_FRAME_HEAD_SIZE = _FRAME_HEAD.size
assert _FRAME_HEAD_SIZE == LENGTH_PREFIX_SIZE + HEADER_SIZE
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
        head = FrameHead(_HEAD_FORMAT, HEADER_SIZE, int(cls.TYPE))  # type: ignore[attr-defined]
        compiled = self[cls] = compile_record(cls.RECORD, head)  # type: ignore[attr-defined]
        return compiled


class _FrameEncoders(dict[type, Callable[[Any, int, int, int], bytes]]):
    """``frame(message, request_id, flags, version)`` by message class."""

    def __missing__(self, cls: type) -> Callable[[Any, int, int, int], bytes]:
        if cls not in MESSAGE_CLASSES.values():
            raise ProtocolError(f"cannot encode {cls.__name__}: not a message")
        encoder = self[cls] = _COMPILED[cls].frame  # type: ignore[assignment]
        return encoder  # type: ignore[return-value]


class _BodyParsers(dict[int, Callable[[bytes, int, int], Any]]):
    """``parse(data, start, end) -> message`` by message type number."""

    def __missing__(self, message_type: int) -> Callable[[bytes, int, int], Any]:
        cls = MESSAGE_CLASSES.get(message_type)
        if cls is None:
            raise ProtocolError(f"unknown message type 0x{message_type:04x}")
        parser = self[message_type] = _COMPILED[cls].parse
        return parser


_COMPILED = _CompiledMessages()
_ENCODERS = _FrameEncoders()
_PARSERS = _BodyParsers()

frame_encoders: dict[type, Callable[[Any, int, int, int], bytes]] = _ENCODERS
"""``frame(message, request_id, flags, version)`` by message class, for hot paths.

Whatever one of these raises, :func:`encode_frame` turns into the ProtocolError that names the problem.
"""


def encode_frame(
    message: Any,
    request_id: int = 0,
    flags: int = Flags.NONE,
    version: int = PROTOCOL_VERSION,
) -> bytes:
    """The bytes of one frame carrying ``message``, length prefix included."""
    try:
        return _ENCODERS[type(message)](message, request_id, flags, version)
    except _PARSE_ERRORS as error:
        raise ProtocolError(f"cannot encode {type(message).__name__}: {error}") from None


def decode_body(message_type: int, body: bytes) -> Any:
    """Parse ``body`` as the message ``message_type`` names; all of it, no more."""
    try:
        return _PARSERS[message_type](body, 0, len(body))
    except WrongLength as error:
        raise _wrong_length(message_type, error.end, len(body)) from None
    except _PARSE_ERRORS as error:
        raise _malformed(message_type, error) from None


def _malformed(message_type: int, error: Exception) -> ProtocolError:
    name = MESSAGE_CLASSES[message_type].__name__
    return ProtocolError(f"malformed {name} body: {_first_line(error)}")


def _wrong_length(message_type: int, parsed_to: int, end: int) -> ProtocolError:
    name = MESSAGE_CLASSES[message_type].__name__
    if parsed_to > end:
        return ProtocolError(f"malformed {name} body: its fields run past the end of the frame")
    return ProtocolError(f"{end - parsed_to} trailing bytes after a {name} body")


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
        # This loop runs once per frame on both ends of every connection:
        # everything it needs is a local, and the checks of a good frame are
        # a few comparisons; the words for a bad one are found only then.
        unpack_head = _FRAME_HEAD.unpack_from
        parsers = _PARSERS
        versions = self.versions
        max_length = self.max_frame_length
        head_size = _FRAME_HEAD_SIZE
        unknown_flags = ~_KNOWN_FLAGS
        try:
            while available - offset >= head_size:
                length, version, message_type, request_id, flags = unpack_head(data, offset)
                end = offset + LENGTH_PREFIX_SIZE + length
                if length > max_length or length < HEADER_SIZE:
                    self._check_length(length)
                if end > available:
                    self._needed = end - offset
                    break
                if version not in versions and message_type not in _VERSION_INDEPENDENT:
                    raise self._version_error(version)
                if flags & unknown_flags:
                    raise ProtocolError(f"unknown header flags 0x{flags:02x}")
                try:
                    message = parsers[message_type](data, offset + head_size, end)
                except WrongLength as error:
                    raise _wrong_length(message_type, error.end, end) from None
                except _PARSE_ERRORS as error:
                    raise _malformed(message_type, error) from None
                offset = end
                on_frame(request_id, flags, message, version)
            else:
                if available - offset >= LENGTH_PREFIX_SIZE:
                    # Not even a whole header: the length alone may already be refused.
                    (length,) = _LENGTH.unpack_from(data, offset)
                    self._check_length(length)
                    self._needed = LENGTH_PREFIX_SIZE + length
        except ProtocolError as error:
            self._broken = error
            raise
        finally:
            if self._broken is not None:
                self._buffer = bytearray()
            else:
                self._buffer = bytearray(data[offset:]) if offset < available else bytearray()

    def _check_length(self, length: int) -> None:
        if length > self.max_frame_length:
            raise ProtocolError(f"frame of {length} bytes is over the limit of {self.max_frame_length} bytes")
        if length < HEADER_SIZE:
            raise ProtocolError(f"frame of {length} bytes is shorter than its {HEADER_SIZE}-byte header")

    def _version_error(self, version: int) -> ProtocolError:
        return ProtocolError(
            f"frame of protocol version {version}; this peer speaks "
            f"{', '.join(str(v) for v in sorted(self.versions))}"
        )
