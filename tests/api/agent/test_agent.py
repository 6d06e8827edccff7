"""The multi-tenant agent end to end, against real virtiofsd daemons it starts itself:
authentication, limits, fairness, lifecycle (killed tenants, killed daemons, reload,
SIGTERM), status, structured logs, and hostile input.

No sleeps to wait for something: every wait polls with a deadline (tests.api.agent.harness).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtiofs.actors import messages as m
from pyvirtiofs.api.remote import wire
from pyvirtiofs.api.remote.client import RemoteFS
from pyvirtiofs.tools import procfs
from pyvirtiofs.tools.hostile import Streamer
from tests.api.agent.harness import (
    REPO,
    RawClient,
    Site,
    agent_site,
    fd_count,
    kill_daemon,
    op_strategy,
    start_agent,
    stopped,
    wait_for,
)

BIG = 64 << 20  # the file the streaming tenant reads in a loop


TENANTS: dict[str, dict[str, Any]] = {
    "alice": {},
    "bob": {},
    "limited": {"limits": {"open_handles": 5, "bytes_in_flight": "1MiB"}},
    "throttled": {"limits": {"requests_per_second": 5}},
    "victim": {},
    "silent": {},
    "crashy": {},
    "mallory": {"limits": {"open_handles": 64}},
    "streamer": {},
    "prober": {},
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    def prepare(host: Path) -> None:
        for tenant in TENANTS:
            (host / tenant / f"{tenant}.txt").write_bytes(f"{tenant}'s file\n".encode())
        (host / "limited" / "mb.bin").write_bytes(os.urandom(2 << 20))
        for i in range(100):
            (host / "victim" / f"f{i}").write_bytes(b"v" * 10)
        with open(host / "streamer" / "big.bin", "wb") as f:
            f.truncate(BIG)

    with agent_site(tmp_path_factory, TENANTS, prepare) as site:
        yield site


@pytest.fixture(scope="module")
def alice(site: Site) -> RemoteFS:
    """A long-lived session of another tenant: every disaster below must leave it working."""
    return site.agent.client("alice")


def _alice_works(alice: RemoteFS) -> None:
    assert alice.read_bytes("alice.txt") == b"alice's file\n"


# -- authentication --------------------------------------------------------------------------


def test_two_tenants_each_see_only_their_own_files(site: Site, alice: RemoteFS) -> None:
    bob = site.agent.client("bob")
    assert sorted(alice.listdir("/")) == ["alice.txt"]
    assert sorted(bob.listdir("/")) == ["bob.txt"]
    alice.write_bytes("from-alice.txt", b"hello")
    assert (site.share("alice") / "from-alice.txt").read_bytes() == b"hello"
    assert not bob.exists("from-alice.txt")
    with pytest.raises(FileNotFoundError):
        bob.stat("../alice/alice.txt")
    alice.remove("from-alice.txt")
    bob.close()


def test_an_unknown_key_is_refused_before_any_request(site: Site, alice: RemoteFS) -> None:
    before = site.agent.status()
    with site.agent.raw("eve") as eve:  # a valid key pair nobody configured
        assert eve.handshake() == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        assert eve.refused(m.Stat(path=b"/"))  # nothing ever answers it
    after = site.agent.status()
    assert after["auth"]["refused"] > before["auth"]["refused"]
    assert sum(t["clients"] for t in after["tenants"].values()) == sum(
        t["clients"] for t in before["tenants"].values())
    entry = site.agent.wait_log(lambda e: e["event"] == "auth_refused"
                                and e.get("reason") == "unknown key", "the refusal log line")
    assert entry["level"] == "warning" and entry["tenant"] is None
    _alice_works(alice)


def test_a_client_without_curve_cannot_connect(site: Site) -> None:
    with site.agent.raw(None) as anonymous:
        assert anonymous.handshake() in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                                         zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        assert anonymous.refused(m.Stat(path=b"/"))


def test_a_client_with_the_wrong_server_key_cannot_connect(site: Site) -> None:
    keys = site.agent.keypair("bob")
    fake_server = site.agent.keypair("eve").public  # not the agent's key
    with RawClient(site.agent.endpoint, type(keys)(keys.public, keys.secret, fake_server)) as c:
        assert c.handshake() != zmq.EVENT_HANDSHAKE_SUCCEEDED


def test_garbage_on_the_tcp_port_is_dropped(site: Site, alice: RemoteFS) -> None:
    host, port = site.agent.endpoint.removeprefix("tcp://").rsplit(":", 1)
    rng = random.Random(5)
    for payload in (b"GET / HTTP/1.0\r\n\r\n", rng.randbytes(70000),
                    b"\xff" + b"\0" * 8 + b"\x7f\x03\x00NULL" + b"\0" * 48):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(payload)
            s.settimeout(10)
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                while s.recv(4096):  # the agent hangs up (or just ignores it)
                    pass
    _alice_works(alice)


def test_a_tenant_key_connects(site: Site) -> None:
    with site.agent.raw("bob") as bob:
        assert bob.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert bob.call(m.Stat(path=b"bob.txt")).error is None


# -- limits ------------------------------------------------------------------------------------


def test_open_handle_limit_gives_emfile_and_spares_others(site: Site, alice: RemoteFS) -> None:
    fs = site.agent.client("limited")
    files = [fs.open("limited.txt", "rb") for _ in range(5)]
    with pytest.raises(OSError) as info:
        fs.open("limited.txt", "rb")
    assert info.value.errno == errno.EMFILE
    with pytest.raises(OSError) as info:
        fs.listdir("/")  # directories count too
    assert info.value.errno == errno.EMFILE
    others = [alice.open("alice.txt", "rb") for _ in range(10)]  # alice has her own limit
    files.pop().close()
    files.append(fs.open("limited.txt", "rb"))
    assert site.agent.tenant_status("limited")["rejected"]["EMFILE"] == 2
    for f in files + others:
        f.close()
    fs.close()


def test_bytes_in_flight_limit_gives_eagain(site: Site, alice: RemoteFS) -> None:
    with site.agent.raw("limited") as raw:
        opened = raw.call(m.Open(path=b"mb.bin", flags=os.O_RDONLY))
        assert opened.error is None
        handle = wire.decode_value(m.Open(path=b""), opened.value).handle
        with stopped(site.agent.daemon_pid("limited")):  # the first read stays in flight
            first = raw.send(m.Read(size=1 << 20, offset=0), handle)
            header = raw.call(m.Read(size=1 << 20, offset=1 << 20), handle)
            assert header.error is not None and header.error.errno == errno.EAGAIN
            assert "bytes in flight" in header.error.strerror
            _alice_works(alice)  # another tenant is not held up by this one's daemon
        header, data = raw.recv()
        assert header.id == first and header.error is None and len(data[0].bytes) == 1 << 20
        assert raw.call(m.Close(), handle).error is None


def test_request_rate_limit_gives_eagain_then_recovers(site: Site, alice: RemoteFS) -> None:
    with site.agent.raw("throttled") as raw:
        ids = [raw.send(m.Stat(path=b"throttled.txt")) for _ in range(40)]
        errors = []
        for _ in ids:
            header, _ = raw.recv()
            errors.append(header.error.errno if header.error else 0)
        assert errors.count(errno.EAGAIN) >= 20, errors  # 5 per second, burst of 5
        assert set(errors) <= {0, errno.EAGAIN}
        _alice_works(alice)
        wait_for(lambda: raw.call(m.Stat(path=b"throttled.txt")).error is None, 10,
                 "the token bucket to refill")


# -- lifecycle: tenants that vanish, daemons that die ---------------------------------------------


VICTIM = """
import sys
from pyvirtiofs.api import connect_remote
from pyvirtiofs.api.remote.keys import client_keys
fs = connect_remote(sys.argv[1], curve=client_keys(sys.argv[2], sys.argv[3]))
files = [fs.open(f"f{i}", "rb") for i in range(100)]
print("open", flush=True)
sys.stdin.read()
"""


def test_killed_tenant_with_100_open_files_leaves_no_fds(site: Site, alice: RemoteFS) -> None:
    agent = site.agent
    warm = agent.client("victim")
    for i in range(100):  # the session caches these lookups (one O_PATH fd each)
        warm.stat(f"f{i}")
    daemon = agent.daemon_pid("victim")
    base_daemon, base_agent = fd_count(daemon), fd_count(agent.proc.pid)
    proc = subprocess.Popen([sys.executable, "-c", VICTIM, agent.endpoint,
                             str(agent.keys / "victim.key_secret"), str(agent.keys / "agent.key")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
        assert agent.tenant_status("victim")["open_handles"] == 100
        assert fd_count(daemon) >= base_daemon + 100
        proc.kill()
        proc.wait()
        wait_for(lambda: agent.tenant_status("victim")["open_handles"] == 0, 20,
                 "the agent to release the dead tenant's handles")
        wait_for(lambda: fd_count(daemon) <= base_daemon, 20, "the daemon's fds to drop")
        wait_for(lambda: fd_count(agent.proc.pid) <= base_agent, 20, "the agent's fds to drop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    status = agent.tenant_status("victim")
    assert (status["clients"], status["bytes_in_flight"], status["requests_in_flight"]) == (
        1, 0, 0)  # only the warm-up client remains
    agent.wait_log(lambda e: e["event"] == "disconnect" and e["tenant"] == "victim"
                   and e.get("released") == 100, "the disconnect line")
    warm.close()
    _alice_works(alice)


def test_silent_tenant_is_released_after_the_heartbeat_timeout(site: Site) -> None:
    with site.agent.raw("silent") as raw:  # never sends a heartbeat
        for _ in range(3):
            assert raw.call(m.Open(path=b"silent.txt", flags=os.O_RDONLY)).error is None
        assert site.agent.tenant_status("silent")["open_handles"] == 3
        wait_for(lambda: site.agent.tenant_status("silent")["open_handles"] == 0, 20,
                 "the silent tenant's handles to be released")
        assert site.agent.tenant_status("silent")["clients"] == 0


def test_killed_daemon_is_restarted_and_old_handles_are_stale(site: Site,
                                                               alice: RemoteFS) -> None:
    # The handles are closed however this ends: the tests after this one share the agent
    # and count its tenants' open handles.
    with contextlib.closing(site.agent.client("crashy")) as fs, \
            alice.open("alice.txt", "rb", buffering=0) as alice_file:
        f = fs.open("crashy.txt", "rb", buffering=0)
        assert f.read(4) == b"cras"
        old = site.agent.daemon_pid("crashy")
        kill_daemon(old)
        with pytest.raises(OSError) as info:
            f.read(4)  # the next request restarts the daemon; the handle is from before
        assert info.value.errno == errno.ESTALE
        assert fs.read_bytes("crashy.txt") == b"crashy's file\n"  # a fresh session works
        status = site.agent.tenant_status("crashy")
        assert status["restarts"] == 1 and status["daemon_pid"] != old and status["alive"]
        assert status["open_handles"] == 0
        assert alice_file.read() == b"alice's file\n"  # other tenants never noticed
        f.close()  # closing a stale handle is fine
        site.agent.wait_log(lambda e: e["event"] == "restarted" and e["tenant"] == "crashy",
                            "the restart line")


# -- hostile input -------------------------------------------------------------------------------

_MESSAGES = st.one_of(
    st.tuples(st.sampled_from(wire.SESSION_OPS + wire.HANDLE_OPS).flatmap(op_strategy),
              st.sampled_from(["none", "file", "dir", "random", "one"]),
              st.binary(max_size=2000)),
    st.lists(st.binary(max_size=120), min_size=1, max_size=3),  # raw garbage
)


@pytest.fixture(scope="module")
def mallory(site: Site) -> Iterator[RawClient]:
    raw = site.agent.raw("mallory")
    (site.share("mallory") / "d").mkdir()
    yield raw
    raw.close()


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(_MESSAGES, min_size=1, max_size=6))
def test_hostile_messages_leave_every_tenant_working(site: Site, alice: RemoteFS,
                                                     mallory: RawClient,
                                                     batch: list[Any]) -> None:
    opened = mallory.call(m.Open(path=b"mallory.txt", flags=os.O_RDWR | os.O_CREAT))
    dir_opened = mallory.call(m.OpenDir(path=b"/"))
    handles = {"none": 0, "one": 1, "random": 0x1D2C3B4A59687766}
    for kind, reply in (("file", opened), ("dir", dir_opened)):
        handles[kind] = (wire.decode_value(m.Open(path=b""), reply.value).handle
                         if reply.error is None else 0)
    sent = 0
    for message in batch:
        if isinstance(message, list):
            mallory.send_frames(message)
        else:
            op, which, data = message
            if isinstance(op, m.Write):
                mallory.sock.send_multipart([wire.encode_request(99, op, handles[which]), data])
            else:
                mallory.sock.send_multipart([wire.encode_request(99, op, handles[which])])
        sent += 1
    for _ in range(sent):  # every message, however bad, gets exactly one answer
        mallory.recv(timeout=60)
    for h in (handles["file"], handles["dir"]):
        if h:
            mallory.call(m.Close(), h)
    assert mallory.call(m.Stat(path=b"/")).error is None  # the hostile tenant's own session
    _alice_works(alice)


def test_after_the_hostile_messages_the_agent_is_healthy(site: Site, alice: RemoteFS,
                                                         mallory: RawClient) -> None:
    mallory.send_frames([b"\x93\x01"])  # one more (truncated header), so this test stands alone
    assert mallory.recv()[0].error is not None
    status = site.agent.status()
    assert all(t["alive"] for t in status["tenants"].values())
    assert status["tenants"]["mallory"]["errors"] > 0
    errors = [e for e in site.agent.logs() if e.get("level") in ("error", "critical")]
    # The one expected: crashy's daemon was killed. No internal error, no dead actor.
    assert all("device died" in e.get("message", "") for e in errors), errors
    _alice_works(alice)


# -- fairness ----------------------------------------------------------------------------------

def _latencies(fs: RemoteFS, n: int, seconds: float = 0.0) -> list[float]:
    """At least ``n`` stat round trips, and for at least ``seconds``."""
    out = []
    end = time.perf_counter() + seconds
    while len(out) < n or time.perf_counter() < end:
        t0 = time.perf_counter()
        fs.stat("prober.txt")
        out.append(time.perf_counter() - t0)
    return out


def _describe(samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=100)
    return (f"median {statistics.median(samples) * 1e6:.0f} µs, p90 {q[89] * 1e6:.0f} µs, "
            f"p99 {q[98] * 1e6:.0f} µs")


def test_a_streaming_tenant_does_not_starve_another(site: Site) -> None:
    """Tenant B's stat latency (p99) while tenant A streams a large file in 8 MiB reads as
    fast as it can, against B's latency with A paused. The two conditions alternate (A is
    paused with SIGSTOP), so the noise of a shared machine falls on both alike."""
    agent = site.agent
    prober = agent.client("prober")
    _latencies(prober, 100)  # warm up
    idle: list[float] = []
    loaded: list[float] = []

    def measure(streaming: bool) -> None:
        (loaded if streaming else idle).extend(_latencies(prober, 100, 0.6))

    with Streamer(agent, "streamer", "big.bin", seconds=60, chunk=8 << 20) as stream:
        stream.wait_streamed(BIG, 60, "the streaming tenant to read the file once")
        streamed, streaming_time = stream.alternate(4, measure)
    prober.close()
    assert streamed >= 16 << 20, "the stream hardly flowed while we measured"
    rate = streamed / streaming_time / (1 << 20)
    ratio = p99(loaded) / p99(idle)
    print(f"\nfairness: tenant B stat, tenant A paused: {_describe(idle)}\n"
          f"fairness: tenant B stat while tenant A streams {rate:.0f} MiB/s in 8 MiB reads: "
          f"{_describe(loaded)}\nfairness: p99 ratio {ratio:.2f}x, median ratio "
          f"{statistics.median(loaded) / statistics.median(idle):.2f}x (bound 5x on p99)")
    assert ratio <= 5.0


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


# -- status, logs, reload, SIGTERM -----------------------------------------------------------------


def test_status_command_shows_tenants_handles_and_rates(site: Site, alice: RemoteFS) -> None:
    f = alice.open("alice.txt", "rb")
    try:
        out = subprocess.run([sys.executable, "-m", "pyvirtiofs", "status", "--runtime-dir",
                              str(site.agent.runtime_dir)], capture_output=True, text=True,
                             cwd=REPO, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "TENANT" in out.stdout and "BYTES" in out.stdout and "REQ/S" in out.stdout
        row = next(line for line in out.stdout.splitlines() if line.startswith("alice "))
        assert " 1/1024 " in row  # alice's open handle out of her limit
        js = subprocess.run([sys.executable, "-m", "pyvirtiofs", "status", "--config",
                             str(site.agent.config_path), "--json"], capture_output=True,
                            text=True, cwd=REPO, timeout=60)
        status = json.loads(js.stdout)
        assert set(status["tenants"]) == set(TENANTS)
        assert status["tenants"]["alice"]["open_handles"] == 1
        for key in ("bytes_in_flight", "request_rate", "requests_in_flight", "clients"):
            assert key in status["tenants"]["alice"]
    finally:
        f.close()


def test_logs_are_structured_with_tenant_ids(site: Site, alice: RemoteFS) -> None:
    with pytest.raises(FileNotFoundError):
        alice.stat("no-such-file")
    site.agent.wait_log(lambda e: e["event"] == "request_error" and e["tenant"] == "alice",
                        "alice's error line")
    entries = site.agent.logs()
    assert entries and all({"ts", "level", "event", "tenant"} <= set(e) for e in entries)
    connects = [e for e in entries if e["event"] in ("connect", "disconnect")]
    assert connects and all(e["tenant"] in TENANTS for e in connects)
    errors = [e for e in entries if e["event"] == "request_error"]
    assert errors and all(e["tenant"] and e["errno"] for e in errors)


def test_reload_applies_changes_without_dropping_other_sessions(tmp_path: Path) -> None:
    for t in ("keep", "gone", "new"):
        (tmp_path / t).mkdir()
        (tmp_path / t / f"{t}.txt").write_bytes(t.encode())
    tenants = {"keep": {"share": str(tmp_path / "keep")},
               "gone": {"share": str(tmp_path / "gone")}}
    agent = start_agent(tmp_path / "agent", tenants, extra_keys=("new",))
    try:
        keep, gone = agent.client("keep"), agent.client("gone")
        f = keep.open("keep.txt", "rb", buffering=0)
        keep_daemon = agent.daemon_pid("keep")
        # A broken file changes nothing.
        agent.rewrite_config(agent.tenants, text=agent.config_path.read_text()
                             + "[tenants.keep.limits]\nopen_handles = 0\n")
        agent.reload()
        failed = agent.wait_log(lambda e: e["event"] == "reload_failed", "reload_failed")
        assert failed["line"] and "open_handles" in failed["reason"]
        assert gone.read_bytes("gone.txt") == b"gone"
        # Remove one tenant, add one, change a limit of the third.
        agent.rewrite_config({
            "keep": {**agent.tenants["keep"], "limits": {"open_handles": 7}},
            "new": {"public_key": str(agent.keys / "new.key"), "share": str(tmp_path / "new")},
        })
        agent.reload()
        assert f.read() == b"keep"  # the open handle survived the reload
        status = agent.status()
        assert set(status["tenants"]) == {"keep", "new"}
        assert status["tenants"]["keep"]["limits"]["open_handles"] == 7
        assert status["tenants"]["keep"]["daemon_pid"] == keep_daemon
        with pytest.raises(OSError) as info:
            gone.stat("gone.txt")
        assert info.value.errno == errno.EACCES
        refused = [e for e in agent.logs() if e["event"] == "refused"]
        assert len(refused) == 1  # one line for that peer, not one per heartbeat
        assert agent.client("new").read_bytes("new.txt") == b"new"
        f.close()
    finally:
        assert agent.terminate() == 0


def test_sigterm_drains_releases_and_exits_zero(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "data.bin").write_bytes(b"z" * (1 << 20))
    agent = start_agent(tmp_path / "agent", {"t": {"share": str(tmp_path / "t")}})
    daemon = agent.daemon_pid("t")
    raw = agent.raw("t")
    try:
        handle = wire.decode_value(
            m.Open(path=b""), raw.call(m.Open(path=b"data.bin", flags=os.O_RDONLY)).value).handle
        with stopped(daemon):
            pending = raw.send(m.Read(size=1 << 20, offset=0), handle)
            wait_for(lambda: agent.status()["tenants"]["t"]["requests_in_flight"] == 1, 10,
                     "the read to be in flight")
            agent.proc.send_signal(signal.SIGTERM)
            agent.wait_log(lambda e: e["event"] == "agent_stopping", "the agent to stop")
            late = raw.call(m.Stat(path=b"data.bin"))  # new work is refused while draining
            assert late.error is not None and late.error.errno == errno.ESHUTDOWN
        header, data = raw.recv()  # ...but what was in flight is answered
        assert header.id == pending and header.error is None and len(data[0].bytes) == 1 << 20
        assert agent.proc.wait(60) == 0
        wait_for(lambda: procfs.is_gone(daemon), 10, "the daemon to stop")
        assert not (agent.runtime_dir / "control.sock").exists()
        assert any(e["event"] == "agent_stopped" for e in agent.logs())
    finally:
        raw.close()
        agent.terminate()
