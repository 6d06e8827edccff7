"""The scheduler's rules, with no server: deficit round robin by cost over tenants, a
handle's requests in order, the pipeline window, and the pacing of bulk bytes while
another tenant's small requests run. Time is passed in; nothing waits."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pyvirtiofs.api.remote.scheduler import (
    BULK_BYTES,
    CONTENTION_WINDOW,
    Scheduler,
)

MIB = 1 << 20


@dataclass
class Req:
    tenant: str
    name: str
    cost: int = 0
    handle: int = 0
    seq: int = 0


class Harness:
    """A scheduler, and a record of what it started (each holding its window bytes)."""

    def __init__(self, *, window: int | None = None, rate: int | None = None,
                 in_flight: int | None = None) -> None:
        self.scheduler: Scheduler[Req] = Scheduler(0.0, pipeline_window=window,
                                                   contended_bulk_rate=rate)
        self.started: list[str] = []
        self.held: dict[str, int] = {}
        self.in_flight = in_flight  # requests a tenant may have started at once
        self.refuse: set[str] = set()  # names start() hands back (to wait elsewhere)

    def add(self, req: Req, now: float = 0.0) -> Req:
        self.scheduler.arrived(req, now)
        self.scheduler.push(req)
        return req

    def ready(self, tenant: str) -> bool:
        if self.in_flight is None:
            return True
        mine = [n for n in self.started if n.startswith(tenant) and n in self.held]
        return len(mine) < self.in_flight

    def start(self, req: Req) -> bool:
        if req.name in self.refuse:
            self.refuse.discard(req.name)
            return False
        self.started.append(req.name)
        self.held[req.name] = self.scheduler.begin(req)
        return True

    def end(self, name: str) -> None:
        self.scheduler.end(self.held.pop(name))

    def pump(self, now: float = 0.0) -> list[str]:
        before = len(self.started)
        self.scheduler.pump(now, self.ready, self.start)
        return self.started[before:]


def test_drr_by_bytes_serves_small_requests_before_queued_bulk() -> None:
    """Tenant a has 1 MiB requests queued first; tenant b's small requests still go
    before a's first one: the round robin charges bytes, not requests."""
    h = Harness()
    for i in range(4):
        h.add(Req("a", f"a{i}", cost=MIB))
    for i in range(3):
        h.add(Req("b", f"b{i}"))
    assert h.pump() == ["b0", "b1", "b2", "a0", "a1", "a2", "a3"]


def test_drr_shares_by_cost_between_two_bulk_tenants() -> None:
    """A tenant with requests half the size gets twice as many started, round for round
    (with one request in flight each, started as the other's finish)."""
    h = Harness(in_flight=100)
    for i in range(40):
        h.add(Req("big", f"big{i}", cost=2 * MIB))
        h.add(Req("half", f"half{i}", cost=MIB))
    order = h.pump()
    first = order[:30]
    big = sum(1 for n in first if n.startswith("big"))
    half = sum(1 for n in first if n.startswith("half"))
    assert half == pytest.approx(2 * big, abs=2)


def test_a_tenant_at_its_in_flight_cap_does_not_hold_up_another() -> None:
    h = Harness(in_flight=1)
    h.add(Req("a", "a0"))
    h.add(Req("a", "a1"))
    h.add(Req("b", "b0"))
    assert h.pump() == ["a0", "b0"]
    h.end("a0")
    assert h.pump() == ["a1"]
    assert len(h.scheduler) == 0


def test_a_handles_requests_stay_in_order_behind_its_bulk_request() -> None:
    """A small request of handle 7 waits behind 7's bulk write (held by the full window);
    a small request of another handle passes it."""
    h = Harness(window=MIB)
    h.add(Req("a", "hold", cost=MIB))
    assert h.pump() == ["hold"]  # fills the window
    h.add(Req("a", "write7", cost=MIB, handle=7))
    h.add(Req("a", "flush7", handle=7))
    h.add(Req("a", "stat", handle=0))
    h.add(Req("a", "read8", cost=100, handle=8))
    assert h.pump() == ["stat", "read8"]
    h.end("hold")
    assert h.pump() == ["write7", "flush7"]


def test_requests_keep_arrival_order_when_let_in_late() -> None:
    """A request that waited elsewhere (its connection's replies) is queued by its
    arrival, ahead of those that arrived after it."""
    h = Harness(window=MIB)
    h.add(Req("a", "hold", cost=MIB))
    h.pump()
    early = Req("a", "early", cost=MIB)
    h.scheduler.arrived(early, 0.0)  # arrives first, but is pushed last
    h.add(Req("a", "late1", cost=MIB))
    h.add(Req("a", "late2", cost=MIB))
    h.scheduler.push(early)
    h.end("hold")
    assert h.pump() == ["early"]
    h.end("early")
    assert h.pump() == ["late1"]


def test_the_window_bounds_bulk_bytes_executing() -> None:
    h = Harness(window=2 * MIB)
    for i in range(4):
        h.add(Req("a", f"r{i}", cost=MIB))
    assert h.pump() == ["r0", "r1"]
    assert h.scheduler.executing == 2 * MIB
    assert h.pump() == []
    h.end("r0")
    assert h.pump() == ["r2"]


def test_one_bulk_request_bigger_than_the_window_runs_alone() -> None:
    h = Harness(window=MIB)
    h.add(Req("a", "huge", cost=8 * MIB))
    h.add(Req("a", "next", cost=MIB))
    assert h.pump() == ["huge"]
    h.end("huge")
    assert h.pump() == ["next"]


def test_small_requests_never_wait_for_the_window() -> None:
    h = Harness(window=MIB)
    h.add(Req("a", "bulk0", cost=MIB))
    h.add(Req("a", "bulk1", cost=MIB))
    h.add(Req("b", "small", cost=BULK_BYTES - 1))
    assert sorted(h.pump()) == ["bulk0", "small"]


def test_a_request_handed_back_is_charged_nothing() -> None:
    """start() returning False (its connection must wait) spends no deficit: the
    tenant's next request goes in the same round, before the other tenant's."""
    h = Harness()
    h.add(Req("a", "a0", cost=MIB))
    h.add(Req("a", "a1", cost=MIB))
    h.add(Req("b", "b0", cost=MIB))
    h.refuse.add("a0")
    assert h.pump() == ["a1", "b0"]


def test_bulk_is_paced_while_another_tenants_small_requests_run() -> None:
    rate = 4 * MIB
    h = Harness(rate=rate)
    h.add(Req("b", "small0"), now=0.0)
    for i in range(4):
        h.add(Req("a", f"bulk{i}", cost=MIB), now=0.0)
    started = h.pump(now=0.0)
    assert started == ["small0"]  # the pace has no tokens yet
    paced_until = h.scheduler.paced_until
    assert 0.0 < paced_until < 0.01
    assert h.pump(now=paced_until) == ["bulk0"]  # then a debt of 1 MiB: a quarter second
    h.add(Req("b", "small1"), now=paced_until)
    assert h.pump(now=paced_until + 0.01) == ["small1"]  # small ones pass at once
    wait = h.scheduler.paced_until - paced_until
    assert wait == pytest.approx(MIB / rate, rel=0.05)
    h.add(Req("b", "small2"), now=h.scheduler.paced_until - 0.01)
    assert sorted(h.pump(now=h.scheduler.paced_until)) == ["bulk1", "small2"]


def test_bulk_is_not_paced_once_the_other_tenant_is_quiet() -> None:
    h = Harness(rate=MIB)
    h.add(Req("b", "small"), now=0.0)
    for i in range(3):
        h.add(Req("a", f"bulk{i}", cost=MIB), now=0.0)
    assert h.pump(now=0.0) == ["small"]
    later = CONTENTION_WINDOW + 0.01
    h.scheduler.forget_activity(later)
    assert h.pump(now=later) == ["bulk0", "bulk1", "bulk2"]
    assert h.scheduler.paced_until == 0.0


def test_a_tenants_own_small_requests_do_not_pace_it() -> None:
    h = Harness(rate=MIB)
    h.add(Req("a", "small"), now=0.0)
    for i in range(3):
        h.add(Req("a", f"bulk{i}", cost=MIB), now=0.0)
    assert h.pump(now=0.0) == ["small", "bulk0", "bulk1", "bulk2"]


def test_removing_a_tenant_takes_all_its_requests() -> None:
    h = Harness(window=MIB)
    h.add(Req("a", "hold", cost=MIB))
    h.pump()
    h.add(Req("a", "s"))
    h.add(Req("a", "b", cost=MIB))
    h.add(Req("c", "c0", cost=MIB))
    assert [r.name for r in h.scheduler.remove("a")] == ["s", "b"]
    assert h.scheduler.tenants() == ["c"]
    assert h.scheduler.remove("a") == []
