"""No root needed: the core behaviour suite once more as an ordinary user, the files that user
creates are theirs, and where a user namespace cannot be made the error says what is
missing.

The tests switch to a uid that names no user (``setpriv``; nothing is added to the system)
and run an interpreter that user can execute: ``scripts/setup.sh`` makes
``.cache/unprivileged-venv`` from the system's Python (the project's own ``.venv`` may use an
interpreter under root's home, which other users cannot run). The checkout under test is
copied to a world-readable temporary folder, laid out as the installed package
(``pyvirtiofs/api``, ``pyvirtiofs/actors``, …), so the code that runs is this checkout's;
the environment is copied too when the user cannot read it where it is.

As any other user, the suite itself already runs unprivileged: these tests then have no
second user to switch to and are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import REPO
from tests.api.test_cli import UNNAMED

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root to switch to another user (the suite "
                                       "already runs unprivileged)")

VENV = REPO / ".cache" / "unprivileged-venv"
SETPRIV = shutil.which("setpriv") or "setpriv"
PACKAGES = {"pyvirtiofs": "pyvirtiofs", "api": "pyvirtiofs/api", "actors": "pyvirtiofs/actors",
            "codec": "pyvirtiofs/codec", "hw": "pyvirtiofs/hw"}
TESTS = ["tests/__init__.py", "tests/conftest.py", "tests/osfs.py", "tests/api/__init__.py",
         "tests/api/test_behaviour.py"]

@dataclass
class User:
    uid: int
    python: str  # an interpreter (with the dependencies) this user can run
    src: Path  # the checkout, as the installed package, readable by the user
    home: Path  # the user's own folder (HOME, temporary files)
    setup_seconds: float

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.home),
                "LC_ALL": "C.UTF-8", "PYTHONPATH": str(self.src),
                "PYTHONDONTWRITEBYTECODE": "1", **extra}

    def argv(self, *args: str) -> list[str]:
        return [SETPRIV, f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups",
                self.python, *args]

    def run(self, *args: str, timeout: float = 120, **extra: str,
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True,
                              env=self.env(**extra), cwd=self.src, timeout=timeout,
                              check=False)

    def folder(self, name: str) -> Path:
        """A new folder owned by the user."""
        path = self.home / name
        path.mkdir()
        os.chown(path, self.uid, self.uid)
        return path


def _copy_checkout(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder, target in PACKAGES.items():
        shutil.copytree(REPO / folder, dst / target, ignore=ignore, dirs_exist_ok=True)
    for name in TESTS:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dst / name)
    shutil.copy2(REPO / "pyproject.toml", dst / "pyproject.toml")


def _can_run(uid: int, python: str) -> bool:
    probe = subprocess.run(
        [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", python, "-c",
         "import msgspec, pykka, pytest, tqdm, zmq"],
        capture_output=True, env={"PATH": "/usr/bin:/bin", "HOME": "/"}, check=False,
        timeout=60)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    started = time.monotonic()
    if not (VENV / "bin" / "python").exists():
        pytest.fail(f"{VENV} is missing: scripts/setup.sh makes it (bash run.sh test runs it)")
    uid = UNNAMED[0]
    work = Path(tempfile.mkdtemp(prefix="pyvirtiofs-unprivileged-"))
    try:
        os.chmod(work, 0o755)
        src = work / "src"
        _copy_checkout(src)
        python = str(VENV / "bin" / "python")
        if not _can_run(uid, python):
            # The checkout (and the environment in it) is not readable by others here:
            # bring the environment along too.
            shutil.copytree(VENV, work / "venv", symlinks=True)
            python = str(work / "venv" / "bin" / "python")
            if not _can_run(uid, python):
                pytest.fail(f"user {uid} cannot run {python}: scripts/setup.sh makes "
                            f"{VENV} from an interpreter every user can run")
        for dirpath, dirs, files in os.walk(work):
            for name in [*dirs, *files]:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p):
                    os.chmod(p, os.lstat(p).st_mode | 0o444 | (0o111 if name in dirs else 0))
        home = work / "home"
        home.mkdir()
        os.chown(home, uid, uid)
        yield User(uid, python, src, home, time.monotonic() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the behaviour suite, unprivileged ----------------------------------------------------


@pytest.mark.timeout(600)
def test_behaviour_suite_passes_as_an_ordinary_user(user: User) -> None:
    res = user.run("-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                   f"--basetemp={user.folder('pytest')}", "tests/api/test_behaviour.py",
                   timeout=540)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    summary = out.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, out
    print(f"set-up {user.setup_seconds:.1f} s; {summary}")


# -- ownership and credentials ------------------------------------------------------------

_OWNERSHIP = textwrap.dedent("""
    import errno, json, os, sys
    import pyvirtiofs
    from pyvirtiofs.api.local import VirtioFS
    from pyvirtiofs.hw.vhost_user.launcher import UserNamespace, Virtiofsd
    from pyvirtiofs.hw.vhost_user.transport import VhostUserTransport

    def exercise(fs, tag):
        fs.write_bytes(f"file-{tag}", b"mine")
        fs.mkdir(f"dir-{tag}")
        fs.symlink("target", f"link-{tag}")
        fs.mkfifo(f"fifo-{tag}")
        with fs.open(f"dir-{tag}/nested", "w") as f:
            f.write("nested")
        out = {"uid": fs.stat(f"file-{tag}").st_uid, "gid": fs.stat(f"file-{tag}").st_gid,
               "credentials": fs.transport.default_credentials,
               "userns": fs.transport.daemon.userns.value,
               "read_root_file": fs.read_bytes("root-file").decode()}
        with open(f"/proc/{fs.daemon_pid}/comm") as f:
            out["daemon"] = f.read().strip()  # the worker, below unshare and its parent
        with open(f"/proc/{fs.daemon_pid}/task/{fs.daemon_pid}/children") as f:
            out["daemon_children"] = f.read().split()
        try:
            fs.write_bytes("root-file", b"overwritten")
            out["write_root_file"] = "written"
        except OSError as exc:
            out["write_root_file"] = errno.errorcode[exc.errno]
        return out

    share = sys.argv[1]
    result = {}
    with pyvirtiofs.connect(share) as fs:
        result["default"] = exercise(fs, "default")
    daemon = Virtiofsd(share, userns=UserNamespace.ROOT).start()
    with VirtioFS(VhostUserTransport.connect(daemon.socket_path, daemon=daemon)) as fs:
        result["root"] = exercise(fs, "root")
    print(json.dumps(result))
""")


@pytest.mark.timeout(240)
def test_files_an_ordinary_user_creates_are_theirs(user: User) -> None:
    share = user.folder("share")
    (share / "root-file").write_text("root's\n")  # root's, mode 0644: readable, not writable
    res = user.run("-c", _OWNERSHIP, str(share))
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    u = user.uid
    # In a namespace where the user stays themselves, requests carry their own ids, and
    # the share shows the real owner; where the user is root, requests carry 0, which the
    # kernel maps back to them (the share shows 0).
    assert result["default"]["userns"] == "identity"
    assert result["default"]["credentials"] is None
    assert (result["default"]["uid"], result["default"]["gid"]) == (u, u)
    assert result["root"]["userns"] == "root"
    assert result["root"]["credentials"] == [0, 0]
    assert (result["root"]["uid"], result["root"]["gid"]) == (0, 0)
    for tag in ("default", "root"):
        for name in (f"file-{tag}", f"dir-{tag}", f"link-{tag}", f"fifo-{tag}",
                     f"dir-{tag}/nested"):
            st = os.lstat(share / name)
            assert (st.st_uid, st.st_gid) == (u, u), (name, st)
        assert (share / f"file-{tag}").read_bytes() == b"mine"
        # Other users' files are as out of reach as they are for the user on the host.
        assert result[tag]["read_root_file"] == "root's\n"
        assert result[tag]["write_root_file"] == "EACCES"
        assert result[tag]["daemon"] == "virtiofsd"
        assert result[tag]["daemon_children"] == []
    assert (share / "root-file").read_text() == "root's\n"


# -- what is missing, said clearly ---------------------------------------------------------

_NO_USERNS = textwrap.dedent("""
    import ctypes, os, sys
    CLONE_NEWUSER = 0x10000000
    uid, argv = int(sys.argv[1]), sys.argv[2:]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        # A user namespace of its own (root inside, with every id mapped), where no further
        # user namespace may be made; then the ordinary user, and the command.
        os.close(w)
        if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWUSER) != 0:
            os._exit(90)
        os.read(r, 1)
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        os.execv(argv[0], argv)
    os.close(r)
    mine = os.readlink("/proc/self/ns/user")
    while os.readlink(f"/proc/{pid}/ns/user") == mine:
        os.sched_yield()
    for kind in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{kind}", "w") as f:
            f.write("0 0 65536\\n")
    os.write(w, b"x")
    sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
""")


@pytest.mark.timeout(240)
def test_without_user_namespaces_the_error_says_what_is_missing(user: User) -> None:
    share = user.folder("share-no-userns")
    res = subprocess.run([sys.executable, "-c", _NO_USERNS, str(user.uid), user.python, "-m",
                          "pyvirtiofs", "ls", str(share)], capture_output=True, text=True,
                         env=user.env(), cwd=user.src, timeout=120, check=False)
    assert res.returncode == 1, res.stderr
    assert res.stdout == ""
    line = res.stderr.strip()
    assert "\n" not in line, line
    assert line.startswith("pyvirtiofs: virtiofsd needs root, or a user namespace to run in, "
                           "and this user cannot make one here ("), line
    assert "user.max_user_namespaces = 0" in line, line
    assert "run as root, allow unprivileged user namespaces" in line, line


def test_without_unshare_the_error_says_what_is_missing(user: User) -> None:
    share = user.folder("share-no-unshare")
    empty = user.folder("empty-path")  # a PATH where unshare is not
    res = user.run("-m", "pyvirtiofs", "ls", str(share), PATH=str(empty))
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip() == ("pyvirtiofs: virtiofsd needs root, or the unshare command "
                                  "(util-linux) to run it in a user namespace; neither is "
                                  "available"), res.stderr
