"""The /proc readers: a process that exits at any moment reads as gone, never as an error."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from pyvirtiofs.tools import procfs


@pytest.fixture
def sleeper() -> Any:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_process_reads_as_running_with_its_parent_and_cpu(sleeper: Any) -> None:
    assert not procfs.is_gone(sleeper.pid)
    assert procfs.state(sleeper.pid) in ("R", "S", "D")
    assert procfs.parent_pid(sleeper.pid) == os.getpid()
    cpu = procfs.cpu_seconds(sleeper.pid)
    assert cpu is not None and cpu >= 0
    assert (procfs.status_kib(sleeper.pid, "VmRSS") or 0) > 0
    assert procfs.status_kib(sleeper.pid, "Threads") == 1
    rss, anon, threads = procfs.memory(sleeper.pid)
    assert rss is not None and anon is not None and 0 < anon <= rss and threads == 1


def test_a_stopped_process_reads_as_stopped(sleeper: Any) -> None:
    os.kill(sleeper.pid, signal.SIGSTOP)
    try:
        os.waitid(os.P_PID, sleeper.pid, os.WSTOPPED)  # returns once it has stopped
        assert procfs.state(sleeper.pid) in ("T", "t")
        assert procfs.state(sleeper.pid, sleeper.pid) in ("T", "t")  # its one thread
    finally:
        os.kill(sleeper.pid, signal.SIGCONT)


def test_a_zombie_and_a_reaped_process_read_as_gone(sleeper: Any) -> None:
    sleeper.kill()
    os.waitid(os.P_PID, sleeper.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
    assert procfs.state(sleeper.pid) == "Z" and procfs.is_gone(sleeper.pid)
    sleeper.wait()
    assert procfs.is_gone(sleeper.pid) and procfs.state(sleeper.pid) is None
    assert procfs.cpu_seconds(sleeper.pid) is None
    assert procfs.parent_pid(sleeper.pid) is None
    assert procfs.status_values(sleeper.pid) is None
    assert procfs.fd_count(sleeper.pid) is None and procfs.fd_targets(sleeper.pid) == {}
    assert procfs.memory(sleeper.pid) == (None, None, None) and not procfs.fd_kinds(sleeper.pid)


class _ExitsBeforeRead(io.StringIO):
    def read(self, size: int | None = -1) -> str:
        raise ProcessLookupError(3, "No such process")


def test_a_process_that_exits_between_open_and_read_reads_as_gone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # /proc/PID/stat opens while the process exists; the read then fails with ESRCH
    monkeypatch.setattr(procfs, "open", lambda *a, **k: _ExitsBeforeRead(), raising=False)
    assert procfs.is_gone(os.getpid())
    assert procfs.cpu_seconds(os.getpid()) is None
    assert procfs.status_kib(os.getpid(), "VmRSS") is None


def test_descriptors_are_counted_and_named() -> None:
    before = procfs.fd_count(os.getpid())
    r, w = os.pipe()
    try:
        assert procfs.fd_count(os.getpid()) == (before or 0) + 2
        targets = procfs.fd_targets(os.getpid())
        assert targets[str(r)].startswith("pipe:[") and targets[str(w)] == targets[str(r)]
        assert procfs.fd_kinds(os.getpid())["pipe:"] >= 2
    finally:
        os.close(r)
        os.close(w)
