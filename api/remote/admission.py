"""Whether a message gets in: the request rate, and the limits a request must pass.

* **Every message counts** against its tenant's request rate (pings, malformed and
  refused messages too): a token bucket holding one second's worth. Beyond the rate a
  message is answered ``EAGAIN`` (a cheap answer: it is not decoded), up to
  :data:`REFUSALS_PER_RATE` times the rate (at least :data:`MIN_REFUSALS` a second);
  beyond that it is dropped unanswered, so a flood costs the server one receive per
  message and nothing more. A ``Close`` is never refused for the rate (a client over its
  rate can still release what it holds); it borrows from the next second instead.
* **Memory.** A request holds bytes while in flight (:func:`bytes_held`), and a reply until
  it has left the process; beyond the tenant's ``bytes_in_flight``, or the server's
  total, requests that carry data get ``EAGAIN`` (one request alone always gets in).
* Open handles (``EMFILE``), requests waiting (``EAGAIN``), requests waiting for their
  connection's replies to leave (:data:`MAX_DEFERRED`), and connections (``EUSERS``).

Plain state and rules, no I/O: the server thread asks, with the time as ``now``.
"""

from __future__ import annotations

import enum
import errno
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyvirtiofs.actors import messages as m

if TYPE_CHECKING:
    from pyvirtiofs.api.remote.tenancy import Tenant, TenantStats

REFUSALS_PER_RATE = 10  # EAGAIN answers a tenant over its rate gets per second: 10x the rate
MIN_REFUSALS = 100.0  # (and at least this many)
PEER_REFUSALS = 200.0  # answers per second to peers that have no tenant
MAX_DEFERRED = 1024  # requests a connection may have waiting for its replies to leave
OPEN_OPS = (m.Open, m.OpenDir)


class Verdict(enum.Enum):
    """What the request rate says of a message."""

    ADMIT = "admit"
    REFUSE = "refuse"  # answer EAGAIN
    DROP = "drop"  # beyond what refusals may cost: no answer at all
    ONLY_A_CLOSE = "only a close"  # over the rate, but it looks like a Close: admit if it is


class TokenBucket:
    """``rate`` tokens a second, holding at most one second's worth (it starts full)."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass(slots=True)
class MessageRate:
    """A tenant's messages: its token bucket, the refusals it may still be answered, and
    how many it sent since ``since`` (for ``request_rate``). The rate itself is read at
    each message, so a reload that changes it takes effect at once."""

    tokens: float = 0.0
    refusals: float = 0.0
    at: float | None = None  # (None: no limited message yet; the buckets start full)
    count: int = 0
    since: float = field(default_factory=time.monotonic)

    def take(self, rate: float | None, now: float, *, closing: bool = False) -> Verdict:
        """Count one message and say what becomes of it. ``closing``: it looks like a
        Close (which is admitted over the rate, borrowing at most one second's worth)."""
        self.count += 1
        if rate is None:
            return Verdict.ADMIT
        burst = max(rate, 1.0)
        refusals = max(REFUSALS_PER_RATE * rate, MIN_REFUSALS)
        if self.at is None:
            self.tokens, self.refusals, self.at = burst, refusals, now
        elapsed = now - self.at
        self.at = now
        self.tokens = min(burst, self.tokens + elapsed * rate)
        self.refusals = min(refusals, self.refusals + elapsed * refusals)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return Verdict.ADMIT
        if closing:
            self.tokens = max(self.tokens - 1.0, -burst)
            return Verdict.ONLY_A_CLOSE
        if self.refusals >= 1.0:
            self.refusals -= 1.0
            return Verdict.REFUSE
        return Verdict.DROP

    def measure(self, now: float) -> float | None:
        """Messages per second since the last measure, once a second has passed (else
        None: too soon to tell)."""
        elapsed = now - self.since
        if elapsed < 1.0:
            return None
        rate = self.count / elapsed
        self.count = 0
        self.since = now
        return rate


def bytes_held(op: Any, body: list[Any]) -> int:
    """Bytes a request holds while in flight (what ``bytes_in_flight`` limits): a Write
    its payload; a Read twice its size (its pieces and the whole they are joined into)."""
    if isinstance(op, m.Read):
        return 2 * op.size
    if isinstance(op, m.Write):
        return len(body[1]) if len(body) > 1 else 0
    return 0


def note_rejection(stats: TenantStats, code: int) -> None:
    """Count a refusal by its errno name."""
    name = errno.errorcode.get(code, str(code))
    stats.rejected[name] = stats.rejected.get(name, 0) + 1


def _reject(stats: TenantStats, code: int, what: str) -> OSError:
    note_rejection(stats, code)
    return OSError(code, f"tenant limit reached: {what}")


class Admission:
    """The limits over all tenants and each tenant's own, and the bytes held against them.

    ``max_bytes_in_flight``: the total over all tenants (None: only tenants' own limits).
    ``max_clients``: connections at once over all tenants (None: no limit)."""

    def __init__(self, now: float, *, max_bytes_in_flight: int | None = None,
                 max_clients: int | None = None) -> None:
        self.max_bytes_in_flight = max_bytes_in_flight
        self.max_clients = max_clients
        self.bytes_in_flight = 0  # over all tenants
        self.peer_refusals = TokenBucket(PEER_REFUSALS, now)  # peers with no tenant

    def message(self, tenant: Tenant, now: float, *, closing: bool = False) -> Verdict:
        """Charge one message to the tenant's rate."""
        return tenant.stats._rate.take(tenant.limits.requests_per_second, now,
                                       closing=closing)

    def count(self, tenant: Tenant) -> None:
        """A message of the tenant's refused before its rate was asked (it still counts
        in ``request_rate``)."""
        tenant.stats._rate.count += 1

    def measure_rate(self, tenant: Tenant, now: float) -> None:
        """Update the tenant's ``request_rate`` (once a second or so)."""
        rate = tenant.stats._rate.measure(now)
        if rate is not None:
            tenant.stats.request_rate = rate

    def connection(self, tenant: Tenant, clients: int) -> str | None:
        """Why a new connection of ``tenant`` is refused (None: it is not), with
        ``clients`` connections open over all tenants."""
        cap = tenant.limits.connections
        if cap is not None and tenant.stats.clients >= cap:
            note_rejection(tenant.stats, errno.EUSERS)
            return f"tenant limit reached: {cap} connections"
        if self.max_clients is not None and clients >= self.max_clients:
            note_rejection(tenant.stats, errno.EUSERS)
            return "the server has too many connections"
        return None

    def request(self, tenant: Tenant, op: Any, nbytes: int, *, deferred: int) -> None:
        """Admit a request holding ``nbytes`` and charge it; raises OSError to refuse it.
        ``deferred``: requests its connection has waiting for its replies to leave."""
        stats, limits = tenant.stats, tenant.limits
        closing = isinstance(op, m.Close)  # never refused: a refused Close would leak
        if (limits.open_handles is not None and isinstance(op, OPEN_OPS)
                and stats.open_handles + stats.pending_opens >= limits.open_handles):
            raise _reject(stats, errno.EMFILE, "open handles")
        if nbytes and not closing:
            if (limits.bytes_in_flight is not None and stats.bytes_in_flight
                    and stats.bytes_in_flight + nbytes > limits.bytes_in_flight):
                raise _reject(stats, errno.EAGAIN, "bytes in flight")
            if (self.max_bytes_in_flight is not None and self.bytes_in_flight
                    and self.bytes_in_flight + nbytes > self.max_bytes_in_flight):
                raise _reject(stats, errno.EAGAIN, "the server's bytes in flight")
        # (a tenant with nothing queued is let in: what its connections have deferred is
        # bounded per connection, below)
        if (stats.queued and stats.queued + stats.deferred >= limits.max_queued
                and not closing):
            raise _reject(stats, errno.EAGAIN, "requests queued")
        if deferred >= MAX_DEFERRED and not closing:
            raise _reject(stats, errno.EAGAIN, "replies are not being read")
        stats.requests += 1
        self.charge(tenant, nbytes)
        if isinstance(op, OPEN_OPS):
            stats.pending_opens += 1

    def release(self, tenant: Tenant, op: Any, nbytes: int) -> None:
        """A request admitted with :meth:`request` is over (answered or abandoned)."""
        self.charge(tenant, -nbytes)
        if isinstance(op, OPEN_OPS):
            tenant.stats.pending_opens -= 1

    def charge(self, tenant: Tenant, nbytes: int) -> None:
        """Bytes the tenant holds from now on (negative: no longer)."""
        tenant.stats.bytes_in_flight += nbytes
        self.bytes_in_flight += nbytes
