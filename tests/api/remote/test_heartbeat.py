"""Both sides notice the other's death, in bounded time.

* A remote client notices a server that dies (SIGKILL, mid-request) or stops answering
  (SIGSTOP) within 2 s: its pending calls fail with ``ENOTCONN``, and so do calls made
  while the server is gone; once the server answers again, so does the client.
* A server releases the handles of a client that stops (SIGSTOP) within its heartbeat
  timeout (a killed client: tests/api/remote/test_remote.py).

The server runs in a child process (the soak's ``ServerProcess``: a ShareServer on a
private virtiofsd). No sleeps: every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofs.actors import messages as m
from pyvirtiofs.api import connect, connect_remote
from pyvirtiofs.api.remote.server import ShareServer, Tenant
from pyvirtiofs.tools import procfs
from pyvirtiofs.tools.agentrig import wait_for
from pyvirtiofs.tools.soak import ServerProcess
from tests import REPO

DETECTION_BOUND = 2.0  # seconds


def _stopped(pid: int) -> bool:
    return procfs.state(pid) in ("T", "t")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    share = tmp_path / "share"
    share.mkdir()
    (share / "f.bin").write_bytes(os.urandom(1 << 20))
    runtime = tmp_path / "run"
    runtime.mkdir()
    proc = ServerProcess(str(share), str(runtime), None).start()
    daemon = proc.daemon_pids()["remote"]
    try:
        yield proc
    finally:
        for pid in (daemon, proc.pid):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()
        if daemon is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon, signal.SIGKILL)


def _pending_call(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a thread; the result dict gets its error and when it came."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except OSError as exc:
            out["error"] = exc
        out["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_server_killed_mid_request_fails_pending_calls_within_2s(
        server: ServerProcess) -> None:
    daemon = server.daemon_pids()["remote"]
    assert daemon is not None and server.proc is not None
    fs = connect_remote(server.endpoints[0], timeout=30)
    try:
        f = fs.open("f.bin", "rb", buffering=0)
        assert len(f.read(10)) == 10
        os.kill(daemon, signal.SIGSTOP)  # the next read stays in flight on the server
        wait_for(lambda: _stopped(daemon), 10, "the daemon to stop")
        thread, out = _pending_call(lambda: f.read(4096))
        wait_for(lambda: server.stats().get("tenant", {}).get("requests_in_flight") == 1,
                  10, "the read to be in flight on the server")
        killed = time.monotonic()
        server.proc.kill()
        thread.join(30)
        assert isinstance(out.get("error"), OSError), out
        assert out["error"].errno == errno.ENOTCONN
        took = out["at"] - killed
        print(f"\nkilled server noticed after {took * 1000:.0f} ms")
        assert took < DETECTION_BOUND
        t0 = time.monotonic()
        with pytest.raises(OSError) as info:  # and the next call does not wait at all
            fs.stat("f.bin")
        assert info.value.errno == errno.ENOTCONN and time.monotonic() - t0 < 0.5
    finally:
        fs.close()


def test_stopped_server_is_noticed_within_2s_and_reached_again(server: ServerProcess) -> None:
    assert server.pid is not None
    fs = connect_remote(server.endpoints[0], timeout=30)
    try:
        assert fs.stat("f.bin").st_size == 1 << 20
        os.kill(server.pid, signal.SIGSTOP)
        wait_for(lambda: _stopped(server.pid), 10, "the server to stop")  # type: ignore[arg-type]
        stopped = time.monotonic()
        thread, out = _pending_call(lambda: fs.stat("f.bin"))
        thread.join(30)
        assert isinstance(out.get("error"), OSError), out
        assert out["error"].errno == errno.ENOTCONN
        took = out["at"] - stopped
        print(f"\nstopped server noticed after {took * 1000:.0f} ms")
        assert took < DETECTION_BOUND
        os.kill(server.pid, signal.SIGCONT)

        def answers() -> bool:
            try:
                return fs.stat("f.bin").st_size == 1 << 20
            except OSError as exc:
                assert exc.errno == errno.ENOTCONN
                return False
        wait_for(answers, 20, "the client to reach the server again")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGCONT)  # type: ignore[arg-type]
        fs.close()


def test_a_busy_server_is_not_taken_for_dead(server: ServerProcess) -> None:
    """A request that takes longer than the detection bound (its daemon stopped) fails
    only when it has to: the server itself still answers the heartbeats."""
    daemon = server.daemon_pids()["remote"]
    assert daemon is not None
    fs = connect_remote(server.endpoints[0], timeout=30)
    try:
        f = fs.open("f.bin", "rb", buffering=0)
        os.kill(daemon, signal.SIGSTOP)
        wait_for(lambda: _stopped(daemon), 10, "the daemon to stop")
        thread, out = _pending_call(lambda: f.read(4096))
        deadline = time.monotonic() + 3 * DETECTION_BOUND
        while time.monotonic() < deadline:  # (the point is that nothing happens)
            assert "error" not in out, out
            time.sleep(0.1)
        os.kill(daemon, signal.SIGCONT)
        thread.join(30)
        assert out.get("value") is not None and len(out["value"]) == 4096, out
        f.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGCONT)
        fs.close()


CLIENT = textwrap.dedent("""
    import sys
    from pyvirtiofs.api import connect_remote
    fs = connect_remote(sys.argv[1])
    files = [fs.open(f"f{i}", "rb") for i in range(10)]
    print("open", flush=True)
    sys.stdin.read()
""")


def test_stopped_client_is_released_within_the_heartbeat_timeout(share: Path) -> None:
    for i in range(10):
        (share / f"f{i}").write_bytes(b"x")
    fs = connect(share)
    server = ShareServer("tcp://127.0.0.1:0", tenant=Tenant("t", fs), heartbeat_timeout=1.5)
    server.start()
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, server.endpoints[0]],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
        handles = lambda: server.stats()["tenants"].get("t", {}).get("handles", 0)  # noqa: E731
        wait_for(lambda: handles() == 10, 10, "the handles to show")
        os.kill(proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(lambda: handles() == 0, 10, "the stopped client's handles to be released")
        took = time.monotonic() - stopped
        print(f"\nstopped client released after {took * 1000:.0f} ms (heartbeat timeout 1.5 s)")
        assert took < 1.5 + 1.0 + 1.0  # the timeout, the sweep's period, a margin
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
        server.stop()
        fs.close()


def test_calls_before_the_first_connection_still_wait_for_it(tmp_path: Path) -> None:
    """A client started before its server is not failed early: ENOTCONN is for a
    connection that was lost."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    share = tmp_path / "late"
    share.mkdir()
    (share / "x").write_bytes(b"late")
    fs = connect_remote(f"tcp://127.0.0.1:{port}", timeout=30)
    local = None
    server = None
    try:
        thread, out = _pending_call(lambda: fs._request(m.Stat(path=b"x")))
        local = connect(share)
        server = ShareServer(f"tcp://127.0.0.1:{port}", tenant=Tenant("t", local)).start()
        thread.join(30)
        assert "error" not in out, out
        assert out["value"].size == 4
    finally:
        fs.close()
        if server is not None:
            server.stop()
        if local is not None:
            local.close()
