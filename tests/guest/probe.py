"""Guest-side probes for the smoke tests: standard library only, run as root in the guest.

    python -B probe.py pci [--unbind]   the virtio-fs PCI function: driver, capabilities,
                                        BAR mapping, common and device configuration
    python -B probe.py mmio [--unbind]  the virtio-fs virtio-mmio transport: where it is,
                                        its registers through a /dev/mem mapping, its IRQ
    python -B probe.py mmio-init        FUSE_INIT through the MMIO transport, by polling
    python -B probe.py echo PORT        a TCP echo server for one connection

Each prints one JSON object on stdout. ``--unbind`` first takes the device away from the
kernel's virtio driver, as a userspace transport must when that driver holds it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import re
import socket
import struct
import sys
import time
from typing import Any

VIRTIO_VENDOR = 0x1AF4
VIRTIO_FS_PCI_DEVICE = 0x105A
VIRTIO_ID_FS = 26
VIRTIO_MMIO_MAGIC = 0x74726976
MMIO_HID = "LNRO0005"
PAGE = 4096

# virtio-pci capability types
CAP_NAMES = {1: "common", 2: "notify", 3: "isr", 4: "device", 5: "pci_cfg"}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _driver(sysdir: str) -> str | None:
    link = os.path.join(sysdir, "driver")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def _hugepages() -> dict[str, Any]:
    meminfo = dict(line.split(":", 1) for line in _read("/proc/meminfo").splitlines())
    mounts = [line.split() for line in _read("/proc/mounts").splitlines()]
    return {
        "total": int(meminfo["HugePages_Total"]),
        "size_kib": int(meminfo["Hugepagesize"].split()[0]),
        "mounts": [m[1] for m in mounts if m[2] == "hugetlbfs"],
    }


# -- PCI -----------------------------------------------------------------------------------


def _pci_caps(config: bytes) -> list[dict[str, int | str]]:
    caps: list[dict[str, int | str]] = []
    ptr = config[0x34] & ~3
    seen = set()
    while ptr and ptr not in seen:
        seen.add(ptr)
        cap_id, nxt = config[ptr], config[ptr + 1]
        if cap_id == 0x09:  # vendor specific: a virtio structure
            cfg_type, bar = config[ptr + 3], config[ptr + 4]
            offset, length = struct.unpack_from("<II", config, ptr + 8)
            cap: dict[str, int | str] = {"type": CAP_NAMES.get(cfg_type, str(cfg_type)),
                                         "bar": bar, "offset": offset, "length": length}
            if cfg_type == 2:
                cap["notify_off_multiplier"] = struct.unpack_from("<I", config, ptr + 16)[0]
            caps.append(cap)
        elif cap_id == 0x11:  # MSI-X
            ctrl = struct.unpack_from("<H", config, ptr + 2)[0]
            caps.append({"type": "msix", "enabled": ctrl >> 15, "table_size": (ctrl & 0x7FF) + 1})
        ptr = nxt & ~3
    return caps


def pci(unbind: bool) -> dict[str, Any]:
    root = "/sys/bus/pci/devices"
    found = [d for d in sorted(os.listdir(root))
             if int(_read(f"{root}/{d}/vendor"), 16) == VIRTIO_VENDOR
             and int(_read(f"{root}/{d}/device"), 16) == VIRTIO_FS_PCI_DEVICE]
    out: dict[str, Any] = {"devices": found, "hugepages": _hugepages()}
    if not found:
        return out
    bdf = found[0]  # with several, the first (QEMU numbers them in command-line order)
    sysdir = f"{root}/{bdf}"
    out["bdf"] = bdf
    out["driver"] = _driver(sysdir)
    out["driver_override"] = _read(f"{sysdir}/driver_override")
    virtio = [d for d in os.listdir(sysdir) if re.fullmatch(r"virtio\d+", d)]
    out["virtio_devices"] = {v: _driver(f"{sysdir}/{v}") for v in virtio}
    if unbind and out["driver"]:
        with open(f"{sysdir}/driver/unbind", "w") as f:
            f.write(bdf)
        out["driver_after_unbind"] = _driver(sysdir)
    uio_dir = f"{sysdir}/uio"
    out["uio"] = sorted(os.listdir(uio_dir)) if os.path.isdir(uio_dir) else []
    out["uio_dev_exists"] = [os.path.exists(f"/dev/{u}") for u in out["uio"]]
    with open(f"{sysdir}/config", "rb") as f:
        config = f.read()
    out["command"] = struct.unpack_from("<H", config, 4)[0]
    caps = _pci_caps(config)
    out["caps"] = caps
    common = next((c for c in caps if c["type"] == "common"), None)
    device = next((c for c in caps if c["type"] == "device"), None)
    if common is None or device is None:
        return out
    bar = int(common["bar"])
    res = f"{sysdir}/resource{bar}"
    size = os.path.getsize(res)
    out["bar"] = {"index": bar, "size": size}
    # Read-only mapping: common configuration and the device's configuration.
    fd = os.open(res, os.O_RDONLY | os.O_SYNC)
    try:
        try:
            ro = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError as exc:
            out["mmap_error"] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            return out
    finally:
        os.close(fd)
    c, d = int(common["offset"]), int(device["offset"])
    regs = memoryview(ro)
    out["num_queues"] = regs[c + 0x12:c + 0x14].cast("H")[0]
    out["device_status"] = regs[c + 0x14]
    out["device_feature_select"] = regs[c:c + 4].cast("I")[0]
    out["device_feature_lo"] = regs[c + 4:c + 8].cast("I")[0]
    out["tag"] = bytes(regs[d:d + 36]).rstrip(b"\0").decode(errors="replace")
    out["num_request_queues"] = regs[d + 36:d + 40].cast("I")[0]
    regs.release()
    ro.close()
    # Read-write mapping: select the high feature word (bits 32-63), read, restore.
    fd = os.open(res, os.O_RDWR | os.O_SYNC)
    try:
        rw = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    regs = memoryview(rw)
    sel = regs[c:c + 4].cast("I")
    sel[0] = 1
    out["device_feature_hi"] = regs[c + 4:c + 8].cast("I")[0]
    sel[0] = 0
    sel.release()
    regs.release()
    rw.close()
    out["device_features"] = out["device_feature_hi"] << 32 | out["device_feature_lo"]
    return out


# -- MMIO ----------------------------------------------------------------------------------


def _mmio_transports() -> list[tuple[str, int, int]]:
    """(platform device name, base, size) of each ACPI virtio-mmio transport, from
    /proc/iomem (addresses need root)."""
    found = []
    for line in _read("/proc/iomem").splitlines():
        m = re.fullmatch(r"\s*([0-9a-f]+)-([0-9a-f]+) : (" + MMIO_HID + r":\d+)", line)
        if m:
            base, end = int(m[1], 16), int(m[2], 16)
            found.append((m[3], base, end - base + 1))
    return found


def _acpi_gsi(base: int, size: int) -> int | None:
    """The interrupt the DSDT gives the transport at ``base``: the Extended Interrupt
    descriptor right after its Memory32Fixed descriptor."""
    try:
        with open("/sys/firmware/acpi/tables/DSDT", "rb") as f:
            dsdt = f.read()
    except OSError:
        return None
    i = dsdt.find(b"\x86\x09\x00\x01" + struct.pack("<II", base, size))
    if i < 0 or dsdt[i + 12] != 0x89:
        return None
    return int(struct.unpack_from("<I", dsdt, i + 12 + 5)[0])


class MmioRegs:
    """The virtio-mmio register window at ``base`` through ``/dev/mem`` (page granular:
    the whole page must be free of claimed resources under ``CONFIG_IO_STRICT_DEVMEM``)."""

    def __init__(self, base: int, size: int = 0x200, writable: bool = False) -> None:
        page = base & ~(PAGE - 1)
        length = (base + size - page + PAGE - 1) & ~(PAGE - 1)
        fd = os.open("/dev/mem", (os.O_RDWR if writable else os.O_RDONLY) | os.O_SYNC)
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._map = mmap.mmap(fd, length, mmap.MAP_SHARED, prot, offset=page)
        finally:
            os.close(fd)
        self._mv = memoryview(self._map)[base - page:base - page + size]
        self.u32 = self._mv.cast("I")

    def __getitem__(self, off: int) -> int:
        return int(self.u32[off // 4])

    def __setitem__(self, off: int, value: int) -> None:
        self.u32[off // 4] = value

    def raw(self, off: int, n: int) -> bytes:
        return bytes(self._mv[off:off + n])

    def close(self) -> None:
        self.u32.release()
        self._mv.release()
        self._map.close()


def mmio(unbind: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"transports": [], "hugepages": _hugepages()}
    for name, base, size in _mmio_transports():
        sysdir = f"/sys/bus/platform/devices/{name}"
        t: dict[str, Any] = {"name": name, "base": base, "size": size,
                             "driver": _driver(sysdir),
                             "driver_override": _read(f"{sysdir}/driver_override"),
                             "acpi_path": _read(f"{sysdir}/firmware_node/path"),
                             "gsi": _acpi_gsi(base, size)}
        if unbind and t["driver"]:
            with open(f"{sysdir}/driver/unbind", "w") as f:
                f.write(name)
            t["driver_after_unbind"] = _driver(sysdir)
        try:
            regs = MmioRegs(base, size)
        except OSError as exc:
            t["mmap_error"] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        else:
            t.update(magic=regs[0x0], version=regs[0x4], device_id=regs[0x8],
                     vendor_id=regs[0xC], interrupt_status=regs[0x60], status=regs[0x70])
            if t["device_id"] == VIRTIO_ID_FS:
                t["tag"] = regs.raw(0x100, 36).rstrip(b"\0").decode(errors="replace")
            regs.close()
        out["transports"].append(t)
    return out


def _hugepage_dma(size: int = 2 << 20) -> tuple[mmap.mmap, int]:
    """A hugetlbfs page (physically contiguous) and its physical address."""
    path = f"/dev/hugepages/probe-{os.getpid()}"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        mem = mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                        mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
        os.unlink(path)
    mem[0] = 0
    virt = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(virt // PAGE * 8)
        entry = struct.unpack("<Q", f.read(8))[0]
    if not entry >> 63 or not entry & ((1 << 55) - 1):
        raise OSError(errno.EFAULT, "no physical address for the hugepage (need root)")
    return mem, (entry & ((1 << 55) - 1)) * PAGE


def mmio_init(timeout: float = 20.0) -> dict[str, Any]:
    """Reset the virtio-fs MMIO device, negotiate VERSION_1, set up both queues in a
    hugepage, send FUSE_INIT on the request queue and poll the used ring for the reply."""
    fs = [(n, b, s) for n, b, s in _mmio_transports()
          if _driver(f"/sys/bus/platform/devices/{n}") is None]
    regs = None
    for _name, base, size in fs:
        r = MmioRegs(base, size, writable=True)
        if r[0x8] == VIRTIO_ID_FS:
            regs = r
            break
        r.close()
    if regs is None:
        return {"error": "no unclaimed virtio-fs MMIO transport"}
    out: dict[str, Any] = {}
    regs[0x70] = 0  # reset
    deadline = time.monotonic() + timeout
    while regs[0x70] != 0 and time.monotonic() < deadline:
        pass
    regs[0x70] = 1  # ACKNOWLEDGE
    regs[0x70] = 1 | 2  # DRIVER
    regs[0x14] = 1
    hi = regs[0x10]
    regs[0x14] = 0
    out["device_features"] = hi << 32 | regs[0x10]
    regs[0x24] = 0
    regs[0x20] = 0
    regs[0x24] = 1
    regs[0x20] = 1  # VERSION_1 only
    regs[0x70] = 1 | 2 | 8  # FEATURES_OK
    if not regs[0x70] & 8:
        return {**out, "error": "FEATURES_OK not accepted"}
    mem, phys = _hugepage_dma()
    qsize = 8
    layout = {q: (q * 0x10000, q * 0x10000 + 0x1000, q * 0x10000 + 0x2000) for q in (0, 1)}
    out["queue_num_max"] = []
    for q, (desc, avail, used) in layout.items():
        regs[0x30] = q
        out["queue_num_max"].append(regs[0x34])
        regs[0x38] = qsize
        for reg, off in ((0x80, desc), (0x90, avail), (0xA0, used)):
            addr = phys + off
            regs[reg] = addr & 0xFFFFFFFF
            regs[reg + 4] = addr >> 32
        regs[0x44] = 1  # QueueReady
    regs[0x70] = 1 | 2 | 8 | 4  # DRIVER_OK
    req, rep = 0x40000, 0x41000
    in_header = struct.pack("<IIQQIIIHH", 40 + 64, 26, 1, 0, 0, 0, 0, 0, 0)  # FUSE_INIT
    init_in = struct.pack("<IIIII44x", 7, 36, 128 << 10, 0, 0)
    mem[req:req + 104] = in_header + init_in
    desc, avail, used = layout[1]
    struct.pack_into("<QIHH", mem, desc, phys + req, 104, 1, 1)  # NEXT -> 1
    struct.pack_into("<QIHH", mem, desc + 16, phys + rep, 4096, 2, 0)  # WRITE
    struct.pack_into("<H", mem, avail + 4, 0)
    struct.pack_into("<H", mem, avail + 2, 1)
    start = time.monotonic()
    regs[0x50] = 1  # QueueNotify: queue 1
    while struct.unpack_from("<H", mem, used + 2)[0] == 0:
        if time.monotonic() - start > timeout:
            regs[0x70] = 0
            return {**out, "error": f"no used buffer after {timeout} s"}
    out["poll_ms"] = round((time.monotonic() - start) * 1000, 2)
    out["used_len"] = struct.unpack_from("<I", mem, used + 8)[0]
    length, error, unique = struct.unpack_from("<IiQ", mem, rep)
    major, minor = struct.unpack_from("<II", mem, rep + 16)
    out.update(reply_len=length, error=error, unique=unique, major=major, minor=minor)
    out["interrupt_status"] = regs[0x60]
    regs[0x64] = out["interrupt_status"]  # InterruptACK
    regs[0x70] = 0  # reset: the device lets go of the rings
    regs.close()
    mem.close()
    return out


# -- network -------------------------------------------------------------------------------


def echo(port: int) -> dict[str, Any]:
    """Serve one TCP connection on ``port``: echo everything until EOF."""
    results = os.environ.get("GUEST_RESULTS", "/tmp")
    with socket.create_server(("0.0.0.0", port)) as srv:
        marker = os.path.join(results, f"echo-{port}.listening")
        with open(marker + ".tmp", "w") as f:
            f.write(str(port))
        os.rename(marker + ".tmp", marker)
        srv.settimeout(120)
        conn, peer = srv.accept()
        total = 0
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
                total += len(data)
    return {"port": port, "peer": peer[0], "bytes": total}


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else ""
    if cmd == "pci":
        result = pci("--unbind" in argv)
    elif cmd == "mmio":
        result = mmio("--unbind" in argv)
    elif cmd == "mmio-init":
        result = mmio_init()
    elif cmd == "echo":
        result = echo(int(argv[1]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
