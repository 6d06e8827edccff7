"""The virtio-mmio transport: a register window mapped from ``/dev/mem``, polled.

A virtio-mmio transport is a platform device (``LNRO0005:NN`` from ACPI, as QEMU's
``microvm`` describes them; ``NAME.virtio_mmio`` or ``virtio-mmio.N`` from a device tree
or the kernel command line) whose registers (virtio 1.2 §4.2.2) sit at an address listed
in ``/proc/iomem``. With no kernel driver bound, userspace maps the page from ``/dev/mem``;
``CONFIG_IO_STRICT_DEVMEM`` refuses a page in which a driver holds any region (other
transports often share the page: unbind them too, or boot with ``iomem=relaxed``). The
transport's interrupt cannot reach userspace (there is no UIO driver for it): completions
are polled. Only version 2 (modern) transports are driven.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
from dataclasses import dataclass
from typing import Any

from pyvirtiofs.hw.guest.errors import GuestDeviceError, check_iommu, check_lockdown, check_root
from pyvirtiofs.hw.guest.virtio import VIRTIO_ID_FS, GuestTransport

log = logging.getLogger(__name__)

__all__ = ["MmioRegion", "MmioRegisters", "find_mmio", "open_mmio", "parse_iomem"]

SYSFS_PLATFORM = "/sys/bus/platform"
MAGIC = 0x74726976  # "virt"
PAGE = 4096
CONFIG = 0x100
_IOMEM_LINE = re.compile(r"(\s*)([0-9a-fA-F]+)-([0-9a-fA-F]+) : (.+)\Z")
# Platform device names of virtio-mmio transports: from ACPI, a device tree, the command line
_TRANSPORT_NAME = re.compile(r"LNRO0005:[0-9A-Fa-f]+|[0-9a-fA-F]+\.virtio(?:_mmio)?|"
                             r"virtio-mmio\.\d+\Z")


@dataclass(frozen=True)
class MmioRegion:
    """A platform device's register window from ``/proc/iomem``."""

    name: str
    base: int
    size: int


def parse_iomem(text: str) -> list[MmioRegion]:
    """Every region of ``/proc/iomem`` that looks like a virtio-mmio transport, outermost
    entry per device name (a bound driver adds a nested entry of the same name)."""
    out: dict[str, MmioRegion] = {}
    for line in text.splitlines():
        m = _IOMEM_LINE.match(line)
        if not m:
            continue
        name = m.group(4).strip()
        if not _TRANSPORT_NAME.fullmatch(name) or name in out:
            continue
        base, end = int(m.group(2), 16), int(m.group(3), 16)
        if end > base:
            out[name] = MmioRegion(name, base, end - base + 1)
    return list(out.values())


def _platform_driver(name: str) -> str | None:
    link = f"{SYSFS_PLATFORM}/devices/{name}/driver"
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


class MmioRegisters:
    """The register window of one transport (32-bit accesses; the configuration bytewise).

    Opening it locks the platform device for this process; :meth:`close` unmaps, gives the
    device back to the driver it had (``take=True``) and unlocks."""

    def __init__(self, region: MmioRegion, *, restore: tuple[str | None, str] | None = None,
                 ) -> None:
        self.region = region
        self.name = f"MMIO {region.base:#x} ({region.name})"
        self._restore = restore
        if region.size < CONFIG + 40:
            raise GuestDeviceError(errno.EPROTO, f"{self.name}: window of {region.size:#x} "
                                   "bytes is too small for a virtio-fs transport")
        self._lock = _lock(region.name)
        self._mm: mmap.mmap | None = None
        try:
            page = region.base & ~(PAGE - 1)
            length = (region.base + region.size - page + PAGE - 1) & ~(PAGE - 1)
            self._mm = _map_devmem(page, length, self.name)
            start = region.base - page
            whole = memoryview(self._mm)
            self.b = whole[start:start + region.size]
            whole.release()
            self.w = self.b[:region.size & ~3].cast("I")
        except BaseException:
            self.close()
            raise

    def read32(self, offset: int) -> int:
        return int(self.w[offset >> 2])

    def write32(self, offset: int, value: int) -> None:
        self.w[offset >> 2] = value & 0xFFFF_FFFF

    def identify(self) -> tuple[int, int, int]:
        """``(version, device id, vendor id)``, checking the magic value."""
        magic = self.read32(0x000)
        if magic != MAGIC:
            raise GuestDeviceError(errno.ENODEV, f"{self.name}: no virtio-mmio transport "
                                   f"(magic {magic:#x})")
        return self.read32(0x004), self.read32(0x008), self.read32(0x00C)

    # -- DeviceRegisters ---------------------------------------------------------------------

    def status(self) -> int:
        return self.read32(0x070) & 0xFF

    def set_status(self, value: int) -> None:
        self.write32(0x070, value)

    def device_features(self) -> int:
        self.write32(0x014, 0)
        low = self.read32(0x010)
        self.write32(0x014, 1)
        return self.read32(0x010) << 32 | low

    def set_driver_features(self, value: int) -> None:
        self.write32(0x024, 0)
        self.write32(0x020, value & 0xFFFF_FFFF)
        self.write32(0x024, 1)
        self.write32(0x020, value >> 32)

    def config_generation(self) -> int:
        return self.read32(0x0FC)

    def read_config(self, offset: int, length: int) -> bytes:
        if CONFIG + offset + length > self.region.size:
            raise GuestDeviceError(errno.EPROTO, f"{self.name}: configuration read past the "
                                   "window")
        b = self.b
        return bytes([b[CONFIG + offset + i] for i in range(length)])

    def num_queues(self) -> None:
        return None  # virtio-mmio does not say; queue_max_size() is 0 past the last

    def queue_max_size(self, index: int) -> int:
        self.write32(0x030, index)
        return self.read32(0x034)

    def enable_queue(self, index: int, size: int, desc: int, driver: int, device: int) -> None:
        self.write32(0x030, index)
        if self.read32(0x044):
            raise GuestDeviceError(errno.EPROTO, f"{self.name}: queue {index} is ready "
                                   "after a reset")
        self.write32(0x038, size)
        for reg, address in ((0x080, desc), (0x090, driver), (0x0A0, device)):
            self.write32(reg, address)  # low half first
            self.write32(reg + 4, address >> 32)
        self.write32(0x044, 1)
        if self.read32(0x044) != 1:
            raise GuestDeviceError(errno.EPROTO, f"{self.name}: queue {index} did not "
                                   "become ready")

    def notify(self, index: int) -> None:
        self.write32(0x050, index)

    def close(self) -> None:
        for name in ("w", "b"):
            view = self.__dict__.pop(name, None)
            if view is not None:
                view.release()
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        try:
            if self._restore is not None:
                driver, override = self._restore
                self._restore = None
                _give_back(self.region.name, driver, override)
        finally:
            if self._lock >= 0:
                os.close(self._lock)
                self._lock = -1


def _lock(name: str) -> int:
    fd = os.open(f"{SYSFS_PLATFORM}/devices/{name}/uevent", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise GuestDeviceError(errno.EBUSY, f"MMIO transport {name} is in use by another "
                               "process of this driver") from None
    return fd


def _map_devmem(page: int, length: int, what: str) -> mmap.mmap:
    try:
        fd = os.open("/dev/mem", os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
    except FileNotFoundError:
        raise GuestDeviceError(errno.ENOENT, "virtio-mmio needs /dev/mem (CONFIG_DEVMEM; in a "
                               "container or chroot, mount devtmpfs on /dev)") from None
    try:
        return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=page)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            check_lockdown()
            raise GuestDeviceError(
                errno.EPERM, f"the kernel refuses to map page {page:#x} of /dev/mem for "
                f"{what}: a driver holds a region in that page (CONFIG_IO_STRICT_DEVMEM). "
                "Unbind the drivers of every transport in that page, or boot the guest with "
                "iomem=relaxed") from None
        raise
    finally:
        os.close(fd)


def _give_back(name: str, driver: str | None, override: str) -> None:
    sysdir = f"{SYSFS_PLATFORM}/devices/{name}"
    try:
        with open(f"{sysdir}/driver_override", "w") as f:
            f.write(override or "\n")
        if driver is not None and _platform_driver(name) is None:
            with open(f"{SYSFS_PLATFORM}/drivers/{driver}/bind", "w") as f:
                f.write(name)
    except OSError as exc:
        log.warning("could not give %s back to %s: %s", name, driver or "no driver", exc)


def _read_override(name: str) -> str:
    try:
        with open(f"{SYSFS_PLATFORM}/devices/{name}/driver_override") as f:
            value = f.read().strip()
    except OSError:
        return ""
    return "" if value == "(null)" else value


@dataclass(frozen=True)
class _Found:
    region: MmioRegion
    driver: str | None
    device_id: int | None
    tag: str | None
    note: str = ""

    def describe(self) -> str:
        kind = ("virtio-fs" if self.device_id == VIRTIO_ID_FS else
                "unknown device" if self.device_id is None else f"device id {self.device_id}")
        tag = f", tag {self.tag!r}" if self.tag is not None else ""
        held = f", driver {self.driver}" if self.driver else ""
        note = f", {self.note}" if self.note else ""
        return f"{self.region.name} at {self.region.base:#x} ({kind}{tag}{held}{note})"


def _survey() -> list[_Found]:
    """Every virtio-mmio transport, with what can be read of it."""
    try:
        with open("/proc/iomem") as f:
            regions = parse_iomem(f.read())
    except OSError:
        regions = []
    out = []
    for region in regions:
        driver = _platform_driver(region.name)
        device_id = tag = None
        note = ""
        if driver is not None:
            note = "registers not mappable while the driver holds them"
        else:
            try:
                regs = MmioRegisters(region)
            except OSError as exc:
                note = exc.strerror or str(exc)
            else:
                try:
                    version, device_id, _vendor = regs.identify()
                    if device_id == VIRTIO_ID_FS and version == 2:
                        tag = regs.read_config(0, 36).split(b"\0", 1)[0].decode(
                            "utf-8", errors="replace")
                    elif version != 2:
                        note = f"version {version} (legacy)"
                except OSError as exc:
                    note = exc.strerror or str(exc)
                finally:
                    regs.close()
        out.append(_Found(region, driver, device_id, tag, note))
    return out


def find_mmio(target: str) -> tuple[MmioRegion, str | None]:
    """The transport at address ``target`` (``0x…``) or with tag ``target``, and its
    driver; the error lists what there is."""
    survey = _survey()
    if target.lower().startswith("0x"):
        try:
            base = int(target, 16)
        except ValueError:
            raise GuestDeviceError(errno.EINVAL, f"bad MMIO address {target!r}") from None
        matches = [f for f in survey if f.region.base == base]
    else:
        matches = [f for f in survey if f.tag == target]
    if len(matches) != 1:
        listing = "; ".join(f.describe() for f in survey) or "none (is the VM a microvm, or " \
            "started with -device vhost-user-fs-device on a virtio-mmio bus?)"
        what = "several transports match" if matches else "no virtio-fs MMIO transport matches"
        raise GuestDeviceError(errno.ENODEV, f"{what} {target!r}; found: {listing}")
    return matches[0].region, matches[0].driver


def open_mmio(target: str, *, take: bool = False, completions: str = "poll",
              **transport_kwargs: Any) -> GuestTransport:
    """Map the virtio-fs MMIO transport ``target`` (``0xADDRESS`` or tag) and bring it up.
    Completions are polled (``completions`` other than ``auto``/``poll`` is an error).
    ``take``: unbind the kernel's virtio-mmio driver first (given back on close)."""
    if completions not in ("auto", "poll"):
        raise GuestDeviceError(errno.ENOTSUP, "virtio-mmio interrupts cannot reach userspace: "
                               "completions are polled (completions='poll')")
    check_root()
    check_lockdown()
    check_iommu()
    region, driver = find_mmio(target)
    restore = None
    if driver is not None:
        if not take:
            raise GuestDeviceError(
                errno.EBUSY, f"MMIO transport {region.name} is held by the kernel driver "
                f"{driver}: pass take=True to let this driver take it (and give it back on "
                f"close), or release it yourself: echo none > {SYSFS_PLATFORM}/devices/"
                f"{region.name}/driver_override; echo {region.name} > {SYSFS_PLATFORM}/"
                f"drivers/{driver}/unbind")
        restore = (driver, _read_override(region.name))
        with open(f"{SYSFS_PLATFORM}/devices/{region.name}/driver_override", "w") as f:
            f.write("none")
        with open(f"{SYSFS_PLATFORM}/drivers/{driver}/unbind", "w") as f:
            f.write(region.name)
    try:
        regs = MmioRegisters(region, restore=restore)
    except BaseException:
        if restore is not None:
            _give_back(region.name, *restore)
        raise
    try:
        version, device_id, _vendor = regs.identify()
        if version == 1:
            raise GuestDeviceError(errno.ENOTSUP, f"{regs.name} is a legacy (version 1) "
                                   "transport: start QEMU with -global "
                                   "virtio-mmio.force-legacy=false")
        if version != 2 or device_id != VIRTIO_ID_FS:
            raise GuestDeviceError(errno.ENODEV, f"{regs.name}: version {version}, device "
                                   f"id {device_id}; a virtio-fs transport is version 2, "
                                   f"device {VIRTIO_ID_FS}")
        return GuestTransport(regs, interrupt=None, **transport_kwargs)
    except BaseException:
        with contextlib.suppress(Exception):
            regs.close()  # idempotent: the transport may have closed it already
        raise
