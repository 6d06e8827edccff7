"""The agent's control socket, client side: ask a running agent for its status."""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
from typing import Any

import zmq

log = logging.getLogger("pyvirtiofs.agent")

CONTROL_SOCKET = "control.sock"


def query_control(runtime_dir: str, command: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """Send a command (``status``, ``ping``, ``reload``) to a running agent."""
    path = os.path.join(runtime_dir, CONTROL_SOCKET)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no agent is running here (no control socket)",
                                path)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{path}")
        sock.send(json.dumps({"command": command}).encode())
        if not sock.poll(int(timeout * 1000)):
            raise TimeoutError(errno.ETIMEDOUT, "the agent did not answer", path)
        reply = json.loads(sock.recv())
    finally:
        sock.close(0)
        ctx.term()
    if "error" in reply:
        raise OSError(errno.EINVAL, reply["error"])
    return reply


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_status(status: dict[str, Any]) -> str:
    """The status as a table."""
    up = datetime.timedelta(seconds=int(status["uptime"]))
    lines = [f"agent pid {status['pid']}, up {up}, serving {' '.join(status['endpoints'])}",
             f"config {status['config']}; requests {status['requests']}, malformed "
             f"{status['malformed']}; connections accepted {status['auth']['accepted']}, "
             f"refused {status['auth']['refused']}", ""]
    header = ("TENANT", "MODE", "CLIENTS", "HANDLES", "IN-FLIGHT", "BYTES", "REQ/S",
              "REQUESTS", "ERRORS", "REJECTED", "DAEMON", "SHARE")
    rows = [header]
    for tid, t in status["tenants"].items():
        rejected = ",".join(f"{k}:{v}" for k, v in sorted(t.get("rejected", {}).items()))
        device = str(t["share"]).startswith(("pci:", "mmio:"))  # a device of the agent's VM
        daemon = str(t["daemon_pid"] or ("device" if device else "socket"))
        if not t["alive"]:
            daemon += " (dead)"
        elif t.get("restarts"):
            daemon += f" (restarts {t['restarts']})"
        rows.append((tid, "ro" if t["read_only"] else "rw", str(t.get("clients", 0)),
                     f"{t.get('open_handles', 0)}/{t['limits']['open_handles'] or '-'}",
                     str(t.get("requests_in_flight", 0) + t.get("queued", 0)),
                     _human(t.get("bytes_in_flight", 0)), f"{t.get('request_rate', 0):.1f}",
                     str(t.get("requests", 0)), str(t.get("errors", 0)), rejected or "-",
                     daemon, f"{t['share']}" + (f" (root {t['root']})" if t["root"] != "/"
                                                  else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False))
                     + "  " + r[-1])
    return "\n".join(lines)
