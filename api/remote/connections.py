"""The server's connection records: whose each connection (a ZeroMQ routing id) is, when
it was last heard from, and the open handles it holds.

A handle is a server-side actor (a file's or a directory's) owned by one connection: its
id is a random 62-bit number, checked against that connection; it was opened in one
generation of its tenant's share, and a restart of the share makes it stale (``ESTALE``,
nothing left to release). Dropping a connection stops its handles' actors (they send
RELEASE). Plain books, no sockets: the server thread alone calls them, and keeps the
tenant's counters (clients, open handles) right as it goes.
"""

from __future__ import annotations

import contextlib
import errno
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pyvirtiofs.actors import messages as m
from pyvirtiofs.api.remote.tenancy import Tenant

__all__ = ["Connection", "Connections", "OpenHandle"]

_DIR_OPS = (m.ReadDir, m.Rewind, m.FSyncDir)


@dataclass(frozen=True, slots=True)
class OpenHandle:
    """An open file or directory of a connection: its actor, and the share generation
    it was opened in."""

    actor: Any  # an ActorRef (anything with is_alive() and stop(block=False))
    is_dir: bool
    generation: int


@dataclass(eq=False)
class Connection:
    identity: bytes
    tenant: Tenant
    last_seen: float
    handles: dict[int, OpenHandle] = field(default_factory=dict)

    def live_handles(self) -> int:
        """Handles opened in the tenant's current share (the others are stale)."""
        generation = self.tenant.stats.generation
        return sum(1 for h in list(self.handles.values()) if h.generation == generation)


class Connections:
    """The connections the server knows (see the module's doc)."""

    def __init__(self) -> None:
        self._by_identity: dict[bytes, Connection] = {}

    def __len__(self) -> int:
        return len(self._by_identity)

    def __iter__(self) -> Iterator[Connection]:
        """The connections (a copy: safe while connections are added or dropped)."""
        return iter(list(self._by_identity.values()))

    def __contains__(self, identity: object) -> bool:
        return identity in self._by_identity

    def get(self, identity: bytes) -> Connection | None:
        return self._by_identity.get(identity)

    def is_current(self, conn: Connection) -> bool:
        """Whether ``conn`` is still connected (not dropped, nor replaced)."""
        return self._by_identity.get(conn.identity) is conn

    def add(self, identity: bytes, tenant: Tenant, now: float) -> Connection:
        conn = self._by_identity[identity] = Connection(identity, tenant, now)
        tenant.stats.clients += 1
        return conn

    def remove(self, conn: Connection) -> int | None:
        """Forget ``conn`` and stop its handles' actors; how many of them were live
        (None: it was not connected)."""
        if not self.is_current(conn):
            return None
        del self._by_identity[conn.identity]
        stats = conn.tenant.stats
        stats.clients -= 1
        live = conn.live_handles()
        for handle in conn.handles.values():
            _stop(handle.actor)
        conn.handles.clear()
        stats.open_handles -= live
        if stats.clients == 0:
            stats.request_rate = 0.0
        return live

    def silent_since(self, deadline: float) -> list[Connection]:
        """Connections not heard from since ``deadline``."""
        return [c for c in self._by_identity.values() if c.last_seen < deadline]

    def of_tenant(self, tenant: Tenant) -> list[Connection]:
        return [c for c in self._by_identity.values() if c.tenant is tenant]

    def tenants(self) -> list[Tenant]:
        """The tenants with a connection (each once)."""
        return list({id(c.tenant): c.tenant for c in self._by_identity.values()}.values())

    def per_tenant(self) -> dict[str, dict[str, int]]:
        """Connections and live handles by tenant name (a snapshot other threads may take
        without locking)."""
        out: dict[str, dict[str, int]] = {}
        for conn in self:
            counts = out.setdefault(conn.tenant.name, {"clients": 0, "handles": 0})
            counts["clients"] += 1
            counts["handles"] += conn.live_handles()
        return out

    # -- handles ----------------------------------------------------------------------------

    def register(self, conn: Connection, actor: Any, *, is_dir: bool, generation: int) -> int:
        """Give a newly opened handle actor an id on ``conn`` (0: ``conn`` has left
        meanwhile, and the actor was stopped). ``ESTALE`` if the share was restarted
        while it opened (the actor is stopped too)."""
        if not self.is_current(conn):
            _stop(actor)  # the client left while its open was in flight
            return 0
        if generation != conn.tenant.stats.generation:
            _stop(actor)  # opened on a share that has been restarted since
            raise OSError(errno.ESTALE, "the share was restarted while opening")
        handle = secrets.randbits(62) | 1
        while handle in conn.handles:
            handle = secrets.randbits(62) | 1
        conn.handles[handle] = OpenHandle(actor, is_dir, generation)
        conn.tenant.stats.open_handles += 1
        return handle

    def actor_for(self, conn: Connection, handle: int, op: Any) -> Any | None:
        """The actor to serve ``op`` on ``handle``. A Close forgets the handle, and gets
        None if it was stale (its share was restarted: nothing is left to release).
        ``EBADF`` for a handle that is not this connection's or of the wrong kind,
        ``ESTALE`` for one opened before a restart."""
        entry = conn.handles.get(handle)
        if entry is None:
            raise OSError(errno.EBADF, "no such handle on this connection")
        stale = entry.generation != conn.tenant.stats.generation
        if isinstance(op, m.Close):
            del conn.handles[handle]
            if stale:
                return None
            conn.tenant.stats.open_handles -= 1
            return entry.actor
        if stale:
            raise OSError(errno.ESTALE, "the share was restarted; reopen the file")
        if entry.is_dir != isinstance(op, _DIR_OPS):
            raise OSError(errno.EBADF, "wrong kind of handle for this operation")
        return entry.actor


def _stop(actor: Any) -> None:
    with contextlib.suppress(Exception):  # (already stopped: nothing to do)
        actor.stop(block=False)
