"""A live agent to test and load: start a real ``pyvirtiofs agent`` process on a generated
config with real keys, talk to it as tenants and as raw ZeroMQ peers, and wait for things
by polling with deadlines instead of sleeping.

The agent always runs as a subprocess (``pyvirtiofs agent --config …``): its signals,
exit code and file descriptors are the real ones, and its GIL is not the caller's. The
agent tests (``tests/api/agent``) and ``pyvirtiofs soak --hostile`` both drive it through
this module, so what the tests check is what the long run measures.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.utils.monitor

from pyvirtiofs.api.agent import query_control
from pyvirtiofs.api.remote import wire
from pyvirtiofs.api.remote.client import RemoteFS, connect_remote
from pyvirtiofs.api.remote.keys import client_keys, generate
from pyvirtiofs.tools import procfs

__all__ = ["AgentProc", "RawClient", "fd_count", "render_config", "rss_mib", "start_agent",
           "toml_value", "wait_for"]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
              interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def fd_count(pid: int) -> int:
    """Open descriptors of a process that must be alive (the agent, a daemon)."""
    n = procfs.fd_count(pid)
    if n is None:
        raise ProcessLookupError(f"process {pid} is gone")
    return n


def rss_mib(pid: int) -> float:
    """Resident memory of a live ``pid`` (anonymous and shared: guest memory counts)."""
    kib = procfs.status_kib(pid, "VmRSS")
    if kib is None:
        raise ProcessLookupError(f"process {pid} is gone")
    return kib / 1024


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def render_config(agent: dict[str, Any], tenants: dict[str, dict[str, Any]]) -> str:
    lines = ["[agent]"] + [f"{k} = {toml_value(v)}" for k, v in agent.items()]
    for tid, t in tenants.items():
        lines += ["", f"[tenants.{tid}]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in t.items()]
    return "\n".join(lines) + "\n"


@dataclass
class AgentProc:
    """A running agent and the keys of everyone who might talk to it."""

    proc: subprocess.Popen[bytes]
    config_path: Path
    runtime_dir: Path
    keys: Path
    log_path: Path
    agent_settings: dict[str, Any]
    tenants: dict[str, dict[str, Any]]
    endpoint: str = ""
    _clients: list[RemoteFS] = field(default_factory=list)

    # -- talking to it ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return query_control(str(self.runtime_dir), "status", timeout=10)

    def tenant_status(self, tenant: str) -> dict[str, Any]:
        return self.status()["tenants"][tenant]

    def daemon_pid(self, tenant: str) -> int:
        pid = self.tenant_status(tenant)["daemon_pid"]
        assert pid, f"tenant {tenant} has no daemon of its own"
        return int(pid)

    def keypair(self, name: str) -> Any:
        return client_keys(self.keys / f"{name}.key_secret", self.keys / "agent.key")

    def client(self, tenant: str, *, timeout: float = 30.0) -> RemoteFS:
        fs = connect_remote(self.endpoint, curve=self.keypair(tenant), timeout=timeout,
                            heartbeat_interval=0.5)
        self._clients.append(fs)
        return fs

    def raw(self, tenant: str | None, options: dict[int, int] | None = None) -> RawClient:
        return RawClient(self.endpoint, self.keypair(tenant) if tenant else None, options)

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool], what: str,
                 timeout: float = 20.0) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for entry in self.logs():
                if predicate(entry):
                    return entry
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}) while waiting "
                                     f"for {what}:\n{self.log_path.read_text()[-3000:]}")
            return None
        return wait_for(find, timeout, what)  # type: ignore[no-any-return]

    def rewrite_config(self, tenants: dict[str, dict[str, Any]], *,
                       text: str | None = None) -> None:
        """Write a new config file (``text``, or one made of ``tenants``). It replaces the
        old one whole (rename), as an operator's editor would: a reload running meanwhile
        (a SIGHUP storm) reads the old file or the new one, never a half-written one."""
        self.tenants = tenants
        new = self.config_path.with_name(self.config_path.name + ".new")
        new.write_text(text if text is not None else render_config(self.agent_settings, tenants))
        os.replace(new, self.config_path)

    def reload(self) -> None:
        """SIGHUP, then wait for the agent to say how it went."""
        before = len(self.logs())
        self.proc.send_signal(signal.SIGHUP)

        def done() -> bool:
            return any(e.get("event") in ("reloaded", "reload_failed")
                       for e in self.logs()[before:])
        wait_for(done, 30, "the reload to finish")

    # -- stopping it -----------------------------------------------------------------------

    def close_clients(self) -> None:
        for fs in self._clients:
            with contextlib.suppress(Exception):
                fs.close()
        self._clients.clear()

    def terminate(self, timeout: float = 60.0) -> int:
        self.close_clients()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the agent did not stop within "
                                 f"{timeout:g} s of SIGTERM") from None


def start_agent(base: Path, tenants: dict[str, dict[str, Any]], *,
                extra_keys: tuple[str, ...] = ("eve",), settings: dict[str, Any] | None = None,
                timeout: float = 60.0, cwd: str | Path | None = None) -> AgentProc:
    """Write keys and a config under ``base`` and start an agent on a free port.

    ``tenants`` maps ids to their TOML settings without ``public_key`` (added: each
    tenant gets a key pair named after it); ``extra_keys`` are key pairs nobody knows.
    ``cwd``: the agent's working directory (the tests run it in the repository)."""
    keys = base / "keys"
    for name in ("agent", *tenants, *extra_keys):
        if not (keys / f"{name}.key").exists():
            generate(keys, name)
    with_keys = {tid: {"public_key": str(keys / f"{tid}.key"), **t} for tid, t in tenants.items()}
    runtime = base / "run"
    agent = {"bind": "tcp://127.0.0.1:*", "key_file": str(keys / "agent.key_secret"),
             "runtime_dir": str(runtime), "heartbeat_timeout": 1.5, "drain_timeout": 20,
             **(settings or {})}
    config = base / "agent.toml"
    config.write_text(render_config(agent, with_keys))
    log_path = base / "agent.log"
    log_file = open(log_path, "wb")  # the child keeps writing to it
    proc = subprocess.Popen([sys.executable, "-m", "pyvirtiofs", "agent", "--config", str(config)],
                            stdout=log_file, stderr=subprocess.STDOUT, cwd=cwd)
    log_file.close()
    ap = AgentProc(proc, config, runtime, keys, log_path, agent, with_keys)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"agent exited with {proc.returncode}:\n"
                                 f"{log_path.read_text()[-4000:]}")
        try:
            ap.endpoint = query_control(str(runtime), "status", timeout=2)["endpoints"][0]
        except OSError:
            return False
        return True

    try:
        wait_for(up, timeout, "the agent to start")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    return ap


# -- a raw peer: any frames, pipelined, with CURVE or without ------------------------------


class RawClient:
    """A DEALER socket that sends exactly what it is told (for hostile and pipelined
    requests) and watches its own handshake through a socket monitor."""

    def __init__(self, endpoint: str, curve: Any = None,
                 options: dict[int, int] | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, os.urandom(16))
        for option, value in (options or {}).items():
            self.sock.setsockopt(option, value)
        if curve is not None:
            self.sock.curve_publickey = curve.public
            self.sock.curve_secretkey = curve.secret
            self.sock.curve_serverkey = curve.server_public
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED
                                                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.sock.connect(endpoint)
        self.ids = itertools.count(1)

    def handshake(self, timeout: float = 10.0) -> int:
        """The first handshake event (zmq.EVENT_HANDSHAKE_*)."""
        if not self.monitor.poll(int(timeout * 1000)):
            raise AssertionError("no handshake event")
        event = zmq.utils.monitor.recv_monitor_message(self.monitor)
        return int(event["event"])

    def send(self, op: Any, handle: int = 0, data: bytes | None = None) -> int:
        rid = next(self.ids)
        frames = [wire.encode_request(rid, op, handle)]
        if data is not None:
            frames.append(data)
        self.sock.send_multipart(frames)
        return rid

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def refused(self, op: Any) -> bool:
        """True when ``op`` gets no answer: it cannot even be queued (no connection
        completed its handshake), or nothing replies within a moment."""
        try:
            self.sock.send(wire.encode_request(next(self.ids), op), zmq.NOBLOCK)
        except zmq.Again:
            return True
        return not self.sock.poll(300)

    def recv(self, timeout: float = 30.0) -> tuple[wire.ReplyHeader, list[zmq.Frame]]:
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(f"no reply within {timeout:g} s")
        frames = self.sock.recv_multipart(copy=False)
        return wire.decode_reply(frames[0].buffer), frames[1:]

    def call(self, op: Any, handle: int = 0, data: bytes | None = None,
             timeout: float = 30.0) -> wire.ReplyHeader:
        rid = self.send(op, handle, data)
        while True:
            header, _ = self.recv(timeout)
            if header.id == rid:
                return header

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

