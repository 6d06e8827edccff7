"""What reaches the daemon through the FUSE mount, and when (api/integrations/fusemount.py).

* ``ls -l`` asks every entry for two xattrs: the first pass costs one LISTXATTR per entry,
  a second one nothing (the daemon runs with ``cache=always`` here, so no timeout lapses
  while the test runs, however slow the machine);
* a test backend (tests/hostile) holds the replies to two lookups made by two threads
  through a kernel mount served in this process: both must reach the device before either
  is answered — no lock, thread or queue of the mount serialises them.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofs.codec.fuse_abi import Opcode

pytest.importorskip("pyfuse3", reason="the 'fuse' extra (pyfuse3, trio) is needed")

from tests.api.integrations.test_fusemount_cache import _mounted

pytestmark = [
    pytest.mark.daemon,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts with allow_other: needs root"),
]


def test_two_slow_requests_are_in_flight_at_once(tmp_path: Path) -> None:
    """Two lookups the device holds back are both at the device before either is
    answered: no lock, thread or queue serialises the mount's requests."""
    from tests.actors.test_hostile_device import _set, make_fs

    with make_fs(request_timeout=30) as r, _mounted(r.fs, tmp_path, tmp_path) as m:
        os.stat(m.mnt / "sub")  # cached: only the two leaves are looked up below
        r.backend.arm(Opcode.LOOKUP, _set(hold=True), times=2,
                      match=lambda q: q.name in (b"hello", b"inner"))
        results: dict[str, Any] = {}

        def stat(name: str) -> None:
            try:
                results[name] = os.stat(m.mnt / name).st_size
            except OSError as exc:
                results[name] = exc

        threads = [threading.Thread(target=stat, args=(p,)) for p in ("hello", "sub/inner")]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while r.backend.held_count() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert r.backend.held_count() == 2  # both waiting at the device together
        assert not results  # neither answered yet
        r.backend.release_held()
        for t in threads:
            t.join(20)
        assert results == {"hello": len(r.fs.read_bytes("hello")),
                           "sub/inner": len(r.fs.read_bytes("sub/inner"))}


def test_ls_l_questions_stop_reaching_the_daemon(tmp_path: Path) -> None:
    from pyvirtiofs.api.local import connect

    share = tmp_path / "share"
    share.mkdir()
    with connect(str(share), cache="always") as fs, _mounted(fs, tmp_path, share) as mounted:
        mnt, host = mounted.mnt, share
        for i in range(20):
            (host / f"f{i}").write_bytes(b"x")
        os.setxattr(host / "f3", "user.kept", b"v")

        def ls() -> None:
            subprocess.run(["ls", "-l", str(mnt)], check=True, capture_output=True)

        daemon, kernel = mounted.count(ls)
        assert kernel.get("getxattr", 0) >= 20  # ls asks about every entry
        assert daemon.get("GETXATTR", 0) + daemon.get("LISTXATTR", 0) <= 21, daemon
        daemon, kernel = mounted.count(ls)  # right after: what was learned still holds
        assert kernel.get("getxattr", 0) >= 20
        assert daemon.get("GETXATTR", 0) + daemon.get("LISTXATTR", 0) == 0, daemon
        assert os.getxattr(mnt / "f3", "user.kept") == b"v"  # present: read from the daemon
