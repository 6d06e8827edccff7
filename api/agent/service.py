"""The multi-tenant agent: one process giving many tenants file access through virtio-fs,
each authenticated, confined to its own share, limited, and isolated from the others.

    pyvirtiofs agent --config agent.toml      # runs until SIGTERM; SIGHUP reloads
    pyvirtiofs status --config agent.toml     # tenants, handles, bytes in flight, rates

:class:`Agent` ties the pieces together (see AGENT.md for the operator's view): one share
per tenant (a folder share gets its own sandboxed virtiofsd whose source is the tenant's
root itself; a socket share attaches to a daemon somebody else runs, and the session's
root confines it); one ROUTER socket (:class:`~pyvirtiofs.api.remote.server.ShareServer`)
with CURVE on every endpoint and ZAP enforced (:mod:`.zap`); confinement at the door
(:mod:`.confine`); limits, fairness and restarts in the server; SIGHUP reload without
touching unchanged tenants, SIGTERM drain and clean stop; a control socket
(``ipc://RUNTIME_DIR/control.sock``, 0600) that answers ``status`` (:mod:`.control`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import queue
import resource
import signal
import threading
import time
from typing import Any

import zmq

from pyvirtiofs.actors.session import SessionConfig
from pyvirtiofs.api.agent.config import AgentConfig, ConfigError, TenantConfig, load_config
from pyvirtiofs.api.agent.control import CONTROL_SOCKET, query_control
from pyvirtiofs.api.agent.logs import log_event, report_suppressed
from pyvirtiofs.api.agent.tenant import AgentTenant
from pyvirtiofs.api.agent.zap import (
    GATE_BURST,
    MONITOR_ENDPOINT,
    MONITOR_EVENTS,
    ZAP_DOMAIN,
    ZapHandler,
)
from pyvirtiofs.api.local import VirtioFS
from pyvirtiofs.api.remote.server import ShareServer
from pyvirtiofs.hw.vhost_user.transport import VhostUserTransport, open_private_device

log = logging.getLogger("pyvirtiofs.agent")



class Agent:
    """Runs the tenants of one config: their shares, the server, ZAP and control sockets.

    ``start()`` brings everything up (or raises, leaving nothing running); ``reload()``
    applies a changed config; ``shutdown()`` drains and stops. ``run()`` does all three
    around a signal loop (SIGHUP reload, SIGTERM/SIGINT stop) and returns the exit code.
    """

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.tenants: dict[str, AgentTenant] = {}
        self._by_key: dict[str, AgentTenant] = {}
        # Two I/O threads: one connection's large replies (encrypted and written by an I/O
        # thread) do not hold up another's.
        self.context: zmq.Context[Any] = zmq.Context(io_threads=config.io_threads)
        self.server: ShareServer | None = None
        self.zap: ZapHandler | None = None
        self._control: threading.Thread | None = None
        self._control_stop = threading.Event()
        # Signals arrive through a SimpleQueue: its put is reentrant, so a handler that
        # interrupts the main thread inside get() cannot deadlock on the queue's lock.
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.started_at = time.time()
        self._lock = threading.Lock()  # one reload/shutdown at a time

    # -- shares --------------------------------------------------------------------------

    def open_share(self, tc: TenantConfig) -> VirtioFS:
        """Start (or attach to) the daemon of a tenant and mount a session on it."""
        if tc.source is not None:
            transport = open_private_device(tc.source, binary=self.config.virtiofsd,
                                            cache=self.config.cache)
            config = SessionConfig()
        elif tc.device is not None:
            from pyvirtiofs.hw.guest import open_device

            transport = open_device(tc.device)
            config = SessionConfig(root=tc.root or None)
        else:
            assert tc.socket is not None
            transport = VhostUserTransport.connect(tc.socket)
            config = SessionConfig(root=tc.root or None)
        try:
            fs = VirtioFS(transport, config)
        except BaseException:
            transport.close()
            raise
        log_event("share_started", tc.id, daemon_pid=fs.daemon_pid,
                  source=tc.source or tc.socket or tc.device, root=tc.root or "/",
                  read_only=tc.read_only)
        return fs

    def _open_tenant(self, tc: TenantConfig) -> AgentTenant:
        return AgentTenant(tc, self.open_share(tc), self.open_share)

    # -- routing -------------------------------------------------------------------------

    def tenant_of(self, identity: bytes, frame: zmq.Frame) -> AgentTenant | None:
        """The tenant whose key authenticated the connection this frame came on."""
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        return self._by_key.get(user)

    def _server_event(self, event: str, tenant: str | None, **fields: Any) -> None:
        level = {"refused": logging.WARNING, "restart": logging.WARNING,
                 "restart_failed": logging.ERROR}.get(event, logging.INFO)
        log_event("request_error" if event == "error" else event, tenant, level=level,
                  **fields)

    def _configure(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_server = True
        sock.curve_publickey = self.config.public_key
        sock.curve_secretkey = self.config.secret_key
        sock.zap_domain = ZAP_DOMAIN
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler: nobody gets in
        sock.setsockopt(zmq.BACKLOG, 128)
        # The connection gate (in the ZAP thread) hears of every connection and its end.
        sock.monitor(MONITOR_ENDPOINT, MONITOR_EVENTS)

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> Agent:
        """Bring up every tenant's share, ZAP, the server and the control socket."""
        cfg = self.config
        for warning in cfg.warnings:
            log_event("config_warning", None, level=logging.WARNING, detail=warning)
        self._prepare_runtime_dir()
        self._reserve_descriptors()
        try:
            for tc in cfg.tenants.values():
                self.tenants[tc.id] = self._open_tenant(tc)
            self._by_key = {t.config.public_key.decode(): t for t in self.tenants.values()}
            self.zap = ZapHandler(self.context, _zap_keys(self.tenants), log_event,
                                  limits=_zap_limits(self.tenants),
                                  max_connections=cfg.max_connections,
                                  max_handshakes=cfg.max_handshakes,
                                  handshake_timeout=cfg.handshake_timeout,
                                  monitor=MONITOR_ENDPOINT).start()
            self.server = ShareServer(
                list(cfg.bind), tenant_of=self.tenant_of, context=self.context,
                heartbeat_timeout=cfg.heartbeat_timeout, configure_socket=self._configure,
                strict_tenants=True, on_event=self._server_event,
                max_bytes_in_flight=cfg.bytes_in_flight, max_clients=cfg.max_connections,
                contended_bulk_rate=cfg.contended_bulk_rate,
                handshake_timeout=cfg.handshake_timeout).start()
            self.zap.endpoints = list(self.server.endpoints)
            self._start_control()
        except BaseException:
            self._stop_everything()
            raise
        log_event("agent_started", None, pid=os.getpid(), endpoints=self.server.endpoints,
                  tenants=sorted(self.tenants), config=cfg.path)
        return self

    def _reserve_descriptors(self) -> None:
        """Make room for every connection the config allows, and keep ``fd_reserve``
        descriptors beyond them for the agent itself; refuse to start otherwise."""
        cfg = self.config
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = (len(os.listdir("/proc/self/fd")) + cfg.fd_reserve + cfg.max_connections
                  + cfg.max_handshakes + GATE_BURST + 64 * len(cfg.tenants))
        if soft != resource.RLIM_INFINITY and soft < needed:
            want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and soft < needed:
            raise OSError(errno.EMFILE, f"the descriptor limit ({soft}) is too low for "
                          f"max_connections {cfg.max_connections} + max_handshakes "
                          f"{cfg.max_handshakes} + fd_reserve {cfg.fd_reserve} and the "
                          f"tenants' daemons ({needed} needed): raise it (ulimit -n) or "
                          "lower max_connections")

    def _prepare_runtime_dir(self) -> None:
        d = self.config.runtime_dir
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.stat(d)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise OSError(errno.EPERM, "runtime_dir must be owned by the agent's user and "
                          "writable by nobody else", d)
        sock = os.path.join(d, CONTROL_SOCKET)
        if os.path.exists(sock):
            try:
                query_control(d, "ping", timeout=1.0)
            except OSError:
                os.unlink(sock)  # left over from an agent that died
            else:
                raise OSError(errno.EADDRINUSE, "another agent is running with this "
                              "runtime_dir", d)

    def _start_control(self) -> None:
        ready = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            sock = self.context.socket(zmq.REP)
            sock.setsockopt(zmq.LINGER, 0)
            path = os.path.join(self.config.runtime_dir, CONTROL_SOCKET)
            old = os.umask(0o077)
            try:
                sock.bind(f"ipc://{path}")
            except BaseException as exc:
                errors.append(exc)
                sock.close(0)
                ready.set()
                return
            finally:
                os.umask(old)
            ready.set()
            try:
                while not self._control_stop.is_set():
                    if not sock.poll(100):
                        continue
                    try:
                        request = json.loads(sock.recv())
                        reply = self._control_command(request.get("command"))
                    except Exception as exc:
                        reply = {"error": f"{type(exc).__name__}: {exc}"}
                    sock.send(json.dumps(reply, default=str).encode())
            finally:
                sock.close(0)
                with contextlib.suppress(OSError):
                    os.unlink(path)

        self._control = threading.Thread(target=serve, name="control", daemon=True)
        self._control.start()
        ready.wait()
        if errors:
            raise errors[0]

    def _control_command(self, command: Any) -> dict[str, Any]:
        if command == "ping":
            return {"pong": os.getpid()}
        if command == "status":
            return self.status()
        if command == "reload":
            self._signals.put(signal.SIGHUP)
            return {"reload": "requested"}
        return {"error": f"unknown command {command!r} (ping, status, reload)"}

    def status(self) -> dict[str, Any]:
        """Everything ``pyvirtiofs status`` shows, as plain data."""
        assert self.server is not None
        tenants = dict(self.tenants)
        stats = self.server.run_in_server(
            lambda: self.server.tenant_snapshot(list(tenants.values())))  # type: ignore[union-attr]
        gate = self.zap.stats() if self.zap is not None else None
        out: dict[str, Any] = {}
        for tid, t in sorted(tenants.items()):
            tc = t.config
            out[tid] = {
                **stats.get(tid, {}),
                "share": tc.share or tc.socket or tc.device, "root": tc.root or "/",
                "daemon_source": tc.source,
                "read_only": tc.read_only, "daemon_pid": t.daemon_pid,
                # (not probed while a restart is closing the old share)
                "alive": not stats.get(tid, {}).get("restarting") and t.alive(),
                "limits": dataclasses.asdict(tc.limits),
                "connections": gate.per_tenant.get(tid, 0) if gate is not None else None,
                **(t.quota.quota.snapshot() if t.quota is not None else {}),
            }
        return {"pid": os.getpid(), "uptime": time.time() - self.started_at,
                "endpoints": self.server.endpoints, "config": self.config.path,
                "requests": self.server.requests_served, "malformed": self.server.malformed,
                "auth": {"accepted": self.zap.accepted if self.zap else 0,
                         "refused": self.zap.refused if self.zap else 0},
                "connections": dataclasses.asdict(gate) if gate is not None else None,
                "bytes_in_flight": self.server.bytes_in_flight,
                "pipeline_bytes": self.server.pipeline_bytes,
                "tenants": out}

    def reload(self) -> bool:
        """Apply the config file as it is now. Tenants whose share is unchanged keep their
        sessions (new limits, mode and key take effect at once); a tenant removed, or whose
        share changed, is disconnected. A bad file changes nothing. True if applied."""
        with self._lock:
            return self._reload()

    def _reload(self) -> bool:
        assert self.server is not None and self.zap is not None
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            log_event("reload_failed", None, level=logging.ERROR, file=exc.file,
                      line=exc.line, reason=exc.reason)
            return False
        old = self.config
        for what in ("bind", "public_key", "runtime_dir"):
            if getattr(new, what) != getattr(old, what):
                log_event("reload_warning", None, level=logging.WARNING,
                          detail=f"{what} changed: restart the agent to apply it")
        for warning in new.warnings:
            log_event("config_warning", None, level=logging.WARNING, detail=warning)
        started: dict[str, AgentTenant] = {}
        usage: dict[str, int | None] = {}
        for tid, tc in new.tenants.items():
            cur = self.tenants.get(tid)
            if cur is not None and cur.config.share_identity() == tc.share_identity():
                if cur.quota is None and tc.limits.max_bytes is not None:
                    usage[tid] = AgentTenant.measure_usage(tc)  # (not in the server thread)
                continue
            try:
                started[tid] = self._open_tenant(tc)
            except Exception as exc:
                log_event("tenant_start_failed", tid, level=logging.ERROR, detail=str(exc))
        retired: list[AgentTenant] = []

        def apply() -> None:  # in the server thread: no request sees a half-applied state
            assert self.server is not None and self.zap is not None
            tenants: dict[str, AgentTenant] = {}
            for tid, cur in self.tenants.items():
                tc = new.tenants.get(tid)
                if tc is None or tid in started:
                    n = self.server.drop_tenant(cur, "tenant removed" if tc is None
                                                else "tenant's share changed")
                    retired.append(cur)
                    log_event("tenant_removed" if tc is None else "tenant_replaced", tid,
                              disconnected=n)
                    continue
                if tc.share_identity() != cur.config.share_identity():
                    tenants[tid] = cur  # its new share failed to start: keep the old one
                    continue
                if tc.public_key != cur.config.public_key:
                    self.server.drop_tenant(cur, "tenant's key changed")
                cur.reconfigure(tc, usage.get(tid))
                tenants[tid] = cur
            for tid, t in started.items():
                tenants[tid] = t
                if tid not in self.tenants:
                    log_event("tenant_added", tid)
            self.tenants = tenants
            self._by_key = {t.config.public_key.decode(): t for t in tenants.values()}
            self.zap.keys = _zap_keys(tenants)
            self.zap.limits = _zap_limits(tenants)

        self.server.run_in_server(apply, timeout=60)
        self.config = dataclasses.replace(new, bind=old.bind, public_key=old.public_key,
                                          secret_key=old.secret_key,
                                          runtime_dir=old.runtime_dir)
        _close_all([t.fs for t in retired])
        log_event("reloaded", None, tenants=sorted(self.tenants))
        return True

    def shutdown(self) -> None:
        """Drain in-flight requests, release every handle, stop every daemon."""
        with self._lock:
            log_event("agent_stopping", None, drain_timeout=self.config.drain_timeout)
            self._stop_everything()
            log_event("agent_stopped", None)

    def _stop_everything(self) -> None:
        if self.server is not None:
            self.server.stop(drain=self.config.drain_timeout)
        _close_all([t.fs for t in self.tenants.values()])
        self._control_stop.set()
        if self._control is not None:
            self._control.join(timeout=5)
        if self.zap is not None:
            self.zap.stop()
        self.context.term()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # The only thing a handler does: SimpleQueue.put is reentrant (a handler may run
        # while the main thread is inside get() on the same queue, and must not wait).
        self._signals.put(signum)

    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT (SIGHUP reloads), stop. Returns 0.

        Signals that arrive together are taken together: any number of SIGHUPs is one
        reload, and a SIGTERM among them wins."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.start()
        while True:
            report_suppressed()
            try:
                signals = [self._signals.get(timeout=0.5)]
            except queue.Empty:
                continue
            while True:
                try:
                    signals.append(self._signals.get_nowait())
                except queue.Empty:
                    break
            stop = next((s for s in signals if s != signal.SIGHUP), None)
            if stop is not None:
                log_event("signal", None, signal=signal.Signals(stop).name,
                          coalesced=len(signals))
                break
            log_event("reload_requested", None, coalesced=len(signals))
            self.reload()
        self.shutdown()
        report_suppressed()
        return 0


def _zap_keys(tenants: dict[str, AgentTenant]) -> dict[bytes, str]:
    return {t.config.public_key: t.config.id for t in tenants.values()}


def _zap_limits(tenants: dict[str, AgentTenant]) -> dict[str, int | None]:
    return {t.config.id: t.config.limits.connections for t in tenants.values()}


def _close_all(shares: list[VirtioFS]) -> None:
    """Close shares in parallel (each releases its handles and stops its daemon)."""
    threads = [threading.Thread(target=_close_quietly, args=(fs,), daemon=True)
               for fs in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)


def _close_quietly(fs: VirtioFS) -> None:
    try:
        fs.close()
    except Exception as exc:
        log_event("close_failed", None, level=logging.WARNING, detail=str(exc))
