"""Differential test: random operation sequences on a virtio-fs share and on the host.

Every step runs the same operation twice — through the actors (the ``os``-style facade over
a real virtiofsd) on the share, and with ``os`` on a mirror directory — and both must give
the same result or the same errno. At the end of each run the share's tree on disk must
equal the mirror's, byte for byte. A small name alphabet makes collisions (rename over an
existing name, link onto a taken name, rmdir of a non-empty directory, symlinks into
directories…) frequent. Each run starts its own virtiofsd on a fresh directory.

A share's root is the root of its namespace: ``..`` there stays there and an absolute
symlink target starts there. On the host that is what chroot(2) gives, so the host side
runs in a helper process chrooted to the mirror — in a plain directory, a link to "../a"
would escape the mirror.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import pickle
import shutil
import stat as stat_mod
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pyvirtiofs.codec.fuse_abi import RENAME_EXCHANGE, RENAME_NOREPLACE
from tests import REPO
from tests.actors.helpers import mounted

PATHS = ["a", "b", "c", "a/a", "a/b", "b/a", "b/c", "a/a/b"]
# What a path may end with: a trailing slash, or ".." / "." after the last name (after a
# non-directory that is ENOTDIR), or a detour through "..".
SUFFIXES = ["", "", "", "/", "/..", "/.", "/../a"]
DIRS = ["", "a", "b", "a/a"]
LINK_TARGETS = ["a", "b", "../a", "../b/a", "a/b", "missing", ".", "..", "/a", "/b/c",
                "a/a/..", "b/", "c/../a"]
MODES = [0o600, 0o644, 0o700, 0o755, 0o777, 0o1777, 0o711, 0o666]
RENAME_FLAGS = [0, RENAME_NOREPLACE, RENAME_EXCHANGE]
OPEN_FLAGS = [os.O_RDONLY, os.O_WRONLY, os.O_RDWR]
OPEN_EXTRA = [os.O_CREAT, os.O_EXCL, os.O_TRUNC, os.O_APPEND, os.O_NOFOLLOW, os.O_DIRECTORY]
USER = (1000, 1000)  # the other user of as_user runs: no such account is needed

paths = st.builds(lambda p, s: p + s, st.sampled_from(PATHS), st.sampled_from(SUFFIXES))
small_bytes = st.binary(max_size=64)
offsets = st.integers(min_value=0, max_value=80)
sizes = st.integers(min_value=0, max_value=100)

_AT_FDCWD = -100
_REPO = str(REPO)


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", value) or ("err", errno name): what a caller can observe of one call."""
    try:
        return "ok", fn()
    except OSError as exc:
        assert exc.errno is not None, f"OSError without errno: {exc!r}"
        return "err", errno.errorcode.get(exc.errno, exc.errno)


def stat_view(st_: os.stat_result) -> tuple[int, ...]:
    """The stat fields that must agree between the share and the host: type and
    permissions, size (of files and links: a directory's size is the host's business),
    link count. Times are compared only where a rule set them (see ``utime``)."""
    size = 0 if stat_mod.S_ISDIR(st_.st_mode) else st_.st_size
    return st_.st_mode, size, st_.st_nlink


def entry_view(entries: Any) -> list[tuple[str, bool, bool, bool]]:
    return sorted((e.name, e.is_dir(follow_symlinks=False), e.is_symlink(), e.is_file())
                  for e in entries)


# -- the host side: os calls in a process chrooted to the mirror ------------------------
# Each host_* function runs in that process, with absolute paths.


def host_create(path: str, data: bytes, flags: int) -> int:
    fd = os.open(path, flags, 0o666)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def host_pwrite(path: str, data: bytes, offset: int) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def host_read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def host_pread(path: str, size: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def host_scandir(path: str) -> list[tuple[str, bool, bool, bool]]:
    with os.scandir(path) as it:
        return entry_view(it)


def host_stat(path: str, follow: bool) -> tuple[int, ...]:
    return stat_view(os.stat(path, follow_symlinks=follow))


def host_mtime(path: str, follow: bool) -> int:
    return os.stat(path, follow_symlinks=follow).st_mtime_ns


def host_rename(src: str, dst: str, flags: int) -> None:
    """rename(2) with RENAME_* flags (Python's os.rename has none): renameat2."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src, None, dst)


def host_open(path: str, flags: int) -> None:
    os.close(os.open(path, flags, 0o644))


def append_session(opener: Callable[..., Any], path: str, data: bytes, plus: bool,
                   size: int) -> list[Any]:
    """What a program sees of a file opened for appending with ``opener`` (the built-in
    open on the host, the share's open on the share)."""
    with opener(path, "a+b" if plus else "ab") as f:
        seen: list[Any] = [f.tell(), f.write(data), f.tell(), f.write(b""), f.tell()]
        f.truncate(size)
        seen.append(f.tell())
        if plus:
            seen.append(f.read())
            f.seek(0)
            seen.append(f.read(5))
        return seen


def host_append_session(path: str, data: bytes, plus: bool, size: int) -> list[Any]:
    return append_session(open, path, data, plus, size)


def host_as(uid: int, gid: int, op: str, *args: Any) -> tuple[str, Any]:
    """``op`` run by another user: a child with that uid and gid and no other groups."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            result = outcome(functools.partial(HOST_OPS[op], *args))
            with os.fdopen(write_end, "wb") as out:
                pickle.dump(result, out)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        result = pickle.load(pipe)
    os.waitpid(pid, 0)
    return result  # type: ignore[no-any-return]


def host_link(src: str, dst: str) -> None:
    # link(2) semantics, as the share's link: a symlink as the source is not followed.
    os.link(src, dst, follow_symlinks=False)


HOST_OPS: dict[str, Callable[..., Any]] = {
    f.__name__: f for f in (host_create, host_pwrite, host_read, host_pread, host_scandir,
                            host_stat, host_mtime, host_rename, host_link, host_open,
                            host_append_session, host_as)
} | {name: getattr(os, name) for name in (
    "truncate", "readlink", "listdir", "mkdir", "rmdir", "unlink", "symlink", "chmod",
    "utime")}


def serve_host_ops() -> None:
    """The helper process. It reads pickled requests from stdin and answers each with a
    pickled :func:`outcome`. ``("chroot", (root,), {})`` forks a child chrooted to
    ``root`` that runs the ``host_*`` calls until ``("leave", (), {})``: one interpreter
    start for the whole module, one cheap fork per state-machine run."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

    def answer(value: tuple[str, Any]) -> None:
        pickle.dump(value, stdout)
        stdout.flush()

    while True:
        try:
            op, args, _ = pickle.load(stdin)
        except EOFError:
            return
        assert op == "chroot", op
        pid = os.fork()
        if pid:
            os.waitpid(pid, 0)
            continue
        try:  # the child: chrooted until told to leave
            os.chroot(args[0])
            os.chdir("/")
            answer(("ok", None))
            while (request := pickle.load(stdin))[0] != "leave":
                op, args, kwargs = request
                answer(outcome(functools.partial(HOST_OPS[op], *args, **kwargs)))
            answer(("ok", None))
        finally:
            os._exit(0)


class ChrootedHost:
    """Client of :func:`serve_host_ops`: ``enter(root)``, then ``host(op, *args)`` →
    outcome, then ``leave()``."""

    def __init__(self) -> None:
        code = "from tests.actors.test_differential import serve_host_ops; serve_host_ops()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=_REPO)

    def __call__(self, op: str, *args: Any, **kwargs: Any) -> tuple[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        pickle.dump((op, args, kwargs), self.proc.stdin)
        self.proc.stdin.flush()
        return pickle.load(self.proc.stdout)

    def enter(self, root: str) -> None:
        assert self("chroot", root) == ("ok", None)

    def leave(self) -> None:
        assert self("leave") == ("ok", None)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)


_helper: list[ChrootedHost] = []  # the module's helper, started by the fixture below


@pytest.fixture(scope="module", autouse=True)
def chrooted_host() -> Iterator[ChrootedHost]:
    host = ChrootedHost()
    _helper.append(host)
    try:
        yield host
    finally:
        _helper.remove(host)
        host.close()


def absolute(path: str) -> str:
    """A share path as the chrooted host names it."""
    return "/" + path


# -- the state machine ------------------------------------------------------------------


class ShareVersusHost(RuleBasedStateMachine):
    """One virtiofsd per run; every rule acts on both trees and compares."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="pyvirtiofs-diff-")
        self.share = os.path.join(self.tmp, "share")
        self.mirror = os.path.join(self.tmp, "mirror")
        os.mkdir(self.share)
        os.mkdir(self.mirror)
        self.host = _helper[0]
        self.host.enter(self.mirror)
        self._mount = mounted(self.share, request_timeout=10)
        self.fs, _ = self._mount.__enter__()

    def both(self, on_share: Callable[[], Any], op: str, *args: Any, **kwargs: Any) -> Any:
        got, want = outcome(on_share), self.host(op, *args, **kwargs)
        assert got == want, f"share gave {got}, host gave {want}"
        return got

    # -- creating and writing ----------------------------------------------------------

    @initialize()
    def start(self) -> None:
        self.both(lambda: self.fs.mkdir("a"), "mkdir", absolute("a"))

    @rule(path=paths, data=small_bytes, excl=st.booleans())
    def create(self, path: str, data: bytes, excl: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if excl else os.O_TRUNC)

        def on_share() -> int:
            with self.fs.open_raw(path, flags) as f:
                return f.write(data)

        self.both(on_share, "host_create", absolute(path), data, flags)

    @rule(path=paths, data=small_bytes)
    def append(self, path: str, data: bytes) -> None:
        def on_share() -> int:
            with self.fs.open(path, "ab") as f:
                return f.write(data)

        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        self.both(on_share, "host_create", absolute(path), data, flags)

    @rule(path=paths, offset=offsets, data=small_bytes)
    def write_at(self, path: str, offset: int, data: bytes) -> None:
        def on_share() -> int:
            with self.fs.open_raw(path, os.O_WRONLY) as f:
                return f.pwrite(data, offset)

        self.both(on_share, "host_pwrite", absolute(path), data, offset)

    @rule(path=paths, size=sizes)
    def truncate(self, path: str, size: int) -> None:
        self.both(lambda: self.fs.truncate(path, size), "truncate", absolute(path), size)

    # -- reading -----------------------------------------------------------------------

    @rule(path=paths)
    def read(self, path: str) -> None:
        def on_share() -> bytes:
            with self.fs.open(path, "rb") as f:
                return f.read()

        self.both(on_share, "host_read", absolute(path))

    @rule(path=paths, offset=offsets, size=sizes)
    def pread(self, path: str, offset: int, size: int) -> None:
        def on_share() -> bytes:
            with self.fs.open_raw(path, os.O_RDONLY) as f:
                return f.pread(size, offset)

        self.both(on_share, "host_pread", absolute(path), size, offset)

    @rule(path=paths, follow=st.booleans())
    def stat(self, path: str, follow: bool) -> None:
        self.both(lambda: stat_view(self.fs.stat(path, follow_symlinks=follow)),
                  "host_stat", absolute(path), follow)

    @rule(path=paths)
    def readlink(self, path: str) -> None:
        self.both(lambda: self.fs.readlink(path), "readlink", absolute(path))

    @rule(path=st.sampled_from(DIRS))
    def listdir(self, path: str) -> None:
        self._listdir(path)

    def _listdir(self, path: str) -> None:
        """Names as sets (order is the file system's business)."""
        got = outcome(lambda: sorted(self.fs.listdir(path or "/")))
        want = self.host("listdir", absolute(path))
        if want[0] == "ok":
            want = ("ok", sorted(want[1]))
        assert got == want, f"share gave {got}, host gave {want}"

    @rule(path=st.sampled_from(DIRS))
    def scandir(self, path: str) -> None:
        self.both(lambda: entry_view(self.fs.scandir(path or "/")), "host_scandir",
                  absolute(path))

    # -- the namespace -----------------------------------------------------------------

    @rule(path=paths)
    def mkdir(self, path: str) -> None:
        self.both(lambda: self.fs.mkdir(path), "mkdir", absolute(path))

    @rule(path=paths)
    def rmdir(self, path: str) -> None:
        self.both(lambda: self.fs.rmdir(path), "rmdir", absolute(path))

    @rule(path=paths)
    def unlink(self, path: str) -> None:
        self.both(lambda: self.fs.unlink(path), "unlink", absolute(path))

    @rule(src=paths, dst=paths, flags=st.sampled_from(RENAME_FLAGS))
    def rename(self, src: str, dst: str, flags: int) -> None:
        self.both(lambda: self.fs.rename(src, dst, flags=flags),
                  "host_rename", absolute(src), absolute(dst), flags)

    @rule(src=paths, dst=paths)
    def link(self, src: str, dst: str) -> None:
        self.both(lambda: self.fs.link(src, dst), "host_link", absolute(src), absolute(dst))

    @rule(content=st.sampled_from(LINK_TARGETS), path=paths)
    def symlink(self, content: str, path: str) -> None:
        self.both(lambda: self.fs.symlink(content, path), "symlink", content, absolute(path))

    # -- attributes --------------------------------------------------------------------

    @rule(path=paths, mode=st.sampled_from(MODES))
    def chmod(self, path: str, mode: int) -> None:
        self.both(lambda: self.fs.chmod(path, mode), "chmod", absolute(path), mode)

    @rule(path=paths, follow=st.booleans(),
          atime=st.integers(0, 2**33), mtime=st.integers(0, 2**33),
          nsec=st.integers(0, 10**9 - 1))
    def utime(self, path: str, follow: bool, atime: int, mtime: int, nsec: int) -> None:
        ns = (atime * 10**9 + nsec, mtime * 10**9 + nsec)
        result = self.both(lambda: self.fs.utime(path, ns=ns, follow_symlinks=follow),
                           "utime", absolute(path), ns=ns, follow_symlinks=follow)
        if result[0] == "ok":
            # Times were set explicitly: now they must match to the nanosecond.
            self.both(lambda: self.fs.stat(path, follow_symlinks=follow).st_mtime_ns,
                      "host_mtime", absolute(path), follow)

    # -- open(2) flags, append mode, another user ---------------------------------------

    @rule(path=paths, access=st.sampled_from(OPEN_FLAGS),
          extra=st.sets(st.sampled_from(OPEN_EXTRA), max_size=3))
    def open_flags(self, path: str, access: int, extra: set[int]) -> None:
        flags = access
        for flag in extra:
            flags |= flag

        def on_share() -> None:
            self.fs.open_raw(path, flags, 0o644).close()

        self.both(on_share, "host_open", absolute(path), flags)

    @rule(path=paths, data=small_bytes, plus=st.booleans(), size=sizes)
    def append_positions(self, path: str, data: bytes, plus: bool, size: int) -> None:
        self.both(lambda: append_session(self.fs.open, path, data, plus, size),
                  "host_append_session", absolute(path), data, plus, size)

    @rule(path=paths, data=small_bytes, other=paths,
          op=st.sampled_from(["read", "create", "unlink", "mkdir", "rmdir", "rename", "chmod",
                              "utime", "stat", "symlink", "truncate", "listdir"]))
    def as_other_user(self, op: str, path: str, data: bytes, other: str) -> None:
        """The same call made by another user: permission checks as the kernel's."""
        fs = self.fs.as_user(*USER)
        share_ops: dict[str, tuple[Callable[[], Any], str, tuple[Any, ...]]] = {
            "read": (lambda: fs.read_bytes(path), "host_read", (absolute(path),)),
            "create": (lambda: _write(fs, path, data), "host_create",
                       (absolute(path), data, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)),
            "unlink": (lambda: fs.unlink(path), "unlink", (absolute(path),)),
            "mkdir": (lambda: fs.mkdir(path), "mkdir", (absolute(path),)),
            "rmdir": (lambda: fs.rmdir(path), "rmdir", (absolute(path),)),
            "rename": (lambda: fs.rename(path, other), "host_rename",
                       (absolute(path), absolute(other), 0)),
            "chmod": (lambda: fs.chmod(path, 0o700), "chmod", (absolute(path), 0o700)),
            "utime": (lambda: fs.utime(path), "utime", (absolute(path),)),
            "stat": (lambda: stat_view(fs.stat(path)), "host_stat", (absolute(path), True)),
            "symlink": (lambda: fs.symlink("a", path), "symlink", ("a", absolute(path))),
            "truncate": (lambda: fs.truncate(path, 3), "truncate", (absolute(path), 3)),
            "listdir": (lambda: sorted(fs.listdir(path)), "listdir", (absolute(path),)),
        }
        on_share, host_op, args = share_ops[op]
        got = outcome(on_share)
        _, want = self.host("host_as", *USER, host_op, *args)
        if op == "listdir" and want[0] == "ok":
            want = ("ok", sorted(want[1]))
        assert got == want, f"as uid {USER[0]}: {op} share gave {got}, host gave {want}"

    # -- the end -----------------------------------------------------------------------

    @invariant()
    def root_listing_agrees(self) -> None:
        self._listdir("")

    def teardown(self) -> None:
        try:
            self._mount.__exit__(None, None, None)
            self.host.leave()
            assert tree(self.share) == tree(self.mirror)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _write(fs: Any, path: str, data: bytes) -> int:
    with fs.open_raw(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666) as f:
        written: int = f.write(data)
        return written


def tree(root: str) -> dict[str, tuple[Any, ...]]:
    """Everything on disk under ``root``: type, permission bits, link count, contents or
    link target."""
    found: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st_ = os.lstat(full)
            perm = stat_mod.S_IMODE(st_.st_mode)
            if stat_mod.S_ISLNK(st_.st_mode):
                found[rel] = ("link", os.readlink(full))
            elif stat_mod.S_ISDIR(st_.st_mode):
                found[rel] = ("dir", perm, st_.st_uid)
            else:
                with open(full, "rb") as f:
                    found[rel] = ("file", perm, st_.st_nlink, st_.st_uid, f.read())
    return found


# 40 runs of 30 steps keep the test well under a minute; PYVIRTIOFS_DIFF_EXAMPLES=500
# makes a longer bug hunt.
ShareVersusHost.TestCase.settings = settings(
    max_examples=int(os.environ.get("PYVIRTIOFS_DIFF_EXAMPLES", "40")),
    stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestShareVersusHost = ShareVersusHost.TestCase
