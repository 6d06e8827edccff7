"""Crash consistency: what a writer was told is written must be on the host after
``kill -9`` — of the client process (in-process API), of a remote client, of the share
server, of the multi-tenant agent.

A writer process (this module run as ``python -m tests.api.remote.test_crash_consistency writer``)
writes through the API and reports, line by line on stdout, what the API acknowledged:

* ``W fid blk ver`` — a ``pwrite`` of one block returned. Every block write is at most
  ``max_write`` bytes (so it is **one FUSE WRITE**) and fills the block with one 16-byte
  unit ``(magic, fid, blk, ver)`` repeated: a block on disk is either entirely one version or
  torn.
* ``F fid`` — an ``fsync`` of that file returned: every write acknowledged before it is
  durable.
* ``D name size sha256`` — a whole file was written, fsynced and closed.

The test kills a process at a random moment, waits until the daemon is gone (or the
server idle), then reads the host files directly and checks: every block is whole (never
torn inside one write), holds a version at least as new as the last fsynced one, and at
most one newer than the last acknowledged one (the write that may have been in flight:
complete or absent); every ``D`` file has its checksum. Each scenario runs several
randomized rounds (seeded; the seed is in the failure message).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofs.tools import procfs
from tests import REPO

ROOT = REPO
UNIT = struct.Struct("<IHHQ")  # magic, fid, block, version: 16 bytes, never all zero
MAGIC = 0xB10CB10C
BLOCK_SIZES = (4096, 64 << 10, 256 << 10, 1 << 20)
DEADLINE = 20.0  # seconds a daemon may take to go away after its peer was killed

pytestmark = pytest.mark.daemon


# ==========================================================================================
# The writer (a child process)
# ==========================================================================================


def _block(fid: int, blk: int, ver: int, size: int) -> bytes:
    return UNIT.pack(MAGIC, fid, blk, ver) * (size // UNIT.size)


class _Writer:
    """Writes block files and durable files through ``fs``; reports acknowledgements."""

    def __init__(self, fs: Any, base: str, seed: int, max_write: int) -> None:
        self.fs = fs
        self.base = base
        self.seed = seed
        self.sizes = [b for b in BLOCK_SIZES if b <= max_write]
        self.lock = threading.Lock()

    def say(self, line: str) -> None:
        with self.lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def run(self, thread: int) -> None:
        rng = random.Random(self.seed * 31 + thread)
        files: list[tuple[int, Any, int, int]] = []
        versions: dict[tuple[int, int], int] = {}
        for i in range(2):
            fid = thread * 10 + i
            size, nblocks = rng.choice(self.sizes), rng.randint(2, 8)
            self.say(f"N {fid} {size} {nblocks}")
            f = self.fs.open_raw(f"{self.base}/b{fid}", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            for blk in range(nblocks):
                f.pwrite(_block(fid, blk, 0, size), blk * size)
                versions[(fid, blk)] = 0
                self.say(f"W {fid} {blk} 0")
            f.fsync()
            self.say(f"F {fid}")
            files.append((fid, f, size, nblocks))
        durable = 0
        while True:
            r = rng.random()
            if r < 0.08:
                data = rng.randbytes(rng.randint(1, 3 << 20))
                name = f"d{thread}_{durable}"
                durable += 1
                f = self.fs.open_raw(f"{self.base}/{name}", os.O_WRONLY | os.O_CREAT)
                view = memoryview(data)
                for off in range(0, len(data), 1 << 20):
                    f.pwrite(view[off:off + (1 << 20)], off)
                f.fsync()
                f.close()
                self.say(f"D {name} {len(data)} {hashlib.sha256(data).hexdigest()}")
            elif r < 0.25:
                fid, f, _, _ = rng.choice(files)
                f.fsync()
                self.say(f"F {fid}")
            else:
                fid, f, size, nblocks = rng.choice(files)
                blk = rng.randrange(nblocks)
                ver = versions[(fid, blk)] + 1
                f.pwrite(_block(fid, blk, ver, size), blk * size)
                versions[(fid, blk)] = ver
                self.say(f"W {fid} {blk} {ver}")


def writer_main(argv: list[str]) -> int:
    """``python -m tests.api.remote.test_crash_consistency writer (--local DIR | --remote EP) …``"""
    p = argparse.ArgumentParser()
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local")
    where.add_argument("--remote")
    p.add_argument("--curve-secret")
    p.add_argument("--server-key")
    p.add_argument("--dir", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    fs: Any
    if args.local:
        from pyvirtiofs.api.local import connect

        fs = connect(args.local)
        daemon = fs.transport.daemon
        pids = (fs.daemon_pid or 0, daemon.pid or 0)
        max_write = fs.stats()["session"]["max_write"]
    else:
        from pyvirtiofs.api.remote.client import connect_remote

        curve = None
        if args.curve_secret:
            from pyvirtiofs.api.remote.keys import client_keys

            curve = client_keys(args.curve_secret, args.server_key)
        fs = connect_remote(args.remote, curve=curve)
        pids = (0, 0)
        max_write = fs.stats()["session"]["max_write"]
    base = args.dir or "."
    if args.dir:
        fs.makedirs(args.dir, exist_ok=True)
    writer = _Writer(fs, base, args.seed, max_write)
    writer.say(f"R {pids[0]} {pids[1]} {max_write}")
    threads = [threading.Thread(target=writer.run, args=(t,), daemon=True)
               for t in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()  # never returns normally: the test kills us
    return 0


# ==========================================================================================
# The checker
# ==========================================================================================


@dataclass
class Acks:
    """What the writer reported before it died."""

    ready: threading.Event = field(default_factory=threading.Event)
    pids: tuple[int, int] = (0, 0)
    max_write: int = 0
    files: dict[int, tuple[int, int]] = field(default_factory=dict)  # fid -> (size, blocks)
    acked: dict[tuple[int, int], int] = field(default_factory=dict)
    durable: dict[tuple[int, int], int] = field(default_factory=dict)
    created: set[int] = field(default_factory=set)  # creation fsynced
    whole: dict[str, tuple[int, str]] = field(default_factory=dict)
    writes: int = 0

    def feed(self, line: str) -> None:
        kind, *rest = line.split()
        if kind == "R":
            self.pids = (int(rest[0]), int(rest[1]))
            self.max_write = int(rest[2])
            self.ready.set()
        elif kind == "N":
            self.files[int(rest[0])] = (int(rest[1]), int(rest[2]))
        elif kind == "W":
            self.writes += 1
            self.acked[(int(rest[0]), int(rest[1]))] = int(rest[2])
        elif kind == "F":
            fid = int(rest[0])
            self.created.add(fid)
            for (f, b), v in self.acked.items():
                if f == fid:
                    self.durable[(f, b)] = v
        elif kind == "D":
            self.whole[rest[0]] = (int(rest[1]), rest[2])


@dataclass
class Figures:
    """What the checks saw, summed over rounds (reported in RELIABILITY.md)."""

    rounds: int = 0
    blocks: int = 0
    acked_writes: int = 0
    fsyncs_checked: int = 0
    in_flight_landed: int = 0
    durable_files: int = 0
    durable_bytes: int = 0

    def add(self, other: Figures) -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)


def check_host(directory: Path, acks: Acks, what: str) -> Figures:
    """Compare the host files in ``directory`` with the acknowledgements."""
    fig = Figures(rounds=1)
    problems: list[str] = []
    for fid, (size, nblocks) in sorted(acks.files.items()):
        path = directory / f"b{fid}"
        data = path.read_bytes() if path.exists() else b""
        if fid in acks.created:
            assert len(data) == size * nblocks, f"{what}: b{fid} is {len(data)} bytes"
        for blk in range(nblocks):
            chunk = data[blk * size:(blk + 1) * size]
            acked = acks.acked.get((fid, blk))
            if len(chunk) < size or chunk == bytes(size):
                # never acknowledged: its first write may have been in flight
                if acked is not None:
                    problems.append(f"b{fid} block {blk}: acknowledged v{acked}, "
                                    f"host has {'zeros' if chunk else 'nothing'}")
                continue
            fig.blocks += 1
            unit = chunk[:UNIT.size]
            if chunk != unit * (size // UNIT.size):
                problems.append(f"b{fid} block {blk} of {size} bytes is TORN")
                continue
            magic, f2, b2, ver = UNIT.unpack(unit)
            if (magic, f2, b2) != (MAGIC, fid, blk):
                problems.append(f"b{fid} block {blk} holds block ({f2}, {b2})")
                continue
            floor = acks.durable.get((fid, blk))
            if floor is not None:
                fig.fsyncs_checked += 1
                if ver < floor:
                    problems.append(f"b{fid} block {blk}: v{ver} older than fsynced v{floor}")
            top = -1 if acked is None else acked
            if ver > top + 1:
                problems.append(f"b{fid} block {blk}: v{ver} but only v{top} acknowledged "
                                "and one write in flight")
            elif ver < top:
                problems.append(f"b{fid} block {blk}: acknowledged v{top} lost (host v{ver})")
            elif ver == top + 1:
                fig.in_flight_landed += 1
    fig.acked_writes = acks.writes
    for name, (size, digest) in sorted(acks.whole.items()):
        path = directory / name
        got = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"
        if got != digest:
            problems.append(f"{name}: fsynced {size} bytes, host checksum {got[:12]}")
        fig.durable_files += 1
        fig.durable_bytes += size
    assert not problems, f"{what}: " + "; ".join(problems[:10])
    return fig


# ==========================================================================================
# Helpers
# ==========================================================================================


def _wait_gone(pids: list[int | None], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    for pid in pids:
        while pid and not procfs.is_gone(pid):
            assert time.monotonic() < deadline, f"{what}: daemon {pid} still running"
            time.sleep(0.02)


class WriterProcess:
    """A writer child and the reader of its acknowledgements."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.acks = Acks()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.api.remote.test_crash_consistency", "writer", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError, IndexError):
                self.acks.feed(line)
        self.acks.ready.set()

    def wait_ready(self) -> None:
        assert self.acks.ready.wait(60) and self.acks.max_write, (
            f"writer did not start: {self.stderr()}")

    def kill(self) -> None:
        """SIGKILL the writer; it must still have been running (writing) until then."""
        died_by_itself = self.proc.poll() is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(30)
        self.reader.join(30)
        assert not died_by_itself, f"the writer failed before the kill: {self.stderr()}"

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        assert self.proc.stderr is not None
        return self.proc.stderr.read()[-2000:]


def _run_for(rng: random.Random) -> float:
    return rng.uniform(0.3, 2.0)


def _report(name: str, fig: Figures) -> None:
    line = (f"crash consistency [{name}]: {fig.rounds} rounds, {fig.acked_writes} "
            f"acknowledged block writes, {fig.blocks} blocks checked whole, "
            f"{fig.fsyncs_checked} fsynced blocks checked, {fig.in_flight_landed} in-flight "
            f"writes landed whole, {fig.durable_files} fsynced files "
            f"({fig.durable_bytes >> 20} MiB) checked by SHA-256")
    print(line)
    report = os.environ.get("PYVIRTIOFS_CRASH_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(line + "\n")


def _seeds(count: int, salt: int) -> Iterator[int]:
    """``count`` seeds (``PYVIRTIOFS_CRASH_ROUNDS`` overrides it, for long runs), derived
    from ``PYVIRTIOFS_CRASH_SEED`` (random by default) to replay a failure."""
    base = int(os.environ.get("PYVIRTIOFS_CRASH_SEED", random.randrange(1 << 30)))
    count = int(os.environ.get("PYVIRTIOFS_CRASH_ROUNDS", count))
    for i in range(count):
        yield base * 100_000 + salt * 10_000 + i


# ==========================================================================================
# The tests
# ==========================================================================================


def test_kill_in_process_client(tmp_path: Path) -> None:
    """kill -9 of a process using the in-process API (its private daemon sees EOF)."""
    total = Figures()
    for seed in _seeds(6, 1):
        rng = random.Random(seed)
        share = tmp_path / f"run{seed}"
        share.mkdir()
        w = WriterProcess(["--local", str(share), "--seed", str(seed)])
        try:
            w.wait_ready()
            time.sleep(_run_for(rng))
        finally:
            w.kill()
        _wait_gone(list(w.acks.pids), f"seed {seed}")
        total.add(check_host(share, w.acks, f"in-process client, seed {seed}"))
    _report("in-process client killed", total)


def test_kill_remote_client(tmp_path: Path) -> None:
    """kill -9 of a remote client: what the server acknowledged is on the host."""
    from pyvirtiofs.tools.soak import ServerProcess

    share = tmp_path / "share"
    share.mkdir()
    server = ServerProcess(str(share), str(tmp_path), None).start()
    total = Figures()
    try:
        for seed in _seeds(5, 2):
            rng = random.Random(seed)
            w = WriterProcess(["--remote", server.endpoints[0], "--dir", f"run{seed}",
                               "--seed", str(seed)])
            try:
                w.wait_ready()
                time.sleep(_run_for(rng))
            finally:
                w.kill()
            # The server finishes what it took; wait until it is idle.
            deadline = time.monotonic() + DEADLINE
            while True:
                tenant = server.stats().get("tenant", {})
                if tenant.get("requests_in_flight") == 0 and tenant.get("queued") == 0:
                    break
                assert time.monotonic() < deadline, f"server still busy: {tenant}"
                time.sleep(0.05)
            total.add(check_host(share / f"run{seed}", w.acks, f"remote client, seed {seed}"))
    finally:
        assert server.stop() == 0, server.log_tail()
    _report("remote client killed", total)


def _kill_server_while_writing(label: str, rounds: int, salt: int,
                               start: Any) -> None:
    """``rounds`` times: ``start(seed)`` a server (returning it, its daemon's pid, the host
    folder the writer's files land in and the writer's arguments), let a writer work for a
    random while, ``kill -9`` the server, wait for its daemon to go, check the host."""
    total = Figures()
    for seed in _seeds(rounds, salt):
        rng = random.Random(seed)
        server, daemon, host, writer_args = start(seed)
        w = WriterProcess([*writer_args, "--seed", str(seed)])
        try:
            w.wait_ready()
            time.sleep(_run_for(rng))
            assert server.proc is not None
            server.proc.kill()
            server.proc.wait(30)
            _wait_gone([daemon], f"seed {seed}")
        finally:
            w.kill()
            server.stop()
        total.add(check_host(host, w.acks, f"{label}, seed {seed}"))
    _report(f"{label} killed", total)


def test_kill_share_server(tmp_path: Path) -> None:
    """kill -9 of the share server while a remote client writes."""
    from pyvirtiofs.tools.soak import ServerProcess

    def start(seed: int) -> tuple[Any, int, Path, list[str]]:
        share = tmp_path / f"share{seed}"
        share.mkdir()
        runtime = tmp_path / f"rt{seed}"
        runtime.mkdir()
        server = ServerProcess(str(share), str(runtime), None).start()
        return server, server.daemon_pids()["remote"], share, ["--remote",
                                                                server.endpoints[0]]

    _kill_server_while_writing("share server", 5, 3, start)


def test_kill_agent(tmp_path: Path) -> None:
    """kill -9 of the multi-tenant agent while a tenant writes."""
    from pyvirtiofs.tools.soak import AgentProcess

    def start(seed: int) -> tuple[Any, int, Path, list[str]]:
        host = tmp_path / f"host{seed}"
        runtime = tmp_path / f"rt{seed}"
        runtime.mkdir()
        agent = AgentProcess(str(host), str(runtime), None, tenants=1)
        (host / "tenants" / "t0").mkdir(parents=True)
        agent.start()
        keys = runtime / "keys"
        return agent, agent.daemon_pids()["remote:t0"], host / "tenants" / "t0", [
            "--remote", agent.endpoints[0], "--curve-secret", str(keys / "t0.key_secret"),
            "--server-key", str(keys / "agent.key")]

    _kill_server_while_writing("agent", 4, 4, start)


if __name__ == "__main__":
    if sys.argv[1:2] == ["writer"]:
        sys.exit(writer_main(sys.argv[2:]))
    sys.exit("usage: python -m tests.api.remote.test_crash_consistency writer …")
