"""The vhost-user transport: this process plays the VMM's part beside a real virtiofsd.

Modules:
    frontend   the vhost-user protocol over its Unix socket (features, memory table, vrings)
    launcher   finding and starting a virtiofsd (QEMU's C daemon or the Rust one)
    transport  :class:`VhostUserTransport`, the :class:`~pyvirtiofs.hw.transport.VirtioTransport`
               over them, and :func:`open_private_device`
"""

from pyvirtiofs.hw.vhost_user.transport import VhostUserTransport, open_private_device

__all__ = ["VhostUserTransport", "open_private_device"]
