"""The admission rules, with no server: every message draws from its tenant's rate, the
refusals beyond it are bounded, and requests are held to the bytes, handles, queue and
connection limits of their tenant and of the server. Time is passed in."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from pyvirtiofs.actors import messages as m
from pyvirtiofs.api.remote.admission import (
    MAX_DEFERRED,
    MIN_REFUSALS,
    Admission,
    MessageRate,
    TokenBucket,
    Verdict,
    bytes_held,
)
from pyvirtiofs.api.remote.tenancy import Tenant, TenantLimits

READ = m.Read(size=500)  # holds 1000 bytes: its pieces and the whole
CLOSE = m.Close()


def tenant(name: str = "t", **limits: Any) -> Tenant:
    return Tenant(name, fs=None, limits=TenantLimits(**limits))  # type: ignore[arg-type]


def test_every_message_draws_a_token() -> None:
    t = tenant(requests_per_second=10)
    admission = Admission(0.0)
    verdicts = [admission.message(t, 0.0) for _ in range(11)]
    assert verdicts[:10] == [Verdict.ADMIT] * 10
    assert verdicts[10] is Verdict.REFUSE
    assert admission.message(t, 0.1) is Verdict.ADMIT  # a tenth of a second: one token
    assert admission.message(t, 0.1) is Verdict.REFUSE
    assert t.stats._rate.count == 13


def test_refusals_beyond_their_budget_are_dropped() -> None:
    rate = MessageRate()
    verdicts = [rate.take(10.0, 0.0) for _ in range(10 + int(MIN_REFUSALS) + 5)]
    assert verdicts.count(Verdict.ADMIT) == 10
    assert verdicts.count(Verdict.REFUSE) == MIN_REFUSALS
    assert verdicts[-5:] == [Verdict.DROP] * 5
    # The refusals come back with time, at ten times the rate (at least MIN_REFUSALS/s).
    assert rate.take(10.0, 0.05) is Verdict.REFUSE


def test_a_close_over_the_rate_borrows_at_most_a_second() -> None:
    rate = MessageRate()
    for _ in range(2):
        assert rate.take(2.0, 0.0) is Verdict.ADMIT
    assert rate.take(2.0, 0.0, closing=True) is Verdict.ONLY_A_CLOSE
    assert rate.take(2.0, 0.0, closing=True) is Verdict.ONLY_A_CLOSE
    assert rate.tokens == -2.0
    assert rate.take(2.0, 0.0, closing=True) is Verdict.ONLY_A_CLOSE
    assert rate.tokens == -2.0  # (no deeper debt than one second's worth)
    assert rate.take(2.0, 1.0) is Verdict.REFUSE  # the debt is paid back first
    assert rate.take(2.0, 1.5) is Verdict.ADMIT


def test_no_rate_admits_everything_and_still_counts() -> None:
    rate = MessageRate(since=0.0)
    assert all(rate.take(None, 0.0) is Verdict.ADMIT for _ in range(1000))
    assert rate.measure(0.5) is None
    assert rate.measure(2.0) == 500.0
    assert rate.count == 0


def test_a_token_bucket_holds_one_second() -> None:
    bucket = TokenBucket(2.0, 0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert [bucket.take(10.0) for _ in range(3)] == [True, True, False]


def test_bytes_held() -> None:
    assert bytes_held(READ, [b"hdr"]) == 1000
    assert bytes_held(m.Write(data=b""), [b"hdr", b"x" * 300]) == 300
    assert bytes_held(m.Stat(path=b"a"), [b"hdr"]) == 0


def test_bytes_in_flight_per_tenant() -> None:
    t = tenant(bytes_in_flight=1500)
    admission = Admission(0.0)
    admission.request(t, READ, 1000, deferred=0)
    with pytest.raises(OSError) as err:
        admission.request(t, READ, 1000, deferred=0)
    assert err.value.errno == errno.EAGAIN
    assert t.stats.rejected == {"EAGAIN": 1}
    admission.request(t, m.Stat(path=b"a"), 0, deferred=0)  # no data: not limited
    admission.release(t, READ, 1000)
    admission.request(t, READ, 1000, deferred=0)
    assert t.stats.bytes_in_flight == admission.bytes_in_flight == 1000


def test_one_request_alone_is_admitted_whatever_its_size() -> None:
    t = tenant(bytes_in_flight=100)
    admission = Admission(0.0, max_bytes_in_flight=100)
    admission.request(t, READ, 1000, deferred=0)
    assert t.stats.bytes_in_flight == 1000


def test_bytes_in_flight_over_all_tenants() -> None:
    a, b = tenant("a"), tenant("b")
    admission = Admission(0.0, max_bytes_in_flight=1500)
    admission.request(a, READ, 1000, deferred=0)
    with pytest.raises(OSError, match="the server's bytes in flight"):
        admission.request(b, READ, 1000, deferred=0)
    assert b.stats.rejected == {"EAGAIN": 1}
    admission.charge(a, -1000)  # (as when a's reply has left)
    admission.request(b, READ, 1000, deferred=0)


def test_unsent_replies_count_against_the_tenant() -> None:
    t = tenant(bytes_in_flight=1500)
    admission = Admission(0.0)
    admission.charge(t, 1000)
    with pytest.raises(OSError):
        admission.request(t, READ, 1000, deferred=0)


def test_open_handles_are_limited_counting_opens_in_flight() -> None:
    t = tenant(open_handles=2)
    admission = Admission(0.0)
    t.stats.open_handles = 1
    admission.request(t, m.Open(path=b"a"), 0, deferred=0)
    assert t.stats.pending_opens == 1
    with pytest.raises(OSError) as err:
        admission.request(t, m.OpenDir(path=b"d"), 0, deferred=0)
    assert err.value.errno == errno.EMFILE
    admission.release(t, m.Open(path=b"a"), 0)
    assert t.stats.pending_opens == 0


def test_queued_requests_are_limited() -> None:
    t = tenant(max_queued=4)
    admission = Admission(0.0)
    t.stats.queued, t.stats.deferred = 2, 1
    admission.request(t, READ, 0, deferred=0)
    t.stats.queued = 3
    with pytest.raises(OSError, match="requests queued"):
        admission.request(t, READ, 0, deferred=0)


def test_a_connection_that_does_not_read_is_limited() -> None:
    t = tenant()
    admission = Admission(0.0)
    admission.request(t, READ, 0, deferred=MAX_DEFERRED - 1)
    with pytest.raises(OSError, match="replies are not being read"):
        admission.request(t, READ, 0, deferred=MAX_DEFERRED)


def test_close_is_never_refused() -> None:
    t = tenant(bytes_in_flight=10, max_queued=1)
    admission = Admission(0.0, max_bytes_in_flight=10)
    admission.charge(t, 100)
    t.stats.queued = 5
    admission.request(t, CLOSE, 50, deferred=MAX_DEFERRED)
    assert t.stats.requests == 1


def test_connections_per_tenant_and_in_all() -> None:
    a, b = tenant("a", connections=1), tenant("b")
    admission = Admission(0.0, max_clients=2)
    assert admission.connection(a, 0) is None
    a.stats.clients = 1
    assert admission.connection(a, 1) == "tenant limit reached: 1 connections"
    assert admission.connection(b, 1) is None
    assert admission.connection(b, 2) == "the server has too many connections"
    assert a.stats.rejected == {"EUSERS": 1} and b.stats.rejected == {"EUSERS": 1}


def test_request_rate_is_measured_once_a_second() -> None:
    t = tenant(requests_per_second=1000)
    t.stats._rate.since = 0.0
    admission = Admission(0.0)
    for _ in range(30):
        admission.message(t, 0.0)
    admission.count(t)  # (refused before the rate was asked: it counts)
    admission.measure_rate(t, 0.5)
    assert t.stats.request_rate == 0.0
    admission.measure_rate(t, 1.0)
    assert t.stats.request_rate == 31.0
