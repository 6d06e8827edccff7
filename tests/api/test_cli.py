"""The ``pyvirtiofs`` command line, run as a subprocess against real folders.

Every CLI call that touches a share starts its own virtiofsd, so the checks are grouped:
read-only checks of one sample folder run concurrently, changes run in a few sequences,
and one test drives a ``pyvirtiofs serve`` subprocess over ``tcp://127.0.0.1``.

Outputs are compared with what the host says about the same folder: ``LC_ALL=C ls -la``,
``os.lstat``, the bytes on disk.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofs.api.cli import build_parser
from tests import REPO

CLI = [sys.executable, "-m", "pyvirtiofs"]
ENV = {**os.environ, "LC_ALL": "C", "PYTHONPATH": str(REPO)}
ENV.pop("LANG", None)
BIG = 5 * (1 << 20) + 12345  # several MiB, not a multiple of anything nice


def _unnamed_ids() -> tuple[int, int]:
    """A long and a short uid (also gid) that name no user and no group."""

    def free(i: int) -> bool:
        try:
            pwd.getpwuid(i)
        except KeyError:
            try:
                grp.getgrgid(i)
            except KeyError:
                return True
        return False

    return next(i for i in range(54321, 60000) if free(i)), next(
        i for i in range(777, 999) if free(i))


UNNAMED = _unnamed_ids()

# Commands whose first argument is a SHARE (serve and demo take a FOLDER).
SHARE_COMMANDS = ["ls", "stat", "cat", "tree", "get", "put", "cp", "mkdir", "rm", "mv"]


# -- helpers -------------------------------------------------------------------------------


def cli(*args: Any, cwd: Path | str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    t0 = time.monotonic()
    res = subprocess.run([*CLI, *map(str, args)], capture_output=True, env=ENV,
                         cwd=cwd or REPO, timeout=timeout, check=False)
    res.elapsed = time.monotonic() - t0  # type: ignore[attr-defined]
    return res


def ok(res: subprocess.CompletedProcess[bytes]) -> bytes:
    """A successful run: exit 0, nothing on stderr; its stdout."""
    assert res.returncode == 0, (res.args, res.returncode, res.stderr.decode())
    assert res.stderr == b"", (res.args, res.stderr.decode())
    return res.stdout


def failed(res: subprocess.CompletedProcess[bytes], code: int = 1, stdout: bytes = b"") -> str:
    """A failed run: the exit code, ``stdout`` (nothing, unless said), exactly one line on
    stderr that begins with ``pyvirtiofs:``; that line."""
    err = res.stderr.decode()
    assert res.returncode == code, (res.args, res.returncode, err)
    assert res.stdout == stdout, (res.args, res.stdout[:200])
    assert err.endswith("\n") and err.count("\n") == 1, (res.args, err)
    assert err.startswith("pyvirtiofs: "), (res.args, err)
    return err.rstrip("\n")


def run_all(calls: dict[str, tuple[Any, ...]],
            workers: int = 4) -> dict[str, subprocess.CompletedProcess[bytes]]:
    """Run independent CLI calls concurrently (each one waits mostly on its daemon)."""
    with ThreadPoolExecutor(workers) as pool:
        futures = {key: pool.submit(cli, *args) for key, args in calls.items()}
        results = {key: f.result() for key, f in futures.items()}
    if os.environ.get("CLI_TIMES"):
        for key, res in results.items():
            print(f"{res.elapsed:6.2f} s {key}")  # type: ignore[attr-defined]
    return results


def lines(out: bytes) -> list[str]:
    return out.decode("utf-8", "surrogateescape").splitlines()


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root``: file contents, or None for a directory."""
    result: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            result[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in files:
            p = os.path.join(dirpath, f)
            result[os.path.relpath(p, root)] = Path(p).read_bytes()
    return result


def host_ls(*args: Any) -> list[str]:
    out = subprocess.run(["ls", *map(str, args)], capture_output=True, env=ENV, check=True)
    # A trailing '.' (SELinux context) or '+' (ACL) on the mode: virtio-fs cannot show them.
    return [re.sub(r"^([-a-zA-Z]{10})[.+] ", r"\1 ", line) for line in lines(out.stdout)]


def host_tree(root: Path, show_all: bool, top: str = "/") -> list[str]:
    """What GNU ``tree [-a]`` prints for ``root`` when it is given as ``top``."""
    counts = [0, 0]

    def walk(d: Path, prefix: str) -> Iterator[str]:
        names = sorted((n for n in os.listdir(d) if show_all or not n.startswith(".")),
                       key=os.fsencode)
        for i, name in enumerate(names):
            last = i == len(names) - 1
            p = d / name
            shown = f"{name} -> {os.readlink(p)}" if p.is_symlink() else name
            yield f"{prefix}{'└── ' if last else '├── '}{shown}"
            if p.is_dir() and not p.is_symlink():
                counts[0] += 1
                yield from walk(p, prefix + ("    " if last else "│   "))
            else:
                counts[1] += 1

    body = list(walk(root, ""))
    d, f = counts
    summary = f"{d} director{'y' if d == 1 else 'ies'}, {f} file{'' if f == 1 else 's'}"
    return [top, *body, "", summary]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemons_on(folder: Path) -> list[int]:
    """Pids of processes whose command line names ``folder`` (its virtiofsd)."""
    needle = os.fsencode(folder) + b"\0"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and b"virtiofsd" in cmdline:
            pids.append(int(entry))
    return pids


def assert_no_daemon_left(folder: Path) -> None:
    deadline = time.monotonic() + 5
    while daemons_on(folder) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemons_on(folder) == [], f"virtiofsd still running on {folder}"


def make_sample(root: Path) -> dict[str, Any]:
    """A folder with the kinds of entries ls and stat must render."""
    root.mkdir()
    (root / "docs" / "deep" / "x").mkdir(parents=True)
    big = os.urandom(BIG)
    (root / "big.bin").write_bytes(big)
    (root / "a.txt").write_text("alpha\n")
    os.link(root / "a.txt", root / "a-hardlink.txt")  # two links
    (root / ".hidden").write_text("dot\n")
    (root / "empty").write_bytes(b"")
    (root / "with space.txt").write_text("space\n")
    (root / "ünï.txt").write_text("unicode\n")
    (root / "secret").write_bytes(b"s" * 100)
    os.chmod(root / "secret", 0o600)
    (root / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o755)
    os.symlink("a.txt", root / "lnk")
    os.mkfifo(root / "fifo")
    old = time.mktime((2001, 2, 3, 4, 5, 6, 0, 0, -1))
    (root / "old.txt").write_text("old\n")
    os.utime(root / "old.txt", (old, old))
    docs = root / "docs"
    if os.geteuid() == 0:  # owners with no name: ls prints (right-aligned) numbers
        (root / "stranger").write_text("x\n")
        os.chown(root / "stranger", UNNAMED[0], UNNAMED[0])
        (docs / "alien").write_text("y\n")
        os.chown(docs / "alien", UNNAMED[1], UNNAMED[1])
    (docs / "deep" / "empty_dir").mkdir()
    (docs / "notes.md").write_text("# notes\n")
    (docs / ".config").write_text("k=v\n")
    (docs / "deep" / "x" / "y.txt").write_text("why\n")
    (docs / "private").mkdir(mode=0o700)
    os.chmod(docs / "private", 0o700)
    return {"big": big}


def make_tree(root: Path) -> None:
    """A small tree of regular files for copies."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "emptydir").mkdir()
    (root / "top.txt").write_text("top\n")
    (root / "sub" / "s.bin").write_bytes(os.urandom(300_000))
    (root / "sub" / "deeper" / "d.txt").write_text("deep\n")
    (root / "sub" / "deeper" / "zero").write_bytes(b"")


@contextmanager
def serving(folder: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``pyvirtiofs serve FOLDER`` on a free tcp port; yields (endpoint, process) once it
    printed its "serving" line. Always terminated."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    errlog = open(folder.parent / "serve.stderr", "w+b")
    proc = subprocess.Popen([*CLI, "serve", str(folder), "--bind", endpoint], env=ENV,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=errlog)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        line = b""
        while not line.startswith(b"serving"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
            if not ready:
                pytest.fail("pyvirtiofs serve printed no 'serving' line within 30 s")
            line = proc.stdout.readline()
            if not line:
                errlog.seek(0)
                pytest.fail(f"pyvirtiofs serve exited early: {errlog.read().decode()}")
        assert endpoint.encode() in line, line
        yield endpoint, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        errlog.close()


# -- read-only checks of one folder --------------------------------------------------------


@pytest.mark.timeout(240)
def test_reading_commands_match_the_host(tmp_path: Path) -> None:
    share = tmp_path / "share"
    sample = make_sample(share)
    missing_port = free_port()  # nobody listens there
    r = run_all({
        "ls": ("ls", share),
        "ls_a": ("ls", "-a", share, "/"),
        "ls_docs": ("ls", share, "/docs"),
        "ls_file": ("ls", share, "/a.txt"),
        "ls_la": ("ls", "-l", "-a", share, "/"),
        "ls_l": ("ls", "-l", share),
        "ls_la_docs": ("ls", "-l", "-a", share, "/docs"),
        "ls_l_link": ("ls", "-l", share, "/lnk"),
        "cat_big": ("cat", share, "/big.bin"),
        "cat_many": ("cat", share, "/a.txt", "/empty", "/docs/notes.md", "/big.bin",
                     "/ünï.txt"),
        "stat": ("stat", share, "/big.bin", "/docs", "/lnk", "/secret"),
        "stat_L": ("stat", "-L", share, "/lnk"),
        "tree": ("tree", share),
        "tree_a": ("tree", "-a", share),
        "tree_docs": ("tree", share, "/docs/deep"),
        "demo": ("demo", share / "docs"),
        # errors
        "ls_missing": ("ls", share, "/missing"),
        "cat_missing": ("cat", share, "/a.txt", "/missing"),
        "cat_dir": ("cat", share, "/docs"),
        "stat_missing": ("stat", share, "/missing"),
        "tree_missing": ("tree", share, "/missing"),
        "tree_file": ("tree", share, "/a.txt"),
        "get_missing": ("get", share, "/missing", tmp_path / "nothing"),
        "put_missing": ("put", share, tmp_path / "missing", "/"),
        "cp_missing": ("cp", share, "/missing", "/x"),
        "mv_missing": ("mv", share, "/missing", "/x"),
        "rm_missing": ("rm", share, "/missing"),
        "no_folder": ("ls", tmp_path / "no-such-folder", "/"),
        "not_a_folder": ("ls", share / "a.txt", "/"),
        "unreachable": ("ls", f"tcp://127.0.0.1:{missing_port}", "/"),
    })

    # ls: the names, sorted bytewise, dot files only with -a (which adds . and .., as ls)
    names = sorted(os.listdir(share), key=os.fsencode)
    assert lines(ok(r["ls"])) == [n for n in names if not n.startswith(".")]
    assert lines(ok(r["ls"])) == host_ls("-1", share)
    assert lines(ok(r["ls_a"])) == sorted([*names, ".", ".."], key=os.fsencode)
    assert lines(ok(r["ls_a"])) == host_ls("-1a", share)
    assert lines(ok(r["ls_docs"])) == host_ls("-1", share / "docs")
    assert lines(ok(r["ls_file"])) == ["/a.txt"]

    # ls -l -a of the share's root against LC_ALL=C ls -la of the same folder: same mode
    # strings, link counts, owners, groups, sizes, times and names. Two lines may differ:
    # ".." — the share cannot see the host's parent of its root, so there ".." is the
    # root itself, as in a guest that mounts the share at / — and "total", which counts
    # the blocks of "..". Widths may differ with "..", so compare fields.
    ours = lines(ok(r["ls_la"]))
    theirs = host_ls("-la", share)
    assert ours[0].startswith("total ") and theirs[0].startswith("total ")
    dotdot = [line for line in ours if line.endswith(" ..")]
    dot = [line for line in ours if line.endswith(" .")]
    assert len(dotdot) == 1 and len(dot) == 1
    assert dotdot[0].split()[:-1] == dot[0].split()[:-1]  # the root is its own parent

    def fields(listing: list[str]) -> list[list[str]]:
        return [line.split(None, 8) for line in listing[1:] if not line.endswith(" ..")]

    assert fields(ours) == fields(theirs)
    if os.geteuid() == 0:
        assert [f[2:4] for f in fields(ours) if f[8] == "stranger"] == [[str(UNNAMED[0])] * 2]
    assert any(f[0] == "prw-r--r--" and f[8] == "fifo" for f in fields(ours))
    assert any(f[5:8] == ["Feb", "3", "2001"] and f[8] == "old.txt" for f in fields(ours))
    assert any(f[1] == "2" and f[8] == "a.txt" for f in fields(ours))
    # without -a: no dot files, lines as ls -l prints them (total included)
    assert lines(ok(r["ls_l"])) == host_ls("-l", share)
    # below the root nothing is hidden from the share: the whole listing is identical,
    # "total", "..", column widths and all
    assert lines(ok(r["ls_la_docs"])) == host_ls("-la", share / "docs")
    assert lines(ok(r["ls_l_link"])) == [
        line.replace(str(share), "") for line in host_ls("-l", share / "lnk")]

    # cat: byte-exact, several files concatenated in order
    assert ok(r["cat_big"]) == sample["big"]
    assert ok(r["cat_many"]) == (b"alpha\n" + b"" + b"# notes\n" + sample["big"]
                                 + b"unicode\n")

    # stat: size, inode, mode, links, owner, as the host sees them
    out = ok(r["stat"]).decode()
    blocks = re.split(r"(?m)^(?=  File: )", out)[1:]
    assert [b.splitlines()[0] for b in blocks] == [
        "  File: /big.bin", "  File: /docs", "  File: /lnk", "  File: /secret"]
    for block, name, kind in zip(blocks, ["big.bin", "docs", "lnk", "secret"],
                                 ["regular file", "directory", "symbolic link",
                                  "regular file"], strict=True):
        st = os.lstat(share / name)
        assert re.search(rf"(?m)^  Size: {st.st_size}\s.*\s{kind}$", block), block
        assert re.search(rf"(?m)^ Inode: {st.st_ino}\s+Links: {st.st_nlink}$", block), block
        mode = f"({stat.S_IMODE(st.st_mode):04o}/{stat.filemode(st.st_mode)})"
        assert re.search(rf"(?m)^Access: {re.escape(mode)}\s+Uid: \(\s*{st.st_uid}/", block)
        assert re.search(rf"Gid: \(\s*{st.st_gid}/", block), block
        mtime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime_ns // 10**9))
        assert f"Modify: {mtime}.{st.st_mtime_ns % 10**9:09d}" in block
    stat_l = ok(r["stat_L"]).decode()
    assert "Size: 6 " in stat_l and "regular file" in stat_l
    assert f"Inode: {os.stat(share / 'a.txt').st_ino} " in stat_l

    # tree: the structure and the summary line, as GNU tree prints them
    assert lines(ok(r["tree"])) == host_tree(share, show_all=False)
    assert lines(ok(r["tree_a"])) == host_tree(share, show_all=True)
    assert lines(ok(r["tree_docs"])) == [
        "/docs/deep", "├── empty_dir", "└── x", "    └── y.txt", "", "2 directories, 1 file"]

    demo = ok(r["demo"]).decode()
    assert "# notes" not in demo  # only .txt files are printed
    assert "why\n" in demo and "demo: read" in demo
    assert "demo: device requests: " in demo and "INIT 1" in demo  # opcodes by name

    # errors: exit code 1, one line, the path named
    for key, path in [("ls_missing", "/missing"), ("cat_missing", "/missing"),
                      ("stat_missing", "/missing"), ("tree_missing", "/missing"),
                      ("get_missing", "/missing"), ("cp_missing", "/missing"),
                      ("mv_missing", "/missing"), ("rm_missing", "/missing"),
                      ("put_missing", str(tmp_path / "missing"))]:
        # cat prints what it could read before the failure, as cat does
        printed = b"alpha\n" if key == "cat_missing" else b""
        assert failed(r[key], stdout=printed) == (
            f"pyvirtiofs: No such file or directory: {path}"), key
    assert failed(r["cat_dir"]) == "pyvirtiofs: Is a directory: /docs"
    assert failed(r["tree_file"]) == "pyvirtiofs: Not a directory: /a.txt"
    assert failed(r["no_folder"]) == (
        f"pyvirtiofs: no such folder to share: {tmp_path / 'no-such-folder'}")
    assert "not a folder" in failed(r["not_a_folder"])
    line = failed(r["unreachable"])
    assert f"tcp://127.0.0.1:{missing_port}" in line and "no reply" in line
    # Within ~10 s. A loaded machine needs seconds just to start Python and import the
    # CLI, so subtract what a command that fails before any I/O took to get there.
    startup = min(r["no_folder"].elapsed, r["not_a_folder"].elapsed)  # type: ignore[attr-defined]
    assert r["unreachable"].elapsed - startup < 10  # type: ignore[attr-defined]

    # every command stopped its daemon on the way out, failures included
    assert_no_daemon_left(share)


@pytest.mark.timeout(120)
def test_help_explains_every_command() -> None:
    script = Path(sys.executable).parent / "pyvirtiofs"
    main_cmd = [str(script)] if script.exists() else CLI  # the console script, if installed
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = sorted(sub.choices)  # type: ignore[arg-type]
    assert set(SHARE_COMMANDS) | {"serve", "demo"} <= set(commands)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda argv: subprocess.run(argv, capture_output=True, env=ENV, cwd=REPO,
                                        timeout=60, check=False),
            [[*main_cmd, "--help"], *[[*CLI, c, "--help"] for c in commands]]))
    top, per_command = results[0], dict(zip(commands, results[1:], strict=True))

    text = ok(top).decode()
    assert text.startswith("usage: pyvirtiofs")
    assert "SHARE is a local folder" in text and "pyvirtiofs serve" in text
    for c in commands:
        assert re.search(rf"(?m)^    {c}\s+\S", text), f"{c} not described in --help"
    for c, res in per_command.items():
        help_text = " ".join(ok(res).decode().split())
        assert help_text.startswith(f"usage: pyvirtiofs {c}"), c
        if c in SHARE_COMMANDS:
            assert "SHARE a local folder (a private virtiofsd is started" in help_text, c
            assert "tcp://HOST:PORT" in help_text and "pyvirtiofs serve" in help_text, c
    assert "FOLDER the folder to share" in " ".join(ok(per_command["serve"]).decode().split())

    # usage errors: argparse's exit code 2 with usage on stderr
    res = cli("ls")
    assert res.returncode == 2 and b"usage: pyvirtiofs ls" in res.stderr
    res = cli("frobnicate")
    assert res.returncode == 2 and b"invalid choice" in res.stderr


# -- copies --------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_put_and_get_round_trips(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "inbox").mkdir()
    local = tmp_path / "local"
    local.mkdir()
    big = os.urandom(BIG)
    (local / "big.bin").write_bytes(big)
    tree = local / "tree"
    make_tree(tree)
    out = tmp_path / "out"
    out.mkdir()

    # put: a file into an existing directory, to a new name, -r into a directory and to
    # a new name, with a progress bar on request
    ok(cli("put", share, local / "big.bin", "/inbox"))
    assert (share / "inbox" / "big.bin").read_bytes() == big
    ok(cli("put", share, local / "big.bin", "/renamed.bin"))
    assert (share / "renamed.bin").read_bytes() == big
    ok(cli("put", "-r", share, tree, "/inbox"))
    assert snapshot(share / "inbox" / "tree") == snapshot(tree)
    ok(cli("put", "-r", share, tree, "/fresh"))
    assert snapshot(share / "fresh") == snapshot(tree)
    res = cli("put", "--progress", share, local / "big.bin", "/progress.bin")
    assert res.returncode == 0 and res.stdout == b""
    assert b"%|" in res.stderr and b"B" in res.stderr, res.stderr  # tqdm drew its bar
    assert (share / "progress.bin").read_bytes() == big
    assert "use -r" in failed(cli("put", share, tree, "/nope"))
    assert not (share / "nope").exists()

    # get: a file to a new name and into an existing directory, -r likewise
    r = run_all({
        "file": ("get", share, "/inbox/big.bin", out / "copy.bin"),
        "into": ("get", share, "/renamed.bin", out),
        "tree_into": ("get", "-r", share, "/inbox/tree", out),
        "tree_new": ("get", "-r", share, "/fresh", out / "fresh-copy"),
        "no_r": ("get", share, "/fresh", out / "x"),
    })
    for key in ("file", "into", "tree_into", "tree_new"):
        ok(r[key])
    assert (out / "copy.bin").read_bytes() == big
    assert (out / "renamed.bin").read_bytes() == big
    assert snapshot(out / "tree") == snapshot(tree)
    assert snapshot(out / "fresh-copy") == snapshot(tree)
    assert failed(r["no_r"]) == "pyvirtiofs: is a directory (use -r): /fresh"
    assert not (out / "x").exists()


# -- changes inside a share ----------------------------------------------------------------


@pytest.mark.timeout(240)
def test_mkdir_cp_mv_rm(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    make_tree(share / "src")
    (share / "file.txt").write_text("file\n")
    before = snapshot(share / "src")

    # mkdir -p makes parents and accepts what exists; plain mkdir does neither
    ok(cli("mkdir", "-p", share, "/a/b/c", "/a/b2"))
    assert (share / "a" / "b" / "c").is_dir() and (share / "a" / "b2").is_dir()
    r = run_all({
        "again": ("mkdir", "-p", share, "/a/b/c"),
        "exists": ("mkdir", share, "/a"),
        "no_parent": ("mkdir", share, "/x/y"),
        "plain": ("mkdir", share, "/plain"),
    })
    ok(r["again"])
    ok(r["plain"])
    assert (share / "plain").is_dir()
    assert failed(r["exists"]) == "pyvirtiofs: File exists: /a"
    assert failed(r["no_parent"]) == "pyvirtiofs: No such file or directory: /x/y"
    assert not (share / "x").exists()

    # cp -r inside the share: to a new name, into an existing directory; a file
    ok(cli("cp", "-r", share, "/src", "/copy"))
    assert snapshot(share / "copy") == before
    ok(cli("cp", "-r", share, "/src", "/a/b"))
    assert snapshot(share / "a" / "b" / "src") == before
    ok(cli("cp", share, "/file.txt", "/a"))
    assert (share / "a" / "file.txt").read_text() == "file\n"
    assert "into itself" in failed(cli("cp", "-r", share, "/src", "/src/sub"))
    assert snapshot(share / "src") == before

    # mv into a directory, and a rename
    ok(cli("mv", share, "/file.txt", "/a/b2"))
    assert not (share / "file.txt").exists()
    assert (share / "a" / "b2" / "file.txt").read_text() == "file\n"
    ok(cli("mv", share, "/copy", "/moved"))
    assert not (share / "copy").exists() and snapshot(share / "moved") == before

    # rm: a directory needs -r; -f ignores what is missing; -r removes a whole tree
    err = failed(cli("rm", share, "/moved"))
    assert err == "pyvirtiofs: is a directory (use -r): /moved"
    assert snapshot(share / "moved") == before
    r = run_all({
        "force": ("rm", "-f", share, "/missing", "/also/missing"),
        "recursive": ("rm", "-r", share, "/moved"),
        "file": ("rm", share, "/a/file.txt"),
    })
    assert ok(r["force"]) == b""
    assert ok(r["recursive"]) == b"" and not (share / "moved").exists()
    assert ok(r["file"]) == b"" and not (share / "a" / "file.txt").exists()
    assert sorted(os.listdir(share)) == ["a", "plain", "src"]

    # a relative SHARE is a folder relative to the current directory
    assert lines(ok(cli("ls", "share", "/", cwd=tmp_path))) == ["a", "plain", "src"]
    assert_no_daemon_left(share)


# -- a remote share ------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_commands_against_pyvirtiofs_serve(tmp_path: Path) -> None:
    share = tmp_path / "share"
    sample = make_sample(share)
    local = tmp_path / "local"
    make_tree(local)
    out = tmp_path / "out"
    out.mkdir()
    with serving(share) as (endpoint, proc):
        r = run_all({
            "ls": ("ls", endpoint),
            "ls_la_docs": ("ls", "-l", "-a", endpoint, "/docs"),
            "cat": ("cat", endpoint, "/big.bin", "/a.txt"),
            "stat": ("stat", endpoint, "/a.txt"),
            "tree": ("tree", endpoint, "/docs"),
            "missing": ("cat", endpoint, "/missing"),
        })
        names = sorted(os.listdir(share), key=os.fsencode)
        assert lines(ok(r["ls"])) == [n for n in names if not n.startswith(".")]
        assert lines(ok(r["ls_la_docs"])) == host_ls("-la", share / "docs")
        assert ok(r["cat"]) == sample["big"] + b"alpha\n"
        assert f"Inode: {os.stat(share / 'a.txt').st_ino} " in ok(r["stat"]).decode()
        assert lines(ok(r["tree"])) == host_tree(share / "docs", False, "/docs")
        assert failed(r["missing"]) == "pyvirtiofs: No such file or directory: /missing"
        ok(cli("put", "-r", endpoint, local, "/"))
        assert snapshot(share / "local") == snapshot(local)
        r = run_all({
            "get": ("get", "-r", endpoint, "/local", out),
            "mkdir": ("mkdir", "-p", endpoint, "/made/by/remote"),
            "rm_dir": ("rm", endpoint, "/docs"),
        })
        ok(r["get"])
        assert snapshot(out / "local") == snapshot(local)
        ok(r["mkdir"])
        assert (share / "made" / "by" / "remote").is_dir()
        assert "use -r" in failed(r["rm_dir"])
        assert proc.poll() is None  # still serving after all of that
    assert proc.returncode == 0  # SIGTERM is a clean stop
    assert_no_daemon_left(share)


def test_serve_reports_a_bad_endpoint_in_one_line(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    line = failed(cli("serve", share, "--bind", "bogus://nowhere"))
    assert "bogus://nowhere" in line
    assert_no_daemon_left(share)


def test_console_script_is_installed() -> None:
    script = shutil.which("pyvirtiofs", path=str(Path(sys.executable).parent))
    assert script is not None, "pip install -e . installs the pyvirtiofs command"
