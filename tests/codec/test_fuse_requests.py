"""Request encoders: byte layouts checked against hand-packed fuse.h structs, and input
validation (errno values as Linux gives them).

Expected bytes are packed here with literal format strings written from fuse.h, NOT with
the codec's own Struct objects, so a wrong layout in codec/fuse_abi.py fails a test.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtiofs.codec import fuse_abi as abi
from pyvirtiofs.codec import fuse_requests as rq
from pyvirtiofs.codec.fuse_requests import FuseRequest

NAME = b"file.txt"
Z = b"\0"


def check(
    req: FuseRequest,
    opcode: int,
    nodeid: int,
    args: bytes,
    reply_size: int,
    *,
    payload: object = None,
    expects_reply: bool = True,
) -> None:
    assert req.opcode == opcode
    assert req.nodeid == nodeid
    assert type(req.args) is bytes
    assert req.args == args
    assert req.reply_size == reply_size
    assert req.expects_reply is expects_reply
    if payload is None:
        assert req.payload is None
    else:
        assert bytes(req.payload) == payload  # type: ignore[arg-type]
    assert req.in_len == 40 + len(args) + (0 if payload is None else len(payload))  # type: ignore[arg-type]


def expect_errno(code: int, fn: Callable[..., object], *args: Any, **kwargs: Any) -> OSError:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code, info.value
    return info.value


# --------------------------------------------------------------------------------------
# ABI sanity
# --------------------------------------------------------------------------------------


def test_struct_sizes_match_fuse_h() -> None:
    assert abi.IN_HEADER.size == 40
    assert abi.OUT_HEADER.size == 16
    assert abi.ATTR.size == 88
    assert abi.ENTRY_OUT.size == 128
    assert abi.ATTR_OUT.size == 104
    assert abi.OPEN_OUT.size == 16
    assert abi.CREATE_OUT_SIZE == 144
    assert abi.STATFS_OUT.size == 80
    assert abi.SETATTR_IN.size == 88
    assert abi.READ_IN.size == 40
    assert abi.WRITE_IN.size == 40
    assert abi.INIT_IN.size == 16
    assert abi.INIT_IN_EXT.size == 64
    assert abi.INIT_OUT.size == 36
    assert abi.RELEASE_IN.size == 24
    assert abi.FLUSH_IN.size == 24
    assert abi.POLL_IN.size == 24
    assert abi.FALLOCATE_IN.size == 32
    assert abi.LSEEK_IN.size == 24
    assert abi.DIRENT.size == 24
    assert abi.FUSE_NAME_OFFSET_DIRENTPLUS == 152
    assert abi.DIRENT_RECORD_MAX == 280
    assert abi.DIRENTPLUS_RECORD_MAX == 408


def test_opcode_values() -> None:
    expected = {
        "LOOKUP": 1,
        "FORGET": 2,
        "GETATTR": 3,
        "SETATTR": 4,
        "READLINK": 5,
        "SYMLINK": 6,
        "MKNOD": 8,
        "MKDIR": 9,
        "UNLINK": 10,
        "RMDIR": 11,
        "RENAME": 12,
        "LINK": 13,
        "OPEN": 14,
        "READ": 15,
        "WRITE": 16,
        "STATFS": 17,
        "RELEASE": 18,
        "FSYNC": 20,
        "SETXATTR": 21,
        "GETXATTR": 22,
        "LISTXATTR": 23,
        "REMOVEXATTR": 24,
        "FLUSH": 25,
        "INIT": 26,
        "OPENDIR": 27,
        "READDIR": 28,
        "RELEASEDIR": 29,
        "FSYNCDIR": 30,
        "ACCESS": 34,
        "CREATE": 35,
        "INTERRUPT": 36,
        "DESTROY": 38,
        "POLL": 40,
        "BATCH_FORGET": 42,
        "FALLOCATE": 43,
        "READDIRPLUS": 44,
        "RENAME2": 45,
        "LSEEK": 46,
        "COPY_FILE_RANGE": 47,
        "SYNCFS": 50,
        "TMPFILE": 51,
    }
    for name, value in expected.items():
        assert abi.Opcode[name] == value


def test_flag_bits() -> None:
    assert abi.FUSE_MAX_PAGES == 1 << 22
    assert abi.FUSE_DO_READDIRPLUS == 1 << 13
    assert abi.FUSE_INIT_EXT == 1 << 30
    assert abi.FUSE_SETXATTR_EXT == 1 << 29
    assert abi.FUSE_SECURITY_CTX == 1 << 32
    assert abi.FATTR_CTIME == 1 << 10
    assert abi.FATTR_KILL_SUIDGID == 1 << 11
    assert abi.FOPEN_PARALLEL_DIRECT_WRITES == 1 << 6
    assert (abi.RENAME_NOREPLACE, abi.RENAME_EXCHANGE) == (1, 2)


# --------------------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------------------


def test_pack_in_header_into_buffer_at_offset() -> None:
    buf = bytearray(b"\xaa" * 100)
    rq.pack_in_header(buf, 8, 57, 1, 0x1122334455, 9, 1000, 1001, 42)
    expected = struct.pack("<IIQQIIIHH", 57, 1, 0x1122334455, 9, 1000, 1001, 42, 0, 0)
    assert bytes(buf[8:48]) == expected
    assert buf[:8] == b"\xaa" * 8 and buf[48:] == b"\xaa" * 52  # nothing else touched


def test_pack_in_header_into_memoryview() -> None:
    buf = bytearray(40)
    rq.pack_in_header(memoryview(buf), 0, 40, 26, 1, 0, 0, 0, 0)
    assert struct.unpack("<IIQ", buf[:16]) == (40, 26, 1)


def test_in_header_bytes() -> None:
    h = rq.in_header_bytes(48, 3, 7, 1, 5, 6, 7)
    assert h == struct.pack("<IIQQIIIHH", 48, 3, 7, 1, 5, 6, 7, 0, 0)


@pytest.mark.parametrize("unique", [0, 1 << 63, -1])
def test_unique_must_be_valid(unique: int) -> None:
    with pytest.raises(ValueError):
        rq.pack_in_header(bytearray(40), 0, 40, 3, unique, 1, 0, 0, 0)
    with pytest.raises(ValueError):
        rq.in_header_bytes(40, 3, unique, 1)


def test_header_rejects_bad_len_small_buffer_and_bad_ids() -> None:
    with pytest.raises(ValueError):
        rq.pack_in_header(bytearray(40), 0, 39, 3, 1, 1, 0, 0, 0)
    with pytest.raises(ValueError):
        rq.pack_in_header(bytearray(39), 0, 40, 3, 1, 1, 0, 0, 0)
    with pytest.raises(ValueError):
        rq.pack_in_header(bytearray(50), 20, 40, 3, 1, 1, 0, 0, 0)
    with pytest.raises(ValueError):
        rq.pack_in_header(bytearray(80), -40, 40, 3, 1, 1, 0, 0, 0)
    with pytest.raises(ValueError):
        rq.pack_in_header(bytearray(40), 0, 40, 3, 1, 1, 1 << 32, 0, 0)


def test_request_bytes_concatenates_header_args_payload() -> None:
    req = rq.write(5, 6, 0, b"hello")
    raw = rq.request_bytes(req, unique=3, uid=1, gid=2, pid=4)
    assert len(raw) == req.in_len == 40 + 40 + 5
    assert struct.unpack_from("<IIQQIII", raw) == (85, 16, 3, 5, 1, 2, 4)
    assert raw[40:80] == req.args and raw[80:] == b"hello"


# --------------------------------------------------------------------------------------
# INIT / DESTROY
# --------------------------------------------------------------------------------------


def test_init_ext_layout_carries_flags2() -> None:
    flags = abi.FUSE_INIT_EXT | abi.FUSE_MAX_PAGES | abi.FUSE_SECURITY_CTX
    req = rq.init(131072, flags)
    lo = abi.FUSE_INIT_EXT | abi.FUSE_MAX_PAGES
    check(req, 26, 0, struct.pack("<IIIII44x", 7, 38, 131072, lo, 1), 64)


def test_init_compat_layout_without_ext() -> None:
    req = rq.init(4096, abi.FUSE_MAX_PAGES | abi.FUSE_ASYNC_READ)
    check(req, 26, 0, struct.pack("<IIII", 7, 38, 4096, (1 << 22) | 1), 64)
    with pytest.raises(ValueError):
        rq.init(4096, abi.FUSE_SECURITY_CTX)  # high bits need INIT_EXT


def test_default_init_flags() -> None:
    f = rq.DEFAULT_INIT_FLAGS
    for bit in (
        abi.FUSE_MAX_PAGES,
        abi.FUSE_DO_READDIRPLUS,
        abi.FUSE_INIT_EXT,
        abi.FUSE_BIG_WRITES,
        abi.FUSE_ATOMIC_O_TRUNC,
        abi.FUSE_PARALLEL_DIROPS,
    ):
        assert f & bit
    for bit in (
        abi.FUSE_WRITEBACK_CACHE,
        abi.FUSE_SETXATTR_EXT,
        abi.FUSE_SECURITY_CTX,
        abi.FUSE_DONT_MASK,
        abi.FUSE_NO_OPEN_SUPPORT,
        abi.FUSE_POSIX_ACL,
    ):
        assert not f & bit
    assert len(rq.init(0).args) == 64


def test_destroy() -> None:
    check(rq.destroy(), 38, 0, b"", 0)


# --------------------------------------------------------------------------------------
# Node operations
# --------------------------------------------------------------------------------------


def test_lookup() -> None:
    check(rq.lookup(1, NAME), 1, 1, NAME + Z, 128)
    check(rq.lookup(7, "ü"), 1, 7, "ü".encode() + Z, 128)
    check(rq.lookup(7, ".."), 1, 7, b"..\0", 128)  # lookup alone accepts dots
    # undecodable bytes round-trip through surrogateescape
    check(rq.lookup(7, os.fsdecode(b"\xff")), 1, 7, b"\xff\0", 128)


def test_forget_and_batch_forget_expect_no_reply() -> None:
    check(rq.forget(9, 3), 2, 9, struct.pack("<Q", 3), 0, expects_reply=False)
    assert rq.forget(9, 3).out_len == 0
    req = rq.batch_forget([(9, 3), (10, 1)])
    args = struct.pack("<II", 2, 0) + struct.pack("<QQ", 9, 3) + struct.pack("<QQ", 10, 1)
    check(req, 42, 0, args, 0, expects_reply=False)


def test_forget_validation() -> None:
    with pytest.raises(ValueError):
        rq.forget(0, 1)
    with pytest.raises(ValueError):
        rq.forget(5, 0)
    with pytest.raises(ValueError):
        rq.batch_forget([])
    with pytest.raises(ValueError):
        rq.batch_forget([(1, 1)] * (abi.BATCH_FORGET_MAX + 1))
    with pytest.raises(ValueError):
        rq.batch_forget([(1, 1), (0, 1)])


def test_getattr_with_and_without_fh() -> None:
    check(rq.getattr(5), 3, 5, struct.pack("<IIQ", 0, 0, 0), 104)
    check(rq.getattr(5, fh=0), 3, 5, struct.pack("<IIQ", 1, 0, 0), 104)
    check(rq.getattr(5, fh=77), 3, 5, struct.pack("<IIQ", 1, 0, 77), 104)


SETATTR_FMT = "<IIQQQqqqIIIIIIII"


def unpack_setattr(req: FuseRequest) -> dict[str, int]:
    names = (
        "valid padding fh size lock_owner atime mtime ctime atimensec mtimensec "
        "ctimensec mode unused4 uid gid unused5"
    ).split()
    return dict(zip(names, struct.unpack(SETATTR_FMT, req.args), strict=True))


def test_setattr_sets_exactly_given_bits() -> None:
    req = rq.setattr(5, size=100)
    assert req.opcode == 4 and req.reply_size == 104 and len(req.args) == 88
    f = unpack_setattr(req)
    assert f["valid"] == abi.FATTR_SIZE and f["size"] == 100
    assert f["mode"] == f["uid"] == f["gid"] == f["fh"] == f["mtime"] == 0

    f = unpack_setattr(rq.setattr(5, fh=3, mode=0o100755, uid=10, gid=20))
    assert f["valid"] == abi.FATTR_FH | abi.FATTR_MODE | abi.FATTR_UID | abi.FATTR_GID
    assert (f["fh"], f["mode"], f["uid"], f["gid"]) == (3, 0o755, 10, 20)


def test_setattr_times_come_from_their_own_argument() -> None:
    # Hermit set mtime from ctime; here each time has its own fields.
    f = unpack_setattr(rq.setattr(5, atime=(1, 2), mtime=(3, 4), ctime=(5, 6)))
    assert f["valid"] == abi.FATTR_ATIME | abi.FATTR_MTIME | abi.FATTR_CTIME
    assert (f["atime"], f["atimensec"]) == (1, 2)
    assert (f["mtime"], f["mtimensec"]) == (3, 4)
    assert (f["ctime"], f["ctimensec"]) == (5, 6)
    f = unpack_setattr(rq.setattr(5, mtime=(-10, 999_999_999)))
    assert f["valid"] == abi.FATTR_MTIME
    assert (f["mtime"], f["mtimensec"], f["ctime"], f["atime"]) == (-10, 999_999_999, 0, 0)


def test_setattr_now_flags_include_the_time_bit() -> None:
    f = unpack_setattr(rq.setattr(5, atime_now=True))
    assert f["valid"] == abi.FATTR_ATIME | abi.FATTR_ATIME_NOW
    f = unpack_setattr(rq.setattr(5, mtime_now=True, atime=(7, 0)))
    assert f["valid"] == abi.FATTR_MTIME | abi.FATTR_MTIME_NOW | abi.FATTR_ATIME
    assert f["atime"] == 7
    with pytest.raises(ValueError):
        rq.setattr(5, mtime=(1, 0), mtime_now=True)


def test_setattr_validation() -> None:
    expect_errno(errno.EINVAL, rq.setattr, 5, size=-1)
    expect_errno(errno.EFBIG, rq.setattr, 5, size=1 << 63)
    expect_errno(errno.EINVAL, rq.setattr, 5, mtime=(0, 10**9))
    expect_errno(errno.EINVAL, rq.setattr, 5, atime=(0, -1))
    expect_errno(errno.EINVAL, rq.setattr, 5, uid=-1)
    expect_errno(errno.EINVAL, rq.setattr, 5, gid=1 << 32)
    with pytest.raises(ValueError):
        rq.setattr(0, size=1)


def test_readlink_statfs_access() -> None:
    check(rq.readlink(4), 5, 4, b"", 4096)
    check(rq.statfs(1), 17, 1, b"", 80)
    check(rq.access(4, os.R_OK | os.W_OK), 34, 4, struct.pack("<II", 6, 0), 0)
    expect_errno(errno.EINVAL, rq.access, 4, 8)


def test_symlink_name_then_target() -> None:
    check(rq.symlink(2, "ln", "../target"), 6, 2, b"ln\0../target\0", 128)
    expect_errno(errno.ENOENT, rq.symlink, 2, "ln", "")
    expect_errno(errno.EINVAL, rq.symlink, 2, "ln", b"a\0b")
    expect_errno(errno.ENAMETOOLONG, rq.symlink, 2, "ln", b"x" * 4096)
    assert rq.symlink(2, "ln", b"x" * 4095).args.endswith(b"x\0")


def test_mknod() -> None:
    fifo = 0o010644
    check(
        rq.mknod(2, "p", fifo, 0, 0o22), 8, 2, struct.pack("<IIII", fifo, 0, 0o22, 0) + b"p\0", 128
    )
    dev = os.makedev(8, 1)
    req = rq.mknod(2, "d", 0o060600, dev, 0)
    assert struct.unpack_from("<II", req.args) == (0o060600, dev)
    # type 0 means regular, as in mknod(2)
    assert struct.unpack_from("<I", rq.mknod(2, "r", 0o644, 0, 0).args)[0] == 0o100644
    expect_errno(errno.EPERM, rq.mknod, 2, "d", 0o040755, 0, 0)
    expect_errno(errno.EINVAL, rq.mknod, 2, "l", 0o120777, 0, 0)
    expect_errno(errno.EINVAL, rq.mknod, 2, "x", 0o010644, 0, 0o1000)  # bad umask


def test_mkdir_masks_to_rwx_and_sticky() -> None:
    check(rq.mkdir(2, "d", 0o755, 0o22), 9, 2, struct.pack("<II", 0o755, 0o22) + b"d\0", 128)
    assert struct.unpack_from("<I", rq.mkdir(2, "d", 0o43777, 0).args)[0] == 0o1777
    expect_errno(errno.EINVAL, rq.mkdir, 2, "d", -1, 0)
    expect_errno(errno.EINVAL, rq.mkdir, 2, ".", 0o755, 0)


def test_unlink_rmdir() -> None:
    check(rq.unlink(3, NAME), 10, 3, NAME + Z, 0)
    check(rq.rmdir(3, "sub"), 11, 3, b"sub\0", 0)
    expect_errno(errno.EINVAL, rq.unlink, 3, "..")


def test_rename_and_rename2() -> None:
    check(rq.rename(3, "a", 4, "b"), 12, 3, struct.pack("<Q", 4) + b"a\0b\0", 0)
    req = rq.rename(3, "a", 4, "b", abi.RENAME_NOREPLACE)
    check(req, 45, 3, struct.pack("<QII", 4, 1, 0) + b"a\0b\0", 0)
    req = rq.rename(3, "a", 4, "b", abi.RENAME_EXCHANGE)
    check(req, 45, 3, struct.pack("<QII", 4, 2, 0) + b"a\0b\0", 0)
    expect_errno(errno.EINVAL, rq.rename, 3, "a", 4, "b", 3)
    expect_errno(errno.EINVAL, rq.rename, 3, "a", 4, "b", 8)
    with pytest.raises(ValueError):
        rq.rename(3, "a", 0, "b")


def test_link_header_node_is_new_parent() -> None:
    check(rq.link(9, 3, "hard"), 13, 3, struct.pack("<Q", 9) + b"hard\0", 128)


# --------------------------------------------------------------------------------------
# Files and directories
# --------------------------------------------------------------------------------------


def test_open_strips_creation_flags() -> None:
    check(rq.open(5, os.O_RDWR), 14, 5, struct.pack("<II", os.O_RDWR, 0), 16)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_APPEND
    sent = struct.unpack_from("<I", rq.open(5, flags).args)[0]
    assert sent == os.O_WRONLY | os.O_TRUNC | os.O_APPEND


def test_create() -> None:
    req = rq.create(2, "new", os.O_WRONLY | os.O_NOCTTY, 0o644, 0o22)
    flags = os.O_WRONLY | os.O_CREAT
    check(req, 35, 2, struct.pack("<IIII", flags, 0o100644, 0o22, 0) + b"new\0", 144)
    expect_errno(errno.EINVAL, rq.create, 2, "new", 0, 0o040755, 0)
    expect_errno(errno.ENAMETOOLONG, rq.create, 2, "n" * 256, 0, 0o644, 0)


def test_read() -> None:
    req = rq.read(5, 6, 4096, 1 << 20, os.O_RDONLY)
    check(req, 15, 5, struct.pack("<QQIIQII", 6, 4096, 1 << 20, 0, 0, 0, 0), 1 << 20)
    expect_errno(errno.EINVAL, rq.read, 5, 6, -1, 10)
    expect_errno(errno.EINVAL, rq.read, 5, 6, 1 << 63, 10)
    expect_errno(errno.EINVAL, rq.read, 5, 6, 0, -1)


def test_write_payload_is_not_copied() -> None:
    data = b"x" * 1000
    req = rq.write(5, 6, 10, data)
    assert req.payload is data
    check(req, 16, 5, struct.pack("<QQIIQII", 6, 10, 1000, 0, 0, 0, 0), 8, payload=data)
    buf = bytearray(b"abcdef")
    req = rq.write(5, 6, 0, memoryview(buf)[1:4], write_flags=abi.FUSE_WRITE_KILL_SUIDGID)
    assert isinstance(req.payload, memoryview)
    buf[1] = ord("Z")  # same memory: proves no copy was made
    assert bytes(req.payload) == b"Zcd"
    assert struct.unpack_from("<QQII", req.args)[2:] == (3, abi.FUSE_WRITE_KILL_SUIDGID)


def test_write_payload_non_byte_memoryview_is_cast() -> None:
    import array

    arr = array.array("I", [1, 2])
    req = rq.write(5, 6, 0, arr)
    assert req.payload_len == 8 and struct.unpack_from("<Q", req.args, 8) == (0,)
    assert struct.unpack_from("<I", req.args, 16) == (8,)


def test_write_offsets() -> None:
    expect_errno(errno.EINVAL, rq.write, 5, 6, -1, b"x")
    expect_errno(errno.EFBIG, rq.write, 5, 6, (1 << 63) - 1, b"xy")
    rq.write(5, 6, (1 << 63) - 2, b"x")


def test_release_releasedir_flush_fsync() -> None:
    check(rq.release(5, 6, os.O_RDWR), 18, 5, struct.pack("<QIIQ", 6, os.O_RDWR, 0, 0), 0)
    check(rq.release(5, 6, 0, flush=True), 18, 5, struct.pack("<QIIQ", 6, 0, 1, 0), 0)
    check(rq.releasedir(5, 6), 29, 5, struct.pack("<QIIQ", 6, 0, 0, 0), 0)
    check(rq.flush(5, 6, 99), 25, 5, struct.pack("<QIIQ", 6, 0, 0, 99), 0)
    check(rq.fsync(5, 6, True), 20, 5, struct.pack("<QII", 6, 1, 0), 0)
    check(rq.fsync(5, 6, False), 20, 5, struct.pack("<QII", 6, 0, 0), 0)
    check(rq.fsyncdir(5, 6, True), 30, 5, struct.pack("<QII", 6, 1, 0), 0)


def test_poll_fallocate_lseek() -> None:
    check(rq.poll(5, 6, 1, kh=3), 40, 5, struct.pack("<QQII", 6, 3, 0, 1), 8)
    check(rq.fallocate(5, 6, 10, 20, 1), 43, 5, struct.pack("<QQQII", 6, 10, 20, 1, 0), 0)
    expect_errno(errno.EINVAL, rq.fallocate, 5, 6, 0, 0, 0)
    expect_errno(errno.EINVAL, rq.fallocate, 5, 6, -1, 1, 0)
    expect_errno(errno.EFBIG, rq.fallocate, 5, 6, 1 << 62, 1 << 62, 0)
    req = rq.lseek(5, 6, 100, os.SEEK_DATA)
    check(req, 46, 5, struct.pack("<QqII", 6, 100, os.SEEK_DATA, 0), 8)
    req = rq.lseek(5, 6, -5, os.SEEK_END)
    assert struct.unpack_from("<q", req.args, 8) == (-5,)
    expect_errno(errno.EINVAL, rq.lseek, 5, 6, 0, os.SEEK_CUR)
    expect_errno(errno.EINVAL, rq.lseek, 5, 6, -1, os.SEEK_HOLE)


def test_opendir_readdir_readdirplus() -> None:
    check(rq.opendir(5), 27, 5, struct.pack("<II", 0, 0), 16)
    cookie = (1 << 64) - 1  # opaque cookies span the whole u64 range
    req = rq.readdir(5, 6, cookie, 4096)
    check(req, 28, 5, struct.pack("<QQIIQII", 6, cookie, 4096, 0, 0, 0, 0), 4096)
    req = rq.readdirplus(5, 6, 3, 65536)
    check(req, 44, 5, struct.pack("<QQIIQII", 6, 3, 65536, 0, 0, 0, 0), 65536)
    # a buffer that cannot hold one maximal record could read as end-of-directory
    expect_errno(errno.EINVAL, rq.readdir, 5, 6, 0, 279)
    rq.readdir(5, 6, 0, 280)
    expect_errno(errno.EINVAL, rq.readdirplus, 5, 6, 0, 407)
    rq.readdirplus(5, 6, 0, 408)
    expect_errno(errno.EINVAL, rq.readdir, 5, 6, -1, 4096)


# --------------------------------------------------------------------------------------
# Extended attributes
# --------------------------------------------------------------------------------------


def test_setxattr_compat_and_ext_layouts() -> None:
    value = b"v" * 10
    req = rq.setxattr(5, "user.k", value, abi.XATTR_CREATE)
    assert req.payload is value
    check(req, 21, 5, struct.pack("<II", 10, 1) + b"user.k\0", 0, payload=value)
    req = rq.setxattr(
        5, b"user.k", value, 0, ext=True, setxattr_flags=abi.FUSE_SETXATTR_ACL_KILL_SGID
    )
    check(req, 21, 5, struct.pack("<IIII", 10, 0, 1, 0) + b"user.k\0", 0, payload=value)
    with pytest.raises(ValueError):
        rq.setxattr(5, "user.k", value, 0, setxattr_flags=1)
    check(
        rq.setxattr(5, "user.e", b"", 0),
        21,
        5,
        struct.pack("<II", 0, 0) + b"user.e\0",
        0,
        payload=b"",
    )


def test_xattr_validation() -> None:
    expect_errno(errno.ERANGE, rq.getxattr, 5, "", 0)
    expect_errno(errno.ERANGE, rq.getxattr, 5, "u" * 256, 0)
    rq.getxattr(5, "u" * 255, 0)
    expect_errno(errno.EINVAL, rq.removexattr, 5, "a\0b")
    expect_errno(errno.E2BIG, rq.setxattr, 5, "user.k", b"x" * 65537, 0)
    expect_errno(errno.EINVAL, rq.setxattr, 5, "user.k", b"x", 4)
    expect_errno(errno.EINVAL, rq.getxattr, 5, "user.k", -1)
    expect_errno(errno.EINVAL, rq.listxattr, 5, -1)


def test_getxattr_listxattr_removexattr() -> None:
    check(rq.getxattr(5, "user.k", 0), 22, 5, struct.pack("<II", 0, 0) + b"user.k\0", 8)
    check(rq.getxattr(5, "user.k", 100), 22, 5, struct.pack("<II", 100, 0) + b"user.k\0", 100)
    # sizes above XATTR_SIZE_MAX are clamped, as Linux does
    check(
        rq.getxattr(5, "user.k", 1 << 20), 22, 5, struct.pack("<II", 65536, 0) + b"user.k\0", 65536
    )
    check(rq.listxattr(5, 0), 23, 5, struct.pack("<II", 0, 0), 8)
    check(rq.listxattr(5, 4), 23, 5, struct.pack("<II", 4, 0), 4)
    check(rq.removexattr(5, "user.k"), 24, 5, b"user.k\0", 0)


# --------------------------------------------------------------------------------------
# Name validation
# --------------------------------------------------------------------------------------

Encoder = Callable[[Any], FuseRequest]

NAME_TAKERS: list[Encoder] = [
    lambda n: rq.lookup(1, n),
    lambda n: rq.unlink(1, n),
    lambda n: rq.rmdir(1, n),
    lambda n: rq.mkdir(1, n, 0o755, 0),
    lambda n: rq.mknod(1, n, 0o010644, 0, 0),
    lambda n: rq.create(1, n, 0, 0o644, 0),
    lambda n: rq.symlink(1, n, "t"),
    lambda n: rq.link(2, 1, n),
    lambda n: rq.rename(1, n, 1, "ok"),
    lambda n: rq.rename(1, "ok", 1, n),
]


@pytest.mark.parametrize("encode", NAME_TAKERS)
@pytest.mark.parametrize(
    ("name", "code"),
    [
        (b"", errno.EINVAL),
        ("", errno.EINVAL),
        (b"a/b", errno.EINVAL),
        ("/", errno.EINVAL),
        (b"a\0b", errno.EINVAL),
        (b"x" * 256, errno.ENAMETOOLONG),
        ("é" * 128, errno.ENAMETOOLONG),  # 256 bytes once encoded
    ],
)
def test_bad_names(encode: Encoder, name: bytes | str, code: int) -> None:
    expect_errno(code, encode, name)


@pytest.mark.parametrize("encode", NAME_TAKERS)
def test_longest_name_is_accepted(encode: Encoder) -> None:
    assert (b"x" * 255 + b"\0") in encode(b"x" * 255).args


def test_name_type_errors_and_node_zero() -> None:
    with pytest.raises(TypeError):
        rq.lookup(1, 42)  # type: ignore[arg-type]
    for fn in (
        lambda: rq.lookup(0, "a"),
        lambda: rq.getattr(0),
        lambda: rq.read(0, 1, 0, 1),
        lambda: rq.open(0, 0),
        lambda: rq.statfs(0),
        lambda: rq.link(0, 1, "a"),
    ):
        with pytest.raises(ValueError):
            fn()
    with pytest.raises(ValueError):
        rq.read(1, -1, 0, 1)  # fh is ours, not the user's: ValueError


valid_names = st.binary(min_size=1, max_size=255).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)


@settings(max_examples=200, deadline=None)
@given(parent=st.integers(1, (1 << 64) - 1), name=valid_names)
def test_lookup_round_trips_any_valid_name(parent: int, name: bytes) -> None:
    req = rq.lookup(parent, name)
    assert req.nodeid == parent
    assert req.args == name + b"\0"
    raw = rq.request_bytes(req, 1)
    assert struct.unpack_from("<I", raw)[0] == len(raw) == 40 + len(name) + 1


@settings(max_examples=200, deadline=None)
@given(
    old=valid_names,
    new=valid_names,
    newparent=st.integers(1, (1 << 64) - 1),
    flags=st.sampled_from([0, 1, 2, 4, 5]),
)
def test_rename_round_trip(old: bytes, new: bytes, newparent: int, flags: int) -> None:
    req = rq.rename(2, old, newparent, new, flags)
    head = 8 if flags == 0 else 16
    assert struct.unpack_from("<Q", req.args)[0] == newparent
    assert req.args[head:] == old + b"\0" + new + b"\0"
    assert req.opcode == (12 if flags == 0 else 45)


@settings(max_examples=200, deadline=None)
@given(
    offset=st.integers(0, (1 << 63) - 1),
    size=st.integers(0, (1 << 32) - 1),
    fh=st.integers(0, (1 << 64) - 1),
)
def test_read_round_trip(offset: int, size: int, fh: int) -> None:
    req = rq.read(3, fh, offset, size)
    assert struct.unpack("<QQIIQII", req.args) == (fh, offset, size, 0, 0, 0, 0)
    assert req.reply_size == size
