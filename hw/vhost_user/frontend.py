"""The vhost-user frontend: the part QEMU plays for a VM, spoken over a Unix socket.

Only what a virtio-fs device needs: feature negotiation, the memory table, vring set-up,
and shutdown. Message layout (QEMU ``docs/interop/vhost-user.rst``): a 12-byte header
``u32 request, u32 flags, u32 size`` followed by ``size`` bytes of payload; file
descriptors travel as SCM_RIGHTS ancillary data with the message that carries them.

Everything here is synchronous and runs only during set-up and tear-down; the data path
never touches the socket (it uses the rings and eventfds). After set-up the socket is
watched for EOF, which is how a dead daemon shows itself.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum

log = logging.getLogger(__name__)

__all__ = [
    "MemoryRegion",
    "ProtocolFeature",
    "VhostUserError",
    "VhostUserFrontend",
    "VirtioFeature",
    "VringConfig",
]


class VhostUserError(OSError):
    """The vhost-user backend is missing, refused a request, or went away."""


class Request(IntEnum):
    """Frontend → backend message types (vhost-user.rst, "Front-end message types")."""

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


class VirtioFeature(IntEnum):
    """Device feature bits we care about (virtio 1.2 §6 and vhost-user)."""

    NOTIFY_ON_EMPTY = 24
    INDIRECT_DESC = 28
    EVENT_IDX = 29
    PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 32


class ProtocolFeature(IntEnum):
    """vhost-user protocol feature bits."""

    MQ = 0
    REPLY_ACK = 3
    CONFIG = 9
    CONFIGURE_MEM_SLOTS = 15


_VERSION = 0x1
_REPLY = 0x4
_NEED_REPLY = 0x8
_HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_MEM_REGION = struct.Struct("<QQQQ")
_MEM_TABLE_HEAD = struct.Struct("<II")
_MAX_PAYLOAD = 4096  # replies we read are all tiny; anything bigger is a broken backend


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One guest memory region as the backend must map it."""

    guest_phys_addr: int
    size: int
    user_addr: int
    fd: int
    mmap_offset: int = 0


@dataclass(frozen=True, slots=True)
class VringConfig:
    """Where one split virtqueue lives, in the frontend's virtual addresses."""

    index: int
    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    kick_fd: int
    call_fd: int


def _bit(n: int) -> int:
    return 1 << n


class VhostUserFrontend:
    """A connected vhost-user frontend. Synchronous; not thread-safe (set-up only).

    ``timeout`` bounds every reply we wait for, so a backend that hangs during set-up
    gives a clear error instead of a hang.
    """

    def __init__(self, sock: socket.socket, *, timeout: float = 10.0) -> None:
        self._sock = sock
        self._timeout = timeout
        self.features = 0
        self.protocol_features = 0
        self._closed = False

    @classmethod
    def connect(cls, path: str, *, timeout: float = 10.0) -> VhostUserFrontend:
        """Connect to a backend listening on the Unix socket ``path``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise VhostUserError(
                exc.errno or errno.ECONNREFUSED,
                f"cannot connect to vhost-user socket {path}: {exc.strerror or exc}",
            ) from exc
        return cls(sock, timeout=timeout)

    # -- framing ---------------------------------------------------------------------

    def fileno(self) -> int:
        """The socket's fd; it turns readable (EOF) when the backend dies."""
        return self._sock.fileno()

    def _send(self, request: Request, payload: bytes = b"", fds: list[int] | None = None,
              *, need_reply: bool = False) -> None:
        if self._closed:
            raise VhostUserError(errno.ENOTCONN, "vhost-user connection is closed")
        flags = _VERSION | (_NEED_REPLY if need_reply else 0)
        msg = _HEADER.pack(request, flags, len(payload)) + payload
        try:
            if fds:
                socket.send_fds(self._sock, [msg], fds)
            else:
                self._sock.sendall(msg)
        except OSError as exc:
            raise VhostUserError(
                errno.ENOTCONN, f"vhost-user backend gone while sending {request.name}: {exc}"
            ) from exc

    def _recv_exact(self, n: int, what: str) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self._sock.recv(n - len(buf))
            except TimeoutError as exc:
                raise VhostUserError(
                    errno.ETIMEDOUT, f"vhost-user backend did not answer {what}"
                ) from exc
            except OSError as exc:
                raise VhostUserError(errno.ENOTCONN, f"vhost-user {what}: {exc}") from exc
            if not chunk:
                raise VhostUserError(
                    errno.ENOTCONN, f"vhost-user backend closed the connection during {what}"
                )
            buf += chunk
        return bytes(buf)

    def _recv_reply(self, request: Request) -> bytes:
        what = request.name
        req, flags, size = _HEADER.unpack(self._recv_exact(_HEADER.size, what))
        if req != request or not flags & _REPLY:
            raise VhostUserError(
                errno.EPROTO, f"vhost-user: expected reply to {what}, got request {req}"
            )
        if size > _MAX_PAYLOAD:
            raise VhostUserError(errno.EPROTO, f"vhost-user: oversized reply to {what}")
        return self._recv_exact(size, what)

    def _get_u64(self, request: Request) -> int:
        self._send(request)
        payload = self._recv_reply(request)
        if len(payload) != _U64.size:
            raise VhostUserError(errno.EPROTO, f"vhost-user: bad {request.name} reply size")
        return _U64.unpack(payload)[0]

    def _set(self, request: Request, payload: bytes, fds: list[int] | None = None) -> None:
        """Send a set-style message; with REPLY_ACK, wait for and check the ack."""
        ack = bool(self.protocol_features & _bit(ProtocolFeature.REPLY_ACK))
        self._send(request, payload, fds, need_reply=ack)
        if ack:
            payload = self._recv_reply(request)
            if len(payload) != _U64.size:
                raise VhostUserError(errno.EPROTO, f"vhost-user: bad ack for {request.name}")
            status = _U64.unpack(payload)[0]
            if status != 0:
                raise VhostUserError(
                    errno.EIO, f"vhost-user backend refused {request.name} (status {status})"
                )

    # -- negotiation -----------------------------------------------------------------

    def negotiate(self, wanted: int) -> int:
        """Negotiate device features; returns the acknowledged set.

        ``wanted`` is the set of optional virtio features the driver can use; VERSION_1 is
        required (a legacy device is not supported), PROTOCOL_FEATURES is taken when
        offered because it is how REPLY_ACK and MQ become available.
        """
        offered = self._get_u64(Request.GET_FEATURES)
        if not offered & _bit(VirtioFeature.VERSION_1):
            raise VhostUserError(errno.EPROTONOSUPPORT, "device does not offer VIRTIO_F_VERSION_1")
        acked = offered & (wanted | _bit(VirtioFeature.VERSION_1))
        if offered & _bit(VirtioFeature.PROTOCOL_FEATURES):
            acked |= _bit(VirtioFeature.PROTOCOL_FEATURES)
            proto = self._get_u64(Request.GET_PROTOCOL_FEATURES)
            self.protocol_features = proto & (
                _bit(ProtocolFeature.MQ)
                | _bit(ProtocolFeature.REPLY_ACK)
                | _bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
            )
            # SET_PROTOCOL_FEATURES itself is never acked: the backend only learns of
            # REPLY_ACK from this very message.
            self._send(Request.SET_PROTOCOL_FEATURES, _U64.pack(self.protocol_features))
        self._send(Request.SET_OWNER)
        self._set(Request.SET_FEATURES, _U64.pack(acked))
        self.features = acked
        return acked

    def has_feature(self, bit: int) -> bool:
        return bool(self.features & _bit(bit))

    def queue_count(self) -> int | None:
        """The backend's queue count (GET_QUEUE_NUM), or None without MQ."""
        if not self.protocol_features & _bit(ProtocolFeature.MQ):
            return None
        return self._get_u64(Request.GET_QUEUE_NUM)

    def max_mem_slots(self) -> int | None:
        if not self.protocol_features & _bit(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            return None
        return self._get_u64(Request.GET_MAX_MEM_SLOTS)

    # -- memory and rings ------------------------------------------------------------

    def set_mem_table(self, regions: list[MemoryRegion]) -> None:
        payload = bytearray(_MEM_TABLE_HEAD.pack(len(regions), 0))
        for r in regions:
            payload += _MEM_REGION.pack(r.guest_phys_addr, r.size, r.user_addr, r.mmap_offset)
        self._set(Request.SET_MEM_TABLE, bytes(payload), [r.fd for r in regions])

    def setup_vring(self, ring: VringConfig) -> None:
        """Configure and start one split virtqueue (num, base, addresses, eventfds, enable)."""
        self._set(Request.SET_VRING_NUM, _VRING_STATE.pack(ring.index, ring.size))
        self._set(Request.SET_VRING_BASE, _VRING_STATE.pack(ring.index, 0))
        self._set(
            Request.SET_VRING_ADDR,
            _VRING_ADDR.pack(ring.index, 0, ring.desc_addr, ring.used_addr, ring.avail_addr, 0),
        )
        # The call fd first: once the kick fd is set the backend may start the ring.
        self._set(Request.SET_VRING_CALL, _U64.pack(ring.index), [ring.call_fd])
        self._set(Request.SET_VRING_KICK, _U64.pack(ring.index), [ring.kick_fd])
        if self.features & _bit(VirtioFeature.PROTOCOL_FEATURES):
            # With protocol features, rings start disabled (vhost-user.rst "Ring states").
            self._set(Request.SET_VRING_ENABLE, _VRING_STATE.pack(ring.index, 1))

    def stop_vring(self, index: int) -> int:
        """GET_VRING_BASE: stops the ring and returns the backend's next avail index."""
        self._send(Request.GET_VRING_BASE, _VRING_STATE.pack(index, 0))
        payload = self._recv_reply(Request.GET_VRING_BASE)
        if len(payload) != _VRING_STATE.size:
            raise VhostUserError(errno.EPROTO, "vhost-user: bad GET_VRING_BASE reply")
        return _VRING_STATE.unpack(payload)[1]

    def backend_alive(self) -> bool:
        """False once the backend has closed its end (EOF or error on the socket), or has
        written something we did not ask for.

        Outside set-up and shutdown the frontend has no request outstanding, so bytes
        waiting on the socket are a protocol violation: nothing the backend does can be
        trusted after it, and treating it as alive would leave the socket readable
        forever — every poll on :meth:`fileno` would return at once (a busy loop).
        Only call this when no reply is expected (the transport's data path does).
        """
        if self._closed:
            return False
        r, _, _ = select.select([self._sock], [], [], 0)
        if not r:
            return True
        try:
            pending = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if pending:
            log.error("vhost-user backend sent unsolicited data; treating it as dead")
        return False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

