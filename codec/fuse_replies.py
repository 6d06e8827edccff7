"""FUSE reply decoders: bytes from the device in, validated typed values out.

Everything that comes back from the daemon is untrusted. Each decoder checks sizes
before unpacking and checks every field it exposes, so that the ONLY exception a
malformed reply can raise is :class:`FuseProtocolError` (never ``IndexError``,
``struct.error``, ``UnicodeError``...). Names stay ``bytes``: nothing is decoded as text.

Decoders take ``bytes``, ``bytearray`` or a 1-D byte ``memoryview`` (typically the view
:func:`parse_out_header` returns, pointing into guest memory). Results never alias the
input: whatever is returned is copied out (``bytes(...)`` for names and values), so the
buffer can be reused as soon as the decoder returns.

Size rule: fixed-size replies must be exactly the struct's size (Linux's
``copy_out_args`` refuses both shorter and longer replies); INIT is the exception (shorter
replies from older daemons are filled with zeros, longer ones are forward compatible).
Variable replies (READ, READLINK, READDIR, xattr values and lists) must fit in what was
asked for.
"""

from __future__ import annotations

import errno
from typing import Any

from pyvirtiofs.codec.fuse_abi import (
    ATTR_OUT,
    ATTR_OUT_SIZE,
    CREATE_OUT_SIZE,
    DIRENT,
    DIRENT_SIZE,
    ENTRY_OUT,
    ENTRY_OUT_SIZE,
    FUSE_COMPAT_22_INIT_OUT_SIZE,
    FUSE_KERNEL_VERSION,
    FUSE_NAME_MAX,
    FUSE_NAME_OFFSET_DIRENTPLUS,
    FUSE_ROOT_ID,
    GETXATTR_IN,
    GETXATTR_OUT,
    GETXATTR_OUT_SIZE,
    INIT_OUT,
    LSEEK_OUT,
    LSEEK_OUT_SIZE,
    MAX_ERRNO,
    MKNOD_IN,
    OFF_MAX,
    OPEN_OUT,
    OPEN_OUT_SIZE,
    OUT_HEADER,
    OUT_HEADER_SIZE,
    POLL_OUT,
    POLL_OUT_SIZE,
    S_IFMT,
    STATFS_OUT,
    STATFS_OUT_SIZE,
    SYMLINK_MAX,
    VALID_FILE_TYPES,
    WRITE_OUT,
    WRITE_OUT_SIZE,
    XATTR_NAME_MAX,
    Opcode,
)
from pyvirtiofs.codec.fuse_requests import FuseRequest
from pyvirtiofs.codec.fuse_types import (
    Attr,
    AttrOut,
    CreateOut,
    Dirent,
    DirentPlus,
    EntryOut,
    GetxattrSize,
    InitOut,
    LseekOut,
    OpenOut,
    PollOut,
    StatfsOut,
    WriteOut,
)

__all__ = [
    "FuseProtocolError",
    "decode_attr_out",
    "decode_create",
    "decode_direntplus",
    "decode_dirents",
    "decode_empty",
    "decode_entry",
    "decode_getxattr_size",
    "decode_init",
    "decode_listxattr",
    "decode_lseek",
    "decode_open",
    "decode_poll",
    "decode_readlink",
    "decode_reply",
    "decode_statfs",
    "decode_write",
    "decode_xattr_value",
    "parse_out_header",
]

Buffer = bytes | bytearray | memoryview

_NSEC = 1_000_000_000
_S_IFREG = 0o100000
_S_IFDIR = 0o040000
_S_IFLNK = 0o120000


class FuseProtocolError(Exception):
    """The daemon sent a reply that breaks the FUSE protocol.

    Not an ``OSError`` on purpose: a malformed reply is a device fault, to be counted
    and logged apart from ordinary daemon errors (which are ``OSError``). Callers that
    must surface it as a file error use :meth:`to_oserror` (EIO, as Linux does).

    ``forget`` lists ``(nodeid, nlookup)`` pairs the daemon accounted as looked up in
    the rejected reply (a bad entry, CREATE or READDIRPLUS record carried a node id):
    send FORGET for them or the daemon keeps those inodes pinned. Such ids come from a
    reply we distrust; a bogus one is harmless (virtiofsd ignores unknown node ids).
    """

    def __init__(self, message: str, *, forget: tuple[tuple[int, int], ...] = ()) -> None:
        super().__init__(message)
        self.errno = errno.EIO
        self.strerror = message
        self.forget = forget

    def to_oserror(self) -> OSError:
        return OSError(errno.EIO, f"FUSE protocol error: {self.strerror}")


def _bad(message: str, forget: tuple[tuple[int, int], ...] = ()) -> FuseProtocolError:
    return FuseProtocolError(message, forget=forget)


def _exact(payload: Buffer, size: int, what: str) -> None:
    if len(payload) != size:
        raise _bad(f"{what} reply is {len(payload)} bytes, expected {size}")


# --------------------------------------------------------------------------------------
# The out header
# --------------------------------------------------------------------------------------


def parse_out_header(buf: Buffer, used_len: int, expected_unique: int) -> tuple[int, memoryview]:
    """Validate a reply's ``fuse_out_header``; return ``(errno, payload)``.

    ``buf`` is the device-writable reply buffer, ``used_len`` the length the device
    reported in the used ring. ``errno`` is 0 on success, else the positive errno the
    daemon returned (the caller raises ``OSError(errno, os.strerror(errno))``). The
    payload is a zero-copy view of exactly ``out.len - 16`` bytes (empty on error).

    Checks: ``16 <= used_len <= len(buf)``; ``16 <= out.len <= used_len``; ``unique``
    matches; ``-4095 <= error <= 0``; an error reply carries no payload.
    """
    if expected_unique == 0:
        raise ValueError("expected_unique must be non-zero")
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    if not OUT_HEADER_SIZE <= used_len <= len(mv):
        raise _bad(f"reply length {used_len} outside 16..{len(mv)}")
    length, error, unique = OUT_HEADER.unpack_from(mv, 0)
    if unique != expected_unique:
        raise _bad(f"reply unique {unique} does not match request {expected_unique}")
    if not OUT_HEADER_SIZE <= length <= used_len:
        raise _bad(f"out header len {length} outside 16..{used_len}")
    if error:
        if not -MAX_ERRNO <= error < 0:
            raise _bad(f"bad error value {error} in reply")
        if length != OUT_HEADER_SIZE:
            raise _bad(f"error reply ({error}) carries {length - OUT_HEADER_SIZE} bytes")
        return -error, mv[OUT_HEADER_SIZE:OUT_HEADER_SIZE]
    return 0, mv[OUT_HEADER_SIZE:length]


# --------------------------------------------------------------------------------------
# Attributes and entries
# --------------------------------------------------------------------------------------


def _attr(f: tuple[int, ...], start: int) -> Attr:
    """Build and validate an Attr from 16 unpacked fields at ``f[start:]``.

    Checks, as Linux's ``fuse_invalid_attr`` does: the file type is one of the seven
    known ones and ``size <= 2**63-1``; also (stricter, cheap) mode fits 16 bits and the
    nanosecond fields are below 10**9. ``blksize``, ``nlink``, ``blocks`` and ``flags``
    take any value (blksize 0 = unspecified).
    """
    a = Attr(*f[start : start + 16])
    if a.mode > 0o177777 or (a.mode & S_IFMT) not in VALID_FILE_TYPES:
        raise _bad(f"invalid mode {a.mode:#o} in attributes")
    if a.size > OFF_MAX:
        raise _bad(f"invalid size {a.size} in attributes")
    if a.atimensec >= _NSEC or a.mtimensec >= _NSEC or a.ctimensec >= _NSEC:
        raise _bad("nanoseconds out of range in attributes")
    return a


def _entry_from(f: tuple[int, ...], *, new_entry: bool, expect_type: int | None) -> EntryOut:
    nodeid, generation, entry_valid, attr_valid, entry_valid_nsec, attr_valid_nsec = f[:6]
    if entry_valid_nsec >= _NSEC:
        raise _bad("entry_valid_nsec out of range", _held(nodeid))
    if nodeid == 0:
        if new_entry:
            raise _bad("daemon returned no node for a newly created entry")
        # Negative entry: attr is filler (virtiofsd sends zeros); Linux ignores it too.
        return EntryOut(
            0,
            generation,
            entry_valid,
            entry_valid_nsec,
            attr_valid,
            attr_valid_nsec,
            Attr(*f[6:22]),
        )
    forget = ((nodeid, 1),)
    if new_entry and nodeid == FUSE_ROOT_ID:
        raise _bad("daemon returned the root as a newly created entry", forget)
    if attr_valid_nsec >= _NSEC:
        raise _bad("attr_valid_nsec out of range", forget)
    try:
        attr = _attr(f, 6)
    except FuseProtocolError as exc:
        raise _bad(str(exc), forget) from None
    if expect_type is not None and attr.mode & S_IFMT != expect_type:
        raise _bad(
            f"created node has type {attr.mode & S_IFMT:#o}, expected {expect_type:#o}", forget
        )
    return EntryOut(
        nodeid, generation, entry_valid, entry_valid_nsec, attr_valid, attr_valid_nsec, attr
    )


def _held(nodeid: int) -> tuple[tuple[int, int], ...]:
    return ((nodeid, 1),) if nodeid else ()


def decode_entry(
    payload: Buffer, *, new_entry: bool = False, expect_type: int | None = None
) -> EntryOut:
    """Decode a ``fuse_entry_out`` (LOOKUP, MKNOD, MKDIR, SYMLINK, LINK).

    For LOOKUP (defaults), ``nodeid == 0`` is a negative entry and is returned as is,
    its attributes unvalidated filler. Replies to node-creating requests pass
    ``new_entry=True``: then node id 0 or the root is a protocol error (Linux:
    ``invalid_nodeid``), and ``expect_type`` (e.g. ``stat.S_IFDIR`` for MKDIR) must match
    the new node's file type. On a protocol error after a non-zero node id was read, the
    exception's ``forget`` holds that node (the daemon counted a lookup).
    """
    _exact(payload, ENTRY_OUT_SIZE, "entry")
    return _entry_from(
        ENTRY_OUT.unpack_from(payload, 0), new_entry=new_entry, expect_type=expect_type
    )


def decode_attr_out(payload: Buffer) -> AttrOut:
    """Decode a ``fuse_attr_out`` (GETATTR, SETATTR)."""
    _exact(payload, ATTR_OUT_SIZE, "attr")
    f = ATTR_OUT.unpack_from(payload, 0)
    if f[1] >= _NSEC:
        raise _bad("attr_valid_nsec out of range")
    return AttrOut(f[0], f[1], _attr(f, 3))


def decode_open(payload: Buffer) -> OpenOut:
    """Decode a ``fuse_open_out`` (OPEN, OPENDIR). The padding word is ignored (it is
    ``backing_id`` in 7.40+, meaningless without FUSE_PASSTHROUGH)."""
    _exact(payload, OPEN_OUT_SIZE, "open")
    fh, open_flags, _ = OPEN_OUT.unpack_from(payload, 0)
    return OpenOut(fh, open_flags)


def decode_create(payload: Buffer) -> CreateOut:
    """Decode a CREATE reply: entry (must be a new regular file) then open handle.

    If the entry is rejected, the exception's ``forget`` holds its node id. The handle
    in a rejected reply is not trusted and not released.
    """
    _exact(payload, CREATE_OUT_SIZE, "create")
    entry = _entry_from(ENTRY_OUT.unpack_from(payload, 0), new_entry=True, expect_type=_S_IFREG)
    fh, open_flags, _ = OPEN_OUT.unpack_from(payload, ENTRY_OUT_SIZE)
    return CreateOut(entry, OpenOut(fh, open_flags))


# --------------------------------------------------------------------------------------
# Small fixed replies
# --------------------------------------------------------------------------------------


def decode_empty(payload: Buffer) -> None:
    """Check that a reply with no out-arguments (UNLINK, RELEASE, FSYNC...) is empty."""
    if len(payload) != 0:
        raise _bad(f"expected an empty reply, got {len(payload)} bytes")


def decode_write(payload: Buffer, requested: int) -> WriteOut:
    """Decode a ``fuse_write_out``; the daemon may not claim more than ``requested``."""
    _exact(payload, WRITE_OUT_SIZE, "write")
    size, _ = WRITE_OUT.unpack_from(payload, 0)
    if size > requested:
        raise _bad(f"daemon wrote {size} bytes of {requested}")
    return WriteOut(size)


def decode_statfs(payload: Buffer) -> StatfsOut:
    """Decode a ``fuse_statfs_out`` (80 bytes; no field constraints beyond size)."""
    _exact(payload, STATFS_OUT_SIZE, "statfs")
    return StatfsOut(*STATFS_OUT.unpack_from(payload, 0))


def decode_lseek(payload: Buffer) -> LseekOut:
    """Decode a ``fuse_lseek_out``; the offset must be a valid file offset."""
    _exact(payload, LSEEK_OUT_SIZE, "lseek")
    (offset,) = LSEEK_OUT.unpack_from(payload, 0)
    if offset > OFF_MAX:
        raise _bad(f"lseek offset {offset} out of range")
    return LseekOut(offset)


def decode_poll(payload: Buffer) -> PollOut:
    """Decode a ``fuse_poll_out``."""
    _exact(payload, POLL_OUT_SIZE, "poll")
    revents, _ = POLL_OUT.unpack_from(payload, 0)
    return PollOut(revents)


def decode_getxattr_size(payload: Buffer) -> GetxattrSize:
    """Decode a ``fuse_getxattr_out`` (GETXATTR/LISTXATTR asked with size 0)."""
    _exact(payload, GETXATTR_OUT_SIZE, "getxattr")
    size, _ = GETXATTR_OUT.unpack_from(payload, 0)
    return GetxattrSize(size)


def decode_init(payload: Buffer) -> InitOut:
    """Decode a ``fuse_init_out``.

    Accepts 24 bytes (FUSE_COMPAT_22_INIT_OUT_SIZE) and up: fields a shorter reply lacks
    are 0, bytes beyond what we know are ignored (forward compatible). ``major`` must be
    7 (a daemon with another major cannot talk to us). ``minor`` is returned as sent,
    even below MIN_MINOR: the session decides (and should use ``negotiated_minor``).
    """
    n = len(payload)
    if n < FUSE_COMPAT_22_INIT_OUT_SIZE:
        raise _bad(f"INIT reply is {n} bytes, need at least {FUSE_COMPAT_22_INIT_OUT_SIZE}")
    size = INIT_OUT.size
    raw = bytes(payload[:size])
    if n < size:
        raw += bytes(size - n)
    out = InitOut(*INIT_OUT.unpack(raw))
    if out.major != FUSE_KERNEL_VERSION:
        raise _bad(f"daemon speaks FUSE major {out.major}, we speak {FUSE_KERNEL_VERSION}")
    return out


# --------------------------------------------------------------------------------------
# Variable replies
# --------------------------------------------------------------------------------------


def decode_readlink(payload: Buffer) -> bytes:
    """Decode a READLINK reply: the target, 1..4095 bytes, no NUL."""
    n = len(payload)
    if not 0 < n <= SYMLINK_MAX:
        raise _bad(f"symlink target of {n} bytes")
    target = bytes(payload)
    if b"\0" in target:
        raise _bad("symlink target contains NUL")
    return target


def decode_xattr_value(payload: Buffer, size: int) -> bytes:
    """Decode a GETXATTR value reply to a request with ``size`` > 0 (at most ``size``)."""
    if len(payload) > size:
        raise _bad(f"xattr value of {len(payload)} bytes exceeds the {size} asked")
    return bytes(payload)


def decode_listxattr(payload: Buffer) -> list[bytes]:
    """Decode a LISTXATTR reply: NUL-terminated names back to back.

    Like Linux's ``fuse_verify_xattr_list``: every name is non-empty and terminated
    (so a non-empty list ends with NUL). Names must also be at most 255 bytes.
    """
    if len(payload) == 0:
        return []
    data = bytes(payload)
    if data[-1] != 0:
        raise _bad("xattr list does not end with NUL")
    names = data[:-1].split(b"\0")
    for name in names:
        if not name or len(name) > XATTR_NAME_MAX:
            raise _bad(f"bad xattr name of {len(name)} bytes in list")
    return names


def _dirent_name(
    payload: Buffer, pos: int, rest: int, header: int
) -> tuple[int, int, int, int, bytes, int]:
    """Parse one dirent header at ``pos`` (``rest`` bytes left from the record start).

    Returns (ino, off, namelen, type, name, reclen). ``header`` is where the dirent
    starts inside the record (0 for READDIR, 128 for READDIRPLUS).
    """
    ino, off, namelen, dtype = DIRENT.unpack_from(payload, pos + header)
    if not 0 < namelen <= FUSE_NAME_MAX:
        raise _bad(f"dirent name length {namelen}")
    start = header + DIRENT_SIZE
    reclen = (start + namelen + 7) & ~7
    if reclen > rest:
        # Linux's parse_dirfile requires the whole padded record (FUSE_DIRENT_SIZE):
        # a record cut short, even only its padding, is malformed.
        raise _bad(f"dirent record of {reclen} bytes overruns the {rest} left")
    if dtype > 15:
        raise _bad(f"dirent type {dtype}")
    name = bytes(payload[pos + start : pos + start + namelen])
    if b"/" in name or b"\0" in name:
        raise _bad(f"dirent name {name!r} contains '/' or NUL")
    return ino, off, namelen, dtype, name, reclen


def decode_dirents(payload: Buffer) -> list[Dirent]:
    """Decode a READDIR reply into records (empty list = end of directory).

    Each record: 24-byte header, name of 1..1024 bytes (no '/' or NUL; '.' and '..'
    allowed), zero padding to 8 bytes, all inside the payload. No trailing bytes.
    """
    out: list[Dirent] = []
    n = len(payload)
    pos = 0
    while pos < n:
        rest = n - pos
        if rest < DIRENT_SIZE:
            raise _bad(f"{rest} trailing bytes after the last dirent")
        ino, off, _, dtype, name, reclen = _dirent_name(payload, pos, rest, 0)
        out.append(Dirent(ino, off, dtype, name))
        pos += reclen
    return out


def decode_direntplus(payload: Buffer) -> list[DirentPlus]:
    """Decode a READDIRPLUS reply (empty list = end of directory).

    Records are ``fuse_entry_out`` + ``fuse_dirent`` + name + padding, with the dirent
    rules of :func:`decode_dirents`. Entry rules follow Linux's ``fuse_direntplus_link``:
    node id 0 means "no entry information" and is not validated; ``.`` and ``..`` are
    not validated either; any other entry must have a valid node id (not the root) and
    valid attributes.

    Every record with a non-zero node id holds one lookup. If the reply is rejected, the
    exception's ``forget`` lists every such node id that could be read from it, so the
    caller can pay them back.
    """
    out: list[DirentPlus] = []
    held: list[tuple[int, int]] = []
    problem: str | None = None
    n = len(payload)
    pos = 0
    while pos < n:
        rest = n - pos
        if rest < FUSE_NAME_OFFSET_DIRENTPLUS:
            raise _bad(f"{rest} trailing bytes after the last direntplus", tuple(held))
        f = ENTRY_OUT.unpack_from(payload, pos)
        nodeid = f[0]
        if nodeid:
            held.append((nodeid, 1))
        try:
            ino, off, _, dtype, name, reclen = _dirent_name(payload, pos, rest, ENTRY_OUT_SIZE)
        except FuseProtocolError as exc:
            raise _bad(str(exc), tuple(held)) from None
        pos += reclen
        if problem is not None:
            continue  # already failing: only collect node ids to forget
        try:
            if nodeid == 0 or name == b"." or name == b"..":
                if f[4] >= _NSEC:
                    raise _bad("entry_valid_nsec out of range")
                entry = EntryOut(nodeid, f[1], f[2], f[4], f[3], f[5], Attr(*f[6:22]))
            else:
                entry = _entry_from(f, new_entry=True, expect_type=None)
        except FuseProtocolError as exc:
            problem = f"direntplus {name!r}: {exc}"
            continue
        out.append(DirentPlus(entry, Dirent(ino, off, dtype, name)))
    if problem is not None:
        raise _bad(problem, tuple(held))
    return out


# --------------------------------------------------------------------------------------
# Dispatch by opcode
# --------------------------------------------------------------------------------------


def _read_data(req: FuseRequest, payload: Buffer) -> bytes:
    if len(payload) > req.reply_size:
        raise _bad(f"READ returned {len(payload)} bytes of {req.reply_size}")
    return bytes(payload)


def _xattr_reply(req: FuseRequest, payload: Buffer, listing: bool) -> Any:
    (size, _) = GETXATTR_IN.unpack_from(req.args, 0)
    if size == 0:
        return decode_getxattr_size(payload)
    if listing:
        if len(payload) > size:
            raise _bad(f"xattr list of {len(payload)} bytes exceeds the {size} asked")
        return decode_listxattr(payload)
    return decode_xattr_value(payload, size)


def _empty(req: FuseRequest, payload: Buffer) -> None:
    decode_empty(payload)


_DECODERS: dict[int, Any] = {
    Opcode.LOOKUP: lambda req, p: decode_entry(p),
    Opcode.GETATTR: lambda req, p: decode_attr_out(p),
    Opcode.SETATTR: lambda req, p: decode_attr_out(p),
    Opcode.READLINK: lambda req, p: decode_readlink(p),
    Opcode.SYMLINK: lambda req, p: decode_entry(p, new_entry=True, expect_type=_S_IFLNK),
    Opcode.MKNOD: lambda req, p: decode_entry(
        p, new_entry=True, expect_type=MKNOD_IN.unpack_from(req.args, 0)[0] & S_IFMT
    ),
    Opcode.MKDIR: lambda req, p: decode_entry(p, new_entry=True, expect_type=_S_IFDIR),
    Opcode.LINK: lambda req, p: decode_entry(p, new_entry=True),
    Opcode.OPEN: lambda req, p: decode_open(p),
    Opcode.OPENDIR: lambda req, p: decode_open(p),
    Opcode.CREATE: lambda req, p: decode_create(p),
    Opcode.READ: _read_data,
    Opcode.WRITE: lambda req, p: decode_write(p, req.payload_len),
    Opcode.STATFS: lambda req, p: decode_statfs(p),
    Opcode.GETXATTR: lambda req, p: _xattr_reply(req, p, False),
    Opcode.LISTXATTR: lambda req, p: _xattr_reply(req, p, True),
    Opcode.INIT: lambda req, p: decode_init(p),
    Opcode.READDIR: lambda req, p: decode_dirents(p),
    Opcode.READDIRPLUS: lambda req, p: decode_direntplus(p),
    Opcode.POLL: lambda req, p: decode_poll(p),
    Opcode.LSEEK: lambda req, p: decode_lseek(p),
}
for _op in (
    Opcode.UNLINK,
    Opcode.RMDIR,
    Opcode.RENAME,
    Opcode.RENAME2,
    Opcode.RELEASE,
    Opcode.RELEASEDIR,
    Opcode.FSYNC,
    Opcode.FSYNCDIR,
    Opcode.FLUSH,
    Opcode.SETXATTR,
    Opcode.REMOVEXATTR,
    Opcode.ACCESS,
    Opcode.FALLOCATE,
    Opcode.DESTROY,
):
    _DECODERS[_op] = _empty
del _op


def decode_reply(req: FuseRequest, payload: Buffer) -> Any:
    """Decode the success payload of ``req``'s reply with the decoder its opcode needs.

    The request supplies the context a decoder needs (WRITE's size, GETXATTR's asked
    size, MKNOD's file type). Results per opcode: LOOKUP/MKNOD/MKDIR/SYMLINK/LINK →
    EntryOut; GETATTR/SETATTR → AttrOut; OPEN/OPENDIR → OpenOut; CREATE → CreateOut;
    READ → bytes; WRITE → WriteOut; STATFS → StatfsOut; READLINK → bytes; GETXATTR →
    GetxattrSize (size 0) or bytes; LISTXATTR → GetxattrSize or list[bytes]; INIT →
    InitOut; READDIR → list[Dirent]; READDIRPLUS → list[DirentPlus]; POLL → PollOut;
    LSEEK → LseekOut; ops without out-arguments → None. FORGET and BATCH_FORGET have no
    reply (ValueError).
    """
    decoder = _DECODERS.get(req.opcode)
    if decoder is None:
        raise ValueError(f"no reply decoder for opcode {req.opcode}")
    return decoder(req, payload)
