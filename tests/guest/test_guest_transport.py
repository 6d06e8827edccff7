"""The whole stack inside a real TCG guest, on the guest transports (pyvirtiofs.hw.guest).

* the shared behaviour suite through virtio-pci (INTx) and through virtio-mmio (polled),
  with what happened on disk checked through a 9p view of the same host folder, and then
  once more on the host;
* a multi-tenant agent in the guest, each tenant on its own virtio-fs device, reached by
  two tenant clients on the host through a port forward;
* the requests per operation through PCI equal those through vhost-user on the host;
* claiming, polling, giving devices back, the errors, the command line.

One VM per bus is booted (``guest_vm_factory``) and shared by the module's tests.
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pyvirtiofs import client_keys, connect, connect_remote
from pyvirtiofs.api.remote.keys import generate

from .conftest import MMIO_VM, PCI_VM
from .sequence import counts, run_sequence, tree
from .vm import GUEST_SHARES, GuestJob, GuestVM

if TYPE_CHECKING:
    from .conftest import GuestFactory

pytestmark = pytest.mark.guest

HERE = Path(__file__).resolve().parent
BEHAVIOUR = HERE.parent / "api" / "test_behaviour.py"
PYTEST_ENV = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # hypothesis alone takes ~12 s in TCG


@pytest.fixture(scope="module")
def pci_vm(guest_vm_factory: GuestFactory) -> GuestVM:
    return guest_vm_factory("pci", **PCI_VM)


@pytest.fixture(scope="module")
def mmio_vm(guest_vm_factory: GuestFactory) -> GuestVM:
    return guest_vm_factory("mmio", **MMIO_VM)


def suite_names() -> list[str]:
    return sorted(re.findall(r"^def (test_\w+)", BEHAVIOUR.read_text(), re.M))


def spawn_behaviour(vm: GuestVM, device: str, prefix: str) -> GuestJob:
    """The behaviour suite in the guest through ``device`` (see guest_behaviour.py)."""
    return vm.spawn([
        vm.python_executable, "-B", "-m", "pytest", "-p", "no:cacheprovider", "-p",
        "pytest_timeout", "--noconftest", "-q", "-x",
        f"--junitxml={vm.guest_results}/behaviour-{prefix}.xml",
        str(HERE / "guest_behaviour.py")],
        env={**PYTEST_ENV, "PYVIRTIOFS_GUEST_DEVICE": device,
             "PYVIRTIOFS_GUEST_VIEW": f"{GUEST_SHARES}/{vm.tag}",
             "PYVIRTIOFS_GUEST_PREFIX": prefix})


def check_behaviour(vm: GuestVM, job: GuestJob, prefix: str) -> None:
    result = job.wait(240)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    suite = ET.parse(vm.results / f"behaviour-{prefix}.xml").getroot().find("testsuite")
    assert suite is not None
    ran = sorted(case.get("name", "") for case in suite.iter("testcase"))
    assert ran == suite_names(), result.stdout
    assert (suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("0", "0", "0")
    # And on the host, after the run: what the guest wrote is really there.
    blob = vm.share / f"{prefix}-test_write_then_read_binary_and_text" / "blob.bin"
    assert blob.stat().st_size == (3 << 20) + 4 and blob.read_bytes().endswith(b"tail")
    moved = vm.share / f"{prefix}-test_rename_link_symlink"
    assert (moved / "again").read_bytes() == b"source"
    assert (moved / "soft").readlink() == Path("again")


class PciJobs:
    """The PCI VM's two long guest jobs, started together (the guest has two CPUs): the
    behaviour suite on device ``pvfs`` and the device checks on ``pvfs2``."""

    def __init__(self, vm: GuestVM) -> None:
        self.vm = vm
        self.behaviour = spawn_behaviour(vm, f"pci:{vm.tag}", "pci")
        self.checks = vm.spawn([vm.python_executable, "-B", "-m",
                                "tests.guest.guest_device_checks", "pci"])
        self._checks: dict[str, Any] | None = None

    def checks_result(self) -> dict[str, Any]:
        if self._checks is None:
            result = self.checks.wait(300).check()
            self._checks = dict(json.loads(result.stdout))
        return self._checks

    def wait(self) -> None:
        for job in (self.behaviour, self.checks):
            job.wait(300)


@pytest.fixture(scope="module")
def pci_jobs(pci_vm: GuestVM) -> PciJobs:
    return PciJobs(pci_vm)


def test_behaviour_suite_through_pci(pci_vm: GuestVM, pci_jobs: PciJobs) -> None:
    check_behaviour(pci_vm, pci_jobs.behaviour, "pci")


def test_behaviour_suite_through_mmio(mmio_vm: GuestVM) -> None:
    check_behaviour(mmio_vm, spawn_behaviour(mmio_vm, f"mmio:{mmio_vm.tag}", "mmio"), "mmio")


def test_requests_per_operation_equal_vhost_user(pci_vm: GuestVM, pci_jobs: PciJobs) -> None:
    guest = pci_jobs.checks_result()["sequence"]
    with tempfile.TemporaryDirectory() as share, connect(share, cache="always") as fs:
        run_sequence(fs, "sequence")
        host_counts = counts(fs)
        host_tree = tree(fs, "sequence")
    assert guest["requests"] == host_counts
    assert guest["tree"] == {k: list(v) if isinstance(v, tuple) else v
                             for k, v in host_tree.items()}
    assert (pci_vm.shares["pvfs2"] / "sequence" / "a" / "b" / "big.bin").stat().st_size == 1000


def test_device_checks_pci(pci_jobs: PciJobs) -> None:
    out = pci_jobs.checks_result()
    assert out["nobody"]["errno"] == "EPERM" and "root" in out["nobody"]["message"]
    views = {"view-pvfs": "virtio-pci", "view-pvfs2": "virtio-pci"}  # the kernel's
    assert out["found"] == {"pvfs": "uio_pci_generic", "pvfs2": "uio_pci_generic", **views}
    nf = out["not_found"]
    assert nf["errno"] == "ENODEV" and "'pvfs'" in nf["message"] and "'pvfs2'" in nf["message"]
    assert out["hugepages"]["errno"] == "ENOMEM"
    assert "vm.nr_hugepages" in out["hugepages"]["message"]
    assert out["memory"] == {"runs": out["memory"]["runs"], "pages": 4, "split_ok": True,
                             "gpa_ok": True}
    irq = out["irq"]
    assert irq["fds"] == 1 and irq["events"] > 0 and irq["read_back"]
    assert out["second_user"]["errno"] == "EBUSY"
    assert "another process" in out["second_user"]["message"]
    assert out["status_after_close"] == 0
    assert out["poll"] == {"fds": 0, "driver_during": None, "read_back": True,
                           "driver_after": "uio_pci_generic"}
    held = out["held"]
    assert held["driver"] == "virtio-pci"
    assert held["listed"] == {"pvfs": "uio_pci_generic", "pvfs2": "virtio-pci", **views}
    assert held["refused"]["errno"] == "EBUSY"
    assert "virtio-pci" in held["refused"]["message"]
    assert "take=True" in held["refused"]["message"]
    assert held["driver_during"] == "uio_pci_generic" and held["driver_after"] == "virtio-pci"
    assert held["read_back"]
    assert out["restored"] == "uio_pci_generic"
    ls, cat, bad = out["cli"]["ls"], out["cli"]["cat"], out["cli"]["bad"]
    assert ls[0] == 0 and ls[1].split() == ["irq.txt", "poll.txt", "sequence"], ls
    assert cat == [0, "polled", ""]
    assert bad[0] == 1 and "no virtio-fs PCI function with tag 'nope'" in bad[2]


def test_device_checks_mmio(mmio_vm: GuestVM) -> None:
    out = json.loads(mmio_vm.python("-m", "tests.guest.guest_device_checks", "mmio",
                                    timeout=240, check=True).stdout)
    assert out["found"]["name"].startswith("LNRO0005:") and out["found"]["driver"] is None
    assert out["by_address"] == {"errno": None}
    assert out["not_found"]["errno"] == "ENODEV"
    assert out["found"]["name"] in out["not_found"]["message"]
    assert out["interrupts"]["errno"] == "ENOTSUP"
    held = out["held"]
    assert held["driver"] == "virtio-mmio" and held["refused"]["errno"] == "EBUSY"
    assert held["driver_during"] is None and held["read_back"]
    assert held["driver_after"] == "virtio-mmio"
    assert out["restored"] is None


# -- the agent in the guest ------------------------------------------------------------------


def _wait_log(job: GuestJob, event: str, timeout: float) -> dict[str, Any]:
    """The first JSON log line of ``event`` the guest job wrote (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        _, err = job.output()
        for line in err.splitlines():
            if f'"{event}"' in line:
                return dict(json.loads(line))
        if job.done():
            raise AssertionError(f"the agent ended before {event}:\n{err[-4000:]}")
        assert time.monotonic() < deadline, f"no {event} after {timeout} s:\n{err[-4000:]}"
        time.sleep(0.05)


def test_agent_in_guest_serves_two_host_tenants(pci_vm: GuestVM, pci_jobs: PciJobs) -> None:
    pci_jobs.wait()  # both devices free again
    base = pci_vm.results / "agent"
    keys = base / "keys"
    for name in ("agent", "alice", "bob"):
        generate(keys, name, force=True)
    (pci_vm.shares["pvfs"] / "tenant-alice").mkdir(exist_ok=True)
    (pci_vm.shares["pvfs2"] / "tenant-bob").mkdir(exist_ok=True)
    (pci_vm.shares["pvfs2"] / "tenant-bob" / "bob.txt").write_text("hello bob\n")
    port = pci_vm.ports[0]
    (base / "agent.toml").write_text(f"""\
[agent]
bind = "tcp://0.0.0.0:{port}"
key_file = "keys/agent.key_secret"
runtime_dir = "/tmp/agent-run"

[tenants.alice]
public_key = "keys/alice.key"
device = "pci:pvfs"
root = "tenant-alice"

[tenants.bob]
public_key = "keys/bob.key"
device = "pci:pvfs2"
root = "tenant-bob"
read_only = true
""")
    job = pci_vm.spawn([pci_vm.python_executable, "-B", "-m", "pyvirtiofs", "agent",
                        "--config", f"{pci_vm.guest_results}/agent/agent.toml"])
    pid = None
    try:
        started = _wait_log(job, "agent_started", 180)
        pid = started["pid"]
        assert sorted(started["tenants"]) == ["alice", "bob"]
        endpoint = f"tcp://127.0.0.1:{port}"
        alice = connect_remote(endpoint, timeout=60,
                               curve=client_keys(keys / "alice.key_secret", keys / "agent.key"))
        bob = connect_remote(endpoint, timeout=60,
                             curve=client_keys(keys / "bob.key_secret", keys / "agent.key"))
        errors: list[BaseException] = []

        def alice_writes() -> None:
            try:
                for i in range(8):
                    alice.write_bytes(f"note-{i}.txt", f"alice {i}\n".encode() * 1000)
                alice.write_bytes("big.bin", bytes(range(256)) * 8192)
            except BaseException as exc:
                errors.append(exc)

        def bob_reads() -> None:
            try:
                for _ in range(8):
                    assert bob.read_bytes("bob.txt") == b"hello bob\n"
                    assert bob.listdir("/") == ["bob.txt"]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=alice_writes), threading.Thread(target=bob_reads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert not errors, errors
        assert sorted(alice.listdir("/")) == ["big.bin", *[f"note-{i}.txt" for i in range(8)]]
        with pytest.raises(OSError) as info:
            bob.write_bytes("x.txt", b"no")
        assert info.value.errno == 30  # EROFS: a read-only tenant
        with pytest.raises(FileNotFoundError):
            alice.stat("../bob.txt")  # '..' stops at alice's root
        alice.close()
        bob.close()
        # On the host: alice's files are in her root of device pvfs, nothing else changed.
        root = pci_vm.shares["pvfs"] / "tenant-alice"
        assert (root / "big.bin").read_bytes() == bytes(range(256)) * 8192
        assert (root / "note-3.txt").read_bytes() == b"alice 3\n" * 1000
        bob_root = pci_vm.shares["pvfs2"] / "tenant-bob"
        assert sorted(p.name for p in bob_root.iterdir()) == ["bob.txt"]
    finally:
        if not job.done():
            if pid is None:
                pci_vm.kill()  # an agent that never started: the next test boots a new VM
            else:
                pci_vm.run(["kill", "-TERM", str(pid)], timeout=60)  # SIGTERM: clean stop
    result = job.wait(120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert '"agent_stopped"' in result.stderr
