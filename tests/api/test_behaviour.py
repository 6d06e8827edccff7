"""One behaviour suite, every access path: in-process, remote over tcp, and (when the FUSE
re-export is available) plain ``os`` calls on a kernel mount. Same results, same errnos.

Each test gets ``fs`` (an object with the ``os``-style API) and ``host`` (the shared folder
on the host, to check what really happened on disk).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofs.api import connect, connect_remote
from pyvirtiofs.api.remote.server import ShareServer, Tenant
from tests.osfs import FUSE_AVAILABLE, mounted_osfs

ACCESS_PATHS = ["local", "remote"] + (["fuse"] if FUSE_AVAILABLE else [])


@pytest.fixture(params=ACCESS_PATHS)
def env(request: pytest.FixtureRequest, share: Path) -> Iterator[tuple[Any, Path]]:
    local = connect(share)
    try:
        if request.param == "local":
            yield local, share
        elif request.param == "remote":
            with ShareServer("tcp://127.0.0.1:0", tenant=Tenant("t", local)) as server, \
                    connect_remote(server.endpoints[0], timeout=30) as remote:
                yield remote, share
        else:
            with mounted_osfs(local, share.parent / "mnt") as osfs:
                yield osfs, share
    finally:
        local.close()


def test_write_then_read_binary_and_text(env: tuple[Any, Path]) -> None:
    fs, host = env
    payload = os.urandom(3 << 20) + b"tail"
    with fs.open("blob.bin", "wb") as f:
        assert f.write(payload) == len(payload)
    assert (host / "blob.bin").read_bytes() == payload
    with fs.open("blob.bin", "rb") as f:
        assert f.read(10) == payload[:10]
        assert f.tell() == 10
        f.seek(-4, os.SEEK_END)
        assert f.read() == b"tail"
        f.seek(1 << 20)
        buf = bytearray(1000)
        assert f.readinto(buf) == 1000
        assert bytes(buf) == payload[1 << 20:(1 << 20) + 1000]
    with fs.open("notes.txt", "w") as f:
        f.write("line one\nline two\n")
    with fs.open("notes.txt") as f:
        assert list(f) == ["line one\n", "line two\n"]
    assert fs.read_bytes("notes.txt") == b"line one\nline two\n"


def test_open_modes_append_exclusive_truncate(env: tuple[Any, Path]) -> None:
    fs, host = env
    with fs.open("a.log", "a") as f:
        f.write("1\n")
    with fs.open("a.log", "a") as f:
        f.write("2\n")
        assert f.tell() == 4
    assert (host / "a.log").read_text() == "1\n2\n"
    with pytest.raises(FileExistsError) as info:
        fs.open("a.log", "x")
    assert info.value.errno == errno.EEXIST
    with fs.open("new.txt", "x") as f:
        f.write("fresh")
    with fs.open("a.log", "w") as f:
        pass
    assert (host / "a.log").stat().st_size == 0
    with fs.open("new.txt", "r+b") as f:
        f.seek(2)
        f.write(b"XY")
        f.truncate(4)
    assert (host / "new.txt").read_bytes() == b"frXY"
    with pytest.raises(FileNotFoundError):
        fs.open("missing/none.txt", "w")


def test_stat_matches_host(env: tuple[Any, Path]) -> None:
    fs, host = env
    (host / "f").write_bytes(b"12345")
    os.utime(host / "f", ns=(1_600_000_000_123_456_789, 1_700_000_000_987_654_321))
    st, hs = fs.stat("f"), os.stat(host / "f")
    assert (st.st_size, st.st_mode, st.st_ino, st.st_nlink) == (5, hs.st_mode, hs.st_ino, 1)
    assert st.st_mtime_ns == 1_700_000_000_987_654_321
    assert st.st_atime_ns == 1_600_000_000_123_456_789
    assert stat.S_ISDIR(fs.stat("/").st_mode)


def test_directories_listing_and_walk(env: tuple[Any, Path]) -> None:
    fs, host = env
    fs.makedirs("a/b/c")
    fs.makedirs("a/b/c", exist_ok=True)
    with pytest.raises(FileExistsError):
        fs.makedirs("a/b/c")
    for i in range(50):
        (host / "a" / f"file{i:02d}").write_bytes(b"x" * i)
    (host / "a" / "ln").symlink_to("file01")
    names = fs.listdir("a")
    assert sorted(names) == sorted([f"file{i:02d}" for i in range(50)] + ["b", "ln"])
    entries = {e.name: e for e in fs.scandir("a")}
    assert entries["b"].is_dir() and not entries["b"].is_file()
    assert entries["file07"].is_file() and entries["file07"].stat().st_size == 7
    assert entries["ln"].is_symlink() and entries["ln"].is_file()
    walked = {d: (sorted(ds), sorted(fs_)) for d, ds, fs_ in fs.walk("a")}
    assert walked["a/b"] == (["c"], [])
    with pytest.raises(OSError) as info:
        fs.rmdir("a")
    assert info.value.errno == errno.ENOTEMPTY
    fs.rmdir("a/b/c")
    assert not (host / "a/b/c").exists()
    with pytest.raises(NotADirectoryError):
        fs.listdir("a/file01")


def test_rename_link_symlink(env: tuple[Any, Path]) -> None:
    fs, host = env
    (host / "src").write_bytes(b"source")
    (host / "dst").write_bytes(b"old")
    fs.rename("src", "dst")
    assert (host / "dst").read_bytes() == b"source" and not (host / "src").exists()
    fs.replace("dst", "again")
    fs.link("again", "hard")
    assert fs.stat("hard").st_nlink == 2
    assert os.stat(host / "hard").st_ino == os.stat(host / "again").st_ino
    fs.symlink("again", "soft")
    assert fs.readlink("soft") == "again"
    assert stat.S_ISLNK(fs.lstat("soft").st_mode)
    assert fs.stat("soft").st_size == 6
    assert os.readlink(host / "soft") == "again"
    fs.remove("hard")
    assert fs.stat("again").st_nlink == 1
    with pytest.raises(FileNotFoundError) as info:
        fs.remove("hard")
    assert info.value.filename is not None


def test_chmod_utime_truncate_statvfs_access(env: tuple[Any, Path]) -> None:
    fs, host = env
    (host / "f").write_bytes(b"0123456789")
    fs.chmod("f", 0o640)
    assert stat.S_IMODE(os.stat(host / "f").st_mode) == 0o640
    fs.utime("f", ns=(1_000_000_000_000_000_001, 1_100_000_000_000_000_002))
    assert os.stat(host / "f").st_mtime_ns == 1_100_000_000_000_000_002
    assert os.stat(host / "f").st_atime_ns == 1_000_000_000_000_000_001
    fs.truncate("f", 3)
    assert (host / "f").read_bytes() == b"012"
    vfs = fs.statvfs("/")
    assert vfs.f_namemax == 255
    assert vfs.f_bsize > 0 and vfs.f_blocks > 0
    assert fs.access("f", os.R_OK)
    assert not fs.access("nope", os.F_OK)


def test_errors_carry_errno_and_filename(env: tuple[Any, Path]) -> None:
    fs, host = env
    (host / "file").write_bytes(b"")
    (host / "dir").mkdir()
    cases = [
        (lambda: fs.stat("nope"), FileNotFoundError, errno.ENOENT),
        (lambda: fs.mkdir("dir"), FileExistsError, errno.EEXIST),
        (lambda: fs.stat("file/x"), NotADirectoryError, errno.ENOTDIR),
        (lambda: fs.rmdir("file"), NotADirectoryError, errno.ENOTDIR),
        (lambda: fs.open("dir", "w"), IsADirectoryError, errno.EISDIR),
        (lambda: fs.stat("x" * 256), OSError, errno.ENAMETOOLONG),
        (lambda: fs.readlink("file"), OSError, errno.EINVAL),
    ]
    for call, exc_type, code in cases:
        with pytest.raises(exc_type) as info:
            call()
        assert info.value.errno == code
        assert info.value.filename is not None


def test_fifo_and_xattrs(env: tuple[Any, Path]) -> None:
    fs, host = env
    fs.mkfifo("pipe")
    assert stat.S_ISFIFO(os.stat(host / "pipe").st_mode)
    (host / "x").write_bytes(b"")
    (host / "probe").write_bytes(b"")
    try:
        os.setxattr(host / "probe", "user.t", b"1")
        supported = True
    except OSError:
        supported = False  # the host filesystem has no user xattrs: the share can't either
    if supported:
        fs.setxattr("x", "user.color", b"blue")
        assert fs.getxattr("x", "user.color") == b"blue"
        assert "user.color" in fs.listxattr("x")
        fs.removexattr("x", "user.color")
        assert "user.color" not in fs.listxattr("x")
    else:
        with pytest.raises(OSError):
            fs.setxattr("x", "user.color", b"blue")
