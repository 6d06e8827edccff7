"""Transports for a virtio-fs device inside this VM, driven from userspace.

Inside a guest there is no VMM to talk to: the device is on the VM's PCI bus (or a
virtio-mmio window), and this process takes the part of the guest kernel's driver. It
claims the device from the kernel, maps its registers, gives it rings and buffers in
hugepages whose physical addresses it knows, and notifies it by register writes;
completions arrive as INTx through UIO or are polled. Nothing here knows FUSE.

Modules:
    spec        ``pci:TAG`` / ``mmio:0xADDR`` names, :func:`open_device`
    virtio      the bring-up both buses share: :class:`GuestTransport`
    pci         a PCI function through sysfs: capabilities, discovery, binding
    pci_device  the PCI transport: BAR registers, INTx through UIO, :func:`open_pci`
    mmio        the virtio-mmio transport through /dev/mem, polled: :func:`open_mmio`
    dma         hugepage memory with physical addresses
    errors      what stops a device from being used here, and how to fix it
"""

from pyvirtiofs.hw.guest.errors import GuestDeviceError
from pyvirtiofs.hw.guest.spec import DeviceSpec, is_device_spec, open_device, parse_device_spec
from pyvirtiofs.hw.guest.virtio import GuestTransport

__all__ = ["DeviceSpec", "GuestDeviceError", "GuestTransport", "is_device_spec", "open_device",
           "parse_device_spec"]
