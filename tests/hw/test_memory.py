"""Unit tests for hw.memory: GuestMemory (memfd region) and BufferAllocator (bookkeeping)."""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from pyvirtiofs.hw.memory import DEFAULT_GPA_BASE, PAGE_SIZE, BufferAllocator, GuestMemory

SIZE = 16 * PAGE_SIZE


# --------------------------------------------------------------------------- GuestMemory
def test_attributes_and_translation() -> None:
    with GuestMemory(SIZE) as gm:
        base = gm.gpa_base
        assert base == DEFAULT_GPA_BASE and gm.size == SIZE
        assert gm.view.nbytes == SIZE and not gm.view.readonly
        assert gm.gpa(0) == base
        assert gm.gpa(SIZE - 1) == base + SIZE - 1
        assert gm.gpa(SIZE) == base + SIZE  # end bound, as in a slice
        for bad in (-1, SIZE + 1):
            with pytest.raises(ValueError):
                gm.gpa(bad)
        assert gm.offset_of(base, SIZE) == 0
        assert gm.offset_of(base + 100, 28) == 100
        assert gm.offset_of(base + SIZE - 1, 1) == SIZE - 1
        assert gm.offset_of(base + SIZE, 0) == SIZE
        for gpa, length in [
            (base - 1, 1),  # starts before
            (base - 1, 2),  # straddles the start
            (base + SIZE - 1, 2),  # straddles the end
            (base + SIZE, 1),  # starts at the end
            (0, 16),  # a zero / truncated address
            (base, SIZE + 1),
            (base, -1),
        ]:
            with pytest.raises(ValueError):
                gm.offset_of(gpa, length)


def test_custom_base_and_validation() -> None:
    with GuestMemory(PAGE_SIZE, gpa_base=0) as gm:
        assert gm.gpa(10) == 10 and gm.offset_of(10, 1) == 10
    with pytest.raises(ValueError):
        GuestMemory(PAGE_SIZE, gpa_base=PAGE_SIZE + 8)  # not page aligned
    with pytest.raises(ValueError):
        GuestMemory(PAGE_SIZE + 1)
    with pytest.raises(ValueError):
        GuestMemory(0)
    with pytest.raises(ValueError):
        GuestMemory(PAGE_SIZE, gpa_base=1 << 64)  # past the 64-bit address space


def test_fd_is_really_shared() -> None:
    with GuestMemory(SIZE) as gm:
        other = mmap.mmap(gm.fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            gm.view[PAGE_SIZE : PAGE_SIZE + 5] = b"hello"
            assert other[PAGE_SIZE : PAGE_SIZE + 5] == b"hello"
            other[SIZE - 3 :] = b"xyz"
            assert bytes(gm.view[SIZE - 3 :]) == b"xyz"
            assert os.pread(gm.fd, 5, PAGE_SIZE) == b"hello"  # the file itself, not a copy
            assert os.fstat(gm.fd).st_size == SIZE
        finally:
            other.close()


def test_uva_is_the_mapping_address() -> None:
    with GuestMemory(SIZE) as gm:
        assert gm.uva % PAGE_SIZE == 0
        gm.view[123:130] = b"uvaprob"
        assert ctypes.string_at(gm.uva + 123, 7) == b"uvaprob"
        ctypes.memmove(gm.uva + 4000, b"back", 4)
        assert bytes(gm.view[4000:4004]) == b"back"


def test_memfd_is_sealed_against_resizing() -> None:
    with GuestMemory(SIZE) as gm:
        with pytest.raises(PermissionError):
            os.ftruncate(gm.fd, PAGE_SIZE)  # a device shrinking it would SIGBUS us
        with pytest.raises(PermissionError):
            os.ftruncate(gm.fd, 2 * SIZE)
    with GuestMemory(SIZE, seal=False) as gm:
        os.ftruncate(gm.fd, 2 * SIZE)


def test_fd_is_cloexec() -> None:
    with GuestMemory(PAGE_SIZE) as gm:
        assert not os.get_inheritable(gm.fd)


def test_close_is_idempotent_and_releases_everything() -> None:
    gm = GuestMemory(SIZE)
    fd = gm.fd
    view = gm.view
    gm.close()
    assert gm.closed
    gm.close()
    gm.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ValueError):
        view[0]
    for attr in ("view", "fd", "uva"):
        with pytest.raises(ValueError):
            getattr(gm, attr)
    assert gm.size == SIZE  # plain facts stay readable
    assert "closed" in repr(gm)


def test_close_with_live_slice_raises_then_succeeds() -> None:
    gm = GuestMemory(SIZE)
    fd = gm.fd
    piece = gm.view[10:20]
    piece[:] = b"0123456789"
    with pytest.raises(BufferError):
        gm.close()
    assert not gm.closed
    with pytest.raises(OSError):
        os.fstat(fd)  # the fd is closed anyway
    assert bytes(piece) == b"0123456789"  # the slice still points at mapped memory
    piece.release()
    gm.close()
    assert gm.closed


def test_context_manager_closes_on_error() -> None:
    with pytest.raises(RuntimeError), GuestMemory(PAGE_SIZE) as gm:
        raise RuntimeError("boom")
    assert gm.closed


# --------------------------------------------------------------------------- BufferAllocator
def test_allocator_basics() -> None:
    a = BufferAllocator(0, 1024, alignment=64)
    assert (a.start, a.end, a.capacity, a.alignment) == (0, 1024, 1024, 64)
    x = a.alloc(1)
    y = a.alloc(64)
    z = a.alloc(65)
    assert (x, y, z) == (0, 64, 128)
    assert a.size_of(z) == 128
    assert a.bytes_in_use == 256 and a.bytes_free == 768 and a.allocations == 3
    assert a.largest_free == 768
    assert a.alloc(769) is None  # not now
    with pytest.raises(ValueError):
        a.alloc(1025)  # never
    with pytest.raises(ValueError):
        a.alloc(0)
    a.free(y)
    with pytest.raises(ValueError):
        a.free(y)  # double free
    with pytest.raises(ValueError):
        a.free(x + 1)  # not an allocation start
    with pytest.raises(ValueError):
        a.free(5000)
    with pytest.raises(ValueError):
        a.size_of(y)
    a.check_invariants()


def test_allocator_rounds_range_inward() -> None:
    a = BufferAllocator(10, 1000, alignment=64)
    assert (a.start, a.end) == (64, 960)
    assert a.alloc(896) == 64
    assert a.alloc(1) is None
    with pytest.raises(ValueError):
        BufferAllocator(10, 60, alignment=64)  # no aligned byte inside
    with pytest.raises(ValueError):
        BufferAllocator(0, 1024, alignment=48)


def test_allocator_exhaustion_and_recovery() -> None:
    a = BufferAllocator(0, 64 * 16)
    offs = [a.alloc(64) for _ in range(16)]
    assert None not in offs and len(set(offs)) == 16
    assert a.alloc(1) is None and a.largest_free == 0 and a.bytes_free == 0
    a.free(offs[7])
    assert a.alloc(65) is None  # one 64-byte hole is not enough
    assert a.alloc(64) == offs[7]


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2), (1, 2, 0), (0, 2, 1)])
def test_allocator_coalesces_neighbours(order: tuple[int, int, int]) -> None:
    a = BufferAllocator(0, 4096)
    offs = [a.alloc(128) for _ in range(3)]
    tail = a.alloc(4096 - 3 * 128)  # fill the rest so only our frees make free space
    assert a.extents() == []
    for i in order:
        a.free(offs[i])
        a.check_invariants()
    assert a.extents() == [(0, 384)]
    a.free(tail)
    assert a.extents() == [(0, 4096)]


def test_allocator_best_fit() -> None:
    a = BufferAllocator(0, 64 * 10)
    offs = [a.alloc(64) for _ in range(10)]
    # holes of 3, 1 and 2 blocks
    for i in (0, 1, 2, 4, 6, 7):
        a.free(offs[i])
    assert a.alloc(64) == offs[4]  # exact fit, not the first hole
    assert a.alloc(128) == offs[6]
    assert a.alloc(192) == offs[0]


def test_allocator_random_churn_never_leaks() -> None:
    rng = random.Random(1234)
    a = BufferAllocator(4096, 4096 + (1 << 20))
    live: dict[int, int] = {}
    for step in range(20_000):
        if live and (rng.random() < 0.5 or a.largest_free < 64):
            off = rng.choice(list(live)) if step % 7 else next(iter(live))
            a.free(off)
            del live[off]
        else:
            size = rng.choice([1, 64, 100, 4096, 4160, 65536, 131072, rng.randint(1, 300_000)])
            off = a.alloc(size)
            rounded = (size + 63) & ~63
            if off is None:
                assert a.largest_free < rounded
                continue
            assert off % 64 == 0 and a.start <= off and off + rounded <= a.end
            live[off] = rounded
        if step % 1000 == 0:
            a.check_invariants()
            spans = sorted(live.items())
            for (o1, n1), (o2, _n2) in itertools.pairwise(spans):
                assert o1 + n1 <= o2
    for off in list(live):
        a.free(off)
    assert a.extents() == [(a.start, a.end)]
    assert a.bytes_free == a.capacity and a.allocations == 0


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free sequences against a byte-exact model of ownership."""

    START, END, ALIGN = 128, 128 + 64 * 40, 64
    live = Bundle("live")

    def __init__(self) -> None:
        super().__init__()
        self.a = BufferAllocator(self.START, self.END, self.ALIGN)
        self.owned: dict[int, int] = {}  # offset -> rounded size
        self.freed: set[int] = set()

    @rule(target=live, size=st.integers(1, 64 * 12))
    def alloc(self, size: int) -> int:
        rounded = (size + self.ALIGN - 1) & ~(self.ALIGN - 1)
        largest = self.a.largest_free
        off = self.a.alloc(size)
        if off is None:
            assert largest < rounded
            return -1
        assert largest >= rounded
        assert off % self.ALIGN == 0 and self.START <= off and off + rounded <= self.END
        for o, n in self.owned.items():  # no overlap with any live allocation
            assert off + rounded <= o or o + n <= off
        self.owned[off] = rounded
        self.freed.discard(off)
        return off

    @rule(off=consumes(live))
    def free(self, off: int) -> None:
        if off == -1 or off not in self.owned:
            with pytest.raises(ValueError):
                self.a.free(off)
            return
        self.a.free(off)
        del self.owned[off]
        self.freed.add(off)

    @rule(data=st.data())
    def double_free(self, data: st.DataObject) -> None:
        if not self.freed:
            return
        off = data.draw(st.sampled_from(sorted(self.freed)))
        with pytest.raises(ValueError):
            self.a.free(off)

    @invariant()
    def consistent(self) -> None:
        self.a.check_invariants()
        assert self.a.bytes_in_use == sum(self.owned.values())
        assert self.a.allocations == len(self.owned)

    def teardown(self) -> None:
        for off in list(self.owned):
            self.a.free(off)
        assert self.a.extents() == [(self.START, self.END)]


AllocatorMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None
)
TestAllocatorStateful = AllocatorMachine.TestCase
