"""The actor core's promises: a session that never blocks, handles without threads, and a
handle dropped unclosed that is released anyway."""

from __future__ import annotations

import gc
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofs.actors import messages as m
from pyvirtiofs.api.local import connect
from pyvirtiofs.codec.fuse_abi import Opcode
from tests.actors.helpers import daemon_fds, eventually, request_count
from tests.actors.test_hostile_device import HELLO, TreeResponder, _set, make_fs

pytestmark = pytest.mark.daemon


def test_a_held_lookup_delays_only_its_own_caller() -> None:
    """While the device holds one LOOKUP, a stat of a cached path and a stat that needs a
    LOOKUP of its own both complete: the session is not waiting for anyone."""
    with make_fs(request_timeout=30) as r:
        r.fs.stat("sub")  # cached from now on
        r.backend.arm(Opcode.LOOKUP, _set(hold=True), match=lambda q: q.name == b"hello")
        held: dict[str, Any] = {}

        def slow() -> None:
            try:
                held["size"] = r.fs.stat("hello").st_size
            except OSError as exc:
                held["error"] = exc

        caller = threading.Thread(target=slow)
        caller.start()
        assert eventually(lambda: r.device_stats()["in_flight"], lambda n: n == 1) == 1
        # Straight to the session: the published-attributes shortcut would not prove it.
        sub = r.fs.session.ask(m.Stat(path=b"sub"), timeout=5)
        inner = r.fs.session.ask(m.Stat(path=b"sub/inner"), timeout=5)
        assert sub.mode & 0o170000 == 0o040000 and inner.size == len(TreeResponder.INNER)
        assert caller.is_alive() and not held  # still held back
        r.backend.release_held()
        caller.join(timeout=10)
        assert held.get("size") == len(HELLO), held
        r.assert_no_leaks()


def test_ten_thousand_open_handles_add_no_threads(share: Path) -> None:
    """Handles are actors without threads: 10,000 of them open at once (one file, so the
    daemon needs one descriptor each) add no thread, and each is released on close."""
    (share / "f").write_bytes(b"x")
    with connect(share) as fs:
        first = fs.open("f", "rb")
        threads_with_one = threading.active_count()
        files = [fs.open("f", "rb") for _ in range(9_999)]
        assert threading.active_count() <= threads_with_one  # not one more
        assert fs.stats()["session"]["handles"] == 10_000
        assert files[-1].read() == b"x"
        releases = request_count(fs, Opcode.RELEASE)
        for f in [first, *files]:
            f.close()
        assert request_count(fs, Opcode.RELEASE) == releases + 10_000
        assert eventually(lambda: fs.stats()["session"]["handles"], lambda n: n == 0) == 0


def test_a_dropped_unclosed_file_is_released_with_a_resource_warning(share: Path) -> None:
    (share / "f").write_bytes(b"data")
    with connect(share) as fs:
        fs.stat("f")
        baseline = daemon_fds(fs.transport)
        releases = request_count(fs, Opcode.RELEASE)
        f = fs.open("f", "rb")
        assert f.read(2) == b"da" and daemon_fds(fs.transport) == baseline + 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            del f
            gc.collect()
        assert any(issubclass(w.category, ResourceWarning) and "unclosed file" in str(w.message)
                   for w in caught), [str(w.message) for w in caught]
        assert eventually(lambda: request_count(fs, Opcode.RELEASE),
                          lambda n: n == releases + 1) == releases + 1
        assert eventually(lambda: daemon_fds(fs.transport), lambda n: n == baseline) == baseline
        assert eventually(lambda: fs.stats()["session"]["handles"], lambda n: n == 0) == 0
