"""The FUSE mount (``pyvirtiofs mount``) against libfuse's C ``passthrough_ll``, same run.

    python -m pyvirtiofs.tools.mountbench [--quick] [--reps N] [--dd-size 1G] [--json F]
    pyvirtiofs bench --mount [same options]

Both file systems serve a folder of their own on the same host file system; every
workload runs on one, then on the other (the order alternates), so background load falls
on both alike (a warm step runs right after its cold one on the same side: the other
side's cold step would drop the caches it is about). A repetition is the whole sequence
below, on a fresh tree; each time is the median of the repetitions, with min–max:

    tar       tar xf of a generated tree (~6,000 entries, ~60 MB; same tarball both sides)
    find      find over the tree, caches dropped first
    ls_cold   ls -lR, caches dropped first          ls_warm   ls -lR again at once
    cat_cold  cat of every file, caches dropped     cat_warm  the same again at once
    dd_write  dd 1 MiB blocks from /dev/zero, conv=fsync (--dd-size, default 1 GiB)
    dd_read   dd of that file to /dev/null, caches dropped first
    fsx       fsxlite (fsx-style exerciser, no mmap; C source beside this file), 5,000 ops
    rm        rm -rf of the tree

"Caches dropped" is ``sync; echo 3 > /proc/sys/vm/drop_caches``: the kernel's dentries,
inodes and page cache of both mounts (and of the host file system under them). What
either server keeps in its own memory stays.

Requests: ours are counted on the device (``fs.device_client.stats()``, the requests sent
to virtiofsd) and at the mount (the kernel's requests, by opcode); passthrough_ll's are
the kernel's requests to it, counted from its ``-d`` log in one extra, untimed pass of the
whole sequence (a separate instance, so the timed runs carry no logging). Also reported:
the CPU time each side's processes used (ours: the mount process and virtiofsd).

``--profile DIR``: one more repetition on our side only with py-spy attached (``--gil``
samples, one raw file per workload, and a summary of where the mount process spends its
time); ``--syscalls`` adds ``strace -c -f`` of both servers per workload.

Needs root, /dev/fuse, fusermount3, a C compiler and libfuse3-dev (``scripts/setup.sh``
installs them); passthrough_ll and fsxlite are built on first use into
``<repo>/.cache/mountbench`` (``--build`` only builds them). passthrough_ll's source comes
from libfuse3-dev's examples, or from the package itself (``apt-get download``) where the
documentation folder was not installed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvirtiofs.tools import procfs

WORKLOADS = ("tar", "find", "ls_cold", "ls_warm", "cat_cold", "cat_warm", "dd_write",
             "dd_read", "fsx", "rm")
COLD = {"find", "ls_cold", "cat_cold", "dd_read"}
# Steps run back to back on one side before the other side runs them.
GROUPS = (("tar",), ("find",), ("ls_cold", "ls_warm"), ("cat_cold", "cat_warm"),
          ("dd_write",), ("dd_read",), ("fsx",), ("rm",))
TARGET_RATIO = 2.0
EXAMPLES_IN_PACKAGE = "usr/share/doc/libfuse3-dev/examples"
EXAMPLES = Path("/") / EXAMPLES_IN_PACKAGE
MOUNT_TIMEOUT = 30.0
STEP_TIMEOUT = 900.0
GiB = 1 << 30
MiB = 1 << 20


def cache_dir() -> Path:
    """Where the built helpers live: ``$PYVIRTIOFS_MOUNTBENCH_CACHE``, else the repository's
    ``.cache/mountbench`` (a source checkout), else ``~/.cache/pyvirtiofs/mountbench``."""
    env = os.environ.get("PYVIRTIOFS_MOUNTBENCH_CACHE")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists() and os.access(repo, os.W_OK):
        return repo / ".cache" / "mountbench"
    return Path.home() / ".cache" / "pyvirtiofs" / "mountbench"


# -- building the helpers ------------------------------------------------------------------


def _run_quiet(cmd: Sequence[str], cwd: Path | None = None) -> None:
    result = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise OSError(f"{' '.join(cmd)} failed: {result.stderr.strip()[-2000:]}")


def _passthrough_sources(work: Path) -> Path:
    """A folder with passthrough_ll.c and passthrough_helpers.h."""
    if (EXAMPLES / "passthrough_ll.c").exists() and (EXAMPLES / "passthrough_helpers.h").exists():
        return EXAMPLES
    # Minimal images drop /usr/share/doc on install: take the files from the package.
    _run_quiet(["apt-get", "download", "libfuse3-dev"], cwd=work)
    debs = sorted(work.glob("libfuse3-dev_*.deb"))
    if not debs:
        raise OSError("apt-get download libfuse3-dev gave no package")
    _run_quiet(["dpkg-deb", "-x", str(debs[-1]), str(work / "pkg")])
    found = work / "pkg" / EXAMPLES_IN_PACKAGE
    if not (found / "passthrough_ll.c").exists():
        raise OSError("libfuse3-dev has no passthrough_ll.c example")
    return found


def build(cache: Path | None = None, *, quiet: bool = False) -> dict[str, Path]:
    """Build passthrough_ll and fsxlite if missing (or older than their source)."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    out = {"passthrough_ll": cache / "passthrough_ll", "fsxlite": cache / "fsxlite"}
    if not out["passthrough_ll"].exists():
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], text=True,
                               capture_output=True, check=False)
        if flags.returncode != 0:
            raise OSError("pkg-config knows no fuse3: install libfuse3-dev pkg-config "
                          "(scripts/setup.sh does)")
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = _passthrough_sources(Path(tmp))
            target = Path(tmp) / "passthrough_ll"
            _run_quiet([cc, "-O2", "-Wall", "-I", str(src), str(src / "passthrough_ll.c"),
                        "-o", str(target), *flags.stdout.split()])
            os.replace(target, out["passthrough_ll"])
        if not quiet:
            print(f"mountbench: built {out['passthrough_ll']}", file=sys.stderr)
    fsx_src = Path(__file__).with_name("fsxlite.c")
    if not out["fsxlite"].exists() or (
            fsx_src.exists() and fsx_src.stat().st_mtime > out["fsxlite"].stat().st_mtime):
        if not fsx_src.exists():
            raise OSError(f"{fsx_src} is missing")
        target = cache / "fsxlite.tmp"
        _run_quiet([cc, "-O2", "-Wall", str(fsx_src), "-o", str(target)])
        os.replace(target, out["fsxlite"])
        if not quiet:
            print(f"mountbench: built {out['fsxlite']}", file=sys.stderr)
    return out


# -- the tree ------------------------------------------------------------------------------


def make_tarball(path: Path, *, top: int = 25, sub: int = 8, files: int = 29,
                 seed: int = 1) -> int:
    """A deterministic tree as a tar file: ``top`` × ``sub`` folders of ``files`` files
    (sizes log-normal around 3 KiB, at most 256 KiB), every 50th entry a symlink. Returns
    the number of entries."""
    rng = random.Random(seed)
    entries = 0
    mtime = 1_700_000_000
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        def add_dir(name: str) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
            tar.addfile(info)

        for a in range(top):
            add_dir(f"d{a:02d}")
            entries += 1
            for b in range(sub):
                folder = f"d{a:02d}/s{b}"
                add_dir(folder)
                entries += 1
                for c in range(files):
                    entries += 1
                    info = tarfile.TarInfo(f"{folder}/f{c:02d}.txt")
                    info.mode, info.mtime = 0o644, mtime
                    if entries % 50 == 0:
                        info.type, info.linkname = tarfile.SYMTYPE, f"f{(c + 1) % files:02d}.txt"
                        tar.addfile(info)
                        continue
                    size = min(int(rng.lognormvariate(8, 1.5)), 256 << 10)
                    info.size = size
                    tar.addfile(info, io.BytesIO(rng.randbytes(size)))
    return entries


# -- the two servers -------------------------------------------------------------------------


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _wait_mounted(path: Path, proc: subprocess.Popen[Any], log: Path | None) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not os.path.ismount(path):
        if proc.poll() is not None:
            text = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise OSError(f"the server for {path} exited ({proc.returncode}): {text}")
        if time.monotonic() > deadline:
            raise OSError(f"{path} did not get mounted in {MOUNT_TIMEOUT:g} s")
        time.sleep(0.02)


def _unmount(path: Path) -> None:
    for cmd in (["fusermount3", "-u", "-q", str(path)], ["umount", "-l", str(path)]):
        if not os.path.ismount(path):
            return
        subprocess.run(cmd, check=False, capture_output=True, timeout=60)


@dataclass
class Side:
    """One mounted file system under test."""

    name: str
    mnt: Path
    backing: Path
    proc: subprocess.Popen[Any] | None = None
    cpu_pids: list[int] = field(default_factory=list)

    def cpu(self) -> dict[str, float]:
        return {str(pid): procfs.cpu_seconds(pid) or 0.0 for pid in self.cpu_pids}

    def counters(self) -> dict[str, dict[str, int]]:
        return {}

    def stop(self) -> None:
        _unmount(self.mnt)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        _unmount(self.mnt)


class OurMount(Side):
    """``pyvirtiofs mount`` in a child process that answers ``stats`` on its stdin."""

    def start(self, log: Path) -> None:
        self._log = open(log, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyvirtiofs.tools.mountbench", "--serve",
             str(self.backing), str(self.mnt)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        hello = self._ask(None)
        _wait_mounted(self.mnt, self.proc, log)
        self.cpu_pids = [self.proc.pid, *hello.get("daemon_pids", [])]

    def _ask(self, command: str | None) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        if command is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise OSError(f"our mount server exited ({self.proc.poll()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def counters(self) -> dict[str, dict[str, int]]:
        return self._ask("stats")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # EOF: the server unmounts and exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        super().stop()
        with contextlib.suppress(Exception):
            self._log.close()


class Passthrough(Side):
    """libfuse's passthrough_ll example in the foreground (``-d``: logging requests)."""

    def start(self, binary: Path, log: Path, *, debug: bool = False,
              options: Sequence[str] = ()) -> None:
        self.log = log
        opts = ",".join([f"source={self.backing}", *options])
        cmd = [str(binary), "-d" if debug else "-f", "-o", opts, str(self.mnt)]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        _wait_mounted(self.mnt, self.proc, log)
        self.cpu_pids = [self.proc.pid]


def _count_log(log: Path, start: int) -> tuple[dict[str, int], int]:
    """Requests logged by passthrough_ll -d since byte ``start``; and the new end."""
    counts: collections.Counter[str] = collections.Counter()
    with open(log, "rb") as f:
        f.seek(start)
        data = f.read()
    for line in data.splitlines():
        if line.startswith(b"unique: ") and b", opcode: " in line:
            op = line.split(b", opcode: ", 1)[1].split(b" ", 1)[0].decode()
            counts[op] += 1
    return dict(counts), start + len(data)


# -- the workloads -------------------------------------------------------------------------


@dataclass
class Params:
    reps: int = 5
    dd_size: int = GiB
    fsx_ops: int = 5000
    tree: tuple[int, int, int] = (25, 8, 29)
    ll_options: tuple[str, ...] = ()
    only: tuple[str, ...] = WORKLOADS


def _sh(cmd: str, cwd: Path) -> None:
    result = subprocess.run(["sh", "-c", cmd], cwd=cwd, capture_output=True,
                            timeout=STEP_TIMEOUT, check=False)
    if result.returncode != 0:
        raise OSError(f"{cmd!r} in {cwd} failed ({result.returncode}): "
                      f"{result.stderr.decode(errors='replace').strip()[-1000:]}")


def workload_command(name: str, p: Params, tarball: Path, fsx: Path) -> str:
    blocks = max(1, p.dd_size // MiB)
    return {
        "tar": f"tar xf {tarball} -C w",
        "find": "find w > /dev/null",
        "ls_cold": "ls -lR w > /dev/null",
        "ls_warm": "ls -lR w > /dev/null",
        "cat_cold": "find w -type f -print0 | xargs -0 cat > /dev/null",
        "cat_warm": "find w -type f -print0 | xargs -0 cat > /dev/null",
        "dd_write": f"dd if=/dev/zero of=x/big bs=1M count={blocks} conv=fsync status=none",
        "dd_read": "dd if=x/big of=/dev/null bs=1M status=none",
        "fsx": f"{fsx} -q -N {p.fsx_ops} -S 1 x/fsx",
        "rm": "rm -rf w",
    }[name]


def _prepare(side: Side) -> None:
    """Before a repetition: an empty ``w`` (the tree) and ``x`` (the big file, fsx)."""
    for sub in ("w", "x"):
        shutil.rmtree(side.mnt / sub, ignore_errors=True)
        (side.mnt / sub).mkdir()


def _finish(side: Side) -> None:
    shutil.rmtree(side.mnt / "x", ignore_errors=True)


def _diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, int]:
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in out.items() if v}


def _counts(side: Side) -> dict[str, dict[str, int]]:
    return side.counters()


def run_step(side: Side, name: str, p: Params, tarball: Path, fsx: Path,
             hook: Callable[[str, Side], Any] | None = None) -> dict[str, Any]:
    """Run one workload on one side; its time, CPU and request counts."""
    if name in COLD:
        drop_caches()
    cmd = workload_command(name, p, tarball, fsx)
    before, cpu0 = _counts(side), side.cpu()
    stop = hook(name, side) if hook else None
    t0 = time.perf_counter()
    _sh(cmd, side.mnt)
    elapsed = time.perf_counter() - t0
    if stop is not None:
        stop()
    after, cpu1 = _counts(side), side.cpu()
    result: dict[str, Any] = {"seconds": elapsed,
                              "cpu": {k: cpu1.get(k, 0.0) - v for k, v in cpu0.items()}}
    for kind, counts in after.items():
        result[kind] = _diff(counts, before.get(kind, {}))
    return result


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# -- the run -------------------------------------------------------------------------------


@contextlib.contextmanager
def _scratch(workdir: str | None, keep: bool) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="pyvirtiofs-mountbench-", dir=workdir))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for mnt in base.glob("*/mnt"):
            _unmount(mnt)
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def _layout(base: Path, name: str) -> tuple[Path, Path]:
    root = base / name
    (root / "mnt").mkdir(parents=True)
    (root / "src").mkdir()
    return root / "mnt", root / "src"


def run(p: Params, args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    tools = build(quiet=args.quiet)
    with _scratch(args.workdir, args.keep) as base:
        tarball = base / "tree.tar"
        entries = make_tarball(tarball, top=p.tree[0], sub=p.tree[1], files=p.tree[2])
        say(f"tree: {entries} entries, {tarball.stat().st_size / MiB:.0f} MiB tarball")
        ours = OurMount("ours", *_layout(base, "ours"))
        ll = Passthrough("passthrough_ll", *_layout(base, "ll"))
        results: dict[str, dict[str, list[dict[str, Any]]]] = {
            w: {"ours": [], "passthrough_ll": []} for w in WORKLOADS}
        try:
            ours.start(base / "ours.log")
            ll.start(tools["passthrough_ll"], base / "ll.log", options=p.ll_options)
            for rep in range(p.reps):
                sides: list[Side] = [ours, ll] if rep % 2 == 0 else [ll, ours]
                for side in sides:
                    _prepare(side)
                for group in GROUPS:
                    # A warm step follows its cold one on the same side at once: the other
                    # side's cold step would drop the caches it is about.
                    for side in sides:
                        for w in group:
                            if w in p.only:
                                r = run_step(side, w, p, tarball, tools["fsxlite"])
                                results[w][side.name].append(r)
                            elif w in ("tar", "rm"):  # the others need the tree, fresh
                                _sh(workload_command(w, p, tarball, tools["fsxlite"]),
                                    side.mnt)
                    for w in group:
                        if w in p.only:
                            a, b = (results[w][s][-1]["seconds"]
                                    for s in ("ours", "passthrough_ll"))
                            say(f"rep {rep + 1}/{p.reps} {w:9s} ours {a:8.3f} s  "
                                f"passthrough_ll {b:8.3f} s  ({a / b:5.2f}×)")
                for side in sides:
                    _finish(side)
            profiles = {}
            if args.profile:
                profiles = _profile_rep(ours, ll, p, tarball, tools["fsxlite"],
                                        Path(args.profile), args.syscalls, say)
        finally:
            ours.stop()
            ll.stop()
        say("counting passthrough_ll's requests (one more pass, with -d)")
        ll_counts = _count_passthrough(base, tools, p, tarball)
    return _report(p, entries, results, ll_counts, profiles)


def _count_passthrough(base: Path, tools: dict[str, Path], p: Params,
                       tarball: Path) -> dict[str, dict[str, int]]:
    side = Passthrough("passthrough_ll", *_layout(base, "llcount"))
    log = base / "llcount.log"
    counts: dict[str, dict[str, int]] = {}
    try:
        side.start(tools["passthrough_ll"], log, debug=True, options=p.ll_options)
        _prepare(side)
        for w in WORKLOADS:
            if w not in p.only and w not in ("tar", "rm"):
                continue
            if w in COLD:
                drop_caches()
            _, start = _count_log(log, 0)
            _sh(workload_command(w, p, tarball, tools["fsxlite"]), side.mnt)
            time.sleep(0.2)  # let the log catch up with the last replies
            counts[w], _ = _count_log(log, start)
        _finish(side)
    finally:
        side.stop()
    return counts


def _profile_rep(ours: OurMount, ll: Passthrough, p: Params, tarball: Path, fsx: Path,
                 out: Path, syscalls: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """One repetition on our side under py-spy; optionally one more per side under
    strace -c -f. Raw files in ``out``; summaries in the report."""
    out.mkdir(parents=True, exist_ok=True)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    summaries: dict[str, Any] = {}
    assert ours.proc is not None

    def spy(name: str, side: Side) -> Callable[[], None]:
        raw = out / f"{name}.pyspy.txt"
        proc = subprocess.Popen([pyspy, "record", "-p", str(ours.proc.pid), "--gil", "-r",
                                 "500", "-f", "raw", "-o", str(raw)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached

        def stop() -> None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
            summaries.setdefault(name, {})["pyspy"] = summarize_pyspy(raw)

        return stop

    say(f"profiling our mount with py-spy into {out}")
    _prepare(ours)
    for w in WORKLOADS:
        run_step(ours, w, p, tarball, fsx, spy)
    _finish(ours)
    if syscalls and shutil.which("strace"):
        for side in (ours, ll):
            say(f"counting system calls of {side.name} with strace -c -f")

            def trace(name: str, s: Side) -> Callable[[], None]:
                path = out / f"{name}.{s.name}.strace.txt"
                proc = subprocess.Popen(["strace", "-c", "-f", "-o", str(path), "-p",
                                         str(s.cpu_pids[0])],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)

                def stop() -> None:
                    proc.send_signal(signal.SIGINT)
                    proc.wait(timeout=60)
                    summaries.setdefault(name, {})[f"strace_{s.name}"] = _strace_total(path)

                return stop

            _prepare(side)
            for w in WORKLOADS:
                run_step(side, w, p, tarball, fsx, trace)
            _finish(side)
    return summaries


def summarize_pyspy(raw: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive shares of the functions in a py-spy raw (collapsed) file."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    if raw.exists():
        for line in raw.read_text(errors="replace").splitlines():
            stack, _, n = line.rpartition(" ")
            if not stack or not n.isdigit():
                continue
            frames = stack.split(";")
            total += int(n)
            own[frames[-1]] += int(n)
            for frame in set(frames):
                incl[frame] += int(n)
    share = (lambda c: [(f, round(v / total, 3)) for f, v in c.most_common(top)]
             ) if total else (lambda c: [])
    return {"samples": total, "self": share(own), "inclusive": share(incl)}


def _strace_total(path: Path) -> dict[str, Any]:
    calls: dict[str, int] = {}
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[3].isdigit():
                calls[parts[-1]] = int(parts[3])
    return calls


# -- the report ----------------------------------------------------------------------------


def _requests(runs: list[dict[str, Any]], kind: str) -> int:
    return int(statistics.median(sum(r.get(kind, {}).values()) for r in runs))


def _report(p: Params, entries: int, results: dict[str, Any],
            ll_counts: dict[str, dict[str, int]], profiles: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for w in WORKLOADS:
        o, ll = results[w]["ours"], results[w]["passthrough_ll"]
        if not o or not ll:
            continue
        ours_s = _summary([r["seconds"] for r in o])
        ll_s = _summary([r["seconds"] for r in ll])
        ratio = ours_s["median"] / ll_s["median"] if ll_s["median"] else float("inf")
        rows.append({
            "workload": w, "ours": ours_s, "passthrough_ll": ll_s, "ratio": ratio,
            "target": TARGET_RATIO, "met": ratio <= TARGET_RATIO,
            "ours_device_requests": _requests(o, "device"),
            "ours_kernel_requests": _requests(o, "kernel"),
            "ours_answered_locally": _requests(o, "local"),
            "passthrough_ll_requests": sum(ll_counts.get(w, {}).values()),
            "ours_cpu": statistics.median(sum(r["cpu"].values()) for r in o),
            "passthrough_ll_cpu": statistics.median(sum(r["cpu"].values()) for r in ll),
            "ours_device_by_op": _median_ops([r.get("device", {}) for r in o]),
            "ours_kernel_by_op": _median_ops([r.get("kernel", {}) for r in o]),
            "passthrough_ll_by_op": ll_counts.get(w, {}),
        })
    return {"params": {"reps": p.reps, "dd_size": p.dd_size, "fsx_ops": p.fsx_ops,
                       "entries": entries, "ll_options": list(p.ll_options)},
            "rows": rows, "runs": results, "profiles": profiles,
            "machine": {"cpus": os.cpu_count(), "load": os.getloadavg()}}


def _median_ops(runs: list[dict[str, int]]) -> dict[str, int]:
    ops = {k for r in runs for k in r}
    medians = {k: int(statistics.median(r.get(k, 0) for r in runs)) for k in sorted(ops)}
    return {k: v for k, v in medians.items() if v}


def format_report(report: dict[str, Any]) -> str:
    p = report["params"]
    lines = [f"FUSE mount vs passthrough_ll: {p['entries']} entries, dd {p['dd_size'] // MiB} "
             f"MiB, fsx {p['fsx_ops']} ops, median of {p['reps']} (min–max), interleaved",
             "",
             f"{'workload':9s} {'ours s':>22s} {'passthrough_ll s':>22s} {'ratio':>6s} "
             f"{'≤2×':>4s} {'requests: daemon/kernel':>24s} {'ll':>6s} {'cpu ours/ll s':>14s}"]

    def cell(s: dict[str, float]) -> str:
        return f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})"

    for r in report["rows"]:
        lines.append(
            f"{r['workload']:9s} {cell(r['ours']):>22s} {cell(r['passthrough_ll']):>22s} "
            f"{r['ratio']:6.2f} {'yes' if r['met'] else 'no':>4s} "
            f"{r['ours_device_requests']:>11d}/{r['ours_kernel_requests']:<12d} "
            f"{r['passthrough_ll_requests']:>6d} "
            f"{r['ours_cpu']:6.2f}/{r['passthrough_ll_cpu']:<6.2f}")
    lines.append("")
    for r in report["rows"]:
        if r["workload"].startswith("ls"):
            lines.append(f"{r['workload']} requests — ours to virtiofsd: "
                         f"{_ops(r['ours_device_by_op'])}")
            lines.append(f"{'':{len(r['workload'])}s} kernel to ours: "
                         f"{_ops(r['ours_kernel_by_op'])} (answered here: "
                         f"{r['ours_answered_locally']})")
            lines.append(f"{'':{len(r['workload'])}s} kernel to passthrough_ll: "
                         f"{_ops(r['passthrough_ll_by_op'])}")
    for name, prof in report.get("profiles", {}).items():
        spy = prof.get("pyspy")
        if spy and spy["samples"]:
            top = ", ".join(f"{f} {s:.0%}" for f, s in spy["self"][:6])
            lines.append(f"profile {name}: {spy['samples']} samples; self: {top}")
        for key, calls in prof.items():
            if key.startswith("strace_") and calls:
                top = sorted(calls.items(), key=lambda kv: -kv[1])[1:6]
                lines.append(f"syscalls {name} {key[7:]}: {calls.get('total', 0)} "
                             f"({', '.join(f'{k} {v}' for k, v in top)})")
    return "\n".join(lines)


def _ops(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    return f"{total} (" + ", ".join(f"{k} {v}" for k, v in top) + ")"


# -- our mount's server process ------------------------------------------------------------


def serve(share: str, mountpoint: str) -> int:
    """The child that serves our mount for the bench: one JSON line when mounted, then one
    per ``stats`` line on stdin; unmounts at EOF (or SIGTERM)."""
    from pyvirtiofs.api.integrations.fusemount import mount
    from pyvirtiofs.api.local import connect
    from pyvirtiofs.codec.fuse_abi import opcode_name

    signal.signal(signal.SIGTERM, lambda *_: sys.stdin.close())
    with connect(share) as fs:
        handle = mount(fs, mountpoint, foreground=False)
        assert handle is not None
        daemon = fs.daemon_pid
        print(json.dumps({"pid": os.getpid(), "daemon_pids": [daemon] if daemon else []}),
              flush=True)
        try:
            for line in sys.stdin:
                if line.strip() == "stats":
                    device = fs.device_client.stats()["requests"]
                    mine = handle.stats()
                    print(json.dumps({
                        "device": {opcode_name(k): v for k, v in device.items()},
                        "kernel": mine.get("kernel", {}),
                        "local": mine.get("local", {}),
                    }), flush=True)
        except (ValueError, OSError):
            pass  # stdin closed by SIGTERM
        finally:
            handle.unmount()
    return 0


# -- command line --------------------------------------------------------------------------


def _parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": MiB, "G": GiB}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="3 repetitions, 256 MiB dd (for a quick look; targets want ≥ 5)")
    parser.add_argument("--reps", type=int, help="repetitions (default 5)")
    parser.add_argument("--dd-size", type=_parse_size, help="dd file size (default 1G)")
    parser.add_argument("--fsx-ops", type=int, help="fsx operations (default 5000)")
    parser.add_argument("--only", default=",".join(WORKLOADS),
                        help="comma-separated workloads to time (tar and rm always run)")
    parser.add_argument("--ll-options", default="",
                        help="more -o options for passthrough_ll, e.g. xattr")
    parser.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    parser.add_argument("--profile", metavar="DIR",
                        help="one more repetition of ours under py-spy, files in DIR")
    parser.add_argument("--syscalls", action="store_true",
                        help="with --profile: strace -c -f of both servers per workload")
    parser.add_argument("--workdir", help="where to make the scratch folder (default $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--build", action="store_true",
                        help="only build passthrough_ll and fsxlite, then exit")
    parser.add_argument("--serve", nargs=2, metavar=("SHARE", "MNT"), help=argparse.SUPPRESS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyvirtiofs bench --mount",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        if args.serve:
            return serve(*args.serve)
        if args.build:
            build(quiet=args.quiet)
            return 0
        if os.geteuid() != 0:
            raise OSError("the mount bench needs root (drop_caches, allow_other mounts)")
        if not os.path.exists("/dev/fuse"):
            raise OSError("no /dev/fuse")
        p = Params(reps=3 if args.quick else 5, dd_size=256 * MiB if args.quick else GiB)
        if args.reps:
            p.reps = args.reps
        if args.dd_size:
            p.dd_size = args.dd_size
        if args.fsx_ops:
            p.fsx_ops = args.fsx_ops
        p.ll_options = tuple(o for o in args.ll_options.split(",") if o)
        p.only = tuple(w.strip() for w in args.only.split(",") if w.strip())
        unknown = set(p.only) - set(WORKLOADS)
        if unknown:
            raise OSError(f"unknown workloads {sorted(unknown)}: choose from {WORKLOADS}")

        def say(line: str) -> None:
            if not args.quiet:
                print(f"mountbench: {line}", file=sys.stderr, flush=True)

        report = run(p, args, say)
        print(format_report(report))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        return 0
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"mountbench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
