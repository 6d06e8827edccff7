"""The agent under hostile load: every resource bounded, every signal handled.

One test per way a tenant (or an unauthenticated peer) could exhaust the agent for
everyone: signal storms, replies that are never read, message floods beyond the rate,
log floods, connection floods (authenticated and half-open), and a byte quota. Each runs
against a real agent process on loopback; each checks that a well-behaved tenant is
served meanwhile, and the agent's own numbers (RSS, descriptors, log size) stay bounded.

The floods are those of ``pyvirtiofs soak --hostile`` (:mod:`pyvirtiofs.tools.hostile`),
which runs them for minutes; here each runs for seconds. No sleeps to wait for something:
every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofs.actors import messages as m
from pyvirtiofs.api.agent.gate import HANDSHAKE_SLACK
from pyvirtiofs.api.agent.quota import measure
from pyvirtiofs.api.agent.zap import GATE_BURST
from pyvirtiofs.api.remote import wire
from pyvirtiofs.api.remote.client import RemoteFS
from pyvirtiofs.tools import procfs
from pyvirtiofs.tools.hostile import (
    GoodTenant,
    HalfOpenFlood,
    UnreadReplies,
    connection_flood,
    hang_ups,
    log_flood,
    message_flood,
    signal_storm,
    storm_reload,
    take_replies,
)
from tests.api.agent.harness import (
    AgentProc,
    Site,
    agent_site,
    fd_count,
    rss_mib,
    start_agent,
    wait_for,
)

MIB = 1 << 20
TOTAL_BYTES = 320 * MIB  # [agent] bytes_in_flight: what all tenants together may hold
LOG_RATE = 8 << 10  # [agent] log_rate
MAX_HANDSHAKES = 64
TENANT_CONNECTIONS = 32
QUOTA = 16 * MIB
HALF_OPEN_PEERS = 20_000  # (bounded in count as well as in time)
HANDSHAKE_TIMEOUT = 1.0

TENANTS: dict[str, dict[str, Any]] = {
    "good": {},
    "hog": {},
    "pinger": {"limits": {"requests_per_second": 200}},
    "noisy": {},
    "flooder": {"limits": {"connections": TENANT_CONNECTIONS}},
    "quota": {"limits": {"max_bytes": "16MiB"}},
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    def prepare(host: Path) -> None:
        (host / "good" / "good.bin").write_bytes(os.urandom(MIB))
        (host / "hog" / "big.bin").write_bytes(os.urandom(MIB) * 64)

    with agent_site(tmp_path_factory, TENANTS, prepare,
                    settings={"bytes_in_flight": "320MiB", "log_rate": "8KiB",
                              "max_handshakes": MAX_HANDSHAKES, "max_connections": 256,
                              "handshake_timeout": HANDSHAKE_TIMEOUT}) as site:
        yield site


@pytest.fixture(scope="module")
def good(site: Site) -> RemoteFS:
    """A well-behaved tenant's long-lived session: every flood below must leave it served.
    Its first large read makes the agent start pyzmq's zero-copy garbage collector (a
    thread with a ZeroMQ context of its own), so that is in every descriptor baseline."""
    fs = site.agent.client("good")
    _good_works(site, fs)
    return fs


def _good_works(site: Site, good: RemoteFS) -> None:
    assert good.read_bytes("good.bin") == (site.share("good") / "good.bin").read_bytes()


class _Prober(GoodTenant):
    """A well-behaved tenant reading (and checking) its file in a thread while a flood
    runs: no call may fail, its slowest call is kept."""

    def __init__(self, site: Site, good: RemoteFS) -> None:
        super().__init__(good, (site.share("good") / "good.bin").read_bytes(), ops=("read",),
                         stop_on_error=True)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        assert not self.errors, self.errors[0]
        assert self.calls > 0


# -- 0. the byte quota (first: its client connects before any flood) ----------------------------


def test_the_byte_quota_holds_for_write_fallocate_truncate_and_create(site: Site) -> None:
    agent = site.agent
    root = site.share("quota")
    fs = agent.client("quota")
    fs.write_bytes("eight", os.urandom(8 * MIB))
    with pytest.raises(OSError) as info:
        fs.write_bytes("twelve", os.urandom(12 * MIB))
    assert info.value.errno == errno.EDQUOT
    with agent.raw("quota") as raw:
        handle = _raw_handle(raw, b"sparse", os.O_RDWR | os.O_CREAT)
        big = raw.call(m.FAllocate(offset=0, length=1 << 40), handle)
        assert big.error is not None and big.error.errno == errno.EDQUOT
        grown = raw.call(m.FTruncate(size=1 << 40), handle)
        assert grown.error is not None and grown.error.errno == errno.EDQUOT
        assert raw.call(m.FAllocate(offset=0, length=MIB), handle).error is None
        assert raw.call(m.Close(), handle).error is None
    status = agent.tenant_status("quota")
    assert status["used_bytes"] <= QUOTA and status["reserved_bytes"] == 0
    fs.remove("twelve") if fs.exists("twelve") else None
    fs.remove("eight")  # deleting frees its blocks at once
    fs.write_bytes("twelve", os.urandom(12 * MIB))
    # Many writers at once cannot overshoot: each reserves before it runs.
    errors: list[int] = []

    def writer(n: int) -> None:
        for i in range(40):
            try:
                fs.write_bytes(f"w{n}-{i}", os.urandom(256 << 10))
            except OSError as exc:
                errors.append(exc.errno or 0)
                return

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors and set(errors) == {errno.EDQUOT}
    with pytest.raises(OSError) as info:
        for i in range(64):
            fs.mkdir(f"d{i}")  # creating takes a block each
    assert info.value.errno == errno.EDQUOT
    used = measure(str(root))
    status = agent.tenant_status("quota")
    print(f"\nquota: host usage {used / MIB:.2f} MiB of {QUOTA // MIB} MiB; the agent counts "
          f"{status['used_bytes'] / MIB:.2f} MiB")
    assert used <= QUOTA
    assert abs(status["used_bytes"] - used) <= 256 << 10
    fs.close()


# -- 1. signals -------------------------------------------------------------------------------


def test_signal_storms_idle_and_under_load_always_reload_and_stop(tmp_path: Path) -> None:
    """Thousands of SIGHUPs in bursts, idle and under load: every burst is followed by a
    reload that applies the file as it is then (a revoked tenant is refused); then a storm
    of SIGHUPs and SIGTERMs stops the agent cleanly (exit 0). A handler that waits for a
    lock its own thread holds hangs the agent at the first unlucky signal."""
    for t in ("a", "b"):
        (tmp_path / t).mkdir()
        (tmp_path / t / "f.bin").write_bytes(os.urandom(256 << 10))
    tenants = {t: {"share": str(tmp_path / t)} for t in ("a", "b")}
    agent = start_agent(tmp_path / "agent", tenants)
    pid = agent.proc.pid
    a, b = agent.client("a"), agent.client("b")
    expected = (tmp_path / "a" / "f.bin").read_bytes()
    stop_load = threading.Event()
    load_errors: list[BaseException] = []
    loaded = [0]

    def load() -> None:
        while not stop_load.is_set():
            try:
                assert a.read_bytes("f.bin") == expected
                a.stat("f.bin")
                loaded[0] += 1
            except BaseException as exc:
                load_errors.append(exc)
                return

    def limit_of_a() -> int:
        return int(agent.status()["tenants"]["a"]["limits"]["open_handles"])

    try:
        sent = 0
        for phase in ("idle", "loaded"):
            loader = threading.Thread(target=load, daemon=True)
            if phase == "loaded":
                loader.start()
            for burst in range(4):
                value = 100 + burst + (10 if phase == "loaded" else 0)
                sent += storm_reload(agent, "a", value, count=1000)  # (waits until applied)
                assert limit_of_a() == value
                assert agent.proc.poll() is None
            if phase == "loaded":
                stop_load.set()
                loader.join(60)
                assert not load_errors, load_errors[0]
                assert loaded[0] > 0
        # A revocation sent inside a storm is applied.
        agent.rewrite_config({"a": agent.tenants["a"]})
        sent += signal_storm(pid, signal.SIGHUP, 1000)

        def b_refused() -> bool:
            try:
                b.stat("f.bin")
            except OSError as exc:
                return exc.errno == errno.EACCES
            return False
        wait_for(b_refused, 60, "tenant b's revocation to be applied")
        # SIGHUPs and SIGTERMs together: the agent stops, cleanly.
        for _ in range(5):
            sent += signal_storm(pid, signal.SIGHUP, 200)
            sent += signal_storm(pid, signal.SIGTERM, 50)
        print(f"\nsignal storm: {sent} signals, {loaded[0]} loaded iterations")
        assert agent.proc.wait(60) == 0
        assert any(e["event"] == "agent_stopped" for e in agent.logs())
    finally:
        stop_load.set()
        agent.terminate()


# -- 2. memory: replies that are never read -----------------------------------------------------


def test_unread_replies_keep_the_agents_rss_under_its_total(site: Site, good: RemoteFS) -> None:
    """24 reads of 64 MiB from a client that never takes the replies (its ZeroMQ socket
    holds one message and stops reading the connection): replies count until they have
    left, so the tenant's budget (256 MiB) fills and the rest is refused; the agent's RSS
    grows by less than its configured total (320 MiB) — not 24 × 64 MiB."""
    agent = site.agent
    warm = agent.client("hog")  # guest memory and daemon warm (they are not the attack)
    assert len(warm.read_bytes("big.bin")) == 64 * MIB
    warm.close()
    wait_for(lambda: agent.tenant_status("hog")["bytes_in_flight"] == 0, 20, "hog idle")
    before = rss_mib(agent.proc.pid)
    with UnreadReplies(agent, "hog", b"big.bin", reads=24, size=64 * MIB):
        peak = before
        with _Prober(site, good):

            def settled() -> bool:
                nonlocal peak
                peak = max(peak, rss_mib(agent.proc.pid))
                s = agent.tenant_status("hog")
                return (s["rejected"].get("EAGAIN", 0) >= 20 and s["requests_in_flight"] == 0
                        and s["queued"] == 0 and s["unsent_bytes"] > 0)
            try:
                wait_for(settled, 60, "the agent to have taken all 24 reads")
            except AssertionError:
                print(agent.tenant_status("hog"), {k: v for k, v in agent.status().items()
                                                   if k != "tenants"})
                raise
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                peak = max(peak, rss_mib(agent.proc.pid))
                time.sleep(0.05)
        status = agent.status()
        hog = status["tenants"]["hog"]
        print(f"\nunread replies: RSS {before:.0f} -> peak {peak:.0f} MiB (+{peak - before:.0f}; "
              f"total {TOTAL_BYTES // MIB} MiB); hog holds {hog['bytes_in_flight'] / MIB:.0f} "
              f"MiB, {hog['unsent_bytes'] / MIB:.0f} MiB of it unsent; refused "
              f"{hog['rejected']}")
        assert hog["bytes_in_flight"] <= 256 * MIB
        assert hog["unsent_bytes"] > 0  # what the client does not read still counts
        assert status["bytes_in_flight"] <= TOTAL_BYTES
        assert peak - before < TOTAL_BYTES / MIB
    # Once the client is gone, so is what it held.
    wait_for(lambda: agent.tenant_status("hog")["bytes_in_flight"] == 0, 30,
             "the unread replies to be released")
    _good_works(site, good)


# -- 3. every message counts; the log is bounded ------------------------------------------------


def test_every_message_counts_against_the_rate(site: Site, good: RemoteFS) -> None:
    """A tenant limited to 200 requests/s sends 20,000 pings and 20,000 malformed
    messages as fast as it can: at most the rate is served, refusals are answered up to
    ten times the rate, and the rest is dropped unanswered."""
    agent = site.agent
    before = agent.tenant_status("pinger")
    with agent.raw("pinger") as raw, _Prober(site, good):
        t0 = time.monotonic()
        message_flood(raw, 20_000)
        sent_for = time.monotonic() - t0
        answered, ok = take_replies(raw, 1500)
        elapsed = time.monotonic() - t0
    status = agent.tenant_status("pinger")
    dropped = status["dropped"] - before["dropped"]
    print(f"\nrate: 40,000 messages in {sent_for:.2f} s at 200/s: {ok} served, "
          f"{answered - ok} refused, {dropped} dropped unanswered in {elapsed:.1f} s")
    assert ok <= 200 * (elapsed + 1) + 200
    assert answered <= 11 * 200 * (elapsed + 1) + 2200
    assert dropped >= 40_000 - answered - 100  # (a few may still be on their way)
    assert status["rejected"].get("EAGAIN", 0) > before["rejected"].get("EAGAIN", 0)


def test_the_log_grows_no_faster_than_its_rate(site: Site, good: RemoteFS) -> None:
    """A tenant that makes the agent log as much as it can (malformed messages, failing
    requests, connections) for 5 s: the log grows by at most log_rate per second (plus
    its 4-second burst), repeated lines say how many were held back, and a
    ``log_suppressed`` line counts the rest."""
    agent = site.agent
    size0 = agent.log_path.stat().st_size
    t0 = time.monotonic()
    with _Prober(site, good):
        log_flood(agent, "noisy", t0 + 5, churn=20)
    elapsed = time.monotonic() - t0
    wait_for(lambda: any(e["event"] == "log_suppressed" for e in agent.logs()), 10,
             "a log_suppressed line")
    grown = agent.log_path.stat().st_size - size0
    entries = agent.logs()
    held = sum(e.get("suppressed", 0) for e in entries)
    print(f"\nlog: grew {grown / 1024:.1f} KiB in {elapsed:.1f} s (rate {LOG_RATE // 1024} "
          f"KiB/s); {held} repeated lines held back and counted")
    assert grown <= LOG_RATE * (elapsed + 2 + 4) + 4096
    assert held > 0


# -- 4. connections -----------------------------------------------------------------------------

def test_a_flood_of_authenticated_connections_is_capped(site: Site, good: RemoteFS) -> None:
    """One tenant opens 3,000 authenticated connections (which reconnect when refused):
    it gets its cap and no more, the agent's descriptors stay bounded, another tenant is
    served meanwhile and can connect anew; when the flood ends the descriptors come back."""
    agent = site.agent
    base = fd_count(agent.proc.pid)
    before = procfs.fd_targets(agent.proc.pid)
    peak = base

    def flooder_connections() -> int:
        return int(agent.status()["connections"]["per_tenant"].get("flooder", 0))

    with connection_flood(agent, "flooder", 3000):
        with _Prober(site, good) as prober:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                peak = max(peak, fd_count(agent.proc.pid))
                time.sleep(0.05)
            # the flood's connections keep every handshake slot busy; ZAP still gets
            # through them, so the flooder reaches its cap and a newcomer gets in
            wait_for(lambda: flooder_connections() == TENANT_CONNECTIONS, 30,
                     "the flooder to reach its cap")
            started = time.monotonic()
            with contextlib.closing(agent.client("good", timeout=60)) as newcomer:
                _good_works(site, newcomer)
            newcomer_s = time.monotonic() - started
            conns = agent.status()["connections"]
        print(f"\nauthenticated flood: agent fds {base} -> peak {peak}; {conns}; the good "
              f"tenant's slowest read {prober.slowest * 1000:.0f} ms; a new connection "
              f"served in {newcomer_s:.1f} s")
        assert conns["per_tenant"].get("flooder", 0) == TENANT_CONNECTIONS
        assert peak <= base + TENANT_CONNECTIONS + MAX_HANDSHAKES + GATE_BURST
    _fds_back(agent, base, "the flood's fds to be closed", before)
    _good_works(site, good)


def test_a_flood_of_half_open_peers_is_capped(site: Site, good: RemoteFS) -> None:
    """Plain TCP peers that send 10 greeting bytes and stop: at most max_handshakes of
    them are held, each for the handshake timeout; the agent's descriptors stay bounded
    and another tenant is served meanwhile."""
    agent = site.agent
    base = fd_count(agent.proc.pid)
    before = procfs.fd_targets(agent.proc.pid)
    peak = base

    def sample() -> None:
        nonlocal peak
        peak = max(peak, fd_count(agent.proc.pid))

    with HalfOpenFlood(agent.endpoint, per_round=50, keep=1500) as flood:
        with _Prober(site, good) as prober:
            opened = flood.run(time.monotonic() + 6, sample, limit=HALF_OPEN_PEERS)
        conns = agent.status()["connections"]
        print(f"\nhalf-open flood: {opened} peers; agent fds {base} -> peak {peak}; {conns}; "
              f"the good tenant's slowest read {prober.slowest * 1000:.0f} ms")
        assert peak <= base + MAX_HANDSHAKES + GATE_BURST
        assert conns["handshaking"] <= MAX_HANDSHAKES
    _fds_back(agent, base, "the peers' fds to be closed", before)
    _good_works(site, good)


def test_peers_that_hang_up_at_once_give_their_handshake_slots_back(site: Site,
                                                                    good: RemoteFS) -> None:
    """Thousands of peers that reset their connection as soon as it is accepted, many at
    once. ZeroMQ reports some of them gone before it reports them accepted; none of them
    may keep a handshake slot once the handshake timeout is over (a slot kept for good
    would, in the end, leave every newcomer refused)."""
    agent = site.agent
    with _Prober(site, good):
        connected = hang_ups(agent.endpoint, 4000)
    assert connected > 0
    wait_for(lambda: agent.status()["connections"]["handshaking"] == 0,
             HANDSHAKE_TIMEOUT + HANDSHAKE_SLACK + 10, "every handshake slot to be free")
    _good_works(site, good)


# -- helpers ----------------------------------------------------------------------------------


def _fds_back(agent: AgentProc, base: int, what: str, before: dict[str, str]) -> None:
    """Wait until the agent's descriptors are back to ``base`` (give or take two)."""
    try:
        wait_for(lambda: fd_count(agent.proc.pid) <= base + 2, 30, what)
    except AssertionError:
        now = procfs.fd_targets(agent.proc.pid)
        new = {fd: what for fd, what in now.items() if before.get(fd) != what}
        raise AssertionError(f"{what}: {fd_count(agent.proc.pid)} fds (base {base}): new "
                             f"{new}; {agent.status()['connections']}") from None


def _raw_handle(raw: Any, path: bytes, flags: int) -> int:
    reply = raw.call(m.Open(path=path, flags=flags, mode=0o644))
    assert reply.error is None, reply.error
    return int(wire.decode_value(m.Open(path=b""), reply.value).handle)
