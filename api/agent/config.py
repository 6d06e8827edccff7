"""The agent's configuration: a TOML file read with :mod:`tomllib`, checked completely.

Every error — syntax or meaning — is reported as ``FILE:LINE: reason``
(:class:`ConfigError`): :class:`_Locator` finds the line of a key in the file's text
(tomllib gives values, not positions), :class:`_Checker` checks types and ranges.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import stat as stat_mod
import tomllib
from dataclasses import dataclass, field
from typing import Any

from pyvirtiofs.api.remote import keys as keymod
from pyvirtiofs.api.remote.server import TenantLimits
from pyvirtiofs.hw.guest.spec import parse_device_spec

log = logging.getLogger("pyvirtiofs.agent")

_TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


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
    connections: int | None = 64
    max_bytes: int | None = None

    def to_server(self) -> TenantLimits:
        return TenantLimits(open_handles=self.open_handles,
                            bytes_in_flight=self.bytes_in_flight,
                            requests_per_second=self.requests_per_second,
                            requests_in_flight=self.requests_in_flight,
                            connections=self.connections)


@dataclass(frozen=True)
class TenantConfig:
    """One tenant. ``source`` is what its private virtiofsd serves (the share's folder
    joined with ``root``, symlinks resolved); a socket share and a device share (a virtio-fs
    device of the VM the agent runs in, ``device = "pci:TAG"``) have ``source`` None and
    the session confines them to ``root`` instead."""

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
    device: str | None = None

    def share_identity(self) -> tuple[Any, ...]:
        """What a running share depends on: a change needs a new daemon/session."""
        return (self.share, self.socket, self.device, self.root, self.source)


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
    bytes_in_flight: int = 1 << 30  # over all tenants
    max_connections: int = 1024  # authenticated connections, over all tenants
    max_handshakes: int = 128  # connections still in their handshake
    handshake_timeout: float = 2.0
    fd_reserve: int = 256  # descriptors never given to connections
    log_rate: int = 64 << 10  # bytes of log per second, at most (bursts: 4 s worth)
    io_threads: int = 2
    contended_bulk_rate: int = 32 << 20  # bulk bytes/s while other tenants are served
    tenants: dict[str, TenantConfig] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


_AGENT_KEYS = {"bind", "key_file", "runtime_dir", "heartbeat_timeout", "drain_timeout",
               "virtiofsd", "cache", "log_format", "log_level", "bytes_in_flight",
               "max_connections", "max_handshakes", "handshake_timeout", "fd_reserve",
               "log_rate", "io_threads", "contended_bulk_rate"}
_SIZE_KEYS = {"bytes_in_flight", "max_bytes", "log_rate"}
_TENANT_KEYS = {"public_key", "share", "socket", "device", "root", "read_only", "uid", "gid",
                "limits"}
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

    def count(key: str, default: int) -> int:
        value = agent.get(key, default)
        c.typed(value, int, key, "agent", key)
        if value <= 0:
            raise c.fail(f"{key} must be positive", "agent", key)
        return int(value)

    def size(key: str, default: int) -> int:
        return _size_value(c, key, agent.get(key, default), "agent", key)

    resources = {
        "bytes_in_flight": size("bytes_in_flight", 1 << 30),
        "log_rate": size("log_rate", 64 << 10),
        "contended_bulk_rate": size("contended_bulk_rate", 32 << 20),
        "max_connections": count("max_connections", 1024),
        "max_handshakes": count("max_handshakes", 128),
        "fd_reserve": count("fd_reserve", 256),
        "io_threads": count("io_threads", 2),
        "handshake_timeout": number("handshake_timeout", 2.0),
    }
    if resources["io_threads"] > 16:
        raise c.fail("io_threads must be 16 or fewer", "agent", "io_threads")

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
        warnings=tuple(warnings), **resources)  # type: ignore[arg-type]


def _overlap(a: str, b: str) -> bool:
    return os.path.commonpath([a, b]) in (a, b)


def _limits(c: _Checker, table: dict[str, Any], base: LimitsConfig,
            *key: str) -> LimitsConfig:
    c.known(table, _LIMIT_KEYS, *key)
    values: dict[str, Any] = {}
    for name, value in table.items():
        where = (*key, name)
        if name in _SIZE_KEYS:
            value = _size_value(c, name, value, *where)
        elif name == "requests_per_second":
            c.typed(value, (int, float), name, *where)
            value = float(value)
        else:
            c.typed(value, int, name, *where)
        if value <= 0:
            raise c.fail(f"{name} must be positive (leave it out for no limit)", *where)
        values[name] = value
    return dataclasses.replace(base, **values)


def _size_value(c: _Checker, name: str, value: Any, *where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise c.fail(f"{name} must be a number of bytes or a size such as \"64MiB\"", *where)
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise c.fail(str(exc), *where) from None
    if size <= 0:
        raise c.fail(f"{name} must be positive", *where)
    return size


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
    if keymod.is_z85_key(pk) and not os.path.exists(c.abspath(pk)):
        # (a path can be 40 Z85 characters too: a file that exists is a file)
        public = pk.encode()
    else:
        try:
            public = keymod.load_public(c.abspath(pk))
        except (OSError, ValueError) as exc:
            raise c.fail(f"public_key is neither a 40-character Z85 key nor a readable key "
                         f"file: {exc}", *key, "public_key") from None
    share, sock, device = table.get("share"), table.get("socket"), table.get("device")
    if sum(v is not None for v in (share, sock, device)) != 1:
        raise c.fail(f"tenant {tid!r} needs exactly one of share = \"FOLDER\" (the agent "
                     "starts a virtiofsd on it), socket = \"PATH\" (a running daemon) or "
                     "device = \"pci:TAG\" (a virtio-fs device of the VM the agent runs in)",
                     *key)
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
    elif device is not None:
        c.typed(device, str, "device", *key, "device")
        try:
            device = str(parse_device_spec(device))
        except ValueError as exc:
            raise c.fail(str(exc), *key, "device") from None
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
    if limits.max_bytes is not None and source is None:
        raise c.fail("limits.max_bytes needs a share folder (the agent measures the usage of "
                     "the tenant's root)", *key, "limits")
    return TenantConfig(id=tid, public_key=public, share=share, socket=sock, root=root,
                        read_only=read_only, uid=uid, gid=gid, limits=limits, source=source,
                        line=c.where.line(*key), device=device)
