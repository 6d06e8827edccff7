"""The in-process API: a virtio-fs share with the ``os`` module's names and conventions.

    from api import connect
    with connect("/srv/share") as fs:          # starts a private virtiofsd
        fs.mkdir("docs")
        with fs.open("docs/a.txt", "w") as f:
            f.write("hello")
        print(fs.listdir("docs"), fs.stat("docs/a.txt").st_size)

Every call becomes a message to the session actor (metadata) or straight to a file or
directory actor (data); errors are the ``OSError`` subclasses ``os`` raises, with
``errno`` and ``filename`` set.
"""

from __future__ import annotations

import copy
import errno
import os
from typing import Any

import msgspec
import pykka

from actors.device import DeviceActor
from actors.session import SessionConfig, open_session
from api.fs import DirEntry, RawFile, ShareFS
from codec import messages as m
from hw.transport import VhostUserTransport, VirtioTransport, open_private_device

__all__ = ["DirEntry", "RawFile", "VirtioFS", "connect"]


def connect(shared_dir: str | os.PathLike[str] | None = None, *, socket: str | None = None,
            tag: str | None = None, virtiofsd: str | None = None, cache: str = "auto",
            busy_poll: bool = False, **transport_kwargs: Any) -> VirtioFS:
    """Open a share: ``connect(DIR)`` starts a private virtiofsd on DIR;
    ``connect(socket=PATH)`` attaches to a daemon already listening there.

    ``transport_kwargs`` go to the transport (``queue_size``, ``memory_size``, …)."""
    if (shared_dir is None) == (socket is None):
        raise TypeError("connect() takes a directory or socket=..., not both")
    if shared_dir is not None:
        transport: VirtioTransport = open_private_device(shared_dir, binary=virtiofsd,
                                                         cache=cache, **transport_kwargs)
    else:
        assert socket is not None
        transport = VhostUserTransport.connect(socket, **transport_kwargs)
    return VirtioFS(transport, SessionConfig(tag=tag), busy_poll=busy_poll)


def _fix_filename(exc: OSError) -> OSError:
    """Messages carry paths as bytes; callers passed str: give them str back."""
    if isinstance(exc.filename, bytes) or isinstance(exc.filename2, bytes):
        f1 = os.fsdecode(exc.filename) if exc.filename is not None else None
        f2 = os.fsdecode(exc.filename2) if exc.filename2 is not None else None
        return OSError(exc.errno, exc.strerror, f1, None, f2)
    return exc


class VirtioFS(ShareFS):
    """A mounted share, in-process. Thread-safe: every call is a message to an actor."""

    def __init__(self, transport: VirtioTransport, config: SessionConfig | None = None, *,
                 busy_poll: bool = False) -> None:
        self.transport = transport
        self.device = DeviceActor.start(transport, busy_poll=busy_poll)
        try:
            self.session = open_session(self.device, config)
        except BaseException:
            self.device.stop()
            raise
        self._closed = False
        self._owner = True
        self.ctx: m.Credentials | None = None

    def as_user(self, uid: int, gid: int, pid: int | None = None) -> VirtioFS:
        """A view of this share whose requests carry other credentials (the FUSE request
        context): the daemon checks permissions and assigns ownership as that user.
        Closing the view does not close the share."""
        view = copy.copy(self)
        view._owner = False
        view.ctx = (uid, gid, os.getpid() if pid is None else pid)
        return view

    @property
    def daemon_pid(self) -> int | None:
        """The pid of the virtiofsd this share started (None when attached to a socket)."""
        daemon = getattr(self.transport, "daemon", None)
        return daemon.pid if daemon is not None else None

    # -- transport hooks --------------------------------------------------------------------

    def _ask_actor(self, ref: Any, message: Any, name: str | None = None) -> Any:
        if self.ctx is not None:
            message = msgspec.structs.replace(message, ctx=self.ctx)
        try:
            return ref.ask(message)
        except pykka.ActorDeadError:
            if ref is self.session:
                raise OSError(errno.ENOTCONN, "the share is closed") from None
            raise OSError(errno.EBADF, "file handle is gone", name) from None
        except OSError as exc:
            raise _fix_filename(exc) from None

    def _ask(self, message: Any) -> Any:
        return self._ask_actor(self.session, message)

    def _open_file(self, message: m.Open) -> tuple[Any, int]:
        opened: m.OpenedFile = self._ask(message)
        return opened.actor, opened.flags

    def _open_dir(self, message: m.OpenDir) -> Any:
        opened: m.OpenedDir = self._ask(message)
        return opened.actor

    def _ask_handle(self, handle: Any, message: Any, name: str | None = None) -> Any:
        return self._ask_actor(handle, message, name)

    def _readinto(self, handle: Any, buffer: Any, name: str | None = None) -> int:
        # In-process the file actor copies straight from guest memory into the buffer.
        return self._ask_actor(handle, m.ReadInto(buffer=buffer), name)

    def _close_handle(self, handle: Any) -> None:
        try:
            handle.ask(m.Close())
        except pykka.ActorDeadError:
            pass

    def close(self) -> None:
        """Release every handle, forget every node, stop the device and its daemon."""
        if self._closed or not self._owner:
            return
        self._closed = True
        self.session.stop()
        self.device.stop()

    def __enter__(self) -> VirtioFS:
        return self

    def stats(self) -> dict[str, Any]:
        """Counters of the session and the device (requests per opcode, nodes, …)."""
        return {"session": self._ask(m.SessionStats()),
                "device": self.device.ask(m.DeviceStats())}
