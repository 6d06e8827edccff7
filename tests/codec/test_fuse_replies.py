"""Reply decoders: known layouts, validation, and fuzzing.

Replies are hand-packed here with literal fuse.h format strings. The hypothesis tests feed
random bytes, truncated valid replies and bit-flipped valid replies to every decoder and
to parse_out_header: the only exception allowed out is FuseProtocolError.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtiofs.codec import fuse_abi as abi
from pyvirtiofs.codec import fuse_replies as rp
from pyvirtiofs.codec import fuse_requests as rq
from pyvirtiofs.codec.fuse_replies import FuseProtocolError
from pyvirtiofs.codec.fuse_types import Attr, Dirent, EntryOut, InitOut

ATTR_FMT = "<QQQqqqIIIIIIIIII"


def attr_bytes(
    ino: int = 2,
    size: int = 100,
    blocks: int = 8,
    atime: int = 1_700_000_000,
    mtime: int = 1_700_000_001,
    ctime: int = 1_700_000_002,
    atimensec: int = 4,
    mtimensec: int = 5,
    ctimensec: int = 6,
    mode: int = 0o100644,
    nlink: int = 1,
    uid: int = 1000,
    gid: int = 1001,
    rdev: int = 0,
    blksize: int = 4096,
    flags: int = 0,
) -> bytes:
    return struct.pack(
        ATTR_FMT,
        ino,
        size,
        blocks,
        atime,
        mtime,
        ctime,
        atimensec,
        mtimensec,
        ctimensec,
        mode,
        nlink,
        uid,
        gid,
        rdev,
        blksize,
        flags,
    )


def entry_bytes(
    nodeid: int = 5,
    generation: int = 9,
    ev: int = 1,
    av: int = 2,
    evn: int = 3,
    avn: int = 4,
    **attr: int,
) -> bytes:
    return struct.pack("<QQQQII", nodeid, generation, ev, av, evn, avn) + attr_bytes(**attr)


def attr_out_bytes(valid: int = 1, nsec: int = 500, **attr: int) -> bytes:
    return struct.pack("<QII", valid, nsec, 0) + attr_bytes(**attr)


def dirent_bytes(ino: int, off: int, name: bytes, dtype: int = 8, *, pad: bool = True) -> bytes:
    rec = struct.pack("<QQII", ino, off, len(name), dtype) + name
    if pad:
        rec += b"\0" * (-len(rec) % 8)
    return rec


def direntplus_bytes(
    name: bytes, off: int, nodeid: int = 5, *, pad: bool = True, **attr: int
) -> bytes:
    return entry_bytes(nodeid=nodeid, **attr) + dirent_bytes(attr.get("ino", 2), off, name, pad=pad)


def reply(unique: int, error: int = 0, payload: bytes = b"", length: int | None = None) -> bytes:
    n = 16 + len(payload) if length is None else length
    return struct.pack("<IiQ", n, error, unique) + payload


def proto_error(fn: Callable[..., object], *args: Any, **kwargs: Any) -> FuseProtocolError:
    with pytest.raises(FuseProtocolError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == errno.EIO
    return info.value


# --------------------------------------------------------------------------------------
# parse_out_header
# --------------------------------------------------------------------------------------


def test_out_header_success_returns_exact_payload_view() -> None:
    buf = bytearray(reply(7, payload=b"abcdefgh") + b"\xee" * 40)  # buffer larger than reply
    err, payload = rp.parse_out_header(buf, 24, 7)
    assert err == 0
    assert isinstance(payload, memoryview)
    assert bytes(payload) == b"abcdefgh"
    buf[16] = ord("Z")
    assert bytes(payload)[0] == ord("Z")  # zero-copy view


def test_out_header_error_reply() -> None:
    err, payload = rp.parse_out_header(reply(3, -errno.ENOENT), 16, 3)
    assert err == errno.ENOENT and len(payload) == 0
    err, _ = rp.parse_out_header(reply(3, -4095), 16, 3)
    assert err == 4095


@pytest.mark.parametrize(
    ("raw", "used_len", "unique"),
    [
        (reply(3), 15, 3),  # used_len below a header
        (reply(3), 17, 3),  # used_len beyond the buffer
        (reply(4), 16, 3),  # wrong unique
        (reply(3, length=15), 16, 3),  # out.len below 16
        (reply(3, payload=b"x" * 8), 20, 3),  # out.len beyond used_len
        (reply(3, error=1), 16, 3),  # positive error
        (reply(3, error=-4096), 16, 3),  # beyond MAX_ERRNO
        (reply(3, error=-2, payload=b"x" * 8), 24, 3),  # error with payload
        (b"\0" * 8, 8, 3),  # no header at all (buffer too small for the daemon)
    ],
)
def test_out_header_rejects(raw: bytes, used_len: int, unique: int) -> None:
    proto_error(rp.parse_out_header, raw, used_len, unique)


def test_out_header_trailing_used_bytes_are_ignored_and_expected_unique_nonzero() -> None:
    err, payload = rp.parse_out_header(reply(3, payload=b"ab") + b"zz", 20, 3)
    assert (err, bytes(payload)) == (0, b"ab")
    with pytest.raises(ValueError):
        rp.parse_out_header(reply(0), 16, 0)


# --------------------------------------------------------------------------------------
# Attributes, entries
# --------------------------------------------------------------------------------------


def test_decode_attr_out_known_layout() -> None:
    out = rp.decode_attr_out(
        attr_out_bytes(
            valid=7, nsec=8, size=12345, mode=0o040755, nlink=3, rdev=0x801, blksize=512, flags=1
        )
    )
    assert (out.attr_valid, out.attr_valid_nsec) == (7, 8)
    a = out.attr
    assert a == Attr(
        2,
        12345,
        8,
        1_700_000_000,
        1_700_000_001,
        1_700_000_002,
        4,
        5,
        6,
        0o040755,
        3,
        1000,
        1001,
        0x801,
        512,
        1,
    )
    assert a.is_dir() and not a.is_reg() and a.file_type == stat.S_IFDIR
    assert a.mtime_ns == 1_700_000_001_000_000_005
    assert out.attr_valid_ns == 7_000_000_008


def test_negative_times_decode_signed() -> None:
    a = rp.decode_attr_out(attr_out_bytes(atime=-5, mtime=-1, ctime=0)).attr
    assert (a.atime, a.mtime, a.ctime) == (-5, -1, 0)


@pytest.mark.parametrize(
    "bad",
    [
        {"mode": 0o644},  # no file type
        {"mode": 0o070644},  # unknown file type
        {"mode": 0o1100644},  # above 16 bits
        {"size": 1 << 63},
        {"atimensec": 10**9},
        {"mtimensec": 2**32 - 1},
        {"ctimensec": 10**9},
    ],
)
def test_invalid_attributes_are_rejected(bad: dict[str, int]) -> None:
    proto_error(rp.decode_attr_out, attr_out_bytes(**bad))
    exc = proto_error(rp.decode_entry, entry_bytes(nodeid=77, **bad))
    assert exc.forget == ((77, 1),)  # the daemon counted a lookup: give it back


def test_attr_out_size_must_be_exact() -> None:
    good = attr_out_bytes()
    proto_error(rp.decode_attr_out, good[:-1])
    proto_error(rp.decode_attr_out, good + b"\0" * 8)
    proto_error(rp.decode_attr_out, struct.pack("<QII", 1, 10**9, 0) + attr_bytes())


def test_to_stat_result() -> None:
    a = rp.decode_attr_out(attr_out_bytes(size=10, mode=0o100600, rdev=5, blocks=16)).attr
    st_ = a.to_stat_result(dev=42)
    assert isinstance(st_, os.stat_result)
    assert (st_.st_mode, st_.st_ino, st_.st_dev, st_.st_nlink) == (0o100600, 2, 42, 1)
    assert (st_.st_uid, st_.st_gid, st_.st_size) == (1000, 1001, 10)
    assert st_.st_atime_ns == 1_700_000_000_000_000_004
    assert st_.st_mtime_ns == 1_700_000_001_000_000_005
    assert st_.st_ctime_ns == 1_700_000_002_000_000_006
    assert st_.st_mtime == pytest.approx(1_700_000_001.000000005)
    assert st_[8] == 1_700_000_001  # integer mtime in the tuple part, like os.stat
    assert (st_.st_blksize, st_.st_blocks, st_.st_rdev) == (4096, 16, 5)
    assert stat.S_ISREG(st_.st_mode)


def test_decode_entry_known_layout() -> None:
    e = rp.decode_entry(entry_bytes(nodeid=11, generation=2, ev=3, av=4, evn=5, avn=6))
    assert isinstance(e, EntryOut)
    assert (e.nodeid, e.generation, e.entry_valid, e.attr_valid) == (11, 2, 3, 4)
    assert (e.entry_valid_nsec, e.attr_valid_nsec) == (5, 6)
    assert e.attr.ino == 2 and not e.is_negative
    assert e.entry_valid_ns == 3_000_000_005


def test_negative_entry_is_returned_without_attr_validation() -> None:
    raw = struct.pack("<QQQQII", 0, 0, 10, 0, 0, 0) + b"\0" * 88  # mode 0: invalid if checked
    e = rp.decode_entry(raw)
    assert e.is_negative and e.entry_valid == 10
    exc = proto_error(rp.decode_entry, raw, new_entry=True)
    assert exc.forget == ()


def test_new_entry_rules() -> None:
    exc = proto_error(rp.decode_entry, entry_bytes(nodeid=1), new_entry=True)
    assert exc.forget == ((1, 1),)
    e = rp.decode_entry(entry_bytes(nodeid=1))  # LOOKUP of ".." may return the root
    assert e.nodeid == 1
    d = rp.decode_entry(
        entry_bytes(nodeid=8, mode=0o040700), new_entry=True, expect_type=stat.S_IFDIR
    )
    assert d.attr.is_dir()
    exc = proto_error(
        rp.decode_entry, entry_bytes(nodeid=8), new_entry=True, expect_type=stat.S_IFDIR
    )
    assert exc.forget == ((8, 1),)


def test_entry_size_must_be_exact() -> None:
    proto_error(rp.decode_entry, entry_bytes()[:120])  # FUSE_COMPAT_ENTRY_OUT_SIZE: too old
    proto_error(rp.decode_entry, entry_bytes() + b"\0")


def test_decode_create() -> None:
    raw = entry_bytes(nodeid=12) + struct.pack("<QII", 99, abi.FOPEN_KEEP_CACHE, 0)
    out = rp.decode_create(raw)
    assert out.entry.nodeid == 12 and out.open.fh == 99
    assert out.open.open_flags == abi.FOPEN_KEEP_CACHE
    exc = proto_error(rp.decode_create, entry_bytes(nodeid=12, mode=0o040755) + bytes(16))
    assert exc.forget == ((12, 1),)
    proto_error(rp.decode_create, raw[:-1])
    proto_error(rp.decode_create, entry_bytes(nodeid=0) + bytes(16))


# --------------------------------------------------------------------------------------
# Small fixed replies
# --------------------------------------------------------------------------------------


def test_decode_open() -> None:
    o = rp.decode_open(struct.pack("<QII", 2**64 - 1, abi.FOPEN_DIRECT_IO, 123))
    assert (o.fh, o.open_flags) == (2**64 - 1, abi.FOPEN_DIRECT_IO)
    proto_error(rp.decode_open, b"\0" * 15)
    proto_error(rp.decode_open, b"\0" * 17)


def test_decode_write() -> None:
    assert rp.decode_write(struct.pack("<II", 4096, 0), 4096).size == 4096
    assert rp.decode_write(struct.pack("<II", 10, 0), 4096).size == 10
    proto_error(rp.decode_write, struct.pack("<II", 4097, 0), 4096)
    proto_error(rp.decode_write, struct.pack("<I", 1), 4096)


def test_decode_statfs() -> None:
    raw = struct.pack("<QQQQQIIII", 1000, 500, 400, 300, 200, 4096, 255, 4096, 0) + bytes(24)
    s = rp.decode_statfs(raw)
    assert (s.blocks, s.bfree, s.bavail, s.files, s.ffree) == (1000, 500, 400, 300, 200)
    assert (s.bsize, s.namelen, s.frsize) == (4096, 255, 4096)
    proto_error(rp.decode_statfs, raw[:48])  # FUSE_COMPAT_STATFS_SIZE: refused
    proto_error(rp.decode_statfs, raw + bytes(8))


def test_decode_lseek_poll_getxattr_size_empty() -> None:
    assert rp.decode_lseek(struct.pack("<Q", 4096)).offset == 4096
    proto_error(rp.decode_lseek, struct.pack("<Q", 1 << 63))
    assert rp.decode_poll(struct.pack("<II", 5, 0)).revents == 5
    assert rp.decode_getxattr_size(struct.pack("<II", 77, 0)).size == 77
    proto_error(rp.decode_getxattr_size, b"\0" * 4)
    assert rp.decode_empty(b"") is None
    proto_error(rp.decode_empty, b"\0")


# --------------------------------------------------------------------------------------
# INIT
# --------------------------------------------------------------------------------------

INIT_FMT = "<IIIIHHIIHHI28x"  # 64 bytes: ... max_pages, map_alignment, flags2, unused[7]


def test_decode_init_full_reply_from_virtiofsd() -> None:
    flags = abi.FUSE_MAX_PAGES | abi.FUSE_BIG_WRITES | abi.FUSE_INIT_EXT
    raw = struct.pack(INIT_FMT, 7, 36, 131072, flags, 16, 12, 1 << 20, 1, 256, 0, 1)
    out = rp.decode_init(raw)
    assert out == InitOut(7, 36, 131072, flags, 16, 12, 1 << 20, 1, 256, 0, 1)
    assert out.all_flags == flags | abi.FUSE_SECURITY_CTX
    assert out.negotiated_minor == 36


def test_init_flags2_ignored_without_init_ext() -> None:
    raw = struct.pack(INIT_FMT, 7, 36, 0, abi.FUSE_MAX_PAGES, 0, 0, 4096, 0, 1, 0, 0xFFFF)
    out = rp.decode_init(raw)
    assert out.flags2 == 0xFFFF and out.all_flags == abi.FUSE_MAX_PAGES


def test_init_short_and_long_replies() -> None:
    short = struct.pack("<IIIIHHI", 7, 22, 4096, 3, 1, 2, 65536)  # 24 bytes (7.22)
    out = rp.decode_init(short)
    assert (out.minor, out.max_write, out.time_gran, out.max_pages, out.flags2) == (
        22,
        65536,
        0,
        0,
        0,
    )
    proto_error(rp.decode_init, short[:23])
    longer = struct.pack(INIT_FMT, 7, 45, 0, 0, 0, 0, 4096, 1, 0, 0, 0) + b"\xff" * 64
    out = rp.decode_init(longer)
    assert out.minor == 45 and out.negotiated_minor == 38 and out.max_write == 4096


def test_init_rejects_other_major_but_returns_old_minor() -> None:
    proto_error(rp.decode_init, struct.pack(INIT_FMT, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    assert rp.decode_init(struct.pack(INIT_FMT, 7, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0)).minor == 20


# --------------------------------------------------------------------------------------
# READLINK, xattrs
# --------------------------------------------------------------------------------------


def test_decode_readlink() -> None:
    assert rp.decode_readlink(b"../x") == b"../x"
    assert rp.decode_readlink(b"\xff\xfe") == b"\xff\xfe"  # not decoded as text
    assert rp.decode_readlink(b"y" * 4095) == b"y" * 4095
    proto_error(rp.decode_readlink, b"")
    proto_error(rp.decode_readlink, b"y" * 4096)
    proto_error(rp.decode_readlink, b"a\0")


def test_xattr_value_and_list() -> None:
    assert rp.decode_xattr_value(b"abc", 3) == b"abc"
    assert rp.decode_xattr_value(memoryview(b"ab"), 10) == b"ab"
    proto_error(rp.decode_xattr_value, b"abcd", 3)
    assert rp.decode_listxattr(b"") == []
    assert rp.decode_listxattr(b"user.a\0security.b\0") == [b"user.a", b"security.b"]
    proto_error(rp.decode_listxattr, b"user.a")  # trailing NUL required
    proto_error(rp.decode_listxattr, b"user.a\0\0")  # empty name
    proto_error(rp.decode_listxattr, b"\0")
    proto_error(rp.decode_listxattr, b"u" * 256 + b"\0")


# --------------------------------------------------------------------------------------
# READDIR / READDIRPLUS
# --------------------------------------------------------------------------------------


def test_decode_dirents() -> None:
    raw = (
        dirent_bytes(1, 1, b".", 4)
        + dirent_bytes(1, 2, b"..", 4)
        + dirent_bytes(7, 3, b"eight888")
        + dirent_bytes(9, 4, b"n\xff", 10)
    )
    out = rp.decode_dirents(raw)
    assert out == [
        Dirent(1, 1, 4, b"."),
        Dirent(1, 2, 4, b".."),
        Dirent(7, 3, 8, b"eight888"),
        Dirent(9, 4, 10, b"n\xff"),
    ]
    assert len(dirent_bytes(7, 3, b"eight888")) == 32  # 24 + 8, no padding needed
    assert rp.decode_dirents(b"") == []


def test_dirent_names_are_copies() -> None:
    buf = bytearray(dirent_bytes(1, 1, b"abc"))
    (d,) = rp.decode_dirents(memoryview(buf))
    buf[24] = ord("X")
    assert d.name == b"abc"


@pytest.mark.parametrize(
    "raw",
    [
        dirent_bytes(1, 1, b"abc", pad=False),  # final padding missing
        dirent_bytes(1, 1, b"abc") + b"\0" * 8,  # trailing bytes after the last record
        struct.pack("<QQII", 1, 1, 0, 8),  # empty name
        struct.pack("<QQII", 1, 1, 1025, 8) + b"a" * 1032,  # name too long
        struct.pack("<QQII", 1, 1, 2**32 - 1, 8) + b"a" * 8,  # namelen past the buffer
        dirent_bytes(1, 1, b"a/b"),
        dirent_bytes(1, 1, b"a\0b"),
        dirent_bytes(1, 1, b"abc", 16),  # DT_ type out of range
    ],
)
def test_bad_dirents(raw: bytes) -> None:
    proto_error(rp.decode_dirents, raw)


def test_longest_reply_name_is_accepted() -> None:
    (d,) = rp.decode_dirents(dirent_bytes(1, 1, b"n" * 1024))
    assert len(d.name) == 1024


def test_decode_direntplus() -> None:
    dot = struct.pack("<QQQQII", 0, 0, 0, 0, 0, 0) + struct.pack(
        ATTR_FMT, 1, *([0] * 8), 0o040000, *([0] * 6)
    )
    raw = (
        dot
        + dirent_bytes(1, 1, b".", 4)
        + direntplus_bytes(b"file", 2, nodeid=20, ino=3)
        + direntplus_bytes(b"sub", 3, nodeid=21, mode=0o040755)
    )
    out = rp.decode_direntplus(raw)
    assert [d.dirent.name for d in out] == [b".", b"file", b"sub"]
    assert [d.entry.nodeid for d in out] == [0, 20, 21]
    assert [d.dirent.off for d in out] == [1, 2, 3]
    assert out[1].dirent.ino == 3 and out[1].entry.attr.ino == 3
    assert out[2].entry.attr.is_dir()


def test_direntplus_unvalidated_for_dots_and_zero_nodeid() -> None:
    raw = (
        entry_bytes(nodeid=0, mode=0)
        + dirent_bytes(2, 1, b"x")
        + entry_bytes(nodeid=1, mode=0)
        + dirent_bytes(1, 2, b"..")
    )
    out = rp.decode_direntplus(raw)
    assert [(d.entry.nodeid, d.dirent.name) for d in out] == [(0, b"x"), (1, b"..")]


def test_direntplus_errors_list_every_lookup_to_forget() -> None:
    raw = (
        direntplus_bytes(b"a", 1, nodeid=30)
        + direntplus_bytes(b"b", 2, nodeid=31, mode=7)
        + direntplus_bytes(b"c", 3, nodeid=32)
    )
    exc = proto_error(rp.decode_direntplus, raw)
    assert exc.forget == ((30, 1), (31, 1), (32, 1))  # including entries after the bad one
    root = direntplus_bytes(b"r", 1, nodeid=1)
    assert proto_error(rp.decode_direntplus, root).forget == ((1, 1),)
    cut = direntplus_bytes(b"a", 1, nodeid=30) + direntplus_bytes(b"abc", 2, nodeid=31, pad=False)
    assert proto_error(rp.decode_direntplus, cut).forget == ((30, 1), (31, 1))
    tail = direntplus_bytes(b"a", 1, nodeid=30) + b"\0" * 100
    assert proto_error(rp.decode_direntplus, tail).forget == ((30, 1),)


# --------------------------------------------------------------------------------------
# decode_reply dispatch
# --------------------------------------------------------------------------------------


def test_decode_reply_uses_request_context() -> None:
    assert rp.decode_reply(rq.getxattr(5, "user.k", 0), struct.pack("<II", 9, 0)).size == 9
    assert rp.decode_reply(rq.getxattr(5, "user.k", 8), b"12345678") == b"12345678"
    proto_error(rp.decode_reply, rq.getxattr(5, "user.k", 4), b"12345678")
    assert rp.decode_reply(rq.listxattr(5, 8), b"user.a\0") == [b"user.a"]
    assert rp.decode_reply(rq.write(5, 6, 0, b"abc"), struct.pack("<II", 3, 0)).size == 3
    proto_error(rp.decode_reply, rq.write(5, 6, 0, b"abc"), struct.pack("<II", 4, 0))
    assert rp.decode_reply(rq.read(5, 6, 0, 4), b"abcd") == b"abcd"
    proto_error(rp.decode_reply, rq.read(5, 6, 0, 4), b"abcde")
    fifo = entry_bytes(nodeid=8, mode=0o010644)
    assert rp.decode_reply(rq.mknod(2, "p", 0o010644, 0, 0), fifo).nodeid == 8
    proto_error(rp.decode_reply, rq.mknod(2, "s", 0o140644, 0, 0), fifo)
    proto_error(rp.decode_reply, rq.mkdir(2, "d", 0o755, 0), fifo)
    proto_error(rp.decode_reply, rq.symlink(2, "l", "t"), fifo)
    assert rp.decode_reply(rq.link(8, 2, "h"), fifo).nodeid == 8
    assert rp.decode_reply(rq.lookup(2, "gone"), entry_bytes(nodeid=0, mode=0)).is_negative
    assert rp.decode_reply(rq.unlink(2, "x"), b"") is None
    proto_error(rp.decode_reply, rq.unlink(2, "x"), b"\0" * 8)
    assert rp.decode_reply(rq.destroy(), b"") is None
    with pytest.raises(ValueError):
        rp.decode_reply(rq.forget(2, 1), b"")


# --------------------------------------------------------------------------------------
# Fuzzing: only FuseProtocolError may come out
# --------------------------------------------------------------------------------------

STATFS = struct.pack("<QQQQQIIII", 1, 2, 3, 4, 5, 6, 7, 8, 0) + bytes(24)
INIT = struct.pack(INIT_FMT, 7, 36, 4096, abi.FUSE_INIT_EXT, 1, 1, 4096, 1, 1, 0, 1)
DIRENTS = dirent_bytes(1, 1, b".", 4) + dirent_bytes(5, 2, b"name") + dirent_bytes(6, 3, b"x" * 9)
DIRENTPLUS = direntplus_bytes(b"a", 1, nodeid=30) + direntplus_bytes(b"bcdefghij", 2, nodeid=31)
CREATE = entry_bytes(nodeid=12) + struct.pack("<QII", 99, 0, 0)

# (name, decoder, a valid reply, fixed size?)
DECODERS: list[tuple[str, Callable[[Any], object], bytes, bool]] = [
    ("entry", rp.decode_entry, entry_bytes(), True),
    (
        "entry_new",
        lambda p: rp.decode_entry(p, new_entry=True, expect_type=stat.S_IFREG),
        entry_bytes(),
        True,
    ),
    ("attr_out", rp.decode_attr_out, attr_out_bytes(), True),
    ("open", rp.decode_open, struct.pack("<QII", 1, 2, 0), True),
    ("create", rp.decode_create, CREATE, True),
    ("write", lambda p: rp.decode_write(p, 4096), struct.pack("<II", 100, 0), True),
    ("statfs", rp.decode_statfs, STATFS, True),
    ("lseek", rp.decode_lseek, struct.pack("<Q", 5), True),
    ("poll", rp.decode_poll, struct.pack("<II", 1, 0), True),
    ("getxattr_size", rp.decode_getxattr_size, struct.pack("<II", 10, 0), True),
    ("empty", rp.decode_empty, b"", True),
    ("init", rp.decode_init, INIT, False),
    ("readlink", rp.decode_readlink, b"target/path", False),
    ("xattr_value", lambda p: rp.decode_xattr_value(p, 16), b"value", False),
    ("listxattr", rp.decode_listxattr, b"user.a\0user.bb\0", False),
    ("dirents", rp.decode_dirents, DIRENTS, False),
    ("direntplus", rp.decode_direntplus, DIRENTPLUS, False),
    ("reply_lookup", lambda p: rp.decode_reply(rq.lookup(1, "a"), p), entry_bytes(), True),
    (
        "reply_mknod",
        lambda p: rp.decode_reply(rq.mknod(1, "a", 0o010600, 0, 0), p),
        entry_bytes(mode=0o010600),
        True,
    ),
    (
        "reply_getxattr",
        lambda p: rp.decode_reply(rq.getxattr(1, "u.a", 0), p),
        struct.pack("<II", 3, 0),
        True,
    ),
    ("reply_listxattr", lambda p: rp.decode_reply(rq.listxattr(1, 64), p), b"a\0", False),
    (
        "reply_readdirplus",
        lambda p: rp.decode_reply(rq.readdirplus(1, 2, 0, 4096), p),
        DIRENTPLUS,
        False,
    ),
]
DECODER_IDS = [d[0] for d in DECODERS]


def run(decoder: Callable[[Any], object], payload: bytes | memoryview) -> object:
    """Call a decoder; success and FuseProtocolError are the only acceptable outcomes."""
    try:
        return decoder(payload)
    except FuseProtocolError as exc:
        assert exc.errno == errno.EIO
        assert all(isinstance(n, int) and n > 0 for n, _ in exc.forget)
        return exc


@pytest.mark.parametrize(("name", "decoder", "valid", "fixed"), DECODERS, ids=DECODER_IDS)
def test_valid_samples_decode(
    name: str, decoder: Callable[[Any], object], valid: bytes, fixed: bool
) -> None:
    result = decoder(valid)
    assert not isinstance(result, FuseProtocolError)
    assert decoder(memoryview(bytearray(valid))) == result  # views work like bytes


@pytest.mark.parametrize(("name", "decoder", "valid", "fixed"), DECODERS, ids=DECODER_IDS)
def test_truncated_valid_replies(
    name: str, decoder: Callable[[Any], object], valid: bytes, fixed: bool
) -> None:
    for cut in range(len(valid)):
        result = run(decoder, valid[:cut])
        if fixed:
            assert isinstance(result, FuseProtocolError), (name, cut)
    if fixed:
        assert isinstance(run(decoder, valid + b"\0"), FuseProtocolError)


@settings(max_examples=400, deadline=None)
@given(blob=st.binary(min_size=1, max_size=800), extra=st.integers(0, 700))
def test_fuzz_random_bytes(blob: bytes, extra: int) -> None:
    """Random bytes, cut to the sizes that reach past each decoder's length checks."""
    for _, decoder, valid, _ in DECODERS:
        for n in {len(valid), max(0, len(valid) - 1), len(valid) + 1, extra, len(blob)}:
            run(decoder, (blob * (n // len(blob) + 1))[:n])


@settings(max_examples=400, deadline=None)
@given(
    flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 7)), min_size=1, max_size=4)
)
def test_fuzz_bit_flips(flips: list[tuple[int, int]]) -> None:
    """Valid replies with 1-4 bits flipped: decoded or rejected, nothing else."""
    for _, decoder, valid, _ in DECODERS:
        if not valid:
            continue
        buf = bytearray(valid)
        for pos, bit in flips:
            buf[pos % len(buf)] ^= 1 << bit
        run(decoder, memoryview(buf))


@settings(max_examples=500, deadline=None)
@given(
    buf=st.binary(max_size=64),
    used_len=st.integers(-5, 80),
    unique=st.integers(1, 2**64 - 1),
)
def test_fuzz_parse_out_header(buf: bytes, used_len: int, unique: int) -> None:
    try:
        err, payload = rp.parse_out_header(buf, used_len, unique)
    except FuseProtocolError:
        return
    assert 0 <= err <= 4095
    assert 16 + len(payload) <= used_len <= len(buf)
    if err:
        assert len(payload) == 0


@settings(max_examples=300, deadline=None)
@given(
    unique=st.integers(1, 2**64 - 1),
    error=st.integers(-5000, 5),
    body=st.binary(max_size=40),
    length_delta=st.integers(-20, 20),
    extra=st.integers(0, 16),
)
def test_fuzz_out_header_near_valid(
    unique: int, error: int, body: bytes, length_delta: int, extra: int
) -> None:
    length = max(0, 16 + len(body) + length_delta)
    raw = struct.pack("<IiQ", length, error, unique) + body
    used = len(raw) - min(extra, len(raw))
    try:
        err, payload = rp.parse_out_header(raw, used, unique)
    except FuseProtocolError:
        ok = 16 <= length <= used and -4095 <= error <= 0 and (error == 0 or length == 16)
        assert not ok or used < 16
        return
    assert err == -error
    assert bytes(payload) == raw[16:length]


@settings(max_examples=300, deadline=None)
@given(
    names=st.lists(
        st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b),
        max_size=8,
    ),
    ino=st.integers(0, 2**64 - 1),
)
def test_dirents_round_trip(names: list[bytes], ino: int) -> None:
    raw = b"".join(dirent_bytes(ino, i + 1, n, 8) for i, n in enumerate(names))
    out = rp.decode_dirents(raw)
    assert [d.name for d in out] == names
    assert [d.off for d in out] == list(range(1, len(names) + 1))
    assert all(d.ino == ino for d in out)
