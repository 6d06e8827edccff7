"""The daemon is SIGKILLed under load: every caller learns it (ENOTCONN) within 2 s, no
thread stays blocked, later calls fail at once — cached answers included — and closing
the share afterwards does not hang."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyvirtiofs.actors.messages import DeviceStats
from pyvirtiofs.api.local import VirtioFS
from pyvirtiofs.hw.vhost_user.transport import VhostUserTransport
from tests.actors.helpers import eventually, mounted

DEADLINE = 2.0


class Callers:
    """Threads that repeat one operation until it raises; each records what it got and
    when. ``running`` is set once every thread has completed ``warmup`` calls, so the kill
    lands while all of them are busy (no guessed sleep)."""

    def __init__(self, count: int, op: Callable[[int, int], Any], warmup: int = 2) -> None:
        self.results: dict[int, tuple[BaseException, float]] = {}
        self._op = op
        self._warm = threading.Semaphore(0)
        self._count = count
        self._warmup = warmup
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(count)]

    def _run(self, i: int) -> None:
        n = 0
        try:
            while True:
                self._op(i, n)
                n += 1
                if n == self._warmup:
                    self._warm.release()
        except BaseException as exc:
            self.results[i] = (exc, time.monotonic())
            if n < self._warmup:
                self._warm.release()

    def start_and_wait_until_busy(self) -> None:
        for t in self.threads:
            t.start()
        for _ in range(self._count):
            assert self._warm.acquire(timeout=60), "callers did not get going"

    def join(self, timeout: float) -> list[threading.Thread]:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return [t for t in self.threads if t.is_alive()]


def kill_daemon(transport: VhostUserTransport) -> float:
    """SIGKILL the process that serves the requests; returns when (monotonic)."""
    assert transport.daemon is not None
    pid = transport.daemon.worker_pid()
    assert pid is not None
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    return killed_at


def assert_all_enotconn_in_time(callers: Callers, killed_at: float) -> None:
    stuck = callers.join(timeout=DEADLINE + 3)
    assert not stuck, f"{len(stuck)} threads still blocked"
    assert len(callers.results) == len(callers.threads)
    for i, (exc, when) in sorted(callers.results.items()):
        assert isinstance(exc, OSError) and exc.errno == errno.ENOTCONN, (i, exc)
        assert when - killed_at < DEADLINE, f"thread {i} learnt it {when - killed_at:.2f} s late"


def assert_fails_fast_then_closes(fs: VirtioFS, path: str) -> None:
    for call in (lambda: fs.stat(path), lambda: fs.listdir("/"), lambda: fs.mkdir("new"),
                 lambda: fs.read_bytes(path)):
        t0 = time.monotonic()
        try:
            call()
        except OSError as exc:
            assert exc.errno == errno.ENOTCONN, exc
        else:
            raise AssertionError("a call succeeded after the daemon died")
        assert time.monotonic() - t0 < 0.5
    closer = threading.Thread(target=fs.close, daemon=True)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive(), "closing the share hangs"


def test_sigkill_during_large_reads(share: Path) -> None:
    size = 32 << 20
    (share / "big").write_bytes(os.urandom(1 << 20) * (size >> 20))
    with mounted(share) as (fs, transport):
        opened = [fs.open("big", "rb", buffering=0) for _ in range(4)]

        def read(i: int, n: int) -> None:
            assert len(opened[i].pread(size, 0)) == size

        callers = Callers(len(opened), read, warmup=1)
        callers.start_and_wait_until_busy()
        killed_at = kill_daemon(transport)
        assert_all_enotconn_in_time(callers, killed_at)
        for f in opened:  # an open handle fails too, and closes without hanging
            try:
                f.read(10)
            except OSError as exc:
                assert exc.errno == errno.ENOTCONN
            else:
                raise AssertionError("read succeeded after the daemon died")
            f.close()
        assert_fails_fast_then_closes(fs, "big")


def test_sigkill_during_a_metadata_storm(share: Path) -> None:
    (share / "known").write_bytes(b"x")
    with mounted(share) as (fs, transport):
        fs.mkdir("storm")

        def storm(i: int, n: int) -> None:
            kind = i % 4
            if kind == 0:
                fs.stat("known")  # answered from the session's cache: must fail all the same
            elif kind == 1:
                fs.write_bytes(f"storm/c{i}-{n}", b"data")
            elif kind == 2:
                fs.mkdir(f"storm/d{i}-{n}")
                fs.stat(f"storm/d{i}-{n}")
            else:
                fs.listdir("storm")

        callers = Callers(16, storm, warmup=3)
        callers.start_and_wait_until_busy()
        killed_at = kill_daemon(transport)
        assert_all_enotconn_in_time(callers, killed_at)
        assert_fails_fast_then_closes(fs, "known")


def test_cached_answers_stop_when_the_daemon_dies(share: Path) -> None:
    """With cache=always the daemon grants day-long timeouts: only the device's death
    notice can stop the session from answering stat() out of its cache."""
    (share / "known").write_bytes(b"x")
    with mounted(share, cache="always") as (fs, transport):
        assert fs.stat("known").st_size == 1
        kill_daemon(transport)
        dead = eventually(lambda: fs.device.ask(DeviceStats())["dead"], bool, timeout=DEADLINE)
        assert dead
        assert eventually(lambda: _errno_of(lambda: fs.stat("known")),
                          lambda e: e is not None, timeout=1) == errno.ENOTCONN
        assert_fails_fast_then_closes(fs, "known")


def _errno_of(call: Callable[[], Any]) -> int | None:
    try:
        call()
    except OSError as exc:
        return exc.errno
    return None


def test_stalled_daemon_times_out_and_late_replies_are_dropped(share: Path) -> None:
    """SIGSTOP: the daemon is alive but answers nothing. A read times out after about one
    timeout (not one per chunk); once the daemon resumes, the late READ replies must not
    be copied into the buffer the caller has taken back, and the share works again."""
    data = os.urandom(4 << 20)
    (share / "big").write_bytes(data)
    with mounted(share, request_timeout=1.0) as (fs, transport):
        f = fs.open("big", "rb", buffering=0)
        assert transport.daemon is not None
        pid = transport.daemon.worker_pid()
        assert pid is not None
        buf = bytearray(len(data))
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            try:
                f.readinto(buf)
            except OSError as exc:
                assert exc.errno == errno.ETIMEDOUT, exc
            else:
                raise AssertionError("a read from a stopped daemon succeeded")
            assert time.monotonic() - t0 < 4
            buf[:] = b"\xaa" * len(buf)  # the caller reuses its buffer
        finally:
            os.kill(pid, signal.SIGCONT)
        assert fs.stat("big").st_size == len(data)
        idle = eventually(lambda: fs.device.ask(DeviceStats())["in_flight"], lambda n: n == 0)
        assert idle == 0
        assert buf == b"\xaa" * len(buf)
        assert f.pread(100, 5) == data[5:105]
        f.close()


def test_closing_the_share_under_busy_callers(share: Path) -> None:
    """close() while threads are mid-call: it returns, and every caller promptly gets an
    OSError (share closed: ENOTCONN; its handle stopped: EBADF) instead of hanging."""
    (share / "f").write_bytes(os.urandom(1 << 20))
    with mounted(share) as (fs, _):
        def op(i: int, n: int) -> None:
            if i % 2:
                fs.stat("f")
            else:
                fs.read_bytes("f")

        callers = Callers(8, op, warmup=2)
        callers.start_and_wait_until_busy()
        closer = threading.Thread(target=fs.close, daemon=True)
        closer.start()
        closer.join(timeout=10)
        assert not closer.is_alive(), "close() hangs under load"
        assert not callers.join(timeout=5), "callers still blocked after close()"
        for i, (exc, _) in callers.results.items():
            assert isinstance(exc, OSError) and exc.errno in (errno.ENOTCONN, errno.EBADF), (
                i, exc)


def test_device_fails_calls_it_can_no_longer_deliver(share: Path) -> None:
    """A FuseCall sent to a stopped device actor, or arriving just after it stopped (it
    passed the sender's liveness check just before), fails at once: pykka would drop a
    told message and its caller would wait for a full timeout."""
    from typing import NamedTuple

    from pyvirtiofs.actors.messages import FuseCall
    from pyvirtiofs.actors.runtime import Future
    from pyvirtiofs.codec import fuse_requests as rq

    class Envelope(NamedTuple):  # the inbox protocol: what ActorRef.tell puts there
        message: Any
        reply_to: Any = None

    def assert_failed(future: Future[Any]) -> None:
        try:
            future.get(timeout=1)
        except OSError as exc:
            assert exc.errno == errno.ENOTCONN
        else:
            raise AssertionError("a call to a stopped device succeeded")

    with mounted(share) as (fs, _):
        client, ref = fs.device_client, fs.device
        ref.stop()
        assert_failed(client.submit(rq.getattr(1)))
        late: Future[Any] = Future()
        ref.actor_inbox.put(Envelope(FuseCall(request=rq.getattr(1), reply=late)))
        assert_failed(late)
        assert ref.actor_inbox.empty()
