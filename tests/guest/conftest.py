"""Fixtures for tests that boot a guest: a session-wide factory that boots each distinct
VM once and shares it, and the guest image built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .image import GuestImage, ensure_image
from .vm import GuestVM, Mode

#: The VMs the guest tests share (smoke tests included): one per bus. Two virtio-fs devices
#: on PCI; each device's folder also mounted by the guest kernel's own virtiofs (a view to
#: check results through); virtiofsd with cache=always, so no entry expires while the
#: slow guest works (request counts then depend on the client alone, as on the host).
# 128 hugepages (256 MiB): the behaviour suite and the device checks run at once in the PCI
# guest, and device memory a dying connection still exports is given back only when the
# last view of it goes; 64 ran out once on a loaded machine.
PCI_VM: dict[str, Any] = {"extra_tags": ("pvfs2",), "cache": "always", "share_views": True,
                          "ports": 1, "hugepages": 128}
MMIO_VM: dict[str, Any] = {"cache": "always", "share_views": True, "ports": 0,
                           "hugepages": 128}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guest: boots a QEMU TCG guest (tests/guest)")


class GuestFactory:
    """``factory(mode, **GuestVM keywords)`` returns a booted :class:`GuestVM`, the same
    one for the same arguments for the whole session (a new one if that one has died, e.g.
    killed after a timeout). Tests that change the guest's state for good (unbinding a
    driver, ...) should boot their own :class:`GuestVM` instead."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, image: GuestImage) -> None:
        self._tmp = tmp_path_factory
        self.image = image
        self._vms: dict[str, GuestVM] = {}

    def __call__(self, mode: Mode = "pci", **kwargs: Any) -> GuestVM:
        key = repr((mode, sorted(kwargs.items())))
        vm = self._vms.get(key)
        if vm is not None and vm.alive:
            return vm
        if vm is not None:
            vm.close()
        vm = GuestVM(mode, image=self.image, workdir=self.workdir(mode), **kwargs)
        self._vms[key] = vm.start()
        return vm

    def workdir(self, mode: str) -> Any:
        """A fresh work folder under pytest's temporary folder (kept for diagnosis)."""
        return self._tmp.mktemp(f"guest-{mode}")

    def close(self) -> None:
        for vm in self._vms.values():
            vm.close()
        self._vms.clear()


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The guest's kernel and initramfs (built on first use, then cached on disk)."""
    return ensure_image()


@pytest.fixture(scope="session")
def guest_vm_factory(tmp_path_factory: pytest.TempPathFactory,
                     guest_image: GuestImage) -> Iterator[GuestFactory]:
    factory = GuestFactory(tmp_path_factory, guest_image)
    try:
        yield factory
    finally:
        factory.close()
