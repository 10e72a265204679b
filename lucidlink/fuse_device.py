"""
The FUSE device once llfuse's loop has ended: requests still queued there are refused.

When ``llfuse.main`` returns (a stop signal), its workers are gone but the
mount is still there until ``llfuse.close``.  A read another program made
just before waits in the kernel for an answer, holding the pages it asked
for; something of the mount's own that waits for those pages (a store into
the page cache, :mod:`lucidlink.kernel_pages`) would wait for good, and the
process could not exit.  :func:`refuse_pending` reads such requests from the
device and answers each with ``ENOTCONN``, what the program would get once
the mount is gone.

The device speaks the kernel's FUSE protocol: each ``read`` gives one
request, which starts with ``fuse_in_header`` (length, opcode, unique id,
node id, uid, gid, pid, padding); an answer is ``fuse_out_header`` (length,
negative errno, unique id).  ``FORGET``, ``BATCH_FORGET`` and ``INTERRUPT``
are not answered.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import struct
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

DEVICE = "/dev/fuse"
IN_HEADER = struct.Struct("<IIQQIIII")
OUT_HEADER = struct.Struct("<IiQ")
NOT_ANSWERED = {2, 36, 42}
"""FUSE_FORGET, FUSE_INTERRUPT, FUSE_BATCH_FORGET."""
READ_SIZE = 1024 * 1024 + 4096
"""At least the largest request the kernel may send (a write of ``max_write`` and its header)."""


def device_descriptor(fd_folder: str = "/proc/self/fd", device: str = DEVICE) -> int | None:
    """This process's descriptor of the FUSE device (the mount's session), or None if there is not exactly one."""
    found = []
    try:
        names = os.listdir(fd_folder)
    except OSError:
        return None
    for name in names:
        try:
            if os.readlink(os.path.join(fd_folder, name)) == device:
                found.append(int(name))
        except (OSError, ValueError):
            continue
    return found[0] if len(found) == 1 else None


def refuse_pending(descriptor: int, done: Callable[[], bool], seconds: float) -> int:
    """
    Answer requests read from ``descriptor`` with ``ENOTCONN`` until ``done()`` or ``seconds`` pass; how many.

    Call only once llfuse's loop has ended: nobody else may read the device.
    """
    deadline = time.monotonic() + seconds
    refused = 0
    poller = select.poll()
    poller.register(descriptor, select.POLLIN)
    while not done() and time.monotonic() < deadline:
        if not poller.poll(50):
            continue
        try:
            request = os.read(descriptor, READ_SIZE)
        except OSError as error:
            if error.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):  # ENOENT: interrupted before it was read
                continue
            log.debug("the FUSE device could not be read: %s", error)
            return refused  # ENODEV: unmounted, and every request has ended
        if len(request) < IN_HEADER.size:
            continue
        _, opcode, unique, *_ = IN_HEADER.unpack_from(request)
        if opcode in NOT_ANSWERED:
            continue
        try:
            os.write(descriptor, OUT_HEADER.pack(OUT_HEADER.size, -errno.ENOTCONN, unique))
        except OSError as error:
            if error.errno != errno.ENOENT:  # ENOENT: the request was interrupted meanwhile
                log.debug("a FUSE request could not be answered: %s", error)
        refused += 1
    return refused
