"""Boot a QEMU TCG guest with a virtio-fs device and run commands in it.

:class:`GuestVM` starts a real virtiofsd on a host folder and ``qemu-system-x86_64 -accel
tcg`` with:

* the virtio-fs device, ``vhost-user-fs-pci`` on a q35 machine (``mode="pci"``) or
  ``vhost-user-fs-device`` on a virtio-mmio transport of a ``microvm`` machine
  (``mode="mmio"``; the machine gets a PCIe bus too, for everything else);
* the host's ``/`` shared read-only over 9p (so the guest runs the host's own Python and
  this checkout) and a writable 9p share for results;
* QEMU's user network with TCP ports forwarded from the host's loopback;
* guest memory in a shared memfd (vhost-user needs it).

The guest's ``/init`` (``init.sh``) loads the modules, leaves the virtio-fs device to the
driver asked for (``uio_pci_generic`` by default on PCI, none on MMIO), reserves
hugepages, prepares a chroot into the host's root (fresh ``/proc``, ``/sys``, ``/dev``,
``/dev/hugepages``, tmpfs ``/tmp`` and ``/run``, the results share at
``/tmp/guest-results``), and then runs the commands the host drops into the results share,
each in the background, writing its output and exit status back there.

Every wait is bounded; on a timeout or a failure QEMU and virtiofsd are killed (whole
process groups) and :class:`GuestError` carries the tail of the guest's console. Both also
get SIGKILL when the thread that started them ends (``PR_SET_PDEATHSIG``), so a killed test
run leaves nothing behind; start a VM from a thread that outlives it.

``python -m tests.guest.vm [pci|mmio]`` boots a guest and prints how long things take.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Literal

from .image import REPO, GuestImage, ensure_image

__all__ = [
    "GUEST_RESULTS",
    "GUEST_SHARES",
    "GuestError",
    "GuestJob",
    "GuestResult",
    "GuestTimeout",
    "GuestVM",
    "Mode",
    "host_tsc_khz",
    "qemu_binary",
]

Mode = Literal["pci", "mmio"]

#: Where the results share is mounted inside the guest's chroot.
GUEST_RESULTS = "/tmp/guest-results"
#: Where ``share_views`` mounts each device's folder (``GUEST_SHARES/TAG``) in the guest.
GUEST_SHARES = "/tmp/guest-shares"
#: The PCI slot of the first view device (``share_views``), then one slot per share.
VIEW_SLOT = 0x10
#: The guest's address on QEMU's user network.
GUEST_IP = "10.0.2.15"
QEMU_ENV = "PYVIRTIOFS_QEMU"

_LAUNCHER_MODULES = (
    "pyvirtiofs.hw.vhost_user.launcher",
    "pyvirtiofs.hw.launcher",
    "hw.vhost_user.launcher",
    "hw.launcher",
)
_POLL = 0.05
_PR_SET_PDEATHSIG = 1


class GuestError(RuntimeError):
    """The guest failed to boot, a command could not be run, or QEMU died. The message
    ends with the tail of the guest's console."""


class GuestTimeout(GuestError):
    """A wait ran out of time (the VM has been killed)."""


@dataclass(frozen=True)
class GuestResult:
    """How a guest command ended."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float  #: host wall time from submission to the status being seen
    guest_uptime: float  #: the guest's uptime when the command ended

    def check(self) -> GuestResult:
        """Raise :class:`GuestError` (with the command's output) unless it exited 0."""
        if self.returncode != 0:
            raise GuestError(f"guest command {shlex.join(self.argv)} exited with "
                             f"{self.returncode}\n--- stdout ---\n{self.stdout[-4000:]}"
                             f"\n--- stderr ---\n{self.stderr[-4000:]}")
        return self


def _launcher() -> ModuleType:
    """The project's virtiofsd launcher, wherever the package layout has put it.

    The module only needs the standard library, so when importing it through its package
    fails (the package may be half-way through a reorganisation), load its file alone."""
    errors = []
    for name in _LAUNCHER_MODULES:
        try:
            return importlib.import_module(name)
        except Exception as exc:  # a broken package raises more than ImportError
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    for name in _LAUNCHER_MODULES:
        path = REPO.joinpath(*name.split(".")).with_suffix(".py")
        if not path.is_file() and name.startswith("pyvirtiofs."):
            path = REPO.joinpath(*name.split(".")[1:]).with_suffix(".py")
        if not path.is_file():
            continue
        spec = importlib.util.spec_from_file_location("_pyvirtiofs_guest_launcher", path)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            errors.append(f"{path}: {type(exc).__name__}: {exc}")
            continue
        return module
    raise ImportError("cannot import the virtiofsd launcher: " + "; ".join(errors))


def qemu_binary() -> str:
    """``$PYVIRTIOFS_QEMU`` or ``qemu-system-x86_64`` from PATH."""
    path = os.environ.get(QEMU_ENV) or shutil.which("qemu-system-x86_64")
    if not path:
        raise GuestError("qemu-system-x86_64 not found: run scripts/setup.sh "
                         "(Debian package qemu-system-x86)")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz, which is also the TCG guest's (its RDTSC reads the
    host's counter), or None when unknown: the host kernel's own calibration from its log,
    else ``cpu MHz`` if the TSC is constant."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
        found = re.findall(r"(?:Refined TSC clocksource calibration|tsc: Detected): "
                           r"([0-9.]+) MHz", log)
        if found:
            return round(float(found[-1]) * 1000)
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
        flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
        mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.M)
        if flags and mhz and {"constant_tsc", "nonstop_tsc"} <= set(flags.group(1).split()):
            return round(float(mhz.group(1)) * 1000)
    return None


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL if the process that started us dies, so a
    killed test run leaves no QEMU or virtiofsd behind."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _tail(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


@dataclass
class GuestJob:
    """A command running in the guest (see :meth:`GuestVM.spawn`)."""

    vm: GuestVM
    number: int
    argv: tuple[str, ...]
    submitted: float = field(default_factory=time.monotonic)

    def _path(self, suffix: str) -> Path:
        return self.vm.results / "jobs" / f"{self.number}.{suffix}"

    def done(self) -> bool:
        return self._path("rc").exists()

    def output(self) -> tuple[str, str]:
        """The command's stdout and stderr so far."""
        return (self._path("out").read_text(errors="replace") if self._path("out").exists()
                else "",
                self._path("err").read_text(errors="replace") if self._path("err").exists()
                else "")

    def wait(self, timeout: float = 300.0) -> GuestResult:
        """Wait for the command to end. On timeout, or if the VM dies first, the VM is
        killed and :class:`GuestError` (or :class:`GuestTimeout`) raised."""
        deadline = time.monotonic() + timeout
        rc = self._path("rc")
        while not rc.exists():
            if not self.vm.alive:
                out, err = self.output()
                raise self.vm._error(GuestError, f"the VM died while running job {self.number}"
                                     f" ({shlex.join(self.argv)})", out, err)
            if time.monotonic() > deadline:
                out, err = self.output()
                raise self.vm._error(GuestTimeout, f"job {self.number} "
                                     f"({shlex.join(self.argv)}) still running after "
                                     f"{timeout:.0f} s", out, err)
            time.sleep(_POLL)
        status, uptime = rc.read_text().split()
        out, err = self.output()
        return GuestResult(self.argv, int(status), out, err,
                           time.monotonic() - self.submitted, float(uptime))


class GuestVM:
    """A booted TCG guest with a virtio-fs device backed by a real virtiofsd.

    Use it as a context manager (or call :meth:`start` and :meth:`close`)::

        with GuestVM("pci") as vm:
            vm.python("-c", "print('hello from the guest')").check()

    Parameters:
        mode: ``"pci"`` (q35, ``vhost-user-fs-pci``) or ``"mmio"`` (microvm,
            ``vhost-user-fs-device`` on virtio-mmio).
        fs_driver: who gets the virtio-fs device in the guest. PCI: ``"uio_pci_generic"``
            (default; ``/dev/uio0`` for its interrupt), ``"none"`` (no driver) or
            ``"virtio_pci"`` (the kernel's virtio driver, which has no virtio-fs driver to
            hand it to, so a transport must unbind it first). MMIO: ``"none"`` (default) or
            ``"virtio_mmio"``.
        share: host folder virtiofsd serves (default: an empty ``share`` folder in the
            work folder).
        tag: the virtio-fs tag.
        extra_tags: more virtio-fs devices, each with its own virtiofsd serving its own
            folder (``shares[tag]``, a fresh ``share-TAG`` folder in the work folder).
        cache: virtiofsd's cache mode (``auto``, ``always``, ``none``).
        share_views: give every device's folder a second virtio-fs device (its own
            virtiofsd, ``cache=none``, tag ``view-TAG``, on PCI even in a microvm) that the
            guest kernel's own virtiofs driver mounts at ``GUEST_SHARES/TAG``: a view of
            the same files that is not the client under test (exact inode numbers and
            nanosecond times, unlike 9p).
        hugepages: 2 MiB pages reserved in the guest, mounted at ``/dev/hugepages``.
        ports: how many TCP ports to forward; each is a free host port P forwarded from
            ``127.0.0.1:P`` to the guest's port P (see :attr:`ports`).
        memory_mib, smp: guest RAM and CPUs.
        root_cache: 9p cache mode for the host's root (``"loose"``: faster, assumes the host
            files do not change while the VM runs; ``"none"``).
        boot_timeout: seconds to wait for the guest to be ready.
        workdir: where the console log, results share and sockets go; by default a
            temporary folder removed by :meth:`close` (a given folder is kept).
        image: a :class:`GuestImage` (default: :func:`ensure_image`).
        virtiofsd: the daemon binary (default: the project's ``find_virtiofsd``).
        sandbox: virtiofsd's sandbox mode (default: the launcher's first candidate).
        loglevel: the kernel's console log level (7: everything, for diagnosis; it costs
            a few tenths of a second of boot).
        extra_qemu_args, extra_cmdline: appended to QEMU's argv / the kernel command line
            (e.g. ``iomem=relaxed`` lets ``/dev/mem`` map pages that a kernel driver holds).
    """

    def __init__(
        self,
        mode: Mode = "pci",
        *,
        fs_driver: str | None = None,
        share: str | os.PathLike[str] | None = None,
        tag: str = "pvfs",
        extra_tags: Sequence[str] = (),
        cache: str = "auto",
        share_views: bool = False,
        hugepages: int = 64,
        ports: int = 1,
        memory_mib: int = 1024,
        smp: int = 2,
        root_cache: str = "loose",
        boot_timeout: float = 180.0,
        workdir: str | os.PathLike[str] | None = None,
        image: GuestImage | None = None,
        virtiofsd: str | None = None,
        sandbox: str | None = None,
        loglevel: int = 7,
        extra_qemu_args: Sequence[str] = (),
        extra_cmdline: Sequence[str] = (),
    ) -> None:
        if mode not in ("pci", "mmio"):
            raise ValueError(f"mode must be 'pci' or 'mmio', not {mode!r}")
        allowed = ({"uio_pci_generic", "none", "virtio_pci"} if mode == "pci"
                   else {"none", "virtio_mmio"})
        self.fs_driver = fs_driver or ("uio_pci_generic" if mode == "pci" else "none")
        if self.fs_driver not in allowed:
            raise ValueError(f"fs_driver for {mode} must be one of {sorted(allowed)}")
        self.mode: Mode = mode
        self.tag = tag
        self.tags = [tag, *extra_tags]
        if len(set(self.tags)) != len(self.tags) or not all(
                re.fullmatch(r"[A-Za-z0-9_.-]{1,36}", t) for t in self.tags):
            raise ValueError(f"tags must be distinct simple names: {self.tags}")
        self.cache = cache
        self.share_views = share_views
        self.hugepages = hugepages
        self.memory_mib = memory_mib
        self.smp = smp
        self.root_cache = root_cache
        self.boot_timeout = boot_timeout
        self.loglevel = loglevel
        self.extra_qemu_args = list(extra_qemu_args)
        self.extra_cmdline = list(extra_cmdline)
        self._n_ports = ports
        self._image = image
        self._virtiofsd_binary = virtiofsd
        self._sandbox = sandbox
        self._own_workdir = workdir is None
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self._share_arg = Path(share) if share is not None else None
        self._qemu: subprocess.Popen[bytes] | None = None
        self._daemons: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._next_job = 1
        self._closed = False
        self.workdir = Path()
        self.share = Path()
        #: The folder each device's virtiofsd serves, by tag (``share`` is the first's).
        self.shares: dict[str, Path] = {}
        #: Forwarded TCP ports (the same number on the host's 127.0.0.1 and in the guest).
        self.ports: list[int] = []
        #: Seconds from starting QEMU to the guest being ready to run commands.
        self.boot_seconds = 0.0
        #: What the guest reported when ready (``uptime``, ``release``, ``hugepages``).
        self.info: dict[str, str] = {}
        self.image: GuestImage | None = None
        self._tsc_khz = host_tsc_khz()
        #: The interpreter :meth:`python` runs: this host's, seen in the guest at the same path.
        self.python_executable = sys.executable

    # -- paths --------------------------------------------------------------------------

    @property
    def results(self) -> Path:
        """The results share on the host (``GUEST_RESULTS`` in the guest)."""
        return self.workdir / "results"

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def guest_results(self) -> str:
        return GUEST_RESULTS

    @property
    def qemu_pid(self) -> int | None:
        """QEMU's pid, which is also its process group's id."""
        return self._qemu.pid if self._qemu is not None else None

    @property
    def virtiofsd_pid(self) -> int | None:
        """virtiofsd's pid, which is also its process group's id."""
        return self._daemons[0].pid if self._daemons else None

    @property
    def alive(self) -> bool:
        return self._qemu is not None and self._qemu.poll() is None

    def console_tail(self, limit: int = 6000) -> str:
        return _tail(self.console_log, limit)

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> GuestVM:
        """Start virtiofsd and QEMU and wait until the guest is ready for commands."""
        if self._qemu is not None:
            raise RuntimeError("GuestVM already started")
        self.image = self._image or ensure_image()
        if self._workdir_arg is not None:
            self.workdir = self._workdir_arg
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="pyvirtiofs-guest-"))
        try:
            self._start()
        except BaseException:
            self.kill()
            self._cleanup()
            raise
        return self

    def _start(self) -> None:
        self.share = self._share_arg or self.workdir / "share"
        self.shares = {self.tag: self.share}
        for tag in self.tags[1:]:
            self.shares[tag] = self.workdir / f"share-{tag}"
        for folder in self.shares.values():
            folder.mkdir(parents=True, exist_ok=True)
        # A reused work folder must not offer the last run's "ready" or job statuses.
        shutil.rmtree(self.results, ignore_errors=True)
        for stale in ("console.log", "qemu.log", "virtiofsd.log"):
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / stale).unlink()
        (self.results / "jobs").mkdir(parents=True)
        sock_dir = self.workdir
        if len(str(sock_dir / "virtiofsd.sock")) > 100:  # sun_path is 108 bytes
            sock_dir = Path(tempfile.mkdtemp(prefix="pvfs-sock-", dir="/tmp"))
        self._sock_dir = sock_dir
        self.ports = [_free_port() for _ in range(self._n_ports)]

        sockets = [self._start_daemon(i, tag, sock_dir) for i, tag in enumerate(self.tags)]
        if self.share_views:
            sockets += [self._start_daemon(len(sockets) + i, f"view-{tag}", sock_dir, tag,
                                           cache="none")
                        for i, tag in enumerate(self.tags)]
        qemu = self._qemu_argv(sockets)
        (self.workdir / "qemu.argv").write_text(shlex.join(qemu) + "\n")
        started = time.monotonic()
        with (self.workdir / "qemu.log").open("wb") as log:
            self._qemu = subprocess.Popen(
                qemu, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        ready = self.results / "ready"
        deadline = started + self.boot_timeout
        while not ready.exists():
            if not self.alive:
                raise self._error(GuestError, "QEMU exited before the guest was ready")
            if time.monotonic() > deadline:
                raise self._error(GuestTimeout,
                                  f"guest not ready after {self.boot_timeout:.0f} s")
            time.sleep(_POLL)
        self.boot_seconds = time.monotonic() - started
        for line in ready.read_text().splitlines():
            key, _, value = line.partition("=")
            self.info[key] = value

    def _start_daemon(self, index: int, tag: str, sock_dir: Path, share: str | None = None,
                      cache: str | None = None) -> Path:
        """Start the virtiofsd of device ``tag`` (serving ``shares[share or tag]``) on a
        listening socket; its path."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock_path = sock_dir / ("virtiofsd.sock" if index == 0 else f"virtiofsd-{index}.sock")
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        log_name = "virtiofsd.log" if index == 0 else f"virtiofsd-{tag}.log"
        try:
            listener.bind(str(sock_path))
            listener.listen(1)
            argv = self._virtiofsd_argv(listener.fileno(), self.shares[share or tag],
                                        cache or self.cache)
            with (self.workdir / log_name).open("wb") as log:
                self._daemons.append(subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    pass_fds=(listener.fileno(),), start_new_session=True,
                    preexec_fn=_die_with_parent,
                ))
        finally:
            # The daemon holds its own copy; QEMU's connect queues until it accepts.
            listener.close()
        return sock_path

    def _virtiofsd_argv(self, fd: int, share: Path, cache: str) -> list[str]:
        """The project launcher's command line (xattrs on, as for the host's daemons)."""
        launcher = _launcher()
        binary = launcher.find_virtiofsd(self._virtiofsd_binary)
        flavor = launcher.detect_flavor(binary)
        sandbox = self._sandbox or launcher.sandbox_candidates(flavor)[0]
        daemon = launcher.Virtiofsd(share, binary=binary, cache=cache, sandbox=sandbox)
        return list(daemon.command(fd))

    def _views(self) -> str:
        """``SLOT:TAG,...`` of the view devices, for /init."""
        return ",".join(f"{VIEW_SLOT + i:02x}:{tag}" for i, tag in enumerate(self.tags))

    def _qemu_argv(self, sockets: list[Path]) -> list[str]:
        assert self.image is not None
        mem = f"{self.memory_mib}M"
        pci = self.mode == "pci"
        cmdline = [
            "console=ttyS0", "panic=-1", f"loglevel={self.loglevel}", "mitigations=off",
            "i8042.noaux", "i8042.nokbd", "i8042.nopnp", "8250.nr_uarts=1",
            "random.trust_cpu=on",
            # TCG is too slow and jittery for the kernel to calibrate its clocks reliably:
            # microvm (no HPET, no PM timer) then hangs now and then in early boot, and
            # q35 falls back to the HPET, whose every read is an exit to QEMU. The TCG
            # guest's TSC is the host's, so give its frequency and trust it.
            *([f"tsc_early_khz={self._tsc_khz}", "tsc=reliable"] if self._tsc_khz else []),
            f"pvfs.fsdrv={self.fs_driver}", f"pvfs.hugepages={self.hugepages}",
            f"pvfs.net={1 if self.ports else 0}", f"pvfs.rootcache={self.root_cache}",
            f"pvfs.checkout={REPO}",
            *([f"pvfs.views={self._views()}"] if self.share_views else []),
            *self.extra_cmdline,
        ]
        argv = [
            qemu_binary(), "-accel", "tcg", "-cpu", "max", "-smp", str(self.smp), "-m", mem,
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            "-append", " ".join(cmdline),
            "-chardev", f"file,id=con,path={self.console_log}", "-serial", "chardev:con",
        ]
        for i, sock in enumerate(sockets):
            argv += ["-chardev", f"socket,id=vfs{i},path={sock}"]
        device = "vhost-user-fs-pci" if pci else "vhost-user-fs-device"
        if pci:
            argv += ["-machine", "q35", "-numa", "node,memdev=mem"]
        else:
            # microvm: virtio-mmio transports described by ACPI; PCIe for the rest.
            argv += ["-machine", "microvm,memory-backend=mem,acpi=on,pcie=on,rtc=on",
                     # QEMU's virtio-mmio transports are legacy (version 1) by default.
                     "-global", "virtio-mmio.force-legacy=false"]
        for i, tag in enumerate(self.tags):
            argv += ["-device", f"{device},chardev=vfs{i},tag={tag}"]
        if self.share_views:
            for i, tag in enumerate(self.tags):
                argv += ["-device", f"vhost-user-fs-pci,chardev=vfs{len(self.tags) + i},"
                                    f"tag=view-{tag},addr={VIEW_SLOT + i:#x}"]
        argv += [
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,"
                      "multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            # The checkout on its own: under /tmp it would be hidden by the guest's tmpfs.
            "-fsdev", f"local,id=checkout,path={REPO},security_model=none,readonly=on,"
                      "multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=checkout,mount_tag=checkout",
            "-fsdev", f"local,id=results,path={self.results},security_model=none",
            "-device", "virtio-9p-pci,fsdev=results,mount_tag=results",
        ]
        if self.ports:
            fwd = ",".join(f"hostfwd=tcp:127.0.0.1:{p}-:{p}" for p in self.ports)
            argv += ["-netdev", f"user,id=net0,{fwd}",
                     "-device", "virtio-net-pci,netdev=net0,romfile="]
        return argv + self.extra_qemu_args

    def close(self, timeout: float = 30.0) -> None:
        """Power the guest off (killing it after ``timeout`` s), stop virtiofsd and remove
        the work folder if it is ours."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.alive:
                with contextlib.suppress(OSError):
                    (self.results / "jobs" / "poweroff").touch()
                assert self._qemu is not None
                try:
                    self._qemu.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self.kill()
            self._cleanup()

    def kill(self) -> None:
        """Kill QEMU and virtiofsd (their whole process groups) and reap them."""
        for proc in (self._qemu, *self._daemons):
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    def _cleanup(self) -> None:
        sock_dir = getattr(self, "_sock_dir", None)
        if sock_dir is not None and sock_dir != self.workdir:
            shutil.rmtree(sock_dir, ignore_errors=True)
        if self._own_workdir and self.workdir != Path():
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> GuestVM:
        return self.start() if self._qemu is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, cls: type[GuestError], what: str, stdout: str = "", stderr: str = "",
               ) -> GuestError:
        """Kill everything and build an error with all there is to know."""
        self.kill()
        parts = [f"{what} ({self.mode} guest, work folder {self.workdir})"]
        init_error = self.results / "init-error"
        if init_error.exists():
            parts.append("--- init error ---\n" + init_error.read_text(errors="replace"))
        for label, text in (("command stdout", stdout[-3000:]), ("command stderr", stderr[-3000:]),
                            ("qemu", _tail(self.workdir / "qemu.log", 2000)),
                            ("virtiofsd", _tail(self.workdir / "virtiofsd.log", 2000)),
                            ("console (tail)", self.console_tail())):
            if text.strip():
                parts.append(f"--- {label} ---\n{text.rstrip()}")
        return cls("\n".join(parts))

    # -- commands -----------------------------------------------------------------------

    def default_env(self) -> dict[str, str]:
        """The environment a guest command gets unless overridden (the root is read-only,
        so everything writable points into the guest's tmpfs ``/tmp``)."""
        return {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:"
                    "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/tmp/home",
            "TMPDIR": "/tmp",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/hypothesis",
            "GUEST_RESULTS": GUEST_RESULTS,
            "PYVIRTIOFS_GUEST_MODE": self.mode,
            "PYVIRTIOFS_GUEST_TAG": self.tag,
            "PYVIRTIOFS_GUEST_FS_DRIVER": self.fs_driver,
        }

    def spawn(
        self,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike[str] = REPO,
        env: Mapping[str, str] | None = None,
        inherit_env: bool = True,
    ) -> GuestJob:
        """Start ``argv`` in the guest's chroot (a path as on the host) and return at once.

        ``cwd``: its working directory. ``env``: variables added to (``inherit_env``) or
        replacing :meth:`default_env`; nothing comes from the host's environment."""
        if not self.alive:
            raise self._error(GuestError, "the VM is not running")
        if not argv:
            raise ValueError("empty argv")
        full_env = {**(self.default_env() if inherit_env else {}), **(env or {})}
        mkdirs = [p for p in (full_env.get("HOME"), full_env.get("HYPOTHESIS_STORAGE_DIRECTORY"))
                  if p and p.startswith("/tmp/")]
        script = ["#!/bin/sh"]
        if mkdirs:
            script.append("mkdir -p " + shlex.join(mkdirs))
        script.append(f"cd {shlex.quote(os.fspath(cwd))} || exit 125")
        script.append("exec env -i " + shlex.join([f"{k}={v}" for k, v in full_env.items()])
                      + " " + shlex.join(argv))
        with self._lock:
            number = self._next_job
            self._next_job += 1
            jobs = self.results / "jobs"
            tmp = jobs / f"{number}.sh.tmp"
            tmp.write_text("\n".join(script) + "\n")
            job = GuestJob(self, number, tuple(argv))
            tmp.rename(jobs / f"{number}.sh")  # the guest only looks for the final name
        return job

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike[str] = REPO,
        env: Mapping[str, str] | None = None,
        timeout: float = 300.0,
        check: bool = False,
    ) -> GuestResult:
        """Run ``argv`` in the guest and wait for it (see :meth:`spawn` and
        :meth:`GuestJob.wait`); ``check``: raise unless it exits 0."""
        result = self.spawn(argv, cwd=cwd, env=env).wait(timeout)
        return result.check() if check else result

    def python(self, *args: str, timeout: float = 300.0, check: bool = False,
               cwd: str | os.PathLike[str] = REPO,
               env: Mapping[str, str] | None = None) -> GuestResult:
        """Run this host's Python interpreter (``sys.executable``, with ``-B``) in the guest."""
        return self.run([self.python_executable, "-B", *args], cwd=cwd, env=env, timeout=timeout,
                        check=check)


_IMPORTS = "import msgspec, pykka, zmq"
_LOOP = ("import time\nn = 0\nt = time.perf_counter()\n"
         "while time.perf_counter() - t < 1.0:\n    for _ in range(1000):\n        n += 1\n"
         "print(n)")


def main(argv: Sequence[str] = ()) -> int:
    """``python -m tests.guest.vm [pci|mmio]``: boot a guest and measure it."""
    mode: Mode = "mmio" if "mmio" in argv else "pci"
    timed = f"import time; t = time.perf_counter(); {_IMPORTS}; print(time.perf_counter() - t)"
    host_loop = int(subprocess.run([sys.executable, "-B", "-c", _LOOP], capture_output=True,
                                   text=True, check=True, timeout=60).stdout)
    host_import = float(subprocess.run([sys.executable, "-B", "-c", timed], capture_output=True,
                                       text=True, check=True, timeout=60).stdout)
    started = time.monotonic()
    image = ensure_image()
    print(f"image ready in {time.monotonic() - started:.1f} s ({image.directory})")
    with GuestVM(mode, image=image) as vm:
        print(f"{mode}: boot to ready {vm.boot_seconds:.1f} s (guest uptime {vm.info['uptime']} s)")
        true = vm.run(["/bin/true"], check=True)
        print(f"/bin/true: {true.seconds:.2f} s round trip")
        empty = vm.python("-c", "pass", check=True)
        print(f"python -c pass: {empty.seconds:.2f} s round trip")
        imports = vm.python("-c", timed, check=True)
        print(f"{_IMPORTS}: {float(imports.stdout):.2f} s in the guest, {host_import:.3f} s here")
        loop = int(vm.python("-c", _LOOP, check=True).stdout)
        print(f"1 s CPU loop: {loop} iterations in the guest, {host_loop} here "
              f"(x{host_loop / loop:.0f} slower)")
    print(f"total {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
