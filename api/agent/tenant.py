"""A configured tenant of the agent: its share, its confinement, its restarts."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable
from typing import Any

import msgspec

from pyvirtiofs.actors.runtime import Future
from pyvirtiofs.api.agent.config import TenantConfig
from pyvirtiofs.api.agent.confine import confine
from pyvirtiofs.api.agent.quota import Quota, QuotaExecutor, measure
from pyvirtiofs.api.local import VirtioFS
from pyvirtiofs.api.remote.server import Tenant

log = logging.getLogger("pyvirtiofs.agent")



class AgentTenant(Tenant):
    """A configured tenant: its share, its confinement, its byte quota, and how to restart
    its share."""

    def __init__(self, config: TenantConfig, fs: VirtioFS,
                 opener: Callable[[TenantConfig], VirtioFS]) -> None:
        super().__init__(config.id, fs, trust_client_credentials=False,
                         credentials=(config.uid, config.gid, os.getpid()),
                         limits=config.limits.to_server())
        self.config = config
        self._opener = opener
        self.quota: QuotaExecutor | None = None
        self.set_quota(config, self.measure_usage(config))

    __hash__ = object.__hash__  # tenants are identities, not values
    __eq__ = object.__eq__

    @staticmethod
    def measure_usage(config: TenantConfig) -> int | None:
        """The bytes the tenant's root uses now, if it has a quota (walks the root: call
        it outside the server thread)."""
        if config.limits.max_bytes is None or config.source is None:
            return None
        return measure(config.source)

    def set_quota(self, config: TenantConfig, used: int | None) -> None:
        limit = config.limits.max_bytes
        if limit is None:
            self.quota = None
        elif self.quota is not None:
            self.quota.quota.limit = limit
        else:
            self.quota = QuotaExecutor(Quota(limit, used or 0))

    def reconfigure(self, config: TenantConfig, used: int | None = None) -> None:
        """New settings that keep the share (mode, owner, limits, key): server thread.
        ``used``: the root's usage, measured beforehand, if a quota is new."""
        self.config = config
        self.credentials = (config.uid, config.gid, os.getpid())
        self.limits = config.limits.to_server()
        self.set_quota(config, used)

    def execute(self, ref: Any, op: Any) -> Future[Any]:
        quota = self.quota
        if quota is None:
            return super().execute(ref, op)
        return quota.execute(ref, op)

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
