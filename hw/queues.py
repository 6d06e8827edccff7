"""Request buffers in and out of the virtqueues: allocate, chain, publish, kick, harvest.

A request is one buffer in device memory: the bytes the device reads first, then room
for what it writes back. :class:`RequestQueues` hands out such buffers, chains them into
a queue (splitting a range where the memory behind it is not physically contiguous),
batches notifications (one kick per queue per :meth:`flush`), and on harvest hands each
used buffer's reply to a callback before freeing it — so the buffer's lifetime is decided
here, never by the layer that reads the reply. Nothing here knows what the bytes mean.

Single-threaded by design: exactly one thread (the device's) may call it.

A used ring whose index jumps by more than the queue size is unrecoverable (as Linux's
``BAD_RING``): the queue is declared broken, every chain in flight on it is handed to the
caller's ``on_broken`` callback, and their buffers stay allocated — the device may still
write into them — until the transport closes (``quarantined_bytes``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyvirtiofs.hw.memory import BufferAllocator
from pyvirtiofs.hw.transport import VirtioTransport
from pyvirtiofs.hw.virtqueue import QueueFull

__all__ = ["Posted", "RequestQueues"]

ALIGNMENT = 64  # a cache line: buffers of different requests never share one


@dataclass(slots=True)
class Posted:
    """One buffer on a queue: where its reply lands, and the caller's token."""

    token: Any
    offset: int
    reply_offset: int
    reply_capacity: int
    queue: int


def _round(n: int) -> int:
    return (n + ALIGNMENT - 1) & ~(ALIGNMENT - 1)


class RequestQueues:
    """Buffers of one transport's memory, posted to its queues (see module doc).

    ``on_used(posted, used_len)`` is called for every completed buffer while its reply is
    still in memory (read it from :attr:`view` at ``posted.reply_offset``); it must not
    raise. ``on_broken(queue, reason, posted_list)`` is called once when a queue breaks.
    """

    def __init__(self, transport: VirtioTransport) -> None:
        self.transport = transport
        mem = transport.memory
        self.view = mem.view
        self._dma_ranges = mem.dma_ranges
        self.allocator = BufferAllocator(transport.buffer_start, mem.size, ALIGNMENT)
        self.capacity = self.allocator.capacity
        self._dirty: set[int] = set()
        self._overruns = [vq.idx_overruns for vq in transport.queues]
        self.broken: dict[int, str] = {}  # queue index -> why it is out of service
        self.quarantined_bytes = 0

    @staticmethod
    def span(readable: int, writable: int) -> int:
        """Bytes a buffer of ``readable`` + ``writable`` bytes takes."""
        return _round(readable) + writable

    def fits(self, readable: int, writable: int) -> bool:
        """Whether such a buffer could ever be placed (in an idle device)."""
        return self.span(readable, writable) <= self.capacity

    def reserve(self, readable: int, writable: int) -> int | None:
        """Offset of a new buffer (its readable part first), or None when memory is full."""
        return self.allocator.alloc(self.span(readable, writable))

    def post(self, queue: int, offset: int, readable: int, writable: int,
             token: Any) -> Posted | None:
        """Chain a reserved buffer into ``queue``; None (buffer freed) when the ring is
        full. Visible to the device at the next :meth:`flush`."""
        reply_offset = offset + _round(readable)
        posted = Posted(token, offset, reply_offset, writable, queue)
        ranges = self._dma_ranges
        try:
            self.transport.queues[queue].add(
                ranges(offset, readable),
                ranges(reply_offset, writable) if writable else (), posted)
        except QueueFull:
            self.allocator.free(offset)
            return None
        self._dirty.add(queue)
        return posted

    def release(self, offset: int) -> None:
        """Free a reserved buffer that was never posted."""
        self.allocator.free(offset)

    def flush(self) -> None:
        """Publish everything posted since the last flush; kick where the device asks."""
        queues = self.transport.queues
        for index in self._dirty:
            if queues[index].publish():
                self.transport.kick(index)
        self._dirty.clear()

    def has_used(self) -> bool:
        return any(vq.has_used() for i, vq in enumerate(self.transport.queues)
                   if i not in self.broken)

    def harvest(self, on_used: Callable[[Posted, int], None],
                on_broken: Callable[[int, str, list[Posted]], None]) -> None:
        """Drain every used ring completely (see class doc for the callbacks)."""
        free = self.allocator.free
        for index, vq in enumerate(self.transport.queues):
            if index in self.broken:
                continue
            # Bounded: every non-empty batch retires at least one chain.
            for _ in range(vq.size + 1):
                batch = vq.harvest()
                if vq.idx_overruns != self._overruns[index]:
                    self._break(index, [c.token for c in batch], on_broken)
                    break
                if not batch:
                    break
                for completion in batch:
                    posted: Posted = completion.token
                    try:
                        # The device says how much it wrote; more than the buffer holds
                        # is the caller's to reject (it sees both numbers).
                        on_used(posted, completion.used_len)
                    finally:
                        free(posted.offset)

    def _break(self, index: int, harvested: list[Any],
               on_broken: Callable[[int, str, list[Posted]], None]) -> None:
        vq = self.transport.queues[index]
        reason = (f"device corrupted the used ring of queue {index} (used.idx moved by more "
                  f"than the queue size {vq.size}); the queue is out of service")
        self.broken[index] = reason
        self._overruns[index] = vq.idx_overruns
        lost = [p for p in harvested + vq.abandon_all() if isinstance(p, Posted)]
        for posted in lost:
            self.quarantined_bytes += self.allocator.size_of(posted.offset)
        on_broken(index, reason, lost)
