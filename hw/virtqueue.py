"""Driver side of a virtio 1.x split virtqueue (virtio 1.2 §2.7) in shared memory.

Layout of one queue of ``size`` entries (all little-endian, virtio 1.x)::

    descriptor table  16 * size      {le64 addr; le32 len; le16 flags; le16 next}   align 16
    avail ring        6 + 2 * size   {le16 flags; le16 idx; le16 ring[size]; le16 used_event}
    used ring         6 + 8 * size   {le16 flags; le16 idx; {le32 id; le32 len}[size];
                                      le16 avail_event}                              align 4

This module knows nothing about FUSE, file descriptors or eventfds: it reads and writes
the rings through a memoryview and tells the caller when to kick. The transport owns the
notification mechanism and the device's addresses.

Memory ordering. CPython performs each ``pack_into``/``unpack_from`` as a plain memory
access, in program order at the compiler level (every access is an opaque C call). On x86
(TSO) stores are seen by the device in program order and loads are not reordered with
other loads, so "descriptors before avail ring entry before avail.idx" and "used.idx before
used ring entries" need no barrier. The one reordering x86 does -- a later load passing an
earlier store -- matters exactly at the two EVENT_IDX handshakes (store avail.idx / load
avail_event; store used_event / load used.idx). CPython has no fence primitive, so
:func:`full_fence` takes and drops a ``threading.Lock``: acquiring an uncontended lock
executes a LOCK-prefixed atomic instruction, which is a full barrier on x86. On weakly
ordered CPUs (arm64) a lock pair is not guaranteed to order a store before a later load;
this module is only claimed correct on x86-64.

Ring indices are free-running u16 counters: they are only ever compared with ``!=`` and
subtracted modulo 2**16, never compared with ``<``.
"""

from __future__ import annotations

import struct
import sys
import threading
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "MAX_QUEUE_SIZE",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_DESC_F_INDIRECT",
    "VRING_DESC_F_NEXT",
    "VRING_DESC_F_WRITE",
    "VRING_USED_F_NO_NOTIFY",
    "Completion",
    "QueueFull",
    "SplitVirtqueue",
    "full_fence",
    "vring_need_event",
]

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1
VIRTIO_RING_F_INDIRECT_DESC = 28  # feature bit numbers, for the transport's negotiation
VIRTIO_RING_F_EVENT_IDX = 29
MAX_QUEUE_SIZE = 32768

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U32_LIMIT = 1 << 32
_U64_LIMIT = 1 << 64

# Used only as a memory barrier, never to protect data (see module docstring).
_FENCE_LOCK = threading.Lock()


def full_fence() -> None:
    """Full memory barrier (store->load ordering included) on x86.

    A lock acquire is a locked read-modify-write (``lock cmpxchg`` in glibc), and x86
    locked instructions order all earlier loads and stores before all later ones. The lock
    is module-wide and held for no time, so contention costs at most a short wait.
    """
    with _FENCE_LOCK:
        pass


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Virtio's notification test: did the index move from ``old`` past ``event_idx``?

    True iff ``event_idx`` lies in ``[old_idx, new_idx)`` modulo 2**16, i.e. the other
    side asked to be told once entry ``event_idx`` is published.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class QueueFull(Exception):
    """Not enough free descriptors right now; harvest completions and retry."""


class Completion(NamedTuple):
    """One chain returned by the device.

    ``used_len`` is the device's claim, unmodified; ``capacity`` is the total size of the
    chain's device-writable buffers. ``used_len > capacity`` is a protocol violation (also
    counted in ``SplitVirtqueue.overlong_completions``): the caller must not read past
    ``capacity`` and should treat the reply as corrupt.
    """

    head: int
    used_len: int
    capacity: int
    token: object

    @property
    def overlong(self) -> bool:
        return self.used_len > self.capacity


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def _check_size(size: int) -> None:
    if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
        raise ValueError(f"queue size must be a power of two in 1..{MAX_QUEUE_SIZE}, got {size}")


class SplitVirtqueue:
    """A split virtqueue, driver side, living in ``mem[offset : offset + total_bytes]``.

    Typical use (the transport kicks, the caller owns buffers)::

        head = vq.add([(req_gpa, req_len)], [(reply_gpa, reply_len)], token=waiter)
        if vq.publish():
            kick()                       # eventfd write, MMIO, ...
        ...
        for c in vq.harvest():           # after a call eventfd wakeup, or when polling
            complete(c.token, c.used_len, c.capacity)

    Free descriptors are kept as a singly linked list in a Python-side ``next`` array
    (never read back from shared memory, which the device could scribble on); a chain is a
    contiguous run of that list, so returning it is O(1): link its tail to the free head.

    Not thread-safe: one owner (the device actor's IRQ loop, or a lock around every call).
    """

    __slots__ = (
        "_added",
        "_avail_event_off",
        "_avail_flags_off",
        "_avail_idx_off",
        "_avail_off",
        "_avail_ring_off",
        "_avail_shadow",
        "_cap",
        "_count",
        "_desc_off",
        "_event_idx",
        "_free_head",
        "_in_flight",
        "_indirect",
        "_irq_enabled",
        "_last_used",
        "_mask",
        "_mem",
        "_next",
        "_num_free",
        "_offset",
        "_published",
        "_size",
        "_start_idx",
        "_tail",
        "_token",
        "_total",
        "_used_event_off",
        "_used_flags_off",
        "_used_idx_off",
        "_used_off",
        "_used_ring_off",
        "_words",
        "bogus_completions",
        "idx_overruns",
        "overlong_completions",
    )

    @staticmethod
    def layout(size: int) -> tuple[int, int, int, int]:
        """``(desc_off, avail_off, used_off, total_bytes)`` relative to the queue's offset.

        Packed with the spec's minimum alignments (16/2/4) -- virtio 1.x and vhost-user
        pass the three addresses separately, so the legacy page-aligned used ring is not
        needed. ``total_bytes`` is rounded up to 4096 so queues can be laid end to end on
        page boundaries.
        """
        _check_size(size)
        desc_off = 0
        avail_off = DESC_SIZE * size  # multiple of 16, hence 2-aligned
        used_off = _align(avail_off + 6 + 2 * size, 4)
        total = _align(used_off + 6 + 8 * size, 4096)
        return desc_off, avail_off, used_off, total

    def __init__(
        self,
        mem: memoryview,
        offset: int,
        size: int,
        *,
        event_idx: bool,
        indirect: bool = False,
        start_idx: int = 0,
    ) -> None:
        """Claim and zero ``layout(size)[3]`` bytes of ``mem`` at ``offset`` (16-aligned).

        ``event_idx`` / ``indirect``: whether VIRTIO_RING_F_EVENT_IDX / INDIRECT_DESC were
        negotiated. ``start_idx`` is the initial value of both ring indices (0 for a fresh
        device); the transport must pass :attr:`start_idx` to the device as the vring base
        (vhost-user SET_VRING_BASE). Starting near 65535 exercises index wraparound early.
        """
        desc_rel, avail_rel, used_rel, total = self.layout(size)
        if mem.readonly:
            raise ValueError("virtqueue memory must be writable")
        if offset < 0 or offset % 16:
            raise ValueError(f"queue offset must be 16-aligned and >= 0, got {offset:#x}")
        if offset + total > mem.nbytes:
            raise ValueError(f"queue of {total:#x} bytes at {offset:#x} exceeds memory")
        if not 0 <= start_idx <= 0xFFFF:
            raise ValueError(f"start_idx must be a u16, got {start_idx}")
        self._mem = mem
        self._offset = offset
        self._size = size
        self._mask = size - 1
        self._total = total
        self._event_idx = bool(event_idx)
        self._indirect = bool(indirect)
        self._start_idx = start_idx

        self._desc_off = offset + desc_rel
        self._avail_off = offset + avail_rel
        self._used_off = offset + used_rel
        self._avail_flags_off = self._avail_off
        self._avail_idx_off = self._avail_off + 2
        self._avail_ring_off = self._avail_off + 4
        self._used_event_off = self._avail_ring_off + 2 * size
        self._used_flags_off = self._used_off
        self._used_idx_off = self._used_off + 2
        self._used_ring_off = self._used_off + 4
        self._avail_event_off = self._used_ring_off + 8 * size

        # Every ring index and event field is read and written through this u16 view: one
        # 2-byte load or store each. struct.pack_into would first zero the field and then
        # store it byte by byte, and the device, reading concurrently, once saw avail.idx
        # as 0 ("Guest moved used index from 52859 to 0": libvhost-user exits).
        if sys.byteorder != "little":
            raise RuntimeError("virtio rings are little-endian; this host is not")
        self._words = mem.cast("B")[: mem.nbytes & ~1].cast("H")
        mem[offset : offset + total] = bytes(total)
        # Both indices, and both event fields, start at start_idx. The event fields matter:
        # avail_event = 0 with start_idx != 0 would make publish() suppress the first kick
        # until the device has written avail_event, which it only does after a kick.
        for off in (
            self._avail_idx_off,
            self._used_idx_off,
            self._used_event_off,
            self._avail_event_off,
        ):
            self._words[off >> 1] = start_idx

        self._avail_shadow = start_idx  # next avail.idx (includes unpublished adds)
        self._published = start_idx  # avail.idx as last stored
        self._added = 0
        self._last_used = start_idx
        self._irq_enabled = True

        self._next: list[int] = list(range(1, size + 1))  # free list links; size = end
        self._free_head = 0
        self._num_free = size
        self._in_flight = 0
        self._count: list[int] = [0] * size  # descriptors per in-flight head; 0 = free
        self._tail: list[int] = [0] * size
        self._cap: list[int] = [0] * size
        self._token: list[object] = [None] * size

        self.bogus_completions = 0
        self.overlong_completions = 0
        self.idx_overruns = 0

    # -- submission ------------------------------------------------------------------
    def add(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        token: object = None,
        *,
        indirect_table: tuple[int, int] | None = None,
    ) -> int:
        """Queue one chain (device-readable buffers, then device-writable); return its head.

        Buffers are ``(gpa, length)`` pairs with ``0 < length < 2**32``. The chain becomes
        visible to the device only at the next :meth:`publish`.

        ``indirect_table=(offset_in_mem, gpa)`` (only if constructed with ``indirect=True``)
        writes the chain into a caller-owned table of ``16 * n`` bytes and uses a single
        ring descriptor; the table must stay untouched until the chain completes.

        Raises ``QueueFull`` (nothing changed; harvest and retry) when descriptors are short,
        ``ValueError`` for an empty chain, a bad length/address, or a chain longer than the
        queue size (the spec forbids it, and it could never fit). On ``ValueError`` no
        bookkeeping or ring state has changed; free descriptor slots or the indirect table
        may hold partial garbage, which the device cannot see.
        """
        nread = len(readable)
        n = nread + len(writable)
        if n == 0:
            raise ValueError("empty descriptor chain")
        if n > self._size:
            raise ValueError(f"chain of {n} descriptors exceeds queue size {self._size}")
        mem = self._mem
        pack = _DESC.pack_into
        head = self._free_head
        table_gpa = 0
        if indirect_table is None:
            if n > self._num_free:
                raise QueueFull(f"need {n} descriptors, {self._num_free} free")
            direct = True
            nxt = self._next
            base = self._desc_off
        else:
            if not self._indirect:
                raise ValueError("indirect descriptors were not negotiated for this queue")
            if self._num_free == 0:
                raise QueueFull("no free descriptor for an indirect table")
            direct = False
            nxt = self._next  # unused for the table's own links (they are 0..n-1)
            base, table_gpa = indirect_table
            if base < 0 or base + DESC_SIZE * n > mem.nbytes:
                raise ValueError(f"indirect table at {base:#x} exceeds memory")
            if table_gpa < 0 or table_gpa + DESC_SIZE * n > _U64_LIMIT:
                raise ValueError(f"bad indirect table address {table_gpa:#x}")

        capacity = 0
        i = 0
        last = n - 1
        idx = head if direct else 0
        tail = head
        flags = 0
        for seq in (readable, writable):
            for addr, length in seq:
                if not 0 < length < _U32_LIMIT:
                    raise ValueError(f"descriptor length {length} not in 1..2**32-1")
                if addr < 0 or addr + length > _U64_LIMIT:
                    raise ValueError(f"descriptor address {addr:#x} out of range")
                if flags:
                    capacity += length
                if i == last:
                    pack(mem, base + DESC_SIZE * idx, addr, length, flags, 0)
                    tail = idx
                else:
                    following = nxt[idx] if direct else idx + 1
                    pack(
                        mem,
                        base + DESC_SIZE * idx,
                        addr,
                        length,
                        flags | VRING_DESC_F_NEXT,
                        following,
                    )
                    idx = following
                i += 1
            flags = VRING_DESC_F_WRITE

        if direct:
            used = n
        else:
            pack(
                mem,
                self._desc_off + DESC_SIZE * head,
                table_gpa,
                DESC_SIZE * n,
                VRING_DESC_F_INDIRECT,
                0,
            )
            tail = head
            used = 1
        # Commit: from here on nothing can fail.
        self._free_head = self._next[tail]
        self._num_free -= used
        self._count[head] = used
        self._tail[head] = tail
        self._cap[head] = capacity
        self._token[head] = token
        self._in_flight += 1
        shadow = self._avail_shadow
        self._words[(self._avail_ring_off >> 1) + (shadow & self._mask)] = head
        self._avail_shadow = (shadow + 1) & 0xFFFF
        self._added += 1
        return head

    def publish(self) -> bool:
        """Expose all added chains (store avail.idx); return True if the device needs a kick.

        Returns False without touching memory when nothing was added since the last call.
        """
        if not self._added:
            return False
        old = self._published
        new = self._avail_shadow
        self._words[self._avail_idx_off >> 1] = new
        self._published = new
        self._added = 0
        # The device may have gone to sleep after reading the old avail.idx; its
        # avail_event / NO_NOTIFY must be read after our store is globally visible.
        full_fence()
        if self._event_idx:
            event = self._words[self._avail_event_off >> 1]
            return vring_need_event(event, new, old)
        return not (self._words[self._used_flags_off >> 1] & VRING_USED_F_NO_NOTIFY)

    def release(self) -> None:
        """Drop this queue's view of guest memory (so the memory can be unmapped); the
        queue is unusable afterwards."""
        self._words.release()

    def indices(self) -> dict[str, int]:
        """Our ring indices beside what shared memory holds now: after a device died
        complaining about an index, this tells whether memory or the device was wrong."""
        return {"avail_shadow": self._avail_shadow, "published": self._published,
                "avail_idx_in_memory": self._words[self._avail_idx_off >> 1],
                "last_used": self._last_used,
                "used_idx_in_memory": self._words[self._used_idx_off >> 1],
                "in_flight": self._in_flight}

    # -- completion ------------------------------------------------------------------
    def has_used(self) -> bool:
        """True if the device has returned chains not yet harvested."""
        return self._words[self._used_idx_off >> 1] != self._last_used

    def harvest(self) -> list[Completion]:
        """Take every used entry, free their descriptors, return them in ring order.

        One call is enough before blocking on the call notifier: after draining, with
        EVENT_IDX, it re-arms the interrupt (used_event = last index seen), fences, and
        re-checks used.idx, draining again if the device slipped an entry in meanwhile --
        that entry might otherwise have been posted before the device saw the new
        used_event, and no notification would ever come for it.

        The device is not trusted: an id >= size or not in flight (never added, or already
        completed) is skipped and counted in ``bogus_completions`` -- nothing is freed twice.
        A used.idx that moved by more than ``size`` since the last look is impossible for
        an honest device: it is counted in ``bogus_completions`` and ``idx_overruns``, at
        most ``size`` entries are examined, and our index resyncs to the device's. A device
        that keeps advancing used.idx cannot hold us here: an honest one completes at most
        what was in flight, so after ``in_flight + size`` examined entries we return.
        """
        out: list[Completion] = []
        budget = self._in_flight + self._size
        while budget > 0:
            examined = self._drain(out)
            if not examined:
                break
            budget -= examined
            if self._event_idx:
                if self._irq_enabled:
                    self._words[self._used_event_off >> 1] = self._last_used
                    full_fence()
                else:
                    # Keep the "never" point just behind us so the device never reaches it.
                    self._words[self._used_event_off >> 1] = (self._last_used - 1) & 0xFFFF
        return out

    def harvest_all(self) -> list[Completion]:
        """Alias of :meth:`harvest` (which already drains until the ring is quiet)."""
        return self.harvest()

    def _drain(self, out: list[Completion]) -> int:
        """One pass over the entries present now; return how many ring entries were examined."""
        mem = self._mem
        used_idx = self._words[self._used_idx_off >> 1]
        last = self._last_used
        pending = (used_idx - last) & 0xFFFF
        if not pending:
            return 0
        size = self._size
        if pending > size:
            self.bogus_completions += 1
            self.idx_overruns += 1
            pending = size
        mask = self._mask
        ring = self._used_ring_off
        unpack = _USED_ELEM.unpack_from
        count = self._count
        nxt = self._next
        tails = self._tail
        tokens = self._token
        done = 0
        for i in range(pending):
            head, used_len = unpack(mem, ring + 8 * ((last + i) & mask))
            if head >= size or not count[head]:
                self.bogus_completions += 1
                continue
            nxt[tails[head]] = self._free_head
            self._free_head = head
            self._num_free += count[head]
            count[head] = 0
            capacity = self._cap[head]
            token = tokens[head]
            tokens[head] = None
            if used_len > capacity:
                self.overlong_completions += 1
            out.append(Completion(head, used_len, capacity, token))
            done += 1
        self._in_flight -= done
        self._last_used = used_idx
        return pending

    def disable_interrupts(self) -> None:
        """Ask the device not to notify (busy polling). A hint: spurious calls may still come."""
        self._irq_enabled = False
        if self._event_idx:
            # The spec requires avail.flags == 0 with EVENT_IDX; instead put used_event just
            # behind the last seen index: the device would have to lap the u16 to hit it.
            self._words[self._used_event_off >> 1] = (self._last_used - 1) & 0xFFFF
        else:
            self._words[self._avail_flags_off >> 1] = VRING_AVAIL_F_NO_INTERRUPT

    def enable_interrupts(self) -> bool:
        """Re-arm device notifications; return True if used entries are already pending.

        If it returns True, harvest before blocking: those entries may have been posted
        while notifications were off and no call will come for them.
        """
        self._irq_enabled = True
        if self._event_idx:
            self._words[self._used_event_off >> 1] = self._last_used
        else:
            self._words[self._avail_flags_off >> 1] = 0
        full_fence()
        return self.has_used()

    def abandon_all(self) -> list[object]:
        """Forget every in-flight chain and return their tokens (device is gone).

        Only safe once the device can no longer touch the rings or buffers (daemon dead,
        or the ring stopped with GET_VRING_BASE): the caller fails the tokens' waiters and
        frees their buffers. The queue is left empty; its indices are kept.
        """
        tokens = [self._token[h] for h in range(self._size) if self._count[h]]
        self._next = list(range(1, self._size + 1))
        self._free_head = 0
        self._num_free = self._size
        self._in_flight = 0
        self._count = [0] * self._size
        self._token = [None] * self._size
        # Skip whatever the device may have left in the used ring, and anything added but
        # never published.
        self._last_used = self._words[self._used_idx_off >> 1]
        self._avail_shadow = self._published
        self._added = 0
        return tokens

    # -- introspection ---------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def num_free(self) -> int:
        """Free descriptors (an indirect chain uses one, a direct chain one per buffer)."""
        return self._num_free

    @property
    def in_flight(self) -> int:
        """Chains added and not yet harvested (published or not)."""
        return self._in_flight

    @property
    def event_idx(self) -> bool:
        return self._event_idx

    @property
    def indirect(self) -> bool:
        return self._indirect

    @property
    def start_idx(self) -> int:
        """Initial ring index; the device's vring base must be set to it."""
        return self._start_idx

    @property
    def avail_idx(self) -> int:
        """avail.idx as last published."""
        return self._published

    @property
    def last_used_idx(self) -> int:
        """used.idx as of the last harvest."""
        return self._last_used

    @property
    def offset(self) -> int:
        """Offset of the queue's area in ``mem``."""
        return self._offset

    @property
    def total_bytes(self) -> int:
        return self._total

    @property
    def desc_offset(self) -> int:
        """Absolute offset of the descriptor table in ``mem``."""
        return self._desc_off

    @property
    def avail_offset(self) -> int:
        """Absolute offset of the avail ring in ``mem``."""
        return self._avail_off

    @property
    def used_offset(self) -> int:
        """Absolute offset of the used ring in ``mem``."""
        return self._used_off

    def __repr__(self) -> str:
        return (
            f"SplitVirtqueue(size={self._size}, free={self._num_free}, "
            f"in_flight={self._in_flight}, avail={self._published}, used={self._last_used})"
        )
