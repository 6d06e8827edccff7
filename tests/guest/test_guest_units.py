"""The pure parts of the guest transports, on the host, without a VM: capability parsing,
physical address runs, device names, configuration checks, /proc/iomem, the common
bring-up against a register model, the environment checks, and how the API, the command
line and the agent's config take a device."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofs.api import connect
from pyvirtiofs.api.agent import ConfigError, load_config
from pyvirtiofs.api.cli.main import _device_as_share
from pyvirtiofs.api.remote.keys import generate
from pyvirtiofs.hw.guest import (
    DeviceSpec,
    GuestDeviceError,
    errors,
    is_device_spec,
    parse_device_spec,
)
from pyvirtiofs.hw.guest.dma import PhysicalLayout
from pyvirtiofs.hw.guest.errors import (
    check_iommu,
    hugepage_status,
    lockdown_mode,
    no_hugepages_error,
)
from pyvirtiofs.hw.guest.mmio import MmioRegion, parse_iomem
from pyvirtiofs.hw.guest.pci import parse_capabilities
from pyvirtiofs.hw.guest.virtio import (
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    GuestTransport,
    parse_fs_config,
    read_config_stable,
)

MiB2 = 2 << 20

# -- PCI capabilities ---------------------------------------------------------------------


def config_space(caps: list[bytes], *, status: int = 0x10, first: int = 0x40) -> bytes:
    """A 256-byte configuration space with ``caps`` chained from ``first``, 0x14 apart."""
    space = bytearray(256)
    struct.pack_into("<HH", space, 0, 0x1AF4, 0x105A)
    struct.pack_into("<H", space, 6, status)
    space[0x34] = first if caps else 0
    for i, cap in enumerate(caps):
        at = first + 0x14 * i
        space[at:at + len(cap)] = cap
        space[at + 1] = at + 0x14 if i + 1 < len(caps) else 0
    return bytes(space)


def vcap(cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    return struct.pack("<BBBBBBHII", 0x09, 0, 16 + len(extra), cfg_type, bar, 0, 0, offset,
                       length) + extra


QEMU_CAPS = [
    struct.pack("<BBH", 0x11, 0, 0x0001),  # MSI-X, disabled
    vcap(1, 4, 0x0000, 0x1000),
    vcap(3, 4, 0x1000, 0x1000),
    vcap(4, 4, 0x2000, 0x1000),
    vcap(2, 4, 0x3000, 0x1000, struct.pack("<I", 4)),
    vcap(5, 0, 0, 0, b"\0\0\0\0"),
]


def test_capabilities_of_qemus_virtio_fs_function() -> None:
    caps = parse_capabilities(config_space(QEMU_CAPS))
    assert (caps.common.bar, caps.common.offset, caps.common.length) == (4, 0, 0x1000)
    assert (caps.isr.offset, caps.device.offset, caps.notify.offset) == (0x1000, 0x2000, 0x3000)
    assert caps.notify_multiplier == 4 and caps.bars() == {4}
    assert caps.pci_cfg is not None and caps.pci_cfg.at == 0x40 + 5 * 0x14
    assert not caps.msix_enabled


def test_first_capability_with_a_valid_bar_wins() -> None:
    caps = parse_capabilities(config_space([vcap(1, 7, 0x9000, 0x10), vcap(1, 2, 0x100, 0x40),
                                            vcap(1, 4, 0x200, 0x40), *QEMU_CAPS[2:]]))
    assert (caps.common.bar, caps.common.offset) == (2, 0x100)


@pytest.mark.parametrize("space, reason", [
    (config_space(QEMU_CAPS, status=0), "no capability list"),
    (config_space(QEMU_CAPS[:3] + QEMU_CAPS[4:]), "no device configuration"),
    (config_space([vcap(2, 4, 0, 0x1000)]), "without its multiplier"),
    (config_space([struct.pack("<BBBB", 0x09, 0, 8, 1)]), "has length 8"),
    (config_space(QEMU_CAPS, first=0x20), "malformed capability list"),
    (config_space([*QEMU_CAPS[1:3], vcap(4, 4, 0x2000, 0x1000),
                   vcap(2, 4, 0x3000, 0x1000, struct.pack("<I", 3))]),
     "not even"),
    (config_space(QEMU_CAPS)[:64], "256 are readable by root only"),
])
def test_malformed_capabilities_are_refused(space: bytes, reason: str) -> None:
    with pytest.raises(GuestDeviceError, match=reason):
        parse_capabilities(space)


def test_a_capability_loop_is_refused() -> None:
    space = bytearray(config_space(QEMU_CAPS))
    space[0x40 + 0x14 * 5 + 1] = 0x40  # the last points back to the first
    with pytest.raises(GuestDeviceError, match="malformed capability list"):
        parse_capabilities(bytes(space))


# -- physical address runs ----------------------------------------------------------------


def test_adjacent_hugepages_merge_into_one_run() -> None:
    layout = PhysicalLayout(MiB2, [0x4000_0000, 0x4020_0000, 0x4040_0000])
    assert layout.runs == [(0, 0x4000_0000, 3 * MiB2)]
    assert layout.dma_ranges(MiB2 - 8, 16) == [(0x4000_0000 + MiB2 - 8, 16)]


def test_ranges_split_where_pages_are_not_adjacent() -> None:
    # Pages handed out in descending physical order, as a guest kernel often does.
    layout = PhysicalLayout(MiB2, [0x0A00_0000, 0x09E0_0000, 0x09C0_0000, 0x09E0_0000 + 0x40_0000])
    assert len(layout.runs) == 4
    assert layout.dma_ranges(MiB2 - 100, 200) == [(0x0A00_0000 + MiB2 - 100, 100),
                                                  (0x09E0_0000, 100)]
    assert layout.dma_ranges(MiB2 - 1, MiB2 + 2) == [
        (0x0A00_0000 + MiB2 - 1, 1), (0x09E0_0000, MiB2), (0x09C0_0000, 1)]
    assert layout.dma_ranges(5, 0) == []
    assert layout.gpa(3 * MiB2 + 7) == 0x0A20_0007
    assert layout.gpa(layout.size) == 0x0A20_0000 + MiB2  # the end bound


def test_mixed_runs() -> None:
    layout = PhysicalLayout(4096, [0x1000, 0x2000, 0x8000, 0x9000, 0x3000])
    assert layout.runs == [(0, 0x1000, 0x2000), (0x2000, 0x8000, 0x2000), (0x4000, 0x3000, 0x1000)]
    assert layout.dma_ranges(0x1000, 0x3800) == [(0x2000, 0x1000), (0x8000, 0x2000),
                                                 (0x3000, 0x800)]


@pytest.mark.parametrize("args", [(MiB2, []), (MiB2, [0x1000]), (3, [0]), (4096, [0, 0])])
def test_bad_layouts_are_refused(args: tuple[int, list[int]]) -> None:
    with pytest.raises(ValueError):
        PhysicalLayout(*args)


def test_ranges_outside_memory_are_refused() -> None:
    layout = PhysicalLayout(4096, [0x1000])
    for offset, length in ((0, 4097), (-1, 1), (4096, 1), (0, -1)):
        with pytest.raises(ValueError):
            layout.dma_ranges(offset, length)


# -- device names ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, spec", [
    ("pci:pvfs", DeviceSpec("pci", tag="pvfs")),
    ("pci:0000:00:04.0", DeviceSpec("pci", address="0000:00:04.0")),
    ("pci:00:1F.7", DeviceSpec("pci", address="0000:00:1f.7")),
    ("mmio:share", DeviceSpec("mmio", tag="share")),
    ("mmio:0xFEB02E00", DeviceSpec("mmio", address="0xfeb02e00")),
    ("pci:my tag:with colons", DeviceSpec("pci", tag="my tag:with colons")),
])
def test_device_names(text: str, spec: DeviceSpec) -> None:
    assert parse_device_spec(text) == spec
    assert is_device_spec(text)
    assert parse_device_spec(str(spec)) == spec


@pytest.mark.parametrize("text", ["pci:", "usb:x", "pvfs", "mmio:0xzz", "pci:" + "t" * 37,
                                  "mmio:0x0"])
def test_bad_device_names(text: str) -> None:
    with pytest.raises(ValueError, match=r"pci:TAG|tag|address"):
        parse_device_spec(text)


# -- what the device reports -------------------------------------------------------------------


def fs_config(tag: bytes, queues: int = 1) -> bytes:
    return tag.ljust(36, b"\0")[:36] + struct.pack("<I", queues)


def test_fs_configuration() -> None:
    assert parse_fs_config(fs_config(b"pvfs")).tag == "pvfs"
    assert parse_fs_config(fs_config(b"x" * 36, 4)) == parse_fs_config(fs_config(b"x" * 36, 4))
    assert parse_fs_config(fs_config("caf\u00e9".encode())).tag == "caf\u00e9"


@pytest.mark.parametrize("raw, reason", [
    (fs_config(b""), "empty tag"),
    (fs_config(b"\xff\xfe"), "not UTF-8"),
    (fs_config(b"ab\0cd"), "after its terminating NUL"),
    (fs_config(b"pvfs", 0), "0 request queues"),
    (fs_config(b"pvfs", 5000), "5000 request queues"),
    (b"pvfs", "configuration of 4 bytes"),
])
def test_bad_fs_configuration(raw: bytes, reason: str) -> None:
    with pytest.raises(GuestDeviceError, match=reason):
        parse_fs_config(raw)


IOMEM = """\
00000000-00000fff : Reserved
fe000000-fe000fff : LNRO0005:1f
feb02e00-feb02fff : LNRO0005:00
  feb02e00-feb02fff : LNRO0005:00 LNRO0005:00
d0000000-d0000fff : a003e00.virtio_mmio
c000000000-c000003fff : virtio-pci-modern
fee00000-fee00fff : Local APIC
"""


def test_iomem_lists_only_virtio_mmio_transports() -> None:
    assert parse_iomem(IOMEM) == [MmioRegion("LNRO0005:1f", 0xFE000000, 0x1000),
                                  MmioRegion("LNRO0005:00", 0xFEB02E00, 0x200),
                                  MmioRegion("a003e00.virtio_mmio", 0xD0000000, 0x1000)]


# -- the common bring-up, against a model of the registers -----------------------------------


class FakeMemory:
    """DMA memory over a bytearray, its 64 KiB pages physically in reverse order."""

    def __init__(self, size: int) -> None:
        page = 1 << 16
        pages = (size + page - 1) // page
        self.layout = PhysicalLayout(page, [0x800_0000 - page * i for i in range(pages)])
        self._buf = bytearray(pages * page)
        self.view = memoryview(self._buf)
        self.size = len(self._buf)
        self.closed = False

    def gpa(self, offset: int) -> int:
        return self.layout.gpa(offset)

    def dma_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self.layout.dma_ranges(offset, length)

    def close(self) -> None:
        self.view.release()
        self.closed = True


class FakeRegisters:
    """The common registers of a virtio-fs device, as a bus would show them."""

    name = "fake"

    def __init__(self, *, features: int = (1 << 32) | (1 << 29) | (1 << 28),
                 queue_max: tuple[int, ...] = (128, 128), num_queues: int | None = 2,
                 tag: bytes = b"pvfs", accept: bool = True, resets: bool = True,
                 generations: list[int] | None = None) -> None:
        self.features = features
        self.queue_max = queue_max
        self._num_queues = num_queues
        self.config = fs_config(tag)
        self.accept = accept
        self.resets = resets
        self.generations = generations
        self.value = 0x0F if not resets else 0
        self.statuses: list[int] = []
        self.driver_features: int | None = None
        self.queues: dict[int, tuple[int, int, int, int]] = {}
        self.notified: list[int] = []
        self.closed = False

    def status(self) -> int:
        return self.value

    def set_status(self, value: int) -> None:
        self.statuses.append(value)
        if value == 0 and not self.resets:
            return
        if value & FEATURES_OK and not self.accept:
            value &= ~FEATURES_OK
        self.value = value

    def device_features(self) -> int:
        return self.features

    def set_driver_features(self, value: int) -> None:
        self.driver_features = value

    def config_generation(self) -> int:
        return self.generations.pop(0) if self.generations else 0

    def read_config(self, offset: int, length: int) -> bytes:
        return self.config[offset:offset + length]

    def num_queues(self) -> int | None:
        return self._num_queues

    def queue_max_size(self, index: int) -> int:
        return self.queue_max[index] if index < len(self.queue_max) else 0

    def enable_queue(self, index: int, size: int, desc: int, driver: int, device: int) -> None:
        self.queues[index] = (size, desc, driver, device)

    def notify(self, index: int) -> None:
        self.notified.append(index)

    def close(self) -> None:
        self.closed = True


def transport(regs: FakeRegisters, **kwargs: Any) -> GuestTransport:
    kwargs.setdefault("memory", FakeMemory)
    return GuestTransport(regs, memory_size=1 << 20, reset_timeout=0.05, **kwargs)


def test_bring_up_negotiates_sets_up_queues_and_resets_on_close() -> None:
    regs = FakeRegisters(queue_max=(1024, 100))
    t = transport(regs)
    assert regs.statuses == [0, 1, 3, 11, 15]
    assert regs.driver_features == (1 << 32) | (1 << 29)  # INDIRECT_DESC is not wanted
    assert (t.tag, t.event_idx, t.indirect) == ("pvfs", True, False)
    mem = t.memory
    sizes = {i: q[0] for i, q in regs.queues.items()}
    assert sizes == {0: 256, 1: 64}  # capped at queue_size 256, rounded down to a power of 2
    for index, vq in enumerate(t.queues):
        assert regs.queues[index][1:] == (mem.gpa(vq.desc_offset), mem.gpa(vq.avail_offset),
                                          mem.gpa(vq.used_offset))
    assert t.interrupt_fds() == [] and t.poll_interval > 0 and t.death_fd() is None
    assert t.alive()
    t.kick(1)
    assert regs.notified == [1]
    t.close()
    assert regs.statuses[-1] == 0 and regs.closed and mem.closed  # type: ignore[attr-defined]
    assert not t.alive()
    t.close()  # idempotent


def test_indirect_descriptors_when_wanted_and_offered() -> None:
    t = transport(FakeRegisters(), indirect=True, event_idx=False)
    assert (t.indirect, t.event_idx) == (True, False)
    t.close()


@pytest.mark.parametrize("regs, code, reason", [
    (FakeRegisters(features=1 << 29), errno.ENOTSUP, "does not offer VERSION_1"),
    (FakeRegisters(accept=False), errno.EPROTO, "refused the features"),
    (FakeRegisters(accept=False, features=(1 << 32) | (1 << 33)), errno.EPROTO,
     "requires ACCESS_PLATFORM"),
    (FakeRegisters(queue_max=(128, 0)), errno.EPROTO, "queue 1 of size 0"),
    (FakeRegisters(queue_max=(128, 65536)), errno.EPROTO, "queue 1 of size 65536"),
    (FakeRegisters(num_queues=1), errno.EPROTO, "reports 1 queues"),
    (FakeRegisters(tag=b""), errno.EPROTO, "empty tag"),
    (FakeRegisters(generations=list(range(100))), errno.EPROTO, "generation keeps changing"),
])
def test_bring_up_refuses_what_a_device_should_not_report(regs: FakeRegisters, code: int,
                                                          reason: str) -> None:
    with pytest.raises(GuestDeviceError, match=reason) as info:
        transport(regs)
    assert info.value.errno == code
    assert any(s & FAILED for s in regs.statuses) and regs.statuses[-1] == 0 and regs.closed


def test_configuration_read_again_when_the_generation_moves() -> None:
    regs = FakeRegisters(generations=[1, 2, 2, 2])
    assert parse_fs_config(read_config_stable(regs, 40)).tag == "pvfs"


def test_a_device_that_never_resets_keeps_its_memory() -> None:
    made: list[FakeMemory] = []

    def memory(size: int) -> FakeMemory:
        made.append(FakeMemory(size))
        return made[-1]

    regs = FakeRegisters()
    t = transport(regs, memory=memory)
    regs.resets = False
    regs.value = 0x0F
    t.close()
    assert regs.closed and not made[0].closed  # it may still write there


def test_device_status_decides_alive() -> None:
    regs = FakeRegisters()
    t = transport(regs)
    for value, alive in ((DRIVER_OK | 0x0B, True), (0x4F, False), (0xFF, False), (0x0B, False)):
        regs.value = value
        assert t.alive() is alive
    regs.value = 0x0F
    t.close()


# -- the environment checks ---------------------------------------------------------------------


def test_lockdown_mode(tmp_path: Path) -> None:
    f = tmp_path / "lockdown"
    f.write_text("none [integrity] confidentiality\n")
    assert lockdown_mode(str(f)) == "integrity"
    f.write_text("[none] integrity confidentiality\n")
    assert lockdown_mode(str(f)) == "none"
    assert lockdown_mode(str(tmp_path / "missing")) is None


def test_lockdown_refuses_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(errors, "lockdown_mode", lambda: "integrity")
    with pytest.raises(GuestDeviceError, match=r"locked down \(integrity\).*lockdown=none"):
        errors.check_lockdown()
    monkeypatch.setattr(errors, "lockdown_mode", lambda: "none")
    errors.check_lockdown()


def test_iommu_check(tmp_path: Path) -> None:
    groups = tmp_path / "iommu_groups"
    (groups / "7").mkdir(parents=True)
    device = tmp_path / "0000:00:04.0"
    device.mkdir()
    check_iommu(str(device), str(groups))  # not in a group: physical addresses are fine
    (device / "iommu_group").symlink_to(groups / "7")
    (groups / "7" / "type").write_text("identity\n")
    check_iommu(str(device), str(groups))  # passthrough domain: fine too
    (groups / "7" / "type").write_text("DMA\n")
    with pytest.raises(GuestDeviceError, match=r"virtual IOMMU is present.*group 7"):
        check_iommu(str(device), str(groups))
    with pytest.raises(GuestDeviceError, match="1 IOMMU group"):
        check_iommu(None, str(groups))
    check_iommu(None, str(tmp_path / "none"))


def test_hugepage_messages(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("HugePages_Total:      64\nHugePages_Free:       10\n"
                       "HugePages_Rsvd:        4\nHugepagesize:       2048 kB\n")
    assert hugepage_status(str(meminfo)) == (64, 6, MiB2)
    message = no_hugepages_error(8).strerror or ""
    assert "vm.nr_hugepages=" in message and "8 needed" in message


# -- how the API, the command line and the agent take a device -----------------------------------


def test_connect_takes_exactly_one_share_and_never_restarts_a_device() -> None:
    with pytest.raises(TypeError, match="exactly one"):
        connect(socket="/nonexistent", device="pci:x")
    with pytest.raises(ValueError, match="device's daemon runs on the VM's host"):
        connect(device="pci:x", restart=True)
    if os.geteuid() != 0:
        with pytest.raises(GuestDeviceError, match="needs root"):
            connect(device="pci:x")


def test_cli_device_option_becomes_the_share() -> None:
    assert _device_as_share(["ls", "--device", "pci:x", "-l", "/"]) == ["ls", "pci:x", "-l", "/"]
    assert _device_as_share(["-v", "cat", "--device=mmio:0x1", "/a"]) == ["-v", "cat",
                                                                           "mmio:0x1", "/a"]
    assert _device_as_share(["serve", "--bind", "tcp://*:1", "--device", "pci:t"]) == [
        "serve", "pci:t", "--bind", "tcp://*:1"]
    assert _device_as_share(["ls", "/", "--", "--device"]) == ["ls", "/", "--", "--device"]


def test_agent_tenant_with_a_device(tmp_path: Path) -> None:
    for name in ("agent", "alice"):
        generate(tmp_path / "keys", name)
    config = tmp_path / "agent.toml"
    base = ('[agent]\nbind = "tcp://127.0.0.1:5555"\nkey_file = "keys/agent.key_secret"\n'
            'runtime_dir = "run"\n\n[tenants.alice]\npublic_key = "keys/alice.key"\n')
    config.write_text(base + 'device = "pci:00:04.0"\nroot = "alice"\n')
    tenant = load_config(config).tenants["alice"]
    assert (tenant.device, tenant.root, tenant.source, tenant.socket) == (
        "pci:0000:00:04.0", "alice", None, None)
    assert tenant.share_identity() != tenant.__class__(**{**tenant.__dict__,
                                                          "device": "pci:y"}).share_identity()
    config.write_text(base + 'device = "usb:x"\n')
    with pytest.raises(ConfigError, match=r"agent.toml:8: device 'usb:x'"):
        load_config(config)
    config.write_text(base + 'device = "pci:x"\nshare = "."\n')
    with pytest.raises(ConfigError, match="exactly one of share"):
        load_config(config)
