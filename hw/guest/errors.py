"""Why a virtio device cannot be driven from this guest's userspace, and what to do about it.

Every error the guest transports raise for the environment (not root, no hugepages, a
kernel driver holding the device, a virtual IOMMU, kernel lockdown, no such device) is a
:class:`GuestDeviceError`: an ``OSError`` whose message names the cause and the fix. The
checks here read only ``/proc`` and ``/sys``.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "GuestDeviceError",
    "check_iommu",
    "check_lockdown",
    "check_root",
    "hugepage_status",
    "lockdown_mode",
    "no_hugepages_error",
]

SYSCTL_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


class GuestDeviceError(OSError):
    """The device cannot be used from here: ``strerror`` says why and how to fix it."""

    def __init__(self, code: int, message: str, filename: str | None = None) -> None:
        super().__init__(code, message, filename)


def check_root() -> None:
    """Physical addresses (``/proc/self/pagemap``), PCI configuration writes, BAR and
    ``/dev/mem`` mappings all need root (CAP_SYS_ADMIN and CAP_SYS_RAWIO)."""
    if os.geteuid() != 0:
        raise GuestDeviceError(
            errno.EPERM,
            "driving a virtio device from userspace needs root (CAP_SYS_ADMIN for the "
            "physical addresses in /proc/self/pagemap, CAP_SYS_RAWIO for the device's "
            "registers): run as root, e.g. with sudo")


def lockdown_mode(path: str = "/sys/kernel/security/lockdown") -> str | None:
    """The kernel's lockdown mode (``none``, ``integrity``, ``confidentiality``), or None
    when securityfs does not say (not mounted, or no lockdown support)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def check_lockdown() -> None:
    """Kernel lockdown forbids mapping PCI BARs and /dev/mem from userspace."""
    mode = lockdown_mode()
    if mode not in (None, "none"):
        raise GuestDeviceError(
            errno.EPERM,
            f"the kernel is locked down ({mode}): it refuses to map device registers into "
            "userspace. Boot the guest without lockdown (lockdown=none on the kernel "
            "command line; Secure Boot turns lockdown on with some distributions' kernels)")


def check_iommu(sysdir: str | None = None, groups: str = "/sys/kernel/iommu_groups") -> None:
    """Descriptors carry physical addresses: under a translating IOMMU the device would
    see I/O virtual addresses instead and its DMA would fail or land elsewhere.

    ``sysdir`` is the device's sysfs folder: a device in an IOMMU group whose domain is not
    ``identity`` is refused; without it, any IOMMU group in the system is refused."""
    try:
        present = os.listdir(groups)
    except OSError:
        present = []
    if sysdir is not None:
        link = os.path.join(sysdir, "iommu_group")
        if not os.path.exists(link):
            return
        try:
            with open(os.path.join(link, "type")) as f:
                domain = f.read().strip()
        except OSError:
            domain = "unknown"
        if domain == "identity":
            return
        where = f"{os.path.basename(sysdir)} is in IOMMU group " \
                f"{os.path.basename(os.path.realpath(link))} (domain {domain})"
    elif present:
        where = f"{len(present)} IOMMU group(s) in {groups}"
    else:
        return
    raise GuestDeviceError(
        errno.EOPNOTSUPP,
        f"a virtual IOMMU is present ({where}): the device would translate the physical "
        "addresses this driver puts in descriptors. Start the VM without a vIOMMU (no "
        "-device intel-iommu / virtio-iommu, or iommu_platform=off on the device), boot "
        "the guest with iommu=pt, or use VFIO instead")


def hugepage_status(meminfo: str = "/proc/meminfo") -> tuple[int, int, int]:
    """``(total, available, page_size)`` of the default hugepage pool (0s when unknown);
    available = free less those reserved by mappings not yet faulted in."""
    values: dict[str, int] = {}
    keys = ("HugePages_Total", "HugePages_Free", "HugePages_Rsvd", "Hugepagesize")
    try:
        with open(meminfo) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in keys:
                    values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return (values.get("HugePages_Total", 0),
            max(0, values.get("HugePages_Free", 0) - values.get("HugePages_Rsvd", 0)),
            values.get("Hugepagesize", 0) * 1024)


def no_hugepages_error(needed: int, detail: str = "") -> GuestDeviceError:
    """The error for too few free hugepages, saying how to reserve them."""
    total, free, size = hugepage_status()
    size_text = f"{size >> 20} MiB" if size else "huge"
    more = max(needed, needed + total - free)
    return GuestDeviceError(
        errno.ENOMEM,
        f"not enough free {size_text} pages for device memory: {needed} needed, {free} of "
        f"{total} free{f' ({detail})' if detail else ''}. Reserve them as root with "
        f"`sysctl vm.nr_hugepages={more}` (or echo {more} > {SYSCTL_HUGEPAGES}), or ask "
        "for less with memory_size=")
