"""A virtio-fs device driven from this VM's userspace: the bring-up both buses share.

:class:`GuestTransport` implements :class:`~pyvirtiofs.hw.transport.VirtioTransport` over
a device's registers (:class:`DeviceRegisters`: the PCI and MMIO modules map them) and
hugepage memory (:class:`~pyvirtiofs.hw.guest.dma.HugepageMemory`). It follows the
driver initialisation of virtio 1.2 §3.1.1: reset, ACKNOWLEDGE, DRIVER, features
(VERSION_1 required; EVENT_IDX and INDIRECT_DESC when offered and wanted), FEATURES_OK read
back, the device's configuration (tag, request queues) read under its generation counter,
the queues, DRIVER_OK. Every value the device reports is checked before it is used. Close
resets the device and waits for the reset before the memory goes back to the system.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pyvirtiofs.hw.guest.dma import HugepageMemory
from pyvirtiofs.hw.guest.errors import GuestDeviceError
from pyvirtiofs.hw.transport import DeviceGone, DmaMemory
from pyvirtiofs.hw.virtqueue import (
    MAX_QUEUE_SIZE,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    SplitVirtqueue,
)

log = logging.getLogger(__name__)

__all__ = [
    "ACKNOWLEDGE",
    "DEVICE_NEEDS_RESET",
    "DRIVER",
    "DRIVER_OK",
    "FAILED",
    "FEATURES_OK",
    "VIRTIO_F_ACCESS_PLATFORM",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_ID_FS",
    "DeviceRegisters",
    "FsConfig",
    "GuestTransport",
    "Interrupt",
    "parse_fs_config",
]

# device status bits (virtio 1.2 §2.1)
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128
# feature bits
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_ID_FS = 26

FS_CONFIG_SIZE = 40  # tag[36], le32 num_request_queues
TAG_SIZE = 36
MAX_REQUEST_QUEUES = 1024
DEFAULT_MEMORY = 16 << 20
DEFAULT_QUEUE_SIZE = 256
DEFAULT_POLL_INTERVAL = 0.0005
RING_ALIGN = 4096
_GENERATION_TRIES = 16


class DeviceRegisters(Protocol):
    """A virtio device's common registers, as one bus exposes them (PCI: the common and
    device configuration structures in a BAR; MMIO: the register window)."""

    name: str  # for messages: "PCI 0000:00:04.0", "MMIO 0xfeb02e00"

    def status(self) -> int: ...
    def set_status(self, value: int) -> None: ...
    def device_features(self) -> int: ...
    def set_driver_features(self, value: int) -> None: ...
    def config_generation(self) -> int: ...
    def read_config(self, offset: int, length: int) -> bytes: ...
    def num_queues(self) -> int | None: ...  # None: the bus does not say
    def queue_max_size(self, index: int) -> int: ...  # 0: no such queue
    def enable_queue(self, index: int, size: int, desc: int, driver: int, device: int,
                     ) -> None: ...
    def notify(self, index: int) -> None: ...
    def close(self) -> None: ...  # unmap, give the device back to whoever had it


class Interrupt(Protocol):
    """A descriptor that becomes readable when the device interrupts."""

    def fileno(self) -> int: ...
    def ack(self) -> None: ...  # consume the event, drop the line, re-enable it
    def close(self) -> None: ...


@dataclass(frozen=True)
class FsConfig:
    """The virtio-fs device configuration (virtio 1.2 §5.11.4)."""

    tag: str
    num_request_queues: int


def parse_fs_config(raw: bytes) -> FsConfig:
    """Decode and check the 40-byte virtio-fs configuration."""
    if len(raw) < FS_CONFIG_SIZE:
        raise GuestDeviceError(errno.EPROTO, f"virtio-fs configuration of {len(raw)} bytes "
                               f"(needs {FS_CONFIG_SIZE})")
    tag_bytes = raw[:TAG_SIZE]
    end = tag_bytes.find(b"\0")
    name = tag_bytes if end < 0 else tag_bytes[:end]
    if end >= 0 and tag_bytes[end:].strip(b"\0"):
        raise GuestDeviceError(errno.EPROTO, f"device tag {tag_bytes!r} has bytes after its "
                               "terminating NUL")
    try:
        tag = name.decode("utf-8")
    except UnicodeDecodeError:
        raise GuestDeviceError(errno.EPROTO, f"device tag {name!r} is not UTF-8") from None
    if not tag:
        raise GuestDeviceError(errno.EPROTO, "device reports an empty tag")
    queues = int.from_bytes(raw[TAG_SIZE:FS_CONFIG_SIZE], "little")
    if not 1 <= queues <= MAX_REQUEST_QUEUES:
        raise GuestDeviceError(errno.EPROTO, f"device reports {queues} request queues "
                               f"(expected 1..{MAX_REQUEST_QUEUES})")
    return FsConfig(tag, queues)


def read_config_stable(regs: DeviceRegisters, length: int) -> bytes:
    """The device configuration, read until the generation counter is the same before and
    after (the device may change it while we read)."""
    for _ in range(_GENERATION_TRIES):
        before = regs.config_generation()
        raw = regs.read_config(0, length)
        if regs.config_generation() == before:
            return raw
    raise GuestDeviceError(errno.EPROTO, f"{regs.name}: the configuration generation keeps "
                           "changing; cannot read a consistent configuration")


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _feature_names(bits: int) -> str:
    names = {VIRTIO_F_VERSION_1: "VERSION_1", VIRTIO_F_ACCESS_PLATFORM: "ACCESS_PLATFORM",
             VIRTIO_RING_F_EVENT_IDX: "EVENT_IDX", VIRTIO_RING_F_INDIRECT_DESC: "INDIRECT_DESC"}
    return ",".join(names.get(b, str(b)) for b in range(64) if bits >> b & 1) or "none"


class GuestTransport:
    """A virtio-fs device of this VM, driven from userspace (see module doc).

    ``interrupt``: where completions are signalled (PCI INTx through UIO), or None to poll
    the used rings every ``poll_interval`` seconds while requests are in flight.
    ``memory``: builds the DMA memory (default: hugepages); ``queue_size`` caps the ring
    size (the device's maximum otherwise); ``request_queues``: how many to use (1 is what
    the layers above drive).
    """

    def __init__(self, regs: DeviceRegisters, *, interrupt: Interrupt | None = None,
                 memory_size: int = DEFAULT_MEMORY, queue_size: int = DEFAULT_QUEUE_SIZE,
                 request_queues: int = 1, event_idx: bool = True, indirect: bool = False,
                 poll_interval: float = DEFAULT_POLL_INTERVAL,
                 memory: Callable[[int], DmaMemory] = HugepageMemory,
                 reset_timeout: float = 5.0) -> None:
        if not 1 <= queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
            raise ValueError(f"queue_size must be a power of two up to {MAX_QUEUE_SIZE}")
        if request_queues < 1:
            raise ValueError("request_queues must be at least 1")
        self.regs = regs
        self.name = regs.name
        self.interrupt = interrupt
        self.poll_interval = 0.0 if interrupt is not None else poll_interval
        self.reset_timeout = reset_timeout
        self.queues: list[SplitVirtqueue] = []
        self._closed = False
        self._memory: DmaMemory | None = None
        try:
            self._bring_up(memory, memory_size, queue_size, request_queues, event_idx,
                           indirect)
        except BaseException:
            try:
                regs.set_status(regs.status() | FAILED)
            except Exception as exc:  # the registers may be what failed
                log.debug("cannot set FAILED on %s: %s", self.name, exc)
            self.close()
            raise

    @property
    def memory(self) -> DmaMemory:
        if self._memory is None:
            raise DeviceGone("the transport is closed")
        return self._memory

    def _bring_up(self, memory: Callable[[int], DmaMemory], memory_size: int,
                  queue_size: int, request_queues: int, event_idx: bool,
                  indirect: bool) -> None:
        regs = self.regs
        self._reset()
        regs.set_status(ACKNOWLEDGE)
        regs.set_status(ACKNOWLEDGE | DRIVER)
        offered = regs.device_features()
        if not offered >> VIRTIO_F_VERSION_1 & 1:
            raise GuestDeviceError(errno.ENOTSUP, f"{self.name} does not offer VERSION_1 "
                                   "(a legacy-only device): use a modern virtio device "
                                   "(QEMU: disable-legacy=on for PCI, "
                                   "-global virtio-mmio.force-legacy=false for MMIO)")
        wanted = 1 << VIRTIO_F_VERSION_1
        if event_idx:
            wanted |= 1 << VIRTIO_RING_F_EVENT_IDX
        if indirect:
            wanted |= 1 << VIRTIO_RING_F_INDIRECT_DESC
        self.features = offered & wanted
        self.offered_features = offered
        regs.set_driver_features(self.features)
        regs.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        if not regs.status() & FEATURES_OK:
            hint = (" It requires ACCESS_PLATFORM: its DMA goes through an IOMMU, which "
                    "this driver does not program (start the device with "
                    "iommu_platform=off)" if offered >> VIRTIO_F_ACCESS_PLATFORM & 1 else "")
            raise GuestDeviceError(errno.EPROTO, f"{self.name} refused the features "
                                   f"{_feature_names(self.features)} (offered "
                                   f"{_feature_names(offered)}).{hint}")
        self.event_idx = bool(self.features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.indirect = bool(self.features >> VIRTIO_RING_F_INDIRECT_DESC & 1)

        self.config = parse_fs_config(read_config_stable(regs, FS_CONFIG_SIZE))
        self.tag = self.config.tag
        if request_queues > self.config.num_request_queues:
            raise GuestDeviceError(errno.EINVAL, f"{self.name} has "
                                   f"{self.config.num_request_queues} request queues; "
                                   f"{request_queues} requested")
        nqueues = 1 + request_queues
        total = regs.num_queues()
        if total is not None and not nqueues <= total <= 1 + MAX_REQUEST_QUEUES:
            raise GuestDeviceError(errno.EPROTO, f"{self.name} reports {total} queues; a "
                                   f"virtio-fs device with {self.config.num_request_queues} "
                                   f"request queues has {1 + self.config.num_request_queues}")
        sizes = []
        for index in range(nqueues):
            most = regs.queue_max_size(index)
            if not 0 < most <= MAX_QUEUE_SIZE:
                raise GuestDeviceError(errno.EPROTO, f"{self.name} reports queue {index} of "
                                       f"size {most} (expected 1..{MAX_QUEUE_SIZE})")
            sizes.append(min(_floor_pow2(most), queue_size))
        ring_bytes = [(SplitVirtqueue.layout(s)[3] + RING_ALIGN - 1) // RING_ALIGN * RING_ALIGN
                      for s in sizes]
        self.buffer_start = sum(ring_bytes)
        self._memory = mem = memory(max(memory_size, self.buffer_start + (1 << 20)))
        offset = 0
        for index, size in enumerate(sizes):
            if len(mem.dma_ranges(offset, ring_bytes[index])) != 1:
                raise GuestDeviceError(errno.EFAULT, f"queue {index}'s rings are not "
                                       "physically contiguous")
            vq = SplitVirtqueue(mem.view, offset, size, event_idx=self.event_idx,
                                indirect=self.indirect)
            self.queues.append(vq)
            if self.interrupt is None:
                vq.disable_interrupts()  # we poll: spare the device its notifications
            regs.enable_queue(index, size, mem.gpa(vq.desc_offset), mem.gpa(vq.avail_offset),
                              mem.gpa(vq.used_offset))
            offset += ring_bytes[index]
        regs.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        status = regs.status()
        if status & (DEVICE_NEEDS_RESET | FAILED) or not status & DRIVER_OK:
            raise GuestDeviceError(errno.EIO, f"{self.name} did not accept DRIVER_OK "
                                   f"(status {status:#x})")
        log.info("%s: tag %r, features %s, queues %s, %s", self.name, self.tag,
                 _feature_names(self.features), sizes,
                 "interrupts" if self.interrupt is not None else "polling")

    def _reset(self) -> bool:
        """Write 0 to the status and wait until the device reads back 0 (its DMA stopped)."""
        self.regs.set_status(0)
        deadline = time.monotonic() + self.reset_timeout
        delay = 1e-5
        while self.regs.status() != 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        return True

    # -- VirtioTransport --------------------------------------------------------------------

    def kick(self, index: int) -> None:
        if self._closed:
            raise DeviceGone("kick on a closed transport")
        try:
            self.regs.notify(index)
        except (OSError, ValueError) as exc:
            raise DeviceGone(f"notify failed: {exc}") from exc

    def interrupt_fds(self) -> list[int]:
        return [] if self.interrupt is None or self._closed else [self.interrupt.fileno()]

    def ack_interrupt(self, fd: int) -> None:
        if self.interrupt is not None and not self._closed:
            self.interrupt.ack()

    def death_fd(self) -> int | None:
        return None  # a device in the VM cannot tell: alive() is asked after a timeout

    def alive(self) -> bool:
        """The device is up: DRIVER_OK and neither NEEDS_RESET nor FAILED (all ones is a
        device that went away)."""
        if self._closed:
            return False
        try:
            status = self.regs.status()
        except (OSError, ValueError):
            return False
        return (status != 0xFF and bool(status & DRIVER_OK)
                and not status & (DEVICE_NEEDS_RESET | FAILED))

    def close(self) -> None:
        """Reset the device, wait for the reset, then release interrupt, registers (the
        device goes back to its previous driver) and memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        reset = False
        try:
            reset = self._reset()
        except Exception as exc:
            log.warning("%s: reset failed: %s", self.name, exc)
        if not reset:
            log.error("%s did not complete its reset: its memory stays mapped (it may still "
                      "write there)", self.name)
        for vq in self.queues:
            vq.release()
        self.queues = []
        if self.interrupt is not None:
            self.interrupt.close()
        try:
            self.regs.close()
        finally:
            mem, self._memory = self._memory, None
            if mem is not None:
                if reset:
                    try:
                        getattr(mem, "close", lambda: None)()
                    except BufferError as exc:
                        log.debug("device memory still in use at close: %s", exc)
                else:
                    _LEAKED.append(mem)

    def __enter__(self) -> GuestTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"tag={getattr(self, 'tag', '?')!r}"
        return f"GuestTransport({self.name}, {state})"


#: Memory of devices that never finished their reset: kept mapped so no DMA lands in pages
#: the system has handed to somebody else.
_LEAKED: list[DmaMemory] = []
