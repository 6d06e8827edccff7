"""A configured tenant of the agent: its share, its confinement, its restarts."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable
from typing import Any

import msgspec

from pyvirtiofs.api.agent.config import TenantConfig
from pyvirtiofs.api.agent.confine import confine
from pyvirtiofs.api.local import VirtioFS
from pyvirtiofs.api.remote.server import Tenant

log = logging.getLogger("pyvirtiofs.agent")



class AgentTenant(Tenant):
    """A configured tenant: its share, its confinement, and how to restart its share."""

    def __init__(self, config: TenantConfig, fs: VirtioFS,
                 opener: Callable[[TenantConfig], VirtioFS]) -> None:
        super().__init__(config.id, fs, trust_client_credentials=False,
                         credentials=(config.uid, config.gid, os.getpid()),
                         limits=config.limits.to_server())
        self.config = config
        self._opener = opener

    __hash__ = object.__hash__  # tenants are identities, not values
    __eq__ = object.__eq__

    def reconfigure(self, config: TenantConfig) -> None:
        """New settings that keep the share (mode, owner, limits, key): server thread."""
        self.config = config
        self.credentials = (config.uid, config.gid, os.getpid())
        self.limits = config.limits.to_server()

    def admit(self, op: Any) -> Any:
        op = confine(self.config, op)
        return msgspec.structs.replace(op, ctx=self.credentials, groups=None)

    def alive(self) -> bool:
        fs = self.fs
        transport = fs.transport
        daemon = getattr(transport, "daemon", None)
        # Either shows a death first: the connection's EOF (once the worker and, with the
        # namespace sandbox, its parent — which holds a copy of the connection — are
        # gone) or the exit of the process we started.
        up = transport.alive() and (daemon is None or daemon.alive())
        return bool(up) and fs.session.is_alive()

    def restart(self) -> VirtioFS:
        if self.config.device is not None:
            # The device's daemon runs on the VM's host: nothing here can bring it back.
            raise OSError(errno.ENOTCONN, f"tenant {self.config.id}: the virtio-fs device "
                          f"{self.config.device} stopped answering; a device share cannot be "
                          "restarted from inside the VM (its virtiofsd runs on the host): "
                          "restart the device's daemon (or the VM), then the agent")
        old = self.fs
        with contextlib.suppress(Exception):
            old.close()
        return self._opener(self.config)

    @property
    def daemon_pid(self) -> int | None:
        return self.fs.daemon_pid
