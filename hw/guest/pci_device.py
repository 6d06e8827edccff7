"""The virtio-fs PCI transport: a function claimed, its BAR mapped, INTx through UIO.

:func:`open_pci` finds the function (by PCI address or by tag), checks what would make
userspace DMA wrong or impossible (not root, lockdown, a virtual IOMMU), claims it — bound
to ``uio_pci_generic`` for interrupts, or to no driver for polling; a function held by
another kernel driver only with ``take=True`` — enables memory decoding and bus mastering,
maps the BARs its virtio structures live in and hands :class:`PciRegisters` to
:class:`~pyvirtiofs.hw.guest.virtio.GuestTransport`. Closing resets the device, restores
the command register and gives the function back to the driver it had.

INTx through ``uio_pci_generic``: its handler masks INTx (command bit 10) and counts the
event; :class:`UioInterrupt` consumes the count, reads the ISR (which drops the line) and
clears bit 10 again — the device layer then drains the used rings, so an interrupt that
arrives in between is seen on the next wake-up, never lost.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
from typing import Any, Literal

from pyvirtiofs.hw.guest.errors import (
    GuestDeviceError,
    check_iommu,
    check_lockdown,
    check_root,
)
from pyvirtiofs.hw.guest.pci import (
    CMD_INTX_DISABLE,
    CMD_MASTER,
    CMD_MEMORY,
    PCI_ADDRESS,
    SYSFS_PCI,
    UIO_DRIVER,
    VIRTIO_FS_DEVICE,
    VIRTIO_VENDOR,
    PciFunction,
    VirtioCap,
    VirtioPciCaps,
    list_virtio_fs_functions,
    parse_capabilities,
    read_tag,
    virtiofs_mounts,
)
from pyvirtiofs.hw.guest.virtio import GuestTransport

log = logging.getLogger(__name__)

__all__ = ["Completions", "PciRegisters", "UioInterrupt", "find_pci_function", "open_pci"]

Completions = Literal["auto", "interrupt", "poll"]
NO_VECTOR = 0xFFFF
_IORESOURCE_MEM = 0x200


class _Window:
    """8/16/32-bit accesses to a part of a mapped BAR (one load or store each)."""

    def __init__(self, mm: mmap.mmap, cap: VirtioCap, size: int) -> None:
        if cap.offset + cap.length > size or cap.offset % 4:
            raise GuestDeviceError(errno.EPROTO, f"virtio structure at {cap.offset:#x}+"
                                   f"{cap.length:#x} outside BAR {cap.bar} ({size:#x} bytes)")
        base = memoryview(mm)
        self.b = base[cap.offset:cap.offset + cap.length]
        base.release()
        self.h = self.b[:cap.length & ~1].cast("H")
        self.w = self.b[:cap.length & ~3].cast("I")
        self.length = cap.length

    def release(self) -> None:
        for view in (self.w, self.h, self.b):
            view.release()


class PciRegisters:
    """The common, notify, ISR and device structures of a claimed function (see module
    doc); :meth:`close` undoes everything :func:`open_pci` did to the function."""

    def __init__(self, fn: PciFunction, caps: VirtioPciCaps, *, interrupts: bool,
                 restore: tuple[str | None, str | None] | None) -> None:
        self.fn = fn
        self.caps = caps
        self.name = f"PCI {fn.address}"
        self._restore = restore  # (driver, driver_override) to give the function back to
        self._maps: dict[int, mmap.mmap] = {}
        self._notify_off: dict[int, int] = {}
        self._closed = False
        self.original_command = fn.command()
        self.command = self.original_command | CMD_MEMORY | CMD_MASTER
        if interrupts:
            self.command &= ~CMD_INTX_DISABLE
        else:
            self.command |= CMD_INTX_DISABLE  # polling: never assert a line no one handles
        self._windows: list[_Window] = []
        try:
            sizes = {bar: self._map(bar) for bar in sorted(caps.bars())}
            for c in (caps.common, caps.notify, caps.isr, caps.device):
                self._windows.append(_Window(self._maps[c.bar], c, sizes[c.bar]))
            self.common, self.notify_area, self.isr, self.device = self._windows
            if self.common.length < 0x38 or self.isr.length < 1:
                raise GuestDeviceError(errno.EPROTO, f"{self.name}: common configuration "
                                       f"of {self.common.length} bytes, ISR of "
                                       f"{self.isr.length}")
        except BaseException:
            self._unmap()
            raise
        fn.set_command(self.command)

    def _map(self, bar: int) -> int:
        with open(f"{self.fn.sysdir}/resource") as f:
            lines = f.read().splitlines()
        flags = int(lines[bar].split()[2], 16) if bar < len(lines) else 0
        if not flags & _IORESOURCE_MEM:
            raise GuestDeviceError(errno.ENOTSUP, f"{self.name}: BAR {bar} is not a memory "
                                   "BAR (I/O port BARs are not supported)")
        path = f"{self.fn.sysdir}/resource{bar}"
        fd = os.open(path, os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            try:
                self._maps[bar] = mmap.mmap(fd, size, mmap.MAP_SHARED,
                                            mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                if exc.errno == errno.EPERM:
                    check_lockdown()
                raise GuestDeviceError(exc.errno or errno.EIO, f"cannot map {path}: "
                                       f"{exc.strerror} (a kernel driver holding the "
                                       "function, or kernel lockdown, prevents it)") from None
        finally:
            os.close(fd)
        return size

    # -- DeviceRegisters ---------------------------------------------------------------------

    def status(self) -> int:
        return int(self.common.b[0x14])

    def set_status(self, value: int) -> None:
        self.common.b[0x14] = value

    def device_features(self) -> int:
        w = self.common.w
        w[0x00 >> 2] = 0
        low = w[0x04 >> 2]
        w[0x00 >> 2] = 1
        return int(w[0x04 >> 2]) << 32 | int(low)

    def set_driver_features(self, value: int) -> None:
        w = self.common.w
        w[0x08 >> 2] = 0
        w[0x0C >> 2] = value & 0xFFFF_FFFF
        w[0x08 >> 2] = 1
        w[0x0C >> 2] = value >> 32 & 0xFFFF_FFFF

    def config_generation(self) -> int:
        return int(self.common.b[0x15])

    def read_config(self, offset: int, length: int) -> bytes:
        if offset + length > self.device.length:
            raise GuestDeviceError(errno.EPROTO, f"{self.name}: device configuration of "
                                   f"{self.device.length} bytes, {offset + length} needed")
        b = self.device.b
        return bytes([b[offset + i] for i in range(length)])

    def num_queues(self) -> int:
        return int(self.common.h[0x12 >> 1])

    def queue_max_size(self, index: int) -> int:
        self.common.h[0x16 >> 1] = index
        return int(self.common.h[0x18 >> 1])

    def enable_queue(self, index: int, size: int, desc: int, driver: int, device: int) -> None:
        h, w = self.common.h, self.common.w
        h[0x16 >> 1] = index
        if h[0x1C >> 1]:
            raise GuestDeviceError(errno.EPROTO, f"{self.name}: queue {index} is enabled "
                                   "after a reset")
        h[0x18 >> 1] = size
        h[0x1A >> 1] = NO_VECTOR
        for reg, address in ((0x20, desc), (0x28, driver), (0x30, device)):
            w[reg >> 2] = address & 0xFFFF_FFFF  # low half first
            w[(reg >> 2) + 1] = address >> 32
        notify_off = int(h[0x1E >> 1]) * self.caps.notify_multiplier
        if notify_off + 2 > self.notify_area.length:
            raise GuestDeviceError(errno.EPROTO, f"{self.name}: queue {index} notifies at "
                                   f"{notify_off:#x}, outside the notify structure")
        if notify_off % 2:
            raise GuestDeviceError(errno.EPROTO, f"{self.name}: misaligned notify address")
        self._notify_off[index] = notify_off >> 1
        h[0x1C >> 1] = 1
        if h[0x1C >> 1] != 1:
            raise GuestDeviceError(errno.EPROTO, f"{self.name}: queue {index} did not enable")
        if self.common.h[0x18 >> 1] != size:
            raise GuestDeviceError(errno.EPROTO, f"{self.name}: queue {index} did not take "
                                   f"size {size}")

    def notify(self, index: int) -> None:
        self.notify_area.h[self._notify_off[index]] = index

    def read_isr(self) -> int:
        """Read (and so clear) the interrupt status; this drops INTx."""
        return int(self.isr.b[0])

    def set_intx(self, enabled: bool) -> None:
        self.command = (self.command & ~CMD_INTX_DISABLE if enabled
                        else self.command | CMD_INTX_DISABLE)
        self.fn.set_command(self.command)

    def close(self) -> None:
        """Unmap, restore the command register and the previous driver, unlock."""
        if self._closed:
            return
        self._closed = True
        self._unmap()
        try:
            with contextlib.suppress(OSError):
                self.fn.set_command(self.original_command)
            if self._restore is not None:
                _give_back(self.fn, *self._restore)
        finally:
            self.fn.close_config()


    def _unmap(self) -> None:
        for window in self._windows:
            window.release()
        self._windows.clear()
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()


class UioInterrupt:
    """INTx of a function bound to ``uio_pci_generic`` (see module doc)."""

    def __init__(self, path: str, regs: PciRegisters) -> None:
        self.path = path
        self.regs = regs
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.count = 0
        regs.set_intx(True)

    def fileno(self) -> int:
        return self.fd

    def ack(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.count = int.from_bytes(os.read(self.fd, 4), "little")
        self.regs.read_isr()
        self.regs.set_intx(True)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def find_pci_function(target: str) -> PciFunction:
    """The virtio-fs function at PCI address ``target``, or the one whose tag is
    ``target``; the error lists what there is."""
    if PCI_ADDRESS.match(target):
        try:
            fn = PciFunction(target)
        except FileNotFoundError:
            raise GuestDeviceError(errno.ENODEV, f"no PCI function {target}; virtio-fs "
                                   f"functions here: {_listing()}") from None
        if fn.ids() != (VIRTIO_VENDOR, VIRTIO_FS_DEVICE):
            vendor, device = fn.ids()
            raise GuestDeviceError(errno.ENODEV, f"PCI {fn.address} is {vendor:04x}:"
                                   f"{device:04x}, not a virtio-fs device "
                                   f"({VIRTIO_VENDOR:04x}:{VIRTIO_FS_DEVICE:04x})")
        return fn
    found = list_virtio_fs_functions()
    matches = [f for f in found if f.tag == target]
    if len(matches) > 1:
        raise GuestDeviceError(errno.EINVAL, f"several virtio-fs functions have tag "
                               f"{target!r}: {', '.join(f.address for f in matches)}; name "
                               "one by its PCI address")
    if not matches:
        raise GuestDeviceError(errno.ENODEV, f"no virtio-fs PCI function with tag "
                               f"{target!r}; found: {_listing(found)}")
    return PciFunction(matches[0].address)


def _listing(found: list[Any] | None = None) -> str:
    found = list_virtio_fs_functions() if found is None else found
    return "; ".join(f.describe() for f in found) or "none (is the VM started with " \
        "-device vhost-user-fs-pci,...?)"


def _give_back(fn: PciFunction, driver: str | None, override: str | None) -> None:
    """Return the function to ``driver`` (None: no driver) with ``override`` restored."""
    if fn.driver() == driver and fn.driver_override() == override:
        return
    try:
        fn.unbind()
        fn.set_driver_override(override)
        if driver is not None:
            fn.bind(driver)
    except OSError as exc:
        log.warning("could not give PCI %s back to %s: %s", fn.address, driver or "no driver",
                    exc)


def _claim(fn: PciFunction, completions: Completions, take: bool,
           ) -> tuple[bool, tuple[str | None, str | None] | None]:
    """Bind the function as ``completions`` needs; (interrupts?, what to restore)."""
    current, override = fn.driver(), fn.driver_override()
    if current not in (None, UIO_DRIVER):
        mounted = virtiofs_mounts(_tag_or_none(fn) or "")
        if mounted:
            raise GuestDeviceError(errno.EBUSY, f"PCI {fn.address} is mounted by the kernel's "
                                   f"virtiofs at {', '.join(mounted)}: unmount it first")
        if not take:
            raise GuestDeviceError(
                errno.EBUSY, f"PCI {fn.address} is held by the kernel driver {current}: "
                "pass take=True to let this driver take it (and give it back on close), or "
                f"release it yourself: echo uio_pci_generic > {fn.sysdir}/driver_override; "
                f"echo {fn.address} > {SYSFS_PCI}/drivers/{current}/unbind; "
                f"echo {fn.address} > {SYSFS_PCI}/drivers/{UIO_DRIVER}/bind")
    uio_available = os.path.isdir(f"{SYSFS_PCI}/drivers/{UIO_DRIVER}")
    if completions == "interrupt" and not uio_available and current != UIO_DRIVER:
        raise GuestDeviceError(errno.ENOENT, f"interrupts need the {UIO_DRIVER} driver: "
                               f"modprobe {UIO_DRIVER} (or use completions='poll')")
    wanted = (None if completions == "poll"
              else UIO_DRIVER if completions == "interrupt" or uio_available
              or current == UIO_DRIVER else None)
    if current == wanted:
        return wanted is not None, None
    fn.unbind()
    fn.set_driver_override(wanted or "none")
    if wanted is not None:
        try:
            fn.bind(wanted)
        except GuestDeviceError:
            _give_back(fn, current, override)
            raise
    return wanted is not None, (current, override)


def _tag_or_none(fn: PciFunction) -> str | None:
    try:
        return read_tag(fn)
    except OSError:
        return None


def open_pci(target: str, *, completions: Completions = "auto", take: bool = False,
             **transport_kwargs: Any) -> GuestTransport:
    """Claim the virtio-fs function ``target`` (PCI address or tag) and bring it up.

    ``completions``: ``"interrupt"`` (INTx through uio_pci_generic), ``"poll"`` (no
    driver; the used rings are polled) or ``"auto"`` (interrupts when uio_pci_generic is
    there). ``take``: take the function from another kernel driver (virtio-pci) and give
    it back on close. ``transport_kwargs`` go to :class:`GuestTransport`."""
    if completions not in ("auto", "interrupt", "poll"):
        raise ValueError(f"completions must be auto, interrupt or poll, not {completions!r}")
    check_root()
    check_lockdown()
    fn = find_pci_function(target)
    check_iommu(fn.sysdir)
    fn.lock()
    regs: PciRegisters | None = None
    interrupt: UioInterrupt | None = None
    restore = None
    try:
        caps = parse_capabilities(fn.config())
        interrupts, restore = _claim(fn, completions, take)
        regs = PciRegisters(fn, caps, interrupts=interrupts, restore=restore)
        if interrupts:
            uio = fn.uio_device()
            if uio is None:
                raise GuestDeviceError(errno.ENODEV, f"PCI {fn.address} is bound to "
                                       f"{UIO_DRIVER} but has no /dev/uio node")
            interrupt = UioInterrupt(uio, regs)
        return GuestTransport(regs, interrupt=interrupt, **transport_kwargs)
    except BaseException:
        if interrupt is not None:
            interrupt.close()
        if regs is not None:
            regs.close()
        else:
            if restore is not None:
                _give_back(fn, *restore)
            fn.close_config()
        raise
