"""FUSE request encoders: the ONE place where each opcode's encoding lives.

Sans-I/O: every encoder validates its arguments and returns a :class:`FuseRequest`
describing the request minus its ``fuse_in_header``. The device layer, which owns guest
memory, assigns ``unique`` at submit time and writes the header with
:func:`pack_in_header` directly into the descriptor buffer, followed by ``args`` and
``payload``. Nothing here does I/O or keeps state.

Validation policy: a request we build is a request the daemon can parse. Bad *user*
input (names, sizes, offsets, modes, flags) raises ``OSError`` with the errno Linux would
give for the same mistake, so the API layer can pass it straight through. Bad *program*
input (a node id of 0, an fh out of range, a unique of 0) raises ``ValueError``: that is
a bug in our own code, not the user's.

Names: ``str`` is encoded with ``os.fsencode`` (surrogateescape round-trips undecodable
bytes), bytes-like objects are copied to ``bytes``. A name is one path component: never
empty, no ``/``, no NUL, at most 255 bytes. ``.`` and ``..`` are accepted by
:func:`lookup` only (virtiofsd resolves them there and nowhere else); callers map them to
Linux's errno (EEXIST, EBUSY, ENOTEMPTY...) before reaching the codec.

Modes: the codec does NOT apply the umask. Unless ``FUSE_DONT_MASK`` was negotiated,
Linux applies the umask itself before sending the mode, and so must the caller; the
``umask`` field is informational for daemons with POSIX ACLs.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from struct import error as struct_error

import msgspec

from pyvirtiofs.codec.fuse_abi import (
    ACCESS_IN,
    ATTR_OUT_SIZE,
    BATCH_FORGET_IN,
    BATCH_FORGET_MAX,
    CREATE_IN,
    CREATE_OUT_SIZE,
    DIRENT_RECORD_MAX,
    DIRENTPLUS_RECORD_MAX,
    ENTRY_OUT_SIZE,
    FALLOCATE_IN,
    FATTR_ATIME,
    FATTR_ATIME_NOW,
    FATTR_CTIME,
    FATTR_FH,
    FATTR_GID,
    FATTR_MODE,
    FATTR_MTIME,
    FATTR_MTIME_NOW,
    FATTR_SIZE,
    FATTR_UID,
    FLUSH_IN,
    FORGET_IN,
    FORGET_ONE,
    FSYNC_IN,
    FUSE_ASYNC_READ,
    FUSE_ATOMIC_O_TRUNC,
    FUSE_BIG_WRITES,
    FUSE_DO_READDIRPLUS,
    FUSE_EXPORT_SUPPORT,
    FUSE_FSYNC_FDATASYNC,
    FUSE_GETATTR_FH,
    FUSE_INIT_EXT,
    FUSE_KERNEL_MINOR_VERSION,
    FUSE_KERNEL_VERSION,
    FUSE_MAX_PAGES,
    FUSE_NAME_MAX_REQUEST,
    FUSE_PARALLEL_DIROPS,
    FUSE_RELEASE_FLUSH,
    GETATTR_IN,
    GETXATTR_IN,
    GETXATTR_OUT_SIZE,
    IN_HEADER,
    IN_HEADER_SIZE,
    INIT_IN,
    INIT_IN_EXT,
    INIT_OUT_SIZE,
    LINK_IN,
    LSEEK_IN,
    LSEEK_OUT_SIZE,
    MKDIR_IN,
    MKNOD_IN,
    OFF_MAX,
    OPEN_IN,
    OPEN_OUT_SIZE,
    OUT_HEADER_SIZE,
    POLL_IN,
    POLL_OUT_SIZE,
    READ_IN,
    READLINK_REPLY_SIZE,
    RELEASE_IN,
    RENAME2_IN,
    RENAME_EXCHANGE,
    RENAME_IN,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    S_IFMT,
    SETATTR_IN,
    SETXATTR_IN,
    SETXATTR_IN_EXT,
    STATFS_OUT_SIZE,
    SYMLINK_MAX,
    U32_MAX,
    U64_MAX,
    WRITE_IN,
    WRITE_OUT_SIZE,
    XATTR_CREATE,
    XATTR_LIST_MAX,
    XATTR_NAME_MAX,
    XATTR_REPLACE,
    XATTR_SIZE_MAX,
    Opcode,
)

__all__ = [
    "DEFAULT_INIT_FLAGS",
    "FuseRequest",
    "access",
    "batch_forget",
    "create",
    "destroy",
    "fallocate",
    "flush",
    "forget",
    "fsync",
    "fsyncdir",
    "getattr",
    "getxattr",
    "in_header_bytes",
    "init",
    "link",
    "listxattr",
    "lookup",
    "lseek",
    "mkdir",
    "mknod",
    "open",
    "opendir",
    "pack_in_header",
    "poll",
    "read",
    "readdir",
    "readdirplus",
    "readlink",
    "release",
    "releasedir",
    "removexattr",
    "rename",
    "request_bytes",
    "rmdir",
    "setattr",
    "setxattr",
    "statfs",
    "symlink",
    "unlink",
    "write",
]

#: INIT flags we ask for by default. Each one is something this client can honour:
#: ASYNC_READ and PARALLEL_DIROPS (we pipeline requests), ATOMIC_O_TRUNC (O_TRUNC in
#: OPEN instead of a SETATTR round trip; if the reply lacks it, the caller must strip
#: O_TRUNC and truncate with SETATTR), EXPORT_SUPPORT (the daemon resolves "." and ".."
#: in LOOKUP), BIG_WRITES + MAX_PAGES (max_write up to 1 MiB on virtiofsd), DO_READDIRPLUS
#: (READDIRPLUS allowed if granted), INIT_EXT (7.36 INIT layout with flags2).
#: Deliberately NOT asked: WRITEBACK_CACHE, DONT_MASK, POSIX_ACL, SETXATTR_EXT,
#: SECURITY_CTX, CREATE_SUPP_GROUP (they change request layouts or semantics we do not
#: implement), NO_OPEN(DIR)_SUPPORT (would let the daemon answer OPEN with ENOSYS),
#: HANDLE_KILLPRIV(_V2), SUBMOUNTS, locks.
DEFAULT_INIT_FLAGS = (
    FUSE_ASYNC_READ
    | FUSE_ATOMIC_O_TRUNC
    | FUSE_EXPORT_SUPPORT
    | FUSE_BIG_WRITES
    | FUSE_DO_READDIRPLUS
    | FUSE_PARALLEL_DIROPS
    | FUSE_MAX_PAGES
    | FUSE_INIT_EXT
)

_EMPTY = b""
_GETATTR_NO_FH = GETATTR_IN.pack(0, 0, 0)
# Opcode members bound to module globals: a global lookup is ~5x cheaper than an enum
# attribute access, and encoders run on every request.
_OP_ACCESS = Opcode.ACCESS
_OP_BATCH_FORGET = Opcode.BATCH_FORGET
_OP_CREATE = Opcode.CREATE
_OP_DESTROY = Opcode.DESTROY
_OP_FALLOCATE = Opcode.FALLOCATE
_OP_FLUSH = Opcode.FLUSH
_OP_FORGET = Opcode.FORGET
_OP_FSYNC = Opcode.FSYNC
_OP_FSYNCDIR = Opcode.FSYNCDIR
_OP_GETATTR = Opcode.GETATTR
_OP_GETXATTR = Opcode.GETXATTR
_OP_INIT = Opcode.INIT
_OP_LINK = Opcode.LINK
_OP_LISTXATTR = Opcode.LISTXATTR
_OP_LOOKUP = Opcode.LOOKUP
_OP_LSEEK = Opcode.LSEEK
_OP_MKDIR = Opcode.MKDIR
_OP_MKNOD = Opcode.MKNOD
_OP_OPEN = Opcode.OPEN
_OP_OPENDIR = Opcode.OPENDIR
_OP_POLL = Opcode.POLL
_OP_READ = Opcode.READ
_OP_READDIR = Opcode.READDIR
_OP_READDIRPLUS = Opcode.READDIRPLUS
_OP_READLINK = Opcode.READLINK
_OP_RELEASE = Opcode.RELEASE
_OP_RELEASEDIR = Opcode.RELEASEDIR
_OP_REMOVEXATTR = Opcode.REMOVEXATTR
_OP_RENAME = Opcode.RENAME
_OP_RENAME2 = Opcode.RENAME2
_OP_RMDIR = Opcode.RMDIR
_OP_SETATTR = Opcode.SETATTR
_OP_SETXATTR = Opcode.SETXATTR
_OP_STATFS = Opcode.STATFS
_OP_SYMLINK = Opcode.SYMLINK
_OP_UNLINK = Opcode.UNLINK
_OP_WRITE = Opcode.WRITE


class FuseRequest(msgspec.Struct, frozen=True, gc=False):
    """One encoded FUSE request, minus its 40-byte ``fuse_in_header``.

    A frozen msgspec Struct (creation ≈ 0.2 µs, immutable, no GC tracking). Not meant
    for the wire: ``payload`` may be a memoryview of caller memory.

    Fields:
        opcode: an :class:`~codec.fuse_abi.Opcode` value.
        nodeid: the header's node id (0 for INIT, DESTROY and BATCH_FORGET).
        args: the op's in-arguments, everything after the header, including
            NUL-terminated names. Always ``bytes``.
        payload: bulk data placed right after ``args`` in the same request, or None.
            Only WRITE (the data) and SETXATTR (the value) use it, so that the caller's
            buffer is never copied here; the device layer copies it once, into guest
            memory. A memoryview is always 1-D of unsigned bytes.
        reply_size: capacity in bytes the reply needs AFTER the 16-byte out header.
        expects_reply: False for FORGET and BATCH_FORGET (the daemon never answers;
            virtiofsd returns their buffers with used length 0).
    """

    opcode: int
    nodeid: int
    args: bytes
    payload: bytes | memoryview | None
    reply_size: int
    expects_reply: bool

    @property
    def payload_len(self) -> int:
        p = self.payload
        return 0 if p is None else len(p)

    @property
    def in_len(self) -> int:
        """``fuse_in_header.len``: header + args + payload, in bytes."""
        p = self.payload
        return IN_HEADER_SIZE + len(self.args) + (0 if p is None else len(p))

    @property
    def out_len(self) -> int:
        """Device-writable bytes to provide: out header + ``reply_size``."""
        return OUT_HEADER_SIZE + self.reply_size if self.expects_reply else 0


# --------------------------------------------------------------------------------------
# The in header
# --------------------------------------------------------------------------------------


def _check_header(total_len: int, unique: int) -> None:
    if unique == 0:
        # virtiofsd crashes on unique 0 (it is the notification id).
        raise ValueError("FUSE unique must be non-zero")
    if not 0 < unique < 1 << 63:
        # bit 63 is FUSE_UNIQUE_RESEND in 7.40+; never set it.
        raise ValueError(f"FUSE unique out of range: {unique}")
    if not IN_HEADER_SIZE <= total_len <= U32_MAX:
        raise ValueError(f"bad request length {total_len}")


def pack_in_header(
    buf: bytearray | memoryview,
    offset: int,
    total_len: int,
    opcode: int,
    unique: int,
    nodeid: int,
    uid: int,
    gid: int,
    pid: int,
) -> None:
    """Write a ``fuse_in_header`` into ``buf[offset:offset + 40]`` without copies.

    ``total_len`` is the whole request (``FuseRequest.in_len``). ``total_extlen`` is
    always 0: we negotiate no request extensions. Raises ValueError for ``unique`` 0 or
    with bit 63 set, for out-of-range fields and for a buffer too small.
    """
    _check_header(total_len, unique)
    if offset < 0:  # pack_into would count a negative offset from the end
        raise ValueError(f"negative buffer offset {offset}")
    try:
        IN_HEADER.pack_into(buf, offset, total_len, opcode, unique, nodeid, uid, gid, pid, 0, 0)
    except struct_error as exc:
        raise ValueError(f"cannot pack fuse_in_header: {exc}") from None


def in_header_bytes(
    total_len: int,
    opcode: int,
    unique: int,
    nodeid: int,
    uid: int = 0,
    gid: int = 0,
    pid: int = 0,
) -> bytes:
    """The 40-byte ``fuse_in_header`` as bytes (same checks as :func:`pack_in_header`)."""
    _check_header(total_len, unique)
    try:
        return IN_HEADER.pack(total_len, opcode, unique, nodeid, uid, gid, pid, 0, 0)
    except struct_error as exc:
        raise ValueError(f"cannot pack fuse_in_header: {exc}") from None


def request_bytes(req: FuseRequest, unique: int, uid: int = 0, gid: int = 0, pid: int = 0) -> bytes:
    """The complete request (header + args + payload) as one ``bytes``.

    Copies everything: for tests, logs and transports without scatter-gather. The hot
    path writes the pieces into guest memory instead.
    """
    header = in_header_bytes(req.in_len, req.opcode, unique, req.nodeid, uid, gid, pid)
    if req.payload is None:
        return header + req.args
    return b"".join((header, req.args, req.payload))


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _err(code: int, what: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: {what}")


def _nodeid(nodeid: int) -> int:
    if not 0 < nodeid <= U64_MAX:
        raise ValueError(f"invalid FUSE node id {nodeid!r}")
    return nodeid


def _u64(value: int, what: str) -> int:
    if not 0 <= value <= U64_MAX:
        raise ValueError(f"{what} out of range: {value!r}")
    return value


def _u32_arg(value: int, what: str) -> int:
    """A user-supplied 32-bit field (flags, mode, uid...): EINVAL when out of range."""
    if not 0 <= value <= U32_MAX:
        raise _err(errno.EINVAL, f"{what} out of range: {value!r}")
    return value


def _offset(value: int, what: str = "offset") -> int:
    if not 0 <= value <= OFF_MAX:
        raise _err(errno.EINVAL, f"{what} out of range: {value!r}")
    return value


def _size32(value: int, what: str = "size") -> int:
    if not 0 <= value <= U32_MAX:
        raise _err(errno.EINVAL, f"{what} out of range: {value!r}")
    return value


def _to_bytes(name: str | bytes | bytearray | memoryview, what: str) -> bytes:
    if isinstance(name, bytes):
        return name
    if isinstance(name, str):
        return os.fsencode(name)
    if isinstance(name, bytearray | memoryview):
        return bytes(name)
    raise TypeError(f"{what} must be str or bytes, not {type(name).__name__}")


def _name(name: str | bytes | bytearray | memoryview, *, dots_ok: bool = False) -> bytes:
    """Validate one path component and return it NUL-terminated."""
    n = _to_bytes(name, "name")
    if not n:
        raise _err(errno.EINVAL, "empty name")
    if len(n) > FUSE_NAME_MAX_REQUEST:
        raise _err(errno.ENAMETOOLONG, f"name longer than {FUSE_NAME_MAX_REQUEST} bytes")
    if b"/" in n or b"\0" in n:
        raise _err(errno.EINVAL, f"name must be one component without NUL: {n!r}")
    if not dots_ok and (n == b"." or n == b".."):
        raise _err(errno.EINVAL, f"{n!r} is not a valid name here")
    return n + b"\0"


def _xattr_name(name: str | bytes | bytearray | memoryview) -> bytes:
    """Validate an xattr name the way Linux does (ERANGE for empty or > 255 bytes)."""
    n = _to_bytes(name, "xattr name")
    if not n or len(n) > XATTR_NAME_MAX:
        raise _err(errno.ERANGE, f"xattr name must be 1..{XATTR_NAME_MAX} bytes")
    if b"\0" in n:
        raise _err(errno.EINVAL, "xattr name contains NUL")
    return n + b"\0"


def _payload(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    """Return ``data`` as bytes or a 1-D unsigned-byte memoryview, never copying."""
    if isinstance(data, bytes):
        return data
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise ValueError("payload buffer must be C-contiguous")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


def _time(t: tuple[int, int], what: str) -> tuple[int, int]:
    try:
        sec, nsec = t
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a (sec, nsec) tuple") from None
    if not -(1 << 63) <= sec < 1 << 63 or not 0 <= nsec < 1_000_000_000:
        raise _err(errno.EINVAL, f"{what} out of range: {t!r}")
    return sec, nsec


def _new(
    opcode: int,
    nodeid: int,
    args: bytes,
    reply_size: int,
    payload: bytes | memoryview | None = None,
    expects_reply: bool = True,
) -> FuseRequest:
    return FuseRequest(opcode, nodeid, args, payload, reply_size, expects_reply)


# --------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------


def init(max_readahead: int, flags: int = DEFAULT_INIT_FLAGS) -> FuseRequest:
    """FUSE_INIT asking for 7.38 with the given 64-bit ``flags``.

    With ``FUSE_INIT_EXT`` in ``flags`` the 64-byte 7.36 layout is sent (bits 32..63 go
    in ``flags2``); without it, the 16-byte layout, and bits above 31 are refused
    (ValueError) because the daemon could not see them. virtiofsd reads exactly the
    layout ``FUSE_INIT_EXT`` announces. Node id is 0, as Linux sends it.
    """
    _u32_arg(max_readahead, "max_readahead")
    if not 0 <= flags <= U64_MAX:
        raise ValueError(f"INIT flags out of range: {flags!r}")
    if flags & FUSE_INIT_EXT:
        args = INIT_IN_EXT.pack(
            FUSE_KERNEL_VERSION,
            FUSE_KERNEL_MINOR_VERSION,
            max_readahead,
            flags & U32_MAX,
            flags >> 32,
        )
    else:
        if flags >> 32:
            raise ValueError("INIT flags above bit 31 need FUSE_INIT_EXT")
        args = INIT_IN.pack(FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION, max_readahead, flags)
    return _new(_OP_INIT, 0, args, INIT_OUT_SIZE)


def destroy() -> FuseRequest:
    """FUSE_DESTROY: ends the session; the daemon answers with an empty reply."""
    return _new(_OP_DESTROY, 0, _EMPTY, 0)


# --------------------------------------------------------------------------------------
# Names and nodes
# --------------------------------------------------------------------------------------


def lookup(parent: int, name: str | bytes) -> FuseRequest:
    """FUSE_LOOKUP of ONE component in directory ``parent`` (``.``/``..`` allowed).

    A positive reply counts one lookup on the returned node (pay back with FORGET).
    """
    return FuseRequest(
        _OP_LOOKUP, _nodeid(parent), _name(name, dots_ok=True), None, ENTRY_OUT_SIZE, True
    )


def forget(nodeid: int, nlookup: int) -> FuseRequest:
    """FUSE_FORGET: drop ``nlookup`` lookup references. No reply ever comes."""
    if not 0 < nlookup <= U64_MAX:
        raise ValueError(f"nlookup out of range: {nlookup!r}")
    return _new(_OP_FORGET, _nodeid(nodeid), FORGET_IN.pack(nlookup), 0, expects_reply=False)


def batch_forget(items: Sequence[tuple[int, int]]) -> FuseRequest:
    """FUSE_BATCH_FORGET for ``(nodeid, nlookup)`` pairs (1..BATCH_FORGET_MAX of them).

    No reply ever comes. Callers with more pairs send several batches.
    """
    count = len(items)
    if not 0 < count <= BATCH_FORGET_MAX:
        raise ValueError(f"batch_forget needs 1..{BATCH_FORGET_MAX} items, got {count}")
    parts = [BATCH_FORGET_IN.pack(count, 0)]
    pack = FORGET_ONE.pack
    for nodeid, nlookup in items:
        if not 0 < nlookup <= U64_MAX:
            raise ValueError(f"nlookup out of range: {nlookup!r}")
        parts.append(pack(_nodeid(nodeid), nlookup))
    return _new(_OP_BATCH_FORGET, 0, b"".join(parts), 0, expects_reply=False)


def getattr(nodeid: int, fh: int | None = None) -> FuseRequest:
    """FUSE_GETATTR; with ``fh`` the daemon may fstat the open handle."""
    if fh is None:
        args = _GETATTR_NO_FH
    else:
        args = GETATTR_IN.pack(FUSE_GETATTR_FH, 0, _u64(fh, "fh"))
    return FuseRequest(_OP_GETATTR, _nodeid(nodeid), args, None, ATTR_OUT_SIZE, True)


def setattr(
    nodeid: int,
    *,
    fh: int | None = None,
    size: int | None = None,
    mode: int | None = None,
    uid: int | None = None,
    gid: int | None = None,
    atime: tuple[int, int] | None = None,
    mtime: tuple[int, int] | None = None,
    ctime: tuple[int, int] | None = None,
    atime_now: bool = False,
    mtime_now: bool = False,
) -> FuseRequest:
    """FUSE_SETATTR changing exactly the attributes given.

    Times are ``(sec, nsec)``; each time comes only from its own argument (mtime is
    never taken from ctime). ``atime_now``/``mtime_now`` set the time to the daemon's
    clock: they send ``FATTR_ATIME | FATTR_ATIME_NOW`` (resp. MTIME), as Linux does,
    because virtiofsd only looks at the *_NOW bits when ATIME/MTIME is set. ``mode``
    keeps its permission bits only (``& 0o7777``), like chmod(2). ``size`` beyond
    2**63-1 gives EFBIG; negative, EINVAL.
    """
    valid = 0
    fh_v = size_v = uid_v = gid_v = mode_v = 0
    at_s = at_ns = mt_s = mt_ns = ct_s = ct_ns = 0
    if fh is not None:
        valid |= FATTR_FH
        fh_v = _u64(fh, "fh")
    if size is not None:
        if size < 0:
            raise _err(errno.EINVAL, f"negative size {size}")
        if size > OFF_MAX:
            raise _err(errno.EFBIG, f"size too large: {size}")
        valid |= FATTR_SIZE
        size_v = size
    if mode is not None:
        valid |= FATTR_MODE
        mode_v = _u32_arg(mode, "mode") & 0o7777
    if uid is not None:
        valid |= FATTR_UID
        uid_v = _u32_arg(uid, "uid")
    if gid is not None:
        valid |= FATTR_GID
        gid_v = _u32_arg(gid, "gid")
    if atime is not None and atime_now:
        raise ValueError("give atime or atime_now, not both")
    if mtime is not None and mtime_now:
        raise ValueError("give mtime or mtime_now, not both")
    if atime is not None:
        valid |= FATTR_ATIME
        at_s, at_ns = _time(atime, "atime")
    elif atime_now:
        valid |= FATTR_ATIME | FATTR_ATIME_NOW
    if mtime is not None:
        valid |= FATTR_MTIME
        mt_s, mt_ns = _time(mtime, "mtime")
    elif mtime_now:
        valid |= FATTR_MTIME | FATTR_MTIME_NOW
    if ctime is not None:
        valid |= FATTR_CTIME
        ct_s, ct_ns = _time(ctime, "ctime")
    args = SETATTR_IN.pack(
        valid, 0, fh_v, size_v, 0, at_s, mt_s, ct_s, at_ns, mt_ns, ct_ns, mode_v, 0, uid_v, gid_v, 0
    )
    return _new(_OP_SETATTR, _nodeid(nodeid), args, ATTR_OUT_SIZE)


def readlink(nodeid: int) -> FuseRequest:
    """FUSE_READLINK; the reply is the target, at most 4095 bytes (one page of room)."""
    return _new(_OP_READLINK, _nodeid(nodeid), _EMPTY, READLINK_REPLY_SIZE)


def symlink(parent: int, name: str | bytes, target: str | bytes) -> FuseRequest:
    """FUSE_SYMLINK: create ``name`` in ``parent`` pointing at ``target``.

    Args are the new name then the target, both NUL-terminated (the order Linux sends).
    An empty target gives ENOENT, as symlink(2) does; NUL gives EINVAL; more than 4095
    bytes, ENAMETOOLONG.
    """
    t = _to_bytes(target, "symlink target")
    if not t:
        raise _err(errno.ENOENT, "empty symlink target")
    if len(t) > SYMLINK_MAX:
        raise _err(errno.ENAMETOOLONG, f"symlink target longer than {SYMLINK_MAX} bytes")
    if b"\0" in t:
        raise _err(errno.EINVAL, "symlink target contains NUL")
    return _new(_OP_SYMLINK, _nodeid(parent), _name(name) + t + b"\0", ENTRY_OUT_SIZE)


def _umask(umask: int) -> int:
    if not 0 <= umask <= 0o777:
        raise _err(errno.EINVAL, f"bad umask {umask!r}")
    return umask


_MKNOD_TYPES = frozenset(
    {0o100000, 0o020000, 0o060000, 0o010000, 0o140000}
)  # REG CHR BLK FIFO SOCK


def mknod(parent: int, name: str | bytes, mode: int, rdev: int, umask: int) -> FuseRequest:
    """FUSE_MKNOD. ``mode`` carries the file type (0 means regular, as in mknod(2)).

    Directories give EPERM and other types EINVAL, like Linux. ``rdev`` is the 32-bit
    ``new_encode_dev`` value (``os.makedev`` result for majors < 4096).
    """
    _u32_arg(mode, "mode")
    ftype = mode & S_IFMT
    if ftype == 0:
        ftype = 0o100000
    if ftype == 0o040000:
        raise _err(errno.EPERM, "mknod cannot create directories")
    if ftype not in _MKNOD_TYPES or mode > 0o177777:
        raise _err(errno.EINVAL, f"bad mknod mode {mode:#o}")
    args = MKNOD_IN.pack(ftype | (mode & 0o7777), _u32_arg(rdev, "rdev"), _umask(umask), 0) + _name(
        name
    )
    return _new(_OP_MKNOD, _nodeid(parent), args, ENTRY_OUT_SIZE)


def mkdir(parent: int, name: str | bytes, mode: int, umask: int) -> FuseRequest:
    """FUSE_MKDIR. Sends ``mode & 0o1777`` (rwx + sticky), as Linux's vfs_mkdir does."""
    args = MKDIR_IN.pack(_u32_arg(mode, "mode") & 0o1777, _umask(umask)) + _name(name)
    return _new(_OP_MKDIR, _nodeid(parent), args, ENTRY_OUT_SIZE)


def unlink(parent: int, name: str | bytes) -> FuseRequest:
    """FUSE_UNLINK of a non-directory ``name`` in ``parent``."""
    return _new(_OP_UNLINK, _nodeid(parent), _name(name), 0)


def rmdir(parent: int, name: str | bytes) -> FuseRequest:
    """FUSE_RMDIR of the (empty) directory ``name`` in ``parent``."""
    return _new(_OP_RMDIR, _nodeid(parent), _name(name), 0)


_RENAME_FLAGS = RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT


def rename(
    parent: int, name: str | bytes, newparent: int, newname: str | bytes, flags: int = 0
) -> FuseRequest:
    """FUSE_RENAME (``flags`` 0) or FUSE_RENAME2 (``RENAME_NOREPLACE``/``EXCHANGE``/...).

    Flag combinations Linux refuses (NOREPLACE with EXCHANGE, WHITEOUT with EXCHANGE,
    unknown bits) give EINVAL.
    """
    if flags & ~_RENAME_FLAGS or flags < 0:
        raise _err(errno.EINVAL, f"unknown rename flags {flags:#x}")
    if flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT):
        raise _err(errno.EINVAL, "RENAME_EXCHANGE cannot be combined")
    names = _name(name) + _name(newname)
    if flags == 0:
        return _new(_OP_RENAME, _nodeid(parent), RENAME_IN.pack(_nodeid(newparent)) + names, 0)
    args = RENAME2_IN.pack(_nodeid(newparent), flags, 0) + names
    return _new(_OP_RENAME2, _nodeid(parent), args, 0)


def link(oldnodeid: int, newparent: int, newname: str | bytes) -> FuseRequest:
    """FUSE_LINK: a new name ``newname`` in ``newparent`` for node ``oldnodeid``.

    The header's node id is the new parent; the reply is an entry for the linked node
    (one more lookup on it).
    """
    args = LINK_IN.pack(_nodeid(oldnodeid)) + _name(newname)
    return _new(_OP_LINK, _nodeid(newparent), args, ENTRY_OUT_SIZE)


def statfs(nodeid: int) -> FuseRequest:
    """FUSE_STATFS of the file system holding ``nodeid`` (usually the root)."""
    return _new(_OP_STATFS, _nodeid(nodeid), _EMPTY, STATFS_OUT_SIZE)


def access(nodeid: int, mask: int) -> FuseRequest:
    """FUSE_ACCESS with ``os.F_OK`` or a combination of ``R_OK|W_OK|X_OK``."""
    if not 0 <= mask <= 7:
        raise _err(errno.EINVAL, f"bad access mask {mask!r}")
    return _new(_OP_ACCESS, _nodeid(nodeid), ACCESS_IN.pack(mask, 0), 0)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------

_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY


def open(nodeid: int, flags: int) -> FuseRequest:
    """FUSE_OPEN with open(2) ``flags``; O_CREAT, O_EXCL and O_NOCTTY are dropped, as
    Linux does (creation is :func:`create`). O_TRUNC is sent as given: only correct when
    ``FUSE_ATOMIC_O_TRUNC`` was granted (else strip it and SETATTR size=0).
    """
    return _new(
        _OP_OPEN,
        _nodeid(nodeid),
        OPEN_IN.pack(_u32_arg(flags, "flags") & ~_OPEN_STRIP, 0),
        OPEN_OUT_SIZE,
    )


def create(parent: int, name: str | bytes, flags: int, mode: int, umask: int) -> FuseRequest:
    """FUSE_CREATE: atomically create and open ``name`` in ``parent``.

    ``flags`` always gets O_CREAT (O_NOCTTY dropped); ``mode`` is sent as
    ``S_IFREG | (mode & 0o7777)`` (a file type other than regular is EINVAL). The reply
    is an entry (one lookup) plus an open handle.
    """
    _u32_arg(flags, "flags")
    _u32_arg(mode, "mode")
    if mode & S_IFMT not in (0, 0o100000) or mode > 0o177777:
        raise _err(errno.EINVAL, f"bad create mode {mode:#o}")
    f = (flags | os.O_CREAT) & ~os.O_NOCTTY
    args = CREATE_IN.pack(f, 0o100000 | (mode & 0o7777), _umask(umask), 0) + _name(name)
    return _new(_OP_CREATE, _nodeid(parent), args, CREATE_OUT_SIZE)


def read(nodeid: int, fh: int, offset: int, size: int, flags: int = 0) -> FuseRequest:
    """FUSE_READ of up to ``size`` bytes at ``offset``; ``flags`` are the open flags.

    The caller keeps ``size`` within the negotiated ``max_read``/``max_pages``.
    """
    if not (
        0 < nodeid <= U64_MAX
        and 0 <= fh <= U64_MAX
        and 0 <= offset <= OFF_MAX
        and 0 <= size <= U32_MAX
        and 0 <= flags <= U32_MAX
    ):
        # Slow path, only to report which argument is wrong.
        _nodeid(nodeid)
        _u64(fh, "fh")
        _offset(offset)
        _size32(size)
        _u32_arg(flags, "flags")
    return FuseRequest(
        _OP_READ, nodeid, READ_IN.pack(fh, offset, size, 0, 0, flags, 0), None, size, True
    )


def write(
    nodeid: int,
    fh: int,
    offset: int,
    data: bytes | bytearray | memoryview,
    flags: int = 0,
    *,
    write_flags: int = 0,
) -> FuseRequest:
    """FUSE_WRITE of ``data`` at ``offset``. ``data`` becomes ``payload`` uncopied.

    The caller keeps ``len(data)`` within the negotiated ``max_write`` (virtiofsd dies
    on a request over 1 MiB + 4 KiB). ``write_flags`` takes ``FUSE_WRITE_*`` bits.
    Writing past 2**63-1 gives EFBIG.
    """
    payload = _payload(data)
    n = len(payload)
    if not (
        0 < nodeid <= U64_MAX
        and 0 <= fh <= U64_MAX
        and 0 <= offset
        and offset + n <= OFF_MAX
        and n <= U32_MAX
        and 0 <= flags <= U32_MAX
        and 0 <= write_flags <= U32_MAX
    ):
        # Slow path, only to report which argument is wrong.
        _offset(offset)
        if n > U32_MAX:
            raise _err(errno.EINVAL, f"write too large: {n}")
        if offset + n > OFF_MAX:
            raise _err(errno.EFBIG, "write beyond the largest file offset")
        _nodeid(nodeid)
        _u64(fh, "fh")
        _u32_arg(flags, "flags")
        _u32_arg(write_flags, "write_flags")
    args = WRITE_IN.pack(fh, offset, n, write_flags, 0, flags, 0)
    return FuseRequest(_OP_WRITE, nodeid, args, payload, WRITE_OUT_SIZE, True)


def release(nodeid: int, fh: int, flags: int, flush: bool = False) -> FuseRequest:
    """FUSE_RELEASE of a file handle (``flags`` = its open flags); send exactly once.

    ``flush`` sets FUSE_RELEASE_FLUSH (the daemon flushes before closing).
    """
    args = RELEASE_IN.pack(
        _u64(fh, "fh"), _u32_arg(flags, "flags"), FUSE_RELEASE_FLUSH if flush else 0, 0
    )
    return _new(_OP_RELEASE, _nodeid(nodeid), args, 0)


def releasedir(nodeid: int, fh: int) -> FuseRequest:
    """FUSE_RELEASEDIR of a directory handle (never RELEASE for directories)."""
    return _new(_OP_RELEASEDIR, _nodeid(nodeid), RELEASE_IN.pack(_u64(fh, "fh"), 0, 0, 0), 0)


def fsync(nodeid: int, fh: int, datasync: bool) -> FuseRequest:
    """FUSE_FSYNC; ``datasync`` selects fdatasync semantics."""
    args = FSYNC_IN.pack(_u64(fh, "fh"), FUSE_FSYNC_FDATASYNC if datasync else 0, 0)
    return _new(_OP_FSYNC, _nodeid(nodeid), args, 0)


def fsyncdir(nodeid: int, fh: int, datasync: bool) -> FuseRequest:
    """FUSE_FSYNCDIR on a directory handle."""
    args = FSYNC_IN.pack(_u64(fh, "fh"), FUSE_FSYNC_FDATASYNC if datasync else 0, 0)
    return _new(_OP_FSYNCDIR, _nodeid(nodeid), args, 0)


def flush(nodeid: int, fh: int, lock_owner: int = 0) -> FuseRequest:
    """FUSE_FLUSH (sent on each close(2) of a descriptor in Linux)."""
    args = FLUSH_IN.pack(_u64(fh, "fh"), 0, 0, _u64(lock_owner, "lock_owner"))
    return _new(_OP_FLUSH, _nodeid(nodeid), args, 0)


def poll(nodeid: int, fh: int, events: int, kh: int = 0, flags: int = 0) -> FuseRequest:
    """FUSE_POLL for ``events`` (``select.POLL*`` bits)."""
    args = POLL_IN.pack(
        _u64(fh, "fh"), _u64(kh, "kh"), _u32_arg(flags, "flags"), _u32_arg(events, "events")
    )
    return _new(_OP_POLL, _nodeid(nodeid), args, POLL_OUT_SIZE)


def fallocate(nodeid: int, fh: int, offset: int, length: int, mode: int) -> FuseRequest:
    """FUSE_FALLOCATE (``mode`` = ``FALLOC_FL_*`` bits).

    As in Linux: negative offset or length <= 0 is EINVAL, an end past 2**63-1 EFBIG.
    """
    _offset(offset)
    if length <= 0:
        raise _err(errno.EINVAL, f"bad fallocate length {length}")
    if offset + length > OFF_MAX:
        raise _err(errno.EFBIG, "fallocate beyond the largest file offset")
    args = FALLOCATE_IN.pack(_u64(fh, "fh"), offset, length, _u32_arg(mode, "mode"), 0)
    return _new(_OP_FALLOCATE, _nodeid(nodeid), args, 0)


_LSEEK_WHENCE = frozenset({os.SEEK_SET, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE})


def lseek(nodeid: int, fh: int, offset: int, whence: int) -> FuseRequest:
    """FUSE_LSEEK: SEEK_DATA / SEEK_HOLE (what Linux sends), also SEEK_SET / SEEK_END.

    SEEK_CUR is EINVAL: the daemon's descriptor position is not ours. The offset must be
    non-negative except with SEEK_END.
    """
    if whence not in _LSEEK_WHENCE:
        raise _err(errno.EINVAL, f"unsupported whence {whence!r}")
    if whence == os.SEEK_END:
        if not -OFF_MAX - 1 <= offset <= OFF_MAX:
            raise _err(errno.EINVAL, f"offset out of range: {offset!r}")
    else:
        _offset(offset)
    args = LSEEK_IN.pack(_u64(fh, "fh"), offset, whence, 0)
    return _new(_OP_LSEEK, _nodeid(nodeid), args, LSEEK_OUT_SIZE)


# --------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------


def opendir(nodeid: int, flags: int = 0) -> FuseRequest:
    """FUSE_OPENDIR; the reply's ``fh`` goes to READDIR(PLUS) and RELEASEDIR."""
    return _new(
        _OP_OPENDIR,
        _nodeid(nodeid),
        OPEN_IN.pack(_u32_arg(flags, "flags") & ~_OPEN_STRIP, 0),
        OPEN_OUT_SIZE,
    )


def _readdir(op: int, nodeid: int, fh: int, offset: int, size: int, minimum: int) -> FuseRequest:
    # ``offset`` is the daemon's opaque cookie (0 to start): any u64 is legal.
    if not 0 <= offset <= U64_MAX:
        raise _err(errno.EINVAL, f"directory offset out of range: {offset!r}")
    if not minimum <= size <= U32_MAX:
        # A buffer that cannot hold one maximal record may come back empty, which reads
        # as end-of-directory and would silently truncate the listing.
        raise _err(errno.EINVAL, f"directory buffer must be {minimum}..{U32_MAX} bytes")
    args = READ_IN.pack(_u64(fh, "fh"), offset, size, 0, 0, 0, 0)
    return _new(op, _nodeid(nodeid), args, size)


def readdir(nodeid: int, fh: int, offset: int, size: int) -> FuseRequest:
    """FUSE_READDIR: up to ``size`` bytes of ``fuse_dirent`` records from ``offset``.

    ``size`` must be at least DIRENT_RECORD_MAX (280); 4096 or more is sensible.
    """
    return _readdir(_OP_READDIR, nodeid, fh, offset, size, DIRENT_RECORD_MAX)


def readdirplus(nodeid: int, fh: int, offset: int, size: int) -> FuseRequest:
    """FUSE_READDIRPLUS (only when FUSE_DO_READDIRPLUS was granted).

    Every returned entry with a non-zero node id counts one lookup: keep or FORGET it.
    ``size`` must be at least DIRENTPLUS_RECORD_MAX (408).
    """
    return _readdir(_OP_READDIRPLUS, nodeid, fh, offset, size, DIRENTPLUS_RECORD_MAX)


# --------------------------------------------------------------------------------------
# Extended attributes
# --------------------------------------------------------------------------------------


def setxattr(
    nodeid: int,
    name: str | bytes,
    value: bytes | bytearray | memoryview,
    flags: int,
    *,
    ext: bool = False,
    setxattr_flags: int = 0,
) -> FuseRequest:
    """FUSE_SETXATTR; ``value`` becomes ``payload`` uncopied.

    ``flags`` is 0, XATTR_CREATE or XATTR_REPLACE (other bits: EINVAL). A value over
    65536 bytes is E2BIG, as in Linux. ``ext=True`` selects the 16-byte 7.33 argument
    layout, which is REQUIRED if and only if the INIT reply granted FUSE_SETXATTR_EXT;
    ``setxattr_flags`` (FUSE_SETXATTR_ACL_KILL_SGID) needs it.
    """
    if flags & ~(XATTR_CREATE | XATTR_REPLACE) or flags < 0:
        raise _err(errno.EINVAL, f"bad setxattr flags {flags!r}")
    n = _xattr_name(name)
    payload = _payload(value)
    size = len(payload)
    if size > XATTR_SIZE_MAX:
        raise _err(errno.E2BIG, f"xattr value larger than {XATTR_SIZE_MAX} bytes")
    if ext:
        head = SETXATTR_IN_EXT.pack(size, flags, _u32_arg(setxattr_flags, "setxattr_flags"), 0)
    else:
        if setxattr_flags:
            raise ValueError("setxattr_flags need the FUSE_SETXATTR_EXT layout (ext=True)")
        head = SETXATTR_IN.pack(size, flags)
    return _new(_OP_SETXATTR, _nodeid(nodeid), head + n, 0, payload)


def getxattr(nodeid: int, name: str | bytes, size: int) -> FuseRequest:
    """FUSE_GETXATTR. ``size`` 0 asks for the value's size (reply: fuse_getxattr_out);
    otherwise the reply is the value, at most ``size`` bytes (ERANGE if it does not
    fit). ``size`` above 65536 is clamped to it, as Linux does.
    """
    if size < 0:
        raise _err(errno.EINVAL, f"negative size {size}")
    size = min(size, XATTR_SIZE_MAX)
    args = GETXATTR_IN.pack(size, 0) + _xattr_name(name)
    return _new(_OP_GETXATTR, _nodeid(nodeid), args, size or GETXATTR_OUT_SIZE)


def listxattr(nodeid: int, size: int) -> FuseRequest:
    """FUSE_LISTXATTR; ``size`` semantics as in :func:`getxattr` (clamped to 65536)."""
    if size < 0:
        raise _err(errno.EINVAL, f"negative size {size}")
    size = min(size, XATTR_LIST_MAX)
    return _new(
        _OP_LISTXATTR, _nodeid(nodeid), GETXATTR_IN.pack(size, 0), size or GETXATTR_OUT_SIZE
    )


def removexattr(nodeid: int, name: str | bytes) -> FuseRequest:
    """FUSE_REMOVEXATTR."""
    return _new(_OP_REMOVEXATTR, _nodeid(nodeid), _xattr_name(name), 0)
