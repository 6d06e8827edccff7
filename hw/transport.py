"""The one interface every transport implements, and the error all of them raise.

Everything above hw/ sees only :class:`VirtioTransport`: memory the device can reach,
split virtqueues in it (0 = hiprio, 1.. = request queues), ``kick``, and file descriptors
to wait on. Two kinds of transport stand behind it: the vhost-user frontend
(:mod:`pyvirtiofs.hw.vhost_user`, we play the VMM beside a virtiofsd on this host) and a
virtio device driven from guest userspace inside a VM. Nothing above this module may
assume either one.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Protocol

from pyvirtiofs.hw.virtqueue import SplitVirtqueue

__all__ = ["DeviceGone", "DmaMemory", "VirtioTransport"]


class DeviceGone(OSError):
    """The device (daemon) went away; every request fails with ENOTCONN."""

    def __init__(self, detail: str = "virtio-fs device is gone") -> None:
        super().__init__(errno.ENOTCONN, detail)


class DmaMemory(Protocol):
    """Memory shared with the device: we address it by offset, the device by address."""

    @property
    def view(self) -> memoryview: ...
    @property
    def size(self) -> int: ...

    def gpa(self, offset: int) -> int:
        """The device's address of ``offset`` (for ring registers)."""
        ...

    def dma_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``[offset, offset + length)`` as the device sees it: ``(address, length)``
        pieces, each physically contiguous (one piece where all memory is)."""
        ...


class VirtioTransport(Protocol):
    """What the device layer needs from a transport.

    ``interrupt_fds()``: descriptors that become readable when the device has used buffers
    (vhost-user: one call eventfd per queue; a PCI device: its INTx through UIO). Empty
    when completions must be polled: the device layer then checks the used rings every
    ``poll_interval`` seconds while requests are in flight. After waking on one,
    ``ack_interrupt(fd)`` re-arms it; the used rings are drained after that, so an
    interrupt that lands meanwhile is never lost.

    ``death_fd()``: a descriptor that becomes readable (EOF, HUP) when the device dies, or
    None when the transport cannot tell (then ``alive()`` is asked after a request timed
    out).
    """

    memory: DmaMemory
    queues: Sequence[SplitVirtqueue]
    buffer_start: int  # first offset in ``memory`` free for request buffers
    poll_interval: float  # seconds between used-ring checks when there are no interrupts

    def kick(self, index: int) -> None: ...
    def interrupt_fds(self) -> Sequence[int]: ...
    def ack_interrupt(self, fd: int) -> None: ...
    def death_fd(self) -> int | None: ...
    def alive(self) -> bool: ...
    def close(self) -> None: ...
