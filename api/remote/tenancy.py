"""Who a server serves: a :class:`Tenant`, its :class:`TenantLimits` and the counters the
server keeps for it (:class:`TenantStats`). Plain data; the server thread alone writes it."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from pyvirtiofs.actors import messages as m
from pyvirtiofs.api.remote.admission import MessageRate

if TYPE_CHECKING:
    from pyvirtiofs.actors.runtime import Future
    from pyvirtiofs.api.local import VirtioFS


@dataclass
class TenantLimits:
    """Per-tenant limits; None is unlimited.

    ``open_handles``: files and directories open at once over all the tenant's
    connections (``EMFILE`` beyond). ``bytes_in_flight``: Read sizes and Write payloads
    of requests not yet answered, and replies not yet sent (``EAGAIN`` beyond; one request
    alone is always admitted, so the bound is the larger of the limit and one request).
    ``requests_per_second``: a token bucket holding one second's worth, which every
    message draws from (``EAGAIN`` when empty; beyond eleven times the rate, or the rate
    plus 100, messages are dropped unanswered). ``requests_in_flight``: requests handed
    to the tenant's actors at once; the rest wait in the tenant's queue (at most
    ``max_queued``, ``EAGAIN`` beyond).
    ``connections``: clients at once (``EUSERS`` beyond). ``Close`` is never refused
    (that would leak), though it counts.
    """

    open_handles: int | None = None
    bytes_in_flight: int | None = None
    requests_per_second: float | None = None
    requests_in_flight: int | None = None
    max_queued: int = 4096
    connections: int | None = None


@dataclass
class TenantStats:
    """Counters the server thread keeps for a tenant (others read them as a snapshot)."""

    clients: int = 0
    open_handles: int = 0
    pending_opens: int = 0
    bytes_in_flight: int = 0  # requests' data, and replies not yet sent
    unsent_bytes: int = 0  # of which: replies handed to ZeroMQ that have not left yet
    requests_in_flight: int = 0
    queued: int = 0
    deferred: int = 0  # waiting for their connection's replies to leave
    requests: int = 0
    errors: int = 0
    dropped: int = 0  # messages beyond what refusals may cost: not answered
    rejected: dict[str, int] = field(default_factory=dict)  # errno name -> count
    request_rate: float = 0.0  # messages per second over the last second or so
    generation: int = 0  # bumped each time the share is restarted
    restarts: int = 0
    restarting: bool = False
    _rate: MessageRate = field(default_factory=MessageRate)  # the admission's bucket
    _retry_at: float = 0.0

    def snapshot(self) -> dict[str, Any]:
        """The public counters as a plain dict."""
        return {k: (dict(v) if isinstance(v, dict) else v)
                for k, v in self.__dict__.items() if not k.startswith("_")}


@dataclass
class Tenant:
    """Who is served and how: the share, and whether clients' credentials are believed.

    ``credentials``: None trusts what each client sends (a single-user tool); a tuple
    forces those credentials on every request (what an agent does for its tenants).
    ``limits``: see :class:`TenantLimits`; ``stats`` is kept by the server."""

    name: str
    fs: VirtioFS
    trust_client_credentials: bool = True
    credentials: m.Credentials | None = None
    limits: TenantLimits = field(default_factory=TenantLimits)
    stats: TenantStats = field(default_factory=TenantStats, compare=False, repr=False)

    def admit(self, op: Any) -> Any:
        """The message as it will be executed for this tenant (credentials applied).

        Raises OSError to refuse it."""
        if self.trust_client_credentials:
            return op
        return msgspec.structs.replace(op, ctx=self.credentials, groups=None)

    def execute(self, ref: Any, op: Any) -> Future[Any]:
        """Hand an admitted request to the actor ``ref`` (its session, or a handle's
        actor); returns the future of its result. Server thread; must not block. A
        tenant may wrap it (the agent's byte quota does)."""
        return ref.ask(op, block=False)  # type: ignore[no-any-return]

    def alive(self) -> bool:
        """Whether the share can take requests. False makes the server call
        :meth:`restart` (in a worker thread) before the tenant's next request."""
        return True

    def restart(self) -> VirtioFS:
        """A fresh share replacing a dead one (blocking; called in a worker thread)."""
        raise OSError(errno.ENOTCONN, "this share cannot be restarted")
