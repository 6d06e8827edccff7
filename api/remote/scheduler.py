"""Which waiting request starts next, over all tenants.

* **Fairness by cost.** Each request costs :data:`BASE_COST` plus the bytes it moves;
  tenants' queues are served by deficit round robin over that cost (a tenant earns
  :data:`QUANTUM` per round while its next request costs more than it has).
* **Bulk and small.** Requests moving :data:`BULK_BYTES` or more wait in a tenant's bulk
  lane, the rest in its small lane; a handle's requests stay in order (one waits in the
  bulk lane while a bulk request of the same handle is there). The older head goes
  first, except that a bulk head waits while the pipeline window is full (bulk bytes
  executing at once, over all tenants) or the pacing holds it: small requests then pass.
* **Pacing.** While another tenant's small requests are being served (any in the last
  :data:`CONTENTION_WINDOW`), bulk bytes start at ``contended_bulk_rate`` per second in
  all: a tenant streaming large reads as fast as it can would otherwise take every CPU of
  the machine (copying, encrypting, sending) and the other tenant's requests would wait
  for one. Alone, a tenant streams as fast as it can. Small requests never wait for the
  window or the pacing.

Plain state and rules, no I/O and no clock of its own: the server thread passes ``now``,
and says through callbacks whether a tenant may start another request and what starting
one means.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

BULK_BYTES = 64 << 10  # requests moving this much data share the pipeline window
PIPELINE_WINDOW = 16 << 20  # bulk bytes executing at once, over all tenants
CONTENDED_BULK_RATE = 32 << 20  # bulk bytes per second while others' small requests run
CONTENTION_WINDOW = 0.25  # seconds a tenant's small request counts as activity
BASE_COST = 4 << 10  # what any request costs the scheduler, besides its bytes
QUANTUM = 1 << 20  # cost a tenant may spend per deficit-round-robin round


class Schedulable(Protocol):
    """What the scheduler knows of a request."""

    @property
    def tenant(self) -> Any:
        """Whose it is (tenants are told apart by identity)."""

    handle: int  # the open handle it acts on (0: none)
    cost: int  # the bytes it holds (what it moves)
    seq: int  # its arrival order (set by Scheduler.arrived)


R = TypeVar("R", bound=Schedulable)


def _is_bulk(request: Schedulable) -> bool:
    return request.cost >= BULK_BYTES


@dataclass(eq=False)
class _Lanes(Generic[R]):
    """A tenant's waiting requests, and its deficit for the round robin."""

    tenant: Any
    small: collections.deque[R] = field(default_factory=collections.deque)
    bulk: collections.deque[R] = field(default_factory=collections.deque)
    bulk_handles: collections.Counter[int] = field(default_factory=collections.Counter)
    deficit: int = 0

    def __len__(self) -> int:
        return len(self.small) + len(self.bulk)


class Scheduler(Generic[R]):
    """Tenants' waiting requests, and the order they start in (see the module's doc).

    ``pipeline_window``: bulk bytes executing at once (None: no window).
    ``contended_bulk_rate``: bulk bytes per second while other tenants' small requests are
    served (None: no pacing)."""

    def __init__(self, now: float, *, pipeline_window: int | None = PIPELINE_WINDOW,
                 contended_bulk_rate: int | None = CONTENDED_BULK_RATE) -> None:
        self.pipeline_window = pipeline_window
        self.contended_bulk_rate = contended_bulk_rate
        self.executing = 0  # bulk bytes executing (what the window holds)
        self.paced_until = 0.0  # when the pacing next lets a bulk request go (0: it does)
        self._pace_tokens = 0.0
        self._pace_at = now
        self._small_at: dict[int, float] = {}  # id(tenant) -> its last small request
        self._lanes: dict[int, _Lanes[R]] = {}  # id(tenant) -> its waiting requests
        self._round_robin: collections.deque[int] = collections.deque()
        self._seq = 0

    def __len__(self) -> int:
        """Requests waiting, over all tenants."""
        return sum(len(lanes) for lanes in self._lanes.values())

    def tenants(self) -> list[Any]:
        """The tenants with requests waiting."""
        return [lanes.tenant for lanes in self._lanes.values()]

    def arrived(self, request: R, now: float, *, activity: bool = True) -> None:
        """Note a request's arrival: its order, and (``activity``) whether a small one
        counts as its tenant being served, for the pacing. Whether it waits here at once
        or for its connection first, it keeps its place."""
        self._seq += 1
        request.seq = self._seq
        if activity and not _is_bulk(request):
            self._small_at[id(request.tenant)] = now

    def push(self, request: R) -> None:
        """Let ``request`` wait for its turn."""
        key = id(request.tenant)
        lanes = self._lanes.get(key)
        if lanes is None:
            lanes = self._lanes[key] = _Lanes(request.tenant)
        if not lanes:
            self._round_robin.append(key)
        if _is_bulk(request) or (request.handle and request.handle in lanes.bulk_handles):
            _insert(lanes.bulk, request)
            if request.handle:
                lanes.bulk_handles[request.handle] += 1
        else:
            _insert(lanes.small, request)

    def remove(self, tenant: Any) -> list[R]:
        """Take every request of ``tenant`` out (they will not start)."""
        key = id(tenant)
        lanes = self._lanes.pop(key, None)
        if lanes is None:
            return []
        if key in self._round_robin:
            self._round_robin.remove(key)
        return [*lanes.small, *lanes.bulk]

    def forget_activity(self, now: float) -> None:
        """Drop small requests too old to count as activity."""
        for key, at in list(self._small_at.items()):
            if now - at > CONTENTION_WINDOW:
                del self._small_at[key]

    def begin(self, request: R) -> int:
        """``request`` is executing: the bulk bytes it holds in the window until
        :meth:`end`."""
        held = request.cost if _is_bulk(request) else 0
        self.executing += held
        return held

    def end(self, held: int) -> None:
        self.executing -= held

    def pump(self, now: float, ready: Callable[[Any], bool],
             start: Callable[[R], bool]) -> None:
        """Start waiting requests, by deficit round robin over the tenants, for as long as
        any can start. ``ready(tenant)``: whether the tenant may start another request now.
        ``start(request)``: start it (True), or take it elsewhere to wait (False: it is
        charged nothing)."""
        again = True
        while again and self._round_robin:
            again = False
            for _ in range(len(self._round_robin)):
                key = self._round_robin.popleft()
                lanes = self._lanes.get(key)
                if lanes is None or not lanes:
                    self._lanes.pop(key, None)
                    continue
                while lanes and ready(lanes.tenant):
                    lane = self._next(lanes, now)
                    if lane is None:
                        break
                    request = lane[0]
                    cost = BASE_COST + request.cost
                    if cost > lanes.deficit:
                        lanes.deficit += QUANTUM  # one quantum per round it waits
                        again = True
                        break
                    lane.popleft()
                    if lane is lanes.bulk and request.handle:
                        lanes.bulk_handles[request.handle] -= 1
                        if lanes.bulk_handles[request.handle] <= 0:
                            del lanes.bulk_handles[request.handle]
                    again = True
                    if not start(request):
                        continue
                    if lane is lanes.bulk:
                        self._spend_pacing(request, now)
                    lanes.deficit -= cost
                if lanes:
                    self._round_robin.append(key)
                else:
                    lanes.deficit = 0
                    self._lanes.pop(key, None)

    def _next(self, lanes: _Lanes[R], now: float) -> collections.deque[R] | None:
        """The lane whose head goes next: the older head, except that a bulk head waits
        while the window or the pacing holds it (small requests then pass it)."""
        small, bulk = lanes.small, lanes.bulk
        if bulk and self._window_allows(bulk[0], now):
            if not small or bulk[0].seq < small[0].seq:
                return bulk
        return small if small else None

    def _window_allows(self, request: R, now: float) -> bool:
        window = self.pipeline_window
        if not (window is None or not self.executing
                or self.executing + request.cost <= window):
            return False
        return self._paced(request, now)

    def _paced(self, request: R, now: float) -> bool:
        """Whether the pacing of bulk bytes lets ``request`` go now (it does when no
        other tenant's small requests are being served)."""
        rate = self.contended_bulk_rate
        if rate is None:
            return True
        burst = float(max(rate // 8, BULK_BYTES))
        self._pace_tokens = min(burst, self._pace_tokens + (now - self._pace_at) * rate)
        self._pace_at = now
        if not self._contended(request, now):
            self.paced_until = 0.0
            return True
        if self._pace_tokens <= 0:
            self.paced_until = now - self._pace_tokens / rate + 0.001
            return False
        self.paced_until = 0.0
        return True

    def _contended(self, request: R, now: float) -> bool:
        """Whether another tenant's small requests are being served."""
        me = id(request.tenant)
        return any(t != me and now - at < CONTENTION_WINDOW for t, at in self._small_at.items())

    def _spend_pacing(self, request: R, now: float) -> None:
        rate = self.contended_bulk_rate
        if rate is not None and self._contended(request, now):
            # (a debt of at most one second: one huge request does not stop the rest long)
            self._pace_tokens = max(self._pace_tokens - request.cost, -float(rate))


def _insert(lane: collections.deque[R], request: R) -> None:
    """Queue ``request`` in arrival order (requests let out of a connection's wait are
    older than some already queued)."""
    if not lane or lane[-1].seq < request.seq:
        lane.append(request)
        return
    i = len(lane)
    while i > 0 and lane[i - 1].seq > request.seq:
        i -= 1
    lane.insert(i, request)
