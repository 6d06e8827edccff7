"""``pyvirtiofs bench``: every workload, in the same run, on four configurations.

    pyvirtiofs bench --quick                      # about a minute
    pyvirtiofs bench --json bench.json --chart bench.png   # the full suite

The bench makes a scratch folder, fills it natively (untimed), and runs each workload on

* ``native`` — host-native Python ``os`` calls on the same folder: the reference;
* ``inproc`` — pyvirtiofs in-process, on its own private virtiofsd (default tunables);
* ``remote`` — pyvirtiofs over ZeroMQ tcp loopback, through ``pyvirtiofs.connect_remote``
  and a ``pyvirtiofs serve`` subprocess;
* ``hermit`` — pyvirtiofs configured like the Hermit driver: 64 KiB requests, one request
  in flight (a 2-descriptor request queue), 64 KiB READDIR buffers.

Each result is the median of ``--reps`` repetitions (≥ 5) with min–max, its speed relative
to ``native`` and to ``hermit`` (time ratios: 0.5× = half as fast), the peak RSS of this
process during the workload (``VmHWM`` after a ``clear_refs`` reset), and — the request
economy — the device requests per user operation by opcode, counted by the client itself
(``fs.stats()["device"]["requests"]`` deltas over the timed sections only), beside what the
Linux kernel's virtio-fs client sends (counted from the daemon's debug log under a
Linux 6.1 guest) and the request-economy target.

Honesty rules: every configuration does the same work on the same files with the same call
sizes, and returns the data (``bytes`` objects or a filled buffer); byte counts are checked.
The host page cache and dentry cache are warm for all of them (the share lives on the same
host). "Cold" means the *client's* cache: pyvirtiofs gets a fresh session and daemon; the
native reference has no client cache to make cold.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import functools
import io
import itertools
import json
import logging
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvirtiofs.codec.fuse_abi import opcode_name
from pyvirtiofs.tools import procfs
from pyvirtiofs.tools.signals import sigterm_interrupts

log = logging.getLogger(__name__)

__all__ = ["BenchParams", "cmd_bench", "main", "run_bench"]

MiB = 1 << 20
KiB = 1 << 10
HERMIT_REQUEST = 64 * KiB  # Hermit's MAX_READ_LEN / MAX_WRITE_LEN
STAT_THREADS = 16
WARM_CHUNK = 64  # stat_warm: prime this many names, then time them: both well within
# virtiofsd's 1 s cache=auto timeout, even on a busy machine
CONFIG_ORDER = ("native", "inproc", "remote", "hermit")


# -- parameters --------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchParams:
    """Sizes and counts of one bench run (``--quick`` shrinks them, never the call sizes)."""

    big_size: int = 1 << 30  # the sequential file
    call_size: int = MiB  # read()/write() call size of the sequential workloads
    files: int = 10_000  # stat / create / list / open+close / small files / open at once
    small_size: int = 4 * KiB
    random_reads: int = 10_000
    random_size: int = 4 * KiB
    getattr_calls: int = 10_000
    streams: int = 16
    reps: int = 5
    warmup: bool = False  # one unrecorded repetition first (--warmup)
    quick: bool = False

    @classmethod
    def quick_params(cls) -> BenchParams:
        """The ~1-minute version: same call sizes, fewer files and a smaller big file."""
        return cls(big_size=32 * MiB, files=200, random_reads=500, getattr_calls=500,
                   reps=5, quick=True)


# -- memory ------------------------------------------------------------------------------


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset ``VmHWM`` of ``pid`` to its current RSS (Linux ≥ 4.0: ``clear_refs`` 5)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib(pid: int | str = "self") -> float | None:
    """Peak resident set size of ``pid`` since the last reset, in MiB."""
    kib = procfs.status_kib(pid, "VmHWM")
    if kib is None and pid == "self":
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return None if kib is None else kib / 1024


# -- the targets: one small interface over os and over a VirtioFS ------------------------


class NativeFile:
    """An ``os`` file descriptor with the methods the workloads use, bound at open time
    so a native call costs one C call (no wrapper layers to slow the reference down)."""

    __slots__ = ("close", "fd", "pread", "read", "readinto", "stat", "write")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.read = functools.partial(os.read, fd)
        self.pread = functools.partial(os.pread, fd)
        self.write = functools.partial(os.write, fd)
        self.readinto = io.FileIO(fd, "r+" if _writable(fd) else "r", closefd=False).readinto
        self.stat = functools.partial(os.fstat, fd)
        self.close = functools.partial(os.close, fd)


def _writable(fd: int) -> bool:
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY


class Target:
    """What the workloads call. ``path(rel)`` maps a share-relative name to what ``stat``,
    ``open`` … take; hot loops fetch the bound callables once, before the clock starts."""

    name = "?"
    label = "?"

    def path(self, rel: str) -> str:
        raise NotImplementedError

    def stat(self, path: str) -> Any:
        raise NotImplementedError

    def open(self, path: str, flags: int, mode: int = 0o644) -> Any:
        raise NotImplementedError

    def listdir(self, path: str) -> list[str]:
        raise NotImplementedError

    def ls_l(self, path: str) -> int:
        """Like ``ls -l``: list with every entry's lstat; returns the number of entries."""
        raise NotImplementedError

    def unlink(self, path: str) -> None:
        raise NotImplementedError

    def counts(self) -> Counter[str] | None:
        """Device requests sent so far, by opcode name (None: not a virtio-fs client)."""
        return None

    def reopen(self) -> None:
        """Start over with an empty client cache (a new session on a new daemon)."""

    def other_pids(self) -> dict[str, int]:
        """Helper processes whose peak RSS is recorded too (daemon, server)."""
        return {}

    def close(self) -> None:
        """Release everything this target holds."""


class NativeTarget(Target):
    """Host-native Python ``os`` calls on the scratch folder: the reference."""

    name = "native"
    label = "(a) host-native os"

    def __init__(self, root: str) -> None:
        self.root = root
        self.stat = os.stat  # type: ignore[method-assign]
        self.listdir = os.listdir  # type: ignore[method-assign]
        self.unlink = os.unlink  # type: ignore[method-assign]

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def open(self, path: str, flags: int, mode: int = 0o644) -> NativeFile:
        return NativeFile(os.open(path, flags | os.O_CLOEXEC, mode))

    def ls_l(self, path: str) -> int:
        n = 0
        with os.scandir(path) as it:
            for entry in it:
                entry.stat(follow_symlinks=False)
                n += 1
        return n


class VirtioTarget(Target):
    """A pyvirtiofs client (in-process, Hermit-like or remote): ``factory`` makes the
    share object; ``reopen`` makes a new one (cold client cache)."""

    def __init__(self, name: str, label: str,
                 factory: Callable[[], tuple[Any, dict[str, int]]],
                 on_close: Callable[[], None] | None = None) -> None:
        self.name = name
        self.label = label
        self._factory = factory
        self._on_close = on_close
        self.fs, self._pids = factory()
        self._bind()

    def _bind(self) -> None:
        fs = self.fs
        self.stat = fs.stat  # type: ignore[method-assign]
        self.listdir = fs.listdir  # type: ignore[method-assign]
        self.unlink = fs.remove  # type: ignore[method-assign]
        self._open_raw = getattr(fs, "open_raw", None)

    def path(self, rel: str) -> str:
        return "/" + rel

    def open(self, path: str, flags: int, mode: int = 0o644) -> Any:
        if self._open_raw is not None:
            return self._open_raw(path, flags, mode)
        return self.fs.open(path, _flags_to_mode(flags), buffering=0)

    def ls_l(self, path: str) -> int:
        n = 0
        for entry in self.fs.scandir(path):
            entry.stat(follow_symlinks=False)
            n += 1
        return n

    def counts(self) -> Counter[str] | None:
        stats = getattr(self.fs, "stats", None)
        if stats is None:
            return None
        try:
            requests = stats()["device"]["requests"]
        except (KeyError, TypeError, OSError):
            return None
        return Counter({opcode_name(k): v for k, v in requests.items()})

    def reopen(self) -> None:
        self.fs.close()
        self.fs, self._pids = self._factory()
        self._bind()

    def other_pids(self) -> dict[str, int]:
        return self._pids

    def close(self) -> None:
        try:
            self.fs.close()
        finally:
            if self._on_close is not None:
                self._on_close()


def _flags_to_mode(flags: int) -> str:
    acc = flags & os.O_ACCMODE
    if flags & os.O_CREAT:
        return "xb" if flags & os.O_EXCL else "wb"
    return "rb" if acc == os.O_RDONLY else "r+b"


# -- the configurations (runners) ----------------------------------------------------------


@dataclass
class Runner:
    """One configuration and how to make its target."""

    name: str
    label: str
    start: Callable[[str, argparse.Namespace], Target]


def _local_fs(share: str, binary: str | None, *, hermit: bool) -> tuple[Any, dict[str, int]]:
    """A VirtioFS on a private virtiofsd: default tunables, or the Hermit driver's
    (64 KiB requests, one request in flight, 64 KiB directory reads)."""
    from pyvirtiofs.api.local import connect

    options: dict[str, Any] = {}
    if hermit:
        options = {"max_request": HERMIT_REQUEST, "max_in_flight": 1, "read_ahead": False}
    fs = connect(share, virtiofsd=binary, **options)  # max_request caps READDIR too
    pid = fs.daemon_pid  # the worker that does the I/O (namespace sandbox)
    return fs, ({"virtiofsd": pid} if pid else {})


def _start_native(share: str, args: argparse.Namespace) -> Target:
    return NativeTarget(share)


def _start_inproc(share: str, args: argparse.Namespace) -> Target:
    return VirtioTarget("inproc", "(b) pyvirtiofs in-process",
                        lambda: _local_fs(share, args.virtiofsd, hermit=False))


def _start_hermit(share: str, args: argparse.Namespace) -> Target:
    return VirtioTarget("hermit", "(d) pyvirtiofs, Hermit-like (64 KiB, 1 in flight)",
                        lambda: _local_fs(share, args.virtiofsd, hermit=True))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _RemoteServer:
    """A ``pyvirtiofs serve SHARE --bind tcp://127.0.0.1:PORT`` subprocess."""

    def __init__(self, share: str, virtiofsd: str | None) -> None:
        self.url = f"tcp://127.0.0.1:{_free_port()}"
        env = dict(os.environ)
        if virtiofsd:
            env["PYVIRTIOFS_VIRTIOFSD"] = virtiofsd
        self.log = tempfile.TemporaryFile(prefix="pyvirtiofs-serve-")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyvirtiofs", "serve", share, "--bind", self.url],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=env)

    def connect(self, timeout: float = 15.0) -> Any:
        import pyvirtiofs as api
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                tail = self.log.read().decode(errors="replace").strip().splitlines()[-1:]
                raise OSError(errno.ENOTCONN, f"pyvirtiofs serve exited ({self.proc.returncode})"
                              + (f": {tail[0]}" if tail else ""))
            try:
                fs = api.connect_remote(self.url)  # type: ignore[attr-defined]
                fs.stat("/")
                return fs
            except Exception as exc:
                last = exc
                time.sleep(0.1)
        raise OSError(errno.ETIMEDOUT, f"no remote server at {self.url}: {last}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _start_remote(share: str, args: argparse.Namespace) -> Target:
    servers: list[_RemoteServer] = []

    def stop_servers() -> None:
        while servers:
            servers.pop().stop()

    def factory() -> tuple[Any, dict[str, int]]:
        # A fresh server per session (reopen()): a cold client *and* server cache. The
        # client was closed just before, so the old server can go.
        stop_servers()
        server = _RemoteServer(share, args.virtiofsd)
        servers.append(server)
        try:
            return server.connect(), {"server": server.proc.pid}
        except BaseException:
            stop_servers()
            raise

    return VirtioTarget("remote", "(c) pyvirtiofs remote, tcp loopback", factory,
                        on_close=stop_servers)


RUNNERS: dict[str, Runner] = {
    "native": Runner("native", NativeTarget.label, _start_native),
    "inproc": Runner("inproc", "(b) pyvirtiofs in-process", _start_inproc),
    "remote": Runner("remote", "(c) pyvirtiofs remote, tcp loopback", _start_remote),
    "hermit": Runner("hermit", "(d) pyvirtiofs, Hermit-like (64 KiB, 1 in flight)",
                     _start_hermit),
}


# -- timing --------------------------------------------------------------------------------


class Stopwatch:
    """Accumulates the timed sections of one repetition, and the device requests sent in
    them (counter snapshots are taken outside the clock)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.seconds = 0.0
        self.requests: Counter[str] = Counter()
        self.counted = True
        self.cpu = 0.0  # CPU time of this process (all threads) in the timed sections
        self.daemon_cpu: float | None = 0.0  # … and of the daemon, when its pid is known
        self._first = True
        self._t0 = 0.0
        self._cpu0 = 0.0
        self._dcpu0: float | None = None
        self._c0: Counter[str] | None = None

    def __enter__(self) -> Stopwatch:
        if self._first:
            self._first = False
            reset_peak_rss()
            for pid in self.target.other_pids().values():
                reset_peak_rss(pid)
        self._c0 = self.target.counts()
        self._dcpu0 = procfs.cpu_seconds(self.target.other_pids().get("virtiofsd"))
        self._cpu0 = time.process_time()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.cpu += time.process_time() - self._cpu0
        dcpu1 = procfs.cpu_seconds(self.target.other_pids().get("virtiofsd"))
        if self._dcpu0 is None or dcpu1 is None or self.daemon_cpu is None:
            self.daemon_cpu = None
        else:
            self.daemon_cpu += dcpu1 - self._dcpu0
        c1 = self.target.counts()
        if self._c0 is None or c1 is None:
            self.counted = False
        else:
            self.requests.update(c1 - self._c0)


def load_average() -> tuple[float, float, float] | None:
    """The 1/5/15-minute load averages (a busy machine makes every number noisier)."""
    try:
        return os.getloadavg()
    except OSError:
        return None


@dataclass
class Layout:
    """The scratch folder's fixed contents, made natively before anything is timed."""

    root: str
    big: str = "big.bin"
    stat_dir: str = "stat"
    small_dir: str = "small"
    names: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    payload: bytes = b""  # one call's worth of data for the write workloads


@dataclass
class Rep:
    """What a workload reports for one repetition."""

    ops: int
    nbytes: int = 0
    extra: dict[str, float] = field(default_factory=dict)


WorkloadFn = Callable[[Target, Stopwatch, Layout, BenchParams, int], Rep]


@dataclass(frozen=True)
class Workload:
    """One workload: ``fn`` runs one repetition, timing only its ``with sw:`` sections."""

    name: str
    title: str
    op: str  # what one "op" is, for µs/op and requests/op
    throughput: bool  # report MiB/s (else µs/op)
    fn: WorkloadFn
    kernel: str = ""  # what the Linux kernel client sends (a Linux 6.1 guest)
    target: str = ""  # the request-economy target


def _host(layout: Layout, *parts: str) -> str:
    return os.path.join(layout.root, *parts)


# -- the workloads ---------------------------------------------------------------------------


def w_seq_read(t: Target, sw: Stopwatch, lay: Layout, p: BenchParams, rep: int) -> Rep:
    f = t.open(t.path(lay.big), os.O_RDONLY)
    try:
        read, n, size, calls = f.read, 0, p.call_size, 1
        with sw:
            while chunk := read(size):
                n += len(chunk)
                calls += 1
    finally:
        f.close()
    _check(n, p.big_size, "seq_read")
    return Rep(ops=calls, nbytes=n)  # every call, the one that sees end of file too


def w_seq_readinto(t: Target, sw: Stopwatch, lay: Layout, p: BenchParams, rep: int) -> Rep:
    buf = bytearray(p.call_size)
    view = memoryview(buf)
    f = t.open(t.path(lay.big), os.O_RDONLY)
    try:
        readinto, n, calls = f.readinto, 0, 1
        with sw:
            while got := readinto(view):
                n += got
                calls += 1
    finally:
        f.close()
    _check(n, p.big_size, "seq_readinto")
    return Rep(ops=calls, nbytes=n)


def w_seq_write(t: Target, sw: Stopwatch, lay: Layout, p: BenchParams, rep: int) -> Rep:
    rel = f"write-{t.name}.bin"
    # Untimed, and through the client itself: a name the client has cached must never be
    # changed behind its back (the bench only ever does that with names it never showed).
    with contextlib.suppress(FileNotFoundError):
        t.unlink(t.path(rel))
    f = t.open(t.path(rel), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    data = memoryview(lay.payload)
    calls = p.big_size // p.call_size
    n = 0
    closed = False
    try:
        write = f.write
        with sw:
            for _ in range(calls):
                n += write(data)
            f.close()  # inside the clock: a client may flush at close
            closed = True
    finally:
        if not closed:
            f.close()
    _check(n, calls * p.call_size, "seq_write")
    _check(os.path.getsize(_host(lay, rel)), n, "seq_write (size on the host)")
    return Rep(ops=calls, nbytes=n)


def w_random_read(t: Target, sw: Stopwatch, lay: Layout, p: BenchParams, rep: int) -> Rep:
    f = t.open(t.path(lay.big), os.O_RDONLY)
    n, size = 0, p.random_size
    try:
        pread = f.pread
        with sw:
            for off in lay.offsets:
                n += len(pread(size, off))
    finally:
        f.close()
    _check(n, len(lay.offsets) * size, "random_read")
    return Rep(ops=len(lay.offsets), nbytes=n)


def w_stat_cold(t: Target, sw: Stopwatch, lay: Layout, p: BenchParams, rep: int) -> Rep:
    t.reopen()  # a new session: nothing cached in the client
    paths = [t.path(f"{lay.stat_dir}/{name}") for name in lay.names]
    stat = t.stat
    stat(t.path(lay.stat_dir))  # the directory itself is not what we measure
    with sw:
        for path in paths:
            stat(path)
    return Rep(ops=len(paths))


def w_stat_cold_threads(t: Target, sw: Stopwatch, lay: Layout, p: BenchParams,
                        rep: int) -> Rep:
    """``STAT_THREADS`` threads stat different files, all cold, at once: the total rate
    against ``stat_cold``'s one thread says whether the client serialises them."""
    t.reopen()
    stat = t.stat
    stat(t.path(lay.stat_dir))
    paths = [t.path(f"{lay.stat_dir}/{name}") for name in lay.names]
    slices = [paths[i::STAT_THREADS] for i in range(STAT_THREADS)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(STAT_THREADS + 1)

    def run(mine: list[str]) -> None:
        barrier.wait()
        try:
            for path in mine:
                stat(path)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(mine,), daemon=True) for mine in slices]
    for th in threads:
        th.start()
    with sw:
        barrier.wait()
        for th in threads:
            th.join()
    if errors:
        raise errors[0]
    return Rep(ops=len(paths))


def w_stat_warm(t: Target, sw: Stopwatch, lay: Layout, p: BenchParams, rep: int) -> Rep:
    # virtiofsd's cache=auto timeout is 1 s: prime a chunk, then time it, chunk by chunk.
    paths = [t.path(f"{lay.stat_dir}/{name}") for name in lay.names]
    stat = t.stat
    for start in range(0, len(paths), WARM_CHUNK):
        chunk = paths[start:start + WARM_CHUNK]
        for path in chunk:
            stat(path)
        with sw:
            for path in chunk:
                stat(path)
    return Rep(ops=len(paths))


def w_getattr(t: Target, sw: Stopwatch, lay: Layout, p: BenchParams, rep: int) -> Rep:
    # fstat of an open handle: always a GETATTR round trip (no attribute cache on this path)
    f = t.open(t.path(f"{lay.small_dir}/{lay.names[0]}"), os.O_RDONLY)
    try:
        fstat = f.stat
        with sw:
            for _ in range(p.getattr_calls):
                fstat()
    finally:
        f.close()
    return Rep(ops=p.getattr_calls)


def w_create(t: Target, sw: Stopwatch, lay: Layout, p: BenchParams, rep: int) -> Rep:
    rel = f"create-{t.name}-{rep}"
    os.mkdir(_host(lay, rel))
    paths = [t.path(f"{rel}/{name}") for name in lay.names]
    t.stat(t.path(rel))
    open_, flags = t.open, os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        with sw:
            for path in paths:
                open_(path, flags, 0o644).close()
    finally:
        shutil.rmtree(_host(lay, rel))
        t.reopen()  # drop the nodes we just made (untimed)
    return Rep(ops=len(paths))


def w_unlink(t: Target, sw: Stopwatch, lay: Layout, p: BenchParams, rep: int) -> Rep:
    rel = f"unlink-{t.name}-{rep}"
    host_dir = _host(lay, rel)
    os.mkdir(host_dir)
    for name in lay.names:
        os.close(os.open(os.path.join(host_dir, name), os.O_WRONLY | os.O_CREAT, 0o644))
    paths = [t.path(f"{rel}/{name}") for name in lay.names]
    t.stat(t.path(rel))
    unlink = t.unlink
    try:
        with sw:
            for path in paths:
                unlink(path)
        _check(len(os.listdir(host_dir)), 0, "unlink (files left on the host)")
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)
    return Rep(ops=len(paths))


def w_listdir(t: Target, sw: Stopwatch, lay: Layout, p: BenchParams, rep: int) -> Rep:
    path = t.path(lay.stat_dir)
    t.stat(path)
    with sw:
        names = t.listdir(path)
    _check(len(names), p.files, "listdir")
    return Rep(ops=len(names))


def w_ls_l(t: Target, sw: Stopwatch, lay: Layout, p: BenchParams, rep: int) -> Rep:
    t.reopen()  # nothing cached: attributes must come from the listing itself
    path = t.path(lay.stat_dir)
    t.stat(path)
    with sw:
        n = t.ls_l(path)
    _check(n, p.files, "ls_l")
    return Rep(ops=n)


def w_open_close(t: Target, sw: Stopwatch, lay: Layout, p: BenchParams, rep: int) -> Rep:
    path = t.path(f"{lay.small_dir}/{lay.names[0]}")
    open_ = t.open
    open_(path, os.O_RDONLY).close()
    with sw:
        for _ in range(p.files):
            open_(path, os.O_RDONLY).close()
    return Rep(ops=p.files)


def w_small_files(t: Target, sw: Stopwatch, lay: Layout, p: BenchParams, rep: int) -> Rep:
    paths = [t.path(f"{lay.small_dir}/{name}") for name in lay.names]
    open_, size, n = t.open, p.call_size, 0
    with sw:
        for path in paths:
            f = open_(path, os.O_RDONLY)
            read = f.read
            while chunk := read(size):
                n += len(chunk)
            f.close()
    _check(n, p.files * p.small_size, "small_files")
    return Rep(ops=len(paths), nbytes=n)


def open_many_files(handles: int) -> int:
    """Over how many distinct files open_many spreads its ``handles``.

    virtiofsd holds one fd per file it knows (the inode's O_PATH fd) and one per open
    handle, and inherits our fd limit; where the hard limit cannot be raised (20,000 on
    the machine BENCHMARKS.md reports) distinct files times two cannot reach 20,000, so
    the handles are spread over as many files as the limit leaves room for."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return handles
    return max(1, min(handles, hard - 1024 - handles))


def w_open_many(t: Target, sw: Stopwatch, lay: Layout, p: BenchParams, rep: int) -> Rep:
    """``files`` handles open at once: the thread count with one open and with all, and
    the first opens' time against the last ones'."""
    names = lay.names[:open_many_files(len(lay.names))]
    paths = [t.path(f"{lay.small_dir}/{names[i % len(names)]}") for i in range(p.files)]
    open_, clock = t.open, time.perf_counter
    handles: list[Any] = []
    each: list[float] = []
    threads_one = threads_all = 0
    try:
        with sw:
            for path in paths:
                t0 = clock()
                handles.append(open_(path, os.O_RDONLY))
                each.append(clock() - t0)
                if len(handles) == 1:
                    threads_one = threading.active_count()
        threads_all = threading.active_count()
        # every one of them still works
        _check(len(handles[-1].pread(p.small_size, 0)), p.small_size, "open_many")
    finally:
        for h in handles:
            with contextlib.suppress(Exception):
                h.close()
    k = max(1, len(each) // 100)
    first = statistics.mean(each[:k]) * 1e6
    last = statistics.mean(each[-k:]) * 1e6
    return Rep(ops=len(paths), extra={"first_open_us": first, "last_open_us": last,
                                      "last_over_first": last / first,
                                      "files_open": len(paths), "distinct_files": len(names),
                                      "threads_one_open": threads_one,
                                      "threads_added": threads_all - threads_one})


def w_streams(t: Target, sw: Stopwatch, lay: Layout, p: BenchParams, rep: int) -> Rep:
    n_streams = p.streams
    region = p.big_size // n_streams // p.call_size * p.call_size
    handles = [t.open(t.path(lay.big), os.O_RDONLY) for _ in range(n_streams)]
    got = [0] * n_streams
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_streams + 1)

    def stream(i: int) -> None:
        pread, size, start = handles[i].pread, p.call_size, i * region
        barrier.wait()
        try:
            n = 0
            for off in range(start, start + region, size):
                n += len(pread(size, off))
            got[i] = n
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(n_streams)]
    for th in threads:
        th.start()
    try:
        with sw:
            barrier.wait()
            for th in threads:
                th.join()
    finally:
        for h in handles:
            h.close()
    if errors:
        raise errors[0]
    _check(sum(got), region * n_streams, "streams")
    return Rep(ops=region * n_streams // p.call_size, nbytes=sum(got))


def _check(got: int, want: int, what: str) -> None:
    if got != want:
        raise AssertionError(f"{what}: {got} bytes/items, expected {want}")


WORKLOADS: list[Workload] = [
    Workload("seq_read", "sequential read, 1 MiB read() calls", "1 MiB read()", True,
             w_seq_read, "8 READ × 128 KiB (cache=auto); 2–3 READ (cache=none)",
             "1 READ per 1 MiB"),
    Workload("seq_readinto", "sequential readinto() a caller buffer, 1 MiB", "1 MiB readinto()",
             True, w_seq_readinto, "as seq_read", "1 READ per 1 MiB"),
    Workload("seq_write", "sequential write, 1 MiB write() calls", "1 MiB write()", True,
             w_seq_write, "WRITE of ≤ max_write (1 MiB)", ""),
    Workload("random_read", "random 4 KiB pread()", "4 KiB pread()", False, w_random_read,
             "1 READ (or 0 from the page cache)", ""),
    Workload("stat_cold", "stat, cold client cache", "stat()", False, w_stat_cold,
             "1 LOOKUP (cache=auto); 5 (cache=none)", "≤ 1 request"),
    Workload("stat_cold_threads", f"stat, cold client cache, {STAT_THREADS} threads at once",
             "stat()", False, w_stat_cold_threads, "1 LOOKUP each", "≤ 1 request"),
    Workload("stat_warm", "stat, warm client cache", "stat()", False, w_stat_warm,
             "0 within the timeout", "0 requests"),
    Workload("getattr", "fstat() of an open file (GETATTR round trip)", "fstat()", False,
             w_getattr, "0–1 GETATTR", ""),
    Workload("create", "create empty files (open O_CREAT|O_EXCL + close)", "create+close",
             False, w_create, "≈ 5 round trips", "≤ 3 requests"),
    Workload("unlink", "unlink files", "unlink()", False, w_unlink, "≈ 3 round trips",
             "≤ 2 requests"),
    Workload("listdir", "listdir of a big directory", "entry", False, w_listdir,
             "READDIR pages", ""),
    Workload("ls_l", "ls -l of a big directory (scandir + lstat), cold", "entry", False, w_ls_l,
             "READDIRPLUS pages, ~0 per entry", "READDIRPLUS pages only"),
    Workload("open_close", "open + close of one file", "open+close", False, w_open_close,
             "OPEN + FLUSH + RELEASE", ""),
    Workload("small_files", "read whole small files (open, read to EOF, close)", "file", False,
             w_small_files, "", ""),
    Workload("open_many", "files open at once (all kept open)", "open()", False, w_open_many,
             "", "10,000th open as fast as the 1st"),
    Workload("streams", "concurrent streams (threads), 1 MiB pread()", "1 MiB pread()", True,
             w_streams, "", ""),
]
WORKLOAD_NAMES = [w.name for w in WORKLOADS]


# -- preparing the scratch folder -------------------------------------------------------------


def prepare(root: str, p: BenchParams, seed: int = 6) -> Layout:
    """Fill ``root`` natively: the big file, ``files`` empty and ``files`` small files."""
    rng = random.Random(seed)
    lay = Layout(root=root)
    lay.names = [f"f{i:06d}" for i in range(p.files)]
    block = rng.randbytes(16 * MiB)
    with open(os.path.join(root, lay.big), "wb") as f:
        left = p.big_size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n] if n < len(block) else block)
            left -= n
    small = rng.randbytes(p.small_size)
    for d, content in ((lay.stat_dir, b""), (lay.small_dir, small)):
        os.mkdir(os.path.join(root, d))
        for name in lay.names:
            with open(os.path.join(root, d, name), "wb") as f:
                f.write(content)
    pages = p.big_size // p.random_size
    lay.offsets = [rng.randrange(pages) * p.random_size for _ in range(p.random_reads)]
    lay.payload = rng.randbytes(p.call_size)
    return lay


def _raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


# -- running -------------------------------------------------------------------------------------


@dataclass
class Result:
    """All repetitions of one workload on one configuration."""

    workload: str
    config: str
    status: str = "ok"  # ok | n/a | error
    reason: str = ""
    times: list[float] = field(default_factory=list)
    ops: int = 0
    nbytes: int = 0
    rss_peak_mib: float | None = None
    other_rss_peak_mib: dict[str, float] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)  # summed over the reps
    counted: bool = False
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per rep
    daemon_cpu: list[float] | None = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def per_op_us(self, seconds: float | None = None) -> float:
        return (self.median if seconds is None else seconds) / self.ops * 1e6

    def mib_s(self, seconds: float | None = None) -> float:
        return self.nbytes / MiB / (self.median if seconds is None else seconds)

    def requests_per_op(self) -> dict[str, float]:
        total = self.ops * len(self.times)
        return {k: v / total for k, v in sorted(self.requests.items())} if total else {}


class _Collector:
    """The repetitions of one workload on one configuration, as they come in."""

    def __init__(self, w: Workload, target: Target) -> None:
        self.w = w
        self.target = target
        self.res = Result(w.name, target.name)
        self.requests: Counter[str] = Counter()
        self.counted = True
        self.peaks: list[float] = []
        self.others: dict[str, list[float]] = {}
        self.extras: dict[str, list[float]] = {}
        self.wall = 0.0

    def run(self, lay: Layout, p: BenchParams, rep: int) -> None:
        """One repetition (``rep`` < 0: the warm-up, not recorded)."""
        t0 = time.perf_counter()
        sw = Stopwatch(self.target)
        r = self.w.fn(self.target, sw, lay, p, rep)
        self.wall += time.perf_counter() - t0
        if rep < 0:
            return
        res = self.res
        res.times.append(sw.seconds)
        res.cpu.append(sw.cpu)
        if res.daemon_cpu is not None and sw.daemon_cpu is not None:
            res.daemon_cpu.append(sw.daemon_cpu)
        else:
            res.daemon_cpu = None
        res.ops, res.nbytes = r.ops, r.nbytes
        for k, v in r.extra.items():
            self.extras.setdefault(k, []).append(v)
        self.requests.update(sw.requests)
        self.counted = self.counted and sw.counted
        peak = peak_rss_mib()
        if peak is not None:
            self.peaks.append(peak)
        for label, pid in self.target.other_pids().items():
            other = peak_rss_mib(pid)
            if other is not None:
                self.others.setdefault(label, []).append(other)

    def finish(self) -> Result:
        res = self.res
        res.extra = {k: statistics.median(v) for k, v in self.extras.items()}
        res.rss_peak_mib = max(self.peaks) if self.peaks else None
        res.other_rss_peak_mib = {k: max(v) for k, v in self.others.items()}
        res.counted = self.counted and self.target.counts() is not None
        res.requests = dict(self.requests) if res.counted else {}
        res.extra["wall_s"] = self.wall  # setup and teardown included
        return res


def run_workload(w: Workload, targets: dict[str, Target], lay: Layout, p: BenchParams,
                 progress: Callable[[str], None]) -> dict[str, Result]:
    """All repetitions of ``w`` on every target, **interleaved**: repetition 1 on every
    configuration, then repetition 2, … with the order rotated each time, so a burst of
    load on a shared machine hits every configuration alike instead of one of them."""
    results: dict[str, Result] = {}
    running: dict[str, _Collector] = {}

    def fail(name: str, exc: BaseException) -> None:
        log.debug("workload %s on %s failed", w.name, name, exc_info=True)
        results[name] = Result(w.name, name, "error", f"{type(exc).__name__}: {exc}")
        progress(f"{w.name:<13} {name:<7} ERROR {results[name].reason}")
        running.pop(name, None)
        with contextlib.suppress(Exception):
            targets[name].reopen()  # the next workload starts from a clean state

    for name, target in targets.items():
        # Every workload starts on a fresh session: what earlier workloads left in the
        # client's caches (e.g. > max_nodes nodes: every new lookup evicts) must not leak.
        try:
            target.reopen()
            running[name] = _Collector(w, target)
        except Exception as exc:
            fail(name, exc)
    for rep in range(-1 if p.warmup else 0, p.reps):
        names = list(running)
        shift = rep % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            try:
                running[name].run(lay, p, rep)
            except Exception as exc:
                fail(name, exc)
    for name, collector in running.items():
        res = results[name] = collector.finish()
        progress(f"{w.name:<13} {name:<7} {_fmt_value(w, res)}  ({res.extra['wall_s']:.1f} s)")
    return results


def run_bench(p: BenchParams, args: argparse.Namespace,
              progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the whole bench and return the report (what ``--json`` writes)."""
    configs = [c for c in CONFIG_ORDER if c in args.configs]
    workloads = [w for w in WORKLOADS if w.name in args.only]
    _raise_fd_limit(1 << 20)  # as high as the hard limit allows
    base = args.workdir or tempfile.gettempdir()
    root = tempfile.mkdtemp(prefix="pyvirtiofs-bench-", dir=base)
    share = os.path.join(root, "share")
    os.mkdir(share)
    started = time.time()
    report: dict[str, Any] = {"meta": _meta(p, args, configs, share), "results": []}
    targets: dict[str, Target] = {}
    unavailable: dict[str, str] = {}
    try:
        progress(f"preparing {share} ({_size(p.big_size)} file, 2 × {p.files} files)")
        lay = prepare(share, p)
        for name in configs:
            try:
                targets[name] = RUNNERS[name].start(share, args)
            except Exception as exc:  # e.g. no virtiofsd: that configuration is n/a
                unavailable[name] = reason = f"{type(exc).__name__}: {exc}"
                progress(f"{name}: n/a ({reason})")
        report["meta"]["configs"] = {
            name: {"label": RUNNERS[name].label, "available": name in targets,
                   "reason": unavailable.get(name, "")} for name in configs}
        for w in workloads:
            done = run_workload(w, targets, lay, p, progress)
            for name in configs:
                report["results"].append(done.get(name) or
                                         Result(w.name, name, "n/a", unavailable[name]))
        if "inproc" in targets:
            report["floor"] = ring_floor(share, lay, p, args.virtiofsd)
    finally:
        for t in targets.values():
            with contextlib.suppress(Exception):
                t.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report["meta"]["seconds"] = round(time.time() - started, 1)
    report["meta"]["load_average_end"] = load_average()
    report["results"] = [_result_json(r, report["results"]) for r in report["results"]]
    report["targets"] = evaluate_targets(report)
    return report


#: Floors measured per request type; a request type not measured costs what GETATTR does
#: (one small round trip). FORGET and BATCH_FORGET have no reply: no round trip to wait for.
NO_REPLY = ("FORGET", "BATCH_FORGET")


def ring_floor(share: str, lay: Layout, p: BenchParams,
               virtiofsd: str | None) -> dict[str, Any]:
    """What the device costs with nothing of ours around it: requests through the bare
    channel from one thread (no actors, no thread hand-off). Per request type, in µs
    (``us``), with min–max over the repetitions; and 1 MiB READ/WRITE throughput. Each
    workload's floor is the sum of the floors of the requests it sends (``floor_us``)."""
    try:
        from pyvirtiofs.actors.channel import BlockingDevice
        from pyvirtiofs.codec import fuse_requests as rq
        from pyvirtiofs.codec.fuse_abi import FUSE_ROOT_ID
        from pyvirtiofs.hw.vhost_user.transport import open_private_device

        dev = BlockingDevice(open_private_device(share, binary=virtiofsd))
        try:
            call = dev.call
            call(rq.init(1 << 20, rq.DEFAULT_INIT_FLAGS))
            small = call(rq.lookup(FUSE_ROOT_ID, lay.small_dir)).nodeid
            node = call(rq.lookup(small, lay.names[0])).nodeid
            big = call(rq.lookup(FUSE_ROOT_ID, lay.big)).nodeid
            big_fh = call(rq.open(big, os.O_RDONLY)).fh
            scratch = call(rq.mkdir(FUSE_ROOT_ID, "floor-scratch", 0o755, 0)).nodeid
            out_file = call(rq.create(scratch, "w", os.O_WRONLY, 0o644, 0))
            out_node, out_fh = out_file.entry.nodeid, out_file.open.fh
            sink = memoryview(bytearray(MiB))
            payload = lay.payload
            n = max(50, min(p.getattr_calls, 2000))
            names = iter(range(10**9))

            def open_release() -> None:
                fh = call(rq.open(node, os.O_RDONLY)).fh
                call(rq.release(node, fh, os.O_RDONLY))

            def create_release() -> None:
                out = call(rq.create(scratch, f"c{next(names)}", os.O_WRONLY, 0o644, 0))
                call(rq.release(out.entry.nodeid, out.open.fh, os.O_WRONLY))

            def read_release() -> None:
                call(rq.read(big, big_fh, 0, p.small_size), sink=sink)

            # The 1 MiB requests move through the file as the sequential workloads do
            # (reading one cached MiB over and over, or overwriting it, would be cheaper
            # for the daemon than what the workloads ask of it).
            read_at = itertools.count(0, MiB)
            write_at = itertools.count(0, MiB)
            big_size = p.big_size

            def read_1mib() -> None:
                call(rq.read(big, big_fh, next(read_at) % big_size, MiB), sink=sink)

            def write_1mib() -> None:
                call(rq.write(out_node, out_fh, next(write_at), payload))

            measures = {
                "GETATTR": (lambda: call(rq.getattr(node)), n),
                "LOOKUP": (lambda: call(rq.lookup(small, lay.names[0])), n),
                "OPEN+RELEASE": (open_release, n),
                "CREATE+RELEASE": (create_release, n),
                "READ": (read_release, n),
                "READ_1MiB": (read_1mib, max(20, n // 20)),
                "WRITE_1MiB": (write_1mib, max(20, n // 20)),
            }
            times: dict[str, list[float]] = {k: [] for k in measures}
            for _ in range(p.reps):  # interleaved, as the workloads are
                for label, (fn, count) in measures.items():
                    t0 = time.perf_counter()
                    for _ in range(count):
                        fn()
                    times[label].append((time.perf_counter() - t0) / count * 1e6)
            med = {k: statistics.median(v) for k, v in times.items()}
            us = {"GETATTR": med["GETATTR"], "LOOKUP": med["LOOKUP"],
                  "OPEN": med["OPEN+RELEASE"] / 2, "RELEASE": med["OPEN+RELEASE"] / 2,
                  "CREATE": med["CREATE+RELEASE"] - med["OPEN+RELEASE"] / 2,
                  "READ": med["READ"]}
            return {"us": us,
                    "range": {k: [min(v), max(v)] for k, v in times.items()},
                    "measured_us": med,
                    "read_mib_s": 1e6 / med["READ_1MiB"],  # 1 MiB per request
                    "write_mib_s": 1e6 / med["WRITE_1MiB"],
                    # kept for the chart and older reports
                    "getattr_us": med["GETATTR"], "lookup_us": med["LOOKUP"]}
        finally:
            dev.close()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def floor_us(report: dict[str, Any], workload: str, config: str = "inproc") -> float | None:
    """The floor of one operation of ``workload``: the floors of the requests it sends
    (requests per operation, as counted, times each type's floor)."""
    floor = (report.get("floor") or {}).get("us")
    r = _find(report, workload, config)
    if not floor or r is None or not r.get("requests_per_op"):
        return None
    return sum(n * floor.get(op, floor["GETATTR"])
               for op, n in r["requests_per_op"].items() if op not in NO_REPLY)


# -- reporting --------------------------------------------------------------------------------


def _meta(p: BenchParams, args: argparse.Namespace, configs: list[str],
          share: str) -> dict[str, Any]:
    try:
        from pyvirtiofs.hw.vhost_user.launcher import detect_flavor, find_virtiofsd
        binary = find_virtiofsd(args.virtiofsd)
        flavor = detect_flavor(binary).value
    except Exception as exc:
        binary, flavor = f"? ({exc})", "?"
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = _status_kib_meminfo()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "pyvirtiofs bench " + " ".join(args.argv),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem / MiB, 1) if mem else None,
        "virtiofsd": binary,
        "virtiofsd_flavor": flavor,
        "cache": "auto",
        "scratch": share,
        "params": {k: getattr(p, k) for k in p.__dataclass_fields__},
        "configs": {c: {"label": RUNNERS[c].label} for c in configs},
        "page_cache": "warm for every configuration (same host, same files)",
        "load_average_start": load_average(),
    }


def _status_kib_meminfo() -> int | None:
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return None


def _result_json(r: Result, all_results: list[Result]) -> dict[str, Any]:
    w = next(x for x in WORKLOADS if x.name == r.workload)
    out: dict[str, Any] = {"workload": r.workload, "config": r.config, "status": r.status}
    if r.status != "ok":
        out["reason"] = r.reason
        return out

    def ref(config: str) -> Result | None:
        return next((x for x in all_results if x.workload == r.workload
                     and x.config == config and x.status == "ok"), None)

    native, hermit = ref("native"), ref("hermit")
    out.update({
        "ops": r.ops, "bytes": r.nbytes, "reps": len(r.times),
        "times_s": [round(x, 6) for x in r.times],
        "median_s": r.median, "min_s": min(r.times), "max_s": max(r.times),
        "per_op_us": r.per_op_us(),
        "per_op_us_min": r.per_op_us(min(r.times)), "per_op_us_max": r.per_op_us(max(r.times)),
        "ops_per_s": r.ops / r.median,
        "ratio_native": native.median / r.median if native else None,
        "ratio_hermit": hermit.median / r.median if hermit else None,
        "cpu_us_per_op": statistics.median(r.cpu) / r.ops * 1e6 if r.cpu else None,
        "daemon_cpu_us_per_op": (statistics.median(r.daemon_cpu) / r.ops * 1e6
                                 if r.daemon_cpu else None),
        "rss_peak_mib": r.rss_peak_mib,
        "other_rss_peak_mib": r.other_rss_peak_mib,
        "requests": r.requests if r.counted else None,
        "requests_per_op": r.requests_per_op() if r.counted else None,
        "kernel_requests": w.kernel, "economy_target": w.target,
        "extra": r.extra,
    })
    if w.throughput:
        out["mib_s"] = r.mib_s()
        out["mib_s_min"] = r.mib_s(max(r.times))
        out["mib_s_max"] = r.mib_s(min(r.times))
    return out


def _find(report: dict[str, Any], workload: str, config: str) -> dict[str, Any] | None:
    for r in report["results"]:
        if r["workload"] == workload and r["config"] == config and r["status"] == "ok":
            return r
    return None


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets, each with the measured value and met / not met / n/a."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, op: str, bound: float, unit: str = "") -> None:
        if value is not None and unit == "req":
            # Request counts are averages: an entry that expired on a busy machine (1 s
            # timeout) costs one more LOOKUP in thousands; 1% of slack, no more.
            value = round(value, 2)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append({"target": name, "value": value, "op": op, "bound": bound, "unit": unit,
                    "met": met})

    def ratio(workload: str, config: str, key: str) -> float | None:
        r = _find(report, workload, config)
        return None if r is None else r.get(key)

    def rpo(workload: str, config: str, only: Sequence[str] | None = None,
            exclude: Sequence[str] = ()) -> float | None:
        r = _find(report, workload, config)
        if r is None or r.get("requests_per_op") is None:
            return None
        per = r["requests_per_op"]
        return sum(v for k, v in per.items()
                   if (only is None or k in only) and k not in exclude)

    def over_floor(workload: str) -> float | None:
        r, floor = _find(report, workload, "inproc"), floor_us(report, workload)
        return None if r is None or not floor else r["per_op_us"] / floor

    def over_ring(workload: str, key: str) -> float | None:
        r, ring = _find(report, workload, "inproc"), (report.get("floor") or {}).get(key)
        return None if r is None or not ring else r["mib_s"] / ring

    add("GETATTR of an open file ≤ 1.5× the floor", over_floor("getattr"), "<=", 1.5, "×")
    add("cold stat ≤ 2× the floor of its LOOKUP", over_floor("stat_cold"), "<=", 2.0, "×")
    add("open + close ≤ 2.5× the floor of its requests", over_floor("open_close"), "<=", 2.5,
        "×")
    add("create + close ≤ 2.5× the floor of its requests", over_floor("create"), "<=", 2.5, "×")
    add("open/read/close a small file ≤ 2.5× the floor of its requests",
        over_floor("small_files"), "<=", 2.5, "×")
    add("1 MiB sequential read ≥ 0.9× the bare ring", over_ring("seq_readinto", "read_mib_s"),
        ">=", 0.9, "×")
    add("1 MiB sequential write ≥ 0.9× the bare ring", over_ring("seq_write", "write_mib_s"),
        ">=", 0.9, "×")
    one, many = _find(report, "stat_cold", "inproc"), _find(report, "stat_cold_threads",
                                                             "inproc")
    add(f"{STAT_THREADS} threads of cold stats ≥ 3× one thread's rate",
        one["per_op_us"] / many["per_op_us"] if one and many else None, ">=", 3.0, "×")
    opened = _find(report, "open_many", "inproc")
    extra = opened["extra"] if opened else {}
    add(f"{opened['ops'] if opened else 10_000} handles open: threads added ≤ 8",
        extra.get("threads_added"), "<=", 8, "threads")
    add("the last open ≤ 1.2× the first", extra.get("last_over_first"), "<=", 1.2, "×")
    remote_stat = _find(report, "stat_cold", "remote")
    add("remote (tcp loopback) stat ≤ 250 µs",
        remote_stat["per_op_us"] if remote_stat else None, "<=", 250, "µs")
    remote = _find(report, "seq_read", "remote")
    add("remote 1 MiB sequential read ≥ 1.5 GB/s",
        remote["mib_s"] * MiB / 1e9 if remote else None, ">=", 1.5, "GB/s")
    add("seq read through read() ≥ 0.5× native", ratio("seq_read", "inproc", "ratio_native"),
        ">=", 0.5, "×")
    add("seq write ≥ 0.6× native", ratio("seq_write", "inproc", "ratio_native"), ">=", 0.6, "×")
    add("economy: cold stat ≤ 1 request", rpo("stat_cold", "inproc"), "<=", 1.0, "req")
    no_reply = ("FORGET", "BATCH_FORGET")  # hiprio, no reply: not a round trip
    add("economy: create ≤ 3 round trips", rpo("create", "inproc", exclude=no_reply),
        "<=", 3.0, "req")
    add("economy: unlink ≤ 2 round trips", rpo("unlink", "inproc", exclude=no_reply),
        "<=", 2.0, "req")
    add("economy: 1 MiB read = 1 request", rpo("seq_read", "inproc", only=("READ",)),
        "<=", 1.0, "req")
    add("economy: ls -l = READDIRPLUS pages only (other requests per entry)",
        rpo("ls_l", "inproc", exclude=("READDIRPLUS", "OPENDIR", "RELEASEDIR")), "<=", 0.001,
        "req")
    return out


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def _fmt_value(w: Workload, r: Result) -> str:
    if w.throughput:
        return (f"{r.mib_s():9.1f} MiB/s [{r.mib_s(max(r.times)):.1f}–"
                f"{r.mib_s(min(r.times)):.1f}]")
    return (f"{r.per_op_us():9.2f} µs/op [{r.per_op_us(min(r.times)):.2f}–"
            f"{r.per_op_us(max(r.times)):.2f}]")


def _fmt_ratio(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}×" if x < 0.1 else f"{x:.2f}×"


def _fmt_us(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _fmt_requests(per: dict[str, float] | None) -> str:
    if per is None:
        return "—"
    if not per:
        return "0"
    return " ".join(f"{k} {v:.3g}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))


def format_table(report: dict[str, Any]) -> str:
    """The results as a Markdown table (what stdout shows and BENCHMARKS.md embeds)."""
    lines = ["| workload | config | median [min–max] | ×native | ×hermit | CPU µs/op "
             "(client / daemon) | peak RSS | requests / op |",
             "|---|---|---|---|---|---|---|---|"]
    for w in WORKLOADS:
        rows = [r for r in report["results"] if r["workload"] == w.name]
        if not rows:
            continue
        for r in rows:
            label = f"{w.name} ({w.op})"
            if r["status"] != "ok":
                lines.append(f"| {label} | {r['config']} | {r['status']}: {r['reason']} "
                             "| | | | | |")
                continue
            if w.throughput:
                value = (f"{r['mib_s']:.0f} MiB/s [{r['mib_s_min']:.0f}–{r['mib_s_max']:.0f}]")
            else:
                value = (f"{r['per_op_us']:.2f} µs [{r['per_op_us_min']:.2f}–"
                         f"{r['per_op_us_max']:.2f}]")
            extra = r.get("extra") or {}
            if "first_open_us" in extra:
                value += (f"; {extra.get('files_open', 0):.0f} open, 1st "
                          f"{extra['first_open_us']:.0f} µs, last {extra['last_open_us']:.0f} µs")
            rss = f"{r['rss_peak_mib']:.0f} MiB" if r["rss_peak_mib"] is not None else "—"
            cpu = _fmt_us(r["cpu_us_per_op"])
            if r["daemon_cpu_us_per_op"] is not None:
                cpu += " / " + _fmt_us(r["daemon_cpu_us_per_op"])
            lines.append(f"| {label} | {r['config']} | {value} | {_fmt_ratio(r['ratio_native'])} "
                         f"| {_fmt_ratio(r['ratio_hermit'])} | {cpu} | {rss} "
                         f"| {_fmt_requests(r['requests_per_op'])} |")
    return "\n".join(lines)


def format_economy(report: dict[str, Any]) -> str:
    """Requests per operation beside the Linux kernel client's and the target."""
    lines = ["| workload (op) | inproc | hermit | Linux kernel client | target |",
             "|---|---|---|---|---|"]
    for w in WORKLOADS:
        cells = []
        for config in ("inproc", "hermit"):
            r = _find(report, w.name, config)
            cells.append(_fmt_requests(r["requests_per_op"]) if r else "—")
        if all(c == "—" for c in cells):
            continue
        lines.append(f"| {w.name} ({w.op}) | {cells[0]} | {cells[1]} | {w.kernel or '—'} "
                     f"| {w.target or '—'} |")
    return "\n".join(lines)


def format_targets(report: dict[str, Any]) -> str:
    """The targets as a Markdown table."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    for t in report["targets"]:
        v = t["value"]
        shown = "n/a" if v is None else (f"{v:.3g} {t['unit']}" if abs(v) < 1000
                                         else f"{v:,.0f} {t['unit']}")
        met = {True: "met", False: "**not met**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {shown} | {met} |")
    return "\n".join(lines)


def format_floor(report: dict[str, Any]) -> str:
    """Each operation beside its floor: the same requests through the bare ring, from one
    thread, with no actor and no thread hand-off."""
    floor = report.get("floor") or {}
    if "us" not in floor:
        return f"(no floor: {floor.get('error', 'not measured')})"
    lines = ["| operation | floor: its requests on the bare ring | in-process | ratio |",
             "|---|---|---|---|"]
    for workload, label in (("getattr", "GETATTR of an open file (fstat)"),
                            ("stat_cold", "stat, cold client cache"),
                            ("open_close", "open + close"), ("create", "create + close"),
                            ("small_files", "open, read, close a 4 KiB file")):
        r, f = _find(report, workload, "inproc"), floor_us(report, workload)
        if r is None or not f:
            continue
        lines.append(f"| {label} | {f:.1f} µs | {r['per_op_us']:.1f} µs | "
                     f"{r['per_op_us'] / f:.2f}× |")
    for workload, key, label in (("seq_readinto", "read_mib_s", "1 MiB sequential read"),
                                 ("seq_write", "write_mib_s", "1 MiB sequential write")):
        r = _find(report, workload, "inproc")
        if r is not None and floor.get(key):
            lines.append(f"| {label} | {floor[key]:.0f} MiB/s | {r['mib_s']:.0f} MiB/s | "
                         f"{r['mib_s'] / floor[key]:.2f}× |")
    ranges = ", ".join(f"{k} {lo:.1f}–{hi:.1f}" for k, (lo, hi) in floor["range"].items())
    lines.append(f"\nFloor per request type (µs, min–max over the repetitions): {ranges}")
    return "\n".join(lines)


def _fmt_load(load: Sequence[float] | None) -> str:
    return "?" if not load else "/".join(f"{x:.2f}" for x in load)


def format_report(report: dict[str, Any]) -> str:
    """Everything stdout shows."""
    meta = report["meta"]
    p = meta["params"]
    head = [
        f"pyvirtiofs bench — {meta['date']}, {meta['cpu']} ×{meta['cpus']}, "
        f"Python {meta['python']}, Linux {meta['kernel']}, {meta['virtiofsd']} "
        f"({meta['virtiofsd_flavor']}, cache={meta['cache']})",
        f"big file {_size(p['big_size'])}, {p['files']} files, {p['random_reads']} random reads, "
        f"{p['streams']} streams, median of {p['reps']} reps"
        f"{' (+1 warm-up)' if p.get('warmup') else ''}; "
        f"took {meta.get('seconds', '?')} s",
        "ratios are speed relative to the reference (time_ref / time): 0.5× = half as fast; "
        f"load average at start {_fmt_load(meta.get('load_average_start'))}, "
        f"at end {_fmt_load(meta.get('load_average_end'))} (on {meta['cpus']} CPUs)",
    ]
    parts = ["\n".join(head), format_table(report), "Request economy (per op):",
             format_economy(report), "Beside the bare ring:", format_floor(report),
             "Targets:", format_targets(report)]
    return "\n\n".join(parts)


def write_chart(report: dict[str, Any], path: str) -> bool:
    """A bar chart of speed relative to native per workload and configuration; False when
    matplotlib is not installed (the optional extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    configs = [c for c in CONFIG_ORDER if c != "native"
               and any(r["config"] == c and r["status"] == "ok" for r in report["results"])]
    names = [w.name for w in WORKLOADS if _find(report, w.name, "native")]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    width = 0.8 / max(1, len(configs))
    colors = {"inproc": "#1f77b4", "remote": "#2ca02c", "hermit": "#d62728"}
    for i, c in enumerate(configs):
        values = []
        for n in names:
            r = _find(report, n, c)
            values.append(r["ratio_native"] if r and r["ratio_native"] else 0.0)
        xs = [j + (i - (len(configs) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, values, width, label=RUNNERS[c].label, color=colors.get(c))
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right")
    ax.set_ylabel("speed relative to host-native os (log scale)")
    meta = report["meta"]
    ax.set_title(f"pyvirtiofs bench ({'quick' if meta['params']['quick'] else 'full'}, "
                 f"{meta['date'][:10]}): higher is better, 1 = native")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=len(configs), fontsize=8,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- command line -----------------------------------------------------------------------------


def _parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": KiB, "M": MiB, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown: {', '.join(bad)} "
                                             f"(choose from {', '.join(choices)})")
        return items
    return parse


def configure_parser(p: argparse.ArgumentParser) -> None:
    """The bench's options (shared by ``pyvirtiofs bench`` and ``pyvirtiofs bench``)."""
    p.add_argument("--quick", action="store_true",
                   help="about a minute: 64 MiB file, 500 files (same call sizes)")
    p.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    p.add_argument("--chart", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    p.add_argument("--reps", type=int, help="repetitions per workload (≥ 5; default 5)")
    p.add_argument("--warmup", action="store_true",
                   help="run one unrecorded repetition before the recorded ones")
    p.add_argument("--size", type=_parse_size, help="big file size, e.g. 1G, 256M")
    p.add_argument("--files", type=int, help="how many files (stat, create, list, …)")
    p.add_argument("--configs", type=_csv(CONFIG_ORDER), default=list(CONFIG_ORDER),
                   help="comma-separated subset of " + ",".join(CONFIG_ORDER))
    p.add_argument("--only", type=_csv(WORKLOAD_NAMES), default=WORKLOAD_NAMES,
                   help="comma-separated subset of workloads: " + ",".join(WORKLOAD_NAMES))
    p.add_argument("--workdir", help="where to make the scratch folder (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--virtiofsd", help="the virtiofsd binary (default: found as usual)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--mount", action="store_true", help="instead: the FUSE mount against "
                   "libfuse's passthrough_ll (its options: pyvirtiofs bench --mount --help)")


def params_from_args(args: argparse.Namespace) -> BenchParams:
    """BenchParams from the command line (``--quick`` first, then explicit overrides)."""
    import dataclasses
    p = BenchParams.quick_params() if args.quick else BenchParams()
    changes: dict[str, Any] = {"warmup": bool(getattr(args, "warmup", False))}
    if args.reps is not None:
        if args.reps < 1:
            raise ValueError("--reps must be ≥ 1")
        changes["reps"] = args.reps
    if args.size is not None:
        if args.size < p.call_size * p.streams:
            raise ValueError(f"--size must be ≥ {_size(p.call_size * p.streams)}")
        changes["big_size"] = args.size // p.call_size * p.call_size
    if args.files is not None:
        if args.files < 1:
            raise ValueError("--files must be ≥ 1")
        changes["files"] = args.files
    return dataclasses.replace(p, **changes)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the bench; print the tables; write ``--json`` and ``--chart`` if asked."""
    p = params_from_args(args)
    if not hasattr(args, "argv"):
        args.argv = _rebuild_argv(args)

    def progress(line: str) -> None:
        if not args.quiet:
            print(f"bench: {line}", file=sys.stderr, flush=True)

    with sigterm_interrupts():  # a killed bench still removes its daemons and folder
        report = run_bench(p, args, progress)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        progress(f"wrote {args.json}")
    if args.chart:
        if write_chart(report, args.chart):
            progress(f"wrote {args.chart}")
        else:
            progress("no chart: matplotlib is not installed (pip install matplotlib)")
    errors = [r for r in report["results"] if r["status"] == "error"]
    return 1 if errors else 0


def _rebuild_argv(args: argparse.Namespace) -> list[str]:
    out = ["--quick"] if args.quick else []
    out += ["--warmup"] if getattr(args, "warmup", False) else []
    for key in ("reps", "size", "files", "json", "chart"):
        value = getattr(args, key, None)
        if value is not None:
            out += [f"--{key}", str(value)]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``pyvirtiofs bench [options]``."""
    parser = argparse.ArgumentParser(prog="pyvirtiofs bench", description=__doc__)
    configure_parser(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--mount" in argv:  # the FUSE mount against passthrough_ll: a bench of its own
        from pyvirtiofs.tools import mountbench
        return mountbench.main([a for a in argv if a != "--mount"])
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_bench(args)
    except (OSError, ValueError) as exc:
        print(f"pyvirtiofs bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
