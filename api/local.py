"""The in-process API: a virtio-fs share with the ``os`` module's names and conventions.

    from pyvirtiofs.api import connect
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

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import pykka

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.channel import RequestContext
from pyvirtiofs.actors.device import DeviceActor
from pyvirtiofs.actors.device_client import DeviceClient
from pyvirtiofs.actors.published import PublishedAttrs
from pyvirtiofs.actors.session import SessionConfig, open_session
from pyvirtiofs.api.fs import DirEntry, PathLike, RawFile, ShareFS
from pyvirtiofs.hw.transport import VirtioTransport
from pyvirtiofs.hw.vhost_user.transport import VhostUserTransport, open_private_device

log = logging.getLogger(__name__)

__all__ = ["DirEntry", "RawFile", "VirtioFS", "connect"]


def connect(shared_dir: str | os.PathLike[str] | None = None, *, socket: str | None = None,
            device: str | None = None,
            tag: str | None = None, root: str | None = None, virtiofsd: str | None = None,
            cache: str = "auto", busy_poll: bool = False, restart: bool = False,
            max_request: int | None = None, max_in_flight: int | None = None,
            read_ahead: bool = True, **transport_kwargs: Any) -> VirtioFS:
    """Open a share: ``connect(DIR)`` starts a private virtiofsd on DIR;
    ``connect(socket=PATH)`` attaches to a daemon already listening there;
    ``connect(device="pci:TAG")`` drives a virtio-fs device of the VM this runs in
    (``pci:ADDRESS``, ``mmio:TAG``, ``mmio:0xADDRESS`` too; root, hugepages: see
    docs/GUEST.md), taking ``completions=`` and ``take=`` among ``transport_kwargs``.

    ``restart``: when the daemon dies, the call that saw it fails (ENOTCONN) and the next
    call starts a new daemon and session; handles opened before fail with ESTALE. Only
    for ``connect(DIR)``: a daemon we did not start cannot be brought back by us.
    ``max_request`` caps the bytes of one READ/WRITE (default: the negotiated maximum) and
    ``max_in_flight`` the requests on the rings at once (default: as many as fit);
    ``read_ahead=False`` never requests data before it is asked for;
    ``max_request=65536, max_in_flight=1, read_ahead=False`` behaves like the Hermit driver.
    ``transport_kwargs`` go to the transport (``queue_size``, ``memory_size``, …)."""
    if sum(x is not None for x in (shared_dir, socket, device)) != 1:
        raise TypeError("connect() takes exactly one of a directory, socket=... or device=...")
    config = SessionConfig(tag=tag, root=root, max_request=max_request, read_ahead=read_ahead)
    if device is not None:
        if restart:
            raise ValueError("restart=True needs a directory: a device's daemon runs on the "
                             "VM's host, out of our reach")
        from pyvirtiofs.hw.guest import open_device

        return VirtioFS(open_device(device, **transport_kwargs), config, busy_poll=busy_poll,
                        max_in_flight=max_in_flight)
    if shared_dir is None:
        assert socket is not None
        if restart:
            raise ValueError("restart=True needs a directory: we can only restart our daemon")
        return VirtioFS(VhostUserTransport.connect(socket, **transport_kwargs), config,
                        busy_poll=busy_poll, max_in_flight=max_in_flight)

    def open_transport() -> VirtioTransport:
        return open_private_device(shared_dir, binary=virtiofsd, cache=cache,
                                   **transport_kwargs)

    return VirtioFS(open_transport(), config, busy_poll=busy_poll,
                    max_in_flight=max_in_flight, reopen=open_transport if restart else None)


def _fix_filename(exc: OSError) -> OSError:
    """Messages carry paths as bytes; callers passed str: give them str back."""
    if isinstance(exc.filename, bytes) or isinstance(exc.filename2, bytes):
        f1 = os.fsdecode(exc.filename) if exc.filename is not None else None
        f2 = os.fsdecode(exc.filename2) if exc.filename2 is not None else None
        return OSError(exc.errno, exc.strerror, f1, None, f2)
    return exc


class _Connection:
    """The device and session actors of one share, and how to bring them back after the
    daemon died. Shared by a share object and its :meth:`VirtioFS.as_user` views."""

    def __init__(self, transport: VirtioTransport, config: SessionConfig | None,
                 device_options: dict[str, Any],
                 reopen: Callable[[], VirtioTransport] | None) -> None:
        self.config = config
        self.device_options = device_options  # DeviceActor keywords
        self.reopen = reopen
        self.lock = threading.Lock()
        self.generation = 0
        self.lost = False  # a call saw ENOTCONN: the next call restarts (when allowed)
        self.closed = False
        self._start(transport)

    def _start(self, transport: VirtioTransport) -> None:
        self.transport = transport
        self.published = PublishedAttrs()
        # The credentials requests carry by default: a daemon in a user namespace where we
        # are root needs (0, 0) (the transport says so); otherwise the caller's own.
        creds = getattr(transport, "default_credentials", None)
        ctx = RequestContext(creds[0], creds[1], os.getpid()) if creds else None
        self.device = DeviceActor.start(transport, ctx=ctx, **self.device_options)
        timeout = (self.config or SessionConfig()).request_timeout
        self.client = DeviceClient(self.device, timeout=timeout)
        # Every task completes: the device fails what it cannot answer by its deadline.
        # A caller still waits only so long, in case of a bug.
        self.wait_limit = 2 * timeout + 10
        try:
            self.session = open_session(self.client, self.config, self.published)
        except BaseException:
            self.device.stop()
            raise

    def mark_lost(self, generation: int) -> None:
        """A call made under ``generation`` saw ENOTCONN. Only the current generation's
        loss counts: a caller still on a daemon that was already replaced must not get the
        healthy new one restarted (and its callers' requests failed) for nothing."""
        if generation == self.generation:
            self.lost = True

    def restart_if_lost(self) -> None:
        if not self.lost or self.reopen is None:
            return
        with self.lock:
            if not self.lost or self.closed:
                return
            log.warning("virtio-fs device lost; starting a new daemon and session")
            self.stop()
            self._start(self.reopen())
            self.generation += 1
            self.lost = False

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.session.stop(timeout=self.wait_limit)
        with contextlib.suppress(Exception):
            self.device.stop()


class VirtioFS(ShareFS):
    """A mounted share, in-process. Thread-safe: every call is a message to an actor."""

    def __init__(self, transport: VirtioTransport, config: SessionConfig | None = None, *,
                 busy_poll: bool = False, max_in_flight: int | None = None,
                 reopen: Callable[[], VirtioTransport] | None = None) -> None:
        self._conn = _Connection(transport, config,
                                 {"busy_poll": busy_poll, "max_in_flight": max_in_flight},
                                 reopen)
        # A daemon that needs other credentials than ours (root in a user namespace: uid
        # and gid 0 there are us) sees the share as that user does: act as them throughout,
        # the client's permission checks included.
        creds = getattr(transport, "default_credentials", None)
        self.ctx: m.Credentials | None = (creds[0], creds[1], os.getpid()) if creds else None

    @property
    def transport(self) -> VirtioTransport:
        return self._conn.transport

    @property
    def device(self) -> Any:
        """The device actor's ref (changes when the share restarts its daemon)."""
        return self._conn.device

    @property
    def device_client(self) -> DeviceClient:
        """The way to send requests to the device (changes when the share restarts)."""
        return self._conn.client

    @property
    def session(self) -> Any:
        """The session actor's ref (changes when the share restarts its daemon)."""
        return self._conn.session

    @property
    def daemon_pid(self) -> int | None:
        """The pid of the virtiofsd process that holds the shared files (None when attached
        to a socket): with the namespace sandbox, the daemon's worker child."""
        daemon = getattr(self.transport, "daemon", None)
        return daemon.worker_pid() if daemon is not None else None

    def stat(self, path: PathLike, *, follow_symlinks: bool = True) -> os.stat_result:
        # Warm stats come straight from what the session published: no actor hop.
        if self.ctx is None:
            hit = self._conn.published.get(os.fsencode(path), follow_symlinks)
            if hit is not None:
                return hit
        return super().stat(path, follow_symlinks=follow_symlinks)

    # -- transport hooks --------------------------------------------------------------------

    def _ask_actor(self, ref: Any, message: Any, generation: int,
                   name: str | None = None) -> Any:
        """Ask ``ref`` (an actor of connection ``generation``) and translate its errors."""
        message = self._as_caller(message)
        try:
            return ref.ask(message, timeout=self._conn.wait_limit)
        except pykka.Timeout:
            raise OSError(errno.ETIMEDOUT, f"no answer to {type(message).__name__}",
                          name) from None
        except pykka.ActorDeadError:
            if ref is self._conn.session:
                raise OSError(errno.ENOTCONN, "the share is closed") from None
            raise OSError(errno.EBADF, "file handle is gone", name) from None
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                self._conn.mark_lost(generation)
            raise _fix_filename(exc) from None

    def _ask(self, message: Any) -> Any:
        self._conn.restart_if_lost()
        # The generation first, then the session: if a restart slips in between, an error
        # from the new session is attributed to the old generation and ignored (the next
        # call sees it again), never the other way round.
        generation = self._conn.generation
        return self._ask_actor(self._conn.session, message, generation)

    def _open_file(self, message: m.Open) -> tuple[Any, int]:
        opened: m.OpenedFile = self._ask(message)
        return (opened.actor, self._conn.generation), opened.flags

    def _open_dir(self, message: m.OpenDir) -> Any:
        opened: m.OpenedDir = self._ask(message)
        return opened.actor, self._conn.generation

    def _handle_ref(self, handle: Any, name: str | None) -> Any:
        ref, generation = handle
        if generation != self._conn.generation:
            raise OSError(errno.ESTALE, "the share was restarted since this was opened", name)
        return ref

    def _ask_handle(self, handle: Any, message: Any, name: str | None = None) -> Any:
        return self._ask_actor(self._handle_ref(handle, name), message, handle[1], name)

    def _readinto(self, handle: Any, buffer: Any, name: str | None = None) -> int:
        # In-process the file actor copies straight from guest memory into the buffer.
        return self._ask_handle(handle, m.ReadInto(buffer=buffer), name)

    def _close_handle(self, handle: Any, *, wait: bool = True) -> None:
        with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
            if wait:
                handle[0].ask(m.Close(), timeout=self._conn.wait_limit)
            else:
                handle[0].tell(m.Close())

    def close(self) -> None:
        """Release every handle, forget every node, stop the device and its daemon."""
        if self._conn.closed or not self._owner:
            return
        with self._conn.lock:
            self._conn.closed = True
            self._conn.stop()

    def __enter__(self) -> VirtioFS:
        return self

    def stats(self) -> dict[str, Any]:
        """Counters of the session and the device (requests per opcode, nodes, …)."""
        return {"session": self._ask(m.SessionStats()),
                "device": self._conn.client.stats()}
