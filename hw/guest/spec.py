"""Naming a virtio-fs device of this VM: ``pci:TAG``, ``pci:0000:00:04.0``, ``mmio:TAG``,
``mmio:0xfeb02e00``; and opening it as a transport."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pyvirtiofs.hw.guest.pci import PCI_ADDRESS
from pyvirtiofs.hw.guest.virtio import GuestTransport

__all__ = ["DEVICE_SCHEMES", "DeviceSpec", "is_device_spec", "open_device",
           "parse_device_spec"]

DEVICE_SCHEMES = ("pci:", "mmio:")


@dataclass(frozen=True)
class DeviceSpec:
    """A parsed device name: the bus, and either an address or a tag."""

    bus: Literal["pci", "mmio"]
    address: str | None = None  # "0000:00:04.0" or "0xfeb02e00"
    tag: str | None = None

    @property
    def target(self) -> str:
        """What the bus's opener looks for (the address, else the tag)."""
        return self.address if self.address is not None else self.tag or ""

    def __str__(self) -> str:
        return f"{self.bus}:{self.target}"


def is_device_spec(text: str) -> bool:
    """Whether ``text`` names a device (starts with ``pci:`` or ``mmio:``)."""
    return text.startswith(DEVICE_SCHEMES)


def parse_device_spec(text: str) -> DeviceSpec:
    """Parse ``pci:TAG|ADDRESS`` or ``mmio:TAG|0xADDRESS``; ``ValueError`` with the
    accepted forms otherwise. A PCI address may leave out its domain (``00:04.0``)."""
    bus, sep, rest = text.partition(":")
    forms = "pci:TAG, pci:0000:00:04.0, mmio:TAG or mmio:0xfeb02e00"
    if not sep or bus not in ("pci", "mmio"):
        raise ValueError(f"device {text!r}: expected {forms}")
    if not rest:
        raise ValueError(f"device {text!r} names no tag or address: expected {forms}")
    if len(rest.encode()) > 36 and not (bus == "mmio" and rest.lower().startswith("0x")):
        raise ValueError(f"device {text!r}: a virtio-fs tag has at most 36 bytes")
    if "\0" in rest:
        raise ValueError(f"device {text!r}: NUL in the tag")
    if bus == "pci":
        if PCI_ADDRESS.match(rest):
            address = rest.lower() if rest.count(":") == 2 else "0000:" + rest.lower()
            return DeviceSpec("pci", address=address)
        return DeviceSpec("pci", tag=rest)
    if rest.lower().startswith("0x"):
        try:
            value = int(rest, 16)
        except ValueError:
            raise ValueError(f"device {text!r}: bad address {rest!r}") from None
        if value <= 0 or value >= 1 << 64:
            raise ValueError(f"device {text!r}: address out of range")
        return DeviceSpec("mmio", address=f"{value:#x}")
    return DeviceSpec("mmio", tag=rest)


def open_device(spec: str | DeviceSpec, **kwargs: Any) -> GuestTransport:
    """Claim and bring up the device ``spec`` names (see :func:`parse_device_spec`).

    Keywords: ``completions`` (``auto``, ``interrupt``, ``poll``), ``take`` (take the
    device from a kernel driver and give it back on close), and those of
    :class:`~pyvirtiofs.hw.guest.virtio.GuestTransport` (``memory_size``,
    ``queue_size``, ``event_idx``, ``indirect``, ``poll_interval``)."""
    parsed = parse_device_spec(spec) if isinstance(spec, str) else spec
    if parsed.bus == "pci":
        from pyvirtiofs.hw.guest.pci_device import open_pci

        return open_pci(parsed.target, **kwargs)
    from pyvirtiofs.hw.guest.mmio import open_mmio

    return open_mmio(parsed.target, **kwargs)
