"""The connection gate's books: which connections of the agent's socket are in their
handshake, which are established and whose, and which are over a cap.

* **handshakes**: at most ``max_handshakes`` connections may be in their greeting and
  handshake at once; beyond it a new connection is to be shut down as soon as it is
  accepted.
* **in total**: at most ``max_connections`` connections (beyond it: shut down at once,
  and ZAP refuses).
* **per tenant**: ZAP refuses a tenant's key once the tenant has its cap of connections.
  Requests are approved one at a time, each only once the previous approved connection
  has completed its handshake, or evidently never will (see :meth:`ConnectionGate.awaiting`),
  so every connection is attributed to its tenant: the descriptor that just completed is the
  handshaking one that has sent the most (``sent(fd)``; where that cannot be told, the
  oldest handshaking one).
* **expiry**: ZeroMQ drops a connection that has not completed its handshake within
  ``handshake_timeout``, so a connection counted as handshaking for longer (plus
  :data:`HANDSHAKE_SLACK`) is gone, or completed unseen: it no longer counts. The monitor
  does not always report a connection accepted before it reports it gone: ZeroMQ starts the
  connection on one of its I/O threads and reports it accepted from another, so a peer that
  hangs up at once can be reported gone first, and its "accepted" then never ends.

Plain books, no sockets: the ZAP thread reads the socket monitor's events, tells them
here, asks what to shut down, and does it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

ATTRIBUTION_TIMEOUT = 1.0  # seconds an approved connection may take to complete
# ZeroMQ completes an approved handshake within milliseconds and reports it at once, unless
# its queue of events to the gate is full: once the gate has found that queue empty this
# long after an approval, with no completion, the connection is gone.
ATTRIBUTION_SETTLE = 0.05
# How much later than ZeroMQ's handshake timeout the gate may hear of a connection it
# dropped (the gate hears of a connection after ZeroMQ started it, and of the drop through a
# queue that a flood can fill).
HANDSHAKE_SLACK = 1.0


@dataclass
class GateStats:
    """Connections as the gate counts them."""

    handshaking: int = 0
    connections: int = 0
    per_tenant: dict[str, int] = field(default_factory=dict)
    shut_down: int = 0  # connections closed at once (over a cap)


class ConnectionGate:
    """The books (see the module's doc). ``sent(fd)``: the bytes a connection has sent
    that its peer acknowledged (None: cannot be told, as over ``ipc://``)."""

    def __init__(self, sent: Callable[[int], int | None], *,
                 max_connections: int | None = None,
                 max_handshakes: int | None = None,
                 handshake_timeout: float | None = None) -> None:
        self.sent = sent
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self._handshake_limit = (None if handshake_timeout is None
                                 else handshake_timeout + HANDSHAKE_SLACK)
        self.shut_down = 0  # counted by whoever shuts them down
        self._handshaking: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._conns: dict[int, str | None] = {}  # descriptor -> tenant
        self._per_tenant: collections.Counter[str | None] = collections.Counter()
        self._awaiting: tuple[str, float] | None = None  # approved, not yet completed
        self._emptied_at = float("-inf")  # when the event queue was last found empty
        self._to_shut: dict[int, str] = {}  # descriptor -> why

    def stats(self) -> GateStats:
        """A copy of the counts (safe to call from another thread)."""
        per = {t: n for t, n in list(self._per_tenant.items()) if t is not None and n}
        return GateStats(len(self._handshaking), len(self._conns), per, self.shut_down)

    # -- what the socket monitor reports ----------------------------------------------------

    def accepted(self, fd: int, now: float) -> None:
        """A connection was accepted (it starts its handshake, or is over a cap)."""
        self.gone(fd)  # (a reused number: the old connection is gone)
        over = None
        if self.max_handshakes is not None and len(self._handshaking) >= self.max_handshakes:
            over = "too many connections in their handshake"
        elif (self.max_connections is not None
              and len(self._handshaking) + len(self._conns) >= self.max_connections):
            over = "the agent's connection limit"
        if over is not None:
            self._to_shut[fd] = over
            return
        self._handshaking[fd] = now

    def gone(self, fd: int) -> None:
        """A connection was closed (its number may be reused from now on)."""
        self._to_shut.pop(fd, None)
        self._handshaking.pop(fd, None)
        if fd in self._conns:
            tenant = self._conns.pop(fd)
            self._per_tenant[tenant] -= 1
            if self._per_tenant[tenant] <= 0:
                del self._per_tenant[tenant]

    def expire(self, now: float) -> None:
        """Stop counting connections handshaking for longer than ZeroMQ allows (see the
        module's doc)."""
        if self._handshake_limit is None:
            return
        oldest = self._handshaking
        while oldest:
            fd, since = next(iter(oldest.items()))
            if now - since <= self._handshake_limit:
                break
            del oldest[fd]

    def completed(self) -> int | None:
        """A connection finished its handshake: find which (returned), and whose it is
        (the tenant approved last, if any)."""
        tenant = self._awaiting[0] if self._awaiting is not None else None
        self._awaiting = None
        fd = self._just_completed()
        if fd is None:
            return None
        self._handshaking.pop(fd, None)
        self._conns[fd] = tenant
        self._per_tenant[tenant] += 1
        return fd

    def has_marks(self) -> bool:
        """Whether connections over a cap are waiting to be shut down."""
        return bool(self._to_shut)

    def to_shut(self) -> dict[int, str]:
        """The connections over a cap (descriptor -> why), to shut down now; taken once a
        batch of events is told (a descriptor number is only shut down once no later event
        of the batch says its connection is gone: ZeroMQ reports a disconnect before it
        closes the descriptor, so a number that was reused by then has its own events
        after it)."""
        shut, self._to_shut = self._to_shut, {}
        return shut

    def _just_completed(self) -> int | None:
        """The handshaking descriptor that has sent the most (the READY that ends a CURVE
        handshake), or the oldest where that cannot be told for any (not TCP; a number
        whose connection is already closed cannot be told either, and is passed over)."""
        best, best_sent = None, -1
        for fd in self._handshaking:
            sent = self.sent(fd)
            if sent is not None and sent > best_sent:
                best, best_sent = fd, sent
        if best is None and self._handshaking:
            return next(iter(self._handshaking))
        return best

    # -- what ZAP asks ------------------------------------------------------------------------

    def all_told(self, now: float) -> None:
        """Every event queued so far has been told (the monitor's queue was empty)."""
        self._emptied_at = now

    def awaiting(self, now: float) -> bool:
        """Whether a connection approved by ZAP has yet to complete its handshake (then
        the next ZAP request waits). It is given up on after :data:`ATTRIBUTION_TIMEOUT`,
        or sooner once every event up to :data:`ATTRIBUTION_SETTLE` after the approval has
        been told without its completion: the connection died meanwhile (a flood's
        connection, shut down or timed out while its request waited). Waiting the full
        timeout for each of those would let a flood starve every tenant's handshakes."""
        if self._awaiting is not None:
            since = self._awaiting[1]
            if (now - since > ATTRIBUTION_TIMEOUT
                    or self._emptied_at - since > ATTRIBUTION_SETTLE):
                self._awaiting = None  # it never completed
        return self._awaiting is not None

    def approve(self, tenant: str, cap: int | None, now: float) -> str | None:
        """Whether a connection of ``tenant`` (with ``cap`` connections at most) may
        complete its handshake: None if so (it is then awaited), else why not."""
        if cap is not None and self._per_tenant[tenant] >= cap:
            return f"tenant {tenant} has {cap} connections"
        if self.max_connections is not None and len(self._conns) >= self.max_connections:
            return "the agent's connection limit"
        self._awaiting = (tenant, now)
        return None
