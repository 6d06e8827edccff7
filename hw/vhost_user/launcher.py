"""Find, start and stop a virtiofsd process serving one directory.

Two daemons exist and take different command lines:

* QEMU's C daemon (Debian 12: ``/usr/lib/qemu/virtiofsd``):
  ``--fd=N -o source=DIR -o cache=auto -o sandbox=namespace|chroot -o xattr``
* the Rust daemon (package ``virtiofsd``, ``/usr/libexec/virtiofsd``):
  ``--fd N --shared-dir DIR --cache auto --sandbox namespace|chroot|none --xattr``

We create the listening socket ourselves (in a private 0700 directory) and pass it with
``--fd``: the daemon inherits a socket that is already listening, so connecting right after
the spawn cannot race with the daemon's start-up.

**Without root.** Both daemons want to be root (their sandboxes need it). An ordinary user
runs them in a user namespace of their own (``unshare --user --mount``) with a private
tmpfs on ``/run`` (the C daemon writes its pid file under ``/run/virtiofsd``), where they
hold the capabilities their sandbox needs — over the user's own files only:

* ``UserNamespace.IDENTITY`` (C daemon): the user stays themselves inside
  (``--map-current-user --keep-caps``), so requests carry the caller's own uid/gid and
  the attributes the daemon returns name the real owner;
* ``UserNamespace.ROOT`` (Rust daemon, or a util-linux without ``--keep-caps``): the user
  is root inside (``--map-root-user``): requests must carry uid/gid 0, which the kernel
  maps back to the user, so files created are theirs; attributes show them owned by 0.

The Rust daemon can also run unprivileged outside any namespace (``--sandbox none``);
requests then carry uid/gid 0, for which it changes no credentials. Files of other users
are out of reach either way (they are not mapped into the namespace). When none of this is
possible, :class:`VirtiofsdFailed` says what is missing.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from typing import NamedTuple

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LOCATIONS",
    "DaemonFlavor",
    "LaunchMode",
    "UserNamespace",
    "Virtiofsd",
    "VirtiofsdFailed",
    "VirtiofsdNotFound",
    "check_shared_dir",
    "describe_exit",
    "detect_flavor",
    "find_virtiofsd",
    "launch_candidates",
    "sandbox_candidates",
]

DEFAULT_LOCATIONS = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
ENV_BINARY = "PYVIRTIOFS_VIRTIOFSD"
# Printed by the user-namespace wrapper just before it starts the daemon: its absence from
# the output of a process that died tells a namespace that could not be set up from a
# daemon that failed.
_READY_MARK = "pyvirtiofs: user namespace ready"
# The wrapper: a private tmpfs on /run (the C daemon's pid file goes to /run/virtiofsd),
# then the daemon in place of the shell, with the listening socket it inherited.
_WRAPPER_SCRIPT = ('PATH="${PATH:+$PATH:}/usr/sbin:/usr/bin:/sbin:/bin" && '
                   f'mount -t tmpfs -o mode=0755 tmpfs /run && echo "{_READY_MARK}" >&2 '
                   '&& exec "$0" "$@"')


class VirtiofsdNotFound(FileNotFoundError):
    """No usable virtiofsd binary."""


class VirtiofsdFailed(OSError):
    """The daemon could not be started or stopped at once: why, in words that say what to
    change. ``binary``, ``returncode`` (None while it runs) and ``stderr`` (its output)
    tell what happened."""

    def __init__(self, code: int, message: str, *, binary: str | None = None,
                 returncode: int | None = None, stderr: str = "",
                 outcome: str | None = None) -> None:
        super().__init__(code, message)
        self.binary = binary
        self.returncode = returncode
        self.stderr = stderr
        self.outcome = outcome or message  # what happened, without which attempt it was


class DaemonFlavor(enum.Enum):
    C = "c"  # QEMU's tools/virtiofsd
    RUST = "rust"  # gitlab.com/virtio-fs/virtiofsd


class UserNamespace(enum.Enum):
    """How the daemon is run (see the module's docstring)."""

    NONE = "none"  # as this process is
    IDENTITY = "identity"  # a user namespace where we stay ourselves, with capabilities
    ROOT = "root"  # a user namespace where we are root


class LaunchMode(NamedTuple):
    """One way to start the daemon: its sandbox option and the namespace around it."""

    sandbox: str
    userns: UserNamespace = UserNamespace.NONE


def _check_binary(path: str, source: str) -> str:
    if not os.path.exists(path):
        raise VirtiofsdNotFound(errno.ENOENT, f"{source} names no file", path)
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise VirtiofsdNotFound(errno.EACCES, f"{source} is not an executable file", path)
    return path


def find_virtiofsd(explicit: str | None = None) -> str:
    """The virtiofsd to use: ``explicit``, else ``$PYVIRTIOFS_VIRTIOFSD``, else PATH and
    the distribution locations.

    A binary that is named (``explicit`` or the variable) must exist: naming a missing
    file is an error, never a silent fall-back to another daemon. Raises
    :class:`VirtiofsdNotFound` naming what was tried."""
    if explicit:
        return _check_binary(explicit, "the virtiofsd given")
    named = os.environ.get(ENV_BINARY)
    if named:
        return _check_binary(named, f"${ENV_BINARY}")
    tried: list[str] = []
    for cand in [shutil.which("virtiofsd"), *DEFAULT_LOCATIONS]:
        if not cand:
            continue
        tried.append(cand)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise VirtiofsdNotFound(
        errno.ENOENT,
        "no virtiofsd found (tried: PATH, " + ", ".join(tried) + "); run scripts/setup.sh, "
        f"install qemu-system-common (Debian 12) or virtiofsd (newer releases), or set "
        f"${ENV_BINARY}",
    )


@functools.lru_cache(maxsize=8)
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


def check_shared_dir(shared_dir: str | os.PathLike[str]) -> str:
    """``shared_dir`` as a string, or ``FileNotFoundError`` / ``NotADirectoryError``
    naming it (a daemon would only say it cannot open its source)."""
    path = os.fspath(shared_dir)
    if not os.path.isdir(path):
        if os.path.lexists(path):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory, cannot share it", path)
        raise FileNotFoundError(errno.ENOENT, "no such directory to share", path)
    return path


@functools.lru_cache(maxsize=1)
def _unshare_features() -> frozenset[str]:
    """The options of util-linux's ``unshare`` we may use (empty: none is installed)."""
    binary = shutil.which("unshare")
    if binary is None:
        return frozenset()
    try:
        out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    text = out.stdout + out.stderr
    return frozenset(opt for opt in ("--map-root-user", "--map-current-user", "--keep-caps",
                                     "--mount") if opt in text)


def _identity_possible() -> bool:
    return {"--map-current-user", "--keep-caps"} <= _unshare_features()


def sandbox_candidates(flavor: DaemonFlavor) -> list[str]:
    """Sandbox modes to try, best first (see :func:`launch_candidates` for how)."""
    return [mode.sandbox for mode in launch_candidates(flavor)]


def launch_candidates(flavor: DaemonFlavor) -> list[LaunchMode]:
    """Ways to start the daemon here, best first.

    As root: the namespace sandbox, then ``chroot`` (the namespace sandbox needs ``/`` to
    be a mount point; in chroots and some containers it fails and ``chroot`` works).
    Unprivileged: the same inside a user namespace of our own; the Rust daemon last runs
    with ``--sandbox none``, outside any namespace.
    """
    if os.geteuid() == 0:
        return [LaunchMode("namespace"), LaunchMode("chroot")]
    if flavor is DaemonFlavor.RUST:
        # The Rust daemon expects to be root ("or a fake root inside a user namespace").
        return [LaunchMode("namespace", UserNamespace.ROOT), LaunchMode("none")]
    userns = UserNamespace.IDENTITY if _identity_possible() else UserNamespace.ROOT
    return [LaunchMode("namespace", userns), LaunchMode("chroot", userns)]


def _userns_problem() -> str:
    """Why user namespaces may be unavailable here, from the settings that forbid them."""
    reasons = []
    for path, bad in (("/proc/sys/user/max_user_namespaces", "0"),
                      ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
                      ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1")):
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value == bad:
            reasons.append(f"{path.removeprefix('/proc/sys/').replace('/', '.')} = {value}")
    return ", ".join(reasons)


def describe_exit(returncode: int) -> str:
    """``exit status N`` or ``killed by SIGNAME`` (Popen's negative codes)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class Virtiofsd:
    """One virtiofsd process serving ``shared_dir`` on a private socket.

    The daemon serves exactly one connection and exits when it closes, so every session
    needs a fresh instance. ``start()`` may be called once. ``userns`` (default: none as
    root, otherwise what :func:`launch_candidates` puts first) runs it in a user namespace;
    :attr:`credentials` is then the uid/gid requests must carry.
    """

    def __init__(
        self,
        shared_dir: str | os.PathLike[str],
        *,
        binary: str | None = None,
        cache: str = "auto",
        sandbox: str | None = None,
        userns: UserNamespace | None = None,
        xattr: bool = True,
        extra_args: Sequence[str] = (),
        debug: bool = False,
    ) -> None:
        self.shared_dir = check_shared_dir(shared_dir)
        self.binary = find_virtiofsd(binary)
        self.flavor = detect_flavor(self.binary)
        modes = launch_candidates(self.flavor)
        self.sandbox = sandbox or modes[0].sandbox
        if userns is None:
            userns = next((c.userns for c in modes if c.sandbox == self.sandbox),
                          modes[0].userns)
        self.userns = userns
        self.cache = cache
        self.xattr = xattr
        self.extra_args = list(extra_args)
        self.debug = debug
        self._dir: str | None = None
        self._listener: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: tempfile._TemporaryFileWrapper[bytes] | None = None

    @property
    def credentials(self) -> tuple[int, int] | None:
        """The (uid, gid) every request must carry for this daemon, or None for the
        caller's own: in a namespace where we are root, or for an unprivileged daemon
        outside any, that is (0, 0) — which the first maps back to us and for which the
        second changes no credentials."""
        if self.userns is UserNamespace.ROOT:
            return (0, 0)
        if self.userns is UserNamespace.NONE and os.geteuid() != 0:
            return (0, 0)
        return None

    # -- command line ------------------------------------------------------------------

    def daemon_command(self, fd: int) -> list[str]:
        """The daemon's own argv for a listening socket inherited as ``fd``."""
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

    def wrapper_command(self) -> list[str]:
        """What runs the daemon: nothing, or ``unshare`` into a user namespace."""
        if self.userns is UserNamespace.NONE:
            return []
        unshare = shutil.which("unshare")
        if unshare is None:
            raise VirtiofsdFailed(
                errno.ENOENT, "virtiofsd needs root, or the unshare command (util-linux) to "
                "run it in a user namespace; neither is available", binary=self.binary)
        mapping = (["--map-current-user", "--keep-caps"]
                   if self.userns is UserNamespace.IDENTITY else ["--map-root-user"])
        return [unshare, "--user", *mapping, "--mount", "--fork", "--", "/bin/sh", "-c",
                _WRAPPER_SCRIPT]

    def command(self, fd: int) -> list[str]:
        """The full argv: the wrapper (if any), then the daemon's."""
        return self.wrapper_command() + self.daemon_command(fd)

    # -- life cycle --------------------------------------------------------------------

    @property
    def socket_path(self) -> str:
        if self._dir is None:
            raise RuntimeError("virtiofsd not started, or its socket was removed once "
                               "the frontend connected")
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
        try:
            argv = self.command(fd)
        except BaseException:
            self._cleanup_files()
            raise
        log.debug("starting %s", " ".join(argv))
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
                pass_fds=(fd,), start_new_session=True,
            )
        except OSError as exc:
            self._cleanup_files()
            raise VirtiofsdNotFound(exc.errno or errno.ENOEXEC,
                                    f"cannot start {argv[0]}: {exc.strerror or exc}") from exc
        # Our copy of the listener is no longer needed: the daemon holds its own, and
        # keeping ours open would let a connection queue up after the daemon died.
        listener.close()
        self._listener = None
        return self

    def worker_pid(self) -> int | None:
        """The process that does the work: with the namespace sandbox the daemon forks and
        its child (in new namespaces) holds the files; in a user namespace the daemon is
        itself the child of ``unshare``; otherwise the daemon itself."""
        pid = self.pid
        if pid is None:
            return None
        # One level down for the sandbox's child; one more for unshare's.
        for _ in range(1 if self.userns is UserNamespace.NONE else 2):
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    children = f.read().split()
            except OSError:
                break
            if not children:
                break
            pid = int(children[0])
        return pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def stderr_text(self, limit: int = 4000) -> str:
        """The daemon's output so far (its last ``limit`` characters), for error messages;
        the wrapper's own note left out."""
        if self._stderr is None:
            return ""
        try:
            with open(self._stderr.fileno(), "rb", closefd=False) as f:
                f.seek(0)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        text = "".join(line for line in text.splitlines(keepends=True)
                       if line.rstrip("\n") != _READY_MARK)
        return text[-limit:]

    def namespace_ready(self) -> bool:
        """Whether the user-namespace wrapper got as far as starting the daemon (always
        true without one)."""
        if self.userns is UserNamespace.NONE or self._stderr is None:
            return True
        try:
            with open(self._stderr.fileno(), "rb", closefd=False) as f:
                f.seek(0)
                return _READY_MARK.encode() in f.read()
        except OSError:
            return False

    def failure(self, cause: str, code: int = errno.ENOTCONN) -> VirtiofsdFailed:
        """The error for a daemon that did not come up: its path, how it ended and the
        last line it wrote — or, when its user namespace could not be made, what is
        missing for running without root."""
        status = self.returncode()
        output = self.stderr_text().strip()
        last = output.splitlines()[-1].strip() if output else ""
        how = (describe_exit(status) if status is not None else "still running")
        where = f"virtiofsd {self.binary} (sandbox={self.sandbox}"
        where += f", user namespace: {self.userns.value})" if self.userns is not \
            UserNamespace.NONE else ")"
        if self.userns is not UserNamespace.NONE and status is not None \
                and not self.namespace_ready():
            problem = _userns_problem()
            message = (f"virtiofsd needs root, or a user namespace to run in, and this user "
                       f"cannot make one here ({last or how}"
                       + (f"; {problem}" if problem else "") + "): run as root, allow "
                       "unprivileged user namespaces, or install the Rust virtiofsd, which "
                       "also runs unprivileged with --sandbox none")
            return VirtiofsdFailed(errno.EPERM, message, binary=self.binary,
                                   returncode=status, stderr=output)
        outcome = f"{cause}: {how}" + (f"; it said: {last}" if last else "")
        return VirtiofsdFailed(code, f"{where} {outcome}", binary=self.binary,
                               returncode=status, stderr=output, outcome=outcome)

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
        device alive (and in a user namespace, ``unshare`` is the parent of both)."""
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
                self.kill(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.kill(signal.SIGKILL)
                    proc.wait()
        self._cleanup_files()

    def remove_socket_path(self) -> None:
        """Remove the socket's folder once the frontend is connected: the daemon serves
        one connection, so the path is not needed again, and a process killed later
        (SIGKILL runs no clean-up) leaves nothing behind in the temporary folder."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _cleanup_files(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.remove_socket_path()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> Virtiofsd:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"Virtiofsd({self.shared_dir!r}, flavor={self.flavor.value}, "
                f"sandbox={self.sandbox}, userns={self.userns.value}, pid={self.pid})")
