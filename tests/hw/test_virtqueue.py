"""Unit tests for hw.virtqueue against an in-test device simulator (no daemon).

The simulator reads the avail ring and descriptor chains, and writes the used ring, through
the same memoryview the driver uses -- the way a vhost-user daemon does through its own
mapping -- and checks what a strict device would check (flags, order, link integrity).
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import pyvirtiofs.hw.virtqueue as vqmod
from pyvirtiofs.hw.memory import BufferAllocator, GuestMemory
from pyvirtiofs.hw.virtqueue import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    Completion,
    QueueFull,
    SplitVirtqueue,
    vring_need_event,
)

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")


class DeviceError(AssertionError):
    """The driver produced something a strict device would reject."""


class DeviceSim:
    """A split-ring device that processes what it is given, when the test says so."""

    def __init__(self, mem: memoryview, vq: SplitVirtqueue, gpa_base: int = 0) -> None:
        self.mem = mem
        self.size = vq.size
        self.desc = vq.desc_offset
        self.avail = vq.avail_offset
        self.used = vq.used_offset
        self.event_idx = vq.event_idx
        self.gpa_base = gpa_base
        # What the device learns at setup: SET_VRING_BASE (= start_idx) and used->idx.
        self.last_avail = vq.start_idx
        self.used_idx = self.u16(self.used + 2)
        assert self.used_idx == vq.start_idx
        self.signalled: int | None = None

    # raw accessors
    def u16(self, off: int) -> int:
        return U16.unpack_from(self.mem, off)[0]

    def put16(self, off: int, value: int) -> None:
        U16.pack_into(self.mem, off, value & 0xFFFF)

    @property
    def avail_idx(self) -> int:
        return self.u16(self.avail + 2)

    @property
    def avail_flags(self) -> int:
        return self.u16(self.avail)

    @property
    def used_event(self) -> int:
        return self.u16(self.avail + 4 + 2 * self.size)

    def set_avail_event(self, value: int) -> None:
        self.put16(self.used + 4 + 8 * self.size, value)

    def set_used_flags(self, value: int) -> None:
        self.put16(self.used, value)

    def off(self, gpa: int, length: int) -> int:
        o = gpa - self.gpa_base
        if o < 0 or o + length > self.mem.nbytes:
            raise DeviceError(f"address {gpa:#x}+{length} outside guest memory")
        return o

    # device work
    def pop(self) -> tuple[int, list[tuple[int, int, bool]]] | None:
        """Take the next available chain: (head, [(addr, len, device_writable), ...])."""
        if self.last_avail == self.avail_idx:
            return None
        head = self.u16(self.avail + 4 + 2 * (self.last_avail % self.size))
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx:  # as libvhost-user: ask to be kicked at the next new entry
            self.set_avail_event(self.last_avail)
        return head, self.walk(head)

    def pop_all(self) -> list[tuple[int, list[tuple[int, int, bool]]]]:
        out = []
        while (item := self.pop()) is not None:
            out.append(item)
        return out

    def walk(self, head: int) -> list[tuple[int, int, bool]]:
        if head >= self.size:
            raise DeviceError(f"head {head} >= size")
        addr, length, flags, _nxt = DESC.unpack_from(self.mem, self.desc + 16 * head)
        if flags & VRING_DESC_F_INDIRECT:
            if flags != VRING_DESC_F_INDIRECT:
                raise DeviceError(f"indirect descriptor with other flags {flags:#x}")
            if length == 0 or length % 16:
                raise DeviceError(f"indirect table length {length}")
            return self._walk_table(self.off(addr, length), length // 16, indirect=True)
        return self._walk_table(self.desc, self.size, indirect=False, first=head)

    def _walk_table(
        self, base: int, n: int, *, indirect: bool, first: int = 0
    ) -> list[tuple[int, int, bool]]:
        chain: list[tuple[int, int, bool]] = []
        idx = first
        seen_write = False
        while True:
            if idx >= n:
                raise DeviceError(f"next {idx} out of table of {n}")
            if len(chain) >= n:
                raise DeviceError("descriptor loop")
            addr, length, flags, nxt = DESC.unpack_from(self.mem, base + 16 * idx)
            if flags & VRING_DESC_F_INDIRECT:
                raise DeviceError("nested/chained indirect descriptor")
            if flags & ~(VRING_DESC_F_NEXT | VRING_DESC_F_WRITE):
                raise DeviceError(f"unknown flags {flags:#x}")
            write = bool(flags & VRING_DESC_F_WRITE)
            if seen_write and not write:
                raise DeviceError("readable descriptor after a writable one")
            seen_write |= write
            chain.append((addr, length, write))
            if not flags & VRING_DESC_F_NEXT:
                if indirect and len(chain) != n:
                    raise DeviceError("indirect table not fully used")
                return chain
            idx = nxt

    def push(self, head: int, length: int) -> None:
        """Post one used entry and publish it (used.idx)."""
        USED_ELEM.pack_into(self.mem, self.used + 4 + 8 * (self.used_idx % self.size), head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.put16(self.used + 2, self.used_idx)

    def need_interrupt(self) -> bool:
        """QEMU's vring_notify(): should the device signal the call eventfd now?"""
        if not self.event_idx:
            return not self.avail_flags & VRING_AVAIL_F_NO_INTERRUPT
        old, self.signalled = self.signalled, self.used_idx
        return old is None or vring_need_event(self.used_event, self.used_idx, old)


def make_queue(
    size: int = 8,
    *,
    event_idx: bool = False,
    indirect: bool = False,
    start_idx: int = 0,
    extra: int = 0,
) -> tuple[memoryview, SplitVirtqueue, DeviceSim]:
    """Queue at offset 0 of a bytearray; GPA == offset; ``extra`` bytes free after it."""
    total = SplitVirtqueue.layout(size)[3]
    mem = memoryview(bytearray(total + extra))
    vq = SplitVirtqueue(mem, 0, size, event_idx=event_idx, indirect=indirect, start_idx=start_idx)
    return mem, vq, DeviceSim(mem, vq)


# --------------------------------------------------------------------------- layout
@pytest.mark.parametrize("size", [1, 2, 4, 128, 256, 1024, 32768])
def test_layout_alignment_and_sizes(size: int) -> None:
    desc, avail, used, total = SplitVirtqueue.layout(size)
    assert desc == 0 and desc % 16 == 0
    assert avail % 2 == 0 and avail >= desc + 16 * size
    assert used % 4 == 0 and used >= avail + 6 + 2 * size
    assert total % 4096 == 0 and total >= used + 6 + 8 * size
    assert total - (used + 6 + 8 * size) < 4096


def test_layout_known_values() -> None:
    assert SplitVirtqueue.layout(256) == (0, 4096, 4616, 8192)
    assert SplitVirtqueue.layout(1) == (0, 16, 24, 4096)


@pytest.mark.parametrize("size", [0, 3, 6, 65536, -1, 32769])
def test_layout_rejects_bad_sizes(size: int) -> None:
    with pytest.raises(ValueError):
        SplitVirtqueue.layout(size)


def test_constructor_validation_and_zeroing() -> None:
    total = SplitVirtqueue.layout(8)[3]
    buf = bytearray(b"\xff" * (total + 64))
    mem = memoryview(buf)
    with pytest.raises(ValueError):
        SplitVirtqueue(memoryview(bytes(total)), 0, 8, event_idx=False)  # read-only
    with pytest.raises(ValueError):
        SplitVirtqueue(mem, 8, 8, event_idx=False)  # not 16-aligned
    with pytest.raises(ValueError):
        SplitVirtqueue(mem, 128, 8, event_idx=False)  # runs past the end
    with pytest.raises(ValueError):
        SplitVirtqueue(mem, 0, 8, event_idx=False, start_idx=65536)
    vq = SplitVirtqueue(mem, 0, 8, event_idx=True, start_idx=0x1234)
    dev = DeviceSim(mem, vq)
    assert dev.avail_idx == 0x1234 and dev.used_idx == 0x1234
    assert dev.used_event == 0x1234
    assert dev.u16(vq.used_offset + 4 + 8 * 8) == 0x1234  # avail_event
    assert dev.avail_flags == 0 and dev.u16(vq.used_offset) == 0
    # everything else zeroed, bytes after the queue untouched
    assert bytes(buf[: 16 * 8]) == bytes(16 * 8)
    assert bytes(buf[total:]) == b"\xff" * 64
    assert vq.num_free == 8 and vq.in_flight == 0 and vq.size == 8
    assert (vq.desc_offset, vq.avail_offset, vq.used_offset) == (0, 128, 152)  # 150 -> 4-aligned


# --------------------------------------------------------------------------- chains
def test_chain_order_flags_and_links() -> None:
    mem, vq, dev = make_queue(8)
    readable = [(0x1000, 40), (0x2000, 4096)]
    writable = [(0x3000, 16), (0x4000, 1 << 20), (0x5000, 7)]
    head = vq.add(readable, writable, token="req")
    assert vq.num_free == 3 and vq.in_flight == 1
    # not visible before publish
    assert dev.avail_idx == 0 and dev.pop() is None
    assert vq.publish() is True
    assert dev.avail_idx == 1
    got_head, chain = dev.pop()
    assert got_head == head
    assert chain == [(a, n, False) for a, n in readable] + [(a, n, True) for a, n in writable]
    # raw flags: NEXT on all but the last, WRITE exactly on the writable part
    idx, flags_seen = head, []
    for _ in range(5):
        _addr, _len, flags, nxt = DESC.unpack_from(mem, vq.desc_offset + 16 * idx)
        flags_seen.append(flags)
        idx = nxt
    assert flags_seen == [1, 1, 3, 3, 2]
    dev.push(head, 123)
    assert vq.harvest() == [Completion(head, 123, 16 + (1 << 20) + 7, "req")]
    assert vq.num_free == 8 and vq.in_flight == 0


def test_readable_only_and_writable_only_chains() -> None:
    _mem, vq, dev = make_queue(4)
    h1 = vq.add([(0x100, 8)], [], token=1)  # e.g. FORGET: no reply buffer
    h2 = vq.add([], [(0x200, 8)], token=2)
    vq.publish()
    assert dev.pop_all() == [(h1, [(0x100, 8, False)]), (h2, [(0x200, 8, True)])]
    dev.push(h1, 0)
    dev.push(h2, 8)
    assert vq.harvest() == [Completion(h1, 0, 0, 1), Completion(h2, 8, 8, 2)]


@pytest.mark.parametrize(
    ("readable", "writable"),
    [
        ([], []),
        ([(0x100, 0)], []),
        ([], [(0x100, 0)]),
        ([(0x100, 1 << 32)], []),
        ([(-1, 8)], []),
        ([(0xFFFF_FFFF_FFFF_FFF0, 32)], []),
        ([(0x100, 8)] * 9, []),  # longer than the queue: can never fit
        ([(0x100, 8), (0x200, 8)], [(0x300, 8), (0x400, 1 << 32)]),  # bad one last
        ([(0x100, 8)], [(0x300, 0)]),
    ],
)
def test_add_rejects_bad_chains_without_side_effects(
    readable: list[tuple[int, int]], writable: list[tuple[int, int]]
) -> None:
    _mem, vq, dev = make_queue(8)
    h0 = vq.add([(0x10, 1)], [], token="first")
    before = (vq.num_free, vq.in_flight)
    with pytest.raises(ValueError):
        vq.add(readable, writable, token="bad")
    assert (vq.num_free, vq.in_flight) == before
    h1 = vq.add([(0x20, 2)], [], token="second")
    vq.publish()
    assert [h for h, _ in dev.pop_all()] == [h0, h1]
    dev.push(h0, 0)
    dev.push(h1, 0)
    assert [c.token for c in vq.harvest()] == ["first", "second"]
    assert vq.num_free == 8


def test_queue_full_and_recovery() -> None:
    _mem, vq, dev = make_queue(8)
    a = vq.add([(0x100, 1), (0x200, 1)], [(0x300, 1)], token="a")
    b = vq.add([(0x100, 1)], [(0x300, 1), (0x400, 1)], token="b")
    assert vq.num_free == 2
    with pytest.raises(QueueFull):
        vq.add([(0x100, 1)], [(0x300, 1), (0x400, 1)], token="c")
    assert vq.num_free == 2 and vq.in_flight == 2
    c = vq.add([(0x100, 1)], [(0x300, 1)], token="c")  # exactly fits
    assert vq.num_free == 0
    with pytest.raises(QueueFull):
        vq.add([(0x100, 1)], [])
    vq.publish()
    assert [h for h, _ in dev.pop_all()] == [a, b, c]
    dev.push(b, 2)
    assert vq.harvest() == [Completion(b, 2, 2, "b")]
    assert vq.num_free == 3
    d = vq.add([(0x100, 1)], [(0x300, 1), (0x400, 1)], token="d")
    vq.publish()
    assert [h for h, _ in dev.pop_all()] == [d]
    for h in (c, a, d):
        dev.push(h, 1)
    assert [x.token for x in vq.harvest()] == ["c", "a", "d"]
    assert vq.num_free == 8 and vq.in_flight == 0


def test_free_list_stays_sound_after_out_of_order_completions() -> None:
    _mem, vq, dev = make_queue(16)
    rng = random.Random(7)
    for _round in range(200):
        heads = []
        while True:
            n = rng.randint(1, 4)
            if n > vq.num_free:
                break
            heads.append(vq.add([(0x1000, 1)] * (n - 1), [(0x2000, 1)], token=n))
        vq.publish()
        popped = dev.pop_all()
        # every descriptor is used by exactly one chain
        descs = []
        for h, _chain in popped:
            idx = h
            while True:
                _a, _l, flags, nxt = DESC.unpack_from(dev.mem, dev.desc + 16 * idx)
                descs.append(idx)
                if not flags & VRING_DESC_F_NEXT:
                    break
                idx = nxt
        assert len(descs) == len(set(descs)) == 16 - vq.num_free
        rng.shuffle(popped)
        for h, _chain in popped:
            dev.push(h, 1)
        done = vq.harvest()
        assert sorted(c.head for c in done) == sorted(heads)
        assert vq.num_free == 16


# --------------------------------------------------------------------------- wraparound
def _pump(vq: SplitVirtqueue, dev: DeviceSim, requests: int, rng: random.Random) -> int:
    """Run ``requests`` requests through the queue in random batches; return completions."""
    next_token = 0
    expected: dict[int, int] = {}
    held: list[int] = []  # popped by the device, not yet completed
    completed = 0
    while completed < requests:
        added = False
        while vq.num_free and next_token < requests:
            head = vq.add([(0x1000, 8)], [(0x2000, 8)], token=next_token)
            expected[head] = next_token
            next_token += 1
            added = True
        # the device always drained the avail ring before, so it is waiting for a kick
        assert vq.publish() is added
        held.extend(head for head, _chain in dev.pop_all())
        rng.shuffle(held)
        for _ in range(rng.randint(1, len(held))):
            dev.push(held.pop(), 8)
        for c in vq.harvest():
            assert expected.pop(c.head) == c.token
            completed += 1
    assert not expected and vq.in_flight == 0
    return completed


@pytest.mark.parametrize("event_idx", [False, True])
def test_u16_wraparound_past_65535_over_70000_requests(event_idx: bool) -> None:
    _mem, vq, dev = make_queue(8, event_idx=event_idx)
    assert _pump(vq, dev, 70_000, random.Random(1)) == 70_000
    assert vq.bogus_completions == 0 and vq.overlong_completions == 0
    # 70,000 > 65,536: both free-running indices wrapped
    assert vq.avail_idx == vq.last_used_idx == 70_000 & 0xFFFF


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("start", [65530, 65535, 32767])
def test_wraparound_from_start_index(event_idx: bool, start: int) -> None:
    _mem, vq, dev = make_queue(4, event_idx=event_idx, start_idx=start)
    rng = random.Random(start)
    assert _pump(vq, dev, 40, rng) == 40
    assert vq.bogus_completions == 0
    assert vq.avail_idx == (start + 40) & 0xFFFF
    assert vq.last_used_idx == vq.avail_idx


# --------------------------------------------------------------------------- EVENT_IDX
@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (0, 1, 0, True),  # event == old: notify on the first new entry
        (0, 0, 0, False),  # nothing new
        (3, 5, 3, True),
        (4, 5, 3, True),  # event == new - 1: the boundary entry
        (5, 5, 3, False),  # event == new: not yet
        (2, 5, 3, False),  # event behind old: already notified for it
        (65535, 0, 65535, True),  # wrap
        (65535, 1, 65534, True),
        (0, 2, 65535, True),
        (65534, 1, 65535, False),
        (1, 1, 65535, False),
        (0, 1, 65535, True),
        (0, 0, 65535, False),
        (32768, 0, 0, False),
    ],
)
def test_vring_need_event_cases(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_vring_need_event_matches_definition(event: int, new: int, old: int) -> None:
    # notify iff event lies in [old, new) on the u16 circle
    assert vring_need_event(event, new, old) == ((event - old) % 65536 < (new - old) % 65536)


@pytest.mark.parametrize("start", [0, 65534, 65535])
def test_event_idx_kick_suppression(start: int) -> None:
    _mem, vq, dev = make_queue(8, event_idx=True, start_idx=start)
    assert vq.publish() is False  # nothing added
    vq.add([(0x100, 1)], [])
    assert vq.publish() is True  # device waits at avail_event == start
    vq.add([(0x100, 1)], [])
    assert vq.publish() is False  # device has not caught up: one kick is pending anyway
    vq.add([(0x100, 1)], [])
    vq.add([(0x100, 1)], [])
    assert vq.publish() is False
    assert len(dev.pop_all()) == 4  # device consumed all, avail_event = start + 4
    vq.add([(0x100, 1)], [])
    vq.add([(0x100, 1)], [])
    assert vq.publish() is True  # batch crossing the event index: one kick
    # device asks to be kicked only far ahead: suppressed
    dev.pop_all()
    dev.set_avail_event(start + 100)
    vq.add([(0x100, 1)], [])
    assert vq.publish() is False


def test_no_notify_flag_without_event_idx() -> None:
    _mem, vq, dev = make_queue(8, event_idx=False)
    vq.add([(0x100, 1)], [])
    assert vq.publish() is True
    dev.set_used_flags(VRING_USED_F_NO_NOTIFY)
    vq.add([(0x100, 1)], [])
    assert vq.publish() is False
    dev.set_used_flags(0)
    vq.add([(0x100, 1)], [])
    assert vq.publish() is True
    assert vq.publish() is False  # nothing new
    assert dev.avail_idx == 3


def test_event_idx_interrupt_rearm_and_suppression() -> None:
    _mem, vq, dev = make_queue(16, event_idx=True)
    heads = [vq.add([(0x100, 1)], [(0x200, 4)], token=i) for i in range(6)]
    vq.publish()
    dev.pop_all()
    dev.push(heads[0], 4)
    assert dev.need_interrupt() is True  # first completion, used_event == 0
    dev.push(heads[1], 4)
    assert dev.need_interrupt() is False  # driver has not re-armed yet
    assert [c.token for c in vq.harvest()] == [0, 1]
    assert dev.used_event == vq.last_used_idx == 2  # re-armed at the next entry
    dev.push(heads[2], 4)
    assert dev.need_interrupt() is True
    vq.harvest()
    vq.disable_interrupts()
    dev.push(heads[3], 4)
    assert dev.need_interrupt() is False
    assert vq.harvest()[0].token == 3  # polling still works
    assert dev.used_event != vq.last_used_idx
    dev.push(heads[4], 4)
    assert dev.need_interrupt() is False
    assert vq.enable_interrupts() is True  # pending entry: harvest before blocking
    assert vq.harvest()[0].token == 4
    assert vq.enable_interrupts() is False
    dev.push(heads[5], 4)
    assert dev.need_interrupt() is True


def test_no_interrupt_flag_without_event_idx() -> None:
    _mem, vq, dev = make_queue(8, event_idx=False)
    heads = [vq.add([(0x100, 1)], [], token=i) for i in range(3)]
    vq.publish()
    dev.pop_all()
    vq.disable_interrupts()
    assert dev.avail_flags == VRING_AVAIL_F_NO_INTERRUPT
    dev.push(heads[0], 0)
    assert dev.need_interrupt() is False
    assert vq.enable_interrupts() is True
    assert dev.avail_flags == 0
    assert len(vq.harvest()) == 1
    dev.push(heads[1], 0)
    assert dev.need_interrupt() is True


def test_harvest_rechecks_after_rearm(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry posted between our used.idx read and the used_event store is not lost."""
    _mem, vq, dev = make_queue(8, event_idx=True)
    a = vq.add([(0x100, 1)], [], token="a")
    b = vq.add([(0x100, 1)], [], token="b")
    vq.publish()
    dev.pop_all()
    dev.push(a, 0)
    fences = []
    real_fence = vqmod.full_fence

    def racing_fence() -> None:
        real_fence()
        if not fences:  # the device completes b while we re-arm; it saw the old used_event
            dev.push(b, 0)
        fences.append(1)

    monkeypatch.setattr(vqmod, "full_fence", racing_fence)
    assert [c.token for c in vq.harvest()] == ["a", "b"]
    assert vq.in_flight == 0 and vq.has_used() is False
    assert vq.harvest_all() == []


# --------------------------------------------------------------------------- hostile device
def test_bogus_head_ids_are_counted_and_skipped() -> None:
    _mem, vq, dev = make_queue(8)
    h = vq.add([(0x100, 1)], [(0x200, 8)], token="t")
    vq.publish()
    dev.pop_all()
    dev.push(8, 8)  # id >= size
    dev.push(60000, 8)
    dev.push((h + 1) % 8, 8)  # never submitted
    dev.push(h, 8)
    dev.push(h, 8)  # double completion
    assert vq.harvest() == [Completion(h, 8, 8, "t")]
    assert vq.bogus_completions == 4
    assert vq.num_free == 8 and vq.in_flight == 0
    # the free list is not corrupted: the whole queue can be filled with distinct heads
    heads = [vq.add([(0x100, 1)], []) for _ in range(8)]
    assert sorted(heads) == list(range(8))
    with pytest.raises(QueueFull):
        vq.add([(0x100, 1)], [])


def test_double_completion_after_reuse_is_not_freed_twice() -> None:
    _mem, vq, dev = make_queue(4)
    h = vq.add([(0x100, 1), (0x100, 1)], [], token="x")
    vq.publish()
    dev.pop_all()
    dev.push(h, 0)
    assert len(vq.harvest()) == 1
    dev.push(h, 0)  # stale duplicate
    assert vq.harvest() == []
    assert vq.bogus_completions == 1
    assert vq.num_free == 4


def test_overlong_used_len_is_reported() -> None:
    _mem, vq, dev = make_queue(8)
    h = vq.add([(0x100, 16)], [(0x200, 16), (0x300, 32)], token="r")
    vq.publish()
    dev.pop_all()
    dev.push(h, 49)
    (c,) = vq.harvest()
    assert c == Completion(h, 49, 48, "r") and c.overlong
    assert vq.overlong_completions == 1
    assert vq.num_free == 8  # still reclaimed exactly once


def test_used_idx_overrun_resyncs() -> None:
    _mem, vq, dev = make_queue(8)
    heads = [vq.add([(0x100, 1)], [(0x200, 4)], token=i) for i in range(4)]
    vq.publish()
    dev.pop_all()
    for i, h in enumerate(heads):
        dev.push(h, i)
    # device claims 4 + 100 entries
    dev.used_idx = (dev.used_idx + 100) & 0xFFFF
    dev.put16(dev.used + 2, dev.used_idx)
    done = vq.harvest()
    # exactly `size` slots examined: 4 real entries, 4 stale (zeroed: head 0 again) + the
    # overrun itself
    assert vq.idx_overruns == 1 and vq.bogus_completions == 1 + 4
    assert vq.last_used_idx == dev.used_idx
    assert sorted(c.token for c in done) == [0, 1, 2, 3]
    assert vq.num_free == 8 and not vq.has_used()
    # queue keeps working after the resync
    h = vq.add([(0x100, 1)], [], token="after")
    vq.publish()
    assert dev.pop_all()[0][0] == h
    dev.push(h, 0)
    assert [c.token for c in vq.harvest()] == ["after"]


def test_runaway_device_cannot_trap_harvest(monkeypatch: pytest.MonkeyPatch) -> None:
    _mem, vq, dev = make_queue(4, event_idx=True)
    vq.add([(0x100, 1)], [], token="x")
    vq.publish()

    def runaway_fence() -> None:  # device posts a junk entry every time we look away
        dev.push(7, 0)

    monkeypatch.setattr(vqmod, "full_fence", runaway_fence)
    dev.push(9, 0)
    assert vq.harvest() == []  # returns, bounded by in_flight + size entries
    assert vq.bogus_completions >= 1
    assert vq.in_flight == 1


# --------------------------------------------------------------------------- indirect
def test_indirect_chain() -> None:
    mem, vq, dev = make_queue(4, indirect=True, extra=4096)
    table_off = vq.total_bytes + 256
    readable = [(0x10, 40), (0x20, 8)]
    writable = [(0x30, 16), (0x40, 1 << 17)]
    h = vq.add(readable, writable, token="ind", indirect_table=(table_off, table_off))
    assert vq.num_free == 3  # one ring descriptor for a 4-buffer chain
    addr, length, flags, _nxt = DESC.unpack_from(mem, vq.desc_offset + 16 * h)
    assert (addr, length, flags) == (table_off, 64, VRING_DESC_F_INDIRECT)
    vq.publish()
    ((got, chain),) = dev.pop_all()
    assert got == h
    assert chain == [(a, n, False) for a, n in readable] + [(a, n, True) for a, n in writable]
    # table entries link 0 -> 1 -> 2 -> 3
    links = [DESC.unpack_from(mem, table_off + 16 * i)[2:] for i in range(4)]
    assert links == [(1, 1), (1, 2), (3, 3), (2, 0)]
    dev.push(h, 100)
    assert vq.harvest() == [Completion(h, 100, 16 + (1 << 17), "ind")]
    assert vq.num_free == 4


def test_indirect_allows_chains_beyond_free_ring_descriptors() -> None:
    _mem, vq, dev = make_queue(4, indirect=True, extra=8192)
    base = vq.total_bytes
    heads = [
        vq.add(
            [(0x10, 1)] * 2, [(0x20, 1)] * 2, token=i, indirect_table=(base + 64 * i, base + 64 * i)
        )
        for i in range(4)
    ]
    assert vq.num_free == 0
    with pytest.raises(QueueFull):
        vq.add([(0x10, 1)], [], indirect_table=(base + 512, base + 512))
    vq.publish()
    assert [len(c) for _h, c in dev.pop_all()] == [4, 4, 4, 4]
    for h in reversed(heads):
        dev.push(h, 2)
    assert [c.token for c in vq.harvest()] == [3, 2, 1, 0]


def test_indirect_requires_negotiation_and_bounds() -> None:
    _mem, vq, _dev = make_queue(4, indirect=False)
    with pytest.raises(ValueError):
        vq.add([(0x10, 1)], [], indirect_table=(4096, 4096))
    _mem, vq, _dev = make_queue(4, indirect=True)
    with pytest.raises(ValueError):  # table would run past the end of memory
        vq.add([(0x10, 1)], [(0x20, 1)], indirect_table=(vq.total_bytes - 16, 0))
    assert vq.num_free == 4 and vq.in_flight == 0


# --------------------------------------------------------------------------- misc API
def test_abandon_all_returns_tokens_and_resets() -> None:
    _mem, vq, dev = make_queue(8)
    for i in range(3):
        vq.add([(0x100, 1)], [(0x200, 1)], token=f"t{i}")
    vq.publish()
    dev.pop_all()
    dev.push(0, 1)  # a completion that will never be looked at
    vq.add([(0x100, 1)], [], token="unpublished")
    assert sorted(vq.abandon_all()) == ["t0", "t1", "t2", "unpublished"]
    assert vq.num_free == 8 and vq.in_flight == 0 and not vq.has_used()
    assert vq.publish() is False
    assert vq.harvest() == []


def test_end_to_end_in_guest_memory() -> None:
    """Real memfd memory, GPAs != offsets, buffers from the allocator, bytes round-trip."""
    with GuestMemory(256 * 1024) as gm:
        vq = SplitVirtqueue(gm.view, 0, 64, event_idx=True, indirect=True)
        alloc = BufferAllocator(vq.total_bytes, gm.size)
        dev = DeviceSim(gm.view, vq, gpa_base=gm.gpa_base)
        pending = {}
        for i in range(40):
            req = alloc.alloc(32)
            rep = alloc.alloc(64)
            assert req is not None and rep is not None
            gm.view[req : req + 32] = bytes([i]) * 32
            table = None
            if i % 2:
                t = alloc.alloc(32)
                assert t is not None
                table = (t, gm.gpa(t))
            h = vq.add(
                [(gm.gpa(req), 32)],
                [(gm.gpa(rep), 64)],
                token=(i, req, rep, table),
                indirect_table=table,
            )
            pending[h] = i
        assert vq.publish() is True
        for head, chain in dev.pop_all():
            (ra, rl, _), (wa, wl, _) = chain
            data = bytes(gm.view[dev.off(ra, rl) : dev.off(ra, rl) + rl])
            reply = data[::-1] + b"!" * 8
            o = dev.off(wa, wl)
            gm.view[o : o + len(reply)] = reply
            dev.push(head, len(reply))
        results = vq.harvest()
        assert len(results) == 40
        for c in results:
            i, req, rep, table = c.token
            assert pending.pop(c.head) == i
            assert bytes(gm.view[rep : rep + c.used_len]) == bytes([i]) * 32 + b"!" * 8
            for off in (req, rep) + ((table[0],) if table else ()):
                alloc.free(off)
        assert alloc.allocations == 0 and alloc.extents() == [(alloc.start, alloc.end)]
        del vq, dev  # the queue holds gm.view itself, which close() releases


def test_queue_after_memory_close_fails_cleanly() -> None:
    gm = GuestMemory(64 * 1024)
    vq = SplitVirtqueue(gm.view, 0, 8, event_idx=False)
    # A live queue keeps the memory mapped: closing it under the queue is refused.
    with pytest.raises(BufferError):
        gm.close()
    vq.release()
    gm.close()
    with pytest.raises((ValueError, TypeError)):  # released view, not a segfault
        vq.add([(0x100, 1)], [])
    with pytest.raises(ValueError):
        vq.harvest()


_WATCHER = """
import mmap, sys, time
fd, size, word, seconds = (int(a) for a in sys.argv[1:5])
words = memoryview(mmap.mmap(fd, size)).cast("H")
seen = set()
deadline = time.monotonic() + seconds
sys.stdout.write("ready\\n"); sys.stdout.flush()
while time.monotonic() < deadline:
    for _ in range(1000):
        seen.add(words[word])
print(sorted(seen))
"""


def test_ring_indices_are_stored_whole() -> None:
    """The device (another process) never sees an avail.idx that is neither the old nor
    the new value. struct.pack_into zeroes a field before writing it byte by byte; a
    daemon once read avail.idx as 0 in that window and exited ("Guest moved used index
    from 52859 to 0")."""
    gm = GuestMemory(64 * 1024)
    vq = SplitVirtqueue(gm.view, 0, 8, event_idx=False, start_idx=1)
    word = (vq.avail_offset + 2) // 2
    watcher = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(gm.fd), str(gm.size), str(word), "3"],
        pass_fds=(gm.fd,), stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline() == "ready\n"
        published = 1
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and published < 60000:
            for _ in range(100):
                vq.add([(0x1000, 16)], [])
                vq.publish()
                vq.abandon_all()  # the watcher never completes anything: take them back
                published += 1
        seen = set(json.loads(watcher.stdout.readline()))
    finally:
        watcher.kill()
        watcher.wait()
        vq.release()
        gm.close()
    assert seen, "the watcher saw nothing"
    assert seen <= set(range(1, published + 1)), sorted(seen - set(range(1, published + 1)))[:5]


# --------------------------------------------------------------------------- stateful
QSIZE = 8
TABLE_AREA = 8 * 16 * QSIZE


class VirtqueueMachine(RuleBasedStateMachine):
    """Random add / device-consume / complete-in-any-order / harvest interleavings.

    A reference model mirrors the queue's rules (an entry is a completion iff its head is
    in flight when harvested) so bogus entries can be mixed in and still checked exactly.
    """

    @initialize(event_idx=st.booleans(), start=st.sampled_from([0, 1, 32767, 65530, 65535]))
    def setup(self, event_idx: bool, start: int) -> None:
        total = SplitVirtqueue.layout(QSIZE)[3]
        self.mem = memoryview(bytearray(total + TABLE_AREA))
        self.vq = SplitVirtqueue(
            self.mem, 0, QSIZE, event_idx=event_idx, indirect=True, start_idx=start
        )
        self.dev = DeviceSim(self.mem, self.vq)
        self.tables = BufferAllocator(total, total + TABLE_AREA, 16)
        # head -> (token, descriptors used, writable capacity, chain, indirect table)
        self.inflight: dict[int, tuple] = {}
        self.unpublished: list[int] = []
        self.held: list[int] = []  # popped by the device, not completed
        self.completed_tokens: set[object] = set()
        self.next_token = 0
        self.bogus = 0

    @rule(
        nread=st.integers(0, 4),
        nwrite=st.integers(0, 4),
        use_table=st.booleans(),
        lens=st.lists(st.integers(1, 2**32 - 1), min_size=8, max_size=8),
    )
    def add(self, nread: int, nwrite: int, use_table: bool, lens: list[int]) -> None:
        n = nread + nwrite
        readable = [(0x1000 * (i + 1), lens[i]) for i in range(nread)]
        writable = [(0x100000 * (i + 1), lens[4 + i]) for i in range(nwrite)]
        table = None
        if use_table and n:
            t = self.tables.alloc(16 * n)
            if t is None:
                return
            table = (t, t)
        token = ("tok", self.next_token)
        needed = 1 if table else n
        if n == 0:
            with pytest.raises(ValueError):
                self.vq.add(readable, writable, token)
            return
        if needed > self.vq.num_free:
            with pytest.raises(QueueFull):
                self.vq.add(readable, writable, token, indirect_table=table)
            if table:
                self.tables.free(table[0])
            return
        head = self.vq.add(readable, writable, token, indirect_table=table)
        assert head not in self.inflight
        chain = [(a, ln, False) for a, ln in readable] + [(a, ln, True) for a, ln in writable]
        cap = sum(ln for _a, ln in writable)
        self.inflight[head] = (token, needed, cap, chain, table)
        self.unpublished.append(head)
        self.next_token += 1

    @rule()
    def publish(self) -> None:
        kicked = self.vq.publish()
        if not self.unpublished:
            assert kicked is False
        self.unpublished.clear()

    @rule()
    def device_pops(self) -> None:
        for head, chain in self.dev.pop_all():
            assert head in self.inflight
            assert chain == self.inflight[head][3]
            self.held.append(head)

    @rule(data=st.data())
    def device_completes(self, data: st.DataObject) -> None:
        if not self.held:
            return
        i = data.draw(st.integers(0, len(self.held) - 1))
        head = self.held.pop(i)
        cap = self.inflight[head][2]
        used_len = data.draw(st.integers(0, cap)) if cap else 0
        self.dev.push(head, used_len)

    @rule(data=st.data())
    def bogus_then_harvest(self, data: st.DataObject) -> None:
        candidates = [h for h in range(QSIZE) if h not in self.inflight]
        bad = data.draw(st.sampled_from([*candidates, QSIZE, 0xFFFF_FFFF]))
        self.dev.push(bad, 1)
        self.bogus += 1
        self.harvest()

    @rule()
    def harvest(self) -> None:
        done = self.vq.harvest()
        for c in done:
            token, _needed, cap, _chain, table = self.inflight.pop(c.head)
            assert c.token == token and c.capacity == cap and c.used_len <= cap
            assert token not in self.completed_tokens
            self.completed_tokens.add(token)
            if table:
                self.tables.free(table[0])
        assert self.vq.bogus_completions == self.bogus
        assert self.vq.overlong_completions == 0

    @precondition(lambda self: hasattr(self, "vq"))
    @invariant()
    def descriptors_conserved(self) -> None:
        in_use = sum(m[1] for m in self.inflight.values())
        assert self.vq.num_free + in_use == QSIZE
        assert self.vq.in_flight == len(self.inflight)

    def teardown(self) -> None:
        if not hasattr(self, "vq"):
            return
        # finish everything: all heads come back exactly once
        self.publish()
        self.device_pops()
        for head in self.held:
            self.dev.push(head, 0)
        self.held.clear()
        self.harvest()
        assert not self.inflight
        assert self.vq.num_free == QSIZE


VirtqueueMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestVirtqueueStateful = VirtqueueMachine.TestCase
