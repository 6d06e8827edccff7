"""The ZeroMQ wire format between remote clients and a share server. Pure: bytes in, typed
values out.

Every message is a multipart ZeroMQ message:

* request: ``[RequestHeader, *data]`` — ``op`` is one of the actor messages of
  :mod:`pyvirtiofs.actors.messages` that a remote client may send (a tagged union: the
  message's class name is its tag), ``handle`` names an open file or directory for handle
  operations. A ``Write`` carries its bytes in one data frame (``Write.data`` stays None in
  the header), so bulk data is never copied into msgpack.
* reply: ``[ReplyHeader, *data]`` — ``value`` is the op's result, msgpack-encoded and
  decoded by the client with the type :func:`result_type` gives for that op; a ``Read``
  answers with its bytes in one data frame.

Everything a peer sends is validated on receipt, before anything acts on it: the schema
(every field of the declared type: msgspec refuses a ``bool`` for an ``int`` and a ``str``
for ``bytes``), nesting (too deep is ``EINVAL``, never a ``RecursionError``), sizes, frame
counts, and the range of every number — offsets and sizes as Linux checks them (beyond
2⁶³−1, negative, or overflowing with the length: ``EINVAL``; ``fallocate`` past the largest
file size: ``EFBIG``), ids and modes 32-bit, times ``"now"`` or (seconds, nanoseconds). A
bad message raises :class:`WireFormatError` (with the errno to answer), which the server
turns into an error reply: no handler ever sees an untyped or out-of-range value.
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Callable
from typing import Any, Union

import msgspec

from pyvirtiofs.actors import messages as m
from pyvirtiofs.codec.fuse_types import Attr, Dirent, DirentPlus, StatfsOut

__all__ = [
    "HANDLE_OPS",
    "MAX_DATA_BYTES",
    "MAX_HEADER_BYTES",
    "SESSION_OPS",
    "Bye",
    "Ping",
    "RemoteHandle",
    "ReplyHeader",
    "RequestHeader",
    "WireError",
    "WireFormatError",
    "decode_reply",
    "decode_request",
    "decode_value",
    "encode_reply",
    "encode_request",
    "result_type",
]

MAX_HEADER_BYTES = 1 << 20  # names, paths and xattr values travel in the header
MAX_DATA_BYTES = 64 << 20  # one Read or Write; bigger transfers are split by the client
MAX_FRAME_BYTES = MAX_DATA_BYTES + MAX_HEADER_BYTES  # ZeroMQ refuses bigger frames outright
OFF_MAX = (1 << 63) - 1  # Linux's loff_t: the largest offset and file size
U32_MAX = (1 << 32) - 1
NGROUPS_MAX = 65536


class WireFormatError(ValueError):
    """A peer sent something that is not a valid message. ``errno`` says how to answer."""

    def __init__(self, message: str, code: int = errno_mod.EINVAL) -> None:
        super().__init__(message)
        self.errno = code


class Ping(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Heartbeat: keeps a client's handles alive on the server. Reply: None."""

    ctx: m.Credentials | None = None


class Bye(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The client is leaving: release all its handles now. Reply: None."""

    ctx: m.Credentials | None = None


SESSION_OPS: tuple[type, ...] = (
    m.Stat, m.Access, m.ReadLink, m.MakeDir, m.MakeNode, m.Unlink, m.RemoveDir, m.Rename,
    m.Link, m.Symlink, m.SetAttr, m.StatFs, m.GetXattr, m.SetXattr, m.ListXattr,
    m.RemoveXattr, m.Open, m.OpenDir, m.ListMounts, m.SessionStats,
)
"""Messages a remote client may send to the session (never the internal ones such as
Forgotten or LearnEntries: those would let a client corrupt the session's books)."""

HANDLE_OPS: tuple[type, ...] = (
    m.Read, m.Write, m.Seek, m.FStat, m.FSync, m.Flush, m.FTruncate, m.FAllocate, m.Poll,
    m.Close, m.ReadDir, m.Rewind, m.FSyncDir,
)
CONTROL_OPS: tuple[type, ...] = (Ping, Bye)

RequestOp = Union[*SESSION_OPS, *HANDLE_OPS, *CONTROL_OPS]


class RequestHeader(msgspec.Struct, frozen=True, array_like=True):
    """First frame of a request. ``id`` matches the reply; ``handle`` is 0 for session ops."""

    id: int
    op: RequestOp  # type: ignore[valid-type]
    handle: int = 0


class WireError(msgspec.Struct, frozen=True, array_like=True):
    """An OSError, as it travels back to the client."""

    errno: int
    strerror: str
    filename: bytes | None = None
    filename2: bytes | None = None


_NIL = msgspec.Raw(b"\xc0")  # msgpack nil


class ReplyHeader(msgspec.Struct, frozen=True, array_like=True):
    """First frame of a reply; ``value`` is decoded by the client with the op's type."""

    id: int
    error: WireError | None = None
    value: msgspec.Raw = _NIL


class RemoteHandle(msgspec.Struct, frozen=True):
    """The reply to Open/OpenDir: an opaque, unguessable, per-connection handle id."""

    handle: int
    nodeid: int
    flags: int = 0
    attr: Attr | None = None


_RESULT_TYPES: dict[type, Any] = {
    m.Stat: Attr, m.Access: None, m.ReadLink: bytes, m.MakeDir: Attr, m.MakeNode: Attr,
    m.Unlink: None, m.RemoveDir: None, m.Rename: None, m.Link: Attr, m.Symlink: Attr,
    m.SetAttr: Attr, m.StatFs: StatfsOut, m.GetXattr: bytes, m.SetXattr: None,
    m.ListXattr: list[bytes], m.RemoveXattr: None, m.Open: RemoteHandle,
    m.OpenDir: RemoteHandle, m.ListMounts: dict[str, int], m.SessionStats: dict[str, Any],
    m.Read: None, m.Write: int, m.Seek: int, m.FStat: Attr, m.FSync: None, m.Flush: None,
    m.FTruncate: None, m.FAllocate: None, m.Poll: int, m.Close: None, m.Rewind: None,
    m.FSyncDir: None, Ping: None, Bye: None,
}


def result_type(op: Any) -> Any:
    """The type of the reply value for request ``op``."""
    if isinstance(op, m.ReadDir):
        return list[DirentPlus] if op.plus else list[Dirent]
    return _RESULT_TYPES[type(op)]


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(RequestHeader)
_reply_decoder = msgspec.msgpack.Decoder(ReplyHeader)
_value_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def encode_request(request_id: int, op: Any, handle: int = 0) -> bytes:
    return _encoder.encode(RequestHeader(request_id, op, handle))


def _check_frames(frames: list[Any], *, data_frames: int) -> None:
    if len(frames) != 1 + data_frames:
        raise WireFormatError(f"expected {1 + data_frames} frame(s), got {len(frames)}")
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise WireFormatError("header frame too large", errno_mod.EMSGSIZE)
    for frame in frames[1:]:
        if len(frame) > MAX_DATA_BYTES:
            raise WireFormatError("data frame too large", errno_mod.EMSGSIZE)


def decode_request(frames: list[Any]) -> RequestHeader:
    """Validate and decode a request; ``frames`` are bytes-like. Raises WireFormatError."""
    if not frames:
        raise WireFormatError("empty message")
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise WireFormatError("header frame too large", errno_mod.EMSGSIZE)
    try:
        header = _request_decoder.decode(frames[0])
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise WireFormatError(f"malformed request: {exc}") from None
    except RecursionError:
        raise WireFormatError("malformed request: nested too deeply") from None
    if not 0 <= header.id <= OFF_MAX or not 0 <= header.handle <= OFF_MAX:
        raise WireFormatError("request id or handle out of range")
    op = header.op
    check_op(op)
    if isinstance(op, m.Write):
        if op.data is not None:
            raise WireFormatError("Write data must travel in a data frame")
        _check_frames(frames, data_frames=1)
    else:
        _check_frames(frames, data_frames=0)
    if isinstance(op, HANDLE_OPS) and header.handle <= 0:
        raise WireFormatError("handle operation without a handle", errno_mod.EBADF)
    if isinstance(op, m.Write):
        _check_span(op.offset, len(frames[1]))
    return header


# -- value checks: what a kernel would refuse before doing anything -------------------------


def _int(value: Any, lo: int, hi: int, what: str, code: int = errno_mod.EINVAL) -> None:
    if value is not None and not lo <= value <= hi:
        raise WireFormatError(f"{what} out of range", code)


def _check_span(offset: int | None, length: int) -> None:
    """An explicit file offset and a length, as ``rw_verify_area`` checks them."""
    if offset is not None and not (0 <= offset <= OFF_MAX and offset + length <= OFF_MAX):
        raise WireFormatError("file offset out of range")


def _check_time(value: Any, what: str) -> None:
    if value is None or value == "now":
        return
    if isinstance(value, str):
        raise WireFormatError(f"{what} must be \"now\" or (seconds, nanoseconds)")
    seconds, nanoseconds = value
    _int(seconds, -(1 << 63), OFF_MAX, what)
    _int(nanoseconds, 0, 999_999_999, what)


def _check_owner(value: int | None, what: str) -> None:
    if value is not None and value != -1:
        _int(value, 0, U32_MAX - 1, what)


_FALLOC_MODES = 0x7F  # KEEP_SIZE PUNCH_HOLE NO_HIDE_STALE COLLAPSE ZERO INSERT UNSHARE


def _check_fallocate(op: m.FAllocate) -> None:
    if op.mode & ~_FALLOC_MODES:
        raise WireFormatError("unsupported fallocate mode", errno_mod.EOPNOTSUPP)
    if op.offset < 0 or op.length <= 0:
        raise WireFormatError("fallocate offset or length out of range")
    if op.offset + op.length > OFF_MAX:
        raise WireFormatError("fallocate beyond the largest file size", errno_mod.EFBIG)


def _check_read(op: m.Read) -> None:
    _int(op.size, 0, MAX_DATA_BYTES, "read size")
    _check_span(op.offset, op.size)


_CHECKS: dict[type, Callable[[Any], None]] = {
    m.Read: _check_read,
    m.Write: lambda op: _int(op.offset, 0, OFF_MAX, "file offset"),
    m.Seek: lambda op: (_int(op.offset, -(1 << 63), OFF_MAX, "seek offset"),
                        _int(op.whence, 0, 4, "whence")),
    m.FTruncate: lambda op: _int(op.size, 0, OFF_MAX, "file size"),
    m.FAllocate: _check_fallocate,
    m.Poll: lambda op: _int(op.events, 0, U32_MAX, "poll events"),
    m.Access: lambda op: _int(op.mode, 0, 7, "access mode"),
    m.SetXattr: lambda op: _int(op.flags, 0, 3, "xattr flags"),
    m.SetAttr: lambda op: (_int(op.size, 0, OFF_MAX, "file size"),
                           _check_owner(op.uid, "uid"), _check_owner(op.gid, "gid"),
                           _check_time(op.atime, "atime"), _check_time(op.mtime, "mtime")),
}
_U32_FIELDS = ("mode", "umask", "rdev", "flags")  # 32 bits in every FUSE request


def check_op(op: Any) -> None:
    """Range checks of one decoded message (its types were checked by the decoder).
    Raises :class:`WireFormatError`."""
    ctx = op.ctx
    if ctx is not None:
        for value in ctx:
            _int(value, 0, U32_MAX, "credentials")
    groups = getattr(op, "groups", None)
    if groups is not None:
        if len(groups) > NGROUPS_MAX:
            raise WireFormatError("too many supplementary groups")
        for value in groups:
            _int(value, 0, U32_MAX, "supplementary group")
    for name in _U32_FIELDS:
        value = getattr(op, name, None)
        if type(value) is int:  # (SetAttr.mode may be None; Access.mode is checked below)
            _int(value, 0, U32_MAX, name)
    check = _CHECKS.get(type(op))
    if check is not None:
        check(op)


def encode_reply(request_id: int, value: Any = None, error: WireError | None = None) -> bytes:
    raw = _NIL if value is None else msgspec.Raw(_encoder.encode(value))
    return _encoder.encode(ReplyHeader(request_id, error, raw))


def decode_reply(frame: Any) -> ReplyHeader:
    try:
        return _reply_decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise WireFormatError(f"malformed reply: {exc}", errno_mod.EPROTO) from None


def decode_value(op: Any, raw: msgspec.Raw) -> Any:
    """Decode a reply's value with the type the op promises."""
    typ = result_type(op)
    if typ is None:
        return None
    decoder = _value_decoders.get(typ)
    if decoder is None:
        decoder = _value_decoders[typ] = msgspec.msgpack.Decoder(typ)
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise WireFormatError(f"malformed reply value: {exc}", errno_mod.EPROTO) from None


_CLOSE_TAG = b"\xa5Close"  # msgpack of the tag "Close", as a Close request header holds it


def looks_like_close(frames: list[Any]) -> bool:
    """Whether a request not yet decoded looks like a Close (cheaply, before the rate
    check: a Close is never refused for the rate, so a client over its rate can still
    release what it holds)."""
    return bool(frames) and len(frames[0]) < 64 and _CLOSE_TAG in bytes(frames[0])


def peek_request_id(frames: list[Any]) -> int:
    """The request id of a request that is refused or malformed, if its header still has
    one (else 0), so the error reply can be matched."""
    if not frames:
        return 0
    try:
        head = msgspec.msgpack.decode(frames[0])
    except Exception:  # any garbage: msgspec raises several kinds (RecursionError too)
        return 0
    if isinstance(head, list) and head and type(head[0]) is int:  # a bool is no id
        return head[0] if 0 <= head[0] < 1 << 63 else 0
    return 0
