"""The multi-tenant agent under hostile load, for minutes: ``pyvirtiofs soak --hostile``.

    pyvirtiofs soak --hostile --minutes 6 --json hostile.json
    pyvirtiofs soak --hostile --phase-seconds 5 --phases idle,half-open-flood

An agent runs in a child process on loopback (a free port, CURVE) with one well-behaved
tenant and hostile ones. Phase after phase, for the same time each, one attack runs:

* ``idle``: nothing hostile (the baseline every other phase is compared to);
* ``unread-replies``: a client asks for 64 MiB reads and never takes the replies;
* ``message-flood``: pings and malformed messages far beyond the tenant's rate;
* ``log-flood``: everything that makes the agent write a line, as fast as it can;
* ``connection-flood``: 3,000 authenticated connections that reconnect when refused;
* ``half-open-flood``: plain TCP peers that send half a greeting and stop;
* ``streaming``: a tenant reads a large file in 8 MiB reads as fast as it can (fairness);
* ``signals``: storms of SIGHUPs, each after a change of the config that must be applied;
* ``idle-end``: nothing hostile again (what is left after everything).

Throughout, the well-behaved tenant — in a process of its own, so that the floods' Python
loops do not hold its GIL — does stat, read (checked) and write, paced, and every call's
latency and error is kept; the agent's RSS, descriptors and log size are sampled every
0.1 s. After each phase the run waits until the agent is back to its baseline (its
descriptors, nothing in flight), and says how long that took. The summary has a row per
phase: the good tenant's p50/p99 and the ratio of its p99 to the idle phase's, the agent's
peak RSS and descriptors, how much the log grew, the errors the good tenant saw; and
checks: no error for the good tenant, peak descriptors and RSS within what the agent's
configuration bounds them to, log growth within ``log_rate``, the agent back to its
baseline after every phase, every reload applied, and a clean stop (exit status 0).

The flood generators are the ones ``tests/api/agent/test_hostile.py`` runs for a few
seconds each: the test and this tool share them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

import zmq

from pyvirtiofs.actors import messages as m
from pyvirtiofs.api.agent.config import AgentConfig, load_config
from pyvirtiofs.api.agent.zap import GATE_BURST
from pyvirtiofs.api.remote import wire
from pyvirtiofs.tools import procfs
from pyvirtiofs.tools.agentrig import AgentProc, RawClient, start_agent, wait_for
from pyvirtiofs.tools.signals import sigterm_interrupts

__all__ = ["PHASES", "GoodTenant", "HalfOpenFlood", "HostileConfig", "HostileRun", "Streamer",
           "UnreadReplies", "check_bounds", "connection_flood", "format_summary", "log_flood",
           "main",
           "message_flood", "run_hostile", "signal_storm", "storm_reload", "take_replies"]

MiB = 1 << 20
KiB = 1 << 10


# ==========================================================================================
# The floods (shared with tests/api/agent/test_hostile.py)
# ==========================================================================================


def signal_storm(pid: int, sig: int, count: int) -> int:
    """Send ``count`` signals as fast as possible; how many were sent (the process may go)."""
    for i in range(count):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return i
    return count


def storm_reload(agent: AgentProc, tenant: str, open_handles: int, *, count: int = 1000,
                 timeout: float = 60.0) -> int:
    """Change ``tenant``'s ``open_handles`` limit in the config file, send ``count``
    SIGHUPs at once, and wait until the agent serves the new limit (so every storm must
    end in a reload that reads the file as it is now). The signals sent."""
    tenants = {t: dict(cfg) for t, cfg in agent.tenants.items()}
    tenants[tenant]["limits"] = {**tenants[tenant].get("limits", {}),
                                 "open_handles": open_handles}
    agent.rewrite_config(tenants)
    sent = signal_storm(agent.proc.pid, signal.SIGHUP, count)

    def applied() -> bool:
        if agent.proc.poll() is not None:
            raise AssertionError(f"the agent exited ({agent.proc.returncode}) in a SIGHUP storm")
        return int(agent.tenant_status(tenant)["limits"]["open_handles"]) == open_handles
    wait_for(applied, timeout, f"the reload after a storm to apply open_handles "
                               f"{open_handles} to {tenant}")
    return sent


class UnreadReplies:
    """A client of ``tenant`` that asks for ``reads`` reads of ``size`` bytes of ``path``
    and never takes a reply: its ZeroMQ socket holds one message and stops reading the
    connection, so every reply stays in the agent (which must count it until it has left,
    and refuse what goes beyond the tenant's budget)."""

    def __init__(self, agent: AgentProc, tenant: str, path: bytes, *, reads: int = 24,
                 size: int = 64 * MiB) -> None:
        self.agent, self.tenant, self.path = agent, tenant, path
        self.reads, self.size = reads, size
        self.raw: RawClient | None = None

    def __enter__(self) -> UnreadReplies:
        raw = self.agent.raw(self.tenant, {zmq.RCVHWM: 1, zmq.RCVBUF: 64 << 10})
        try:
            reply = raw.call(m.Open(path=self.path, flags=os.O_RDONLY))
            if reply.error is not None:
                raise OSError(reply.error.errno, reply.error.strerror)
            handle = wire.decode_value(m.Open(path=b""), reply.value).handle
            for _ in range(self.reads):
                raw.send(m.Read(size=self.size, offset=0), handle)
        except BaseException:
            raw.close()
            raise
        self.raw = raw
        return self

    def __exit__(self, *exc: object) -> None:
        if self.raw is not None:
            self.raw.close()  # the agent then drops what it still held for this client
            self.raw = None


_PING = wire.encode_request(0, wire.Ping())


def message_flood(raw: RawClient, count: int) -> None:
    """``count`` pings and ``count`` malformed messages, as fast as the socket takes them:
    each one counts against the tenant's rate, however cheap or broken."""
    for i in range(count):
        raw.send_frames([_PING])
        raw.send_frames([b"\x93\x01garbage" + (i & 0xFFFFFFFF).to_bytes(4, "little")])


def take_replies(raw: RawClient, quiet_ms: int) -> tuple[int, int]:
    """Receive replies until none comes for ``quiet_ms``: (answered, of which served)."""
    answered = ok = 0
    while raw.sock.poll(quiet_ms):
        header = wire.decode_reply(raw.sock.recv_multipart()[0])
        answered += 1
        ok += header.error is None
    return answered, ok


def log_flood(agent: AgentProc, tenant: str, until: float, *, churn: int = 20) -> int:
    """Make the agent log as much as a tenant can until ``until`` (monotonic): malformed
    messages and requests that fail (one line each if nothing held them back), then
    ``churn`` connections that come and go (two lines each). The messages sent."""
    sent = 0
    with agent.raw(tenant) as raw:
        while time.monotonic() < until:
            for i in range(200):
                raw.send_frames([b"\x92" + os.urandom(8)])  # malformed
                raw.send(m.Stat(path=f"missing-{i}".encode()))  # ENOENT
            sent += 400
            while raw.sock.poll(0):
                raw.sock.recv_multipart()
    for _ in range(churn):
        agent.raw(tenant).close()
    return sent


_CONNECTION_FLOODER = """
import sys, zmq
from pyvirtiofs.api.remote.keys import client_keys
keys = client_keys(sys.argv[2], sys.argv[3])
ctx = zmq.Context()
ctx.set(zmq.MAX_SOCKETS, 10000)
socks = []
for _ in range(int(sys.argv[4])):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_publickey, s.curve_secretkey, s.curve_serverkey = (
        keys.public, keys.secret, keys.server_public)
    s.connect(sys.argv[1])
    socks.append(s)
print("connected", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def connection_flood(agent: AgentProc, tenant: str, connections: int) -> Iterator[None]:
    """``connections`` authenticated connections of ``tenant`` from a child process (its
    own descriptors and GIL), each reconnecting whenever the agent refuses or drops it,
    for as long as the block runs."""
    proc = subprocess.Popen([sys.executable, "-c", _CONNECTION_FLOODER, agent.endpoint,
                             str(agent.keys / f"{tenant}.key_secret"),
                             str(agent.keys / "agent.key"), str(connections)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "connected":
            raise RuntimeError("the connection flooder did not start")
        yield
    finally:
        proc.kill()
        proc.wait()


HALF_GREETING = b"\xff" + b"\0" * 8 + b"\x7f"  # the first 10 bytes of a ZMTP greeting


class HalfOpenFlood:
    """Plain TCP peers of ``endpoint`` that send half a ZMTP greeting and stop. At most
    ``keep`` are held open at once (the flood's own descriptors); the rest are closed,
    oldest first, and replaced."""

    def __init__(self, endpoint: str, *, per_round: int = 50, keep: int = 1500) -> None:
        self.address = _tcp_address(endpoint)
        self.per_round, self.keep = per_round, keep
        self.peers: list[socket.socket] = []
        self.opened = 0

    def run(self, until: float, on_round: Callable[[], None] | None = None, *,
            limit: int | None = None) -> int:
        """Open peers until ``until`` (monotonic) or until ``limit`` have been opened,
        calling ``on_round`` after each round of ``per_round``; the peers opened so far."""
        while time.monotonic() < until and (limit is None or self.opened < limit):
            for _ in range(self.per_round):
                try:
                    s = socket.create_connection(self.address, timeout=2)
                    s.sendall(HALF_GREETING)
                except OSError:
                    continue
                self.peers.append(s)
                self.opened += 1
            if len(self.peers) > self.keep:
                for s in self.peers[:500]:
                    _abort(s)
                del self.peers[:500]
            if on_round is not None:
                on_round()
        return self.opened

    def __enter__(self) -> HalfOpenFlood:
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.peers:
            _abort(s)
        self.peers.clear()


def hang_ups(endpoint: str, count: int, threads: int = 8) -> int:
    """Plain TCP peers of ``endpoint`` that hang up (with a reset) as soon as they are
    connected, ``count`` of them from ``threads`` threads at once; how many connected."""
    address = _tcp_address(endpoint)
    connected = [0] * threads

    def peers(i: int) -> None:
        for _ in range(count // threads):
            try:
                s = socket.create_connection(address, timeout=2)
            except OSError:
                continue
            _abort(s)
            connected[i] += 1

    workers = [threading.Thread(target=peers, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(connected)


def _tcp_address(endpoint: str) -> tuple[str, int]:
    """(host, port) of a ``tcp://host:port`` endpoint."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


def _abort(s: socket.socket) -> None:
    """Close a peer with a reset, as a flooder would: a plain close leaves its port in
    TIME_WAIT for a minute, and tens of thousands of them use up this host's ephemeral
    ports, so that nobody on it, well-behaved clients included, could connect any more:
    a limit of the test machine, not of the agent."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


_STREAMER = """
import sys, time
from pyvirtiofs.api import connect_remote
from pyvirtiofs.api.remote.keys import client_keys
# (paused with SIGSTOP on purpose: a stopped process's heartbeat timer would find the
# server silent on waking, so it is given far longer than a stop lasts)
fs = connect_remote(sys.argv[1], curve=client_keys(sys.argv[2], sys.argv[3]), dead_after=60)
end = time.monotonic() + float(sys.argv[5])
chunk = int(sys.argv[6])
total = 0
while time.monotonic() < end:
    with fs.open(sys.argv[4], "rb", buffering=0) as f:
        while chunk_read := f.read(chunk):
            total += len(chunk_read)
            print(total, flush=True)
"""


class Streamer:
    """A tenant in a child process that reads ``path`` over and over in ``chunk``-byte
    reads as fast as it can, for ``seconds``; ``progress`` is (time, bytes so far) after
    every read. ``proc`` can be paused (SIGSTOP) and resumed."""

    def __init__(self, agent: AgentProc, tenant: str, path: str, *, seconds: float = 60.0,
                 chunk: int = 8 * MiB) -> None:
        self.agent, self.tenant, self.path = agent, tenant, path
        self.seconds, self.chunk = seconds, chunk
        self.progress: list[tuple[float, int]] = [(time.monotonic(), 0)]
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Streamer:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _STREAMER, self.agent.endpoint,
             str(self.agent.keys / f"{self.tenant}.key_secret"),
             str(self.agent.keys / "agent.key"), self.path, str(self.seconds),
             str(self.chunk)], stdout=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._follow, daemon=True)
        self._reader.start()
        return self

    def _follow(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.progress.append((time.monotonic(), int(line)))

    @property
    def streamed(self) -> int:
        return self.progress[-1][1]

    def wait_streamed(self, total: int, timeout: float, what: str) -> None:
        """Wait until ``total`` bytes have been read in all."""
        def grown() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the streaming tenant exited ({self.proc.returncode})")
            return self.streamed >= total
        wait_for(grown, timeout, what)

    def alternate(self, rounds: int, measure: Callable[[bool], None]) -> tuple[int, float]:
        """Pause the stream (SIGSTOP, then wait until the agent has answered its last
        read) and call ``measure(False)``; resume it, wait until it flows again, and call
        ``measure(True)``; ``rounds`` times. Measuring both ways by turns lets the noise of
        a shared machine fall on both alike. (Bytes streamed, seconds) while measured."""
        assert self.proc is not None
        streamed, streaming_time = 0, 0.0
        for _ in range(rounds):
            os.kill(self.proc.pid, signal.SIGSTOP)
            wait_for(lambda: self.agent.tenant_status(self.tenant)["requests_in_flight"] == 0,
                     10, "the paused stream's last request to be answered")
            measure(False)
            os.kill(self.proc.pid, signal.SIGCONT)
            self.wait_streamed(self.streamed + (4 << 20), 30, "the stream to flow again")
            t0, b0 = self.progress[-1]
            measure(True)
            t1, b1 = self.progress[-1]
            streamed += b1 - b0
            streaming_time += t1 - t0
        return streamed, streaming_time

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)  # (a paused child would not die at once)
        self.proc.kill()
        self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)


# ==========================================================================================
# The well-behaved tenant
# ==========================================================================================


class _Background:
    """Work in a daemon thread (``_run``) until ``stop()`` sets ``_stop``."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class GoodTenant(_Background):
    """A well-behaved tenant working in a thread: ``ops`` in turn (``stat`` and ``read``
    of ``path``, whose content must be ``expected``; ``write`` of a small scratch file),
    one at a time, starting one round every ``interval`` seconds (0: back to back).

    Every call is kept in ``samples`` as (end time, op, seconds, errno or None); an error
    that is not an OSError counts as errno -1. ``stop_on_error``: the first error ends the
    work (and is in ``errors``)."""

    def __init__(self, fs: Any, expected: bytes, *, path: str = "good.bin",
                 scratch: str = "good-scratch.bin", ops: Sequence[str] = ("stat", "read", "write"),
                 interval: float = 0.0, stop_on_error: bool = False) -> None:
        self.fs, self.expected, self.path, self.scratch = fs, expected, path, scratch
        self.ops, self.interval, self.stop_on_error = tuple(ops), interval, stop_on_error
        self.samples: list[tuple[float, str, float, int | None]] = []
        self.errors: list[BaseException] = []
        self.calls = 0
        self.slowest = 0.0
        self._payload = os.urandom(4 * KiB)
        super().__init__("good-tenant")

    def _call(self, op: str) -> None:
        if op == "stat":
            self.fs.stat(self.path)
        elif op == "read":
            if self.fs.read_bytes(self.path) != self.expected:
                raise AssertionError(f"{self.path}: read back something else")
        elif op == "write":
            self.fs.write_bytes(self.scratch, self._payload)
        else:
            raise ValueError(f"unknown op {op!r}")

    def _run(self) -> None:
        next_round = time.monotonic()
        while not self._stop.is_set():
            for op in self.ops:
                t0 = time.monotonic()
                try:
                    self._call(op)
                except BaseException as exc:
                    t1 = time.monotonic()
                    self.samples.append((t1, op, t1 - t0, getattr(exc, "errno", None) or -1))
                    self.errors.append(exc)
                    if self.stop_on_error:
                        return
                    continue
                t1 = time.monotonic()
                self.samples.append((t1, op, t1 - t0, None))
                self.slowest = max(self.slowest, t1 - t0)
                self.calls += 1
            if self.interval:
                # Paced, not back to back: a round late starts at once, with no catching up.
                next_round = max(next_round + self.interval, time.monotonic())
                self._stop.wait(next_round - time.monotonic())


class _GoodProcess:
    """The well-behaved tenant of a run, in a child process (``_good``): asked for its
    samples at the end of each phase."""

    def __init__(self, agent: AgentProc, tenant: str, expected_file: Path,
                 interval: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyvirtiofs.tools.hostile", "_good", agent.endpoint,
             str(agent.keys / f"{tenant}.key_secret"), str(agent.keys / "agent.key"),
             str(expected_file), str(interval)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self._ask("ready").get("ready") is not True:
            self.close()
            raise RuntimeError("the well-behaved tenant did not start")

    def _ask(self, command: str) -> dict[str, Any]:
        """One command, one JSON line back ({} once the child is gone)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {}

    def dump(self) -> tuple[list[tuple[float, str, float, int | None]], list[str]]:
        """Every sample and error since the last dump."""
        reply = self._ask("dump")
        return [tuple(s) for s in reply.get("samples", [])], reply.get("errors", [])  # type: ignore[misc]

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._ask("quit")
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _good_child(argv: Sequence[str]) -> int:
    """The child: be the well-behaved tenant until stdin says quit (or closes).
    Commands (one a line): ``ready``, ``dump`` (new samples and errors as one JSON line),
    ``quit``."""
    from pyvirtiofs.api.remote.client import connect_remote
    from pyvirtiofs.api.remote.keys import client_keys

    endpoint, secret, server, expected_file, interval = argv
    fs = connect_remote(endpoint, curve=client_keys(secret, server))
    good = GoodTenant(fs, Path(expected_file).read_bytes(), interval=float(interval))
    sent_samples = sent_errors = 0
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "ready":
                good.start()
                print(json.dumps({"ready": True}), flush=True)
            elif command == "dump":
                samples, errors = good.samples[:], good.errors[:]  # (appended by its thread)
                print(json.dumps({"samples": samples[sent_samples:],
                                  "errors": [repr(e) for e in errors[sent_errors:]][:20]}),
                      flush=True)
                sent_samples, sent_errors = len(samples), len(errors)
            elif command == "quit":
                print("{}", flush=True)
                break
    finally:
        good.stop()
        fs.close()
    return 0


# ==========================================================================================
# The run: an agent, its tenants, and the phases
# ==========================================================================================

AGENT_SETTINGS: dict[str, Any] = {
    # Everything else is the agent's default, so the figures are those of a default agent.
    "bytes_in_flight": "320MiB",
    "heartbeat_timeout": 10,
    "drain_timeout": 10,
}
TENANTS: dict[str, dict[str, Any]] = {
    "good": {},
    "hog": {},  # unread replies
    "pinger": {"limits": {"requests_per_second": 200}},  # message flood
    "noisy": {},  # log flood; its limit is what the signal storms change
    "flooder": {},  # connection flood (the default cap: 64 connections)
    "streamer": {},  # 8 MiB reads
}
GOOD_FILE = 16 * KiB  # below the agent's bulk size: the good tenant's reads are small requests
BIG_FILE = 64 * MiB
SAMPLE_INTERVAL = 0.1
RECOVERY_TIMEOUT = 60.0
FD_SLACK = 4  # descriptors the tool's own status queries may hold open for a moment


@dataclass
class HostileConfig:
    """What to run: ``phase_seconds`` for each of ``phases``; the good tenant starts a
    round (stat, read, write) every ``good_interval`` seconds."""

    phase_seconds: float = 40.0
    phases: tuple[str, ...] = ()
    good_interval: float = 0.005
    directory: str | None = None
    keep: bool = False
    virtiofsd: str | None = None

    def __post_init__(self) -> None:
        self.phases = tuple(self.phases) or tuple(PHASES)
        unknown = [p for p in self.phases if p not in PHASES]
        if unknown:
            raise ValueError(f"unknown phase(s) {', '.join(unknown)} (known: "
                             f"{', '.join(PHASES)})")
        if self.phase_seconds <= 0:
            raise ValueError("phases need a positive duration")


class _Sampler(_Background):
    """The agent's RSS, anonymous RSS, descriptors and log size every ``interval`` s."""

    def __init__(self, pid: int, log_path: Path, interval: float = SAMPLE_INTERVAL) -> None:
        self.pid, self.log_path, self.interval = pid, log_path, interval
        self.samples: list[tuple[float, int, int, int, int]] = []
        super().__init__("hostile-sampler")

    def sample(self) -> tuple[float, int, int, int, int] | None:
        rss, anon, _threads = procfs.memory(self.pid)
        fds = procfs.fd_count(self.pid)
        if rss is None or fds is None:
            return None
        try:
            log_size = self.log_path.stat().st_size
        except OSError:
            log_size = 0
        s = (time.monotonic(), rss, anon or 0, fds, log_size)
        self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def between(self, t0: float, t1: float) -> list[tuple[float, int, int, int, int]]:
        return [s for s in self.samples if t0 <= s[0] <= t1]


class HostileRun:
    """The agent, its tenants' folders, the good tenant, the sampler; ``phase()`` runs one."""

    def __init__(self, config: HostileConfig, base: Path, out: IO[str] | None) -> None:
        self.config, self.base, self.out = config, base, out
        self.host = base / "shares"
        self.agent: AgentProc | None = None
        self.agent_config: AgentConfig | None = None  # as the agent reads its file
        self.good: _GoodProcess | None = None
        self.sampler: _Sampler | None = None
        self.baseline_fds = 0
        self.phases: list[dict[str, Any]] = []
        self.open_handles = 1024  # noisy's limit, which the signal storms change

    def say(self, text: str) -> None:
        if self.out is not None:
            print(text, file=self.out, flush=True)

    def start(self) -> None:
        for tenant in TENANTS:
            (self.host / tenant).mkdir(parents=True, exist_ok=True)
        (self.host / "good" / "good.bin").write_bytes(os.urandom(GOOD_FILE))
        (self.host / "hog" / "big.bin").write_bytes(os.urandom(MiB) * (BIG_FILE // MiB))
        with open(self.host / "streamer" / "big.bin", "wb") as f:
            f.truncate(BIG_FILE)  # (sparse: the stream costs the agent, not the disk)
        settings = dict(AGENT_SETTINGS)
        if self.config.virtiofsd:
            settings["virtiofsd"] = self.config.virtiofsd
        self.agent = start_agent(self.base / "agent",
                                 {t: {"share": str(self.host / t), **cfg}
                                  for t, cfg in TENANTS.items()}, settings=settings)
        self.agent_config = load_config(self.agent.config_path)
        self.say(f"agent pid {self.agent.proc.pid} on {self.agent.endpoint}; tenants "
                 f"{', '.join(TENANTS)}; log {self.agent.log_path}")
        self.good = _GoodProcess(self.agent, "good", self.host / "good" / "good.bin",
                                 self.config.good_interval)
        self.sampler = _Sampler(self.agent.proc.pid, self.agent.log_path).start()
        self.baseline_fds = self._settle_fds()

    def _settle_fds(self) -> int:
        """The agent's descriptors once its tenants' connections are up and steady."""
        assert self.agent is not None
        counts: list[int] = []

        def steady() -> bool:
            counts.append(procfs.fd_count(self.agent.proc.pid) or 0)  # type: ignore[union-attr]
            return len(counts) >= 5 and len(set(counts[-5:])) == 1
        wait_for(steady, 30, "the agent's descriptors to settle", interval=0.1)
        return counts[-1]

    def phase(self, name: str) -> dict[str, Any]:
        """Run phase ``name`` for the configured time, then wait for the agent to recover."""
        assert self.agent is not None and self.good is not None and self.sampler is not None
        self.say(f"-- {name} ({self.config.phase_seconds:g} s)")
        self.good.dump()  # (samples before the phase are not its own)
        t0 = time.monotonic()
        until = t0 + self.config.phase_seconds
        self.sampler.sample()
        attack: dict[str, Any] = {}
        failure = None
        try:
            attack = PHASES[name](self, until) or {}
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
            self.say(f"   the attack failed: {failure}")
        # The rest of the phase's time, if the attack ended early (or failed).
        wait_until(until, lambda: self.agent is not None and self.agent.proc.poll() is not None)
        t1 = time.monotonic()
        samples, errors = self.good.dump()
        windows = attack.pop("windows", None)
        if windows:  # the attack ran by turns: compare them, and count its own turns
            attack["fairness"] = _fairness(samples, windows)
            # (a failed call counts wherever it fell)
            samples = [s for s in samples
                       if s[3] is not None or _within(s, windows["streaming"])]
        recovered, recovery = self._recover()
        t2 = time.monotonic()
        agent_samples = self.sampler.between(t0, t2)
        last = self.sampler.sample()
        result = _phase_result(name, t1 - t0, t2 - t1, samples, errors,
                               agent_samples + ([last] if last is not None else []))
        result.update(attack=attack, failure=failure, recovered=recovered,
                      recovery=recovery, alive=self.agent.proc.poll() is None)
        self.phases.append(result)
        self.say(_phase_line(result))
        return result

    def _recover(self) -> tuple[bool, dict[str, Any]]:
        """Wait until the agent has its baseline descriptors back and holds nothing."""
        assert self.agent is not None
        last: dict[str, Any] = {}

        def back() -> bool:
            if self.agent.proc.poll() is not None:  # type: ignore[union-attr]
                return True
            status = self.agent.status()  # type: ignore[union-attr]
            fds = procfs.fd_count(self.agent.proc.pid) or 0  # type: ignore[union-attr]
            last.update(fds=fds, bytes_in_flight=status["bytes_in_flight"],
                        handshaking=status["connections"]["handshaking"],
                        holding={t: {k: v for k, v in s.items() if v and k in _HELD}
                                 for t, s in status.get("tenants", {}).items()
                                 if any(s.get(k) for k in _HELD)})
            return (fds <= self.baseline_fds + FD_SLACK and status["bytes_in_flight"] == 0
                    and status["connections"]["handshaking"] == 0)
        t0 = time.monotonic()
        try:
            wait_for(back, RECOVERY_TIMEOUT, "the agent to be back to its baseline",
                     interval=0.1)
            ok = self.agent.proc.poll() is None
        except AssertionError:
            ok = False
        return ok, {**last, "seconds": round(time.monotonic() - t0, 2),
                    "baseline_fds": self.baseline_fds}

    def stop(self) -> int | None:
        """Stop the good tenant, the sampler and the agent; the agent's exit status."""
        if self.good is not None:
            self.good.close()
        if self.sampler is not None:
            self.sampler.stop()
        if self.agent is None:
            return None
        try:
            return self.agent.terminate()
        except AssertionError:
            return None


def wait_until(deadline: float, stop: Callable[[], bool]) -> None:
    """Let a phase's time run out (checking ``stop`` every 0.1 s: nothing to wait for)."""
    while not stop():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        threading.Event().wait(min(0.1, left))


# -- the phases ------------------------------------------------------------------------------


def _idle(run: HostileRun, until: float) -> dict[str, Any]:
    wait_until(until, lambda: False)
    return {}


def _unread_replies(run: HostileRun, until: float) -> dict[str, Any]:
    """Cycles of a client that never reads 24 replies of 64 MiB, held for up to 10 s each,
    then dropped (what it held must come back)."""
    agent = run.agent
    assert agent is not None
    before = agent.tenant_status("hog")
    cycles, held, unsent, total = 0, 0, 0, 0
    hold = max(2.0, min(10.0, (until - time.monotonic()) / 3))
    while time.monotonic() < until - 1:
        with UnreadReplies(agent, "hog", b"big.bin"):
            cycles += 1
            end = min(until, time.monotonic() + hold)
            while time.monotonic() < end:
                status = agent.status()
                hog = status["tenants"]["hog"]
                held = max(held, hog["bytes_in_flight"])
                unsent = max(unsent, hog["unsent_bytes"])
                total = max(total, status["bytes_in_flight"])
                threading.Event().wait(0.2)
        wait_for(lambda: agent.tenant_status("hog")["bytes_in_flight"] == 0, 30,
                 "the unread replies to be released")
    after = agent.tenant_status("hog")
    return {"cycles": cycles, "hog_held_mib": round(held / MiB, 1),
            "hog_unsent_mib": round(unsent / MiB, 1),
            "total_held_mib": round(total / MiB, 1),
            "refused": after["rejected"].get("EAGAIN", 0)
            - before["rejected"].get("EAGAIN", 0)}


def _message_flood(run: HostileRun, until: float) -> dict[str, Any]:
    """Pings and malformed messages from a tenant limited to 200 requests/s, as fast as
    one client can send them."""
    agent = run.agent
    assert agent is not None
    before = agent.tenant_status("pinger")
    sent = answered = ok = 0
    with agent.raw("pinger") as raw:
        while time.monotonic() < until:
            message_flood(raw, 1000)
            sent += 2000
            a, o = take_replies(raw, 0)
            answered, ok = answered + a, ok + o
        a, o = take_replies(raw, 500)
        answered, ok = answered + a, ok + o
    after = agent.tenant_status("pinger")
    return {"sent": sent, "served": ok, "refused": answered - ok,
            "dropped": after["dropped"] - before["dropped"]}


def _log_flood(run: HostileRun, until: float) -> dict[str, Any]:
    assert run.agent is not None
    return {"sent": log_flood(run.agent, "noisy", until)}


def _connection_flood(run: HostileRun, until: float) -> dict[str, Any]:
    """3,000 authenticated connections of one tenant (capped at its 64)."""
    agent = run.agent
    assert agent is not None
    most = 0
    handshaking = 0
    with connection_flood(agent, "flooder", 3000):
        while time.monotonic() < until:
            conns = agent.status()["connections"]
            most = max(most, conns["per_tenant"].get("flooder", 0))
            handshaking = max(handshaking, conns["handshaking"])
            threading.Event().wait(0.2)
    return {"connections": 3000, "flooder_most": most, "handshaking_most": handshaking,
            "shut_down": agent.status()["connections"]["shut_down"]}


def _half_open_flood(run: HostileRun, until: float) -> dict[str, Any]:
    agent = run.agent
    assert agent is not None
    seen = {"handshaking": 0, "next": 0.0}

    def look() -> None:  # (the agent's view, twice a second: a query costs it too)
        now = time.monotonic()
        if now >= seen["next"]:
            seen["next"] = now + 0.5
            seen["handshaking"] = max(seen["handshaking"],
                                      agent.status()["connections"]["handshaking"])
    with HalfOpenFlood(agent.endpoint) as flood:
        opened = flood.run(until, look)
    return {"peers": opened, "handshaking_most": seen["handshaking"]}


FAIRNESS_SLICE = 0.5  # seconds of each paused and streaming slice of the streaming phase


def _streaming(run: HostileRun, until: float) -> dict[str, Any]:
    """A tenant reads a large file in 8 MiB reads as fast as it can, paused (SIGSTOP) for
    every other slice: the good tenant's latency is compared slice by slice (the phase's
    row counts the streaming slices only)."""
    agent = run.agent
    assert agent is not None
    windows: dict[str, list[tuple[float, float]]] = {"paused": [], "streaming": []}

    def measure(streaming: bool) -> None:
        t0 = time.monotonic()
        wait_until(t0 + FAIRNESS_SLICE, lambda: False)
        windows["streaming" if streaming else "paused"].append((t0, time.monotonic()))

    with Streamer(agent, "streamer", "big.bin",
                  seconds=until - time.monotonic() + 60) as stream:
        stream.wait_streamed(8 * MiB, 60, "the stream to start")
        streamed, seconds = 0, 0.0
        while time.monotonic() < until - 2 * FAIRNESS_SLICE:
            b, t = stream.alternate(1, measure)
            streamed, seconds = streamed + b, seconds + t
    return {"streamed_mib": round(streamed / MiB), "mib_per_s": round(streamed / MiB
                                                                      / max(seconds, 1e-9)),
            "slices": len(windows["streaming"]), "windows": windows}


def _signals(run: HostileRun, until: float) -> dict[str, Any]:
    """Storms of 1,000 SIGHUPs, each after a change of the config: every storm must end in
    a reload that applied it."""
    agent = run.agent
    assert agent is not None
    storms = signals = 0
    slowest = 0.0
    while time.monotonic() < until:
        run.open_handles += 1
        t0 = time.monotonic()
        signals += storm_reload(agent, "noisy", run.open_handles)
        slowest = max(slowest, time.monotonic() - t0)
        storms += 1
    return {"storms": storms, "signals": signals, "applied": storms,
            "slowest_reload_s": round(slowest, 2)}


_HELD = ("bytes_in_flight", "unsent_bytes", "requests_in_flight", "queued", "deferred")

PHASES: dict[str, Callable[[HostileRun, float], dict[str, Any]]] = {
    "idle": _idle,
    "unread-replies": _unread_replies,
    # (the streaming tenant connects when its phase starts: before the connection floods,
    # which can leave a loopback host slow to take new connections for a while)
    "streaming": _streaming,
    "message-flood": _message_flood,
    "log-flood": _log_flood,
    "connection-flood": _connection_flood,
    "half-open-flood": _half_open_flood,
    "signals": _signals,
    "idle-end": _idle,
}


# -- figures ---------------------------------------------------------------------------------


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """p50 and p99 in milliseconds (None without samples)."""
    if not values:
        return {"p50": None, "p99": None}
    if len(values) == 1:
        return {"p50": values[0] * 1e3, "p99": values[0] * 1e3}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(statistics.median(values) * 1e3, 3), "p99": round(q[98] * 1e3, 3)}


def _phase_result(name: str, seconds: float, recovery_s: float,
                  samples: list[tuple[float, str, float, int | None]], errors: list[str],
                  agent: list[tuple[float, int, int, int, int]]) -> dict[str, Any]:
    ok = [s for s in samples if s[3] is None]
    by_op = {op: {"count": sum(1 for s in ok if s[1] == op),
                  **_percentiles([s[2] for s in ok if s[1] == op])}
             for op in ("stat", "read", "write")}
    failed = Counter(str(s[3]) for s in samples if s[3] is not None)
    return {
        "phase": name, "seconds": round(seconds, 1), "recovery_seconds": round(recovery_s, 1),
        "good": {"ops": len(ok), "errors": sum(failed.values()), "errnos": dict(failed),
                 "error_samples": errors, **_percentiles([s[2] for s in ok]), "by_op": by_op},
        "agent": {
            "rss_start_mib": round(agent[0][1] / MiB, 1) if agent else None,
            "rss_peak_mib": round(max(s[1] for s in agent) / MiB, 1) if agent else None,
            "anon_peak_mib": round(max(s[2] for s in agent) / MiB, 1) if agent else None,
            "rss_end_mib": round(agent[-1][1] / MiB, 1) if agent else None,
            "fds_start": agent[0][3] if agent else None,
            "fds_peak": max(s[3] for s in agent) if agent else None,
            "fds_end": agent[-1][3] if agent else None,
            "log_growth_bytes": agent[-1][4] - agent[0][4] if agent else None,
        },
    }


def _within(sample: tuple[float, str, float, int | None],
            windows: list[tuple[float, float]]) -> bool:
    """Whether a call ran inside one of ``windows`` from its start to its end."""
    start, end = sample[0] - sample[2], sample[0]
    return any(t0 <= start and end <= t1 for t0, t1 in windows)


def _fairness(samples: list[tuple[float, str, float, int | None]],
              windows: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    """The good tenant's stat latency in the paused and the streaming slices."""
    out: dict[str, Any] = {}
    for state, spans in windows.items():
        stats = [s[2] for s in samples if s[1] == "stat" and s[3] is None and _within(s, spans)]
        out[state] = {"stats": len(stats), **_percentiles(stats)}
    out["p99_ratio"] = _ratio(out["streaming"]["p99"], out["paused"]["p99"])
    out["p50_ratio"] = _ratio(out["streaming"]["p50"], out["paused"]["p50"])
    return out


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 2) if value is not None and base else None


def check_bounds(run: HostileRun, exit_status: int | None) -> dict[str, dict[str, Any]]:
    """Every bound the agent's configuration promises, against what was measured."""
    phases = run.phases
    idle = next((p for p in phases if p["phase"] == "idle"), phases[0] if phases else None)
    cfg = run.agent_config or AgentConfig(path="", bind=(), public_key=b"", secret_key=b"",
                                          runtime_dir="")
    # What the gate lets through at most (see pyvirtiofs.api.agent.zap), and what replies
    # may hold in all (bytes_in_flight, charged until they have left the process).
    fd_bound = run.baseline_fds + cfg.max_connections + cfg.max_handshakes + GATE_BURST
    rss_base = idle["agent"]["rss_peak_mib"] if idle else 0.0
    rss_bound = rss_base + cfg.bytes_in_flight / MiB
    fds_peak = max((p["agent"]["fds_peak"] or 0 for p in phases), default=0)
    rss_peak = max((p["agent"]["rss_peak_mib"] or 0.0 for p in phases), default=0.0)
    log_over = [p["phase"] for p in phases
                if (p["agent"]["log_growth_bytes"] or 0)
                > cfg.log_rate * (p["seconds"] + p["recovery_seconds"] + 4) + 16 * KiB]
    errors = {p["phase"]: p["good"]["errors"] for p in phases if p["good"]["errors"]}
    signals = next((p for p in phases if p["phase"] == "signals"), None)
    checks: dict[str, dict[str, Any]] = {
        "good tenant errors": {"ok": not errors, "by_phase": errors},
        "good tenant served": {"ok": all(p["good"]["ops"] > 0 for p in phases),
                               "fewest_ops": min((p["good"]["ops"] for p in phases), default=0)},
        "agent fds": {"ok": fds_peak <= fd_bound, "peak": fds_peak, "bound": fd_bound},
        "agent RSS": {"ok": rss_peak <= rss_bound, "peak_mib": rss_peak,
                      "bound_mib": round(rss_bound, 1)},
        "log growth": {"ok": not log_over, "over_rate": log_over},
        "recovered after each phase": {
            "ok": all(p["recovered"] for p in phases),
            "not": [p["phase"] for p in phases if not p["recovered"]],
            "last seen": {p["phase"]: p.get("recovery") for p in phases if not p["recovered"]}},
        "attacks ran": {"ok": all(p["failure"] is None for p in phases),
                        "failed": {p["phase"]: p["failure"] for p in phases if p["failure"]}},
        "clean stop": {"ok": exit_status == 0, "exit_status": exit_status},
    }
    if signals is not None:
        checks["reloads applied"] = {"ok": signals["failure"] is None
                                     and signals["attack"].get("storms", 0) > 0,
                                     "storms": signals["attack"].get("storms", 0)}
    flood = next((p for p in phases if p["phase"] == "connection-flood"), None)
    flooder = cfg.tenants.get("flooder")
    if flood is not None and flooder is not None and flooder.limits.connections is not None:
        # held to its cap, and its handshakes still got through (the gate did not starve)
        most, cap = flood["attack"].get("flooder_most", 0), flooder.limits.connections
        checks["connection cap held"] = {"ok": 0 < most <= cap, "most": most, "cap": cap}
    streaming = next((p for p in phases if p["phase"] == "streaming"), None)
    if streaming is not None:
        ratio = streaming["attack"].get("fairness", {}).get("p99_ratio")
        checks["fairness (stat p99 streaming <= 5x paused)"] = {
            "ok": ratio is not None and ratio <= 5.0, "ratio": ratio}
    return checks


def _phase_line(p: dict[str, Any]) -> str:
    g, a = p["good"], p["agent"]
    return (f"   good: {g['ops']} ops, {g['errors']} errors, p50 {_ms(g['p50'])} p99 "
            f"{_ms(g['p99'])} ms; agent RSS peak {a['rss_peak_mib']} MiB, fds peak "
            f"{a['fds_peak']}, log +{(a['log_growth_bytes'] or 0) / KiB:.0f} KiB; back in "
            f"{p['recovery']['seconds']} s; {json.dumps(p['attack'])}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_summary(result: dict[str, Any]) -> str:
    """The table of phases and the checks, as text."""
    phases = result["phases"]
    idle = next((p for p in phases if p["phase"] == "idle"), None)
    base = idle["good"]["p99"] if idle else None
    base_stat = idle["good"]["by_op"]["stat"]["p99"] if idle else None
    header = ("PHASE", "SECS", "GOOD OPS", "ERRORS", "P50 MS", "P99 MS", "P99/IDLE",
              "STAT P99/IDLE", "RSS PEAK MIB", "FDS PEAK", "LOG +KIB", "BACK IN S")
    rows = [header]
    for p in phases:
        g, a = p["good"], p["agent"]
        ratio = _ratio(g["p99"], base)
        stat_ratio = _ratio(g["by_op"]["stat"]["p99"], base_stat)
        rows.append((p["phase"], f"{p['seconds']:.0f}", str(g["ops"]), str(g["errors"]),
                     _ms(g["p50"]), _ms(g["p99"]), "-" if ratio is None else f"{ratio:.2f}",
                     "-" if stat_ratio is None else f"{stat_ratio:.2f}",
                     f"{a['rss_peak_mib']}", str(a["fds_peak"]),
                     f"{(a['log_growth_bytes'] or 0) / KiB:.0f}",
                     f"{p['recovery']['seconds']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    verdict = "PASS" if result["passed"] else "FAIL"
    lines = [f"== hostile soak: {verdict} == agent baseline: {result['baseline_fds']} fds; "
             f"settings {json.dumps(result['settings'])}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    lines.append("attacks:")
    lines += [f"  {p['phase']}: {json.dumps(p['attack'])}" for p in phases if p["attack"]]
    lines.append("checks:")
    for name, c in result["checks"].items():
        detail = ", ".join(f"{k}={v}" for k, v in c.items() if k != "ok")
        lines.append(f"  [{'ok' if c['ok'] else 'FAIL'}] {name}: {detail}")
    return "\n".join(lines)


def run_hostile(config: HostileConfig, out: IO[str] | None = sys.stderr) -> dict[str, Any]:
    """Run every phase of ``config``; the result (phases, checks, ``passed``)."""
    base = Path(config.directory or tempfile.mkdtemp(prefix="pyvirtiofs-hostile-"))
    base.mkdir(parents=True, exist_ok=True)
    run = HostileRun(config, base, out)
    exit_status = None
    started = time.time()
    try:
        run.start()
        for name in config.phases:
            run.phase(name)
            if run.agent is not None and run.agent.proc.poll() is not None:
                run.say(f"the agent exited ({run.agent.proc.returncode}): stopping here")
                break
    finally:
        exit_status = run.stop()
        if not config.keep and config.directory is None:
            shutil.rmtree(base, ignore_errors=True)
    checks = check_bounds(run, exit_status)
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "phase_seconds": config.phase_seconds, "good_interval": config.good_interval,
            "settings": {"agent": AGENT_SETTINGS, "tenants": TENANTS},
            "baseline_fds": run.baseline_fds, "phases": run.phases, "checks": checks,
            "exit_status": exit_status,
            "passed": all(c["ok"] for c in checks.values())}


# ==========================================================================================
# Command line
# ==========================================================================================


def main(argv: Sequence[str] | None = None) -> int:
    """``pyvirtiofs soak --hostile [options]`` (``_good`` is the child it starts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_good"]:
        return _good_child(argv[1:])
    p = argparse.ArgumentParser(prog="pyvirtiofs soak --hostile",
                                description=(__doc__ or "").split("\n\n")[0])
    when = p.add_mutually_exclusive_group()
    when.add_argument("--minutes", type=float,
                      help=f"how long in all, split evenly over the phases (default: "
                           f"{HostileConfig.phase_seconds:g} s a phase)")
    when.add_argument("--seconds", type=float, help="how long in all, in seconds")
    when.add_argument("--phase-seconds", type=float, help="how long each phase runs")
    p.add_argument("--phases", help=f"comma-separated phases to run, in order (default all: "
                                    f"{','.join(PHASES)})")
    p.add_argument("--good-interval", type=float, default=HostileConfig.good_interval,
                   metavar="SECONDS", help="the good tenant starts a round (stat, read, "
                                           "write) this often (default %(default)s)")
    p.add_argument("--dir", help="work here instead of a temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    p.add_argument("--virtiofsd", help="virtiofsd binary")
    p.add_argument("--json", metavar="FILE", help="also write the full result as JSON")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    args = p.parse_args(argv)
    phases = tuple(x for x in (args.phases or "").split(",") if x) or tuple(PHASES)
    total = (args.seconds if args.seconds is not None
             else 60.0 * args.minutes if args.minutes is not None else None)
    phase_seconds = (args.phase_seconds if args.phase_seconds is not None
                     else total / len(phases) if total is not None
                     else HostileConfig.phase_seconds)
    try:
        config = HostileConfig(phase_seconds=phase_seconds, phases=phases,
                               good_interval=args.good_interval, directory=args.dir,
                               keep=args.keep, virtiofsd=args.virtiofsd)
    except ValueError as exc:
        p.error(str(exc))
    try:
        with sigterm_interrupts():  # a killed run still stops its agent and removes its folder
            result = run_hostile(config, out=None if args.quiet else sys.stderr)
    except KeyboardInterrupt:
        return 130
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    print(format_summary(result), flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
