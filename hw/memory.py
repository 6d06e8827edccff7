"""Guest memory shared with the virtio device, and a bookkeeping allocator over it.

We play the VM's part toward a vhost-user device: everything the device touches (rings,
request and reply buffers) must live in memory the device can map itself. That is a memfd:
we send its fd with SET_MEM_TABLE, the daemon mmaps it, and both sides see the same pages.

Addresses come in three flavours and mixing them up is the classic bug:

* offset -- index into :attr:`GuestMemory.view` (what Python code uses to copy bytes);
* GPA    -- guest-physical address = ``gpa_base + offset`` (what goes into descriptors);
* UVA    -- this process's virtual address of the mapping (what vhost-user wants in the
  memory table and in SET_VRING_ADDR, which the daemon translates via the table).

:class:`BufferAllocator` hands out offsets only; it never touches memory, so it can be
unit-tested without a mapping and reused for any transport.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import itertools
import mmap
import os
from types import TracebackType

__all__ = ["DEFAULT_GPA_BASE", "PAGE_SIZE", "BufferAllocator", "GuestMemory", "unmap"]

PAGE_SIZE: int = mmap.PAGESIZE
#: 1 GiB: far from 0 so that a zeroed or truncated address in a descriptor never lands in
#: the region by accident (the device then rejects it instead of reading our rings).
DEFAULT_GPA_BASE: int = 0x4000_0000
_U64_LIMIT = 1 << 64


class GuestMemory:
    """A memfd-backed, MAP_SHARED region that stands in for a VM's RAM.

    The region is sealed against resizing by default (``F_SEAL_SHRINK | F_SEAL_GROW``):
    the device holds the fd, and a device that truncated the memfd would make every access
    from this process die with SIGBUS. QEMU seals its memfd backend the same way, and the
    seals do not affect the device's read/write mapping.

    Lifetime: :attr:`view` is a single memoryview owned by this object. Pass *that object*
    (not a slice of it) to long-lived users such as ``SplitVirtqueue``: :meth:`close`
    releases it, after which any further access through it raises ``ValueError`` (or
    ``TypeError`` from ``struct.pack_into``) instead of touching unmapped memory.
    Short-lived slices are fine; a slice still alive at :meth:`close` time makes close
    raise ``BufferError`` (the mapping stays valid for that slice, is unmapped once it is
    gone, and close may be called again).
    """

    __slots__ = ("_closed", "_fd", "_gpa_base", "_mm", "_size", "_uva", "_view")

    def __init__(
        self,
        size: int,
        gpa_base: int = DEFAULT_GPA_BASE,
        *,
        name: str = "pyvirtiofs-guest",
        seal: bool = True,
    ) -> None:
        """Create the memfd, size it to ``size`` bytes and map it read/write, shared.

        ``size`` and ``gpa_base`` must be multiples of the page size: vhost-user memory
        regions are mapped page-wise by the device, and an unaligned base would make the
        device's ``gpa - base`` arithmetic and ours disagree about alignment.
        """
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"size must be a positive multiple of {PAGE_SIZE}, got {size}")
        if gpa_base < 0 or gpa_base % PAGE_SIZE:
            raise ValueError(f"gpa_base must be page aligned and >= 0, got {gpa_base:#x}")
        if gpa_base + size > _U64_LIMIT:
            raise ValueError("region does not fit in a 64-bit guest-physical address space")
        self._closed = False
        self._size = size
        self._gpa_base = gpa_base
        self._view: memoryview | None = None
        self._mm: mmap.mmap | None = None
        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seal else 0)
        self._fd = os.memfd_create(name, flags)
        try:
            os.ftruncate(self._fd, size)
            if seal:
                fcntl.fcntl(
                    self._fd,
                    fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
                )
            self._mm = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._uva = _mapping_address(self._mm)
            self._view = memoryview(self._mm)
        except BaseException:
            if self._mm is not None:
                self._mm.close()
            os.close(self._fd)
            self._closed = True
            raise

    # -- attributes ------------------------------------------------------------------
    @property
    def fd(self) -> int:
        """The memfd (CLOEXEC); send it to the device, do not close it yourself."""
        self._check_open()
        return self._fd

    @property
    def size(self) -> int:
        """Region size in bytes."""
        return self._size

    @property
    def gpa_base(self) -> int:
        """Guest-physical address of offset 0."""
        return self._gpa_base

    @property
    def view(self) -> memoryview:
        """Writable memoryview (format 'B') of the whole region; see class doc on lifetime."""
        self._check_open()
        assert self._view is not None
        return self._view

    @property
    def uva(self) -> int:
        """Address of the mapping in this process (vhost-user ``userspace_addr``)."""
        self._check_open()
        return self._uva

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has completed."""
        return self._closed

    # -- address translation ---------------------------------------------------------
    def gpa(self, offset: int) -> int:
        """Guest-physical address of ``offset``; ``offset == size`` (end bound) is allowed."""
        if not 0 <= offset <= self._size:
            raise ValueError(f"offset {offset:#x} outside guest memory of {self._size:#x} bytes")
        return self._gpa_base + offset

    def dma_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``[offset, offset + length)`` as the device addresses it: one piece, since a
        memfd region is contiguous in the guest-physical space we give it."""
        if length < 0 or not 0 <= offset <= self._size - length:
            raise ValueError(f"range [{offset:#x}, +{length:#x}) outside guest memory")
        return [(self._gpa_base + offset, length)]

    def offset_of(self, gpa: int, length: int) -> int:
        """Offset of ``gpa``, checking that ``[gpa, gpa + length)`` lies inside the region.

        Use this on every address that comes back from the device or from a caller before
        touching memory: a range that only starts inside the region is rejected too.
        """
        if length < 0:
            raise ValueError(f"negative length {length}")
        off = gpa - self._gpa_base
        if off < 0 or off + length > self._size:
            raise ValueError(
                f"guest range [{gpa:#x}, +{length:#x}) outside "
                f"[{self._gpa_base:#x}, {self._gpa_base + self._size:#x})"
            )
        return off

    # -- lifetime --------------------------------------------------------------------
    def close(self) -> None:
        """Release the view, unmap, close the fd. Idempotent.

        Raises ``BufferError`` if slices of :attr:`view` (or other buffer exports of the
        mapping) are still alive; the fd is closed anyway, and the mapping stays valid for
        those holders until they let go (calling close again then finishes the job).
        """
        if self._closed:
            return
        self._view, self._mm, error = unmap(self._view, self._mm)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if error is not None:
            raise BufferError(
                "guest memory is still exported (a slice of .view or a from_buffer object is "
                "alive); release it and call close() again"
            ) from error
        self._closed = True

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd} uva={self._uva:#x}"
        return f"GuestMemory(size={self._size:#x}, gpa_base={self._gpa_base:#x}, {state})"

    def _check_open(self) -> None:
        if self._closed or self._mm is None:
            raise ValueError("guest memory is closed")


def unmap(view: memoryview | None, mm: mmap.mmap | None,
          ) -> tuple[memoryview | None, mmap.mmap | None, BufferError | None]:
    """Release ``view``, then unmap ``mm``. What is still held comes back with the error
    that kept it (a slice of the view, or another export of the mapping, is alive: the
    mapping stays valid for its holders and a second call finishes the job)."""
    if view is not None:
        try:
            view.release()
        except BufferError:
            pass  # the view itself is exported; mm.close() below reports it
        else:
            view = None
    error: BufferError | None = None
    if mm is not None:
        try:
            mm.close()
        except BufferError as exc:
            error = exc
        else:
            mm = None
    return view, mm, error


def _mapping_address(mm: mmap.mmap) -> int:
    """Address of an mmap in this process.

    ``c_char.from_buffer`` exports the mmap's buffer (which would pin it: mmap.close()
    refuses while exports exist). The ctypes object is dropped before returning, which
    releases the export at once (refcounting); the address stays valid because an mmap
    never moves while it is mapped.
    """
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


class BufferAllocator:
    """Offset allocator for request/reply buffers in ``[start, end)`` of guest memory.

    Pure bookkeeping: no memory access, no locking (one owner, the device actor, calls it).
    Best fit over free extents, coalescing neighbours on free, so that after everything is
    freed exactly one extent covering the whole range remains (checked by the tests).

    Data structures (all O(log n) search + list memmove, n = number of free extents, which
    stays around the number of buffers in flight):

    * ``_fstart`` / ``_fend``: free extents sorted by address (for neighbour coalescing);
    * ``_by_size``: ``(size, start)`` tuples sorted by size (best fit = first ``>= need``;
      ties go to the lowest address, which keeps the heap compact);
    * ``_used``: offset -> rounded size of live allocations.

    Every size is rounded up to ``alignment`` (64 = a cache line by default), and the range
    itself is shrunk inward to aligned bounds (see :attr:`start`, :attr:`end`).
    """

    __slots__ = (
        "_align_mask",
        "_by_size",
        "_end",
        "_fend",
        "_free_bytes",
        "_fstart",
        "_start",
        "_used",
    )

    def __init__(self, start: int, end: int, alignment: int = 64) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        mask = alignment - 1
        if start < 0:
            raise ValueError(f"negative start {start}")
        start = (start + mask) & ~mask
        end &= ~mask
        if end <= start:
            raise ValueError("range holds no aligned bytes")
        self._align_mask = mask
        self._start = start
        self._end = end
        self._fstart: list[int] = [start]
        self._fend: list[int] = [end]
        self._by_size: list[tuple[int, int]] = [(end - start, start)]
        self._used: dict[int, int] = {}
        self._free_bytes = end - start

    # -- hot path --------------------------------------------------------------------
    def alloc(self, size: int) -> int | None:
        """Return the offset of ``size`` bytes (rounded up to the alignment), or None.

        None means "not now": wait for frees (back-pressure). A request larger than the
        whole range can never succeed and raises ``ValueError`` instead, so a caller never
        waits forever for it.
        """
        if size <= 0:
            raise ValueError(f"allocation size must be positive, got {size}")
        mask = self._align_mask
        need = (size + mask) & ~mask
        by_size = self._by_size
        i = bisect.bisect_left(by_size, (need,))
        if i == len(by_size):
            if need > self._end - self._start:
                raise ValueError(f"{size} bytes can never fit in {self._end - self._start}")
            return None
        ext_size, ext_start = by_size.pop(i)
        j = bisect.bisect_left(self._fstart, ext_start)
        if ext_size == need:
            del self._fstart[j]
            del self._fend[j]
        else:
            rest = ext_start + need
            self._fstart[j] = rest
            bisect.insort(by_size, (ext_size - need, rest))
        self._used[ext_start] = need
        self._free_bytes -= need
        return ext_start

    def free(self, offset: int) -> None:
        """Return an allocation; ``ValueError`` on double free or an unknown offset."""
        need = self._used.pop(offset, 0)
        if not need:
            raise ValueError(f"free of {offset:#x}: not allocated (double free or bad offset)")
        end = offset + need
        fstart, fend, by_size = self._fstart, self._fend, self._by_size
        j = bisect.bisect_left(fstart, offset)
        merge_left = j > 0 and fend[j - 1] == offset
        merge_right = j < len(fstart) and fstart[j] == end
        if merge_left:
            left = fstart[j - 1]
            del by_size[bisect.bisect_left(by_size, (offset - left, left))]
            if merge_right:
                right_end = fend[j]
                del by_size[bisect.bisect_left(by_size, (right_end - end, end))]
                fend[j - 1] = right_end
                del fstart[j]
                del fend[j]
            else:
                right_end = end
                fend[j - 1] = end
            bisect.insort(by_size, (right_end - left, left))
        elif merge_right:
            right_end = fend[j]
            del by_size[bisect.bisect_left(by_size, (right_end - end, end))]
            fstart[j] = offset
            bisect.insort(by_size, (right_end - offset, offset))
        else:
            fstart.insert(j, offset)
            fend.insert(j, end)
            bisect.insort(by_size, (need, offset))
        self._free_bytes += need

    # -- introspection ---------------------------------------------------------------
    @property
    def start(self) -> int:
        """First usable offset (``start`` rounded up to the alignment)."""
        return self._start

    @property
    def end(self) -> int:
        """End of the usable range (``end`` rounded down to the alignment)."""
        return self._end

    @property
    def capacity(self) -> int:
        """Total usable bytes."""
        return self._end - self._start

    @property
    def alignment(self) -> int:
        return self._align_mask + 1

    @property
    def bytes_free(self) -> int:
        return self._free_bytes

    @property
    def bytes_in_use(self) -> int:
        """Bytes handed out, counting the rounding up to the alignment."""
        return self._end - self._start - self._free_bytes

    @property
    def allocations(self) -> int:
        """Number of live allocations."""
        return len(self._used)

    @property
    def largest_free(self) -> int:
        """Largest single allocation that would succeed right now."""
        return self._by_size[-1][0] if self._by_size else 0

    def size_of(self, offset: int) -> int:
        """Rounded size of the live allocation at ``offset``."""
        try:
            return self._used[offset]
        except KeyError:
            raise ValueError(f"{offset:#x} is not allocated") from None

    def extents(self) -> list[tuple[int, int]]:
        """Free extents as ``(start, end)`` pairs in address order (a copy)."""
        return list(zip(self._fstart, self._fend, strict=True))

    def check_invariants(self) -> None:
        """Assert the internal structures agree (for tests and debugging; O(n log n))."""
        ext = self.extents()
        assert sorted(ext) == ext
        for (_s0, e0), (s1, _e1) in itertools.pairwise(ext):
            assert e0 < s1, "free extents overlap or were not coalesced"
        assert all(s < e for s, e in ext)
        assert sorted((e - s, s) for s, e in ext) == self._by_size
        assert sum(e - s for s, e in ext) == self._free_bytes
        pieces = ext + [(o, o + n) for o, n in self._used.items()]
        pieces.sort()
        cursor = self._start
        for s, e in pieces:
            assert s == cursor, "gap or overlap between free and used extents"
            cursor = e
        assert cursor == self._end

    def __repr__(self) -> str:
        return (
            f"BufferAllocator([{self._start:#x}, {self._end:#x}), free={self._free_bytes}, "
            f"allocations={len(self._used)}, extents={len(self._fstart)})"
        )
