"""The multi-tenant agent: one process giving many tenants file access through virtio-fs,
each authenticated, confined to its own share, limited, and isolated from the others.

    pyvirtiofs agent --config agent.toml      # runs until SIGTERM; SIGHUP reloads
    pyvirtiofs status --config agent.toml     # tenants, handles, bytes in flight, rates

Shape (see AGENT.md for the operator's view):

* **Config** (:func:`load_config`): TOML read with :mod:`tomllib`. Every error — syntax or
  meaning — is reported as ``FILE:LINE: reason`` (:class:`ConfigError`) and the agent
  refuses to start; a bad file on SIGHUP is logged and the running config kept.
* **One share per tenant**: a folder share gets its own sandboxed virtiofsd whose source
  is the tenant's root itself, so the daemon's own sandbox (mount namespace, or chroot)
  already ends at the root; a socket share attaches to a daemon somebody else runs, and
  the session's root (:class:`actors.session.SessionConfig`) confines it.
* **Authentication**: one ROUTER socket (:class:`api.server.ShareServer`) with CURVE on
  every endpoint and ZAP enforced; :class:`ZapHandler` accepts only tenants' public keys
  and names the key as the connection's User-Id, which picks the tenant for every message
  (``strict_tenants``). Unknown keys fail the handshake: no request is ever seen.
* **Confinement at the door** (:func:`confine`): each request is checked before it reaches
  the tenant's actors — path and name limits with Linux's errnos, ``EROFS`` for every
  modifying call of a read-only tenant, no device nodes, no set-id bits, no ``chown`` to
  another owner, only ``user.`` xattrs writable, and the tenant's credentials forced.
* **Limits, fairness, restarts, counters**: in the server, per tenant (TenantLimits).
* **Lifecycle**: :class:`Agent` — start, SIGHUP reload without touching unchanged tenants,
  SIGTERM drain and clean stop; a control socket (``ipc://RUNTIME_DIR/control.sock``,
  0600) answers ``status``; structured logs (JSON lines) with the tenant id.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import json
import logging
import os
import queue
import re
import signal
import stat as stat_mod
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
from zmq.utils import z85

from actors.session import SessionConfig
from api import keys as keymod
from api.local import VirtioFS
from api.process import tune_malloc_for_servers
from api.server import ShareServer, Tenant, TenantLimits
from codec import messages as m
from hw.transport import VhostUserTransport, open_private_device

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentTenant",
    "ConfigError",
    "LimitsConfig",
    "TenantConfig",
    "ZapHandler",
    "add_agent_parser",
    "add_status_parser",
    "confine",
    "load_config",
    "main",
    "query_control",
]

log = logging.getLogger("pyvirtiofs.agent")

PATH_MAX = 4096  # bytes including the terminating NUL: a path of 4096 bytes is too long
NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"pyvirtiofs"
CONTROL_SOCKET = "control.sock"
REFUSAL_LOG_INTERVAL = 60.0  # seconds between log lines about the same refused peer
_TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


# ==========================================================================================
# Configuration
# ==========================================================================================


class ConfigError(ValueError):
    """A config file that cannot be used: where (file, line) and why."""

    def __init__(self, file: str, line: int | None, reason: str) -> None:
        self.file = file
        self.line = line
        self.reason = reason
        super().__init__(f"{file}:{line}: {reason}" if line else f"{file}: {reason}")


@dataclass(frozen=True)
class LimitsConfig:
    """A tenant's limits as configured (None: unlimited). See AGENT.md."""

    open_handles: int | None = 1024
    bytes_in_flight: int | None = 256 << 20
    requests_per_second: float | None = None
    requests_in_flight: int | None = 64

    def to_server(self) -> TenantLimits:
        return TenantLimits(open_handles=self.open_handles,
                            bytes_in_flight=self.bytes_in_flight,
                            requests_per_second=self.requests_per_second,
                            requests_in_flight=self.requests_in_flight)


@dataclass(frozen=True)
class TenantConfig:
    """One tenant. ``source`` is what its private virtiofsd serves (the share's folder
    joined with ``root``, symlinks resolved); a socket share has ``source`` None and the
    session confines it to ``root`` instead."""

    id: str
    public_key: bytes
    share: str | None
    socket: str | None
    root: str
    read_only: bool
    uid: int
    gid: int
    limits: LimitsConfig
    source: str | None = None
    line: int | None = None

    def share_identity(self) -> tuple[Any, ...]:
        """What a running share depends on: a change needs a new daemon/session."""
        return (self.share, self.socket, self.root, self.source)


@dataclass(frozen=True)
class AgentConfig:
    """The whole file: the agent's own settings and its tenants."""

    path: str
    bind: tuple[str, ...]
    public_key: bytes
    secret_key: bytes
    runtime_dir: str
    heartbeat_timeout: float = 10.0
    drain_timeout: float = 10.0
    virtiofsd: str | None = None
    cache: str = "auto"
    log_format: str = "json"
    log_level: str = "info"
    tenants: dict[str, TenantConfig] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


_AGENT_KEYS = {"bind", "key_file", "runtime_dir", "heartbeat_timeout", "drain_timeout",
               "virtiofsd", "cache", "log_format", "log_level"}
_TENANT_KEYS = {"public_key", "share", "socket", "root", "read_only", "uid", "gid", "limits"}
_LIMIT_KEYS = {f.name for f in dataclasses.fields(LimitsConfig)}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*\Z", re.IGNORECASE)


def _split_key(text: str) -> list[str]:
    """A TOML dotted key (bare or quoted parts) as its parts."""
    parts: list[str] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            break
        if text[i] in "\"'":
            quote = text[i]
            j = i + 1
            buf = []
            while j < n and text[j] != quote:
                if quote == '"' and text[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(text[j])
                j += 1
            parts.append("".join(buf))
            i = j + 1
        else:
            j = i
            while j < n and text[j] not in ". \t":
                j += 1
            parts.append(text[i:j])
            i = j
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == ".":
            i += 1
    return parts


def _key_end(line: str) -> int:
    """Index of the ``=`` that ends a key (outside quotes), or -1."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "=":
            return i
        elif ch == "#":
            return -1
    return -1


class _Locator:
    """Line numbers of the tables and keys of a TOML text, for error messages.

    tomllib keeps no positions, so this small scanner finds where each key path is
    written; a key inside an inline table maps to the line of that table."""

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        closing = ""
        for lineno, raw in enumerate(text.splitlines(), 1):
            if closing:
                if closing in raw:
                    closing = ""
                continue
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                inner = line.lstrip("[")
                end = inner.find("]")
                table = tuple(_split_key(inner[:end] if end >= 0 else inner))
                self.lines.setdefault(table, lineno)
                continue
            eq = _key_end(line)
            if eq < 0:
                continue
            path = table + tuple(_split_key(line[:eq]))
            self.lines.setdefault(path, lineno)
            value = line[eq + 1:]
            for delim in ('"""', "'''"):
                if value.count(delim) % 2 == 1:
                    closing = delim

    def line(self, *path: str) -> int | None:
        """The line of ``path`` (or of its nearest enclosing key or table)."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return None


class _Checker:
    """Reads values out of the parsed TOML, raising ConfigError at the right line."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))
        self.where = _Locator(text)

    def fail(self, reason: str, *key: str) -> ConfigError:
        return ConfigError(self.path, self.where.line(*key), reason)

    def table(self, doc: dict[str, Any], *key: str) -> dict[str, Any]:
        value: Any = doc
        for k in key:
            value = value.get(k, {}) if isinstance(value, dict) else value
        if not isinstance(value, dict):
            raise self.fail(f"[{'.'.join(key)}] must be a table", *key)
        return value

    def known(self, table: dict[str, Any], allowed: set[str], *key: str) -> None:
        for name in table:
            if name not in allowed:
                where = f"[{'.'.join(key)}]" if key else "the top level"
                raise self.fail(f"unknown key {name!r} in {where} (expected one of: "
                                f"{', '.join(sorted(allowed))})", *key, name)

    def typed(self, value: Any, kind: type | tuple[type, ...], what: str, *key: str) -> Any:
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(f"{what} must be {_kind_name(kind)}, not a boolean", *key)
        if not isinstance(value, kind):
            raise self.fail(f"{what} must be {_kind_name(kind)}, not {type(value).__name__}",
                            *key)
        return value

    def abspath(self, value: str) -> str:
        return os.path.normpath(os.path.join(self.base, os.path.expanduser(value)))


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as ``"64MiB"``, ``"1.5 GB"`` (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (use bytes, or e.g. \"64MiB\")")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * (1 << (10 * " KMGT".index(unit or " "))))


def default_runtime_dir() -> str:
    """Where the control socket lives unless the config says otherwise."""
    if os.geteuid() == 0:
        return "/run/pyvirtiofs-agent"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "pyvirtiofs-agent")
    return f"/tmp/pyvirtiofs-agent-{os.geteuid()}"


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and check an agent config; raises :class:`ConfigError` (file, line, reason).

    Relative paths in the file are relative to the file's directory."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read the config: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(path, line, "the file is not UTF-8") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        found = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        if found:
            line = int(found.group(1))
            reason = f"TOML syntax: {msg[:found.start()].strip()} (column {found.group(2)})"
        else:
            line = text.count("\n") + 1
            reason = f"TOML syntax: {re.sub(r' [(]at end of document[)]', '', msg)}"
        raise ConfigError(path, line, reason) from None
    c = _Checker(path, text)
    c.known(doc, {"agent", "limits", "tenants"})
    agent = c.table(doc, "agent")
    c.known(agent, _AGENT_KEYS, "agent")
    warnings: list[str] = []

    bind_value = agent.get("bind")
    if bind_value is None:
        raise c.fail("[agent] needs bind = \"tcp://HOST:PORT\" (or a list of endpoints)",
                     "agent")
    binds = [bind_value] if isinstance(bind_value, str) else bind_value
    c.typed(binds, list, "bind", "agent", "bind")
    if not binds:
        raise c.fail("bind lists no endpoint", "agent", "bind")
    for b in binds:
        c.typed(b, str, "each bind endpoint", "agent", "bind")
        if not b.startswith(("tcp://", "ipc://")):
            raise c.fail(f"bind endpoint {b!r} must be tcp://HOST:PORT or ipc://PATH",
                         "agent", "bind")

    key_file = agent.get("key_file")
    if key_file is None:
        raise c.fail("[agent] needs key_file = \"agent.key_secret\" (CURVE is required on "
                     "every endpoint; make one with: pyvirtiofs keygen agent)", "agent")
    c.typed(key_file, str, "key_file", "agent", "key_file")
    key_path = c.abspath(key_file)
    try:
        public, secret = keymod.load_secret(key_path)
    except (OSError, ValueError) as exc:
        raise c.fail(f"key_file {key_path}: {exc}", "agent", "key_file") from None
    with contextlib.suppress(OSError):
        if os.stat(key_path).st_mode & 0o077:
            warnings.append(f"{key_path} can be read by other users (chmod 600 it)")

    runtime_dir = agent.get("runtime_dir")
    runtime = (c.abspath(c.typed(runtime_dir, str, "runtime_dir", "agent", "runtime_dir"))
               if runtime_dir is not None else default_runtime_dir())

    def number(key: str, default: float, *, zero_ok: bool = False) -> float:
        value = agent.get(key, default)
        c.typed(value, (int, float), key, "agent", key)
        if value < 0 or (value == 0 and not zero_ok):
            raise c.fail(f"{key} must be {'0 or more' if zero_ok else 'positive'}",
                         "agent", key)
        return float(value)

    virtiofsd = agent.get("virtiofsd")
    if virtiofsd is not None:
        c.typed(virtiofsd, str, "virtiofsd", "agent", "virtiofsd")
        virtiofsd = c.abspath(virtiofsd)
        if not (os.path.isfile(virtiofsd) and os.access(virtiofsd, os.X_OK)):
            raise c.fail(f"virtiofsd {virtiofsd} is not an executable file",
                         "agent", "virtiofsd")
    cache = agent.get("cache", "auto")
    if cache not in ("auto", "always", "none", "never", "metadata"):
        raise c.fail(f"cache must be auto, always, none or metadata, not {cache!r}",
                     "agent", "cache")
    log_format = agent.get("log_format", "json")
    if log_format not in ("json", "text"):
        raise c.fail("log_format must be \"json\" or \"text\"", "agent", "log_format")
    log_level = agent.get("log_level", "info")
    if log_level not in ("debug", "info", "warning", "error"):
        raise c.fail("log_level must be debug, info, warning or error", "agent", "log_level")

    defaults = _limits(c, c.table(doc, "limits"), LimitsConfig(), "limits")
    tenants_table = c.table(doc, "tenants")
    tenants: dict[str, TenantConfig] = {}
    seen_keys: dict[bytes, str] = {}
    for tid in tenants_table:
        tc = _tenant(c, tid, c.table(doc, "tenants", tid), defaults)
        if tc.public_key in seen_keys:
            raise c.fail(f"tenant {tid!r} has the same public key as tenant "
                         f"{seen_keys[tc.public_key]!r}: each tenant needs its own key",
                         "tenants", tid, "public_key")
        if tc.public_key == public:
            raise c.fail(f"tenant {tid!r} uses the agent's own key", "tenants", tid,
                         "public_key")
        seen_keys[tc.public_key] = tid
        tenants[tid] = tc
    if not tenants:
        warnings.append("no tenants are configured: nobody can connect")
    for a in tenants.values():
        for b in tenants.values():
            if a.id < b.id and a.source and b.source and _overlap(a.source, b.source):
                warnings.append(f"tenants {a.id!r} and {b.id!r} share files "
                                f"({a.source} and {b.source} overlap)")
    return AgentConfig(
        path=os.path.abspath(path), bind=tuple(binds), public_key=public, secret_key=secret,
        runtime_dir=runtime, heartbeat_timeout=number("heartbeat_timeout", 10.0),
        drain_timeout=number("drain_timeout", 10.0, zero_ok=True), virtiofsd=virtiofsd,
        cache=cache, log_format=log_format, log_level=log_level, tenants=tenants,
        warnings=tuple(warnings))


def _overlap(a: str, b: str) -> bool:
    return os.path.commonpath([a, b]) in (a, b)


def _limits(c: _Checker, table: dict[str, Any], base: LimitsConfig,
            *key: str) -> LimitsConfig:
    c.known(table, _LIMIT_KEYS, *key)
    values: dict[str, Any] = {}
    for name, value in table.items():
        where = (*key, name)
        if name == "bytes_in_flight":
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise c.fail("bytes_in_flight must be a number of bytes or a size such as "
                             "\"64MiB\"", *where)
            try:
                value = parse_size(value)
            except ValueError as exc:
                raise c.fail(str(exc), *where) from None
        elif name == "requests_per_second":
            c.typed(value, (int, float), name, *where)
            value = float(value)
        else:
            c.typed(value, int, name, *where)
        if value <= 0:
            raise c.fail(f"{name} must be positive (leave it out for no limit)", *where)
        values[name] = value
    return dataclasses.replace(base, **values)


def _tenant(c: _Checker, tid: str, table: dict[str, Any],
            defaults: LimitsConfig) -> TenantConfig:
    key = ("tenants", tid)
    if not _TENANT_ID.match(tid):
        raise c.fail(f"tenant id {tid!r}: use 1-64 letters, digits, '_', '.' or '-'", *key)
    c.known(table, _TENANT_KEYS, *key)
    pk = table.get("public_key")
    if pk is None:
        raise c.fail(f"tenant {tid!r} needs public_key (Z85 text, or the path of its "
                     ".key file)", *key)
    c.typed(pk, str, "public_key", *key, "public_key")
    if keymod.is_z85_key(pk):
        public = pk.encode()
    else:
        try:
            public = keymod.load_public(c.abspath(pk))
        except (OSError, ValueError) as exc:
            raise c.fail(f"public_key is neither a 40-character Z85 key nor a readable key "
                         f"file: {exc}", *key, "public_key") from None
    share, sock = table.get("share"), table.get("socket")
    if (share is None) == (sock is None):
        raise c.fail(f"tenant {tid!r} needs exactly one of share = \"FOLDER\" (the agent "
                     "starts a virtiofsd on it) or socket = \"PATH\" (a running daemon)", *key)
    root = table.get("root", "")
    c.typed(root, str, "root", *key, "root")
    parts = [p for p in root.split("/") if p and p != "."]
    if root.startswith("/") or ".." in parts or "\0" in root:
        raise c.fail("root must be a relative path inside the share, without '..'",
                     *key, "root")
    root = "/".join(parts)
    source: str | None = None
    if share is not None:
        c.typed(share, str, "share", *key, "share")
        share = os.path.realpath(c.abspath(share))
        if not os.path.isdir(share):
            raise c.fail(f"share {share} is not a directory", *key, "share")
        source = os.path.realpath(os.path.join(share, root))
        if os.path.commonpath([share, source]) != share:
            raise c.fail(f"root {root!r} leads outside the share (through a symlink) to "
                         f"{source}", *key, "root")
        if not os.path.isdir(source):
            raise c.fail(f"root {root!r} is not a directory in {share}", *key, "root")
    else:
        c.typed(sock, str, "socket", *key, "socket")
        sock = c.abspath(sock)
        try:
            is_socket = stat_mod.S_ISSOCK(os.stat(sock).st_mode)
        except OSError as exc:
            raise c.fail(f"socket {sock}: {exc.strerror}", *key, "socket") from None
        if not is_socket:
            raise c.fail(f"{sock} is not a Unix socket", *key, "socket")
    read_only = table.get("read_only", False)
    c.typed(read_only, bool, "read_only", *key, "read_only")
    owner = os.stat(source) if source else None
    uid = table.get("uid", owner.st_uid if owner else os.geteuid())
    gid = table.get("gid", owner.st_gid if owner else os.getegid())
    for name, value in (("uid", uid), ("gid", gid)):
        c.typed(value, int, name, *key, name)
        if not 0 <= value < (1 << 32) - 1:
            raise c.fail(f"{name} out of range", *key, name)
    limits_table = table.get("limits", {})
    if not isinstance(limits_table, dict):
        raise c.fail("limits must be a table", *key, "limits")
    limits = _limits(c, limits_table, defaults, *key, "limits")
    return TenantConfig(id=tid, public_key=public, share=share, socket=sock, root=root,
                        read_only=read_only, uid=uid, gid=gid, limits=limits, source=source,
                        line=c.where.line(*key))


# ==========================================================================================
# Confinement: what a tenant may ask
# ==========================================================================================

_MODIFYING = (m.MakeDir, m.MakeNode, m.Unlink, m.RemoveDir, m.Rename, m.Link, m.Symlink,
              m.SetAttr, m.SetXattr, m.RemoveXattr, m.Write, m.FTruncate, m.FAllocate)
_XATTR_OPS = (m.GetXattr, m.SetXattr, m.RemoveXattr)
_OPEN_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
_OPEN_ALLOWED = (os.O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND
                 | os.O_NONBLOCK | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_SYNC
                 | os.O_DSYNC | os.O_NOATIME | os.O_NOCTTY | os.O_LARGEFILE | os.O_DIRECT)
_O_PATH = getattr(os, "O_PATH", 0o10000000)
_O_TMPFILE = getattr(os, "O_TMPFILE", 0o20000000 | os.O_DIRECTORY)
_SETID = stat_mod.S_ISUID | stat_mod.S_ISGID
_ALLOWED_NODES = (stat_mod.S_IFREG, stat_mod.S_IFIFO, stat_mod.S_IFSOCK, 0)


def _oserror(code: int, detail: str | None = None, path: Any = None) -> OSError:
    return OSError(code, detail or os.strerror(code), path)


def check_path(path: Any) -> bytes:
    """A path as Linux's path walk would judge it, before anything is looked up."""
    p = os.fsencode(path) if isinstance(path, str) else path
    if not isinstance(p, bytes):
        raise _oserror(errno.EINVAL, "a path must be bytes")
    if b"\0" in p:
        raise _oserror(errno.EINVAL, "embedded null byte in a path", p)
    if not p:
        raise _oserror(errno.ENOENT, "empty path", p)
    if len(p) >= PATH_MAX:
        raise _oserror(errno.ENAMETOOLONG, "path longer than 4095 bytes", p[:64] + b"...")
    if any(len(c) > NAME_MAX for c in p.split(b"/")):
        raise _oserror(errno.ENAMETOOLONG, "name longer than 255 bytes", p[:64] + b"...")
    return p


_MODE_FIELDS = ("mode", "umask", "rdev")  # 32-bit unsigned in every FUSE request


def _check_ints(op: Any) -> None:
    for name in _MODE_FIELDS:
        value = getattr(op, name, None)
        if value is not None and not 0 <= value <= 0xFFFFFFFF:
            raise _oserror(errno.EINVAL, f"{name} out of range", getattr(op, "path", None))
    flags = getattr(op, "flags", None)
    if flags is not None and not 0 <= flags <= 0xFFFFFFFF:
        raise _oserror(errno.EINVAL, "flags out of range", getattr(op, "path", None))


def confine(tc: TenantConfig, op: Any) -> Any:
    """``op`` as a tenant may have it executed, or OSError with Linux's errno.

    The paths themselves are resolved by the tenant's session, inside its root (``..``
    stops at the root, symlinks are followed by the session, never by the daemon, and
    absolute targets start at the root); this adds what a kernel would check first, and
    the privileges a tenant never has."""
    for name in ("path", "src", "dst"):
        value = getattr(op, name, None)
        if value is not None:
            check_path(value)
    _check_ints(op)
    if isinstance(op, m.Symlink):
        target = op.target
        if not isinstance(target, bytes) or b"\0" in target:
            raise _oserror(errno.EINVAL, "bad symlink target")
        if not target:
            raise _oserror(errno.ENOENT, "empty symlink target")
        if len(target) >= PATH_MAX:
            raise _oserror(errno.ENAMETOOLONG, "symlink target too long")
    if isinstance(op, _XATTR_OPS):
        xname = op.name if isinstance(op.name, bytes) else os.fsencode(op.name)
        if b"\0" in xname:
            raise _oserror(errno.EINVAL, "embedded null byte in an attribute name")
        if not xname or len(xname) > XATTR_NAME_MAX:
            raise _oserror(errno.ERANGE, "attribute name empty or longer than 255 bytes")
    if tc.read_only:
        if (isinstance(op, _MODIFYING)
                or (isinstance(op, m.Open) and op.flags & _OPEN_WRITE)
                or (isinstance(op, m.Access) and op.mode & os.W_OK)):
            raise _oserror(errno.EROFS, "read-only share", getattr(op, "path", None))
    if isinstance(op, m.Open):
        flags = op.flags
        if flags & _O_PATH or (flags & _O_TMPFILE) == _O_TMPFILE:
            raise _oserror(errno.EINVAL, "O_PATH and O_TMPFILE are not supported", op.path)
        if flags & os.O_ACCMODE == os.O_ACCMODE:
            raise _oserror(errno.EINVAL, "invalid access mode", op.path)
        return msgspec.structs.replace(op, flags=flags & _OPEN_ALLOWED,
                                       mode=op.mode & 0o777 & ~_SETID)
    if isinstance(op, m.MakeDir):
        return msgspec.structs.replace(op, mode=op.mode & 0o3777 & ~stat_mod.S_ISUID)
    if isinstance(op, m.MakeNode):
        if stat_mod.S_IFMT(op.mode) not in _ALLOWED_NODES:
            raise _oserror(errno.EPERM, "device nodes cannot be made", op.path)
        return msgspec.structs.replace(op, mode=op.mode & ~_SETID, rdev=0)
    if isinstance(op, m.SetAttr):
        if op.mode is not None and op.mode & _SETID:
            raise _oserror(errno.EPERM, "set-user-ID and set-group-ID bits are not allowed",
                           op.path)
        if op.uid not in (None, -1, tc.uid) or op.gid not in (None, -1, tc.gid):
            raise _oserror(errno.EPERM, "files cannot be given to another owner", op.path)
    elif isinstance(op, (m.SetXattr, m.RemoveXattr)):
        if not op.name.startswith(b"user."):
            raise _oserror(errno.EPERM, "only user.* attributes can be changed", op.path)
        if isinstance(op, m.SetXattr) and len(op.value) > XATTR_SIZE_MAX:
            raise _oserror(errno.E2BIG, "attribute value larger than 64 KiB", op.path)
    elif isinstance(op, m.GetXattr) and op.name.startswith(b"trusted."):
        raise _oserror(errno.ENODATA, "no such attribute", op.path)
    elif isinstance(op, m.Rename) and op.flags & ~3:
        raise _oserror(errno.EINVAL, "unsupported rename flags", op.src)
    return op


# ==========================================================================================
# Tenants
# ==========================================================================================


class AgentTenant(Tenant):
    """A configured tenant: its share, its confinement, and how to restart its share."""

    def __init__(self, config: TenantConfig, fs: VirtioFS,
                 opener: Callable[[TenantConfig], VirtioFS]) -> None:
        super().__init__(config.id, fs, trust_client_credentials=False,
                         credentials=(config.uid, config.gid, os.getpid()),
                         limits=config.limits.to_server())
        self.config = config
        self._opener = opener

    __hash__ = object.__hash__  # tenants are identities, not values
    __eq__ = object.__eq__

    def reconfigure(self, config: TenantConfig) -> None:
        """New settings that keep the share (mode, owner, limits, key): server thread."""
        self.config = config
        self.credentials = (config.uid, config.gid, os.getpid())
        self.limits = config.limits.to_server()

    def admit(self, op: Any) -> Any:
        op = confine(self.config, op)
        return msgspec.structs.replace(op, ctx=self.credentials)

    def alive(self) -> bool:
        fs = self.fs
        transport = fs.transport
        daemon = getattr(transport, "daemon", None)
        # Either shows a death first: the connection's EOF (once the worker and, with the
        # namespace sandbox, its parent — which holds a copy of the connection — are
        # gone) or the exit of the process we started.
        up = transport.alive() and (daemon is None or daemon.alive())
        return bool(up) and fs.session.is_alive()

    def restart(self) -> VirtioFS:
        old = self.fs
        with contextlib.suppress(Exception):
            old.close()
        return self._opener(self.config)

    @property
    def daemon_pid(self) -> int | None:
        return self.fs.daemon_pid


# ==========================================================================================
# ZAP: who may connect
# ==========================================================================================


class ZapHandler:
    """A ZAP (RFC 27) handler thread: accepts CURVE clients whose public key belongs to a
    tenant, refuses everyone else. The User-Id of an accepted connection is the client's
    Z85 public key, which :meth:`Agent.tenant_of` maps to the tenant for every message.

    ``keys`` (Z85 bytes → tenant id) may be replaced at any time (reload)."""

    def __init__(self, context: zmq.Context[Any], keys: dict[bytes, str],
                 event: Callable[..., None]) -> None:
        self.context = context
        self.keys = keys
        self.event = event
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="zap", daemon=True)
        self.accepted = 0
        self.refused = 0
        self._refusals: dict[tuple[str, str, str | None], tuple[float, int]] = {}

    def start(self) -> ZapHandler:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            sock = self.context.socket(zmq.REP)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(ZAP_ENDPOINT)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                request = sock.recv_multipart()
                try:
                    answer = self._answer(request)
                except Exception as exc:  # refuse, and keep answering
                    log.exception("ZAP handler failed")
                    self.refused += 1
                    answer = [b"1.0", request[1] if len(request) > 1 else b"", b"500",
                              f"internal error: {type(exc).__name__}".encode(), b"", b""]
                sock.send_multipart(answer)
        finally:
            sock.close(0)

    def _refuse(self, address: str, reason: str, key: str | None = None) -> None:
        """Count a refusal; log it the first time, then once a minute per peer and key
        (a refused client reconnects ten times a second)."""
        self.refused += 1
        what = (address, reason, key)
        now = time.monotonic()
        seen = self._refusals.get(what)
        if seen is not None and now - seen[0] < REFUSAL_LOG_INTERVAL:
            self._refusals[what] = (seen[0], seen[1] + 1)
            return
        if len(self._refusals) >= 4096:
            self._refusals.clear()
        self._refusals[what] = (now, 0)
        fields: dict[str, Any] = {"address": address, "reason": reason}
        if key is not None:
            fields["key"] = key
        if seen is not None:
            fields["repeated"] = seen[1]
        self.event("auth_refused", None, level=logging.WARNING, **fields)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:
            self.refused += 1
            return [b"1.0", request[1] if len(request) > 1 else b"", b"400",
                    b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = request[:6]
        creds = request[6:]
        address_text = address.decode(errors="replace")
        if version != b"1.0" or mechanism != b"CURVE" or len(creds) != 1 or len(creds[0]) != 32:
            self._refuse(address_text, f"mechanism {mechanism.decode(errors='replace')} "
                                       "not allowed")
            return [b"1.0", request_id, b"400", b"CURVE required", b"", b""]
        key = z85.encode(creds[0])
        tenant = self.keys.get(key)
        if tenant is None:
            self._refuse(address_text, "unknown key", key.decode()[:12] + "...")
            return [b"1.0", request_id, b"400", b"unknown key", b"", b""]
        self.accepted += 1
        self.event("authenticated", tenant, address=address_text)
        return [b"1.0", request_id, b"200", b"OK", key, b""]


# ==========================================================================================
# Logging
# ==========================================================================================


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, tenant, and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "tenant": getattr(record, "tenant", None),
        }
        fields = getattr(record, "fields", None)
        if fields is not None:
            out.update(fields)
        else:
            out["logger"] = record.name
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _TextFormatter(logging.Formatter):
    """``TIME LEVEL EVENT tenant=ID key=value ...`` (logfmt-like)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        fields = getattr(record, "fields", None)
        if fields is None:
            text = f"{ts} {record.levelname.lower()} {record.name}: {record.getMessage()}"
        else:
            pairs = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())
            tenant = getattr(record, "tenant", None)
            text = (f"{ts} {record.levelname.lower()} {getattr(record, 'event', 'log')}"
                    f"{f' tenant={tenant}' if tenant else ''} {pairs}").rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(fmt: str = "json", level: str = "info", stream: Any = None) -> None:
    """Route every logger of the process through one structured handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    logging.getLogger("pykka").setLevel(max(logging.WARNING, root.level))


def log_event(event: str, tenant: str | None, *, level: int = logging.INFO,
              **fields: Any) -> None:
    """One structured log line."""
    log.log(level, "%s", event, extra={"event": event, "tenant": tenant, "fields": fields})


# ==========================================================================================
# The agent
# ==========================================================================================


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
        self.context: zmq.Context[Any] = zmq.Context()
        self.server: ShareServer | None = None
        self.zap: ZapHandler | None = None
        self._control: threading.Thread | None = None
        self._control_stop = threading.Event()
        self._signals: queue.Queue[int] = queue.Queue()
        self.started_at = time.time()
        self._lock = threading.Lock()  # one reload/shutdown at a time

    # -- shares --------------------------------------------------------------------------

    def open_share(self, tc: TenantConfig) -> VirtioFS:
        """Start (or attach to) the daemon of a tenant and mount a session on it."""
        if tc.source is not None:
            transport = open_private_device(tc.source, binary=self.config.virtiofsd,
                                            cache=self.config.cache)
            config = SessionConfig()
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
                  source=tc.source or tc.socket, root=tc.root or "/",
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

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> Agent:
        """Bring up every tenant's share, ZAP, the server and the control socket."""
        cfg = self.config
        for warning in cfg.warnings:
            log_event("config_warning", None, level=logging.WARNING, detail=warning)
        self._prepare_runtime_dir()
        try:
            for tc in cfg.tenants.values():
                self.tenants[tc.id] = self._open_tenant(tc)
            self._by_key = {t.config.public_key.decode(): t for t in self.tenants.values()}
            self.zap = ZapHandler(self.context, _zap_keys(self.tenants), log_event).start()
            self.server = ShareServer(
                list(cfg.bind), tenant_of=self.tenant_of, context=self.context,
                heartbeat_timeout=cfg.heartbeat_timeout, configure_socket=self._configure,
                strict_tenants=True, on_event=self._server_event).start()
            self._start_control()
        except BaseException:
            self._stop_everything()
            raise
        log_event("agent_started", None, pid=os.getpid(), endpoints=self.server.endpoints,
                  tenants=sorted(self.tenants), config=cfg.path)
        return self

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
        out: dict[str, Any] = {}
        for tid, t in sorted(tenants.items()):
            tc = t.config
            out[tid] = {
                **stats.get(tid, {}),
                "share": tc.share or tc.socket, "root": tc.root or "/",
                "daemon_source": tc.source,
                "read_only": tc.read_only, "daemon_pid": t.daemon_pid,
                # (not probed while a restart is closing the old share)
                "alive": not stats.get(tid, {}).get("restarting") and t.alive(),
                "limits": dataclasses.asdict(tc.limits),
            }
        return {"pid": os.getpid(), "uptime": time.time() - self.started_at,
                "endpoints": self.server.endpoints, "config": self.config.path,
                "requests": self.server.requests_served, "malformed": self.server.malformed,
                "auth": {"accepted": self.zap.accepted if self.zap else 0,
                         "refused": self.zap.refused if self.zap else 0},
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
        for tid, tc in new.tenants.items():
            cur = self.tenants.get(tid)
            if cur is not None and cur.config.share_identity() == tc.share_identity():
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
                cur.reconfigure(tc)
                tenants[tid] = cur
            for tid, t in started.items():
                tenants[tid] = t
                if tid not in self.tenants:
                    log_event("tenant_added", tid)
            self.tenants = tenants
            self._by_key = {t.config.public_key.decode(): t for t in tenants.values()}
            self.zap.keys = _zap_keys(tenants)

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

    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT (SIGHUP reloads), stop. Returns 0."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: self._signals.put(signum))
        self.start()
        while True:
            try:
                signum = self._signals.get(timeout=0.5)
            except queue.Empty:
                continue
            if signum == signal.SIGHUP:
                log_event("reload_requested", None)
                self.reload()
            else:
                log_event("signal", None, signal=signal.Signals(signum).name)
                break
        self.shutdown()
        return 0


def _zap_keys(tenants: dict[str, AgentTenant]) -> dict[bytes, str]:
    return {t.config.public_key: t.config.id for t in tenants.values()}


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


# ==========================================================================================
# Control client and command line
# ==========================================================================================


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
        daemon = str(t["daemon_pid"] or "socket")
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


def _runtime_dir_of(args: argparse.Namespace) -> str:
    if args.runtime_dir:
        return str(args.runtime_dir)
    if args.config:
        return load_config(args.config).runtime_dir
    return default_runtime_dir()


def cmd_agent(args: argparse.Namespace) -> int:
    """``pyvirtiofs agent --config FILE [--check]``."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"pyvirtiofs agent: {exc}", file=sys.stderr)
        return 2
    if args.check:
        for warning in config.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{config.path}: OK, {len(config.tenants)} tenant(s): "
              f"{', '.join(sorted(config.tenants))}")
        return 0
    setup_logging(config.log_format, config.log_level)
    tune_malloc_for_servers()
    agent = Agent(config)
    try:
        return agent.run()
    except Exception as exc:
        log_event("agent_failed", None, level=logging.ERROR, detail=str(exc))
        print(f"pyvirtiofs agent: cannot start: {exc}", file=sys.stderr)
        return 1


def cmd_status(args: argparse.Namespace) -> int:
    """``pyvirtiofs status [--config FILE | --runtime-dir DIR] [--json]``."""
    try:
        status = query_control(_runtime_dir_of(args), "status", timeout=args.timeout)
    except ConfigError as exc:
        print(f"pyvirtiofs status: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"pyvirtiofs status: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2, default=str) if args.json else format_status(status))
    return 0


def add_agent_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``agent`` to an argparse subparsers object."""
    p = sub.add_parser(
        "agent", help="serve many tenants, each confined to its share (see AGENT.md)",
        description="Run the multi-tenant agent described by a TOML config until SIGTERM "
                    "(drains, releases every handle, stops the daemons, exits 0). SIGHUP "
                    "reloads the config without dropping unchanged tenants' sessions.")
    p.add_argument("--config", required=True, help="the agent's TOML config file")
    p.add_argument("--check", action="store_true",
                   help="only check the config (errors as FILE:LINE: reason) and exit")
    p.set_defaults(func=cmd_agent)
    return p


def add_status_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``status`` to an argparse subparsers object."""
    p = sub.add_parser(
        "status", help="show a running agent's tenants, handles, bytes in flight, rates",
        description="Ask a running agent (through its control socket, RUNTIME_DIR/"
                    "control.sock) for its tenants' counters.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", help="the agent's config (to find its runtime_dir)")
    where.add_argument("--runtime-dir", help="the agent's runtime_dir")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the agent")
    p.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m api.agent {agent,status,keygen} ...`` (the same as pyvirtiofs's)."""
    parser = argparse.ArgumentParser(prog="pyvirtiofs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_agent_parser(sub)
    add_status_parser(sub)
    keymod.add_keygen_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, ValueError) as exc:
        print(f"pyvirtiofs {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
