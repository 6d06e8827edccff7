"""A virtio-fs PCI function seen through sysfs: capabilities, discovery, driver binding.

Everything here goes through ``/sys/bus/pci``: the configuration space (``config``: the
capability list, the command register), the driver binding (``driver``,
``driver_override``, the drivers' ``bind``/``unbind``) and, for the tag of a function that
no one has mapped, the virtio PCI configuration access window (a capability through which
the device's registers can be read without mapping its BAR). The registers themselves are
mapped by :mod:`pyvirtiofs.hw.guest.pci_device`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import re
import struct
from dataclasses import dataclass

from pyvirtiofs.hw.guest.errors import GuestDeviceError

__all__ = [
    "PCI_ADDRESS",
    "PciFunction",
    "VirtioCap",
    "VirtioPciCaps",
    "list_virtio_fs_functions",
    "parse_capabilities",
]

SYSFS_PCI = "/sys/bus/pci"
VIRTIO_VENDOR = 0x1AF4
VIRTIO_FS_DEVICE = 0x105A  # 0x1040 + virtio device id 26 (modern only)
UIO_DRIVER = "uio_pci_generic"
PCI_ADDRESS = re.compile(r"(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]\Z")

CMD_MEMORY = 1 << 1
CMD_MASTER = 1 << 2
CMD_INTX_DISABLE = 1 << 10
_STATUS_CAP_LIST = 1 << 4
_CAP_VENDOR = 0x09
_CAP_MSIX = 0x11
# virtio_pci_cap.cfg_type
COMMON_CFG, NOTIFY_CFG, ISR_CFG, DEVICE_CFG, PCI_CFG = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class VirtioCap:
    """One virtio structure: in BAR ``bar`` at ``offset``, ``length`` bytes; ``at`` is the
    capability's own position in configuration space."""

    bar: int
    offset: int
    length: int
    at: int


@dataclass(frozen=True)
class VirtioPciCaps:
    """The virtio structures of a modern virtio PCI function (virtio 1.2 §4.1.4)."""

    common: VirtioCap
    notify: VirtioCap
    isr: VirtioCap
    device: VirtioCap
    notify_multiplier: int
    pci_cfg: VirtioCap | None = None
    msix_enabled: bool = False

    def bars(self) -> set[int]:
        return {c.bar for c in (self.common, self.notify, self.isr, self.device)}


def parse_capabilities(config: bytes) -> VirtioPciCaps:
    """The virtio capabilities of a function's configuration space (at least 256 bytes).

    The first capability of each type with a valid BAR wins (as the spec asks); a loop
    in the list, a pointer outside the header-less space or a truncated capability is an
    error, as is a missing common, notify, ISR or device structure."""
    if len(config) < 256:
        raise GuestDeviceError(errno.EPROTO, f"configuration space of {len(config)} bytes "
                               "(256 are readable by root only)")
    status = struct.unpack_from("<H", config, 6)[0]
    if not status & _STATUS_CAP_LIST:
        raise GuestDeviceError(errno.EPROTO, "the function has no capability list")
    found: dict[int, VirtioCap] = {}
    multiplier = 0
    msix = False
    ptr = config[0x34] & 0xFC
    seen: set[int] = set()
    while ptr:
        if ptr < 0x40 or ptr > 256 - 4 or ptr in seen or len(seen) >= 48:
            raise GuestDeviceError(errno.EPROTO, f"malformed capability list at {ptr:#x}")
        seen.add(ptr)
        cap_id, nxt = config[ptr], config[ptr + 1]
        if cap_id == _CAP_VENDOR:
            cap_len, cfg_type, bar = config[ptr + 2], config[ptr + 3], config[ptr + 4]
            if cap_len < 16 or ptr + cap_len > 256:
                raise GuestDeviceError(errno.EPROTO, f"virtio capability at {ptr:#x} has "
                                       f"length {cap_len}")
            offset, length = struct.unpack_from("<II", config, ptr + 8)
            if bar <= 5 and cfg_type not in found and cfg_type in (
                    COMMON_CFG, NOTIFY_CFG, ISR_CFG, DEVICE_CFG, PCI_CFG):
                if cfg_type == NOTIFY_CFG:
                    if cap_len < 20:
                        raise GuestDeviceError(errno.EPROTO, "notify capability without "
                                               "its multiplier")
                    multiplier = struct.unpack_from("<I", config, ptr + 16)[0]
                found[cfg_type] = VirtioCap(bar, offset, length, ptr)
        elif cap_id == _CAP_MSIX:
            msix = bool(struct.unpack_from("<H", config, ptr + 2)[0] & 0x8000)
        ptr = nxt & 0xFC
    names = {COMMON_CFG: "common", NOTIFY_CFG: "notify", ISR_CFG: "ISR", DEVICE_CFG: "device"}
    missing = [n for t, n in names.items() if t not in found]
    if missing:
        raise GuestDeviceError(errno.EPROTO, "not a modern virtio function: no "
                               f"{', '.join(missing)} configuration capability")
    if multiplier & 1 or multiplier > 1 << 16:
        raise GuestDeviceError(errno.EPROTO, f"notify_off_multiplier {multiplier} is not "
                               "even or is absurd")
    return VirtioPciCaps(found[COMMON_CFG], found[NOTIFY_CFG], found[ISR_CFG],
                         found[DEVICE_CFG], multiplier, found.get(PCI_CFG), msix)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class PciFunction:
    """One PCI function under ``/sys/bus/pci/devices/ADDRESS`` (root only, except reads)."""

    def __init__(self, address: str) -> None:
        if PCI_ADDRESS.match(address) and address.count(":") == 1:
            address = "0000:" + address
        self.address = address.lower()
        self.sysdir = f"{SYSFS_PCI}/devices/{self.address}"
        if not os.path.isdir(self.sysdir):
            raise FileNotFoundError(errno.ENOENT, "no such PCI function", self.address)
        self._config_fd = -1

    # -- identity and binding --------------------------------------------------------------

    def ids(self) -> tuple[int, int]:
        return int(_read(f"{self.sysdir}/vendor"), 16), int(_read(f"{self.sysdir}/device"), 16)

    def driver(self) -> str | None:
        link = f"{self.sysdir}/driver"
        return os.path.basename(os.readlink(link)) if os.path.islink(link) else None

    def driver_override(self) -> str | None:
        try:
            value = _read(f"{self.sysdir}/driver_override")
        except OSError:
            return None
        return None if value in ("", "(null)") else value

    def set_driver_override(self, name: str | None) -> None:
        _write(f"{self.sysdir}/driver_override", name or "\n")

    def unbind(self) -> None:
        if self.driver() is not None:
            _write(f"{self.sysdir}/driver/unbind", self.address)

    def bind(self, driver: str) -> None:
        """Bind to ``driver`` (its override must allow it); falls back to a probe."""
        try:
            _write(f"{SYSFS_PCI}/drivers/{driver}/bind", self.address)
        except OSError:
            with contextlib.suppress(OSError):
                _write(f"{SYSFS_PCI}/drivers_probe", self.address)
        if self.driver() != driver:
            raise GuestDeviceError(errno.EIO, f"{self.address}: binding to {driver} failed "
                                   "(see dmesg)")

    def uio_device(self) -> str | None:
        """``/dev/uioN`` of a function bound to a UIO driver."""
        try:
            names = sorted(os.listdir(f"{self.sysdir}/uio"))
        except OSError:
            return None
        return f"/dev/{names[0]}" if names else None

    # -- configuration space -----------------------------------------------------------------

    def _fd(self) -> int:
        if self._config_fd < 0:
            self._config_fd = os.open(f"{self.sysdir}/config", os.O_RDWR | os.O_CLOEXEC)
        return self._config_fd

    def lock(self) -> None:
        """Lock the function for this driver (an exclusive ``flock`` on ``config``,
        released by :meth:`close_config`): two drivers of one device would corrupt each
        other's rings."""
        try:
            fcntl.flock(self._fd(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GuestDeviceError(errno.EBUSY, f"PCI {self.address} is in use by another "
                                   "process (or another connection of this one)") from None

    def close_config(self) -> None:
        if self._config_fd >= 0:
            os.close(self._config_fd)
            self._config_fd = -1

    def config(self) -> bytes:
        with open(f"{self.sysdir}/config", "rb", buffering=0) as f:
            return f.read(4096)

    def write_config(self, offset: int, value: int, size: int) -> None:
        if os.pwrite(self._fd(), value.to_bytes(size, "little"), offset) != size:
            raise GuestDeviceError(errno.EIO, f"{self.address}: short configuration write")

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(os.pread(self._fd(), size, offset), "little")

    def command(self) -> int:
        return self.read_config(4, 2)

    def set_command(self, value: int) -> None:
        self.write_config(4, value & 0xFFFF, 2)

    def read_through_window(self, caps: VirtioPciCaps, cap: VirtioCap, offset: int,
                            length: int) -> bytes:
        """Bytes of a virtio structure read through the PCI configuration access
        capability, one byte per access: no BAR mapping needed, so it also works while a
        kernel driver holds the function."""
        window = caps.pci_cfg
        if window is None:
            raise GuestDeviceError(errno.ENOTSUP, f"{self.address} has no configuration "
                                   "access capability")
        out = bytearray()
        for i in range(length):
            self.write_config(window.at + 4, cap.bar, 1)
            self.write_config(window.at + 8, cap.offset + offset + i, 4)
            self.write_config(window.at + 12, 1, 4)
            out.append(self.read_config(window.at + 16, 1))
        return bytes(out)

    def __repr__(self) -> str:
        return f"PciFunction({self.address})"


@dataclass(frozen=True)
class FoundFunction:
    """A virtio-fs function found by :func:`list_virtio_fs_functions`."""

    address: str
    driver: str | None
    tag: str | None  # None: could not be read
    note: str = ""  # why the tag is unknown, or who holds the function

    def describe(self) -> str:
        held = f"driver {self.driver}" if self.driver else "no driver"
        tag = repr(self.tag) if self.tag is not None else "tag unknown"
        return f"{self.address} ({tag}, {held}{', ' + self.note if self.note else ''})"


def _read_bar(function: PciFunction, cap: VirtioCap, length: int) -> bytes | None:
    """``length`` bytes of a structure through a read-only mapping of its BAR, or None
    when that cannot be done (a driver holds the function, decoding is off, ...)."""
    if not function.command() & CMD_MEMORY or cap.length < length:
        return None
    try:
        fd = os.open(f"{function.sysdir}/resource{cap.bar}", os.O_RDONLY | os.O_SYNC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if cap.offset + length > size:
            return None
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return bytes([mm[cap.offset + i] for i in range(length)])  # one byte per load
    finally:
        mm.close()


def read_tag(function: PciFunction) -> str:
    """The device's tag: from its BAR when no other driver holds it (reads there have no
    side effects, so this is safe while another process drives the device), else through
    the configuration access window (read twice: another reader may move the window)."""
    caps = parse_capabilities(function.config())
    raw = _read_bar(function, caps.device, 36) if function.driver() in (None, UIO_DRIVER) \
        else None
    for _ in range(4):
        if raw is not None:
            break
        first = function.read_through_window(caps, caps.device, 0, 36)
        if function.read_through_window(caps, caps.device, 0, 36) == first:
            raw = first
    if raw is None:
        raise GuestDeviceError(errno.EAGAIN, "the tag keeps changing while it is read")
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def list_virtio_fs_functions(read_tags: bool = True) -> list[FoundFunction]:
    """Every virtio-fs PCI function (vendor 0x1af4, device 0x105a) with its driver and,
    when ``read_tags`` (root), its tag."""
    out = []
    try:
        names = sorted(os.listdir(f"{SYSFS_PCI}/devices"))
    except OSError:
        return []
    for name in names:
        try:
            fn = PciFunction(name)
            if fn.ids() != (VIRTIO_VENDOR, VIRTIO_FS_DEVICE):
                continue
        except (OSError, ValueError):
            continue
        tag, note = None, ""
        if read_tags:
            try:
                tag = read_tag(fn)
            except GuestDeviceError as exc:
                note = exc.strerror or str(exc)
            except OSError as exc:
                note = f"cannot read its configuration: {exc.strerror}"
            finally:
                fn.close_config()
        out.append(FoundFunction(fn.address, fn.driver(), tag, note))
    return out


def virtiofs_mounts(tag: str) -> list[str]:
    """Where the kernel's own virtiofs has mounted ``tag``."""
    try:
        with open("/proc/self/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return [parts[1] for parts in (line.split() for line in lines)
            if len(parts) > 2 and parts[2] == "virtiofs" and parts[0] == tag]
