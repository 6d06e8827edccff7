"""Reading other processes' state from ``/proc``, for the tests, the bench and the soak.

A process can exit between the ``open()`` of one of its ``/proc`` files and the
``read()``: the open succeeds, the read fails with ``ESRCH`` (``ProcessLookupError``).
Every reader here treats any ``OSError`` as "the process is gone" and returns ``None``,
so a caller waiting for a process to exit never trips over the exit itself.
"""

from __future__ import annotations

import os
from collections import Counter

__all__ = ["cpu_seconds", "fd_count", "fd_kinds", "fd_targets", "is_gone", "memory",
           "parent_pid", "stat_fields", "state", "status_kib", "status_values"]

_TICK = os.sysconf("SC_CLK_TCK")
_GONE_STATES = ("Z", "X")  # a zombie holds no resources: for waiting, it has exited


def stat_fields(pid: int | str, tid: int | str | None = None) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` (or of one thread's) after the command name, so
    ``[0]`` is the state letter; None if the process is gone. The command name is skipped
    by its last ``)``: it may itself hold spaces and parentheses."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    return fields or None


def state(pid: int | str, tid: int | str | None = None) -> str | None:
    """The state letter of a process or thread (``R``, ``S``, ``T``, ``Z``, …), or None."""
    fields = stat_fields(pid, tid)
    return None if fields is None else fields[0]


def is_gone(pid: int | str) -> bool:
    """True once ``pid`` has exited (reaped or a zombie)."""
    return state(pid) in (None, *_GONE_STATES)


def parent_pid(pid: int | str) -> int | None:
    fields = stat_fields(pid)
    return None if fields is None else int(fields[1])


def cpu_seconds(pid: int | str | None, tid: int | str | None = None) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads) or of its thread ``tid``,
    or None if it is gone."""
    fields = None if pid is None else stat_fields(pid, tid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / _TICK


def status_values(pid: int | str) -> dict[str, str] | None:
    """``/proc/PID/status`` as ``{key: value}`` (values stripped), or None if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def status_kib(pid: int | str, key: str) -> int | None:
    """A ``kB`` (or plain count) field of ``/proc/PID/status`` such as ``VmRSS``,
    ``RssAnon`` or ``Threads``; None if the process or the field is gone."""
    return _number(status_values(pid), key)


def memory(pid: int | str | None) -> tuple[int | None, int | None, int | None]:
    """Resident set size of ``pid`` in bytes, in all and its anonymous part, and its
    thread count (None if it is gone). The anonymous part is what leaks show in: the rest
    is shared guest memory (touched progressively as buffers are used) and mapped files."""
    values = None if pid is None else status_values(pid)
    rss, anon = _number(values, "VmRSS"), _number(values, "RssAnon")
    return (None if rss is None else rss * 1024, None if anon is None else anon * 1024,
            _number(values, "Threads"))


def _number(values: dict[str, str] | None, key: str) -> int | None:
    value = None if values is None else values.get(key)
    return None if value is None else int(value.split()[0])


def fd_count(pid: int | str | None) -> int | None:
    """How many file descriptors ``pid`` has open, or None if it is gone."""
    if pid is None:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def fd_targets(pid: int | str | None) -> dict[str, str]:
    """``{fd: what it points at}`` of ``pid`` (``socket:[…]``, ``anon_inode:[eventfd]``, a
    path); empty if the process is gone. A descriptor closed meanwhile is left out."""
    out: dict[str, str] = {}
    if pid is None:
        return out
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    return out


def fd_kinds(pid: int | str | None) -> Counter[str]:
    """What the open descriptors of ``pid`` are (socket, eventfd, memfd:…, a path),
    counted."""
    return Counter(target.split("[")[0] for target in fd_targets(pid).values())
