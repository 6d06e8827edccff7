"""``pyvirtiofs put/get/cp`` copy as GNU ``cp -r`` and ``cp -a`` do, and ``rm -r`` guards the
share's root as GNU ``rm`` does — checked differentially: the same tree is copied by the CLI
(through a real virtiofsd) and by the host's ``cp``, and the two results are compared entry
by entry (type, mode, owner, times to the nanosecond, link targets, contents, hard links,
extended attributes).

Failures are provoked for real (names taken by the wrong kind of file, a socket the share
cannot make, an immutable file, a daemon killed mid-copy) and the CLI must say what was and
was not copied.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests import REPO
from tests.api.test_cli import (
    CLI,
    ENV,
    UNNAMED,
    assert_no_daemon_left,
    cli,
    daemons_on,
    failed,
    ok,
    run_all,
)

OLD = 981_173_106_123_456_789  # 2001-02-03, to the nanosecond
# An atime after the mtime and the ctime, and not a day old: reads leave it alone (relatime),
# so the copy made first and the one made after it see the same one.
RECENT = time.time_ns() + 10 * 86400 * 10**9
BIG = 40 << 20  # above the CLI's range size: copied by several threads


def xattrs_supported(folder: Path) -> bool:
    probe = folder / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def make_rich_tree(root: Path) -> None:
    """Everything cp -a keeps: links of every sort, modes, times, owners, hard links,
    fifos, extended attributes, a read-only directory with contents, a big file."""
    root.mkdir()
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "locked").mkdir()
    (root / "private").mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "empty").write_bytes(b"")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "sub" / "s.bin").write_bytes(os.urandom(300_001))
    (root / "sub" / "deeper" / "d.txt").write_text("deep\n")
    (root / "locked" / "inside.txt").write_text("read-only dir\n")
    (root / "private" / "secret").write_bytes(b"s" * 100)
    big = os.urandom(1 << 20) * (BIG >> 20)
    (root / "sub" / "big.bin").write_bytes(big + b"tail")
    os.link(root / "a.txt", root / "sub" / "hard-to-a")
    os.symlink("a.txt", root / "rel-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("nowhere/at/all", root / "dangling")
    os.symlink("sub", root / "dir-link")
    os.symlink("../a.txt", root / "sub" / "up-link")
    os.mkfifo(root / "fifo", 0o640)
    os.chmod(root / "run.sh", 0o755)
    os.chmod(root / "private" / "secret", 0o600)
    os.chmod(root / "a.txt", 0o640)
    os.chmod(root / "sub" / "s.bin", 0o4755)  # set-uid: -a keeps it, -r drops it
    os.chmod(root / "private", 0o700)
    os.chmod(root / "sub" / "deeper", 0o751)
    if xattrs_supported(root):
        os.setxattr(root / "a.txt", "user.color", b"blue")
        os.setxattr(root / "sub", "user.kind", b"directory")
    if os.geteuid() == 0:
        os.chown(root / "empty", UNNAMED[0], UNNAMED[1])
        os.chown(root / "dangling", UNNAMED[1], UNNAMED[0], follow_symlinks=False)
        os.chown(root / "sub" / "deeper", UNNAMED[0], UNNAMED[0])
    # Times last (deepest first), links included: a directory's mtime moves with its
    # entries.
    for dirpath, dirs, files in sorted(os.walk(root), key=lambda w: -w[0].count(os.sep)):
        for name in [*files, *dirs, ""]:
            p = os.path.join(dirpath, name) if name else dirpath
            os.utime(p, ns=(RECENT, OLD + len(p)), follow_symlinks=False)
    os.chmod(root / "locked", 0o555)
    os.utime(root / "locked", ns=(RECENT, OLD), follow_symlinks=False)


def describe(root: Path, *, times: bool = True, owners: bool = True,
             hard_links: bool = True) -> dict[str, Any]:
    """Every entry under ``root`` (and ``root`` itself as "."), as cp -a should keep it."""
    entries: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, list[str]] = {}
    paths = [root]
    for dirpath, dirs, files in os.walk(root):
        paths += [Path(dirpath, n) for n in [*dirs, *files]]
    for p in paths:
        rel = str(p.relative_to(root)) if p != root else "."
        st = os.lstat(p)
        item: list[Any] = [stat.filemode(st.st_mode)]
        if stat.S_ISREG(st.st_mode):
            item += [st.st_size, hashlib.sha256(p.read_bytes()).hexdigest()]
            inodes.setdefault(st.st_ino, []).append(rel)
        if stat.S_ISLNK(st.st_mode):
            item.append(os.readlink(p))
        if times:
            item += [st.st_mtime_ns, st.st_atime_ns]
        if owners:
            item += [st.st_uid, st.st_gid]
        try:
            names = sorted(os.listxattr(p, follow_symlinks=False))
            item.append([(n, os.getxattr(p, n, follow_symlinks=False)) for n in names])
        except OSError:
            item.append(None)
        entries[rel] = tuple(item)
    result: dict[str, Any] = {"entries": entries}
    if hard_links:
        result["hard links"] = sorted(sorted(g) for g in inodes.values() if len(g) > 1)
    return result


def unlock(root: Path) -> None:
    """Let pytest remove what a test left read-only."""
    for dirpath, dirs, _files in os.walk(root):
        for d in dirs:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)


def host(*argv: Any, umask: int | None = None) -> None:
    """A host command (cp), with ``umask`` if given; must succeed."""
    args = [str(a) for a in argv]
    if umask is not None:
        args = ["sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", *args]
    subprocess.run(args, check=True, capture_output=True, env=ENV)


def cli_umask(umask: int, *args: Any) -> subprocess.CompletedProcess[bytes]:
    """The CLI under ``umask`` (the share applies the caller's umask as the kernel does)."""
    return subprocess.run(["sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", *CLI,
                           *map(str, args)], capture_output=True, env=ENV, cwd=REPO,
                          timeout=120, check=False)


# -- cp -a -------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_get_put_and_cp_a_keep_what_cp_a_keeps(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    make_rich_tree(share / "tree")
    local = tmp_path / "local"
    local.mkdir()
    make_rich_tree(local / "tree")
    out = tmp_path / "out"
    out.mkdir()
    try:
        r = run_all({
            "get": ("get", "-a", share, "/tree", out / "ours"),
            "put": ("put", "-a", share, local / "tree", "/put-ours"),
        }, workers=2)
        ok(r["get"])
        ok(r["put"])
        ok(cli("cp", "-a", share, "/tree", "/cp-ours"))
        host("cp", "-a", share / "tree", out / "theirs")
        host("cp", "-a", local / "tree", share / "put-theirs")
        host("cp", "-a", share / "tree", share / "cp-theirs")

        want = describe(out / "theirs")
        assert want["hard links"] == [["a.txt", "sub/hard-to-a"]]  # the tree is as meant
        assert want["entries"]["sub/s.bin"][0] == "-rwsr-xr-x"
        assert want["entries"]["dangling"][1] == "nowhere/at/all"
        assert describe(out / "ours") == want
        assert describe(share / "put-ours") == describe(share / "put-theirs")
        assert describe(share / "cp-ours") == describe(share / "cp-theirs")
        # cp -a of the contents onto the copy: every name exists already and is replaced
        # (files rewritten, links and fifos made again, directories merged)
        (share / "tree" / "a.txt").write_text("changed\n")
        os.utime(share / "tree" / "a.txt", ns=(RECENT, OLD))
        ok(cli("get", "-a", share, "/tree/.", out / "ours"))
        host("cp", "-a", f"{share / 'tree'}/.", out / "theirs")
        assert describe(out / "ours") == describe(out / "theirs")
        assert (out / "ours" / "a.txt").read_text() == "changed\n"
    finally:
        for d in (share, local, out):
            unlock(d)
    assert_no_daemon_left(share)


# -- cp -r -------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_r_keeps_links_and_modes_as_cp_r(tmp_path: Path, umask: int) -> None:
    """Without -a: links stay links, modes are the source's less the umask (set-id bits
    dropped), times and hard links are not kept, owners are the copier's."""
    share = tmp_path / "share"
    share.mkdir()
    make_rich_tree(share / "tree")
    out = tmp_path / "out"
    out.mkdir()
    try:
        ok(cli_umask(umask, "get", "-r", share, "/tree", out / "ours"))
        ok(cli_umask(umask, "cp", "-r", share, "/tree", "/cp-ours"))
        local = tmp_path / "local"
        local.mkdir()
        make_rich_tree(local / "tree")
        ok(cli_umask(umask, "put", "-r", share, local / "tree", "/put-ours"))
        host("cp", "-r", share / "tree", out / "theirs", umask=umask)
        host("cp", "-r", share / "tree", share / "cp-theirs", umask=umask)
        host("cp", "-r", local / "tree", share / "put-theirs", umask=umask)
        for ours, theirs in [(out / "ours", out / "theirs"),
                             (share / "cp-ours", share / "cp-theirs"),
                             (share / "put-ours", share / "put-theirs")]:
            mine = describe(ours, times=False, hard_links=False)
            want = describe(theirs, times=False, hard_links=False)
            assert mine == want, ours
            assert want["entries"]["dangling"][1] == "nowhere/at/all"
            # times are the copy's own, as with cp -r
            assert os.lstat(ours / "sub" / "s.bin").st_mtime_ns != os.lstat(
                share / "tree" / "sub" / "s.bin").st_mtime_ns
    finally:
        for d in (share, out, tmp_path / "local"):
            if d.exists():
                unlock(d)


def test_plain_copy_of_a_link_copies_its_target_and_r_copies_the_link(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "a.txt").write_text("alpha\n")
    os.symlink("a.txt", share / "lnk")
    out = tmp_path / "out"
    out.mkdir()
    r = run_all({"plain": ("get", share, "/lnk", out / "plain"),
                 "r": ("get", "-r", share, "/lnk", out / "r")})
    ok(r["plain"])
    ok(r["r"])
    assert not (out / "plain").is_symlink() and (out / "plain").read_text() == "alpha\n"
    assert os.readlink(out / "r") == "a.txt"


# -- failures ----------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_a_copy_with_failures_goes_on_and_says_what_was_not_copied(tmp_path: Path) -> None:
    local = tmp_path / "local"
    (local / "tree" / "blocked").mkdir(parents=True)
    (local / "tree" / "ok-dir").mkdir()
    (local / "tree" / "blocked" / "x.txt").write_text("x\n")
    (local / "tree" / "ok-dir" / "fine.txt").write_text("fine\n")
    (local / "tree" / "wants-file").write_text("file\n")
    for i in range(20):
        (local / "tree" / f"f{i:02d}").write_bytes(os.urandom(1000 + i))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(local / "tree" / "sock"))  # a share cannot make sockets
    share = tmp_path / "share"
    (share / "tree" / "wants-file").mkdir(parents=True)  # a directory where a file goes
    (share / "tree" / "blocked").write_text("a file where a directory goes\n")
    try:
        res = cli("put", "-r", share, local / "tree", "/")
    finally:
        sock.close()
    err = res.stderr.decode().splitlines()
    assert res.returncode == 1, res.stderr.decode()
    assert res.stdout == b""
    failures = [line for line in err if line.startswith("pyvirtiofs: cannot copy ")]
    assert len(failures) == 3, err
    assert any(f"{local / 'tree' / 'blocked'}" in line and "non-directory with a dir" in line
               for line in failures), failures
    assert any(f"{local / 'tree' / 'wants-file'}" in line and "directory" in line
               for line in failures), failures
    assert any(f"{local / 'tree' / 'sock'}" in line for line in failures), failures
    assert err[-1].startswith("pyvirtiofs: 3 of 26 entries not copied (23 copied, 19.7 KiB)"
                              ), err
    # everything else was copied
    for i in range(20):
        assert (share / "tree" / f"f{i:02d}").read_bytes() == (
            local / "tree" / f"f{i:02d}").read_bytes()
    assert (share / "tree" / "ok-dir" / "fine.txt").read_text() == "fine\n"
    assert (share / "tree" / "blocked").read_text().startswith("a file")
    assert (share / "tree" / "wants-file").is_dir()
    assert_no_daemon_left(share)


@pytest.mark.timeout(240)
def test_a_copy_stops_when_the_device_dies_and_says_so(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    for i in range(300):
        (local / f"f{i:03d}").write_bytes(os.urandom(20_000))
    share = tmp_path / "share"
    share.mkdir()
    proc = subprocess.Popen([*CLI, "put", "-r", "-j", "1", str(share), str(local), "/dst"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=REPO)
    try:
        # Once the first file is in, freeze the copy, kill its daemon, let it go on: the
        # copy is mid-way whatever the timing (300 files, one at a time).
        deadline = time.monotonic() + 60
        while not (share / "dst").is_dir() or not os.listdir(share / "dst"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the copy never started"
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)
        daemons = daemons_on(share)
        assert daemons
        for pid in daemons:
            os.kill(pid, signal.SIGKILL)
        proc.send_signal(signal.SIGCONT)
        out_bytes, err_bytes = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err_bytes.decode()
    assert proc.returncode == 1, err
    assert out_bytes == b""
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("pyvirtiofs: copy stopped: "), err
    copied = len(os.listdir(share / "dst"))
    assert 1 <= copied < 300
    assert f"the rest of {local} was not copied" in last, last
    assert_no_daemon_left(share)


# -- progress ------------------------------------------------------------------------------


def test_progress_shows_files_and_bytes_and_a_summary(tmp_path: Path) -> None:
    local = tmp_path / "local"
    (local / "d").mkdir(parents=True)
    for i in range(5):
        (local / "d" / f"f{i}").write_bytes(b"x" * (1 << 20))
    os.symlink("f0", local / "d" / "l")
    share = tmp_path / "share"
    share.mkdir()
    res = cli("put", "-r", "--progress", share, local, "/")
    assert res.returncode == 0 and res.stdout == b"", res.stderr
    err = res.stderr.decode()
    assert "5/5 files" in err, err  # the bar counts files beside the bytes
    assert err.splitlines()[-1].startswith(
        "copied 5 files, 2 directories, 1 symlink: 5.0 MiB in "), err


# -- rm --------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_rm_r_refuses_the_share_root_as_gnu_rm_does(tmp_path: Path) -> None:
    share = tmp_path / "share"
    (share / "a" / "b").mkdir(parents=True)
    (share / "a" / "f").write_text("f\n")
    (share / "top.txt").write_text("top\n")
    os.symlink("/", share / "to-root")
    os.symlink(".", share / "dot")
    r = run_all({path: ("rm", "-r", share, path)
                 for path in ["/", ".", "//", "/a/..", "a/b/../..", "/dot/"]})
    for path, res in r.items():
        line = failed(res)
        assert "dangerous to operate recursively on the share's root" in line, path
        assert "--no-preserve-root" in line
    assert sorted(os.listdir(share)) == ["a", "dot", "to-root", "top.txt"]
    # a link to the root is a link: removed itself, as rm -r does
    ok(cli("rm", "-r", share, "/to-root"))
    assert sorted(os.listdir(share)) == ["a", "dot", "top.txt"]
    # --no-preserve-root empties the root, which stays
    ok(cli("rm", "-r", "--no-preserve-root", share, "/"))
    assert share.is_dir() and os.listdir(share) == []
    assert_no_daemon_left(share)


@pytest.mark.timeout(240)
def test_rm_r_goes_on_past_what_it_cannot_remove(tmp_path: Path) -> None:
    share = tmp_path / "share"
    (share / "t" / "keep").mkdir(parents=True)
    (share / "t" / "keep" / "stuck").write_text("immutable\n")
    for i in range(10):
        (share / "t" / f"f{i}").write_text("x\n")
    (share / "t" / "sub").mkdir()
    (share / "t" / "sub" / "g").write_text("g\n")
    subprocess.run(["chattr", "+i", str(share / "t" / "keep" / "stuck")], check=True)
    try:
        res = cli("rm", "-r", share, "/t", "/missing")
        err = res.stderr.decode().splitlines()
        assert res.returncode == 1
        assert err == ["pyvirtiofs: Operation not permitted: /t/keep/stuck",
                       "pyvirtiofs: No such file or directory: /missing"], err
        # everything else went; the directories holding what stayed stay, silently
        assert sorted(os.listdir(share / "t")) == ["keep"]
        assert os.listdir(share / "t" / "keep") == ["stuck"]
    finally:
        subprocess.run(["chattr", "-i", str(share / "t" / "keep" / "stuck")], check=True)
    assert_no_daemon_left(share)


# -- the big-file path -------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_big_files_round_trip_through_several_ranges(tmp_path: Path) -> None:
    """Files larger than a range are copied by several threads at once; sizes that are
    not multiples of anything, and one exactly on a chunk boundary."""
    local = tmp_path / "local"
    local.mkdir()
    sizes = {"odd.bin": (70 << 20) + 12345, "even.bin": 64 << 20, "small.bin": 4097}
    for name, size in sizes.items():
        with open(local / name, "wb") as f:
            f.write(os.urandom(size))
    share = tmp_path / "share"
    share.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    for jobs in ("1", "3"):
        ok(cli("put", "-r", "-j", jobs, share, local, f"/j{jobs}"))
        ok(cli("get", "-r", "-j", jobs, share, f"/j{jobs}", out / f"j{jobs}"))
        for name in sizes:
            want = (local / name).read_bytes()
            assert (share / f"j{jobs}" / name).read_bytes() == want, (jobs, name)
            assert (out / f"j{jobs}" / name).read_bytes() == want, (jobs, name)
    shutil.rmtree(out)
