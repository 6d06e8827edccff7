"""Smoke tests of the guest harness: each boots (or shares) a real TCG guest.

One VM per configuration is shared across the module (``guest_vm_factory``); the test
that unbinds a driver boots its own. The guest-side probes are ``probe.py`` (standard
library only) and ``guest_checks.py`` (pytest in the guest).
"""

from __future__ import annotations

import json
import os
import socket
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pyvirtiofs.tools import procfs

from .conftest import MMIO_VM, PCI_VM
from .vm import GuestError, GuestTimeout, GuestVM

if TYPE_CHECKING:
    from .conftest import GuestFactory
    from .image import GuestImage

pytestmark = pytest.mark.guest

HERE = Path(__file__).resolve().parent
PROBE = HERE / "probe.py"
VERSION_1 = 1 << 32
VIRTIO_MMIO_MAGIC = 0x74726976
QEMU_VENDOR = 0x554D4551  # "QEMU"


def probe(vm: GuestVM, *args: str) -> dict[str, Any]:
    result = vm.python(str(PROBE), *args, timeout=180, check=True)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def group_alive(pgid: int) -> bool:
    """Whether any process is still in process group ``pgid``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = procfs.stat_fields(entry)
        if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@pytest.fixture(scope="module")
def pci_vm(guest_vm_factory: GuestFactory) -> GuestVM:
    return guest_vm_factory("pci", **PCI_VM)  # the VM test_guest_transport uses too


@pytest.fixture(scope="module")
def mmio_vm(guest_vm_factory: GuestFactory) -> GuestVM:
    return guest_vm_factory("mmio", **MMIO_VM)


# -- PCI -----------------------------------------------------------------------------------


def test_pci_device_is_bound_to_uio_and_its_config_is_readable(pci_vm: GuestVM) -> None:
    info = probe(pci_vm, "pci")  # the first device, tag pvfs (the others: pvfs2, views)
    assert len(info["devices"]) == 2 * len(pci_vm.tags), info
    assert info["driver"] == "uio_pci_generic"
    assert info["virtio_devices"] == {}  # virtio_pci never saw it
    assert len(info["uio"]) == 1 and info["uio_dev_exists"] == [True]
    assert "mmap_error" not in info, info
    assert info["bar"] == {"index": 4, "size": 16384}
    caps = {c["type"]: c for c in info["caps"]}
    assert caps["common"]["offset"] == 0 and caps["isr"]["offset"] == 0x1000
    assert caps["device"]["offset"] == 0x2000 and caps["notify"]["offset"] == 0x3000
    assert caps["notify"]["notify_off_multiplier"] == 4
    assert caps["msix"]["enabled"] == 0
    assert info["num_queues"] == 2
    assert info["num_request_queues"] == 1
    assert info["device_features"] & VERSION_1
    assert info["device_status"] == 0
    assert info["tag"] == pci_vm.tag
    assert info["command"] & 0x4 == 0, "bus mastering should be off after boot"
    assert info["hugepages"]["total"] == pci_vm.hugepages
    assert info["hugepages"]["mounts"] == ["/dev/hugepages"]


def test_pci_device_left_to_virtio_pci_can_be_unbound(guest_image: GuestImage,
                                                      guest_vm_factory: GuestFactory) -> None:
    with GuestVM("pci", fs_driver="virtio_pci", ports=0, image=guest_image,
                 workdir=guest_vm_factory.workdir("pci-virtio")) as vm:
        before = probe(vm, "pci")
        assert before["driver"] == "virtio-pci"
        # The kernel made a virtio device of it, but no driver takes a file system device:
        # the kernel ships one (virtiofs.ko), which /init loads only for share views.
        assert guest_image.kernel_has_module("virtiofs")
        assert vm.run(["/bin/sh", "-c", "test ! -e /sys/module/virtiofs"]).returncode == 0
        assert list(before["virtio_devices"].values()) == [None]
        assert before["mmap_error"] == "EINVAL"  # BARs cannot be mapped while claimed
        after = probe(vm, "pci", "--unbind")
        assert after["driver_after_unbind"] is None
        assert "mmap_error" not in after, after
        assert after["num_queues"] == 2 and after["tag"] == vm.tag


# -- MMIO ----------------------------------------------------------------------------------


def test_mmio_registers_through_dev_mem(mmio_vm: GuestVM) -> None:
    info = probe(mmio_vm, "mmio")
    fs = [t for t in info["transports"] if t.get("device_id") == 26]
    assert len(fs) == 1, info
    t = fs[0]
    assert t["magic"] == VIRTIO_MMIO_MAGIC
    assert t["version"] == 2
    assert t["vendor_id"] == QEMU_VENDOR
    assert t["driver"] is None and t["driver_override"] == "none"
    assert t["size"] == 0x200 and t["tag"] == mmio_vm.tag
    assert isinstance(t["gsi"], int) and t["gsi"] >= 24  # on the second IO-APIC
    assert info["hugepages"]["total"] == mmio_vm.hugepages


def test_mmio_fuse_init_by_polling(mmio_vm: GuestVM) -> None:
    info = probe(mmio_vm, "mmio-init")
    assert "error" not in info or info["error"] == 0, info
    assert info["device_features"] & VERSION_1
    assert (info["error"], info["unique"], info["major"]) == (0, 1, 7), info
    assert info["minor"] >= 27 and info["used_len"] == info["reply_len"] == 80
    assert info["interrupt_status"] & 1  # used-buffer notification pending


# -- network, results, failures --------------------------------------------------------------


def test_host_reaches_a_guest_tcp_server(pci_vm: GuestVM) -> None:
    port = pci_vm.ports[0]
    job = pci_vm.spawn([pci_vm.python_executable, "-B", str(PROBE), "echo", str(port)])
    marker = pci_vm.results / f"echo-{port}.listening"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert not job.done(), job.output()
        assert time.monotonic() < deadline, "the guest server never listened"
        time.sleep(0.05)
    payload = os.urandom(200_000)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := conn.recv(65536):
            received += chunk
    assert bytes(received) == payload
    result = job.wait(120).check()
    assert json.loads(result.stdout)["bytes"] == len(payload)


def test_guest_results_reach_the_host(pci_vm: GuestVM) -> None:
    junit = f"{pci_vm.guest_results}/guest-checks.xml"
    # Without the installed plugins' auto-loading: importing hypothesis alone takes about
    # 12 s under TCG. pytest-timeout is loaded by name for the project's `timeout` setting.
    result = pci_vm.python("-m", "pytest", "-p", "no:cacheprovider", "-p", "pytest_timeout",
                           "--noconftest", "-q", f"--junitxml={junit}",
                           str(HERE / "guest_checks.py"),
                           env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stdout, result.stdout
    suite = ET.parse(pci_vm.results / "guest-checks.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"),
            suite.get("skipped")) == ("3", "0", "0", "0")
    data = json.loads((pci_vm.results / "guest-checks.json").read_text())
    assert data["executable"] == pci_vm.python_executable
    assert data["kernel"] == pci_vm.info["release"] and data["mode"] == "pci"
    assert "pvfs-init: ready" in pci_vm.console_log.read_text()


def test_command_status_and_output_come_back(pci_vm: GuestVM) -> None:
    result = pci_vm.run(["/bin/sh", "-c", 'echo "out $PWD"; echo err >&2; exit 3'],
                        cwd="/tmp", timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out /tmp\n", "err\n")
    with pytest.raises(GuestError, match="exited with 3"):
        result.check()
    missing = pci_vm.run(["/nonexistent/program"], timeout=60)
    assert missing.returncode == 127


def test_boot_timeout_kills_everything(guest_image: GuestImage,
                                       guest_vm_factory: GuestFactory) -> None:
    vm = GuestVM("pci", boot_timeout=1.0, image=guest_image,
                 workdir=guest_vm_factory.workdir("timeout"))
    with pytest.raises(GuestTimeout, match="not ready after 1 s"):
        vm.start()
    assert vm.qemu_pid is not None and vm.virtiofsd_pid is not None
    assert not vm.alive
    assert not group_alive(vm.qemu_pid) and not group_alive(vm.virtiofsd_pid)
