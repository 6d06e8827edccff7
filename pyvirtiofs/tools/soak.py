"""Soak test: many clients, in-process and remote, hammer one share for minutes and every
result is checked against a model.

    pyvirtiofs soak --minutes 10 --clients 64 [--restart-daemon 3]
    pyvirtiofs soak --seconds 60 --clients 16 --json result.json
    pyvirtiofs soak --hostile --minutes 6       # the agent under hostile load (hostile.py)

What runs:

* a **share server in a child process** (``ShareServer`` with one tenant, or the
  multi-tenant agent with ``--server agent``), so its RSS and open fds are measured apart
  from the clients';
* in this process, one in-process share (``connect(DIR, restart=True)``) used by the
  *local* clients' threads, and one :class:`~pyvirtiofs.api.remote.client.RemoteFS` per
  *remote* client;
* each client works in its own directory ``clients/NAME`` (so its model is exact) and
  reads the read-only files of ``shared/`` (cross-client reads, checked by checksum). The
  workload mixes metadata storms (mkdir/stat/rename/rmdir with the errnos the model
  predicts: EEXIST, ENOTEMPTY, ENOENT), large streams (MiB-sized writes and reads checked
  by SHA-256), many small files, open/close churn and renames.

``--restart-daemon K`` kills (SIGKILL) both daemons — the in-process share's and the
server's — K times, evenly spaced. A caller may then see ``ENOTCONN``/``ESTALE``, but only
*in the window*: from the kill until the share was restarted (ENOTCONN: the operation
started before the restart was done; ESTALE: the task holding the handle started before
it). A failed operation's effect is unknown, so the client re-reads its directory and
resyncs its model — every path the failed task did not touch must be exactly as the model
says (nothing else lost).

The summary: operations, errors by errno (expected vs unexpected), latency percentiles
per kind, RSS and open fds of the server process, of the daemons and of this process.
Exit status 1 on any unexpected error or model mismatch, fds not back to their baseline,
or RSS growth of the server process (or of a daemon that ran the whole time) of
``--rss-limit`` percent or more. RSS growth is measured from the end of a warm-up period
(``--warmup``; default 10 % of the run, at least 10 s, at most 60 s), not from a cold start,
on the *anonymous* RSS (the process's own memory: where leaks show; the total also counts
shared guest-memory pages, which are touched progressively as request buffers get used, and
is reported beside it); growth under 1 MiB passes whatever its percentage.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import errno
import gc
import hashlib
import json
import logging
import os
import queue
import random
import shutil
import signal
import stat as stat_mod
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvirtiofs.tools import procfs
from pyvirtiofs.tools.signals import sigterm_interrupts

__all__ = ["SoakConfig", "format_summary", "main", "run_soak"]

log = logging.getLogger("pyvirtiofs.soak")

MiB = 1 << 20
SMALL_MAX = 4096  # small files keep their whole content in the model
RESTART_ERRNOS = (errno.ENOTCONN, errno.ESTALE)
SAMPLE_INTERVAL = 5.0
# Growth below this many bytes passes whatever the percentage: a daemon's anonymous memory
# is well under 1 MiB, where a few pages are already 10 %.
RSS_NOISE_FLOOR = 1 * MiB


# ==========================================================================================
# Process measurements (/proc, read by procfs)
# ==========================================================================================


@dataclass(frozen=True)
class ProcInfo:
    """One process at one moment: pid, RSS (all / anonymous), open fds, threads."""

    pid: int | None
    rss: int | None
    anon: int | None
    fds: int | None
    threads: int | None = None

    @classmethod
    def of(cls, pid: int | None) -> ProcInfo:
        rss, anon, threads = procfs.memory(pid)
        return cls(pid, rss, anon, procfs.fd_count(pid), threads)


_NOBODY = ProcInfo(None, None, None, None)


@dataclass
class ProcSample:
    """RSS and fds of the watched processes at one moment."""

    t: float
    label: str
    values: dict[str, ProcInfo]

    def to_json(self) -> dict[str, Any]:
        return {"t": round(self.t, 3), "label": self.label,
                "values": {k: vars(v) for k, v in self.values.items()}}


# ==========================================================================================
# Model of one client's directory
# ==========================================================================================


@dataclass(frozen=True)
class FileState:
    """What the model knows of a file: size, SHA-256, and the content if small."""

    size: int
    digest: bytes
    content: bytes | None = None

    @classmethod
    def of(cls, data: bytes) -> FileState:
        return cls(len(data), hashlib.sha256(data).digest(),
                   bytes(data) if len(data) <= SMALL_MAX else None)

    def same(self, other: FileState) -> bool:
        return self.size == other.size and self.digest == other.digest


@dataclass
class Model:
    """The exact expected state of a client's directory (relative paths)."""

    dirs: set[str] = field(default_factory=set)
    files: dict[str, FileState] = field(default_factory=dict)

    def children(self, rel: str) -> set[str]:
        prefix = f"{rel}/" if rel else ""
        out = set()
        for p in [*self.dirs, *self.files]:
            if p.startswith(prefix):
                rest = p[len(prefix):]
                if rest and "/" not in rest:
                    out.add(rest)
        return out

    def move(self, src: str, dst: str) -> None:
        """rename(2) of a file or a directory (with everything under it)."""
        if src in self.files:
            self.files[dst] = self.files.pop(src)
            return
        self.dirs.discard(src)
        self.dirs.add(dst)
        for d in [d for d in self.dirs if d.startswith(src + "/")]:
            self.dirs.discard(d)
            self.dirs.add(dst + d[len(src):])
        for f in [f for f in self.files if f.startswith(src + "/")]:
            self.files[dst + f[len(src):]] = self.files.pop(f)


def _under(path: str, roots: set[str]) -> bool:
    """Whether ``path`` is one of ``roots`` or below one of them."""
    while True:
        if path in roots:
            return True
        if "/" not in path:
            return False
        path = path.rsplit("/", 1)[0]


# ==========================================================================================
# Recording
# ==========================================================================================


@dataclass
class RestartHit:
    """An ENOTCONN/ESTALE a client saw (classified after the run against kill times)."""

    client: str
    path: str  # which daemon served it: "local", "remote" or "remote:TENANT"
    op: str
    errno: int
    op_start: float
    task_start: float
    end: float
    expected: bool | None = None


@dataclass
class Failure:
    """An unexpected outcome: an errno the model did not predict, or a model mismatch."""

    client: str
    op: str
    what: str  # errno name, "model", "lost" or "hang"
    detail: str
    t: float


class _Interrupted(Exception):
    """A task met ENOTCONN/ESTALE: its effect is unknown; resync."""


class _Unexpected(Exception):
    """A task met an unexpected outcome (already recorded): resync."""


class _Stop(Exception):
    """The run is over."""


_EXPECTED_ERROR = object()


# ==========================================================================================
# A client
# ==========================================================================================


class SoakClient:
    """One client: a thread that runs randomized tasks in ``clients/NAME`` and checks each
    result against its :class:`Model`."""

    TASKS = (("meta_storm", 22), ("small_files", 20), ("stream", 8), ("churn", 20),
             ("rename", 15), ("shared_read", 10), ("verify", 5))

    def __init__(self, name: str, path: str, fs: Any, shared: dict[str, FileState],
                 seed: int, max_stream: int, stop: threading.Event,
                 host_root: str) -> None:
        self.name = name
        self.path = path  # which daemon serves it: "local", "remote", "remote:t0", …
        self.fs = fs
        self.root = f"clients/{name}"
        self.host_root = host_root
        self.shared = shared
        self.shared_names = sorted(shared)
        self.rng = random.Random(seed)
        self.max_stream = max_stream
        self.stop = stop
        self.model = Model()
        self.lat: dict[str, array.array[float]] = {}
        self.expected: Counter[str] = Counter()
        self.failures: list[Failure] = []
        self.hits: list[RestartHit] = []
        self.tasks_done = 0
        self.resyncs = 0
        self.bytes_written = 0
        self.bytes_read = 0
        self.seq = 0
        self.task_start = 0.0
        self.touched: set[str] = set()
        self.thread = threading.Thread(target=self._run, name=f"soak-{name}", daemon=True)
        self.finished = threading.Event()
        self.cleaned = False

    # -- plumbing --------------------------------------------------------------------------

    def p(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def call(self, op: str, fn: Callable[..., Any], *args: Any, expect: int | None = None,
             **kwargs: Any) -> Any:
        """Run one primitive, time it, classify its outcome. Returns its result, or
        ``_EXPECTED_ERROR`` when it failed with the errno the model predicted."""
        t0 = time.monotonic()
        try:
            result = fn(*args, **kwargs)
        except OSError as exc:
            t1 = time.monotonic()
            code = exc.errno or 0
            if expect is not None and code == expect:
                self._lat(op, t1 - t0)
                self.expected[errno.errorcode.get(code, str(code))] += 1
                return _EXPECTED_ERROR
            if code in RESTART_ERRNOS:
                self.hits.append(RestartHit(self.name, self.path, op, code, t0,
                                            self.task_start, t1))
                raise _Interrupted(op) from exc
            self.fail(op, errno.errorcode.get(code, str(code)), f"{args!r}: {exc}")
            raise _Unexpected(op) from exc
        self._lat(op, time.monotonic() - t0)
        if expect is not None:
            self.fail(op, "model", f"{args!r}: expected {errno.errorcode[expect]}, succeeded")
            raise _Unexpected(op)
        return result

    def _lat(self, op: str, seconds: float) -> None:
        a = self.lat.get(op)
        if a is None:
            a = self.lat[op] = array.array("d")
        a.append(seconds)

    def fail(self, op: str, what: str, detail: str) -> None:
        log.error("client %s: %s %s: %s", self.name, op, what, detail)
        self.failures.append(Failure(self.name, op, what, detail, time.monotonic()))

    def check(self, ok: bool, op: str, detail: str) -> None:
        if not ok:
            self.fail(op, "model", detail)
            raise _Unexpected(op)

    def touch(self, *rels: str) -> None:
        self.touched.update(rels)

    # -- life cycle ------------------------------------------------------------------------

    def prime(self) -> None:
        """Warm the lookup cache the way the end state will have it (fd baselines)."""
        self.fs.stat(self.root)
        for name in self.shared_names:
            self.fs.stat(f"shared/{name}")
        # One large read and write: pyzmq starts its zero-copy garbage collector (a
        # thread with its own context: 7 fds) on the first large frame, once.
        big = max(self.shared_names, key=lambda n: self.shared[n].size)
        self.fs.read_bytes(f"shared/{big}")
        self.fs.write_bytes(self.p("prime"), bytes(256 << 10))
        self.fs.unlink(self.p("prime"))

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        names = [t for t, _ in self.TASKS]
        weights = [w for _, w in self.TASKS]
        try:
            while not self.stop.is_set():
                task = self.rng.choices(names, weights)[0]
                self.run_task(task, getattr(self, f"task_{task}"))
        except Exception as exc:  # a bug in the soak itself: never hide it
            self.fail("client", type(exc).__name__, repr(exc))
            log.exception("client %s crashed", self.name)
        finally:
            self.finished.set()

    def run_task(self, name: str, fn: Callable[[], None]) -> None:
        self.task_start = time.monotonic()
        self.touched = set()
        try:
            fn()
            self.tasks_done += 1
        except (_Interrupted, _Unexpected):
            self.resync(set(self.touched))

    # -- resync ----------------------------------------------------------------------------

    def scan(self) -> Model:
        """The directory as the share shows it now (contents read and hashed)."""
        seen = Model()
        stack = [""]
        while stack:
            rel = stack.pop()
            for entry in self.fs.scandir(self.p(rel)):
                child = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    seen.dirs.add(child)
                    stack.append(child)
                else:
                    seen.files[child] = FileState.of(self.fs.read_bytes(self.p(child)))
        return seen

    def resync(self, uncertain: set[str]) -> None:
        """After a failed task: re-read the directory, check that nothing the task did not
        touch changed, and take what is there as the new model."""
        self.resyncs += 1
        deadline = time.monotonic() + 180
        while True:
            self.task_start = t0 = time.monotonic()
            try:
                seen = self.scan()
                break
            except OSError as exc:
                t1 = time.monotonic()
                if exc.errno in RESTART_ERRNOS and t1 < deadline:
                    self.hits.append(RestartHit(self.name, self.path, "resync", exc.errno or 0,
                                                t0, t0, t1))
                    time.sleep(0.05)
                    continue
                self.fail("resync", errno.errorcode.get(exc.errno or 0, "?"), str(exc))
                if t1 >= deadline or exc.errno not in RESTART_ERRNOS:
                    time.sleep(0.5)
                    deadline = time.monotonic() + 180
                    if self.stop.is_set():
                        raise _Stop() from exc
        self.compare(seen, uncertain, "resync")
        self.model = seen

    def compare(self, seen: Model, uncertain: set[str], op: str) -> int:
        """Differences between ``seen`` and the model outside ``uncertain`` (recorded)."""
        bad = 0
        for d in self.model.dirs ^ seen.dirs:
            if not _under(d, uncertain):
                bad += 1
                self.fail(op, "lost", f"directory {d}: model {d in self.model.dirs}, "
                                      f"share {d in seen.dirs}")
        for f in set(self.model.files) | set(seen.files):
            if _under(f, uncertain):
                continue
            a, b = self.model.files.get(f), seen.files.get(f)
            if a is None or b is None or not a.same(b):
                bad += 1
                self.fail(op, "lost", f"file {f}: model {a and (a.size, a.digest.hex()[:12])}"
                                      f", share {b and (b.size, b.digest.hex()[:12])}")
        return bad

    # -- tasks ---------------------------------------------------------------------------

    def _write_file(self, op: str, rel: str, data: bytes) -> None:
        self.touch(rel)
        self.call(op, self.fs.write_bytes, self.p(rel), data)
        self.model.files[rel] = FileState.of(data)
        self.bytes_written += len(data)

    def _read_check(self, op: str, rel: str) -> None:
        data = self.call(op, self.fs.read_bytes, self.p(rel))
        self.bytes_read += len(data)
        want = self.model.files[rel]
        self.check(FileState.of(data).same(want), op,
                   f"{rel}: read {len(data)} bytes sha {hashlib.sha256(data).hexdigest()[:12]}, "
                   f"model {want.size} sha {want.digest.hex()[:12]}")

    def _trim(self) -> None:
        """Keep the directory bounded: remove files beyond 120, directories beyond 8."""
        files = sorted(f for f in self.model.files if "/" not in f)
        while len(files) > 120:
            rel = files.pop(self.rng.randrange(len(files)))
            self.touch(rel)
            self.call("unlink", self.fs.unlink, self.p(rel))
            del self.model.files[rel]
        tops = sorted(d for d in self.model.dirs if "/" not in d)
        while len(tops) > 8:
            self._remove_tree(tops.pop(0))

    def _remove_tree(self, rel: str) -> None:
        self.touch(rel)
        for f in sorted(f for f in self.model.files if f.startswith(rel + "/")):
            self.call("unlink", self.fs.unlink, self.p(f))
            del self.model.files[f]
        for d in sorted((d for d in self.model.dirs if d.startswith(rel + "/")),
                        key=lambda d: -d.count("/")):
            self.call("rmdir", self.fs.rmdir, self.p(d))
            self.model.dirs.discard(d)
        self.call("rmdir", self.fs.rmdir, self.p(rel))
        self.model.dirs.discard(rel)

    def task_meta_storm(self) -> None:
        """mkdir/stat/listdir/rename/rmdir, with the errors the model predicts."""
        n = self._next()
        d, d2 = f"m{n}", f"m{n}r"
        self.touch(d, d2)
        self.call("mkdir", self.fs.mkdir, self.p(d))
        self.model.dirs.add(d)
        self.call("mkdir", self.fs.mkdir, self.p(d), expect=errno.EEXIST)
        subs = self.rng.randint(1, 6)
        for i in range(subs):
            self.call("mkdir", self.fs.mkdir, self.p(f"{d}/s{i}"))
            self.model.dirs.add(f"{d}/s{i}")
        self._write_file("small_write", f"{d}/s0/f", self.rng.randbytes(self.rng.randint(0, 512)))
        self.call("rmdir", self.fs.rmdir, self.p(f"{d}/s0"), expect=errno.ENOTEMPTY)
        st = self.call("stat", self.fs.stat, self.p(d))
        self.check(stat_mod.S_ISDIR(st.st_mode), "stat", f"{d} is not a directory")
        names = set(self.call("listdir", self.fs.listdir, self.p(d)))
        self.check(names == self.model.children(d), "listdir",
                   f"{d}: {sorted(names)} != model {sorted(self.model.children(d))}")
        self.call("rename", self.fs.rename, self.p(d), self.p(d2))
        self.model.move(d, d2)
        self.call("stat", self.fs.stat, self.p(d), expect=errno.ENOENT)
        st = self.call("stat", self.fs.stat, self.p(f"{d2}/s0/f"))
        want = self.model.files[f"{d2}/s0/f"]
        self.check(st.st_size == want.size and stat_mod.S_ISREG(st.st_mode), "stat",
                   f"{d2}/s0/f: size {st.st_size} != {want.size}")
        if self.rng.random() < 0.7:
            self._remove_tree(d2)
            self.call("stat", self.fs.stat, self.p(d2), expect=errno.ENOENT)
        self._trim()

    def task_small_files(self) -> None:
        """Many small files: create, read back, remove some."""
        n = self._next()
        names = [f"f{n}_{i}" for i in range(self.rng.randint(4, 16))]
        for rel in names:
            self._write_file("small_write", rel,
                             self.rng.randbytes(self.rng.choice((0, 1, 100, 1000, 4096))))
        for rel in names:
            self._read_check("small_read", rel)
        for rel in self.rng.sample(names, len(names) // 2):
            self.touch(rel)
            self.call("unlink", self.fs.unlink, self.p(rel))
            del self.model.files[rel]
            self.call("stat", self.fs.stat, self.p(rel), expect=errno.ENOENT)
        self._trim()

    def task_stream(self) -> None:
        """A MiB-sized file written in 1 MiB pieces (sometimes fsynced), read back in
        1 MiB pieces, checked by SHA-256; one random pread checked too."""
        size = self.rng.randint(MiB, max(MiB, self.max_stream))
        data = self.rng.randbytes(size)
        rel = f"big{self._next() % 3}"
        self.touch(rel)
        view = memoryview(data)
        f = self.call("open", self.fs.open_raw, self.p(rel),
                      os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for off in range(0, size, MiB):
                piece = view[off:off + MiB]
                n = self.call("write_1MiB", f.write, piece)
                self.check(n == len(piece), "write_1MiB", f"{rel}: short write {n}")
            if self.rng.random() < 0.25:
                self.call("fsync", f.fsync)
        finally:
            self.call("close", f.close)
        self.model.files[rel] = FileState.of(data)
        self.bytes_written += size
        h = hashlib.sha256()
        buf = bytearray(MiB)
        total = 0
        f = self.call("open", self.fs.open_raw, self.p(rel), os.O_RDONLY)
        try:
            while True:
                n = self.call("read_1MiB", f.readinto, buf)
                if not n:
                    break
                h.update(memoryview(buf)[:n])
                total += n
            off = self.rng.randrange(size)
            got = self.call("pread", f.pread, 4096, off)
            self.check(got == data[off:off + 4096], "pread", f"{rel}: pread at {off} differs")
            st = self.call("fstat", f.stat)
            self.check(st.st_size == size, "fstat", f"{rel}: size {st.st_size} != {size}")
        finally:
            self.call("close", f.close)
        self.bytes_read += total
        same = h.digest() == self.model.files[rel].digest
        self.check(total == size and same, "read_1MiB",
                   f"{rel}: read {total} bytes (model {size}), checksum "
                   f"{'ok' if same else 'differs'}")

    def task_churn(self) -> None:
        """Open/close churn: open, pread a little, close — many times; and directories."""
        files = sorted(self.model.files)
        if not files:
            self.task_small_files()
            return
        for _ in range(self.rng.randint(8, 24)):
            rel = self.rng.choice(files)
            want = self.model.files[rel]
            f = self.call("open", self.fs.open_raw, self.p(rel), os.O_RDONLY)
            try:
                off = self.rng.randrange(max(1, want.size))
                got = self.call("pread", f.pread, 64, off)
                if want.content is not None:
                    self.check(got == want.content[off:off + 64], "pread",
                               f"{rel}: pread at {off} differs")
                else:
                    self.check(len(got) == min(64, want.size - off), "pread",
                               f"{rel}: pread at {off} got {len(got)} bytes")
            finally:
                self.call("close", f.close)
        for _ in range(self.rng.randint(1, 4)):
            names = set(self.call("listdir", self.fs.listdir, self.p("")))
            self.check(names == self.model.children(""), "listdir",
                       f"root: {len(names)} names != model {len(self.model.children(''))}")

    def task_rename(self) -> None:
        """Rename files: to a new name, or over an existing file (which it replaces)."""
        files = sorted(f for f in self.model.files if "/" not in f)
        if len(files) < 2:
            self.task_small_files()
            return
        for _ in range(self.rng.randint(1, 6)):
            src = self.rng.choice(files)
            dst = self.rng.choice(files) if self.rng.random() < 0.3 else f"r{self._next()}"
            if dst == src:
                continue
            self.touch(src, dst)
            self.call("rename", self.fs.rename, self.p(src), self.p(dst))
            self.model.move(src, dst)
            files = sorted(f for f in self.model.files if "/" not in f)
            self.call("stat", self.fs.stat, self.p(src), expect=errno.ENOENT)
            st = self.call("stat", self.fs.stat, self.p(dst))
            want = self.model.files[dst]
            self.check(st.st_size == want.size, "stat",
                       f"{dst}: size {st.st_size} != model {want.size}")
            if want.size <= 64 * 1024:
                self._read_check("small_read", dst)

    def task_shared_read(self) -> None:
        """Read a read-only file every client reads, check its checksum."""
        for _ in range(self.rng.randint(1, 3)):
            name = self.rng.choice(self.shared_names)
            data = self.call("shared_read", self.fs.read_bytes, f"shared/{name}")
            self.bytes_read += len(data)
            want = self.shared[name]
            self.check(FileState.of(data).same(want), "shared_read",
                       f"shared/{name}: {len(data)} bytes, checksum differs")

    def task_verify(self) -> None:
        """Compare the whole directory tree (names, kinds, sizes) with the model."""
        t0 = time.monotonic()
        seen_dirs: set[str] = set()
        seen_sizes: dict[str, int] = {}
        stack = [""]
        try:
            while stack:
                rel = stack.pop()
                for entry in self.fs.scandir(self.p(rel)):
                    child = f"{rel}/{entry.name}" if rel else entry.name
                    if entry.is_dir(follow_symlinks=False):
                        seen_dirs.add(child)
                        stack.append(child)
                    else:
                        seen_sizes[child] = entry.stat(follow_symlinks=False).st_size
        except OSError as exc:
            t1 = time.monotonic()
            if exc.errno in RESTART_ERRNOS:
                self.hits.append(RestartHit(self.name, self.path, "verify", exc.errno or 0,
                                            t0, self.task_start, t1))
                raise _Interrupted("verify") from exc
            self.fail("verify", errno.errorcode.get(exc.errno or 0, "?"), str(exc))
            raise _Unexpected("verify") from exc
        self._lat("verify_tree", time.monotonic() - t0)
        model_sizes = {f: s.size for f, s in self.model.files.items()}
        self.check(seen_dirs == self.model.dirs and seen_sizes == model_sizes, "verify",
                   f"tree differs: dirs +{sorted(seen_dirs - self.model.dirs)[:5]} "
                   f"-{sorted(self.model.dirs - seen_dirs)[:5]}, files "
                   f"+{sorted(set(seen_sizes) - set(model_sizes))[:5]} "
                   f"-{sorted(set(model_sizes) - set(seen_sizes))[:5]}")

    # -- the end ---------------------------------------------------------------------------

    def final_check(self) -> None:
        """Full content check through the share, then of the host files themselves."""
        self.run_task("final", lambda: self.compare(self.scan(), set(), "final"))
        host = Model()
        base = os.path.join(self.host_root, self.root)
        for dirpath, dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            rel = "" if rel == "." else rel
            for d in dirnames:
                host.dirs.add(f"{rel}/{d}" if rel else d)
            for fname in filenames:
                with open(os.path.join(dirpath, fname), "rb") as fh:
                    host.files[f"{rel}/{fname}" if rel else fname] = FileState.of(fh.read())
        self.compare(host, set(), "host")

    def cleanup(self) -> None:
        """Remove everything the client made (through the share); keep its directory."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            self.task_start = time.monotonic()
            self.touched = set()
            try:
                for top in sorted(self.model.children("")):
                    if top in self.model.dirs:
                        self._remove_tree(top)
                    else:
                        self.touch(top)
                        self.call("unlink", self.fs.unlink, self.p(top))
                        del self.model.files[top]
                self.cleaned = True
                return
            except (_Interrupted, _Unexpected):
                self.resync(set(self.touched))


# ==========================================================================================
# The share server, in a child process
# ==========================================================================================


class ServerProcess:
    """A share server in a child process: ``python -m pyvirtiofs.tools.soak _server`` (a ShareServer
    with one tenant that restarts its daemon), talking JSON lines on stdin/stdout.

    Every server kind answers the same questions: how many tenants, which host folder a
    tenant sees as its root, how a client of a tenant connects, the daemon pid of each
    tenant and when each tenant's share was restarted (``time.monotonic``)."""

    kind = "serve"

    def __init__(self, host: str, runtime: str, virtiofsd: str | None) -> None:
        self.host = host
        self.runtime = runtime
        self.virtiofsd = virtiofsd
        self.proc: subprocess.Popen[str] | None = None
        self.endpoints: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._log: Any = None

    # -- what the soak asks --------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def tenants(self) -> int:
        return 1

    def tenant_root(self, tenant: int) -> str:
        """The host folder tenant ``tenant`` sees as ``/``."""
        return self.host

    def path_of(self, tenant: int) -> str:
        """The name of the daemon path serving ``tenant`` (restart windows are per path)."""
        return "remote"

    def connect_args(self, tenant: int) -> tuple[str, dict[str, Any]]:
        """Endpoint and ``connect_remote`` keyword arguments for a client of ``tenant``."""
        return self.endpoints[0], {}

    def daemon_pids(self) -> dict[str, int | None]:
        return {"remote": self.stats().get("daemon_pid")}

    def restart_times(self) -> dict[str, list[float]]:
        return {"remote": [e["t"] for e in self.events if e["event"] == "restarted"]}

    def gc_report(self) -> dict[str, Any]:
        """Run a full garbage collection in the server; what it freed."""
        return self.request("debug")

    # -- the child -----------------------------------------------------------------------

    def _spawn(self, argv: list[str], *, pipes: bool) -> None:
        self._log = open(os.path.join(self.runtime, "server.log"), "w")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else self._log, stderr=self._log, text=True,
            )

    def start(self) -> ServerProcess:
        argv = [sys.executable, "-m", "pyvirtiofs.tools.soak", "_server", "--dir", self.host,
                "--bind", f"ipc://{self.runtime}/soak.sock"]
        if self.virtiofsd:
            argv += ["--virtiofsd", self.virtiofsd]
        self._spawn(argv, pipes=True)
        threading.Thread(target=self._read, name="soak-server-reader", daemon=True).start()
        if not self._ready.wait(60) or not self.endpoints:
            self.stop()
            raise RuntimeError(f"the share server did not start: {self.log_tail()}")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "ready" in msg:
                self.endpoints = msg["endpoints"]
                self._ready.set()
            elif "event" in msg:
                self.events.append(msg)
            elif "reply" in msg:
                self._replies.put(msg["reply"])
        self._ready.set()
        self._replies.put({})

    def request(self, command: str, timeout: float = 30.0) -> dict[str, Any]:
        """Send a command line to the child and wait for its reply ({} if none)."""
        with self._lock:
            if self.proc is None or self.proc.stdin is None:
                return {}
            try:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                return {}
            try:
                return self._replies.get(timeout=timeout)
            except queue.Empty:
                return {}

    def stats(self) -> dict[str, Any]:
        return self.request("stats")

    def log_tail(self, limit: int = 3000) -> str:
        try:
            with open(os.path.join(self.runtime, "server.log")) as f:
                return f.read()[-limit:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        """Stop the child cleanly (kill it after 60 s); its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._ask_to_stop()
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if self._log is not None:
            self._log.close()
        return rc

    def _ask_to_stop(self) -> None:
        with contextlib.suppress(Exception):
            self.request("quit", timeout=60)


class AgentProcess(ServerProcess):
    """The multi-tenant agent (``pyvirtiofs agent``) in a child process: tenants
    ``t0``…, each with its own key pair and its own folder ``HOST/tenants/tN`` served by its
    own daemon; remote clients are spread over the tenants. Restarts are seen by polling
    the agent's status (every 0.1 s, so windows close up to that much late)."""

    kind = "agent"

    def __init__(self, host: str, runtime: str, virtiofsd: str | None,
                 tenants: int) -> None:
        super().__init__(host, runtime, virtiofsd)
        self._tenants = tenants
        self.keys: list[Any] = []
        self._restarts: dict[str, list[float]] = {}
        self._pids: dict[str, int | None] = {}
        self._stop_poll = threading.Event()

    @property
    def tenants(self) -> int:
        return self._tenants

    def tenant_root(self, tenant: int) -> str:
        return os.path.join(self.host, "tenants", f"t{tenant}")

    def path_of(self, tenant: int) -> str:
        return f"remote:t{tenant}"

    def connect_args(self, tenant: int) -> tuple[str, dict[str, Any]]:
        return self.endpoints[0], {"curve": self.keys[tenant]}

    def start(self) -> AgentProcess:
        from pyvirtiofs.api.remote import keys as keymod

        keydir = os.path.join(self.runtime, "keys")
        _pub, agent_secret = keymod.generate(keydir, "agent")
        lines = ["[agent]", f'bind = "ipc://{self.runtime}/agent.sock"',
                 f'key_file = "{agent_secret}"', f'runtime_dir = "{self.runtime}/rt"',
                 'log_format = "text"', 'log_level = "warning"',
                 "heartbeat_timeout = 60"]
        if self.virtiofsd:
            lines.append(f'virtiofsd = "{self.virtiofsd}"')
        lines += ["", "[limits]", "requests_in_flight = 256", ""]
        for t in range(self._tenants):
            public_file, secret_file = keymod.generate(keydir, f"t{t}")
            self.keys.append(keymod.client_keys(secret_file, os.path.join(keydir,
                                                                          "agent.key")))
            lines += [f"[tenants.t{t}]", f'public_key = "{public_file}"',
                      f'share = "{self.tenant_root(t)}"', ""]
        config = os.path.join(self.runtime, "agent.toml")
        with open(config, "w") as f:
            f.write("\n".join(lines))
        self._spawn([sys.executable, "-m", "pyvirtiofs", "agent", "--config", config],
                    pipes=False)
        self.endpoints = [f"ipc://{self.runtime}/agent.sock"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc is not None:
            if self.proc.poll() is not None:
                break
            if self._poll():
                threading.Thread(target=self._poller, name="soak-agent-poll",
                                 daemon=True).start()
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the agent did not start: {self.log_tail()}")

    def stats(self) -> dict[str, Any]:
        from pyvirtiofs.api.agent import query_control

        try:
            return query_control(os.path.join(self.runtime, "rt"), "status", timeout=10)
        except Exception:
            return {}

    def _poll(self) -> bool:
        tenants = self.stats().get("tenants") or {}
        now = time.monotonic()
        for tid, t in tenants.items():
            path = f"remote:{tid}"
            seen = self._restarts.setdefault(path, [])
            gen = int(t.get("generation", 0))
            while len(seen) < gen:
                seen.append(now)
            self._pids[path] = t.get("daemon_pid")
        return bool(tenants)

    def _poller(self) -> None:
        while not self._stop_poll.wait(0.1):
            self._poll()

    def daemon_pids(self) -> dict[str, int | None]:
        self._poll()
        return dict(self._pids)

    def restart_times(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self._restarts.items()}

    def gc_report(self) -> dict[str, Any]:
        return {}

    def stop(self) -> int | None:
        self._stop_poll.set()
        return super().stop()

    def _ask_to_stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)  # the agent drains and exits 0


def _ring_state(transport: Any) -> list[dict[str, int]]:
    """Our view of each virtqueue of a (dead) transport: the indices we keep and what
    guest memory holds (to tell a device that misread the rings from memory we broke)."""
    out = []
    for index, vq in enumerate(getattr(transport, "queues", [])):
        with contextlib.suppress(Exception):
            out.append({"queue": index, **vq.indices()})
    return out


def _debug_objects() -> dict[str, Any]:
    """Diagnostics of the server process: live transports (closed or not) before a full
    garbage collection, then fds and RSS before and after it."""

    from pyvirtiofs.hw.vhost_user.transport import VhostUserTransport

    transports = [{"closed": t._closed,
                   "daemon_pid": t.daemon.pid if t.daemon is not None else None}
                  for t in gc.get_objects() if isinstance(t, VhostUserTransport)]
    out: dict[str, Any] = {"transports_before_gc": transports,
                           "fd_kinds_before_gc": procfs.fd_kinds(os.getpid()),
                           "rss_before_gc": procfs.memory(os.getpid())}
    out["collected"] = gc.collect()
    out["fd_kinds_after_gc"] = procfs.fd_kinds(os.getpid())
    out["rss_after_gc"] = procfs.memory(os.getpid())
    return out


def _server_child(argv: Sequence[str]) -> int:
    """The child process: serve DIR on --bind until stdin says quit (or closes)."""
    from pyvirtiofs.api.local import connect
    from pyvirtiofs.api.remote.process import tune_malloc_for_servers
    from pyvirtiofs.api.remote.server import ShareServer, Tenant

    p = argparse.ArgumentParser(prog="python -m pyvirtiofs.tools.soak _server")
    p.add_argument("--dir", required=True)
    p.add_argument("--bind", required=True)
    p.add_argument("--virtiofsd")
    args = p.parse_args(argv)
    _quiet_logging(logging.WARNING)
    tune_malloc_for_servers()  # as `pyvirtiofs serve` does
    out_lock = threading.Lock()

    def emit(obj: dict[str, Any]) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    def opener() -> Any:
        return connect(args.dir, virtiofsd=args.virtiofsd)

    class RestartingTenant(Tenant):
        """A tenant whose share is replaced by a fresh one when its daemon died."""

        __hash__ = object.__hash__
        __eq__ = object.__eq__

        def alive(self) -> bool:
            fs = self.fs
            daemon = getattr(fs.transport, "daemon", None)
            up = fs.transport.alive() and (daemon is None or daemon.alive())
            return bool(up) and fs.session.is_alive()

        def restart(self) -> Any:
            daemon = getattr(self.fs.transport, "daemon", None)
            if daemon is not None:  # what the dead daemon said, before it is cleaned up
                daemon.wait(2.0)
                emit({"event": "daemon_died", "t": time.monotonic(), "pid": daemon.pid,
                      "returncode": daemon.returncode(),
                      "stderr": daemon.stderr_text(2000),
                      "rings": _ring_state(self.fs.transport)})
            with contextlib.suppress(Exception):
                self.fs.close()
            return opener()

    tenant = RestartingTenant("soak", opener())

    def on_event(event: str, tenant_name: str | None, **fields: Any) -> None:
        if event in ("restart", "restarted", "restart_failed"):
            emit({"event": event, "t": time.monotonic(),
                  **{k: v for k, v in fields.items() if isinstance(v, (int, str, float))}})

    server = ShareServer(args.bind, tenant=tenant, on_event=on_event,
                         heartbeat_timeout=60.0).start()
    signal.signal(signal.SIGTERM, lambda *a: sys.stdin.close())
    emit({"ready": True, "endpoints": server.endpoints, "pid": os.getpid(),
          "daemon_pid": tenant.fs.daemon_pid})
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                fs = tenant.fs
                try:
                    session = fs.stats()["session"]
                except Exception as exc:
                    session = {"error": str(exc)}
                emit({"reply": {"pid": os.getpid(), "daemon_pid": fs.daemon_pid,
                                "server": server.stats(),
                                "tenant": tenant.stats.snapshot(), "session": session}})
            elif command == "debug":
                emit({"reply": _debug_objects()})
            elif command == "quit":
                break
    except (ValueError, OSError):
        pass
    server.stop()
    with contextlib.suppress(Exception):
        tenant.fs.close()
    emit({"reply": {"stopped": True}})
    return 0


# ==========================================================================================
# The soak
# ==========================================================================================


@dataclass
class SoakConfig:
    """What to run. See ``pyvirtiofs soak --help``."""

    duration: float = 60.0
    clients: int = 16
    remote: int | None = None  # remote clients (default: half)
    restart_daemon: int = 0
    max_stream: int = 4 * MiB
    warmup: float | None = None
    rss_limit: float = 10.0
    seed: int | None = None
    directory: str | None = None
    keep: bool = False
    virtiofsd: str | None = None
    server: str = "serve"
    progress: float = 10.0
    shared_files: int = 12
    agent_tenants: int = 4

    def warmup_seconds(self) -> float:
        if self.warmup is not None:
            return self.warmup
        return min(60.0, max(10.0, 0.1 * self.duration))


def _quiet_logging(level: int = logging.CRITICAL) -> None:
    """The soak counts every error itself; the actors' and server's own log lines about
    a killed daemon (and the release failures that follow) would only be noise."""
    for name in ("pykka", "pyvirtiofs"):
        logging.getLogger(name).setLevel(level)
    # Except why a daemon died: its exit status and last words (a kill by the soak itself
    # says "exit status -9"; anything else is a finding).
    logging.getLogger("pyvirtiofs.actors.device").setLevel(logging.ERROR)


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    s = sorted(values)
    n = len(s)

    def q(p: float) -> float:
        return s[min(n - 1, max(0, round(p * (n - 1))))]

    return {"count": n, "p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": s[-1]}


class _Sampler:
    """Samples RSS and fds of the watched processes."""

    def __init__(self, watch: Callable[[], dict[str, int | None]]) -> None:
        self.watch = watch
        self.samples: list[ProcSample] = []
        self.t0 = time.monotonic()

    def sample(self, label: str = "") -> ProcSample:
        values = {name: ProcInfo.of(pid) for name, pid in self.watch().items()}
        s = ProcSample(time.monotonic() - self.t0, label, values)
        self.samples.append(s)
        return s


def _wait_fds(pid: int | None, limit: int | None, timeout: float = 15.0) -> int | None:
    """fds of ``pid`` once they are back to ``limit`` or below (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    n = procfs.fd_count(pid)
    while n is not None and limit is not None and n > limit and time.monotonic() < deadline:
        time.sleep(0.2)
        n = procfs.fd_count(pid)
    return n


def _make_shared(host: str, count: int, rng: random.Random) -> dict[str, FileState]:
    shared = os.path.join(host, "shared")
    os.makedirs(shared, exist_ok=True)
    states: dict[str, FileState] = {}
    sizes = [0, 1, 4095, 4096, 65537, 128 << 10, MiB - 1, MiB, MiB + 1, 2 * MiB + 12345]
    for i in range(count):
        data = rng.randbytes(sizes[i % len(sizes)] + (i // len(sizes)) * 777)
        name = f"ro{i}.bin"
        with open(os.path.join(shared, name), "wb") as f:
            f.write(data)
        os.chmod(os.path.join(shared, name), 0o444)
        states[name] = FileState.of(data)
    return states


def run_soak(config: SoakConfig, out: Any = sys.stderr) -> dict[str, Any]:
    """Run a soak; returns the result (what :func:`format_summary` prints)."""
    from pyvirtiofs.api.local import connect
    from pyvirtiofs.api.remote.client import connect_remote

    seed = config.seed if config.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    n_remote = config.clients // 2 if config.remote is None else config.remote
    n_remote = max(0, min(config.clients, n_remote))
    n_local = config.clients - n_remote
    base = config.directory or tempfile.mkdtemp(prefix="pyvirtiofs-soak-")
    host = os.path.join(base, "share")
    runtime = tempfile.mkdtemp(prefix="pyvirtiofs-soak-rt-")
    os.makedirs(host, exist_ok=True)
    names = [f"L{i:02d}" for i in range(n_local)] + [f"R{i:02d}" for i in range(n_remote)]

    def say(text: str) -> None:
        if out is not None:
            print(text, file=out, flush=True)

    result: dict[str, Any] = {"seed": seed, "duration": config.duration,
                              "clients": config.clients, "local_clients": n_local,
                              "remote_clients": n_remote, "server": config.server,
                              "restart_daemon": config.restart_daemon,
                              "warmup": config.warmup_seconds(), "directory": base}
    server: ServerProcess | None = None
    local: Any = None
    remotes: list[Any] = []
    clients: list[SoakClient] = []
    stop = threading.Event()
    local_restarts: list[float] = []
    kills: list[dict[str, Any]] = []
    t_begin = time.monotonic()
    phases: dict[str, float] = {}
    result["phases"] = phases
    try:
        if n_remote:
            if config.server == "agent":
                server = AgentProcess(host, runtime, config.virtiofsd,
                                      tenants=min(config.agent_tenants, n_remote))
            else:
                server = ServerProcess(host, runtime, config.virtiofsd)
        # Each share's root folder gets the read-only files and the clients' folders.
        areas = {"local": host}
        homes: list[tuple[str, int | None]] = [("local", None)] * n_local
        if server is not None:
            for t in range(server.tenants):
                areas[server.path_of(t)] = server.tenant_root(t)
            homes += [(server.path_of(i % server.tenants), i % server.tenants)
                      for i in range(n_remote)]
        shared_seed = rng.randrange(1 << 32)
        shared = {}
        for area in set(areas.values()):
            shared = _make_shared(area, config.shared_files, random.Random(shared_seed))
        for name, (path, _t) in zip(names, homes, strict=True):
            os.makedirs(os.path.join(areas[path], "clients", name), exist_ok=True)
        if server is not None:
            server.start()
        local = connect(host, restart=True, virtiofsd=config.virtiofsd) if n_local else None

        def watch() -> dict[str, int | None]:
            w: dict[str, int | None] = {"soak (clients)": os.getpid()}
            if server is not None:
                w[f"server ({server.kind})"] = server.pid
                for path, pid in sorted(server.daemon_pids().items()):
                    w[f"daemon {path}"] = pid
            if local is not None:
                w["daemon local"] = local.daemon_pid
            return w

        sampler = _Sampler(watch)
        if server is not None:
            # A probe client per tenant first: the server and pyzmq allocate a few fds once
            # (pyzmq's zero-copy collector) on the first large frames; the baseline comes
            # after that.
            for t in range(server.tenants):
                endpoint, kwargs = server.connect_args(t)
                probe = connect_remote(endpoint, **kwargs)
                try:
                    big = max(shared, key=lambda n: shared[n].size)
                    probe.read_bytes(f"shared/{big}")
                    probe.write_bytes("probe", bytes(256 << 10))
                    probe.unlink("probe")
                finally:
                    probe.close()
            time.sleep(1.0)
        phases["start"] = time.monotonic() - t_begin
        pre_connect = sampler.sample("before clients connect")
        for name, (path, tenant) in zip(names, homes, strict=True):
            if tenant is None:
                fs = local
            else:
                assert server is not None
                endpoint, kwargs = server.connect_args(tenant)
                fs = connect_remote(endpoint, **kwargs)
                remotes.append(fs)
            clients.append(SoakClient(name, path, fs, shared, rng.randrange(1 << 32),
                                      config.max_stream, stop, areas[path]))
        for c in clients:
            c.prime()
        baseline = sampler.sample("baseline (clients connected, primed)")
        fd_kinds = {name: procfs.fd_kinds(pid) for name, pid in watch().items()}
        say(f"soak: {n_local} in-process + {n_remote} remote clients, {config.duration:g} s, "
            f"server={config.server} pid={server.pid if server else None}, seed={seed}, "
            f"share {host}")

        if local is not None:
            def monitor() -> None:
                conn = local._conn  # the generation counts restarts
                gen = conn.generation
                while not stop.is_set():
                    if conn.generation != gen:
                        gen = conn.generation
                        local_restarts.append(time.monotonic())
                    time.sleep(0.01)
            threading.Thread(target=monitor, name="soak-restart-monitor", daemon=True).start()

        t_start = time.monotonic()
        t_end = t_start + config.duration
        kill_at = [t_start + config.duration * (k + 1) / (config.restart_daemon + 1)
                   for k in range(config.restart_daemon)]
        warm_at = t_start + config.warmup_seconds()
        warm: ProcSample | None = None
        for c in clients:
            c.start()
        next_sample = time.monotonic() + SAMPLE_INTERVAL
        next_progress = time.monotonic() + config.progress
        while True:
            now = time.monotonic()
            if now >= t_end:
                break
            if kill_at and now >= kill_at[0]:
                kill_at.pop(0)
                kills.append(_kill_daemons(local, server, say))
            if warm is None and now >= warm_at:
                warm = sampler.sample("after warm-up")
            if now >= next_sample:
                sampler.sample()
                next_sample = now + SAMPLE_INTERVAL
            if config.progress and now >= next_progress:
                ops = sum(len(a) for c in clients for a in c.lat.values())
                bad = sum(len(c.failures) for c in clients)
                say(f"soak: {now - t_start:6.0f} s  {ops} ops  {bad} unexpected")
                next_progress = now + config.progress
            time.sleep(min(0.05, max(0.0, t_end - now)))
        if warm is None:
            warm = sampler.sample("after warm-up")
        stop.set()
        hung = []
        for c in clients:
            if not c.finished.wait(max(5.0, 300 - (time.monotonic() - t_end))):
                hung.append(c.name)
                c.fail("client", "hang", "still busy 300 s after the end of the run")
        end = sampler.sample("end of workload")
        t_stop = time.monotonic()
        t_clean = time.monotonic()
        say(f"soak: workload over after {t_stop - t_start:.1f} s; final checks and cleanup")
        for c in clients:
            if c.name not in hung:
                c.final_check()
                c.cleanup()
        phases["final_checks_and_cleanup"] = time.monotonic() - t_clean
        for c in clients:
            if c.name in hung:
                continue
            left = os.listdir(os.path.join(c.host_root, c.root))
            if left:
                c.fail("cleanup", "lost", f"left on the host after cleanup: {left[:5]}")
        # A full garbage collection first: a dead share's guest memory (its mmap holds a
        # duplicate of the memfd) is only released when the cyclic GC collects the old
        # device actor (see RELIABILITY.md); the fds that frees are reported.
        result["server_gc"] = server.gc_report() if server is not None else {}
        gc.collect()
        # fds back to baseline: give FORGETs and releases a moment to land
        for key, info in baseline.values.items():
            if key != "soak (clients)":
                _wait_fds(watch().get(key), info.fds)
        after = sampler.sample("after cleanup (clients connected)")
        server_stats = server.stats() if server is not None else {}
        for fs in remotes:
            with contextlib.suppress(Exception):
                fs.close()
        remotes = []
        if server is not None:
            _wait_fds(server.pid, pre_connect.values[f"server ({server.kind})"].fds)
        disconnected = sampler.sample("after remote clients disconnected")
        phases["fd_checks"] = time.monotonic() - t_clean - phases["final_checks_and_cleanup"]
        restarts = {"local": local_restarts}
        if server is not None:
            restarts.update(server.restart_times())
        result.update(_summarise(config, clients, kills, restarts, server, sampler,
                                 pre_connect, baseline, warm, end, after, disconnected,
                                 t_start, t_stop, server_stats, fd_kinds))
        return result
    finally:
        stop.set()
        t_close = time.monotonic()
        for fs in remotes:
            with contextlib.suppress(Exception):
                fs.close()
        if local is not None:
            with contextlib.suppress(Exception):
                local.close()
        phases["close_local"] = time.monotonic() - t_close
        if server is not None:
            rc = server.stop()
            result["server_exit_status"] = rc
            result["server_log_tail"] = server.log_tail(2000)
        phases["teardown"] = time.monotonic() - t_close
        phases["total"] = time.monotonic() - t_begin
        if not config.keep:
            shutil.rmtree(runtime, ignore_errors=True)
            if config.directory is None:
                _rmtree_ro(base)
        result["wall_seconds"] = round(time.monotonic() - t_begin, 1)


def _rmtree_ro(path: str) -> None:
    """Remove a tree with read-only files in it."""
    for dirpath, _dirs, _files in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o755)
    shutil.rmtree(path, ignore_errors=True)


def _kill_daemons(local: Any, server: ServerProcess | None,
                  say: Callable[[str], None]) -> dict[str, Any]:
    """SIGKILL the in-process share's daemon and the server's daemon(s); when each was
    killed, by path."""
    event: dict[str, Any] = {"killed": {}, "t": {}}
    targets: dict[str, int | None] = {}
    if local is not None:
        targets["local"] = local.daemon_pid
    if server is not None:
        targets.update(server.daemon_pids())
    for path, pid in targets.items():
        if not pid:
            continue
        event["t"][path] = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        event["killed"][path] = pid
    say(f"soak: killed daemons {event['killed']}")
    return event


def _classify(hits: list[RestartHit], kills: list[dict[str, Any]],
              restarts: dict[str, list[float]], slack: float = 0.25) -> None:
    """Mark each ENOTCONN/ESTALE expected iff it falls in a restart window of its path:
    after a kill of that path's daemon, and (ENOTCONN) the operation / (ESTALE) the task
    holding the handle started before that share was restarted (``slack`` seconds of
    grace for the granularity of the restart times)."""
    for hit in hits:
        hit.expected = False
        for k in kills:
            t_kill = k["t"].get(hit.path)
            if t_kill is None:
                continue
            done = [t for t in restarts.get(hit.path, []) if t >= t_kill]
            t_done = (done[0] if done else float("inf")) + slack
            began = hit.task_start if hit.errno == errno.ESTALE else hit.op_start
            if hit.end >= t_kill and began <= t_done:
                hit.expected = True
                break


def _summarise(config: SoakConfig, clients: list[SoakClient], kills: list[dict[str, Any]],
               restarts: dict[str, list[float]], server: ServerProcess | None,
               sampler: _Sampler, pre_connect: ProcSample, baseline: ProcSample,
               warm: ProcSample, end: ProcSample, after: ProcSample,
               disconnected: ProcSample, t_start: float, t_stop: float,
               server_stats: dict[str, Any],
               fd_kinds: dict[str, Counter[str]]) -> dict[str, Any]:
    hits = [h for c in clients for h in c.hits]
    _classify(hits, kills, restarts)
    failures = [f for c in clients for f in c.failures]
    for h in hits:
        if not h.expected:
            failures.append(Failure(h.client, h.op, errno.errorcode.get(h.errno, "?"),
                                    "outside a daemon restart window", h.end))
    lat: dict[str, list[float]] = {}
    for c in clients:
        for op, a in c.lat.items():
            lat.setdefault(op, []).extend(a)
    ops = sum(len(v) for v in lat.values())
    expected: Counter[str] = Counter()
    for c in clients:
        expected.update(c.expected)
    for h in hits:
        if h.expected:
            expected[f"{errno.errorcode.get(h.errno, '?')} (restart window)"] += 1
    unexpected = Counter(f.what for f in failures)
    elapsed = t_stop - t_start
    checks: dict[str, dict[str, Any]] = {}
    checks["unexpected errors"] = {"ok": not failures, "value": len(failures)}
    # fds: every process back to (or below) its baseline
    for name, info in baseline.values.items():
        if name == "soak (clients)":
            continue
        now = after.values.get(name, _NOBODY)
        if info.fds is None or now.fds is None:
            continue
        checks[f"fds {name}"] = {"ok": now.fds <= info.fds, "baseline": info.fds,
                                 "end": now.fds, "same_process": now.pid == info.pid}
        if now.fds > info.fds and name in fd_kinds:
            before, after_kinds = fd_kinds[name], procfs.fd_kinds(now.pid)
            checks[f"fds {name}"]["extra"] = dict(after_kinds - before)
    if server is not None:
        key = f"server ({server.kind})"
        base_fds = pre_connect.values[key].fds
        end_fds = disconnected.values[key].fds
        if base_fds is not None and end_fds is not None:
            checks[f"fds {key} after disconnect"] = {"ok": end_fds <= base_fds,
                                                     "baseline": base_fds, "end": end_fds}
    # RSS: after warm-up vs end of the workload
    for name, info in warm.values.items():
        last = end.values.get(name, _NOBODY)
        if name == "soak (clients)" or not info.anon or not info.rss or not last.rss:
            continue
        if last.anon is None or last.pid != info.pid:
            continue  # a daemon restarted since: a different process
        growth = 100.0 * (last.anon - info.anon) / info.anon
        checks[f"rss {name}"] = {
            "ok": growth < config.rss_limit or last.anon - info.anon < RSS_NOISE_FLOOR,
            "anon_warm": info.anon, "anon_end": last.anon,
            "anon_growth_percent": round(growth, 2),
            "total_growth_percent": round(100.0 * (last.rss - info.rss) / info.rss, 2)}
    passed = all(c["ok"] for c in checks.values())
    return {
        "passed": passed,
        "elapsed": round(elapsed, 1),
        "operations": ops,
        "ops_per_second": round(ops / elapsed, 1) if elapsed else 0.0,
        "tasks": sum(c.tasks_done for c in clients),
        "resyncs": sum(c.resyncs for c in clients),
        "bytes_written": sum(c.bytes_written for c in clients),
        "bytes_read": sum(c.bytes_read for c in clients),
        "errors_expected": dict(sorted(expected.items())),
        "errors_unexpected": dict(sorted(unexpected.items())),
        "failures": [vars(f) for f in failures[:50]],
        "latency": {op: _percentiles(v) for op, v in sorted(lat.items())},
        "kills": kills,
        "restarts": {k: len(v) for k, v in restarts.items()},
        "restart_times": {k: [round(t - t_start, 3) for t in v] for k, v in restarts.items()},
        "restart_hits": {"expected": sum(1 for h in hits if h.expected),
                         "unexpected": sum(1 for h in hits if not h.expected)},
        "checks": checks,
        "samples": [s.to_json() for s in sampler.samples],
        "server_stats": server_stats,
        "server_events": list(server.events) if server is not None else [],
        "clients_cleaned": sum(1 for c in clients if c.cleaned),
    }


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.1f} MiB"


def format_summary(r: dict[str, Any]) -> str:
    """The human-readable summary of a :func:`run_soak` result."""
    lines = [f"== soak summary: {'PASS' if r.get('passed') else 'FAIL'} ==",
             f"clients: {r['local_clients']} in-process + {r['remote_clients']} remote "
             f"(server: {r['server']}), seed {r['seed']}",
             f"ran {r.get('elapsed', 0)} s (wall {r.get('wall_seconds', '?')} s): "
             f"{r.get('operations', 0)} operations ({r.get('ops_per_second', 0)}/s), "
             f"{r.get('tasks', 0)} tasks, {r.get('resyncs', 0)} resyncs; "
             f"written {_mb(r.get('bytes_written'))}, read {_mb(r.get('bytes_read'))}"]
    if r.get("kills"):
        lines.append(f"daemon kills: {len(r['kills'])}; restarts seen: {r.get('restarts')}; "
                     f"ENOTCONN/ESTALE in window {r['restart_hits']['expected']}, "
                     f"outside {r['restart_hits']['unexpected']}")
    lines.append("errors expected (by errno): " + (", ".join(
        f"{k} {v}" for k, v in r.get("errors_expected", {}).items()) or "none"))
    lines.append("errors UNEXPECTED: " + (", ".join(
        f"{k} {v}" for k, v in r.get("errors_unexpected", {}).items()) or "none"))
    for f in r.get("failures", [])[:10]:
        lines.append(f"  {f['client']} {f['op']} {f['what']}: {f['detail'][:200]}")
    lines.append("latency (ms)        count      p50      p99    p99.9      max")
    for op, s in r.get("latency", {}).items():
        lines.append(f"  {op:<14} {s['count']:>9} {s['p50'] * 1e3:>8.2f} {s['p99'] * 1e3:>8.2f}"
                     f" {s['p999'] * 1e3:>8.2f} {s['max'] * 1e3:>8.1f}")
    samples = r.get("samples", [])
    if samples:
        lines.append("processes: RSS / open fds")
        names = list(samples[0]["values"])
        for s in samples:
            for n in s["values"]:
                if n not in names:
                    names.append(n)
        shown = [s for s in samples if s["label"]]
        for name in names:
            cells = []
            for s in shown:
                v = s["values"].get(name)
                if v is None:
                    continue
                cells.append(f"{s['label']}: pid {v['pid']} RSS {_mb(v['rss'])} "
                             f"(anon {_mb(v['anon'])}), {v['fds']} fds, "
                             f"{v.get('threads')} threads")
            lines.append(f"  {name}:")
            lines += [f"    {c}" for c in cells]
    gc_report = r.get("server_gc") or {}
    if gc_report:
        freed = sum(gc_report["fd_kinds_before_gc"].values()) - sum(
            gc_report["fd_kinds_after_gc"].values())
        lines.append(f"server: a full GC before the end measurement closed {freed} fds")
    lines.append(f"RSS growth measured from after a {r.get('warmup', 0):g} s warm-up "
                 "to the end of the workload")
    for name, c in r.get("checks", {}).items():
        detail = ", ".join(f"{k}={v}" for k, v in c.items() if k != "ok")
        lines.append(f"  [{'ok' if c['ok'] else 'FAIL'}] {name}: {detail}")
    return "\n".join(lines)


# ==========================================================================================
# Command line
# ==========================================================================================


def _add_arguments(p: argparse.ArgumentParser) -> None:
    when = p.add_mutually_exclusive_group()
    when.add_argument("--minutes", type=float, help="how long to run (default 1 minute)")
    when.add_argument("--seconds", type=float, help="how long to run, in seconds")
    p.add_argument("--clients", type=int, default=16, help="clients in all (default 16)")
    p.add_argument("--remote", type=int, help="how many of them are remote (default half)")
    p.add_argument("--restart-daemon", type=int, default=0, metavar="K",
                   help="SIGKILL the daemons K times during the run (evenly spaced)")
    p.add_argument("--max-stream", type=float, default=4.0, metavar="MIB",
                   help="largest streamed file, MiB (default 4)")
    p.add_argument("--warmup", type=float,
                   help="seconds before the RSS baseline is taken (default 10%% of the run, "
                        "10–60 s)")
    p.add_argument("--rss-limit", type=float, default=10.0, metavar="PERCENT",
                   help="fail when RSS grows this much after the warm-up (default 10)")
    p.add_argument("--server", choices=("serve", "agent"), default="serve",
                   help="what serves the remote clients: a ShareServer (default) or the "
                        "multi-tenant agent")
    p.add_argument("--agent-tenants", type=int, default=4, metavar="N",
                   help="with --server agent: tenants (each its own key, folder, daemon)")
    p.add_argument("--seed", type=int, help="random seed (printed; default random)")
    p.add_argument("--dir", help="work here instead of a temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the runtime directory (logs)")
    p.add_argument("--virtiofsd", help="virtiofsd binary")
    p.add_argument("--json", metavar="FILE", help="also write the full result as JSON")
    p.add_argument("--progress", type=float, default=10.0, metavar="SECONDS",
                   help="print progress this often (0: never)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument("--hostile", action="store_true",
                   help="instead: the multi-tenant agent under hostile load, phase after "
                        "phase (its options: pyvirtiofs soak --hostile --help)")


def cmd_soak(args: argparse.Namespace) -> int:
    """Run a soak from parsed arguments; 0 when it passed."""
    if not getattr(args, "verbose", False):
        _quiet_logging()
    duration = (args.seconds if args.seconds is not None
                else 60.0 * (args.minutes if args.minutes is not None else 1.0))
    if duration <= 0 or args.clients < 1:
        raise ValueError("the soak needs a positive duration and at least one client")
    config = SoakConfig(duration=duration, clients=args.clients, remote=args.remote,
                        restart_daemon=args.restart_daemon,
                        max_stream=max(MiB, int(args.max_stream * MiB)), warmup=args.warmup,
                        rss_limit=args.rss_limit, seed=args.seed, directory=args.dir,
                        keep=args.keep, virtiofsd=args.virtiofsd, server=args.server,
                        agent_tenants=max(1, args.agent_tenants),
                        progress=0.0 if args.quiet else args.progress)
    with sigterm_interrupts():  # a killed soak still stops its server, daemons, folders
        result = run_soak(config, out=None if args.quiet else sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    print(format_summary(result), flush=True)
    return 0 if result.get("passed") else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``pyvirtiofs soak [options]`` (``_server`` is the child the soak starts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_server"]:
        return _server_child(argv[1:])
    if "--hostile" in argv:  # a run of its own, with its own options
        from pyvirtiofs.tools import hostile

        return hostile.main([a for a in argv if a != "--hostile"])
    p = argparse.ArgumentParser(prog="pyvirtiofs soak",
                                description=(__doc__ or "").split("\n\n")[0])
    _add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_soak(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
