"""
The sans-IO codec: every message round-trips, and malformed bytes only ever
give a ProtocolError that says what was wrong.
"""

from __future__ import annotations

import dataclasses

import construct as c
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from lucidlink.errors import ProtocolError
from lucidlink.protocol.codec import FrameDecoder, decode_body, encode_frame
from lucidlink.protocol.compiler import compile_record
from lucidlink.protocol.messages import (
    MESSAGE_CLASSES,
    Attributes,
    DirEntry,
    DirPage,
    Entry,
    FileKind,
    Flags,
    Hello,
    Lookup,
    MessageType,
    Ok,
)
from lucidlink.protocol.records import Record, wire
from tests.strategies import messages, records


def decode_all(data: bytes, **options: object) -> list:
    """Feed ``data`` to a fresh decoder and return the frames it completes."""
    return FrameDecoder(**options).feed(data)  # type: ignore[arg-type]


class RoundTripTests(SynchronousTestCase):
    """Whatever is encoded decodes to an equal message, in any chunking."""

    @settings(max_examples=400)
    @given(messages, st.integers(0, 2**32 - 1), st.sampled_from(list(Flags)))
    def test_every_message_round_trips(self, message: object, request_id: int, flags: Flags) -> None:
        """Every declared message type survives encode then decode."""
        (frame,) = decode_all(encode_frame(message, request_id, flags))
        self.assertEqual(frame.message, message)
        self.assertEqual(frame.request_id, request_id)
        self.assertEqual(frame.flags, flags)

    @given(st.lists(messages, min_size=1, max_size=5), st.data())
    def test_chunking_does_not_matter(self, batch: list, data: st.DataObject) -> None:
        """Frames split at arbitrary points decode the same as whole ones."""
        stream = b"".join(encode_frame(message, index) for index, message in enumerate(batch))
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
        decoder = FrameDecoder()
        frames = []
        for start, end in zip([0, *cuts], [*cuts, len(stream)]):
            frames.extend(decoder.feed(stream[start:end]))
        self.assertEqual([frame.message for frame in frames], batch)
        self.assertEqual(decoder.buffered, 0)

    @settings(max_examples=300)
    @given(messages)
    def test_compiled_codec_agrees_with_construct(self, message: object) -> None:
        """The compiled fast path and construct's own parse and build give the same bytes and objects."""
        record = type(message).RECORD  # type: ignore[attr-defined]
        reference = record.build(message)
        self.assertEqual(encode_frame(message)[12:], reference)
        self.assertEqual(record.parse(reference), message)
        self.assertEqual(decode_body(type(message).TYPE, reference), message)  # type: ignore[attr-defined]

    def test_whole_frames_of_records_with_lists(self) -> None:
        """Messages with lists (built in parts) and without (one struct call) frame the same way."""
        attributes = Attributes(2, FileKind.DIRECTORY, 0o40755, 2, 0, 0, 0, 1, 2, 3, 4)
        page = DirPage([DirEntry(b"n1", attributes), DirEntry(b"n2", attributes)], b"c", False)
        for message in (page, Hello(1, "ü", ""), Ok(), Entry(attributes)):
            body = type(message).RECORD.build(message)  # type: ignore[attr-defined]
            head = (8 + len(body)).to_bytes(4, "big") + bytes([1]) + type(message).TYPE.to_bytes(2, "big")  # type: ignore[attr-defined]
            self.assertEqual(encode_frame(message, 7, Flags.RESPONSE), head + bytes.fromhex("00000007" "01") + body)

    def test_every_type_is_covered(self) -> None:
        """Every MessageType has a class, and every class a distinct type."""
        self.assertEqual(set(MESSAGE_CLASSES), {int(t) for t in MessageType})


class VectorTests(SynchronousTestCase):
    """Known bytes both ways, so an accidental format change is caught."""

    def test_lookup_vector(self) -> None:
        """A Lookup request, byte for byte."""
        frame = bytes.fromhex("00000014" "01" "0220" "00000007" "00" "0000000000000001" "0002" "6162")
        self.assertEqual(encode_frame(Lookup(1, b"ab"), 7), frame)
        (decoded,) = decode_all(frame)
        self.assertEqual(decoded.message, Lookup(1, b"ab"))

    def test_ok_response_vector(self) -> None:
        """An empty answer is a bare header."""
        self.assertEqual(encode_frame(Ok(), 9, Flags.RESPONSE), bytes.fromhex("00000008" "01" "0004" "00000009" "01"))

    def test_entry_vector(self) -> None:
        """Nested records are laid out in declaration order."""
        attributes = Attributes(2, FileKind.DIRECTORY, 0o40755, 2, 0, 0, 0, 1, 2, 3, 4)
        body = encode_frame(Entry(attributes))[12:]
        self.assertEqual(body[:9], bytes.fromhex("0000000000000002" "02"))
        self.assertEqual(decode_body(MessageType.ENTRY, body), Entry(attributes))


class MalformedInputTests(SynchronousTestCase):
    """Each kind of bad input is refused with a message naming the problem."""

    def assertRefused(self, data: bytes, words: str, **options: object) -> None:
        with self.assertRaises(ProtocolError) as caught:
            decode_all(data, **options)
        self.assertIn(words, str(caught.exception))

    def test_oversized_frame_refused_from_its_length(self) -> None:
        """The length prefix alone is enough to refuse an oversized frame."""
        self.assertRefused(b"\x00\x10\x00\x01", "over the limit", max_frame_length=1024 * 1024)

    def test_oversized_frame_refused_before_its_body(self) -> None:
        """A whole header with an oversized length is refused before the body arrives."""
        frame = encode_frame(Lookup(1, b"x" * 100))
        self.assertRefused(frame[:20], "frame of 118 bytes is over the limit of 64 bytes", max_frame_length=64)

    def test_fields_running_past_the_frame(self) -> None:
        """A length inside the body that points into the next frame is refused."""
        frame = bytearray(encode_frame(Lookup(1, b"ab")))
        frame[20:22] = (6).to_bytes(2, "big")
        self.assertRefused(bytes(frame) + encode_frame(Ok()), "malformed Lookup body: its fields run past the end")

    def test_frame_shorter_than_header(self) -> None:
        """A length smaller than the header is refused."""
        self.assertRefused(b"\x00\x00\x00\x03abc", "shorter than its 8-byte header")

    def test_unknown_type(self) -> None:
        """A type number nobody declared."""
        self.assertRefused(bytes.fromhex("00000008" "01" "7777" "00000001" "00"), "unknown message type 0x7777")

    def test_truncated_body(self) -> None:
        """A body shorter than its fields need."""
        frame = encode_frame(Lookup(1, b"abcdef"))
        short = (len(frame) - 4 - 3).to_bytes(4, "big") + frame[4:-3]
        self.assertRefused(short, "malformed Lookup body")

    def test_trailing_bytes(self) -> None:
        """A body longer than its fields."""
        frame = encode_frame(Lookup(1, b"ab")) + b"zz"
        long = (len(frame) - 4).to_bytes(4, "big") + frame[4:]
        self.assertRefused(long, "2 trailing bytes after a Lookup body")

    def test_unknown_flags(self) -> None:
        """Header flags this version does not define."""
        frame = bytearray(encode_frame(Ok()))
        frame[11] = 0x80
        self.assertRefused(bytes(frame), "unknown header flags 0x80")

    def test_other_version(self) -> None:
        """An ordinary message of another protocol version."""
        frame = encode_frame(Lookup(1, b"a"), version=9)
        self.assertRefused(frame, "protocol version 9")

    def test_hello_of_other_version_is_readable(self) -> None:
        """Hello keeps its layout in every version, so a mismatch can be explained."""
        (frame,) = decode_all(encode_frame(Hello(9, "future", ""), version=9))
        self.assertEqual(frame.message.version, 9)

    def test_invalid_utf8(self) -> None:
        """Text fields must be UTF-8."""
        self.assertRefused(bytes.fromhex("0000000c" "01" "0104" "00000001" "00" "0002" "ff fe"), "malformed Resolve body")

    def test_unknown_enum_value(self) -> None:
        """An enum field with a value outside its enum."""
        frame = bytearray(encode_frame(Entry(Attributes(1, FileKind.FILE, 0, 0, 0, 0, 0, 0, 0, 0, 0))))
        frame[12 + 8] = 99
        self.assertRefused(bytes(frame), "malformed Entry body")

    def test_decoder_stays_broken(self) -> None:
        """After a protocol error the decoder refuses everything."""
        decoder = FrameDecoder()
        self.assertRaises(ProtocolError, decoder.feed, b"\xff\xff\xff\xff")
        self.assertRaises(ProtocolError, decoder.feed, encode_frame(Ok()))

    @settings(max_examples=500)
    @given(st.binary(max_size=300))
    def test_random_bytes_only_give_protocol_errors(self, data: bytes) -> None:
        """Garbage yields frames or a ProtocolError, never another exception."""
        try:
            decode_all(data)
        except ProtocolError:
            pass

    @settings(max_examples=500)
    @given(messages, st.data())
    def test_mutated_frames_only_give_protocol_errors(self, message: object, data: st.DataObject) -> None:
        """Valid frames with bytes flipped, cut or added never raise anything else."""
        frame = bytearray(encode_frame(message, 3))
        for _ in range(data.draw(st.integers(1, 4))):
            position = data.draw(st.integers(0, len(frame) - 1))
            action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
            if action == "flip":
                frame[position] ^= data.draw(st.integers(1, 255))
            elif action == "cut":
                del frame[position:]
                if not frame:
                    break
            else:
                frame[position:position] = data.draw(st.binary(min_size=1, max_size=8))
        try:
            decode_all(bytes(frame), max_frame_length=64 * 1024)
        except ProtocolError:
            pass

    @given(records(Lookup))
    def test_encode_refuses_out_of_range_values(self, lookup: Lookup) -> None:
        """Values the wire cannot carry are refused at encoding, not sent garbled."""
        lookup.parent = -1
        self.assertRaises(ProtocolError, encode_frame, lookup)


class CompilerTests(SynchronousTestCase):
    """The compiler refuses what it does not understand, rather than misread it."""

    def test_little_endian_field_refused(self) -> None:
        """Only big-endian integers are compiled."""

        @dataclasses.dataclass
        class Odd:
            value: int = wire(c.Int32ul)

        with self.assertRaises(TypeError) as caught:
            compile_record(Record(Odd))
        self.assertIn("only big-endian fields", str(caught.exception))

    def test_unknown_construct_refused(self) -> None:
        """A building block the compiler does not know is refused by name."""

        @dataclasses.dataclass
        class Odd:
            rest: bytes = wire(c.GreedyBytes)

        self.assertRaises(TypeError, compile_record, Record(Odd))
