"""A share that restarts its daemon: ENOTCONN for the call that saw the death, a fresh
session on the next call, ESTALE for handles opened before."""

from __future__ import annotations

import errno
import signal
from pathlib import Path

import pytest

from pyvirtiofs.api import connect


def test_daemon_death_then_restart_on_next_call(share: Path) -> None:
    (share / "f").write_bytes(b"before")
    with connect(share, restart=True) as fs:
        f = fs.open("f", "rb", buffering=0)
        daemon = fs.transport.daemon  # type: ignore[attr-defined]
        daemon.kill(signal.SIGKILL)
        daemon.wait(5)
        with pytest.raises(OSError) as info:
            fs.listdir("/")  # not served from the lookup cache: it needs the device
        assert info.value.errno == errno.ENOTCONN
        # The next call brings up a new daemon and session by itself.
        assert fs.read_bytes("f") == b"before"
        fs.write_bytes("g", b"after")
        assert (share / "g").read_bytes() == b"after"
        assert fs.transport.daemon is not daemon  # type: ignore[attr-defined]
        with pytest.raises(OSError) as info:
            f.read(3)
        assert info.value.errno == errno.ESTALE
        f.close()  # closing a stale handle is quiet


def test_without_restart_the_share_stays_down(share: Path) -> None:
    with connect(share) as fs:
        fs.transport.daemon.kill(signal.SIGKILL)  # type: ignore[attr-defined]
        for _ in range(2):
            with pytest.raises(OSError) as info:
                fs.listdir("/")
            assert info.value.errno == errno.ENOTCONN
