"""Find, start and stop a virtiofsd process serving one directory.

Two daemons exist and take different command lines:

* QEMU's C daemon (Debian 12: ``/usr/lib/qemu/virtiofsd``):
  ``--fd=N -o source=DIR -o cache=auto -o sandbox=namespace|chroot -o xattr``
* the Rust daemon (package ``virtiofsd``, ``/usr/libexec/virtiofsd``):
  ``--fd N --shared-dir DIR --cache auto --sandbox namespace|chroot|none --xattr``

We create the listening socket ourselves (in a private 0700 directory) and pass it with
``--fd``: the daemon inherits a socket that is already listening, so connecting right after
the spawn cannot race with the daemon's start-up.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LOCATIONS",
    "DaemonFlavor",
    "Virtiofsd",
    "VirtiofsdNotFound",
    "detect_flavor",
    "find_virtiofsd",
    "sandbox_candidates",
]

DEFAULT_LOCATIONS = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
ENV_BINARY = "PYVIRTIOFS_VIRTIOFSD"


class VirtiofsdNotFound(FileNotFoundError):
    """No usable virtiofsd binary."""


class DaemonFlavor(enum.Enum):
    C = "c"  # QEMU's tools/virtiofsd
    RUST = "rust"  # gitlab.com/virtio-fs/virtiofsd


def find_virtiofsd(explicit: str | None = None) -> str:
    """The virtiofsd to use: ``explicit``, ``$PYVIRTIOFS_VIRTIOFSD``, PATH, then the
    distribution locations. Raises :class:`VirtiofsdNotFound` naming every place tried."""
    tried: list[str] = []
    candidates = [explicit] if explicit else [os.environ.get(ENV_BINARY), shutil.which("virtiofsd"),
                                              *DEFAULT_LOCATIONS]
    for cand in candidates:
        if not cand:
            continue
        tried.append(cand)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise VirtiofsdNotFound(
        errno.ENOENT,
        "no virtiofsd found (tried: " + ", ".join(tried) + "); run scripts/setup.sh or "
        "install qemu-system-common (Debian 12) or virtiofsd (newer releases)",
    )


def detect_flavor(binary: str) -> DaemonFlavor:
    """Tell the C daemon from the Rust one by its ``--version`` banner."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VirtiofsdNotFound(errno.ENOEXEC, f"cannot run {binary}: {exc}") from exc
    banner = out.stdout + out.stderr
    # The C daemon prints "virtiofsd version 7.2.x ... QEMU Project"; the Rust one
    # prints "virtiofsd 1.x.y".
    if "QEMU" in banner or "virtiofsd version" in banner:
        return DaemonFlavor.C
    return DaemonFlavor.RUST


def sandbox_candidates(flavor: DaemonFlavor) -> list[str]:
    """Sandbox modes to try, best first.

    The namespace sandbox needs root and ``/`` to be a mount point; in chroots and some
    containers it fails, and ``chroot`` works there. Unprivileged, only the Rust daemon
    can run at all, with ``none``.
    """
    if os.geteuid() != 0:
        return ["namespace", "none"] if flavor is DaemonFlavor.RUST else ["namespace"]
    return ["namespace", "chroot"]


class Virtiofsd:
    """One virtiofsd process serving ``shared_dir`` on a private socket.

    The daemon serves exactly one connection and exits when it closes, so every session
    needs a fresh instance. ``start()`` may be called once.
    """

    def __init__(
        self,
        shared_dir: str | os.PathLike[str],
        *,
        binary: str | None = None,
        cache: str = "auto",
        sandbox: str | None = None,
        xattr: bool = True,
        extra_args: Sequence[str] = (),
        debug: bool = False,
    ) -> None:
        self.shared_dir = os.fspath(shared_dir)
        if not os.path.isdir(self.shared_dir):
            raise NotADirectoryError(errno.ENOTDIR, "shared directory does not exist",
                                     self.shared_dir)
        self.binary = find_virtiofsd(binary)
        self.flavor = detect_flavor(self.binary)
        self.cache = cache
        self.sandbox = sandbox or sandbox_candidates(self.flavor)[0]
        self.xattr = xattr
        self.extra_args = list(extra_args)
        self.debug = debug
        self._dir: str | None = None
        self._listener: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: tempfile._TemporaryFileWrapper[bytes] | None = None

    # -- command line ------------------------------------------------------------------

    def command(self, fd: int) -> list[str]:
        """The daemon's argv for a listening socket inherited as ``fd``."""
        if self.flavor is DaemonFlavor.C:
            argv = [self.binary, f"--fd={fd}", "-o", f"source={self.shared_dir}",
                    "-o", f"cache={self.cache}", "-o", f"sandbox={self.sandbox}"]
            argv += ["-o", "xattr"] if self.xattr else []
            argv += ["-d"] if self.debug else ["-o", "log_level=warn"]
        else:
            argv = [self.binary, "--fd", str(fd), "--shared-dir", self.shared_dir,
                    "--cache", self.cache, "--sandbox", self.sandbox]
            argv += ["--xattr"] if self.xattr else []
            argv += ["--log-level", "debug" if self.debug else "warn"]
        return argv + self.extra_args

    # -- life cycle --------------------------------------------------------------------

    @property
    def socket_path(self) -> str:
        if self._dir is None:
            raise RuntimeError("virtiofsd not started")
        return os.path.join(self._dir, "vhost-user.sock")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> Virtiofsd:
        if self._proc is not None:
            raise RuntimeError("virtiofsd already started")
        self._dir = tempfile.mkdtemp(prefix="pyvirtiofs-")
        os.chmod(self._dir, 0o700)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        listener.listen(1)
        self._listener = listener
        self._stderr = tempfile.TemporaryFile(prefix="virtiofsd-stderr-")
        fd = listener.fileno()
        argv = self.command(fd)
        log.debug("starting %s", " ".join(argv))
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
                pass_fds=(fd,), start_new_session=True,
            )
        except OSError as exc:
            self._cleanup_files()
            raise VirtiofsdNotFound(exc.errno or errno.ENOEXEC,
                                    f"cannot start {self.binary}: {exc}") from exc
        # Our copy of the listener is no longer needed: the daemon holds its own, and
        # keeping ours open would let a connection queue up after the daemon died.
        listener.close()
        self._listener = None
        return self

    def worker_pid(self) -> int | None:
        """The process that does the work: with the namespace sandbox the daemon forks and
        its child (in new namespaces) holds the files; otherwise the daemon itself."""
        pid = self.pid
        if pid is None:
            return None
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = f.read().split()
        except OSError:
            return pid
        return int(children[0]) if children else pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def stderr_text(self, limit: int = 4000) -> str:
        """The daemon's output so far (its last ``limit`` characters), for error messages."""
        if self._stderr is None:
            return ""
        try:
            with open(self._stderr.fileno(), "rb", closefd=False) as f:
                f.seek(0)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return text[-limit:]

    def wait(self, timeout: float | None = None) -> int | None:
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the daemon and its worker (tests use this to simulate a crash).

        The daemon runs in its own process group; with the namespace sandbox its worker
        child holds the connection too, so signalling only the parent would leave the
        device alive."""
        if self.alive():
            assert self._proc is not None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the daemon (it normally exits by itself once our connection closes)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(timeout=min(timeout, 1.0))
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._cleanup_files()

    def _cleanup_files(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> Virtiofsd:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"Virtiofsd({self.shared_dir!r}, flavor={self.flavor.value}, "
                f"sandbox={self.sandbox}, pid={self.pid})")
