"""Checks of the guest transports that need a VM, run *inside* the guest as root:
``python -B -m tests.guest.guest_device_checks pci|mmio``. Prints one JSON object of
observations; the host test (test_guest_transport.py) asserts on them.

PCI expects devices with tags ``pvfs`` and ``pvfs2`` bound to uio_pci_generic and uses
only ``pvfs2`` (the behaviour suite may be running on ``pvfs`` meanwhile); MMIO expects
one, tag ``pvfs``, with no driver. The checks put every binding back as they found it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import subprocess
import sys
from typing import Any

from pyvirtiofs.hw.guest import open_device
from pyvirtiofs.hw.guest.dma import HugepageMemory, read_pagemap

SYS_PCI = "/sys/bus/pci"
SYS_PLATFORM = "/sys/bus/platform"


def error_of(call: Any) -> dict[str, Any]:
    """What ``call()`` raised: errno name and message (or that it did not raise)."""
    try:
        result = call()
    except OSError as exc:
        return {"errno": errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                "message": exc.strerror or str(exc), "type": type(exc).__name__}
    with_close = getattr(result, "close", None)
    if with_close is not None:
        with_close()
    return {"errno": None}


def as_nobody() -> dict[str, Any]:
    """Opening a device as an unprivileged user (in a forked child, before any thread)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, try, report
        os.close(read)
        try:
            os.setgid(65534)
            os.setuid(65534)
            out = error_of(lambda: open_device("pci:pvfs"))
        except BaseException as exc:  # report anything at all
            out = {"errno": "crash", "message": repr(exc)}
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return dict(json.loads(data))


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def driver(sysdir: str) -> str | None:
    link = f"{sysdir}/driver"
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def memory_check() -> dict[str, Any]:
    """Hugepage memory: its runs agree with the page map, ranges split where pages are not
    physically adjacent."""
    mem = HugepageMemory(8 << 20)
    try:
        small = read_pagemap(mem.uva, mem.size)
        page = mem.page_size
        starts = [small[i * (page // 4096)] for i in range(mem.size // page)]
        boundary = mem.dma_ranges(page - 100, 200)
        adjacent = starts[1] == starts[0] + page
        return {"runs": len(mem.layout.runs), "pages": len(starts),
                "split_ok": boundary == ([(starts[0] + page - 100, 200)] if adjacent else
                                         [(starts[0] + page - 100, 100), (starts[1], 100)]),
                "gpa_ok": all(mem.gpa(i * page + 5) == s + 5 for i, s in enumerate(starts))}
    finally:
        mem.close()


def run_cli(args: list[str]) -> list[Any]:
    """``pyvirtiofs ARGS`` in this process: [exit status, stdout, stderr]."""
    from pyvirtiofs.api.cli import main

    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(args)
    out.flush()
    return [status, out.buffer.getvalue().decode(), err.getvalue()]


def pci_checks() -> dict[str, Any]:
    """Everything on device ``pvfs2`` (``pvfs`` may be in use by the behaviour suite)."""
    from pyvirtiofs.api import connect
    from pyvirtiofs.hw.guest.pci import PciFunction, list_virtio_fs_functions
    from tests.guest.sequence import counts, run_sequence, tree

    out: dict[str, Any] = {"nobody": as_nobody()}  # first: forks, so before any thread
    found = list_virtio_fs_functions()
    out["found"] = {f.tag: f.driver for f in found}
    address = {f.tag: f.address for f in found}
    out["not_found"] = error_of(lambda: open_device("pci:nope"))
    out["hugepages"] = error_of(lambda: open_device("pci:pvfs2", memory_size=1 << 30))
    out["memory"] = memory_check()

    # Interrupts (uio_pci_generic), and a second driver of the same device refused.
    with connect(device="pci:pvfs2") as fs:
        transport: Any = fs.transport
        fs.write_bytes("irq.txt", b"x" * 300_000)
        out["irq"] = {"fds": len(transport.interrupt_fds()),
                      "events": transport.interrupt.count,
                      "read_back": fs.read_bytes("irq.txt") == b"x" * 300_000}
        out["second_user"] = error_of(lambda: open_device("pci:pvfs2"))
    fn = PciFunction(address["pvfs2"])
    out["status_after_close"] = _status_after_close(fn)

    # Polling: the function is taken from uio_pci_generic and given back.
    with connect(device=f"pci:{address['pvfs2']}", completions="poll") as fs:
        fs.write_bytes("poll.txt", b"polled")
        out["poll"] = {"fds": len(fs.transport.interrupt_fds()),
                       "driver_during": driver(fn.sysdir),
                       "read_back": fs.read_bytes("poll.txt") == b"polled"}
    out["poll"]["driver_after"] = driver(fn.sysdir)

    # The request economy (compared on the host with the vhost-user transport's).
    with connect(device="pci:pvfs2") as fs:
        run_sequence(fs, "sequence")
        out["sequence"] = {"requests": counts(fs), "tree": tree(fs, "sequence")}

    # The command line: the device as SHARE, or as --device (once as a real process).
    cli = [sys.executable, "-B", "-m", "pyvirtiofs"]
    ls = subprocess.run([*cli, "ls", "--device", "pci:pvfs2", "/"], capture_output=True,
                        text=True, timeout=120)
    out["cli"] = {"ls": [ls.returncode, ls.stdout, ls.stderr],
                  "cat": run_cli(["cat", "pci:pvfs2", "/poll.txt"]),
                  "bad": run_cli(["ls", "--device", "pci:nope", "/"])}

    # Held by the kernel's virtio-pci: refused, or taken with take=True and given back.
    _write(f"{fn.sysdir}/driver/unbind", fn.address)
    _write(f"{fn.sysdir}/driver_override", "virtio-pci")
    _write(f"{SYS_PCI}/drivers/virtio-pci/bind", fn.address)
    out["held"] = {"driver": driver(fn.sysdir),
                   "listed": {f.tag: f.driver for f in list_virtio_fs_functions()},
                   "refused": error_of(lambda: open_device("pci:pvfs2"))}
    with connect(device="pci:pvfs2", take=True) as fs:
        out["held"]["driver_during"] = driver(fn.sysdir)
        out["held"]["read_back"] = fs.read_bytes("poll.txt") == b"polled"
    out["held"]["driver_after"] = driver(fn.sysdir)
    _write(f"{fn.sysdir}/driver/unbind", fn.address)
    _write(f"{fn.sysdir}/driver_override", "uio_pci_generic")
    _write(f"{SYS_PCI}/drivers/uio_pci_generic/bind", fn.address)
    out["restored"] = driver(fn.sysdir)
    return out


def _status_after_close(fn: Any) -> int:
    """The device status byte read through the configuration window (0: reset)."""
    from pyvirtiofs.hw.guest.pci import parse_capabilities

    try:
        caps = parse_capabilities(fn.config())
        return fn.read_through_window(caps, caps.common, 0x14, 1)[0]
    finally:
        fn.close_config()


def mmio_checks() -> dict[str, Any]:
    from pyvirtiofs.api import connect
    from pyvirtiofs.hw.guest.mmio import find_mmio

    out: dict[str, Any] = {}
    region, drv = find_mmio("pvfs")
    out["found"] = {"name": region.name, "base": region.base, "driver": drv}
    out["by_address"] = error_of(lambda: open_device(f"mmio:{region.base:#x}"))
    out["not_found"] = error_of(lambda: open_device("mmio:nope"))
    out["interrupts"] = error_of(lambda: open_device("mmio:pvfs", completions="interrupt"))
    sysdir = f"{SYS_PLATFORM}/devices/{region.name}"
    _write(f"{sysdir}/driver_override", "virtio-mmio")
    _write(f"{SYS_PLATFORM}/drivers/virtio-mmio/bind", region.name)
    out["held"] = {"driver": driver(sysdir),
                   "refused": error_of(lambda: open_device(f"mmio:{region.base:#x}"))}
    with connect(device=f"mmio:{region.base:#x}", take=True) as fs:
        fs.write_bytes("taken.txt", b"taken")
        out["held"]["driver_during"] = driver(sysdir)
        out["held"]["read_back"] = fs.read_bytes("taken.txt") == b"taken"
    out["held"]["driver_after"] = driver(sysdir)
    _write(f"{sysdir}/driver/unbind", region.name)
    _write(f"{sysdir}/driver_override", "none")
    out["restored"] = driver(sysdir)
    return out


def main(argv: list[str]) -> int:
    result = pci_checks() if argv == ["pci"] else mmio_checks()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
