"""POSIX behaviour of the actor stack against a real virtiofsd: symlinks, the share root,
mount tags, cache timeouts, open flags, lseek, fsync, fallocate, xattrs, statvfs, fifos,
and errors that carry errno and file name."""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofs.actors import messages as m
from pyvirtiofs.api.local import VirtioFS
from pyvirtiofs.codec.fuse_abi import Opcode
from tests.actors.helpers import eventually, mounted, request_count

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


@pytest.fixture
def fs(share: Path) -> Iterator[VirtioFS]:
    with mounted(share) as (vfs, _):
        yield vfs


def _errno(call: object) -> int | None:
    try:
        call()  # type: ignore[operator]
    except OSError as exc:
        return exc.errno
    return None


# -- symlinks -----------------------------------------------------------------------------


def test_relative_symlink_resolves_from_its_directory(fs: VirtioFS, share: Path) -> None:
    (share / "d").mkdir()
    (share / "d" / "f").write_bytes(b"inner")
    (share / "f").write_bytes(b"outer!")
    os.symlink("f", share / "d" / "rel")
    os.symlink("../f", share / "d" / "up")
    assert fs.read_bytes("d/rel") == b"inner"
    assert fs.read_bytes("d/up") == b"outer!"
    assert fs.stat("d/rel").st_size == 5


def test_absolute_symlink_resolves_from_the_share_root(fs: VirtioFS, share: Path) -> None:
    (share / "d").mkdir()
    (share / "d" / "f").write_bytes(b"abs")
    os.symlink("/d/f", share / "abs")
    os.symlink("/", share / "d" / "root")
    assert fs.read_bytes("abs") == b"abs"
    assert set(fs.listdir("d/root")) == {"d", "abs"}


def test_symlink_chain_of_40_follows_and_41_is_eloop(fs: VirtioFS, share: Path) -> None:
    (share / "target").write_bytes(b"end")
    for i in range(41):
        os.symlink("target" if i == 0 else f"l{i - 1}", share / f"l{i}")
    # The host agrees on where the limit is (40 links followed in one resolution).
    assert os.stat(share / "l39").st_size == 3
    assert fs.stat("l39").st_size == 3
    assert fs.read_bytes("l39") == b"end"
    with pytest.raises(OSError) as host:
        os.stat(share / "l40")
    with pytest.raises(OSError) as ours:
        fs.stat("l40")
    assert ours.value.errno == host.value.errno == errno.ELOOP
    os.symlink("self", share / "self")
    assert _errno(lambda: fs.stat("self")) == errno.ELOOP


def test_lstat_readlink_and_nofollow_do_not_follow(fs: VirtioFS, share: Path) -> None:
    (share / "f").write_bytes(b"12345")
    os.symlink("f", share / "l")
    os.symlink("missing", share / "dangling")
    assert stat.S_ISLNK(fs.lstat("l").st_mode)
    assert fs.lstat("l").st_size == 1  # the link's own size: len("f")
    assert stat.S_ISREG(fs.stat("l").st_mode)
    assert fs.readlink("l") == "f"
    assert fs.readlink(b"dangling") == b"missing"
    assert stat.S_ISLNK(fs.lstat("dangling").st_mode)
    assert _errno(lambda: fs.stat("dangling")) == errno.ENOENT
    assert _errno(lambda: fs.readlink("f")) == errno.EINVAL
    assert _errno(lambda: fs.open_raw("l", os.O_RDONLY | os.O_NOFOLLOW)) == errno.ELOOP


def test_open_creat_follows_a_symlink_in_the_last_component(fs: VirtioFS, share: Path) -> None:
    (share / "f").write_bytes(b"old contents")
    os.symlink("f", share / "l")
    os.symlink("new", share / "dangling")
    with fs.open("l", "w") as f:
        f.write("over")
    assert (share / "f").read_bytes() == b"over"
    with fs.open("dangling", "w") as f:  # open(2) creates a dangling link's target
        f.write("made")
    assert (share / "new").read_bytes() == b"made"
    assert os.path.islink(share / "l") and os.path.islink(share / "dangling")
    assert stat.S_ISLNK(fs.lstat("l").st_mode)  # the cache did not mix link and target
    # O_EXCL never follows: any name there, a dangling link included, is EEXIST.
    os.symlink("nothing", share / "dangling2")
    assert _errno(lambda: fs.open("dangling2", "x")) == errno.EEXIST
    assert not (share / "nothing").exists()


def test_dotdot_never_escapes_the_share_root(fs: VirtioFS, share: Path) -> None:
    (share.parent / "outside").write_bytes(b"secret")
    (share / "d").mkdir()
    (share / "inside").write_bytes(b"ok")
    os.symlink("../../../..", share / "d" / "up")
    assert set(fs.listdir("..")) == set(fs.listdir("/")) == {"d", "inside"}
    assert fs.read_bytes("../../inside") == b"ok"
    assert fs.read_bytes("d/up/inside") == b"ok"
    assert set(fs.listdir("d/up")) == {"d", "inside"}
    for path in ("../outside", "d/../../outside", "d/up/outside", "/../outside"):
        assert _errno(lambda p=path: fs.stat(p)) == errno.ENOENT, path


# -- mount tags ---------------------------------------------------------------------------


def test_tag_name_mounts_the_share_under_it(share: Path) -> None:
    (share / "f").write_bytes(b"tagged")
    with mounted(share, tag="name") as (fs, _):
        assert fs.session.ask(m.ListMounts()) == {"/name": 1}
        assert fs.read_bytes("/name/f") == b"tagged"
        assert fs.listdir("/name") == ["f"]
        assert _errno(lambda: fs.stat("/f")) == errno.ENOENT
        assert _errno(lambda: fs.stat("/other/f")) == errno.ENOENT
        assert fs.read_bytes("/name/../f") == b"tagged"  # .. stops at the mount's root


def test_tag_slash_mounts_each_top_level_directory(share: Path) -> None:
    for d in ("a", "b", "tmp", "proc"):
        (share / d).mkdir()
        (share / d / "x").write_bytes(d.encode())
    (share / "top-file").write_bytes(b"not a directory")
    with mounted(share, tag="/") as (fs, _):
        mounts = fs.session.ask(m.ListMounts())
        assert set(mounts) == {"/a", "/b"}  # tmp and proc skipped, files are no mounts
        assert len(set(mounts.values())) == 2
        assert fs.read_bytes("/a/x") == b"a"
        assert fs.read_bytes("/b/x") == b"b"
        for path in ("/tmp/x", "/proc/x", "/top-file", "/c"):
            assert _errno(lambda p=path: fs.stat(p)) == errno.ENOENT, path
        assert fs.read_bytes("/a/../x") == b"a"  # .. stops at the mount's root


# -- caching ------------------------------------------------------------------------------


def test_attr_and_entry_caches_expire(fs: VirtioFS, share: Path) -> None:
    (share / "f").write_bytes(b"1")
    assert fs.stat("f").st_size == 1
    lookups = request_count(fs, Opcode.LOOKUP) + request_count(fs, Opcode.GETATTR)
    t0 = time.monotonic()
    for _ in range(20):
        fs.stat("f")
    if time.monotonic() - t0 < 0.5:  # well inside the daemon's 1 s timeout
        assert request_count(fs, Opcode.LOOKUP) + request_count(fs, Opcode.GETATTR) == lookups
    # Changes made on the host directly show once the timeouts (cache=auto: 1 s) expire.
    (share / "f").write_bytes(b"12345")
    got = eventually(lambda: fs.stat("f").st_size, lambda n: n == 5, timeout=5, interval=0.05)
    assert got == 5
    os.unlink(share / "f")
    gone = eventually(lambda: _errno(lambda: fs.stat("f")), lambda e: e == errno.ENOENT,
                      timeout=5, interval=0.05)
    assert gone == errno.ENOENT
    (share / "g").write_bytes(b"new")
    assert fs.stat("g").st_size == 3  # a name we never saw is looked up at once


# -- open flags, positions, syncing ---------------------------------------------------------


def test_o_append_writes_at_the_current_end(fs: VirtioFS, share: Path) -> None:
    fs.write_bytes("log", b"ab")
    with fs.open_raw("log", os.O_WRONLY | os.O_APPEND) as f:
        assert f.write(b"cd") == 2
        with open(share / "log", "ab") as host:  # someone else appends meanwhile
            host.write(b"EF")
        assert f.write(b"gh") == 2
        assert f.tell() == 8
        big = os.urandom(3 << 20)  # several WRITEs: they must land in order
        assert f.write(big) == len(big)
    assert (share / "log").read_bytes() == b"abcdEFgh" + big


def test_o_excl_and_o_trunc(fs: VirtioFS, share: Path) -> None:
    with fs.open_raw("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640) as f:
        f.write(b"0123456789")
    assert stat.S_IMODE(os.stat(share / "f").st_mode) == 0o640 & ~_umask()
    with pytest.raises(FileExistsError) as info:
        fs.open_raw("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert info.value.filename == "f"
    with fs.open_raw("f", os.O_RDWR | os.O_TRUNC) as f:
        assert f.read(100) == b""
        f.write(b"xy")
    assert fs.stat("f").st_size == 2
    assert (share / "f").read_bytes() == b"xy"


def test_lseek_end_data_hole_as_the_host_says(fs: VirtioFS, share: Path) -> None:
    with open(share / "sparse", "wb") as f:
        f.write(b"d" * 4096)
        f.seek(8 << 20)
        f.write(b"e" * 4096)
    size = os.stat(share / "sparse").st_size
    fd = os.open(share / "sparse", os.O_RDONLY)
    try:
        with fs.open("sparse", "rb", buffering=0) as f:
            assert f.seek(-10, os.SEEK_END) == size - 10
            assert f.read(100) == b"e" * 10
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                for offset in (0, 100, 4096, 5 << 20, (8 << 20) + 1):
                    assert f.seek(offset, whence) == os.lseek(fd, offset, whence), (
                        whence, offset)
            assert _errno(lambda: f.seek(size + 1, os.SEEK_DATA)) == errno.ENXIO
            assert _errno(lambda: f.seek(-1, os.SEEK_SET)) == errno.EINVAL
    finally:
        os.close(fd)


def test_fsync_fdatasync_and_fsync_of_a_directory(fs: VirtioFS) -> None:
    fs.mkdir("d")
    with fs.open("d/f", "wb", buffering=0) as f:
        f.write(b"durable")
        f.fsync()
        f.fsync(datasync=True)
    with fs.open_raw("d", os.O_RDONLY) as d:  # a directory opened with open(2)
        d.fsync()
        assert _errno(lambda: d.read(1)) == errno.EISDIR
    assert _errno(lambda: fs.open_raw("d", os.O_WRONLY)) == errno.EISDIR


def test_fallocate(fs: VirtioFS, share: Path) -> None:
    fs.write_bytes("f", b"x" * 8192)
    ref = fs.session.ask(m.Open(path=b"f", flags=os.O_RDWR)).actor
    try:
        ref.ask(m.FAllocate(offset=0, length=1 << 20))
        assert os.stat(share / "f").st_size == 1 << 20
        ref.ask(m.FAllocate(offset=1 << 20, length=1 << 20, mode=FALLOC_FL_KEEP_SIZE))
        assert os.stat(share / "f").st_size == 1 << 20
        assert os.stat(share / "f").st_blocks * 512 >= 2 << 20
        ref.ask(m.FAllocate(offset=0, length=4096,
                            mode=FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE))
        assert (share / "f").read_bytes()[:8192] == b"\0" * 4096 + b"x" * 4096
        with pytest.raises(OSError) as info:
            ref.ask(m.FAllocate(offset=-1, length=1))
        assert info.value.errno == errno.EINVAL
    finally:
        ref.ask(m.Close())
    assert fs.stat("f").st_size == 1 << 20  # the cached attributes were invalidated


# -- xattrs, statvfs, fifos -------------------------------------------------------------------


def _host_has_user_xattrs(path: Path) -> bool:
    try:
        os.setxattr(path, "user.probe", b"1")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    os.removexattr(path, "user.probe")
    return True


def test_xattrs(fs: VirtioFS, share: Path) -> None:
    (share / "f").write_bytes(b"")
    if not _host_has_user_xattrs(share / "f"):
        assert _errno(lambda: fs.setxattr("f", "user.a", b"v")) in (errno.ENOTSUP,
                                                                     errno.EOPNOTSUPP)
        return
    fs.setxattr("f", "user.a", b"value")
    fs.setxattr("f", "user.empty", b"")
    assert os.getxattr(share / "f", "user.a") == b"value"
    assert fs.getxattr("f", "user.a") == b"value"
    assert fs.getxattr("f", "user.empty") == b""
    assert set(fs.listxattr("f")) >= {"user.a", "user.empty"}
    assert _errno(lambda: fs.setxattr("f", "user.a", b"x", os.XATTR_CREATE)) == errno.EEXIST
    assert _errno(lambda: fs.setxattr("f", "user.b", b"x", os.XATTR_REPLACE)) == errno.ENODATA
    fs.removexattr("f", "user.a")
    assert _errno(lambda: fs.getxattr("f", "user.a")) == errno.ENODATA
    big = os.urandom(3000)
    fs.setxattr("f", "user.big", big)
    assert fs.getxattr("f", "user.big") == big


def test_statvfs_matches_the_host(fs: VirtioFS, share: Path) -> None:
    ours, host = fs.statvfs("/"), os.statvfs(share)
    assert ours.f_bsize == host.f_bsize
    assert ours.f_blocks == host.f_blocks
    assert ours.f_namemax == host.f_namemax == 255
    assert ours.f_files == host.f_files


def test_mkfifo(fs: VirtioFS, share: Path) -> None:
    fs.mkfifo("p", 0o600)
    assert stat.S_ISFIFO(os.lstat(share / "p").st_mode)
    assert stat.S_ISFIFO(fs.stat("p").st_mode)
    assert stat.S_IMODE(fs.stat("p").st_mode) == 0o600 & ~_umask()


# -- errors -------------------------------------------------------------------------------------


def test_errors_carry_errno_and_file_names(fs: VirtioFS, share: Path) -> None:
    (share / "f").write_bytes(b"x")
    (share / "d").mkdir()
    (share / "d" / "g").write_bytes(b"y")
    cases = [
        (lambda: fs.stat("missing"), FileNotFoundError, errno.ENOENT, "missing"),
        (lambda: fs.mkdir("d"), FileExistsError, errno.EEXIST, "d"),
        (lambda: fs.rmdir("d"), OSError, errno.ENOTEMPTY, "d"),
        (lambda: fs.stat("f/x"), NotADirectoryError, errno.ENOTDIR, "f/x"),
        (lambda: fs.open("d", "w"), IsADirectoryError, errno.EISDIR, "d"),
        (lambda: fs.listdir("f"), NotADirectoryError, errno.ENOTDIR, "f"),
        (lambda: fs.unlink("d"), IsADirectoryError, errno.EISDIR, "d"),
        (lambda: fs.stat("x" * 256), OSError, errno.ENAMETOOLONG, "x" * 256),
    ]
    for call, kind, code, name in cases:
        with pytest.raises(kind) as info:
            call()
        assert info.value.errno == code, name
        assert info.value.filename == name
    with pytest.raises(FileNotFoundError) as info:
        fs.rename("nope", "d/new")
    assert (info.value.filename, info.value.filename2) == ("nope", "d/new")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- sequential read-ahead ------------------------------------------------------------------

CHUNK = 256 << 10


def _blocks(*tags: int) -> bytes:
    return b"".join(bytes([t]) * CHUNK for t in tags)


def test_streaming_reads_send_one_read_each_and_return_the_file(fs: VirtioFS,
                                                                 share: Path) -> None:
    data = os.urandom(8 * CHUNK + 123)
    (share / "big").write_bytes(data)
    before = request_count(fs, Opcode.READ)
    got = []
    with fs.open_raw("big", os.O_RDONLY) as f:
        while chunk := f.read(CHUNK):
            got.append(chunk)
    assert b"".join(got) == data
    # 9 reads with data and the one that meets the end: the read-ahead READs replace the
    # ones the reader would have sent, none is extra.
    assert request_count(fs, Opcode.READ) - before == 10


def test_readinto_after_read_takes_the_read_ahead(fs: VirtioFS, share: Path) -> None:
    data = os.urandom(6 * CHUNK)
    (share / "big").write_bytes(data)
    buf = bytearray(CHUNK)
    with fs.open_raw("big", os.O_RDONLY) as f:
        out = bytearray(f.read(CHUNK) + f.read(CHUNK))  # block 3 is read ahead
        before = request_count(fs, Opcode.READ)
        while n := f.readinto(buf):
            out += buf[:n]
        # blocks 3..6 and the end: 4 READs (block 3 came with the read-ahead), none ahead
        assert request_count(fs, Opcode.READ) - before == 4
    assert out == data


def test_read_ahead_never_returns_data_older_than_a_write_through_another_handle(
        fs: VirtioFS, share: Path) -> None:
    (share / "f").write_bytes(_blocks(1, 2, 3, 4))
    with fs.open_raw("f", os.O_RDONLY) as reader, fs.open_raw("f", os.O_WRONLY) as writer:
        assert reader.read(CHUNK) == _blocks(1)
        assert reader.read(CHUNK) == _blocks(2)  # streaming: block 3 is being read ahead
        assert writer.pwrite(_blocks(9), 2 * CHUNK) == CHUNK
        assert reader.read(CHUNK) == _blocks(9)
        assert reader.read(CHUNK) == _blocks(4)


def test_read_ahead_is_dropped_by_a_truncate_by_path(fs: VirtioFS, share: Path) -> None:
    (share / "f").write_bytes(_blocks(1, 2, 3, 4))
    with fs.open_raw("f", os.O_RDONLY) as reader:
        assert reader.read(CHUNK) == _blocks(1)
        assert reader.read(CHUNK) == _blocks(2)
        fs.truncate("f", 2 * CHUNK + 10)
        assert reader.read(CHUNK) == _blocks(3)[:10]
        assert reader.read(CHUNK) == b""


def test_seek_and_pread_do_not_use_a_stale_read_ahead(fs: VirtioFS, share: Path) -> None:
    (share / "f").write_bytes(_blocks(1, 2, 3, 4, 5))
    with fs.open_raw("f", os.O_RDONLY) as f:
        assert f.read(CHUNK) + f.read(CHUNK) == _blocks(1, 2)
        assert f.pread(CHUNK, 4 * CHUNK) == _blocks(5)  # explicit offset: position kept
        assert f.read(CHUNK) == _blocks(3)
        f.seek(CHUNK)
        assert f.read(2 * CHUNK) == _blocks(2, 3)  # larger than what was read ahead
        assert f.read(CHUNK // 2) == _blocks(4)[:CHUNK // 2]


def test_read_ahead_can_be_turned_off(share: Path) -> None:
    from pyvirtiofs.api import connect

    (share / "f").write_bytes(_blocks(1, 2, 3, 4))
    with connect(str(share), read_ahead=False) as vfs, vfs.open_raw("f", os.O_RDONLY) as f:
        before = request_count(vfs, Opcode.READ)
        assert f.read(CHUNK) + f.read(CHUNK) == _blocks(1, 2)
        # with read-ahead the second read would have sent a READ for block 3 as well
        assert request_count(vfs, Opcode.READ) - before == 2
