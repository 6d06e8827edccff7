"""Escape attempts against the agent: every attack must fail with the errno Linux gives,
while the same kind of call succeeds inside the tenant's root; the host files outside the
roots are checked unchanged at the end.

Every attack runs against two tenants with the same layout: ``alice`` (a folder share:
the agent's own virtiofsd serves exactly the root) and ``dave`` (a socket share: the
daemon serves the whole share and the session confines the tenant to ``root``), so both
confinement mechanisms are attacked. Host layout (``H`` is a temporary directory)::

    H/outside/secret.txt, H/outside/dir/s2.txt         never reachable
    H/<mode>/share/above.txt, above_dir/x.txt           in the share, above the root
    H/<mode>/share/root/inside.txt, sub/deep.txt        the tenant's files
    H/<mode>/share/root/planted_abs -> H/outside/secret.txt   (planted on the host)
    H/<mode>/share/root/planted_rel -> ../../../outside/secret.txt
    H/<mode>/share/root/planted_above -> ../above.txt
    H/<mode>/share/root/planted_dir_abs -> H/outside
    H/<mode>/share/root/planted_dir_up -> ..
    H/<mode>/share/root/sub/planted_deep -> ../../above_dir
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat as stat_mod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtiofs.actors import messages as m
from pyvirtiofs.api.agent import LimitsConfig, TenantConfig, confine
from pyvirtiofs.api.fs import ShareFS
from pyvirtiofs.api.remote import wire
from pyvirtiofs.hw.vhost_user.launcher import Virtiofsd
from tests.api.agent.harness import AgentProc, op_strategy, start_agent

MODES = ("alice", "dave")  # folder share (daemon on the root) / socket share (session root)


@dataclass
class Env:
    agent: AgentProc
    host: Path
    clients: dict[str, ShareFS]
    snapshot: dict[str, Any]

    def root(self, tenant: str) -> Path:
        mode = "folder" if tenant == "alice" else "socket"
        return self.host / mode / "share" / "root"


def _layout(host: Path) -> None:
    (host / "outside" / "dir").mkdir(parents=True)
    (host / "outside" / "secret.txt").write_bytes(b"top secret\n")
    (host / "outside" / "dir" / "s2.txt").write_bytes(b"also secret\n")
    for mode in ("folder", "socket"):
        share = host / mode / "share"
        (share / "above_dir").mkdir(parents=True)
        (share / "above.txt").write_bytes(b"above the root\n")
        (share / "above_dir" / "x.txt").write_bytes(b"x\n")
        root = share / "root"
        (root / "sub").mkdir(parents=True)
        (root / "inside.txt").write_bytes(b"inside\n")
        (root / "sub" / "deep.txt").write_bytes(b"deep\n")
        (root / "planted_abs").symlink_to(host / "outside" / "secret.txt")
        (root / "planted_rel").symlink_to("../../../outside/secret.txt")
        (root / "planted_above").symlink_to("../above.txt")
        (root / "planted_dir_abs").symlink_to(host / "outside")
        (root / "planted_dir_up").symlink_to("..")
        (root / "sub" / "planted_deep").symlink_to("../../above_dir")
    for tenant in ("bob", "reader"):
        (host / tenant).mkdir()
        (host / tenant / "mine.txt").write_bytes(f"{tenant}'s\n".encode())
    (host / "reader" / "dir").mkdir()


def _snapshot(host: Path) -> dict[str, Any]:
    """Everything on the host that no tenant may touch: all but the tenants' own trees."""
    roots = {host / "folder" / "share" / "root", host / "socket" / "share" / "root",
             host / "bob"}
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(host, followlinks=False):
        here = Path(dirpath)
        if here in roots:
            dirnames[:] = []
            continue
        for name in sorted(dirnames + filenames):
            p = here / name
            st = p.lstat()
            if stat_mod.S_ISLNK(st.st_mode):
                out[str(p)] = ("link", os.readlink(p))
            elif stat_mod.S_ISREG(st.st_mode):
                out[str(p)] = ("file", st.st_mode, st.st_uid, st.st_nlink,
                               hashlib.sha256(p.read_bytes()).hexdigest(), _xattrs(p))
            else:
                out[str(p)] = ("other", st.st_mode, st.st_uid)
    return out


def _xattrs(p: Path) -> list[str]:
    try:
        return sorted(os.listxattr(p, follow_symlinks=False))
    except OSError:
        return []


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    host = tmp_path_factory.mktemp("confine")
    _layout(host)
    daemon = Virtiofsd(host / "socket" / "share").start()
    try:
        agent = start_agent(tmp_path_factory.mktemp("agent"), {
            "alice": {"share": str(host / "folder" / "share"), "root": "root"},
            "dave": {"socket": daemon.socket_path, "root": "root"},
            "bob": {"share": str(host / "bob")},
            "reader": {"share": str(host / "reader"), "read_only": True},
        })
        try:
            clients = {t: agent.client(t) for t in ("alice", "dave", "bob", "reader")}
            yield Env(agent, host, clients, _snapshot(host))
        finally:
            assert agent.terminate() == 0
    finally:
        daemon.stop()


# -- the attacks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """``attack`` must raise OSError(``errno``); ``control`` (the same kind of call, inside
    the root) must succeed. Names created are unique per attack."""

    name: str
    errno: int
    attack: Callable[[ShareFS, Env], Any]
    control: Callable[[ShareFS, Env], Any] | None = None


def _open(fs: ShareFS, path: Any, flags: int) -> None:
    fs.open_raw(path, flags, 0o644).close()


def _symlink_then(target: str, link: str, then: Callable[[ShareFS], Any]) -> Callable[..., Any]:
    def run(fs: ShareFS, env: Env) -> Any:
        fs.symlink(target, link)
        return then(fs)
    return run


def _foreign_handle(fs: ShareFS, env: Env) -> None:
    owner = env.clients["bob"]
    handle, _ = owner._open_file(m.Open(path=b"mine.txt", flags=os.O_RDONLY))
    try:
        fs._ask_handle(handle, m.Read(size=100))
    finally:
        owner._close_handle(handle)


def _other_connection_handle(fs: ShareFS, env: Env) -> None:
    tenant = "alice" if fs is env.clients["alice"] else "dave"
    other = env.agent.client(tenant)
    try:
        handle, _ = other._open_file(m.Open(path=b"inside.txt", flags=os.O_RDONLY))
        fs._ask_handle(handle, m.Read(size=100))
    finally:
        other.close()


def _own_handle(fs: ShareFS, env: Env) -> None:
    handle, _ = fs._open_file(m.Open(path=b"inside.txt", flags=os.O_RDONLY))
    try:
        assert fs._ask_handle(handle, m.Read(size=100)) == b"inside\n"
    finally:
        fs._close_handle(handle)


def _host(env: Env, *parts: str) -> str:
    return str(env.host.joinpath(*parts))


W, C, T, X = os.O_WRONLY, os.O_CREAT, os.O_TRUNC, os.O_EXCL
ENOENT, EEXIST, ELOOP = errno.ENOENT, errno.EEXIST, errno.ELOOP

ATTACKS: list[Attack] = [
    # -- ".." ------------------------------------------------------------------------------
    Attack("stat ../ above the root", ENOENT, lambda fs, e: fs.stat("../above.txt"),
           lambda fs, e: fs.stat("inside.txt")),
    Attack("stat sub/../../ above the root", ENOENT,
           lambda fs, e: fs.stat("sub/../../above.txt"),
           lambda fs, e: fs.stat("sub/../inside.txt")),
    Attack("read ../../../outside", ENOENT,
           lambda fs, e: fs.read_bytes("../../../outside/secret.txt"),
           lambda fs, e: fs.read_bytes("sub/../sub/deep.txt")),
    Attack("list ../above_dir", ENOENT, lambda fs, e: fs.listdir("../above_dir"),
           lambda fs, e: fs.listdir("sub")),
    Attack("mkdir in ../../outside", ENOENT, lambda fs, e: fs.mkdir("../../outside/dd_new"),
           lambda fs, e: fs.mkdir("../dd_made_at_root")),
    Attack("unlink ../above.txt", ENOENT, lambda fs, e: fs.remove("../above.txt"),
           lambda fs, e: (fs.write_bytes("ul_tmp", b"1"), fs.remove("../ul_tmp"))),
    Attack("rmdir ../above_dir", ENOENT, lambda fs, e: fs.rmdir("../../above_dir"),
           lambda fs, e: (fs.mkdir("rd_tmp"), fs.rmdir("../rd_tmp"))),
    Attack("rename out through ..", ENOENT,
           lambda fs, e: fs.rename("sub/deep.txt", "../../outside/deep.txt"),
           lambda fs, e: (fs.rename("sub/deep.txt", "../sub/deep2.txt"),
                          fs.rename("sub/deep2.txt", "sub/deep.txt"))),
    Attack("rename in from ..", ENOENT, lambda fs, e: fs.rename("../above.txt", "rn_stolen"),
           lambda fs, e: (fs.write_bytes("rn_a", b"1"), fs.rename("rn_a", "rn_b"))),
    Attack("hard link from ..", ENOENT, lambda fs, e: fs.link("../above.txt", "hl_above"),
           lambda fs, e: fs.link("inside.txt", "hl_inside")),
    Attack("chmod through ..", ENOENT, lambda fs, e: fs.chmod("../above.txt", 0o777),
           lambda fs, e: fs.chmod("inside.txt", 0o644)),
    Attack("truncate through ..", ENOENT, lambda fs, e: fs.truncate("../above.txt", 0),
           lambda fs, e: (fs.write_bytes("tr_tmp", b"123"), fs.truncate("tr_tmp", 1))),
    # -- absolute paths ---------------------------------------------------------------------
    Attack("absolute host path", ENOENT,
           lambda fs, e: fs.read_bytes(_host(e, "outside", "secret.txt")),
           lambda fs, e: fs.read_bytes("/inside.txt")),
    Attack("absolute /etc/passwd", ENOENT, lambda fs, e: fs.stat("/etc/passwd"),
           lambda fs, e: fs.stat("/sub/deep.txt")),
    Attack("absolute /../../", ENOENT,
           lambda fs, e: fs.stat("/../../../outside/secret.txt"),
           lambda fs, e: fs.stat("/../../inside.txt")),
    # -- symlinks the tenant makes ----------------------------------------------------------
    Attack("own relative symlink to ..", ENOENT,
           _symlink_then("../above.txt", "sl_rel", lambda fs: fs.read_bytes("sl_rel")),
           _symlink_then("inside.txt", "sl_rel_ok", lambda fs: fs.read_bytes("sl_rel_ok"))),
    Attack("own absolute symlink to the host", ENOENT,
           lambda fs, e: _symlink_then(_host(e, "outside", "secret.txt"), "sl_abs",
                                       lambda fs: fs.read_bytes("sl_abs"))(fs, e),
           _symlink_then("/inside.txt", "sl_abs_ok", lambda fs: fs.read_bytes("sl_abs_ok"))),
    Attack("own symlink as a middle component", ENOENT,
           _symlink_then("../..", "sl_up", lambda fs: fs.stat("sl_up/above.txt")),
           lambda fs, e: fs.stat("sl_up/inside.txt")),
    Attack("own symlink chain", ENOENT,
           lambda fs, e: (fs.symlink("sl_c2", "sl_c1"),
                          fs.symlink("../../../outside", "sl_c2"),
                          fs.stat("sl_c1/secret.txt")),
           lambda fs, e: (fs.symlink("sl_c4", "sl_c3"), fs.symlink("sub", "sl_c4"),
                          fs.stat("sl_c3/deep.txt"))),
    Attack("O_CREAT through own dangling symlink", ENOENT,
           _symlink_then("../../../outside/sl_created", "sl_dang",
                         lambda fs: _open(fs, "sl_dang", W | C)),
           _symlink_then("sub/sl_created_ok", "sl_dang_ok",
                         lambda fs: _open(fs, "sl_dang_ok", W | C))),
    Attack("symlink loop", ELOOP,
           lambda fs, e: (fs.symlink("sl_l2", "sl_l1"), fs.symlink("sl_l1", "sl_l2"),
                          fs.stat("sl_l1"))),
    # -- symlinks planted on the host --------------------------------------------------------
    Attack("planted absolute symlink", ENOENT, lambda fs, e: fs.read_bytes("planted_abs"),
           lambda fs, e: fs.readlink("planted_abs")),
    Attack("planted relative symlink", ENOENT, lambda fs, e: fs.read_bytes("planted_rel")),
    Attack("planted symlink to above the root", ENOENT,
           lambda fs, e: fs.read_bytes("planted_above")),
    Attack("planted dir symlink as a component", ENOENT,
           lambda fs, e: fs.stat("planted_dir_abs/secret.txt")),
    Attack("planted .. symlink as a component", ENOENT,
           lambda fs, e: fs.stat("planted_dir_up/above.txt"),
           lambda fs, e: fs.stat("planted_dir_up/inside.txt")),
    Attack("planted symlink deep in the tree", ENOENT,
           lambda fs, e: fs.listdir("sub/planted_deep")),
    Attack("list a planted dir symlink", ENOENT, lambda fs, e: fs.listdir("planted_dir_abs")),
    Attack("O_CREAT|O_TRUNC through planted absolute symlink", ENOENT,
           lambda fs, e: _open(fs, "planted_abs", W | C | T),
           lambda fs, e: _open(fs, "pl_created", W | C | T)),
    Attack("O_CREAT through planted relative symlink", ENOENT,
           lambda fs, e: _open(fs, "planted_rel", W | C)),
    Attack("O_TRUNC through planted symlink to above", ENOENT,
           lambda fs, e: _open(fs, "planted_above", W | T)),
    Attack("O_CREAT|O_EXCL on a planted symlink", EEXIST,
           lambda fs, e: _open(fs, "planted_abs", W | C | X),
           lambda fs, e: _open(fs, "pl_excl_new", W | C | X)),
    Attack("O_NOFOLLOW on a planted symlink", ELOOP,
           lambda fs, e: _open(fs, "planted_abs", os.O_RDONLY | os.O_NOFOLLOW),
           lambda fs, e: _open(fs, "inside.txt", os.O_RDONLY | os.O_NOFOLLOW)),
    Attack("chmod through a planted symlink", ENOENT,
           lambda fs, e: fs.chmod("planted_abs", 0o777)),
    Attack("setxattr through a planted symlink", ENOENT,
           lambda fs, e: fs.setxattr("planted_abs", "user.x", b"1"),
           lambda fs, e: fs.setxattr("inside.txt", "user.x", b"1")),
    Attack("rename into a planted dir symlink", ENOENT,
           lambda fs, e: fs.rename("inside.txt", "planted_dir_abs/stolen.txt")),
    Attack("mkdir inside a planted dir symlink", ENOENT,
           lambda fs, e: fs.mkdir("planted_dir_abs/pl_newdir")),
    Attack("hard link to a planted symlink, then follow it", ENOENT,
           lambda fs, e: (fs.link("planted_abs", "hl_planted"), fs.read_bytes("hl_planted"))),
    # -- handle ids --------------------------------------------------------------------------
    Attack("another tenant's handle id", errno.EBADF, _foreign_handle, _own_handle),
    Attack("another connection's handle id", errno.EBADF, _other_connection_handle),
    Attack("a made-up handle id", errno.EBADF,
           lambda fs, e: fs._ask_handle(0x2545F4914F6CDD1D, m.Read(size=10))),
    # -- names and path lengths ---------------------------------------------------------------
    Attack("a name of 256 bytes", errno.ENAMETOOLONG,
           lambda fs, e: _open(fs, "n" * 256, W | C),
           lambda fs, e: _open(fs, "n" * 255, W | C)),
    Attack("a path of 4096 bytes", errno.ENAMETOOLONG,
           lambda fs, e: fs.stat("./" * 2043 + "inside.txt"),
           lambda fs, e: fs.stat("./" * 2042 + "inside.txt")),
    Attack("NUL in a name", errno.EINVAL,
           lambda fs, e: fs._ask(m.Stat(path=b"inside.txt\0/../../../outside/secret.txt"))),
    Attack("empty path", ENOENT, lambda fs, e: fs.stat("")),
    Attack("mkdir of the root", EEXIST, lambda fs, e: fs.mkdir("/")),
    Attack("a file used as a directory", errno.ENOTDIR, lambda fs, e: fs.stat("inside.txt/x")),
    Attack("trailing slash on a new file", errno.EISDIR,
           lambda fs, e: _open(fs, "nm_new/", W | C)),
    Attack("empty xattr name", errno.ERANGE, lambda fs, e: fs.getxattr("inside.txt", "")),
    # -- privileges a tenant never has ---------------------------------------------------------
    Attack("a device node", errno.EPERM,
           lambda fs, e: fs._ask(m.MakeNode(path=b"pv_mem", mode=stat_mod.S_IFCHR | 0o666,
                                            rdev=os.makedev(1, 1))),
           lambda fs, e: fs.mkfifo("pv_fifo")),
    Attack("chown to another owner", errno.EPERM,
           lambda fs, e: fs.chown("inside.txt", 12345, 12345),
           lambda fs, e: fs.chown("inside.txt", -1, -1)),
    Attack("set-user-ID bit", errno.EPERM, lambda fs, e: fs.chmod("inside.txt", 0o4755),
           lambda fs, e: fs.chmod("inside.txt", 0o755)),
    Attack("trusted.* xattr", errno.EPERM,
           lambda fs, e: fs.setxattr("inside.txt", "trusted.evil", b"1")),
    Attack("O_PATH", errno.EINVAL, lambda fs, e: _open(fs, "inside.txt", os.O_PATH)),
]


@pytest.mark.parametrize("tenant", MODES)
@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_escape_attempt_fails(env: Env, tenant: str, attack: Attack) -> None:
    fs = env.clients[tenant]
    with pytest.raises(OSError) as info:
        attack.attack(fs, env)
    assert info.value.errno == attack.errno, (
        f"{attack.name}: expected {errno.errorcode[attack.errno]}, got "
        f"{errno.errorcode.get(info.value.errno or 0, info.value.errno)}: {info.value}")
    if attack.control is not None:
        attack.control(fs, env)


def test_at_least_30_distinct_attacks() -> None:
    assert len({a.name for a in ATTACKS}) == len(ATTACKS) >= 30


def test_dot_dot_at_the_root_is_the_root(env: Env) -> None:
    for tenant in MODES:
        fs = env.clients[tenant]
        assert sorted(fs.listdir("..")) == sorted(fs.listdir("/"))
        assert "above.txt" not in fs.listdir("../..")
        assert fs.stat("..").st_ino == fs.stat("/").st_ino


# -- read-only tenants ----------------------------------------------------------------------

RO = errno.EROFS
READ_ONLY_CALLS: list[tuple[str, Callable[[ShareFS], Any]]] = [
    ("write a new file", lambda fs: fs.write_bytes("new.txt", b"x")),
    ("open O_WRONLY", lambda fs: _open(fs, "mine.txt", os.O_WRONLY)),
    ("open O_RDWR", lambda fs: _open(fs, "mine.txt", os.O_RDWR)),
    ("open O_RDONLY|O_CREAT", lambda fs: _open(fs, "mine.txt", os.O_RDONLY | os.O_CREAT)),
    ("open O_RDONLY|O_TRUNC", lambda fs: _open(fs, "mine.txt", os.O_RDONLY | os.O_TRUNC)),
    ("mkdir", lambda fs: fs.mkdir("d")),
    ("mkfifo", lambda fs: fs.mkfifo("f")),
    ("unlink", lambda fs: fs.remove("mine.txt")),
    ("rmdir", lambda fs: fs.rmdir("dir")),
    ("rename", lambda fs: fs.rename("mine.txt", "yours.txt")),
    ("hard link", lambda fs: fs.link("mine.txt", "l")),
    ("symlink", lambda fs: fs.symlink("mine.txt", "s")),
    ("chmod", lambda fs: fs.chmod("mine.txt", 0o600)),
    ("chown to oneself", lambda fs: fs.chown("mine.txt", -1, -1)),
    ("truncate", lambda fs: fs.truncate("mine.txt", 0)),
    ("utime", lambda fs: fs.utime("mine.txt", (1, 1))),
    ("setxattr", lambda fs: fs.setxattr("mine.txt", "user.a", b"1")),
    ("removexattr", lambda fs: fs.removexattr("mine.txt", "user.a")),
    ("access W_OK", lambda fs: fs._ask(m.Access(path=b"mine.txt", mode=os.W_OK))),
    ("write on a read handle", lambda fs: _write_on_read_handle(fs)),
]


def _write_on_read_handle(fs: ShareFS) -> None:
    handle, _ = fs._open_file(m.Open(path=b"mine.txt", flags=os.O_RDONLY))
    try:
        fs._ask_handle(handle, m.Write(data=b"x", offset=0))
    finally:
        fs._close_handle(handle)


@pytest.mark.parametrize("call", READ_ONLY_CALLS, ids=[c[0] for c in READ_ONLY_CALLS])
def test_read_only_tenant_gets_erofs(env: Env, call: tuple[str, Callable[[ShareFS], Any]]
                                     ) -> None:
    fs = env.clients["reader"]
    with pytest.raises(OSError) as info:
        call[1](fs)
    assert info.value.errno == RO, f"{call[0]}: {info.value!r}"
    # ... while reading works.
    assert fs.read_bytes("mine.txt") == b"reader's\n"
    assert sorted(fs.listdir("/")) == ["dir", "mine.txt"]
    assert fs._ask(m.Access(path=b"mine.txt", mode=os.R_OK)) is None


# -- afterwards ------------------------------------------------------------------------------


def test_host_outside_the_roots_is_unchanged(env: Env) -> None:
    """Run last (file order): nothing above any root was created, changed or removed."""
    after = _snapshot(env.host)
    assert after == env.snapshot
    assert not (env.host / "outside" / "sl_created").exists()
    # What the tenants did create landed inside their roots.
    for tenant in MODES:
        root = env.root(tenant)
        assert (root / "dd_made_at_root").is_dir()
        assert (root / "sub" / "sl_created_ok").is_file()
        assert (root / "pl_created").is_file()
        assert (root / "hl_inside").stat().st_ino == (root / "inside.txt").stat().st_ino
    assert (env.host / "reader" / "mine.txt").read_bytes() == b"reader's\n"


# -- the door itself, without a daemon --------------------------------------------------------


@settings(max_examples=1500, deadline=None, database=None)
@given(op=st.sampled_from(wire.SESSION_OPS + wire.HANDLE_OPS).flatmap(op_strategy),
       read_only=st.booleans())
def test_confine_answers_any_message_with_an_oserror_or_a_safe_message(
        op: Any, read_only: bool) -> None:
    tc = TenantConfig(id="t", public_key=b"k" * 40, share="/srv", socket=None, root="",
                      read_only=read_only, uid=1000, gid=1000, limits=LimitsConfig(),
                      source="/srv")
    try:
        out = confine(tc, op)
    except OSError as exc:
        assert exc.errno
        return
    for name in ("mode", "umask", "rdev", "flags"):
        value = getattr(out, name, None)
        assert value is None or 0 <= value <= 0xFFFFFFFF
    if isinstance(out, (m.Open, m.MakeDir, m.MakeNode)):
        assert not out.mode & stat_mod.S_ISUID
    if read_only:
        assert not isinstance(out, (m.MakeDir, m.Unlink, m.Write, m.SetAttr, m.Rename))
