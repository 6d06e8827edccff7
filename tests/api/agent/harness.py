"""Shared helpers for the agent tests (no tests here): the live agent, tenants and raw
ZeroMQ peers of :mod:`pyvirtiofs.tools.agentrig` (shared with ``pyvirtiofs soak
--hostile``), daemons to kill and stop, and hypothesis strategies for hostile messages.

The agent always runs as a subprocess (``pyvirtiofs agent --config …``): its
signals, exit code and file descriptors are the real ones, and its GIL is not the test's.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import strategies as st

from pyvirtiofs.api.remote.keys import load_public, load_secret
from pyvirtiofs.tools import agentrig, procfs
from pyvirtiofs.tools.agentrig import (
    AgentProc,
    RawClient,
    fd_count,
    render_config,
    rss_mib,
    toml_value,
    wait_for,
)
from tests import REPO

__all__ = ["REPO", "AgentProc", "RawClient", "Site", "agent_site", "fd_count", "op_strategy",
           "render_config", "rss_mib", "start_agent", "toml_value", "wait_for"]


def start_agent(base: Path, tenants: dict[str, dict[str, Any]], **options: Any) -> AgentProc:
    """:func:`pyvirtiofs.tools.agentrig.start_agent`, run in the repository."""
    return agentrig.start_agent(base, tenants, cwd=REPO, **options)


@dataclass
class Site:
    """A live agent and the host folder holding its tenants' shares (one folder each)."""

    agent: AgentProc
    host: Path

    def share(self, tenant: str) -> Path:
        return self.host / tenant


@contextlib.contextmanager
def agent_site(factory: Any, tenants: dict[str, dict[str, Any]],
               prepare: Callable[[Path], None], **options: Any) -> Iterator[Site]:
    """An agent serving ``tenants`` (each its own folder under one host folder, filled by
    ``prepare(host)`` before the agent starts); it must stop cleanly afterwards."""
    host = factory.mktemp("tenants")
    for tenant in tenants:
        (host / tenant).mkdir()
    prepare(host)
    agent = start_agent(factory.mktemp("agent"),
                        {t: {"share": str(host / t), **cfg} for t, cfg in tenants.items()},
                        **options)
    try:
        yield Site(agent, host)
    finally:
        assert agent.terminate() == 0


def kill_daemon(pid: int) -> None:
    """SIGKILL a virtiofsd worker and wait until it and its parent are gone: with the
    namespace sandbox the parent holds a copy of the vhost-user connection, so the agent
    sees the connection drop only once the parent has exited too."""
    parent = procfs.parent_pid(pid)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: procfs.is_gone(pid), 10, "the daemon's worker to die")
    if parent not in (None, 1):
        wait_for(lambda: procfs.is_gone(parent), 10, "the daemon's parent to exit")


def key_files_ok(keys: Path, name: str) -> bool:
    public, secret = load_secret(keys / f"{name}.key_secret")
    return load_public(keys / f"{name}.key") == public and len(secret) == 40


def _all_threads_stopped(pid: int) -> bool:
    """Every thread of ``pid`` has taken its SIGSTOP (kill() only queues the signal: a
    thread running on another CPU may still finish what it was doing)."""
    # a thread that exits meanwhile (state None) needs no stopping
    return all(procfs.state(pid, tid) in (None, "T", "t")
               for tid in os.listdir(f"/proc/{pid}/task"))


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP a process for the duration (its requests stay in flight), then SIGCONT."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: _all_threads_stopped(pid), 10, f"process {pid} to stop")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# -- hostile message strategies (hypothesis) -------------------------------------------------

PATHS = st.one_of(
    st.sampled_from([b"", b"/", b".", b"..", b"../..", b"/etc/passwd", b"a/../../..",
                     b"\0", b"mallory.txt", b"mallory.txt/", b"x" * 256, b"./" * 2100,
                     b"dir/sub", b"//", b"\xff\xfe", b"mallory.txt\0../x"]),
    st.binary(max_size=40),
    st.lists(st.sampled_from([b"..", b".", b"d", b"mallory.txt", b"", b"\0"]),
             max_size=6).map(b"/".join),
)
INTS = st.one_of(st.integers(-(1 << 63), (1 << 64) - 1), st.integers(-2, 70000),
                 st.sampled_from([0o100644, 0o20666, 0o60666, 0o4777, os.O_CREAT | os.O_RDWR,
                                  os.O_PATH, 1 << 62]))


def field_value(name: str, typ: Any) -> st.SearchStrategy[Any]:
    """Hostile values for one message field: paths that climb, NULs, overlong names,
    integers of any sign and size, credentials a tenant may not choose."""
    text = str(typ)
    if name == "ctx":
        return st.one_of(st.none(), st.tuples(INTS, INTS, INTS))
    if name == "data":
        return st.none()
    if typ is bytes:
        return PATHS
    if typ is bool:
        return st.booleans()
    if typ is int:
        return INTS
    if "tuple[int, int]" in text:
        return st.one_of(st.none(), st.just("now"), st.text(max_size=5),
                         st.tuples(INTS, INTS))
    if "int" in text:
        return st.one_of(st.none(), INTS)
    return st.none()


def op_strategy(cls: type) -> st.SearchStrategy[Any]:
    """Any instance of the message class ``cls`` with hostile field values."""
    fields = msgspec.structs.fields(cls)
    return st.builds(cls, **{f.name: field_value(f.name, f.type) for f in fields})
