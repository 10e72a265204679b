"""
:mod:`lucidlink.fuse_device` over a stand-in device: a ``SOCK_SEQPACKET``
pair keeps each request one read, as ``/dev/fuse`` does.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from lucidlink.fuse_device import IN_HEADER, OUT_HEADER, device_descriptor, refuse_pending

READ, FORGET, INTERRUPT, BATCH_FORGET, GETATTR = 15, 2, 36, 42, 3


def request(opcode: int, unique: int, body: bytes = b"") -> bytes:
    return IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, 1, 0, 0, 0, 0) + body


class RefusePendingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.kernel, self.device = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(self.kernel.close)
        self.addCleanup(self.device.close)

    def test_each_request_is_refused_and_forgets_are_not_answered(self) -> None:
        for opcode, unique in ((READ, 11), (FORGET, 12), (GETATTR, 13), (INTERRUPT, 14), (BATCH_FORGET, 15)):
            self.kernel.send(request(opcode, unique, b"x" * 64))
        self.kernel.send(b"short")
        answers: list[bytes] = []

        def done() -> bool:
            self.kernel.setblocking(False)
            try:
                answers.append(self.kernel.recv(4096))
            except BlockingIOError:
                pass
            return len(answers) == 2

        self.assertEqual(refuse_pending(self.device.fileno(), done, 10), 2)
        self.assertEqual([OUT_HEADER.unpack(answer) for answer in answers],
                         [(16, -errno.ENOTCONN, 11), (16, -errno.ENOTCONN, 13)])

    def test_it_stops_when_done_or_when_time_is_up(self) -> None:
        self.assertEqual(refuse_pending(self.device.fileno(), lambda: True, 10), 0)
        self.assertEqual(refuse_pending(self.device.fileno(), lambda: False, 0.1), 0)

    def test_a_device_gone_ends_it(self) -> None:
        """Unmounted, the device fails reads (ENODEV): nothing is left to refuse."""
        descriptor = os.dup(self.device.fileno())
        self.kernel.send(request(READ, 1))
        os.close(descriptor)
        stopper = threading.Timer(5, self.kernel.close)
        stopper.start()
        self.addCleanup(stopper.cancel)
        self.assertEqual(refuse_pending(descriptor, lambda: False, 5), 0)


class DeviceDescriptorTests(SynchronousTestCase):
    def test_the_one_descriptor_of_the_device(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "0").symlink_to("/dev/null")
        (folder / "5").symlink_to("/dev/fuse")
        (folder / "6").symlink_to("socket:[123]")
        self.assertEqual(device_descriptor(str(folder)), 5)
        (folder / "7").symlink_to("/dev/fuse")
        self.assertIsNone(device_descriptor(str(folder)), "two sessions: which one is not known")
        self.assertIsNone(device_descriptor(str(folder / "missing")))

    def test_this_process(self) -> None:
        if not Path("/dev/fuse").exists():
            raise self.skipTest("no /dev/fuse here")
        self.assertIsNone(device_descriptor())
        try:
            descriptor = os.open("/dev/fuse", os.O_RDWR)
        except OSError as error:
            raise self.skipTest(f"/dev/fuse cannot be opened here: {error}") from None
        self.addCleanup(os.close, descriptor)
        self.assertEqual(device_descriptor(), descriptor)
