"""No leaks: the daemon's file descriptors and lookup counts come back.

The C virtiofsd holds one O_PATH fd per inode it has a lookup count for, and one fd per
open handle. So its open-fd count (``/proc/PID/fd``) is a faithful, external measure of
whether we sent every RELEASE / RELEASEDIR and every FORGET we owe.
"""

from __future__ import annotations

import os
from pathlib import Path

import pykka
import pytest

from pyvirtiofs.actors import messages as m
from pyvirtiofs.codec.fuse_abi import Opcode
from tests.actors.helpers import daemon_fds, eventually, mounted, request_count

N = 1000  # files, and as many directories: 2,000 handles


def _populate(root: Path, files: int, dirs: int = 0) -> tuple[list[str], list[str]]:
    root.mkdir(exist_ok=True)
    fnames = [f"f{i:04d}" for i in range(files)]
    dnames = [f"d{i:04d}" for i in range(dirs)]
    for name in fnames:
        (root / name).write_bytes(name.encode())
    for name in dnames:
        (root / name).mkdir()
    return fnames, dnames


def test_open_close_2000_files_and_directories(share: Path) -> None:
    fnames, dnames = _populate(share / "t", N, N)
    with mounted(share) as (fs, transport):
        for name in fnames + dnames:
            fs.stat(f"t/{name}")  # the inodes' own fds: held while we cache the lookups
        looked_up = daemon_fds(transport)
        releases = request_count(fs, Opcode.RELEASE)
        releasedirs = request_count(fs, Opcode.RELEASEDIR)

        for name in fnames:
            with fs.open(f"t/{name}", "rb") as f:
                assert f.read() == name.encode()
        for name in dnames:
            assert fs.listdir(f"t/{name}") == []

        assert request_count(fs, Opcode.RELEASE) == releases + N
        assert request_count(fs, Opcode.RELEASEDIR) == releasedirs + N
        assert eventually(lambda: daemon_fds(transport), lambda n: n == looked_up) == looked_up
        assert fs.session.ask(m.SessionStats())["handles"] == 0


def _open_actor(fs: object, path: bytes, flags: int = os.O_RDONLY) -> pykka.ActorRef:
    """A file actor straight from the session (the actor-level API)."""
    opened: m.OpenedFile = fs.session.ask(m.Open(path=path, flags=flags))  # type: ignore[attr-defined]
    return opened.actor


@pytest.mark.parametrize(("kind", "opcode"), [("file", Opcode.RELEASE),
                                              ("opened-dir", Opcode.RELEASEDIR),
                                              ("dir", Opcode.RELEASEDIR)])
def test_handle_killed_by_an_exception_releases_exactly_once(share: Path, kind: str,
                                                             opcode: Opcode) -> None:
    (share / "f").write_bytes(b"data")
    (share / "d").mkdir()
    with mounted(share) as (fs, transport):
        fs.stat("f")
        fs.stat("d")
        baseline = daemon_fds(transport)
        before = request_count(fs, opcode)
        if kind == "file":
            ref = _open_actor(fs, b"f")
            poison: object = m.Read(size=-1)  # EINVAL, raised inside the actor
        elif kind == "opened-dir":
            ref = _open_actor(fs, b"d")  # open(2) of a directory: a file actor, OPENDIR
            poison = m.Read(size=1)  # EISDIR
        else:
            ref = fs.session.ask(m.OpenDir(path=b"d")).actor
            poison = m.ReadDir(ctx=(-1, -1, -1))  # credentials no header can carry
        assert daemon_fds(transport) == baseline + 1
        ref.tell(poison)  # told, not asked: the actor dies of it (pykka calls on_failure)

        assert eventually(lambda: request_count(fs, opcode), lambda n: n > before) == before + 1
        assert eventually(ref.is_alive, lambda alive: not alive) is False
        with pytest.raises(pykka.ActorDeadError):
            ref.ask(m.Close())
        assert eventually(lambda: daemon_fds(transport), lambda n: n == baseline) == baseline
        assert eventually(lambda: fs.session.ask(m.SessionStats())["handles"],
                          lambda n: n == 0) == 0
        # Stopping the session (which stops every handle it knows) sends nothing more.
        releases = request_count(fs, Opcode.RELEASE) + request_count(fs, Opcode.RELEASEDIR)
        fs.session.stop()
        assert request_count(fs, opcode) == before + 1
        assert request_count(fs, Opcode.RELEASE) + request_count(fs, Opcode.RELEASEDIR) == (
            releases)


def test_device_survives_a_request_it_cannot_encode(share: Path) -> None:
    """A malformed FuseCall fails its own future; the device actor keeps serving."""
    (share / "f").write_bytes(b"x")
    with mounted(share) as (fs, _):
        ref = fs.session.ask(m.OpenDir(path=b"/")).actor
        with pytest.raises(Exception):  # noqa: B017 - whatever the encoder raises
            ref.ask(m.ReadDir(ctx=(-1, -1, -1)))
        assert fs.device.is_alive()
        assert fs.stat("f").st_size == 1


def test_forget_after_unlinking_2000_looked_up_files(share: Path) -> None:
    # At the share's root: closing a directory handle on the root must not drop the
    # session's knowledge of what is under it (or FORGET would never be sent).
    fnames, _ = _populate(share, 2 * N)
    with mounted(share) as (fs, transport):
        baseline = daemon_fds(transport)
        for name in fnames:
            assert fs.stat(name).st_size == len(name)
        held = daemon_fds(transport)
        assert held >= baseline + 2 * N  # the premise: each lookup pins an fd in the daemon
        assert sorted(e.name for e in fs.scandir("/")) == fnames  # READDIRPLUS: more lookups
        # The directory handle on the root is closed now; what the session knows under the
        # root (and owes FORGETs for) must have survived that.
        assert fs.session.ask(m.SessionStats())["dentries"] >= 2 * N
        for name in fnames:
            fs.unlink(name)
        assert eventually(lambda: daemon_fds(transport), lambda n: n <= baseline,
                          timeout=10) == baseline
        stats = fs.session.ask(m.SessionStats())
        assert stats["lookups_held"] < 10, stats
