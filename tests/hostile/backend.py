"""A test-only vhost-user backend: the daemon's side of the socket, with fault injection.

NEVER shipped as a device: it lives under tests/ and exists to attack the client. It plays
the part virtiofsd plays for our frontend (hw/vhost_user.py, hw/transport.py):

* it listens on a Unix socket in a private temporary directory and accepts one frontend;
* it speaks the handshake our frontend uses — GET_FEATURES (VERSION_1 | PROTOCOL_FEATURES,
  optionally EVENT_IDX and INDIRECT_DESC), GET/SET_PROTOCOL_FEATURES (MQ, REPLY_ACK,
  CONFIGURE_MEM_SLOTS), GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, SET_OWNER, SET_FEATURES,
  SET_MEM_TABLE (each region's memfd is mmapped; descriptor addresses are translated as
  guest-physical via ``guest_phys_addr``, ring addresses as the frontend's virtual ones via
  ``userspace_addr``), SET_VRING_NUM/BASE/ADDR/KICK/CALL/ENABLE and GET_VRING_BASE —
  and acks with REPLY_ACK whenever ``need_reply`` is set on a message with no reply;
* it pops descriptor chains from the avail rings (direct or indirect), parses each FUSE
  request (:class:`FuseIn`), asks a *responder* for the reply (by default
  :class:`TreeResponder`, a correct minimal FUSE server for a tiny in-memory tree), lets
  every registered *fault* rewrite the :class:`Plan` (reply bytes, used length, head id,
  extra or missing used entries, used.idx skew, eventfd storm, socket close, …), then
  carries the plan out: reply bytes into the device-writable buffers, used entries, call.

Threading and bounds. One thread does everything (socket, rings, memory, eventfds); the
test thread steers it through thread-safe methods that post commands to it. The loop
polls with a timeout, every pass does bounded work (at most ``num`` chains per ring per
pass, at most ``num`` descriptors per chain, a fixed number of re-check passes), and the
thread ends by itself after ``max_lifetime`` seconds whatever happens. :meth:`stop` joins
it and raises if it did not end; every fd the backend opened or received is closed.

Notifications. With EVENT_IDX negotiated the backend publishes ``avail_event`` after each
pass (so the frontend knows when to kick) and signals the call eventfd only when
``used_event`` asks for it (``vring_need_event``), as virtiofsd does — this exercises the
frontend's re-arm logic. ``always_signal=True`` signals after every completion instead.
Without EVENT_IDX it honours ``VRING_AVAIL_F_NO_INTERRUPT``. Faults may force a signal.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pyvirtiofs.actors.doorbell import Doorbell
from pyvirtiofs.codec.fuse_abi import (
    ATTR_OUT,
    BATCH_FORGET_IN,
    CREATE_IN,
    DIRENT,
    ENTRY_OUT,
    FORGET_IN,
    FORGET_ONE,
    FUSE_ASYNC_READ,
    FUSE_ATOMIC_O_TRUNC,
    FUSE_BIG_WRITES,
    FUSE_DO_READDIRPLUS,
    FUSE_EXPORT_SUPPORT,
    FUSE_INIT_EXT,
    FUSE_MAX_PAGES,
    FUSE_PARALLEL_DIROPS,
    IN_HEADER,
    INIT_IN,
    INIT_OUT,
    MKDIR_IN,
    OPEN_OUT,
    OUT_HEADER,
    READ_IN,
    STATFS_OUT,
    WRITE_IN,
    WRITE_OUT,
    Opcode,
)

__all__ = [
    "Armed",
    "FuseIn",
    "HandshakeFault",
    "Plan",
    "TreeResponder",
    "VhostUserBackend",
    "dirent_bytes",
    "reply_bytes",
]

# -- vhost-user (QEMU docs/interop/vhost-user.rst), kept independent of hw/ on purpose ----
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
SET_MEM_TABLE = 5
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_MAX_MEM_SLOTS = 36
#: Pseudo request number for :class:`HandshakeFault`: act right after accept().
ON_ACCEPT = 0

_WITH_REPLY = frozenset({GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
                         GET_MAX_MEM_SLOTS, GET_VRING_BASE})

F_NOTIFY_ON_EMPTY = 1 << 24
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32
PF_MQ = 1 << 0
PF_REPLY_ACK = 1 << 3
PF_CONFIGURE_MEM_SLOTS = 1 << 15

_VERSION = 0x1
_REPLY = 0x4
_NEED_REPLY = 0x8
_HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_MAX_MESSAGE = 1 << 16

# -- split virtqueue ------------------------------------------------------------------------
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
_MAX_REQUEST = 4 << 20  # bytes of device-readable data we are willing to gather
_SNAPSHOT_MAX = 1 << 16  # FuseIn.initial is kept for reply buffers up to this size

# -- FUSE ----------------------------------------------------------------------------------
_NSEC = 1_000_000_000
_T0 = 1_700_000_000
DT_DIR = stat.S_IFDIR >> 12
DT_REG = stat.S_IFREG >> 12


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's ``vring_need_event`` (u16 arithmetic)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class _Bad(Exception):
    """The frontend broke the protocol (a client bug the tests must see)."""


# ------------------------------------------------------------------------------------------
# What a test sees and steers
# ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class FuseIn:
    """One FUSE request as the backend received it."""

    queue: int
    head: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: bytes  # everything after the 40-byte in header (args, then payload)
    capacity: int  # total bytes of the chain's device-writable buffers
    writable: list[tuple[Any, int, int]] = field(repr=False, default_factory=list)
    initial: bytes = field(repr=False, default=b"")  # writable bytes before any reply

    @property
    def name(self) -> bytes:
        """The NUL-terminated name at the start of ``body`` (LOOKUP), without the NUL."""
        return self.body.split(b"\0", 1)[0]

    @property
    def op(self) -> str:
        try:
            return Opcode(self.opcode).name
        except ValueError:
            return str(self.opcode)


@dataclass(slots=True)
class Plan:
    """What the backend will do for one chain; faults rewrite it.

    ``reply`` is written into the chain's device-writable buffers (clipped to their
    capacity; None writes nothing). Then the used entries ``before``, the chain's own
    ``(head, used_len)`` (unless ``post`` is False) and ``after`` are posted, used.idx is
    moved by ``idx_skew`` more, and the call eventfd is signalled as the notification
    rules say (or always, with ``force_signal``).
    """

    request: FuseIn
    reply: bytes | None
    used_len: int
    head: int
    original: bytes | None = None  # the responder's reply, before any fault
    post: bool = True
    hold: bool = False  # keep the chain: carried out on release_held()
    before: list[tuple[int, int]] = field(default_factory=list)
    after: list[tuple[int, int]] = field(default_factory=list)
    idx_skew: int = 0
    early: list[tuple[int, int]] = field(default_factory=list)  # posted at once, even if held
    spill: bytes = b""  # written right after the chain's last writable buffer
    force_signal: bool = False
    storm: float = 0.0  # seconds of call-eventfd writes with no completions, from now on
    close: bool = False  # close the vhost-user socket instead of answering
    unsolicited: bytes = b""  # bytes written on the vhost-user socket, unasked

    def set_reply(self, data: bytes, used_len: int | None = None) -> None:
        """Replace the reply bytes (and used length: ``len(data)`` unless given)."""
        self.reply = data
        self.used_len = len(data) if used_len is None else used_len


@dataclass(slots=True)
class HandshakeFault:
    """Misbehave when the frontend sends vhost-user message ``request``.

    Actions: ``close`` (drop the connection), ``ignore`` (never answer), ``wrong-reply``
    (answer with another message type), ``short-reply`` (a 4-byte payload where 8 are
    due), ``oversized-reply`` (announce a 1 MiB payload), ``nack`` (REPLY_ACK status 1),
    ``no-version-1`` (GET_FEATURES without VIRTIO_F_VERSION_1), ``one-queue``
    (GET_QUEUE_NUM says 1). ``request`` :data:`ON_ACCEPT` acts right after accept().
    """

    request: int
    action: str
    fired: int = 0


class Armed:
    """A one-shot (or ``times``-shot) fault: ``mutate(plan)`` on matching requests."""

    def __init__(self, opcode: int | None, mutate: Callable[[Plan], None], times: int = 1,
                 match: Callable[[FuseIn], bool] | None = None) -> None:
        self.opcode = opcode
        self.mutate = mutate
        self.remaining = times
        self.match = match
        self.fired = 0

    def __call__(self, plan: Plan) -> None:
        req = plan.request
        if self.remaining <= 0 or (self.opcode is not None and req.opcode != self.opcode):
            return
        if self.match is not None and not self.match(req):
            return
        self.remaining -= 1
        self.fired += 1
        self.mutate(plan)


# ------------------------------------------------------------------------------------------
# FUSE reply helpers (also used by the tests to build malformed replies)
# ------------------------------------------------------------------------------------------


def reply_bytes(unique: int, payload: bytes = b"", error: int = 0) -> bytes:
    """``fuse_out_header`` + payload (``error`` is 0 or a negative errno)."""
    return OUT_HEADER.pack(16 + len(payload), error, unique) + payload


def dirent_bytes(ino: int, off: int, name: bytes, dtype: int, *,
                 namelen: int | None = None, pad: bool = True) -> bytes:
    """One ``fuse_dirent`` record (``namelen``/``pad`` overridable to build bad ones)."""
    rec = DIRENT.pack(ino, off, len(name) if namelen is None else namelen, dtype) + name
    return rec + b"\0" * (-len(rec) % 8) if pad else rec


@dataclass(slots=True)
class _Node:
    nodeid: int
    parent: int
    mode: int
    data: bytearray = field(default_factory=bytearray)
    children: dict[bytes, int] = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class TreeResponder:
    """A correct minimal FUSE server over a tiny in-memory tree.

    Default tree: ``/hello`` (``HELLO``), ``/empty``, ``/sub/``, ``/sub/inner``
    (``INNER``). Ops: INIT, LOOKUP (``.``/``..`` too), GETATTR, OPEN/READ/WRITE/RELEASE,
    CREATE, MKDIR, OPENDIR/READDIR/READDIRPLUS/RELEASEDIR, STATFS, FORGET/BATCH_FORGET (no
    reply), DESTROY; anything else ENOSYS.

    Bookkeeping for leak checks: ``lookups`` (node id → lookups counted and not yet
    forgotten, as virtiofsd keeps them), ``open_files`` / ``open_dirs`` (fh → node id).
    """

    HELLO = b"hello, hostile world\n"
    INNER = b"inner file\n"
    MINOR = 36
    MAX_WRITE = 1 << 20
    SUPPORTED_FLAGS = (FUSE_ASYNC_READ | FUSE_ATOMIC_O_TRUNC | FUSE_EXPORT_SUPPORT
                       | FUSE_BIG_WRITES | FUSE_DO_READDIRPLUS | FUSE_PARALLEL_DIROPS
                       | FUSE_MAX_PAGES | FUSE_INIT_EXT)

    def __init__(self) -> None:
        self.nodes: dict[int, _Node] = {1: _Node(1, 1, stat.S_IFDIR | 0o755)}
        self._next_node = 2
        self._next_fh = 100
        self.lookups: Counter[int] = Counter()
        self.open_files: dict[int, int] = {}
        self.open_dirs: dict[int, tuple[int, list[tuple[bytes, int]]]] = {}
        self.destroyed = False
        self.errors: list[str] = []
        self.hello = self._add(1, b"hello", stat.S_IFREG | 0o644, self.HELLO)
        self.empty = self._add(1, b"empty", stat.S_IFREG | 0o644, b"")
        self.sub = self._add(1, b"sub", stat.S_IFDIR | 0o755)
        self.inner = self._add(self.sub, b"inner", stat.S_IFREG | 0o600, self.INNER)

    # -- the tree --------------------------------------------------------------------------

    def _add(self, parent: int, name: bytes, mode: int, data: bytes = b"") -> int:
        nodeid = self._next_node
        self._next_node += 1
        self.nodes[nodeid] = _Node(nodeid, parent, mode, bytearray(data))
        self.nodes[parent].children[name] = nodeid
        return nodeid

    def attr(self, nodeid: int) -> tuple[int, ...]:
        """The 16 ``fuse_attr`` fields of a node."""
        n = self.nodes[nodeid]
        size = len(n.data) if not n.is_dir else 4096
        nlink = 2 + sum(self.nodes[c].is_dir for c in n.children.values()) if n.is_dir else 1
        return (nodeid, size, (size + 511) // 512, _T0, _T0 + 1, _T0 + 2, 0, 0, 0,
                n.mode, nlink, 0, 0, 0, 4096, 0)

    def entry(self, nodeid: int, *, count: bool = True) -> bytes:
        """A ``fuse_entry_out`` (counts one lookup unless ``count`` is False)."""
        if count:
            self.lookups[nodeid] += 1
        return ENTRY_OUT.pack(nodeid, 0, 1, 1, 0, 0, *self.attr(nodeid))

    def outstanding_lookups(self) -> dict[int, int]:
        """Lookups not paid back, root excluded (nobody ever forgets the root)."""
        return {k: v for k, v in self.lookups.items() if v and k != 1}

    def listing(self, nodeid: int) -> list[tuple[bytes, int]]:
        n = self.nodes[nodeid]
        return [(b".", nodeid), (b"..", n.parent), *sorted(n.children.items())]

    # -- FUSE ------------------------------------------------------------------------------

    def respond(self, req: FuseIn) -> bytes | None:
        """The correct reply to ``req`` (None for FORGET/BATCH_FORGET). Never raises."""
        try:
            handler = self._OPS.get(req.opcode)
            if handler is None:
                return reply_bytes(req.unique, error=-errno.ENOSYS)
            if req.opcode not in (Opcode.INIT, Opcode.DESTROY, Opcode.BATCH_FORGET) \
                    and req.nodeid not in self.nodes:
                if req.opcode == Opcode.FORGET:
                    return None
                return reply_bytes(req.unique, error=-errno.ESTALE)
            return handler(self, req)
        except (struct.error, KeyError, IndexError, ValueError) as exc:
            self.errors.append(f"{req.op}: {exc!r}")
            return reply_bytes(req.unique, error=-errno.EIO)

    def _init(self, req: FuseIn) -> bytes:
        major, _minor, readahead, flags = INIT_IN.unpack_from(req.body, 0)
        if major != 7:
            return reply_bytes(req.unique, error=-errno.EPROTO)
        out = INIT_OUT.pack(7, self.MINOR, readahead, flags & self.SUPPORTED_FLAGS, 16, 12,
                            self.MAX_WRITE, 1, 256, 0, 0)
        return reply_bytes(req.unique, out + bytes(64 - len(out)))

    def _lookup(self, req: FuseIn) -> bytes:
        node = self.nodes[req.nodeid]
        if not node.is_dir:
            return reply_bytes(req.unique, error=-errno.ENOTDIR)
        name = req.name
        if name == b".":
            target = node.nodeid
        elif name == b"..":
            target = node.parent
        elif name in node.children:
            target = node.children[name]
        else:
            return reply_bytes(req.unique, error=-errno.ENOENT)
        return reply_bytes(req.unique, self.entry(target))

    def _forget(self, req: FuseIn) -> None:
        (nlookup,) = FORGET_IN.unpack_from(req.body, 0)
        self.lookups[req.nodeid] -= nlookup
        return None

    def _batch_forget(self, req: FuseIn) -> None:
        count, _ = BATCH_FORGET_IN.unpack_from(req.body, 0)
        for i in range(count):
            nodeid, nlookup = FORGET_ONE.unpack_from(req.body, 8 + 16 * i)
            self.lookups[nodeid] -= nlookup
        return None

    def _getattr(self, req: FuseIn) -> bytes:
        return reply_bytes(req.unique, ATTR_OUT.pack(1, 0, 0, *self.attr(req.nodeid)))

    def _new_fh(self) -> int:
        self._next_fh += 1
        return self._next_fh

    def _open(self, req: FuseIn) -> bytes:
        if self.nodes[req.nodeid].is_dir:
            return reply_bytes(req.unique, error=-errno.EISDIR)
        fh = self._new_fh()
        self.open_files[fh] = req.nodeid
        return reply_bytes(req.unique, OPEN_OUT.pack(fh, 0, 0))

    def _read(self, req: FuseIn) -> bytes:
        fh, offset, size, *_ = READ_IN.unpack_from(req.body, 0)
        if self.open_files.get(fh) != req.nodeid:
            return reply_bytes(req.unique, error=-errno.EBADF)
        data = self.nodes[req.nodeid].data
        return reply_bytes(req.unique, bytes(data[offset:offset + size]))

    def _write(self, req: FuseIn) -> bytes:
        fh, offset, size, *_ = WRITE_IN.unpack_from(req.body, 0)
        if self.open_files.get(fh) != req.nodeid:
            return reply_bytes(req.unique, error=-errno.EBADF)
        payload = req.body[WRITE_IN.size:WRITE_IN.size + size]
        data = self.nodes[req.nodeid].data
        if len(data) < offset:
            data.extend(bytes(offset - len(data)))
        data[offset:offset + len(payload)] = payload
        return reply_bytes(req.unique, WRITE_OUT.pack(len(payload), 0))

    def _release(self, req: FuseIn) -> bytes:
        (fh,) = struct.unpack_from("<Q", req.body, 0)
        table: dict[int, Any] = self.open_dirs if req.opcode == Opcode.RELEASEDIR \
            else self.open_files
        if table.pop(fh, None) is None:
            return reply_bytes(req.unique, error=-errno.EBADF)
        return reply_bytes(req.unique)

    def _create(self, req: FuseIn) -> bytes:
        _flags, mode, _umask, _open_flags = CREATE_IN.unpack_from(req.body, 0)
        name = req.body[CREATE_IN.size:].split(b"\0", 1)[0]
        if name in self.nodes[req.nodeid].children:
            return reply_bytes(req.unique, error=-errno.EEXIST)
        nodeid = self._add(req.nodeid, name, stat.S_IFREG | (mode & 0o7777))
        fh = self._new_fh()
        self.open_files[fh] = nodeid
        return reply_bytes(req.unique, self.entry(nodeid) + OPEN_OUT.pack(fh, 0, 0))

    def _mkdir(self, req: FuseIn) -> bytes:
        mode, _umask = MKDIR_IN.unpack_from(req.body, 0)
        name = req.body[MKDIR_IN.size:].split(b"\0", 1)[0]
        if name in self.nodes[req.nodeid].children:
            return reply_bytes(req.unique, error=-errno.EEXIST)
        nodeid = self._add(req.nodeid, name, stat.S_IFDIR | (mode & 0o7777))
        return reply_bytes(req.unique, self.entry(nodeid))

    def _opendir(self, req: FuseIn) -> bytes:
        if not self.nodes[req.nodeid].is_dir:
            return reply_bytes(req.unique, error=-errno.ENOTDIR)
        fh = self._new_fh()
        self.open_dirs[fh] = (req.nodeid, self.listing(req.nodeid))
        return reply_bytes(req.unique, OPEN_OUT.pack(fh, 0, 0))

    def _readdir(self, req: FuseIn) -> bytes:
        fh, offset, size, *_ = READ_IN.unpack_from(req.body, 0)
        opened = self.open_dirs.get(fh)
        if opened is None or opened[0] != req.nodeid:
            return reply_bytes(req.unique, error=-errno.EBADF)
        plus = req.opcode == Opcode.READDIRPLUS
        out = bytearray()
        for index in range(offset, len(opened[1])):
            name, nodeid = opened[1][index]
            dtype = DT_DIR if self.nodes[nodeid].is_dir else DT_REG
            rec = dirent_bytes(nodeid, index + 1, name, dtype)
            if plus:
                dots = name in (b".", b"..")
                # Like virtiofsd: no lookup is counted for "." and ".." (node id 0).
                head = (ENTRY_OUT.pack(0, 0, 0, 0, 0, 0, *self.attr(nodeid)) if dots
                        else self.entry(nodeid, count=False))
                rec = head + rec
            if len(out) + len(rec) > size:
                break
            if plus and name not in (b".", b".."):
                self.lookups[nodeid] += 1
            out += rec
        return reply_bytes(req.unique, bytes(out))

    def _statfs(self, req: FuseIn) -> bytes:
        return reply_bytes(req.unique, STATFS_OUT.pack(1000, 500, 500, 100, 50, 4096, 255, 4096))

    def _destroy(self, req: FuseIn) -> bytes:
        self.destroyed = True
        return reply_bytes(req.unique)

    _OPS: ClassVar[dict[int, Callable[[TreeResponder, FuseIn], bytes | None]]] = {
        Opcode.INIT: _init,
        Opcode.LOOKUP: _lookup,
        Opcode.FORGET: _forget,
        Opcode.BATCH_FORGET: _batch_forget,
        Opcode.GETATTR: _getattr,
        Opcode.OPEN: _open,
        Opcode.READ: _read,
        Opcode.WRITE: _write,
        Opcode.RELEASE: _release,
        Opcode.CREATE: _create,
        Opcode.MKDIR: _mkdir,
        Opcode.OPENDIR: _opendir,
        Opcode.READDIR: _readdir,
        Opcode.READDIRPLUS: _readdir,
        Opcode.RELEASEDIR: _release,
        Opcode.STATFS: _statfs,
        Opcode.DESTROY: _destroy,
    }


# ------------------------------------------------------------------------------------------
# The backend
# ------------------------------------------------------------------------------------------


class _Region:
    """One mapped guest memory region."""

    def __init__(self, gpa: int, size: int, uva: int, offset: int, fd: int) -> None:
        self.gpa = gpa
        self.size = size
        self.uva = uva
        self.offset = offset
        self.mm = mmap.mmap(fd, size + offset, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.mm)

    def close(self) -> None:
        self.view.release()
        self.mm.close()


@dataclass(slots=True)
class _Vring:
    index: int
    num: int = 0
    last_avail: int = 0
    used_idx: int = 0
    desc: int = 0  # frontend virtual addresses
    used: int = 0
    avail: int = 0
    addressed: bool = False
    kick_fd: int = -1
    call_fd: int = -1
    enabled: bool = False
    stopped: bool = False


class VhostUserBackend:
    """A hostile-capable vhost-user backend for tests (see the module docstring).

    ``responder``: anything with ``respond(FuseIn) -> bytes | None``. ``faults``: a list
    of callables ``(Plan) -> None`` applied in order to every chain (append to it, or use
    :meth:`arm`). ``event_idx`` / ``indirect``: whether those features are offered.
    """

    def __init__(self, responder: Any | None = None, *, event_idx: bool = True,
                 indirect: bool = False, queues: int = 2, always_signal: bool = False,
                 handshake_faults: Iterable[HandshakeFault] = (),
                 max_lifetime: float = 60.0) -> None:
        self.responder = responder if responder is not None else TreeResponder()
        self.features_offered = F_VERSION_1 | F_PROTOCOL_FEATURES | F_NOTIFY_ON_EMPTY
        if event_idx:
            self.features_offered |= F_EVENT_IDX
        if indirect:
            self.features_offered |= F_INDIRECT_DESC
        self.protocol_offered = PF_MQ | PF_REPLY_ACK | PF_CONFIGURE_MEM_SLOTS
        self.queue_num = queues
        self.always_signal = always_signal
        self.handshake_faults = {f.request: f for f in handshake_faults}
        self.faults: list[Callable[[Plan], None]] = []
        self.max_lifetime = max_lifetime
        # Observations (written by the backend thread, read by tests).
        self.requests: list[FuseIn] = []
        self.errors: list[str] = []  # frontend protocol violations and backend bugs
        self.messages: list[int] = []  # vhost-user message types received, in order
        self.features = 0
        self.protocol_features = 0
        self.signals = 0
        self.storm_signals = 0
        self.connected = threading.Event()
        self.ready = threading.Event()  # every ring enabled
        self.disconnected = threading.Event()
        self.expired = False
        # Internal state, touched by the backend thread only.
        self._dir = tempfile.mkdtemp(prefix="hostile-vu-")
        self.socket_path = os.path.join(self._dir, "vhost.sock")
        self._listen: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._regions: list[_Region] = []
        self._rings = [_Vring(i) for i in range(queues)]
        self._held: list[tuple[int, Plan]] = []
        self._storm_until = 0.0
        self._storm_queue = 1
        self._commands: deque[Callable[[], None]] = deque()
        self._wake = Doorbell()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> VhostUserBackend:
        """Listen, and start the backend thread (it accepts one frontend)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(self.socket_path)
        listener.listen(1)
        listener.setblocking(False)
        self._listen = listener
        self._thread = threading.Thread(target=self._run, name="hostile-vhost-user",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, close every fd, remove the socket directory. Idempotent.

        Raises RuntimeError if the thread does not end within ``timeout``.
        """
        self._stopping = True
        self._wake.ring()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("hostile backend thread did not stop")
            self._thread = None
        if self._listen is not None:
            self._listen.close()
            self._listen = None
        self._wake.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> VhostUserBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        """The backend thread is running."""
        return self._thread is not None and self._thread.is_alive()

    # -- steering from the test thread (all thread-safe) -----------------------------------

    def arm(self, opcode: int | None, mutate: Callable[[Plan], None], *, times: int = 1,
            match: Callable[[FuseIn], bool] | None = None) -> Armed:
        """Apply ``mutate`` to the next ``times`` requests with ``opcode`` (None: any)."""
        fault = Armed(opcode, mutate, times, match)
        self.faults.append(fault)
        return fault

    def _post(self, command: Callable[[], None], wait: float | None = 5.0) -> bool:
        """Run ``command`` on the backend thread; wait for it (False if it never ran)."""
        if not self.alive:
            return False
        done = threading.Event()

        def run() -> None:
            try:
                command()
            finally:
                done.set()

        self._commands.append(run)
        self._wake.ring()
        return True if wait is None else done.wait(wait)

    def sync(self, timeout: float = 5.0) -> bool:
        """Wait until the backend thread has handled everything before this call."""
        return self._post(lambda: None, timeout)

    def release_held(self) -> int:
        """Carry out every held plan now (late replies). Returns how many."""
        count = [0]

        def run() -> None:
            held, self._held = self._held, []
            for index, plan in held:
                if self._conn is not None:
                    self._finish(self._rings[index], plan)
                    count[0] += 1

        self._post(run)
        return count[0]

    def close_connection(self) -> None:
        """Drop the vhost-user connection (the daemon dies)."""
        self._post(self._drop_connection)

    def send_unsolicited(self, data: bytes) -> None:
        """Write bytes on the vhost-user socket that nobody asked for."""
        self._post(lambda: self._sendall(data))

    def storm(self, seconds: float, queue: int = 1) -> None:
        """Write the call eventfd of ``queue`` continuously for ``seconds``, completing
        nothing."""
        def run() -> None:
            self._storm_queue = queue
            self._storm_until = time.monotonic() + seconds

        self._post(run)

    def signal(self, queue: int = 1) -> None:
        """One spurious call notification."""
        self._post(lambda: self._signal(self._rings[queue]))

    def held_count(self) -> int:
        return len(self._held)

    def ops(self) -> list[str]:
        """Opcode names of every FUSE request seen so far."""
        return [r.op for r in list(self.requests)]

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_lifetime
        try:
            if self._accept(deadline):
                self._serve(deadline)
        except Exception as exc:  # a backend bug: make the test fail, never hang
            self.errors.append(f"backend crashed: {exc!r}")
        finally:
            self._drop_connection()
            if time.monotonic() >= deadline:
                self.expired = True

    def _accept(self, deadline: float) -> bool:
        assert self._listen is not None
        poller = select.poll()
        poller.register(self._listen, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        while not self._stopping and time.monotonic() < deadline:
            events = dict(poller.poll(50))
            if self._wake.fileno() in events:
                self._drain_wake()
                self._run_commands()
            if self._listen.fileno() in events:
                conn, _ = self._listen.accept()
                conn.setblocking(True)
                conn.settimeout(2.0)
                self._conn = conn
                self.connected.set()
                fault = self.handshake_faults.get(ON_ACCEPT)
                if fault is not None and fault.action == "close":
                    fault.fired += 1
                    self._drop_connection()
                    return False
                return True
        return False

    def _serve(self, deadline: float) -> None:
        while not self._stopping and self._conn is not None:
            now = time.monotonic()
            if now >= deadline:
                return
            storming = now < self._storm_until
            poller = select.poll()
            poller.register(self._wake, select.POLLIN)
            poller.register(self._conn, select.POLLIN)
            kicks: dict[int, _Vring] = {}
            for ring in self._rings:
                if ring.kick_fd >= 0 and not ring.stopped:
                    kicks[ring.kick_fd] = ring
                    poller.register(ring.kick_fd, select.POLLIN)
            events = dict(poller.poll(1 if storming else 50))
            if self._wake.fileno() in events:
                self._drain_wake()
                self._run_commands()
            if self._conn is not None and self._conn.fileno() in events:
                self._on_socket()
            for fd, ring in kicks.items():
                if fd in events and self._conn is not None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.eventfd_read(fd)
                    self._process_ring(ring)
            if storming and self._conn is not None:
                self.storm_signals += 1
                self._signal(self._rings[self._storm_queue], count=False)

    def _drain_wake(self) -> None:
        self._wake.drain()

    def _run_commands(self) -> None:
        for _ in range(len(self._commands)):
            self._commands.popleft()()

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None
            self.disconnected.set()
        for ring in self._rings:
            for attr in ("kick_fd", "call_fd"):
                fd = getattr(ring, attr)
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    setattr(ring, attr, -1)
        self._held.clear()
        self._unmap()

    def _unmap(self) -> None:
        for region in self._regions:
            try:
                region.close()
            except BufferError as exc:
                self.errors.append(f"guest memory still exported at unmap: {exc}")
        self._regions = []

    # -- vhost-user messages ---------------------------------------------------------------

    def _sendall(self, data: bytes) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.sendall(data)

    def _reply(self, request: int, payload: bytes) -> None:
        self._sendall(_HEADER.pack(request, _VERSION | _REPLY, len(payload)) + payload)

    def _recv_exact(self, n: int) -> bytes | None:
        assert self._conn is not None
        buf = bytearray()
        while len(buf) < n:
            chunk = self._conn.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def _on_socket(self) -> None:
        assert self._conn is not None
        fds: list[int] = []
        try:
            data, fds, _flags, _addr = socket.recv_fds(self._conn, _HEADER.size, 16,
                                                       socket.MSG_CMSG_CLOEXEC)
            if not data:
                self._drop_connection()
                return
            if len(data) < _HEADER.size:
                rest = self._recv_exact(_HEADER.size - len(data))
                if rest is None:
                    self._drop_connection()
                    return
                data += rest
            request, flags, size = _HEADER.unpack(data)
            if size > _MAX_MESSAGE:
                raise _Bad(f"vhost-user message {request} of {size} bytes")
            payload = self._recv_exact(size) if size else b""
            if payload is None:
                self._drop_connection()
                return
            self.messages.append(request)
            self._dispatch(request, flags, payload, fds)
        except (OSError, _Bad, struct.error, ValueError) as exc:
            self.errors.append(f"vhost-user: {exc!r}")
            self._drop_connection()
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _dispatch(self, request: int, flags: int, payload: bytes, fds: list[int]) -> None:
        status = 0
        fault = self.handshake_faults.get(request)
        action = None
        if fault is not None:
            fault.fired += 1
            action = fault.action
            if action == "close":
                self._drop_connection()
                return
            if action == "ignore":
                return
            if action == "wrong-reply":
                self._reply(request + 100, _U64.pack(0))
                return
            if action == "short-reply":
                self._reply(request, b"\0\0\0\0")
                return
            if action == "oversized-reply":
                self._sendall(_HEADER.pack(request, _VERSION | _REPLY, 1 << 20))
                return
            if action == "nack":
                status = 1
        if request == GET_FEATURES:
            offered = self.features_offered
            if action == "no-version-1":
                offered &= ~F_VERSION_1
            self._reply(request, _U64.pack(offered))
        elif request == SET_FEATURES:
            (self.features,) = _U64.unpack(payload)
            if self.features & ~self.features_offered:
                raise _Bad(f"frontend acked unoffered features {self.features:#x}")
        elif request == SET_OWNER:
            pass
        elif request == GET_PROTOCOL_FEATURES:
            self._reply(request, _U64.pack(self.protocol_offered))
        elif request == SET_PROTOCOL_FEATURES:
            (self.protocol_features,) = _U64.unpack(payload)
        elif request == GET_QUEUE_NUM:
            self._reply(request, _U64.pack(1 if action == "one-queue" else self.queue_num))
        elif request == GET_MAX_MEM_SLOTS:
            self._reply(request, _U64.pack(32))
        elif request == SET_MEM_TABLE:
            self._set_mem_table(payload, fds)
        elif request in (SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ENABLE, GET_VRING_BASE):
            index, num = _STATE.unpack(payload)
            ring = self._ring(index)
            if request == SET_VRING_NUM:
                if not 0 < num <= 32768 or num & (num - 1):
                    raise _Bad(f"bad ring size {num}")
                ring.num = num
            elif request == SET_VRING_BASE:
                ring.last_avail = ring.used_idx = num
            elif request == SET_VRING_ENABLE:
                ring.enabled = bool(num)
                if all(r.enabled for r in self._rings):
                    self.ready.set()
            else:
                ring.stopped = True
                self._reply(request, _STATE.pack(index, ring.last_avail))
        elif request == SET_VRING_ADDR:
            index, _flags, desc, used, avail, _log = _ADDR.unpack(payload)
            ring = self._ring(index)
            ring.desc, ring.used, ring.avail, ring.addressed = desc, used, avail, True
        elif request in (SET_VRING_KICK, SET_VRING_CALL):
            (value,) = _U64.unpack(payload)
            ring = self._ring(value & 0xFF)
            fd = -1 if value & 0x100 else fds.pop(0)
            attr = "kick_fd" if request == SET_VRING_KICK else "call_fd"
            old = getattr(ring, attr)
            if old >= 0:
                os.close(old)
            setattr(ring, attr, fd)
        else:
            status = 1
            self.errors.append(f"unexpected vhost-user message {request}")
        if (flags & _NEED_REPLY and request not in _WITH_REPLY
                and self.protocol_features & PF_REPLY_ACK):
            self._reply(request, _U64.pack(status))

    def _ring(self, index: int) -> _Vring:
        if not 0 <= index < len(self._rings):
            raise _Bad(f"ring index {index} out of range")
        return self._rings[index]

    def _set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        nregions, _ = struct.unpack_from("<II", payload, 0)
        if nregions != len(fds) or len(payload) != 8 + _REGION.size * nregions:
            raise _Bad(f"SET_MEM_TABLE with {nregions} regions and {len(fds)} fds")
        self._unmap()
        for i in range(nregions):
            gpa, size, uva, offset = _REGION.unpack_from(payload, 8 + _REGION.size * i)
            fd = fds.pop(0)
            try:
                self._regions.append(_Region(gpa, size, uva, offset, fd))
            finally:
                os.close(fd)

    # -- guest memory ----------------------------------------------------------------------

    def _by_gpa(self, addr: int, length: int) -> tuple[_Region, int]:
        for r in self._regions:
            if r.gpa <= addr and addr + length <= r.gpa + r.size:
                return r, r.offset + addr - r.gpa
        raise _Bad(f"guest-physical range [{addr:#x}, +{length:#x}) is not mapped")

    def _by_uva(self, addr: int, length: int) -> tuple[_Region, int]:
        for r in self._regions:
            if r.uva <= addr and addr + length <= r.uva + r.size:
                return r, r.offset + addr - r.uva
        raise _Bad(f"frontend address range [{addr:#x}, +{length:#x}) is not mapped")

    # -- rings -----------------------------------------------------------------------------

    def _layout(self, ring: _Vring) -> tuple[memoryview, int, int, int]:
        """(view, desc offset, avail offset, used offset) of a ring's three parts."""
        n = ring.num
        rd, desc = self._by_uva(ring.desc, 16 * n)
        ra, avail = self._by_uva(ring.avail, 6 + 2 * n)
        ru, used = self._by_uva(ring.used, 6 + 8 * n)
        if not (rd is ra and ra is ru):
            raise _Bad("ring parts in different regions (not supported by this backend)")
        return rd.view, desc, avail, used

    def _ring_ready(self, ring: _Vring) -> bool:
        return (self._conn is not None and ring.num > 0 and ring.addressed
                and ring.enabled and not ring.stopped and bool(self._regions))

    def _process_ring(self, ring: _Vring) -> None:
        if not self._ring_ready(ring):
            return
        try:
            view, _desc, avail, used = self._layout(ring)
            for _pass in range(8):  # bounded re-check passes
                avail_idx = _U16.unpack_from(view, avail + 2)[0]
                pending = (avail_idx - ring.last_avail) & 0xFFFF
                if pending > ring.num:
                    raise _Bad(f"avail.idx moved by {pending} on a ring of {ring.num}")
                for _ in range(pending):
                    slot = ring.last_avail & (ring.num - 1)
                    head = _U16.unpack_from(view, avail + 4 + 2 * slot)[0]
                    ring.last_avail = (ring.last_avail + 1) & 0xFFFF
                    self._handle_chain(ring, head)
                    if not self._ring_ready(ring):
                        return  # a fault closed the connection
                if self.features & F_EVENT_IDX:
                    _U16.pack_into(view, used + 4 + 8 * ring.num, ring.last_avail)
                if _U16.unpack_from(view, avail + 2)[0] == ring.last_avail:
                    return
        except _Bad as exc:
            self.errors.append(f"ring {ring.index}: {exc}")
            ring.stopped = True

    def _walk_chain(self, ring: _Vring, head: int) -> tuple[list[tuple[_Region, int, int]],
                                                             list[tuple[_Region, int, int]]]:
        view, desc, _avail, _used = self._layout(ring)
        table_view, table_off, table_len = view, desc, ring.num
        readable: list[tuple[_Region, int, int]] = []
        writable: list[tuple[_Region, int, int]] = []
        idx = head
        indirect = False
        seen = 0
        while True:
            if idx >= table_len:
                raise _Bad(f"descriptor index {idx} >= table size {table_len}")
            seen += 1
            if seen > table_len:
                raise _Bad("descriptor chain loops")
            addr, length, flags, nxt = _DESC.unpack_from(table_view, table_off + 16 * idx)
            if flags & DESC_F_INDIRECT:
                if indirect or not self.features & F_INDIRECT_DESC:
                    raise _Bad("unexpected indirect descriptor")
                if length == 0 or length % 16 or flags & DESC_F_NEXT:
                    raise _Bad(f"bad indirect table of {length} bytes")
                region, off = self._by_gpa(addr, length)
                table_view, table_off, table_len = region.view, off, length // 16
                idx, seen, indirect = 0, 0, True
                continue
            region, off = self._by_gpa(addr, length)
            if flags & DESC_F_WRITE:
                writable.append((region, off, length))
            else:
                if writable:
                    raise _Bad("device-readable descriptor after a writable one")
                readable.append((region, off, length))
            if not flags & DESC_F_NEXT:
                return readable, writable
            idx = nxt

    def _handle_chain(self, ring: _Vring, head: int) -> None:
        try:
            if head >= ring.num:
                raise _Bad(f"avail ring names head {head} >= {ring.num}")
            readable, writable = self._walk_chain(ring, head)
            total = sum(n for _, _, n in readable)
            if total > _MAX_REQUEST:
                raise _Bad(f"request of {total} bytes")
            data = b"".join(bytes(r.view[o:o + n]) for r, o, n in readable)
            if len(data) < IN_HEADER.size:
                raise _Bad(f"FUSE request of {len(data)} bytes")
            (length, opcode, unique, nodeid, uid, gid, pid, _ext,
             _pad) = IN_HEADER.unpack_from(data, 0)
            if length != len(data):
                raise _Bad(f"in.len {length} but the chain holds {len(data)} bytes")
            if unique == 0:
                raise _Bad("FUSE request with unique 0")
        except _Bad as exc:
            self.errors.append(f"ring {ring.index} head {head}: {exc}")
            self._post_used(ring, [(head, 0)])
            return
        capacity = sum(n for _, _, n in writable)
        initial = (b"".join(bytes(r.view[o:o + n]) for r, o, n in writable)
                   if capacity <= _SNAPSHOT_MAX else b"")
        req = FuseIn(ring.index, head, opcode, unique, nodeid, uid, gid, pid,
                     data[IN_HEADER.size:], capacity, writable, initial)
        self.requests.append(req)
        reply = self.responder.respond(req)
        plan = Plan(req, reply, len(reply) if reply is not None else 0, head, original=reply)
        for fault in list(self.faults):
            fault(plan)
        if plan.unsolicited:
            self._sendall(plan.unsolicited)
        if plan.early:
            self._post_used(ring, plan.early, force=True)
        if plan.storm:
            self._storm_queue = ring.index
            self._storm_until = time.monotonic() + plan.storm
        if plan.close:
            self._drop_connection()
            return
        if plan.hold:
            self._held.append((ring.index, plan))
            return
        self._finish(ring, plan)

    def _finish(self, ring: _Vring, plan: Plan) -> None:
        writable = plan.request.writable
        if plan.reply is not None:
            pos = 0
            for region, off, n in writable:
                chunk = plan.reply[pos:pos + n]
                if not chunk:
                    break
                region.view[off:off + len(chunk)] = chunk
                pos += len(chunk)
        if plan.spill and writable:
            region, off, n = writable[-1]
            start = off + n
            room = max(0, len(region.view) - start)
            spill = plan.spill[:room]
            region.view[start:start + len(spill)] = spill
        entries = [*plan.before, *([(plan.head, plan.used_len)] if plan.post else []),
                   *plan.after]
        self._post_used(ring, entries, skew=plan.idx_skew, force=plan.force_signal)

    def _post_used(self, ring: _Vring, entries: list[tuple[int, int]], *, skew: int = 0,
                   force: bool = False) -> None:
        if not self._ring_ready(ring):
            return
        view, _desc, avail, used = self._layout(ring)
        old = ring.used_idx
        for head, length in entries:
            slot = ring.used_idx & (ring.num - 1)
            _USED_ELEM.pack_into(view, used + 4 + 8 * slot, head & 0xFFFF_FFFF,
                                 length & 0xFFFF_FFFF)
            ring.used_idx = (ring.used_idx + 1) & 0xFFFF
        ring.used_idx = (ring.used_idx + skew) & 0xFFFF
        _U16.pack_into(view, used + 2, ring.used_idx)
        if ring.used_idx == old and not force:
            return
        if not force and not self.always_signal:
            if self.features & F_EVENT_IDX:
                event = _U16.unpack_from(view, avail + 4 + 2 * ring.num)[0]
                if not need_event(event, ring.used_idx, old):
                    return
            elif _U16.unpack_from(view, avail)[0] & AVAIL_F_NO_INTERRUPT:
                return
        self._signal(ring)

    def _signal(self, ring: _Vring, *, count: bool = True) -> None:
        if ring.call_fd >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(ring.call_fd, 1)
            if count:
                self.signals += 1
