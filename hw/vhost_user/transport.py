"""The vhost-user transport: we play the VMM's part beside a virtiofsd on this host.

Guest memory is a memfd shared with the daemon (SET_MEM_TABLE); the rings live at its
start, the request buffers after them; kicks and interrupts are eventfds; the daemon's
death shows as EOF on the vhost-user socket.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os

from pyvirtiofs.hw.memory import GuestMemory
from pyvirtiofs.hw.transport import DeviceGone
from pyvirtiofs.hw.vhost_user.frontend import (
    MemoryRegion,
    VhostUserError,
    VhostUserFrontend,
    VirtioFeature,
    VringConfig,
)
from pyvirtiofs.hw.vhost_user.launcher import (
    LaunchMode,
    UserNamespace,
    Virtiofsd,
    VirtiofsdFailed,
    check_shared_dir,
    detect_flavor,
    find_virtiofsd,
    launch_candidates,
)
from pyvirtiofs.hw.virtqueue import SplitVirtqueue

log = logging.getLogger(__name__)

__all__ = ["VhostUserTransport", "open_private_device"]

PAGE = 4096
DEFAULT_QUEUE_SIZE = 256
DEFAULT_MEMORY = 64 << 20


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


class VhostUserTransport:
    """Guest memory and virtqueues shared with a vhost-user backend.

    Layout of guest memory: the rings of every queue first (each page aligned), then the
    buffer area handed to the device layer's allocator.
    """

    def __init__(
        self,
        frontend: VhostUserFrontend,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        memory_size: int = DEFAULT_MEMORY,
        request_queues: int = 1,
        event_idx: bool = True,
        indirect: bool = False,
        daemon: Virtiofsd | None = None,
    ) -> None:
        self.frontend = frontend
        self.daemon = daemon
        # The (uid, gid) every request must carry unless it says otherwise; None: the
        # caller's own. A daemon in a user namespace where we are root needs (0, 0).
        self.default_credentials: tuple[int, int] | None = (
            daemon.credentials if daemon is not None else None)
        self.poll_interval = 0.0  # interrupts: never polled
        self._closed = False
        wanted = 0
        if event_idx:
            wanted |= 1 << VirtioFeature.EVENT_IDX
        if indirect:
            wanted |= 1 << VirtioFeature.INDIRECT_DESC
        frontend.negotiate(wanted)
        self.event_idx = frontend.has_feature(VirtioFeature.EVENT_IDX)
        self.indirect = frontend.has_feature(VirtioFeature.INDIRECT_DESC)
        nqueues = 1 + request_queues
        available = frontend.queue_count()
        if available is not None and nqueues > available:
            # A queue index beyond what the daemon has crashes QEMU's C virtiofsd.
            raise VhostUserError(
                errno.EINVAL,
                f"device has {available} queues; {nqueues} requested (hiprio + {request_queues})",
            )
        ring_bytes = SplitVirtqueue.layout(queue_size)[3]
        ring_bytes = (ring_bytes + PAGE - 1) // PAGE * PAGE
        self.buffer_start = ring_bytes * nqueues
        if memory_size <= self.buffer_start + PAGE:
            raise ValueError("guest memory too small for the rings")
        self.memory = GuestMemory(memory_size)
        self.queues: list[SplitVirtqueue] = []
        self._kick_fds: list[int] = []
        self._call_fds: list[int] = []
        try:
            frontend.set_mem_table([MemoryRegion(self.memory.gpa_base, self.memory.size,
                                                 self.memory.uva, self.memory.fd)])
            for index in range(nqueues):
                vq = SplitVirtqueue(self.memory.view, index * ring_bytes, queue_size,
                                    event_idx=self.event_idx, indirect=self.indirect)
                self.queues.append(vq)  # from here on _release() lets go of its memory
                kick, call = _eventfd(), _eventfd()
                self._kick_fds.append(kick)
                self._call_fds.append(call)
                uva = self.memory.uva
                frontend.setup_vring(VringConfig(
                    index=index, size=queue_size,
                    desc_addr=uva + vq.desc_offset, avail_addr=uva + vq.avail_offset,
                    used_addr=uva + vq.used_offset, kick_fd=kick, call_fd=call,
                ))
        except BaseException:
            self._release()
            raise

    @classmethod
    def connect(cls, socket_path: str, **kwargs: object) -> VhostUserTransport:
        """Attach to a daemon already listening on ``socket_path``."""
        frontend = VhostUserFrontend.connect(socket_path)
        try:
            return cls(frontend, **kwargs)  # type: ignore[arg-type]
        except BaseException:
            frontend.close()
            raise

    # -- the VirtioTransport interface ---------------------------------------------------

    def kick(self, index: int) -> None:
        if self._closed:
            raise DeviceGone("kick on a closed transport")
        try:
            os.eventfd_write(self._kick_fds[index], 1)
        except OSError as exc:  # only if we were closed under the caller's feet
            raise DeviceGone(f"kick failed: {exc}") from exc

    def interrupt_fds(self) -> list[int]:
        return list(self._call_fds)

    def ack_interrupt(self, fd: int) -> None:
        """Reset a call eventfd's counter (counts coalesce; the ring is drained anyway)."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)

    def death_fd(self) -> int:
        return self.frontend.fileno()

    def alive(self) -> bool:
        return not self._closed and self.frontend.backend_alive()

    def close(self) -> None:
        """Stop the rings (GET_VRING_BASE) and drop the connection; idempotent.

        The daemon exits once the connection closes; a launched daemon is then reaped.
        """
        if self._closed:
            return
        self._closed = True
        if self.frontend.backend_alive():
            for index in range(len(self.queues)):
                try:
                    self.frontend.stop_vring(index)
                except VhostUserError as exc:
                    log.debug("GET_VRING_BASE(%d) failed during close: %s", index, exc)
                    break
        self._release()
        if self.daemon is not None:
            self.daemon.stop()

    def _release(self) -> None:
        self.frontend.close()
        for fd in self._kick_fds + self._call_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._kick_fds.clear()
        self._call_fds.clear()
        for vq in self.queues:
            vq.release()
        self.queues = []
        if hasattr(self, "memory"):
            try:
                self.memory.close()
            except BufferError as exc:
                # A caller still holds a view into guest memory (say, in a traceback):
                # the mapping goes when that view does; the device is gone either way.
                log.debug("guest memory still in use at close: %s", exc)


def open_private_device(
    shared_dir: str | os.PathLike[str],
    *,
    binary: str | None = None,
    cache: str = "auto",
    sandbox: str | None = None,
    **transport_kwargs: object,
) -> VhostUserTransport:
    """Start a private virtiofsd on ``shared_dir`` and connect to it.

    A missing ``shared_dir`` is ``FileNotFoundError`` naming it (``NotADirectoryError``
    for something else); a named ``binary`` (or ``$PYVIRTIOFS_VIRTIOFSD``) that does not
    exist is ``VirtiofsdNotFound``. Without root the daemon runs in a user namespace of
    our own (see :mod:`~pyvirtiofs.hw.vhost_user.launcher`), and the transport's
    :attr:`~VhostUserTransport.default_credentials` say what requests must carry.

    When a way of starting the daemon fails here (its namespace sandbox cannot be set up in
    a chroot or a container: it dies right after our connection), the next one is tried
    and the log says so. When none works, :class:`VirtiofsdFailed` names the binary, how
    it ended (exit status or signal) and the last line it wrote. The transport owns the
    daemon: closing it stops the daemon.
    """
    check_shared_dir(shared_dir)
    path = find_virtiofsd(binary)
    flavor = detect_flavor(path)
    candidates = launch_candidates(flavor)
    if sandbox:
        candidates = [c for c in candidates if c.sandbox == sandbox] or [LaunchMode(sandbox)]
    errors: list[VirtiofsdFailed] = []
    no_userns = False  # a user namespace cannot be made here: skip the modes that need one
    for mode in candidates:
        if no_userns and mode.userns is not UserNamespace.NONE:
            continue
        daemon = Virtiofsd(shared_dir, binary=path, cache=cache, sandbox=mode.sandbox,
                           userns=mode.userns).start()
        try:
            transport = VhostUserTransport.connect(daemon.socket_path, daemon=daemon,
                                                   **transport_kwargs)
        except VhostUserError as exc:
            daemon.wait(2.0)
            failure = daemon.failure("exited at start" if not daemon.alive()
                                     else f"did not answer ({exc.strerror})",
                                     exc.errno or errno.ENOTCONN)
            daemon.stop()
            errors.append(failure)
            log.warning("%s", failure.strerror)
            no_userns = no_userns or (failure.errno == errno.EPERM
                                      and mode.userns is not UserNamespace.NONE)
            continue
        except BaseException:
            daemon.stop()
            raise
        daemon.remove_socket_path()
        if mode != candidates[0]:
            log.warning("virtiofsd runs with sandbox=%s (%s failed here)", mode.sandbox,
                        candidates[0].sandbox)
        return transport
    assert errors
    # The first failure is the telling one (later modes are fall-backs); say what the
    # others were when they failed differently.
    first = errors[0]
    others = [e.strerror for e in errors[1:] if e.outcome != first.outcome]
    if others:
        first.strerror = f"{first.strerror} (also tried: " + "; ".join(others) + ")"
        first.args = (first.errno, first.strerror)
    raise first
