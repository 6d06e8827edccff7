"""Memory a device inside this VM can reach by DMA: hugepages at known physical addresses.

Without an IOMMU a PCI or MMIO device addresses guest-physical memory, so every address
in a ring or descriptor must be physical (DPDK's "IOVA = PA"). Ordinary pages move and are
4 KiB apart in no particular order; a hugepage (2 MiB) is physically contiguous, stays
resident, and its physical address can be read from ``/proc/self/pagemap`` (root only).
Two hugepages that are neighbours in our mapping may be anywhere physically:
:class:`PhysicalLayout` keeps the runs of pages that are physically adjacent and splits a
range at every place where they are not, so a buffer never straddles memory it cannot
prove contiguous.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import mmap
import os
import struct
from collections.abc import Sequence

from pyvirtiofs.hw.guest.errors import (
    GuestDeviceError,
    check_root,
    hugepage_status,
    no_hugepages_error,
)
from pyvirtiofs.hw.memory import unmap

__all__ = ["HugepageMemory", "PhysicalLayout", "read_pagemap"]

SMALL_PAGE = 4096
_PFN_MASK = (1 << 55) - 1
_PRESENT = 1 << 63


class PhysicalLayout:
    """Physical addresses of a region made of equal pages, as runs of adjacent pages.

    ``addresses[i]`` is the physical address of page ``i`` (offset ``i * page_size``).
    Pure arithmetic: no memory is touched, so it is tested on its own.
    """

    __slots__ = ("_phys", "_run_len", "_starts", "page_size", "size")

    def __init__(self, page_size: int, addresses: Sequence[int]) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page size must be a power of two, got {page_size}")
        if not addresses:
            raise ValueError("a region needs at least one page")
        for a in addresses:
            if a < 0 or a % page_size or a + page_size > 1 << 64:
                raise ValueError(f"physical address {a:#x} is not a {page_size:#x}-aligned "
                                 "64-bit page")
        if len(set(addresses)) != len(addresses):
            raise ValueError("two pages at the same physical address")
        self.page_size = page_size
        self.size = page_size * len(addresses)
        starts: list[int] = []  # offset where each run begins
        phys: list[int] = []  # physical address of that offset
        lengths: list[int] = []
        for i, a in enumerate(addresses):
            if phys and phys[-1] + lengths[-1] == a:
                lengths[-1] += page_size
            else:
                starts.append(i * page_size)
                phys.append(a)
                lengths.append(page_size)
        self._starts = starts
        self._phys = phys
        self._run_len = lengths

    @property
    def runs(self) -> list[tuple[int, int, int]]:
        """``(offset, physical address, length)`` of each physically contiguous run."""
        return list(zip(self._starts, self._phys, self._run_len, strict=True))

    def gpa(self, offset: int) -> int:
        """Physical address of ``offset`` (``offset == size``: just past the last page)."""
        if not 0 <= offset <= self.size:
            raise ValueError(f"offset {offset:#x} outside memory of {self.size:#x} bytes")
        if offset == self.size:
            return self._phys[-1] + self._run_len[-1]
        i = bisect.bisect_right(self._starts, offset) - 1
        return self._phys[i] + offset - self._starts[i]

    def dma_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``[offset, offset + length)`` as ``(physical address, length)`` pieces, one per
        physically contiguous run it touches (empty for length 0)."""
        if length < 0 or not 0 <= offset <= self.size - length:
            raise ValueError(f"range [{offset:#x}, +{length:#x}) outside memory of "
                             f"{self.size:#x} bytes")
        out: list[tuple[int, int]] = []
        i = bisect.bisect_right(self._starts, offset) - 1
        while length > 0:
            start, run = self._starts[i], self._run_len[i]
            piece = min(length, start + run - offset)
            out.append((self._phys[i] + offset - start, piece))
            offset += piece
            length -= piece
            i += 1
        return out


def read_pagemap(uva: int, length: int, path: str = "/proc/self/pagemap") -> list[int]:
    """Physical address of every 4 KiB page in ``[uva, uva + length)`` of this process.

    Raises :class:`GuestDeviceError` when a page is not present or the kernel hides the
    frame numbers (they read as 0 without CAP_SYS_ADMIN)."""
    first = uva // SMALL_PAGE
    count = (uva + length + SMALL_PAGE - 1) // SMALL_PAGE - first
    with open(path, "rb", buffering=0) as f:
        f.seek(first * 8)
        raw = f.read(count * 8)
    if len(raw) != count * 8:
        raise GuestDeviceError(errno.EIO, f"short read of {path}")
    out = []
    for (entry,) in struct.iter_unpack("<Q", raw):
        if not entry & _PRESENT:
            raise GuestDeviceError(errno.EFAULT, "a page of device memory is not resident")
        pfn = entry & _PFN_MASK
        if pfn == 0:
            raise GuestDeviceError(
                errno.EPERM, "/proc/self/pagemap hides physical addresses (frame numbers "
                "read as 0): it needs CAP_SYS_ADMIN; run as root")
        out.append(pfn * SMALL_PAGE)
    return out


class HugepageMemory:
    """Hugepages from a ``MFD_HUGETLB`` memfd, mapped shared and populated, with their
    physical addresses: the :class:`~pyvirtiofs.hw.transport.DmaMemory` of a device in
    this VM. ``size`` is rounded up to whole hugepages.

    :attr:`view` follows the same lifetime rules as the vhost-user transport's memory:
    :meth:`close` releases it; a slice still alive makes close raise ``BufferError``.
    Close only after the device was reset: until then it may still write here.
    """

    def __init__(self, size: int) -> None:
        check_root()
        if size <= 0:
            raise ValueError(f"memory size must be positive, got {size}")
        _total, free, page = hugepage_status()
        if page == 0:
            raise GuestDeviceError(errno.ENOTSUP, "this kernel reports no hugepage size "
                                   "(CONFIG_HUGETLBFS): device memory needs hugepages")
        pages = (size + page - 1) // page
        if free < pages:
            raise no_hugepages_error(pages)
        self.page_size = page
        self._size = pages * page
        self._view: memoryview | None = None
        self._mm: mmap.mmap | None = None
        self._closed = False
        fd = os.memfd_create("pyvirtiofs-dma", os.MFD_CLOEXEC | os.MFD_HUGETLB)
        try:
            os.ftruncate(fd, self._size)
            try:
                self._mm = mmap.mmap(fd, self._size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                     mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                raise no_hugepages_error(pages, f"mmap: {exc.strerror}") from None
        finally:
            os.close(fd)
        try:
            self._view = memoryview(self._mm)
            anchor = ctypes.c_char.from_buffer(self._mm)
            self.uva = ctypes.addressof(anchor)
            del anchor
            for i in range(pages):  # fault every page in (MAP_POPULATE may have fallen short)
                self._view[i * page] = 0
            self.layout = PhysicalLayout(page, self._hugepage_addresses(pages))
        except BaseException:
            self.close()
            raise

    def _hugepage_addresses(self, pages: int) -> list[int]:
        small = read_pagemap(self.uva, self._size)
        per = self.page_size // SMALL_PAGE
        out = []
        for i in range(pages):
            first = small[i * per]
            if first % self.page_size or small[i * per + per - 1] != first + self.page_size - \
                    SMALL_PAGE:
                raise GuestDeviceError(errno.EFAULT, f"hugepage {i} at {first:#x} is not one "
                                       "physically contiguous, aligned page")
            out.append(first)
        return out

    # -- DmaMemory --------------------------------------------------------------------------

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise ValueError("device memory is closed")
        return self._view

    @property
    def size(self) -> int:
        return self._size

    def gpa(self, offset: int) -> int:
        return self.layout.gpa(offset)

    def dma_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self.layout.dma_ranges(offset, length)

    # -- lifetime ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unmap (the hugepages go back to the pool). Idempotent; ``BufferError`` while
        a slice of :attr:`view` is alive (call again once it is gone)."""
        if self._closed:
            return
        self._view, self._mm, error = unmap(self._view, self._mm)
        if error is not None:
            raise BufferError("device memory is still exported (a slice of .view is "
                              "alive); release it and call close() again") from error
        self._closed = True

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"runs={len(self.layout.runs)}"
        return f"HugepageMemory(size={self._size:#x}, page={self.page_size:#x}, {state})"
