"""The client against a hostile device.

A test-only vhost-user backend (tests/hostile/backend.py) answers FUSE requests from a tiny
in-memory tree and, on demand, breaks the reply, the used ring, the call eventfd or the
vhost-user socket. For every fault the client must:

* raise a typed error for the request it hit — the public contract, per layer:
  - the device layer (``FuseChannel``, ``BlockingDevice``, the device actor's futures,
    file/directory actors) raises ``pyvirtiofs.actors.channel.DeviceProtocolError`` for a malformed
    reply: a ``codec.fuse_replies.FuseProtocolError`` that is also an ``OSError`` with
    errno ``EIO`` (Linux's answer to a malformed reply); ``OSError(ETIMEDOUT)`` for a
    reply that never comes; ``pyvirtiofs.hw.transport.DeviceGone`` (``ENOTCONN``) for a dead daemon;
    ``pyvirtiofs.hw.vhost_user.frontend.VhostUserError`` for a broken handshake;
  - the ``os``-style facade (``pyvirtiofs.api.local.VirtioFS``) surfaces the same errnos as
    ``OSError`` (with the path attached where the session adds it);
* never crash, never read outside the reply buffer, never hand wrong data to the caller;
* never leak a descriptor or a buffer: once every request finished, every queue has
  ``num_free == size`` and the channel's allocator is back to 0 bytes in use; lookups
  the daemon counted in a rejected reply are paid back with FORGET;
* keep serving other requests when the fault is per-request (ring-level faults — a
  used.idx jump, a dead socket — put the queue or device out of service instead, and
  every later request fails at once with a typed error).

Ring-level faults are the documented exceptions to "no leak": buffers of a broken queue
stay allocated (quarantined: the device may still write into them) and a dead device's
buffers die with the transport.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtiofs.actors.channel import BlockingDevice, DeviceProtocolError, FuseChannel
from pyvirtiofs.actors.messages import DeviceStats
from pyvirtiofs.actors.session import SessionConfig
from pyvirtiofs.api.local import VirtioFS
from pyvirtiofs.codec import fuse_requests as rq
from pyvirtiofs.codec.fuse_abi import (
    ATTR_OUT,
    DIRENT,
    ENTRY_OUT,
    FUSE_ROOT_ID,
    OUT_HEADER,
    WRITE_OUT,
    Opcode,
)
from pyvirtiofs.codec.fuse_replies import FuseProtocolError, decode_reply, parse_out_header
from pyvirtiofs.codec.fuse_requests import FuseRequest
from pyvirtiofs.hw.memory import BufferAllocator
from pyvirtiofs.hw.transport import DeviceGone
from pyvirtiofs.hw.vhost_user.frontend import VhostUserError, VhostUserFrontend
from pyvirtiofs.hw.vhost_user.transport import VhostUserTransport
from tests.hostile.backend import GET_FEATURES as VU_GET_FEATURES
from tests.hostile.backend import GET_PROTOCOL_FEATURES as VU_GET_PROTOCOL_FEATURES
from tests.hostile.backend import GET_QUEUE_NUM as VU_GET_QUEUE_NUM
from tests.hostile.backend import GET_VRING_BASE as VU_GET_VRING_BASE
from tests.hostile.backend import (
    ON_ACCEPT,
    SET_MEM_TABLE,
    SET_VRING_KICK,
    Armed,
    HandshakeFault,
    Plan,
    TreeResponder,
    VhostUserBackend,
    dirent_bytes,
    reply_bytes,
)

pytestmark = pytest.mark.timeout(60)

QUEUE_SIZE = 64
MEMORY = 4 << 20
TIMEOUT = 5.0  # BlockingDevice default here: a hang fails fast instead of in 30 s
CANARY = b"\xa5CANARY!" * 64  # written by the device right past a reply buffer
HELLO = TreeResponder.HELLO

#: fuse_attr fields, in the order TreeResponder.attr() returns them
ATTR_FIELDS = ("ino", "size", "blocks", "atime", "mtime", "ctime", "atimensec", "mtimensec",
               "ctimensec", "mode", "nlink", "uid", "gid", "rdev", "blksize", "flags")


# ------------------------------------------------------------------------------------------
# Leak guards shared by every test: threads and file descriptors
# ------------------------------------------------------------------------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _wait(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture(autouse=True)
def _no_thread_or_fd_leaks() -> Iterator[None]:
    threads = set(threading.enumerate())
    fds = _fd_count()
    yield
    assert _wait(lambda: set(threading.enumerate()) <= threads), (
        f"threads left behind: {set(threading.enumerate()) - threads}")
    assert _wait(lambda: _fd_count() <= fds), f"fds leaked: {_fd_count() - fds}"


# ------------------------------------------------------------------------------------------
# The lower layer: VhostUserTransport.connect + BlockingDevice
# ------------------------------------------------------------------------------------------


@dataclass
class Rig:
    """A connected backend + transport + BlockingDevice, INIT done, hello and / open."""

    backend: VhostUserBackend
    transport: VhostUserTransport
    dev: BlockingDevice
    tree: TreeResponder
    hello_fh: int = 0
    root_fh: int = 0

    @property
    def channel(self) -> FuseChannel:
        return self.dev.channel

    def call(self, request: FuseRequest, **kwargs: Any) -> Any:
        return self.dev.call(request, **kwargs)

    def arm(self, opcode: int, mutate: Callable[[Plan], None], **kw: Any) -> Armed:
        return self.backend.arm(opcode, mutate, **kw)

    def settle(self, timeout: float = 2.0) -> None:
        """Harvest until the device has returned every chain (the channel's own FORGETs
        included), so that the backend has also processed all of them."""
        assert _wait(lambda: not self.channel.harvest() and self.channel.in_flight == 0,
                     timeout), f"{self.channel.in_flight} requests still in flight"
        assert self.backend.sync()

    def assert_no_leaks(self, *, daemon_leak_ok: bool = False) -> None:
        self.settle()
        ch = self.channel
        for vq in self.transport.queues:
            assert vq.num_free == vq.size and vq.in_flight == 0, vq
        assert ch.allocator.bytes_in_use == 0 and ch.allocator.allocations == 0
        ch.allocator.check_invariants()
        assert ch.forgets_owed == 0
        assert ch.decode_failures == 0
        if not daemon_leak_ok:
            assert self.tree.outstanding_lookups() == {}
        assert self.backend.errors == [] and self.tree.errors == []

    def assert_serving(self) -> None:
        """Well-formed requests still get exactly the right answers."""
        attr = self.call(rq.getattr(FUSE_ROOT_ID)).attr
        assert attr.ino == FUSE_ROOT_ID and stat.S_ISDIR(attr.mode)
        assert self.call(rq.read(self.tree.hello, self.hello_fh, 0, 4096)) == HELLO
        entry = self.call(rq.lookup(FUSE_ROOT_ID, "sub"))
        assert entry.nodeid == self.tree.sub and stat.S_ISDIR(entry.attr.mode)
        self.call(rq.forget(entry.nodeid, 1))
        names = [d.name for d in self.call(rq.readdir(FUSE_ROOT_ID, self.root_fh, 0, 4096))]
        assert names == [b".", b"..", b"empty", b"hello", b"sub"]


@contextlib.contextmanager
def make_rig(**backend_kwargs: Any) -> Iterator[Rig]:
    transport_kwargs = {k: backend_kwargs.pop(k) for k in ("event_idx_client", "indirect_client")
                        if k in backend_kwargs}
    backend = VhostUserBackend(**backend_kwargs).start()
    transport: VhostUserTransport | None = None
    try:
        transport = VhostUserTransport.connect(
            backend.socket_path, memory_size=MEMORY, queue_size=QUEUE_SIZE,
            event_idx=transport_kwargs.get("event_idx_client", True),
            indirect=transport_kwargs.get("indirect_client", False))
        dev = BlockingDevice(transport, timeout=TIMEOUT)
        rig = Rig(backend, transport, dev, backend.responder)
        dev.call(rq.init(1 << 20))
        rig.hello_fh = dev.call(rq.open(rig.tree.hello, os.O_RDONLY)).fh
        rig.root_fh = dev.call(rq.opendir(FUSE_ROOT_ID)).fh
        yield rig
    finally:
        if transport is not None:
            transport.close()
        backend.stop()


@pytest.fixture
def rig() -> Iterator[Rig]:
    with make_rig() as r:
        yield r


def assert_eio(exc: BaseException) -> None:
    """The device layer's contract for a malformed reply."""
    assert isinstance(exc, DeviceProtocolError), repr(exc)
    assert isinstance(exc, FuseProtocolError) and isinstance(exc, OSError)
    assert exc.errno == errno.EIO


# -- plan rewriting helpers ------------------------------------------------------------------


def header(plan: Plan, *, length: int | None = None, error: int | None = None,
           unique: int | None = None) -> None:
    """Rewrite fields of the reply's out header, keeping its payload and used length."""
    assert plan.reply is not None
    ln, err, uniq = OUT_HEADER.unpack_from(plan.reply, 0)
    plan.reply = OUT_HEADER.pack(ln if length is None else length,
                                 err if error is None else error,
                                 uniq if unique is None else unique) + plan.reply[16:]


def payload(data: bytes) -> Callable[[Plan], None]:
    """Replace the success payload (out.len and used.len follow)."""
    def mutate(plan: Plan) -> None:
        plan.set_reply(reply_bytes(plan.request.unique, data))
    return mutate


def attr_fields(tree: TreeResponder, nodeid: int, **changes: int) -> tuple[int, ...]:
    """A node's ``fuse_attr`` fields with some replaced by name (``mode=0o644``...)."""
    f = list(tree.attr(nodeid))
    for name, value in changes.items():
        f[ATTR_FIELDS.index(name)] = value
    return tuple(f)


def getattr_payload(tree: TreeResponder, nodeid: int, *, valid_nsec: int = 0,
                    **changes: int) -> bytes:
    return ATTR_OUT.pack(1, valid_nsec, 0, *attr_fields(tree, nodeid, **changes))


def entry_payload(tree: TreeResponder, nodeid: int, *, reported: int | None = None,
                  entry_nsec: int = 0, **changes: int) -> bytes:
    return ENTRY_OUT.pack(nodeid if reported is None else reported, 0, 1, 1, entry_nsec, 0,
                          *attr_fields(tree, nodeid, **changes))


def dirents(*records: bytes) -> Callable[[Plan], None]:
    return payload(b"".join(records))


def _newest(tree: TreeResponder) -> int:
    return max(tree.nodes)


def _entry_of_new_node(tree: TreeResponder, reported: int | None = None,
                       **changes: int) -> Callable[[Plan], None]:
    """For CREATE/MKDIR: rebuild the reply around the node the responder just made."""
    def mutate(plan: Plan) -> None:
        assert plan.reply is not None
        body = entry_payload(tree, _newest(tree), reported=reported, **changes)
        rest = plan.reply[16 + ENTRY_OUT.size:]  # CREATE's open_out
        plan.set_reply(reply_bytes(plan.request.unique, body + rest))
    return mutate


def init_version(major: int, minor: int) -> Callable[[Plan], None]:
    """An INIT reply announcing another protocol version (the rest kept)."""
    def mutate(plan: Plan) -> None:
        assert plan.reply is not None
        body = struct.pack("<II", major, minor) + plan.reply[24:]
        plan.set_reply(reply_bytes(plan.request.unique, body))
    return mutate


def payload_error(value: int, *, sign: int = -1) -> Callable[[Plan], None]:
    """An error reply (no payload) whose error field is ``sign * value``."""
    def mutate(plan: Plan) -> None:
        plan.set_reply(struct.pack("<IIQ", 16, (sign * value) & 0xFFFF_FFFF,
                                   plan.request.unique))
    return mutate


# -- the table of per-request faults ----------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One per-request fault: which request to send, how the device breaks its reply."""

    name: str
    request: Callable[[Rig], FuseRequest]
    mutate: Callable[[Rig], Callable[[Plan], None]]
    daemon_leak_ok: bool = False  # the reply hid a node the client cannot know to forget
    forgets: int = 0  # lookups the channel must pay back
    spill: bool = False  # the device also scribbles a canary right past the buffer


def _getattr_root(r: Rig) -> FuseRequest:
    return rq.getattr(FUSE_ROOT_ID)


def _getattr_hello(r: Rig) -> FuseRequest:
    return rq.getattr(r.tree.hello)


def _lookup_hello(r: Rig) -> FuseRequest:
    return rq.lookup(FUSE_ROOT_ID, "hello")


def _read_hello(r: Rig) -> FuseRequest:
    return rq.read(r.tree.hello, r.hello_fh, 0, 8)


def _readdir_root(r: Rig) -> FuseRequest:
    return rq.readdir(FUSE_ROOT_ID, r.root_fh, 0, 4096)


def _readdirplus_root(r: Rig) -> FuseRequest:
    return rq.readdirplus(FUSE_ROOT_ID, r.root_fh, 0, 4096)


def _const(mutate: Callable[[Plan], None]) -> Callable[[Rig], Callable[[Plan], None]]:
    return lambda r: mutate


def _set(**kw: Any) -> Callable[[Plan], None]:
    def mutate(plan: Plan) -> None:
        for k, v in kw.items():
            setattr(plan, k, v(plan) if callable(v) else v)
    return mutate


def _hdr(**kw: Any) -> Callable[[Plan], None]:
    def mutate(plan: Plan) -> None:
        header(plan, **{k: v(plan) if callable(v) else v for k, v in kw.items()})
    return mutate


def _both(*fns: Callable[[Plan], None]) -> Callable[[Plan], None]:
    def mutate(plan: Plan) -> None:
        for fn in fns:
            fn(plan)
    return mutate


def _direntplus(tree: TreeResponder, bad_name: bytes | None = None, **changes: int) -> bytes:
    """A READDIRPLUS page of the root's real children with the records the responder
    counted; the record named ``bad_name`` gets ``changes`` in its attributes."""
    out = b""
    for i, (name, nodeid) in enumerate(sorted(tree.nodes[FUSE_ROOT_ID].children.items())):
        ch = changes if name == bad_name else {}
        d = _dtype(tree, nodeid)
        out += entry_payload(tree, nodeid, **ch) + dirent_bytes(nodeid, i + 3, name, d)
    return out


def _dtype(tree: TreeResponder, nodeid: int) -> int:
    return tree.nodes[nodeid].mode >> 12 & 0o17


FAULTS: list[Fault] = [
    # -- the out header ----------------------------------------------------------------------
    Fault("wrong-unique", _getattr_root, _const(_hdr(unique=lambda p: p.request.unique + 1))),
    Fault("unique-zero", _getattr_root, _const(_hdr(unique=0))),
    Fault("out-len-beyond-buffer", _read_hello,
          _const(_hdr(length=lambda p: p.request.capacity + 4096)), spill=True),
    Fault("out-len-beyond-used-len", _getattr_root,
          _const(_set(used_len=lambda p: p.used_len - 8))),
    Fault("out-len-below-header", _getattr_root, _const(_hdr(length=8))),
    Fault("used-len-beyond-chain", _getattr_root,
          _const(_set(used_len=lambda p: p.request.capacity + 1)), spill=True),
    Fault("used-len-u32-max", _read_hello, _const(_set(used_len=0xFFFF_FFFF)), spill=True),
    Fault("used-len-below-header", _getattr_root, _const(_set(used_len=15))),
    Fault("used-len-zero", _getattr_root, _const(_set(used_len=0))),
    Fault("nothing-written-stale-buffer", _getattr_root,
          _const(_set(reply=None, used_len=lambda p: p.request.capacity))),
    Fault("error-positive", _getattr_root,
          _const(payload_error(errno.ENOENT, sign=+1))),
    Fault("error-below-minus-4095", _getattr_root, _const(payload_error(4096))),
    Fault("error-int-min", _getattr_root, _const(payload_error(1 << 31))),
    Fault("error-with-payload", _getattr_root, _const(_hdr(error=-errno.ENOENT))),
    # -- fixed-size replies ---------------------------------------------------------------
    Fault("attr-truncated", _getattr_root,
          lambda r: payload(getattr_payload(r.tree, 1)[:100])),
    Fault("open-truncated", lambda r: rq.open(r.tree.hello, os.O_RDONLY),
          _const(payload(b"\x01" * 8))),
    Fault("statfs-truncated", lambda r: rq.statfs(FUSE_ROOT_ID), _const(payload(bytes(79)))),
    Fault("entry-longer-than-struct", _lookup_hello,
          lambda r: payload(entry_payload(r.tree, r.tree.hello) + bytes(8)), daemon_leak_ok=True),
    Fault("init-truncated", lambda r: rq.init(1 << 20), _const(payload(bytes(20)))),
    Fault("init-major-6", lambda r: rq.init(1 << 20), _const(init_version(6, 36))),
    # -- absurd attributes ----------------------------------------------------------------
    Fault("attr-bad-file-type", _getattr_hello,
          lambda r: payload(getattr_payload(r.tree, r.tree.hello, mode=0o170000 | 0o644))),
    Fault("attr-no-file-type", _getattr_hello,
          lambda r: payload(getattr_payload(r.tree, r.tree.hello, mode=0o644))),
    Fault("attr-nsec-1e9", _getattr_hello,
          lambda r: payload(getattr_payload(r.tree, r.tree.hello, mtimensec=1_000_000_000))),
    Fault("attr-negative-size", _getattr_hello,
          lambda r: payload(getattr_payload(r.tree, r.tree.hello, size=1 << 63))),
    Fault("attr-valid-nsec-1e9", _getattr_hello,
          lambda r: payload(getattr_payload(r.tree, r.tree.hello, valid_nsec=10**9))),
    Fault("lookup-bad-attr-forgotten", _lookup_hello,
          lambda r: payload(entry_payload(r.tree, r.tree.hello, atimensec=2 * 10**9)), forgets=1),
    Fault("lookup-entry-nsec-1e9", _lookup_hello,
          lambda r: payload(entry_payload(r.tree, r.tree.hello, entry_nsec=10**9)), forgets=1),
    # -- sizes ------------------------------------------------------------------------------
    Fault("read-more-than-requested", _read_hello,
          _const(payload(HELLO + CANARY[:64])), spill=True),
    Fault("write-size-beyond-request",
          lambda r: rq.write(r.tree.hello, r.hello_fh, 0, b"hello"),
          _const(payload(WRITE_OUT.pack(4096, 0)))),
    # -- node-creating replies ------------------------------------------------------------
    Fault("create-nodeid-zero", lambda r: rq.create(FUSE_ROOT_ID, "new", os.O_RDWR, 0o644, 0),
          lambda r: _entry_of_new_node(r.tree, reported=0), daemon_leak_ok=True),
    Fault("mkdir-nodeid-zero", lambda r: rq.mkdir(FUSE_ROOT_ID, "newdir", 0o755, 0),
          lambda r: _entry_of_new_node(r.tree, reported=0), daemon_leak_ok=True),
    Fault("mkdir-returns-root", lambda r: rq.mkdir(FUSE_ROOT_ID, "newdir", 0o755, 0),
          lambda r: _entry_of_new_node(r.tree, reported=FUSE_ROOT_ID), daemon_leak_ok=True),
    Fault("mkdir-returns-a-file", lambda r: rq.mkdir(FUSE_ROOT_ID, "newdir", 0o755, 0),
          lambda r: _entry_of_new_node(r.tree, mode=stat.S_IFREG | 0o644), forgets=1),
    # -- directory entries ----------------------------------------------------------------
    Fault("dirent-namelen-past-buffer", _readdir_root,
          _const(dirents(dirent_bytes(1, 1, b".", 4),
                         DIRENT.pack(2, 2, 200, 8) + b"hello\0\0\0"))),
    Fault("dirent-padding-past-buffer", _readdir_root,
          _const(dirents(dirent_bytes(1, 1, b".", 4),
                         dirent_bytes(2, 2, b"hello", 8, pad=False)))),
    Fault("dirent-namelen-zero", _readdir_root,
          _const(dirents(dirent_bytes(2, 1, b"", 8)))),
    Fault("dirent-namelen-over-1024", _readdir_root,
          _const(dirents(dirent_bytes(2, 1, b"x" * 1025, 8)))),
    Fault("dirent-name-with-slash", _readdir_root,
          _const(dirents(dirent_bytes(2, 1, b"../etc", 8)))),
    Fault("dirent-name-with-nul", _readdir_root,
          _const(dirents(dirent_bytes(2, 1, b"hel\0lo", 8)))),
    Fault("dirent-bad-type", _readdir_root,
          _const(dirents(dirent_bytes(2, 1, b"hello", 99)))),
    Fault("dirent-trailing-bytes", _readdir_root,
          _const(dirents(dirent_bytes(2, 1, b"hello", 8), bytes(8)))),
    Fault("direntplus-bad-attr-forgotten", _readdirplus_root,
          lambda r: payload(_direntplus(r.tree, b"hello", mode=0o644)), forgets=3),
    Fault("direntplus-root-as-child", _readdirplus_root,
          lambda r: payload(_direntplus(r.tree) + entry_payload(r.tree, 1)
                            + dirent_bytes(1, 9, b"evil", 4)), forgets=3),
    Fault("direntplus-namelen-past-buffer", _readdirplus_root,
          lambda r: payload(_direntplus(r.tree)[:-8]), forgets=3),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_per_request_fault_is_a_typed_error_and_nothing_leaks(rig: Rig, fault: Fault) -> None:
    request = fault.request(rig)
    mutate = fault.mutate(rig)
    if fault.spill:
        mutate = _both(mutate, _set(spill=CANARY))
    armed = rig.arm(request.opcode, mutate)
    errors_before = rig.channel.protocol_errors
    with pytest.raises(DeviceProtocolError) as info:
        rig.call(request)
    assert armed.fired == 1
    assert_eio(info.value)
    assert CANARY not in str(info.value).encode(errors="replace")
    assert rig.channel.protocol_errors == errors_before + 1
    rig.settle()
    assert rig.channel.forgets_sent == fault.forgets
    rig.assert_serving()
    rig.assert_no_leaks(daemon_leak_ok=fault.daemon_leak_ok)


# ------------------------------------------------------------------------------------------
# Faults in the used ring that do not belong to one reply
# ------------------------------------------------------------------------------------------


def test_stray_head_never_submitted_is_ignored(rig: Rig) -> None:
    """A used entry for a head that is not in flight (free, or ≥ the queue size) changes
    nothing; the genuine completion after it is delivered with the right data."""
    vq = rig.transport.queues[1]
    rig.arm(Opcode.GETATTR, _set(before=lambda p: [((p.head + 7) % QUEUE_SIZE, 120),
                                                   (QUEUE_SIZE, 120), (0xFFFF_FFFF, 16)]))
    bogus = vq.bogus_completions
    attr = rig.call(rq.getattr(rig.tree.hello)).attr
    assert attr.ino == rig.tree.hello and attr.size == len(HELLO)
    assert vq.bogus_completions == bogus + 3
    rig.assert_serving()
    rig.assert_no_leaks()


def test_stray_head_instead_of_the_reply_then_late_reply(rig: Rig) -> None:
    """The device posts a wrong head and keeps the real chain: the caller gets ETIMEDOUT;
    when the chain finally comes back it is reclaimed, nothing is delivered, and the
    lookup the late positive reply carries is paid back with FORGET."""
    rig.arm(Opcode.LOOKUP, _set(hold=True, early=lambda p: [((p.head + 1) % QUEUE_SIZE, 144)]))
    t0 = time.monotonic()
    with pytest.raises(OSError) as info:
        rig.call(rq.lookup(FUSE_ROOT_ID, "hello"), timeout=0.3)
    assert info.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - t0 < 3.0
    assert rig.channel.in_flight == 1  # the device still owns it
    rig.assert_serving()
    assert rig.backend.release_held() == 1
    rig.settle()
    assert rig.channel.late_replies == 1 and rig.channel.forgets_sent == 1
    rig.assert_serving()
    rig.assert_no_leaks()


def test_head_completed_twice_in_one_batch_is_freed_once(rig: Rig) -> None:
    rig.arm(Opcode.GETATTR, _set(after=lambda p: [(p.head, p.used_len), (p.head, p.used_len)]))
    vq = rig.transport.queues[1]
    bogus = vq.bogus_completions
    assert rig.call(rq.getattr(FUSE_ROOT_ID)).attr.ino == FUSE_ROOT_ID
    assert vq.bogus_completions == bogus + 2
    rig.assert_serving()
    rig.assert_no_leaks()


def test_stale_duplicate_completes_a_reused_head_early(rig: Rig) -> None:
    """A duplicate completion of a head that has since been reused by another request
    arrives before that request's reply: the victim fails with EIO (its buffer holds a
    stale reply with another unique — never handed out as data), the genuine completion
    that follows is ignored, and nothing is freed twice."""
    first = rig.call(rq.getattr(FUSE_ROOT_ID))
    assert first.attr.ino == FUSE_ROOT_ID
    rig.arm(Opcode.GETATTR, _set(hold=True, early=lambda p: [(p.head, p.used_len)]))
    with pytest.raises(DeviceProtocolError) as info:
        rig.call(rq.getattr(rig.tree.hello))
    assert_eio(info.value)
    assert rig.backend.release_held() == 1
    rig.settle()
    assert rig.transport.queues[1].bogus_completions >= 1
    rig.assert_serving()
    rig.assert_no_leaks()


def test_reply_that_never_comes_times_out_and_later_requests_work(rig: Rig) -> None:
    rig.arm(Opcode.GETATTR, _set(hold=True))
    t0 = time.monotonic()
    with pytest.raises(OSError) as info:
        rig.call(rq.getattr(FUSE_ROOT_ID), timeout=0.3)
    elapsed = time.monotonic() - t0
    assert info.value.errno == errno.ETIMEDOUT and 0.3 <= elapsed < 3.0
    rig.assert_serving()  # other requests are served meanwhile
    # The FORGET assert_serving sent comes back on the hiprio queue in its own time.
    assert _wait(lambda: not rig.channel.harvest() and rig.channel.in_flight == 1, 2.0)
    # Until the device gives the chain back, its descriptors and buffer are the device's.
    assert rig.transport.queues[1].in_flight == 1 and rig.channel.allocator.allocations == 1
    rig.backend.release_held()
    rig.assert_no_leaks()


def test_late_read_reply_never_lands_in_the_callers_buffer(rig: Rig) -> None:
    rig.arm(Opcode.READ, _set(hold=True))
    sink = bytearray(b"\xee" * 64)
    with pytest.raises(OSError) as info:
        rig.call(rq.read(rig.tree.hello, rig.hello_fh, 0, 64), sink=memoryview(sink),
                 timeout=0.2)
    assert info.value.errno == errno.ETIMEDOUT
    rig.backend.release_held()
    rig.settle()
    assert sink == bytearray(b"\xee" * 64)  # the caller gave up: its memory is its own
    assert rig.channel.late_replies == 1
    rig.assert_no_leaks()


def test_late_open_reply_is_released(rig: Rig) -> None:
    """A late positive OPEN reply holds a daemon file handle: the channel releases it."""
    rig.arm(Opcode.OPEN, _set(hold=True))
    with pytest.raises(OSError):
        rig.call(rq.open(rig.tree.inner, os.O_RDONLY), timeout=0.2)
    rig.backend.release_held()
    rig.settle()
    assert rig.channel.releases_sent == 1
    assert set(rig.tree.open_files) == {rig.hello_fh}
    rig.assert_no_leaks()


def test_eventfd_storm_without_completions_stays_bounded(rig: Rig) -> None:
    """The device withholds the reply and hammers the call eventfd: the call still ends
    at its deadline (not at the end of the storm, never in a spin), delivers nothing,
    and the device works again afterwards."""
    rig.arm(Opcode.GETATTR, _set(hold=True, storm=1.5))
    t0 = time.monotonic()
    with pytest.raises(OSError) as info:
        rig.call(rq.getattr(FUSE_ROOT_ID), timeout=0.4)
    elapsed = time.monotonic() - t0
    assert info.value.errno == errno.ETIMEDOUT
    assert elapsed < 1.4, f"the storm stretched a 0.4 s timeout to {elapsed:.2f} s"
    assert rig.backend.storm_signals > 10  # it really stormed
    # Responsive during the storm: a well-formed request is answered promptly.
    t1 = time.monotonic()
    assert rig.call(rq.getattr(rig.tree.hello)).attr.ino == rig.tree.hello
    assert time.monotonic() - t1 < 1.0
    rig.backend.release_held()
    rig.assert_serving()
    rig.assert_no_leaks()


def test_spurious_notifications_deliver_nothing(rig: Rig) -> None:
    for _ in range(20):
        rig.backend.signal(1)
        rig.backend.signal(0)
    assert rig.channel.harvest() == []
    rig.assert_serving()
    rig.assert_no_leaks()


def test_used_idx_jump_beyond_queue_size_takes_the_queue_out_of_service(rig: Rig) -> None:
    """An impossible used.idx (moved by more than the queue size) means the ring cannot be
    trusted: the request fails with EIO at once, later ones are refused at once with the
    same typed error (no hang, nothing sent), and the transport still closes cleanly."""
    rig.arm(Opcode.GETATTR, _set(idx_skew=QUEUE_SIZE + 3))
    with pytest.raises(DeviceProtocolError) as info:
        rig.call(rq.getattr(FUSE_ROOT_ID))
    assert_eio(info.value)
    assert 1 in rig.channel.broken_queues()
    seen = len(rig.backend.requests)
    t0 = time.monotonic()
    with pytest.raises(DeviceProtocolError):
        rig.call(rq.getattr(FUSE_ROOT_ID))
    assert time.monotonic() - t0 < 0.5 and len(rig.backend.requests) == seen
    # Quarantined, not leaked: exactly the buffers the device may still write into.
    assert rig.channel.allocator.bytes_in_use == rig.channel.quarantined_bytes > 0
    rig.call(rq.forget(rig.tree.hello, 1))  # the hiprio queue is unaffected
    assert rig.backend.sync()


def test_device_closes_the_socket_mid_request(rig: Rig) -> None:
    rig.arm(Opcode.GETATTR, _set(close=True))
    t0 = time.monotonic()
    with pytest.raises(DeviceGone) as info:
        rig.call(rq.getattr(FUSE_ROOT_ID))
    assert info.value.errno == errno.ENOTCONN and time.monotonic() - t0 < 2.0
    t1 = time.monotonic()
    with pytest.raises(DeviceGone):
        rig.call(rq.getattr(FUSE_ROOT_ID))
    assert time.monotonic() - t1 < 0.5
    assert not rig.transport.alive()


def test_device_writes_unsolicited_bytes_on_the_socket(rig: Rig) -> None:
    """Bytes nobody asked for on the vhost-user socket: the backend is broken, treated as
    dead (ENOTCONN at once) instead of leaving a readable socket to spin on."""
    rig.arm(Opcode.GETATTR, _set(hold=True, unsolicited=b"\x01\x00\x00\x00" * 5))
    t0 = time.monotonic()
    with pytest.raises(DeviceGone):
        rig.call(rq.getattr(FUSE_ROOT_ID), timeout=3.0)
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_notification_modes_and_indirect_offer(event_idx: bool) -> None:
    """Sanity of the backend itself in both notification modes (and INDIRECT_DESC
    offered): the well-formed workload works and leaves nothing behind."""
    with make_rig(event_idx=event_idx, indirect=True, indirect_client=True) as r:
        assert r.transport.event_idx is event_idx
        assert r.transport.indirect
        assert r.transport.frontend.max_mem_slots() == 32
        for _ in range(3):
            r.assert_serving()
        r.assert_no_leaks()


def test_dot_and_dotdot_are_refused_as_names_before_the_device() -> None:
    """'.'/'..' are LOOKUP-able only: as names of new entries they never reach a device."""
    with make_rig() as r:
        seen = len(r.backend.requests)
        for build in (lambda n: rq.mkdir(FUSE_ROOT_ID, n, 0o755, 0),
                      lambda n: rq.create(FUSE_ROOT_ID, n, os.O_RDWR, 0o644, 0),
                      lambda n: rq.unlink(FUSE_ROOT_ID, n),
                      lambda n: rq.rmdir(FUSE_ROOT_ID, n)):
            for name in (".", ".."):
                with pytest.raises(OSError) as info:
                    r.call(build(name))
                assert info.value.errno == errno.EINVAL
        assert len(r.backend.requests) == seen
        # A device that lists extra '.' / '..' entries pointing elsewhere is passed through
        # as names only (Linux does the same); the facade tests below check nobody walks them.
        r.arm(Opcode.READDIR, dirents(dirent_bytes(99, 1, b"..", 4), dirent_bytes(98, 2, b".", 4),
                                      dirent_bytes(2, 3, b"hello", 8)))
        names = [d.name for d in r.call(rq.readdir(FUSE_ROOT_ID, r.root_fh, 0, 4096))]
        assert names == [b"..", b".", b"hello"]
        r.assert_no_leaks()


# ------------------------------------------------------------------------------------------
# A socket that misbehaves during the handshake
# ------------------------------------------------------------------------------------------

HANDSHAKE_FAULTS = [
    (ON_ACCEPT, "close", errno.ENOTCONN),
    (VU_GET_FEATURES, "close", errno.ENOTCONN),
    (VU_GET_PROTOCOL_FEATURES, "close", errno.ENOTCONN),
    (SET_MEM_TABLE, "close", errno.ENOTCONN),
    (SET_VRING_KICK, "close", errno.ENOTCONN),
    (VU_GET_FEATURES, "wrong-reply", errno.EPROTO),
    (VU_GET_FEATURES, "short-reply", errno.EPROTO),
    (VU_GET_QUEUE_NUM, "oversized-reply", errno.EPROTO),
    (SET_MEM_TABLE, "nack", errno.EIO),
    (VU_GET_FEATURES, "no-version-1", errno.EPROTONOSUPPORT),
    (VU_GET_QUEUE_NUM, "one-queue", errno.EINVAL),
    (VU_GET_QUEUE_NUM, "ignore", errno.ETIMEDOUT),
]


@pytest.mark.parametrize(("request_type", "action", "code"), HANDSHAKE_FAULTS,
                         ids=[f"{a}-at-{r}" for r, a, _ in HANDSHAKE_FAULTS])
def test_handshake_fault_is_a_clear_vhost_user_error(request_type: int, action: str,
                                                     code: int) -> None:
    fault = HandshakeFault(request_type, action)
    backend = VhostUserBackend(handshake_faults=[fault]).start()
    try:
        t0 = time.monotonic()
        frontend = VhostUserFrontend.connect(backend.socket_path, timeout=0.5)
        with pytest.raises(VhostUserError) as info:
            try:
                VhostUserTransport(frontend, memory_size=MEMORY, queue_size=QUEUE_SIZE)
            finally:
                frontend.close()
        assert info.value.errno == code, info.value
        assert time.monotonic() - t0 < 3.0
        assert backend.connected.is_set()
        assert _wait(lambda: fault.fired == 1)
    finally:
        backend.stop()


@pytest.mark.parametrize("action", ["ignore", "close", "wrong-reply"])
def test_backend_misbehaving_at_shutdown_does_not_hang_close(action: str) -> None:
    """GET_VRING_BASE unanswered, answered wrongly, or the socket dropped: close() still
    returns within the frontend's timeout and releases every fd and the guest memory."""
    fault = HandshakeFault(VU_GET_VRING_BASE, action)
    backend = VhostUserBackend(handshake_faults=[fault]).start()
    try:
        frontend = VhostUserFrontend.connect(backend.socket_path, timeout=0.5)
        transport = VhostUserTransport(frontend, memory_size=MEMORY, queue_size=QUEUE_SIZE)
        dev = BlockingDevice(transport, timeout=TIMEOUT)
        assert dev.call(rq.getattr(FUSE_ROOT_ID)).attr.ino == FUSE_ROOT_ID
        t0 = time.monotonic()
        transport.close()
        assert time.monotonic() - t0 < 2.0
        assert transport.memory.closed and not transport.alive()
        assert fault.fired == 1
    finally:
        backend.stop()


# ------------------------------------------------------------------------------------------
# The full actor stack: VirtioFS(transport)
# ------------------------------------------------------------------------------------------


@dataclass
class FsRig:
    backend: VhostUserBackend
    transport: VhostUserTransport
    fs: VirtioFS
    tree: TreeResponder

    def device_stats(self) -> dict[str, Any]:
        return self.fs.device.ask(DeviceStats(), timeout=5)

    def assert_no_leaks(self) -> None:
        """Device idle, every queue whole, every buffer back (read on the actor's terms:
        its stats, then the rings once it is idle)."""
        capacity = BufferAllocator(self.transport.buffer_start, self.transport.memory.size,
                                   64).capacity
        assert _wait(lambda: self.device_stats()["in_flight"] == 0), self.device_stats()
        stats = self.device_stats()
        assert stats["backlog"] == 0 and stats["bytes_free"] == capacity, stats
        for vq in self.transport.queues:
            assert vq.num_free == vq.size, vq
        assert self.backend.errors == [] and self.tree.errors == []


@contextlib.contextmanager
def make_fs(request_timeout: float = 5.0, **backend_kwargs: Any) -> Iterator[FsRig]:
    backend = VhostUserBackend(**backend_kwargs).start()
    try:
        transport = VhostUserTransport.connect(backend.socket_path, memory_size=MEMORY,
                                               queue_size=QUEUE_SIZE)
        fs = VirtioFS(transport, SessionConfig(request_timeout=request_timeout))
        try:
            yield FsRig(backend, transport, fs, backend.responder)
        finally:
            fs.close()
    finally:
        backend.stop()


def _assert_fs_works(r: FsRig) -> None:
    assert r.fs.stat("hello").st_size == len(HELLO)
    assert r.fs.read_bytes("sub/inner") == TreeResponder.INNER
    assert sorted(r.fs.listdir("/")) == ["empty", "hello", "sub"]


@dataclass(frozen=True)
class ActorFault:
    """A per-request fault seen through the facade."""

    name: str
    opcode: int
    mutate: Callable[[FsRig], Callable[[Plan], None]]
    op: Callable[[VirtioFS], Any]
    # The rejected reply hid what the daemon holds for it (a lookup or an open handle
    # behind a broken header): nobody can pay it back, on Linux either.
    daemon_leak_ok: bool = False


ACTOR_FAULTS = [
    ActorFault("stat-wrong-unique", Opcode.LOOKUP,
               lambda r: _hdr(unique=lambda p: p.request.unique + 9),
               lambda fs: fs.stat("hello"), daemon_leak_ok=True),
    ActorFault("stat-bad-attr", Opcode.LOOKUP,
               lambda r: payload(entry_payload(r.tree, r.tree.hello, mode=0o644)),
               lambda fs: fs.stat("hello")),
    ActorFault("stat-used-len-beyond-chain", Opcode.LOOKUP,
               lambda r: _set(used_len=lambda p: p.request.capacity + 8, spill=CANARY),
               lambda fs: fs.stat("sub/inner"), daemon_leak_ok=True),
    ActorFault("listdir-namelen-past-buffer", Opcode.READDIR,
               lambda r: dirents(DIRENT.pack(2, 1, 300, 8) + b"hello\0\0\0"),
               lambda fs: fs.listdir("/")),
    ActorFault("listdir-name-with-slash", Opcode.READDIR,
               lambda r: dirents(dirent_bytes(2, 1, b"a/b", 8)),
               lambda fs: fs.listdir("/")),
    ActorFault("scandir-direntplus-bad-attr", Opcode.READDIRPLUS,
               lambda r: payload(_direntplus(r.tree, b"sub", mtimensec=10**9)),
               lambda fs: list(fs.scandir("/"))),
    ActorFault("read-out-len-beyond-buffer", Opcode.READ, lambda r: _hdr(length=1 << 30),
               lambda fs: fs.read_bytes("hello")),
    ActorFault("read-error-with-payload", Opcode.READ, lambda r: _hdr(error=-errno.EIO),
               lambda fs: fs.read_bytes("hello")),
    ActorFault("open-truncated", Opcode.OPEN, lambda r: payload(b"\x01" * 9),
               lambda fs: fs.read_bytes("hello"), daemon_leak_ok=True),
    ActorFault("getattr-negative-size", Opcode.GETATTR,
               lambda r: payload(getattr_payload(r.tree, r.tree.hello, size=(1 << 64) - 5)),
               lambda fs: fs.open("hello", "rb").seek(0, os.SEEK_END)),
]


@pytest.mark.parametrize("fault", ACTOR_FAULTS, ids=[f.name for f in ACTOR_FAULTS])
def test_actor_stack_fault_is_eio_and_the_share_keeps_working(fault: ActorFault) -> None:
    with make_fs() as r:
        armed = r.backend.arm(fault.opcode, fault.mutate(r))
        with pytest.raises(OSError) as info:
            fault.op(r.fs)
        assert armed.fired == 1
        assert info.value.errno == errno.EIO, repr(info.value)
        _assert_fs_works(r)
        r.assert_no_leaks()
        assert r.device_stats()["protocol_errors"] == 1
    # After close: every handle released, every lookup (the rejected ones too) forgotten.
    assert r.tree.destroyed
    if not fault.daemon_leak_ok:
        assert r.tree.open_files == {} and r.tree.open_dirs == {}
        assert r.tree.outstanding_lookups() == {}


def test_actor_stack_dot_entries_are_never_walked_or_cached() -> None:
    """A listing whose '.' and '..' claim other nodes (with junk attributes): the facade
    hides them, the session caches none of them, and '..' in a path still climbs our own
    stack, never to the device's claim."""
    with make_fs() as r:
        def evil(plan: Plan) -> None:
            junk = ENTRY_OUT.pack(77, 0, 1, 1, 0, 0, *([0] * 9 + [0o644] + [0] * 6))
            body = (junk + dirent_bytes(77, 1, b"..", 4) + junk + dirent_bytes(78, 2, b".", 4)
                    + _direntplus(r.tree))
            plan.set_reply(reply_bytes(plan.request.unique, body))

        r.backend.arm(Opcode.READDIRPLUS, evil)
        assert sorted(e.name for e in r.fs.scandir("/")) == ["empty", "hello", "sub"]
        last = len(r.tree.listing(FUSE_ROOT_ID))  # a cookie past the end: no second page
        r.backend.arm(Opcode.READDIR, dirents(dirent_bytes(99, 1, b"..", 4),
                                              dirent_bytes(2, last, b"hello", 8)))
        assert r.fs.listdir("/") == ["hello"]
        assert r.fs.stat("sub/..").st_ino == FUSE_ROOT_ID
        assert r.fs.stat("sub/../sub/./inner").st_size == len(TreeResponder.INNER)
        assert b".." not in [req.name for req in r.backend.requests
                             if req.opcode == Opcode.LOOKUP]
        r.assert_no_leaks()
    assert r.tree.outstanding_lookups() == {}


def test_actor_stack_reply_that_never_comes_times_out() -> None:
    with make_fs(request_timeout=0.5) as r:
        r.backend.arm(Opcode.LOOKUP, _set(hold=True))
        t0 = time.monotonic()
        with pytest.raises(OSError) as info:
            r.fs.stat("hello")
        assert info.value.errno == errno.ETIMEDOUT and time.monotonic() - t0 < 3.0
        assert r.fs.read_bytes("sub/inner") == TreeResponder.INNER  # still serving
        r.backend.release_held()
        _assert_fs_works(r)
        r.assert_no_leaks()


def test_actor_stack_late_lookup_reply_is_forgotten() -> None:
    """A caller that timed out abandons its request in the device actor: the late
    positive LOOKUP reply's lookup is forgotten, not leaked."""
    with make_fs(request_timeout=0.3) as r:
        r.backend.arm(Opcode.LOOKUP, _set(hold=True), match=lambda q: q.name == b"empty")
        with pytest.raises(OSError):
            r.fs.stat("empty")
        r.backend.release_held()
        r.assert_no_leaks()
    assert r.tree.outstanding_lookups() == {}


def test_actor_stack_eventfd_storm_stays_responsive() -> None:
    with make_fs(request_timeout=0.5) as r:
        r.backend.arm(Opcode.LOOKUP, _set(hold=True, storm=2.0))
        t0 = time.monotonic()
        with pytest.raises(OSError) as info:
            r.fs.stat("hello")
        assert info.value.errno == errno.ETIMEDOUT and time.monotonic() - t0 < 2.0
        # The device actor keeps answering while the storm rages.
        latencies = []
        for _ in range(5):
            t1 = time.monotonic()
            stats = r.device_stats()
            latencies.append(time.monotonic() - t1)
        assert stats["in_flight"] == 1 and max(latencies) < 1.0, latencies
        assert r.fs.read_bytes("sub/inner") == TreeResponder.INNER
        assert r.backend.storm_signals > 10
        r.backend.release_held()
        r.assert_no_leaks()


def test_actor_stack_daemon_closes_socket_mid_request() -> None:
    with make_fs() as r:
        r.backend.arm(Opcode.LOOKUP, _set(close=True))
        t0 = time.monotonic()
        with pytest.raises(OSError) as info:
            r.fs.stat("hello")
        assert info.value.errno == errno.ENOTCONN and time.monotonic() - t0 < 2.0
        t1 = time.monotonic()
        with pytest.raises(OSError) as again:
            r.fs.listdir("/")
        assert again.value.errno == errno.ENOTCONN and time.monotonic() - t1 < 1.0
        assert r.device_stats()["dead"]


def test_actor_stack_used_idx_jump_fails_fast_afterwards() -> None:
    with make_fs() as r:
        r.backend.arm(Opcode.LOOKUP, _set(idx_skew=QUEUE_SIZE * 2 + 1))
        with pytest.raises(OSError) as info:
            r.fs.stat("hello")
        assert info.value.errno == errno.EIO
        t0 = time.monotonic()
        with pytest.raises(OSError) as again:
            r.fs.stat("sub")
        assert again.value.errno == errno.EIO and time.monotonic() - t0 < 1.0


@pytest.mark.parametrize(("major", "minor", "code"), [
    (6, 36, errno.EIO), (8, 0, errno.EIO), (7, 26, errno.EPROTONOSUPPORT),
    (7, 0, errno.EPROTONOSUPPORT)], ids=["major-6", "major-8", "minor-26", "minor-0"])
def test_actor_stack_init_with_unsupported_version(major: int, minor: int, code: int) -> None:
    backend = VhostUserBackend().start()
    try:
        backend.arm(Opcode.INIT, init_version(major, minor))
        transport = VhostUserTransport.connect(backend.socket_path, memory_size=MEMORY,
                                               queue_size=QUEUE_SIZE)
        with pytest.raises(OSError) as info:
            VirtioFS(transport, SessionConfig(request_timeout=5))
        assert info.value.errno == code
        assert _wait(backend.disconnected.is_set)  # the failed mount closed the transport
    finally:
        backend.stop()
    assert [op for op in backend.ops() if op != "DESTROY"] == ["INIT"]


# ------------------------------------------------------------------------------------------
# Hypothesis: valid replies mutated at random
# ------------------------------------------------------------------------------------------


def _flip(reply: bytes, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(reply)
    for pos, bit in flips:
        if b:
            b[pos % len(b)] ^= 1 << bit
    return bytes(b)


MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 7)),
                                        min_size=1, max_size=4)),
    st.tuples(st.just("truncate"), st.integers(0, 200), st.booleans()),
    st.tuples(st.just("out.len"), st.one_of(st.integers(0, 300), st.integers(0, (1 << 32) - 1))),
    st.tuples(st.just("unique"), st.one_of(
        st.integers(-2, 2), st.integers(0, (1 << 64) - 1).map(lambda u: ("abs", u)))),
    st.tuples(st.just("used.len"), st.one_of(st.integers(0, 300), st.integers(0, (1 << 32) - 1))),
    st.tuples(st.just("error"), st.integers(-(1 << 31), (1 << 31) - 1)),
)


def _apply(plan: Plan, mutation: tuple[Any, ...]) -> None:
    kind = mutation[0]
    reply = plan.reply or b""
    if kind == "flip":
        plan.reply = _flip(reply, mutation[1])
    elif kind == "truncate":
        n = mutation[1] % (len(reply) + 1)
        plan.reply = reply[:n]
        plan.used_len = n
        if mutation[2] and n >= 16:
            plan.reply = struct.pack("<I", n) + plan.reply[4:]
    elif len(reply) >= 16:
        ln, err, uniq = struct.unpack_from("<IiQ", reply, 0)
        if kind == "out.len":
            ln = mutation[1]
        elif kind == "unique":
            u = mutation[1]
            uniq = u[1] if isinstance(u, tuple) else (uniq + u) % (1 << 64)
        elif kind == "error":
            err = mutation[1]
        if kind == "used.len":
            plan.used_len = mutation[1]
        else:
            plan.reply = struct.pack("<IiQ", ln, err, uniq) + reply[16:]


def _reference(request: FuseRequest, plan: Plan, unique: int) -> Any:
    """What a correct client must make of exactly these bytes: the decoded value, an
    ``OSError`` errno, or ``"EIO"`` for a protocol error. Independent of the channel."""
    capacity = plan.request.capacity
    buf = bytearray(plan.request.initial)
    written = (plan.reply or b"")[:capacity]
    buf[:len(written)] = written
    if plan.used_len > capacity:
        return "EIO"
    try:
        err, body = parse_out_header(bytes(buf), plan.used_len, unique)
        if err:
            return ("errno", err)
        if request.opcode == Opcode.READ:
            return bytes(body) if len(body) <= request.reply_size else "EIO"
        return decode_reply(request, body)
    except FuseProtocolError:
        return "EIO"


def test_hypothesis_mutated_replies_give_typed_errors_or_correct_data() -> None:
    with make_rig() as r:
        tree = r.tree
        requests: list[Callable[[], FuseRequest]] = [
            lambda: rq.getattr(FUSE_ROOT_ID),
            lambda: rq.getattr(tree.hello),
            lambda: rq.lookup(FUSE_ROOT_ID, "hello"),
            lambda: rq.lookup(tree.sub, "inner"),
            lambda: rq.lookup(FUSE_ROOT_ID, "missing"),
            lambda: rq.read(tree.hello, r.hello_fh, 0, 64),
            lambda: rq.read(tree.hello, r.hello_fh, 5, 7),
            lambda: rq.readdir(FUSE_ROOT_ID, r.root_fh, 0, 4096),
            lambda: rq.readdirplus(FUSE_ROOT_ID, r.root_fh, 0, 4096),
            lambda: rq.statfs(FUSE_ROOT_ID),
            lambda: rq.write(tree.hello, r.hello_fh, 0, b"hello"),
            lambda: rq.init(1 << 20),
        ]
        state = {"examples": 0, "errors": 0, "data": 0}

        @settings(max_examples=200, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(which=st.integers(0, len(requests) - 1),
               mutations=st.lists(MUTATIONS, min_size=1, max_size=3),
               use_sink=st.booleans())
        def run(which: int, mutations: list[tuple[Any, ...]], use_sink: bool) -> None:
            request = requests[which]()
            seen: list[Plan] = []

            def mutate(plan: Plan) -> None:
                for m in mutations:
                    _apply(plan, m)
                seen.append(plan)

            armed = r.arm(request.opcode, mutate)
            sink = bytearray(b"\xee" * request.reply_size) if (
                use_sink and request.opcode == Opcode.READ) else None
            try:
                result: Any = r.call(request, sink=None if sink is None else memoryview(sink))
                outcome: Any = result
            except DeviceProtocolError as exc:
                assert_eio(exc)
                outcome = "EIO"
            except OSError as exc:
                assert not isinstance(exc, FuseProtocolError)
                assert exc.errno not in (errno.ETIMEDOUT, errno.ENOTCONN), exc
                outcome = ("errno", exc.errno)
            assert armed.fired == 1 and len(seen) == 1
            expected = _reference(request, seen[0], seen[0].request.unique)
            if sink is not None and isinstance(expected, bytes):
                assert outcome == len(expected)
                assert bytes(sink[:outcome]) == expected
                assert sink[outcome:] == b"\xee" * (len(sink) - outcome)
            else:
                if sink is not None:
                    assert sink == b"\xee" * len(sink)  # untouched on any error
                assert outcome == expected
            state["examples"] += 1
            state["errors" if isinstance(outcome, (str, tuple)) else "data"] += 1
            r.settle()
            assert r.channel.broken_queues() == {}
            for vq in r.transport.queues:
                assert vq.num_free == vq.size
            assert r.channel.allocator.bytes_in_use == 0
            assert r.channel.decode_failures == 0

        run()
        assert state["examples"] >= 100 and state["errors"] > 0 and state["data"] > 0, state
        r.assert_serving()
        assert r.backend.errors == [] and r.tree.errors == []
