"""The Python surface beyond ``os``: ``os.path`` helpers, ``walk``, ``scandir`` as a
context manager, the ``shutil`` operations and the ``pathlib``-style path — in-process
and remote alike, each compared with the standard library on the host's copy of the same
tree (results and errnos)."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofs import connect, connect_remote
from pyvirtiofs.api.remote.server import ShareServer, Tenant

pytestmark = pytest.mark.daemon

PROBES = ["f", "d", "d/g", "ld", "ld/g", "lf", "dangling", "loop", "f/x", "d/..", "d/../f",
          "ld/", "f/", "missing", "d/sub/deep", "ld/../f"]


def make_tree(root: Path) -> None:
    (root / "d" / "sub").mkdir(parents=True)
    (root / "f").write_bytes(b"0123456789")
    (root / "d" / "g").write_bytes(b"g" * 3000)
    (root / "d" / "sub" / "deep").write_bytes(b"deep")
    (root / ".hidden").write_bytes(b"h")
    os.symlink("d", root / "ld")
    os.symlink("f", root / "lf")
    os.symlink("nowhere", root / "dangling")
    os.symlink("loop", root / "loop")
    os.chmod(root / "d" / "g", 0o640)
    os.utime(root / "f", ns=(1_600_000_000_123_456_789, 1_600_000_001_987_654_321))


@pytest.fixture(params=["local", "remote"])
def env(request: pytest.FixtureRequest, share: Path) -> Iterator[tuple[Any, Path]]:
    make_tree(share)
    local = connect(share)
    try:
        if request.param == "local":
            yield local, share
        else:
            with ShareServer("tcp://127.0.0.1:0", tenant=Tenant("t", local)) as server, \
                    connect_remote(server.endpoints[0], timeout=30) as remote:
                yield remote, share
    finally:
        local.close()


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except OSError as exc:
        return "err", errno.errorcode.get(exc.errno or 0, exc.errno)


def test_os_path_helpers_answer_as_os_path(env: tuple[Any, Path]) -> None:
    fs, host = env
    for p in PROBES:
        h = str(host / p) + ("/" if p.endswith("/") else "")
        for name in ("exists", "lexists", "isfile", "isdir", "islink"):
            assert getattr(fs, name)(p) == getattr(os.path, name)(h), (name, p)
        for name in ("getsize", "getmtime"):
            assert outcome(lambda n=name, p=p: getattr(fs, n)(p)) == outcome(
                lambda n=name, h=h: getattr(os.path, n)(h)), (name, p)
        for mode in (os.F_OK, os.R_OK, os.W_OK, os.X_OK):
            assert fs.access(p, mode) == os.access(h, mode), (p, mode)
    assert fs.samefile("ld/g", "d/g") and not fs.samefile("f", "d/g")
    assert outcome(lambda: fs.samefile("missing", "f"))[1] == "ENOENT"


@pytest.mark.parametrize("p", ["ld/g", "ld/sub/../g", "lf", "d/./sub/..", "dangling",
                               "loop", "missing/x", "/ld/", "d/sub/deep"])
def test_realpath_resolves_links_inside_the_share(env: tuple[Any, Path], p: str) -> None:
    fs, host = env
    want = os.path.relpath(os.path.realpath(os.path.join(host, p.lstrip("/"))), host)
    assert fs.realpath(p) == ("/" if want == "." else "/" + want)


def _relative_walk(walk: Iterator[tuple[Any, list[Any], list[Any]]], base: str,
                   ) -> list[tuple[str, list[str], list[str]]]:
    return [(os.path.relpath(d, base), sorted(ds), sorted(fs)) for d, ds, fs in walk]


@pytest.mark.parametrize(("topdown", "followlinks"), [(True, False), (False, False),
                                                      (True, True)])
def test_walk_is_os_walk(env: tuple[Any, Path], topdown: bool, followlinks: bool) -> None:
    fs, host = env
    mine = _relative_walk(fs.walk("/", topdown=topdown, followlinks=followlinks), "/")
    theirs = _relative_walk(os.walk(host, topdown=topdown, followlinks=followlinks), str(host))
    assert sorted(mine) == sorted(theirs)
    if not topdown:  # children before their parents, as os.walk
        order = [d for d, _, _ in mine]
        assert order.index("d/sub") < order.index("d") < order.index(".")


def test_walk_pruning_and_errors(env: tuple[Any, Path]) -> None:
    fs, host = env
    seen = []
    for top, dirs, _ in fs.walk("/"):
        seen.append(top)
        dirs[:] = [d for d in dirs if d != "d"]  # pruned: never entered
    assert seen == ["/"]
    errors: list[OSError] = []
    assert list(fs.walk("missing", onerror=errors.append)) == []
    assert [e.errno for e in errors] == [errno.ENOENT]
    assert list(fs.walk("f", onerror=errors.append)) == []  # a file: ENOTDIR, as os.walk
    assert errors[-1].errno == errno.ENOTDIR == _os_walk_error(host / "f")


def _os_walk_error(path: Path) -> int | None:
    found: list[OSError] = []
    list(os.walk(path, onerror=found.append))
    return found[0].errno if found else None


def test_scandir_is_a_context_manager(env: tuple[Any, Path]) -> None:
    fs, host = env
    with fs.scandir("d") as it:
        first = next(it)
        assert first.name in ("g", "sub")
    with pytest.raises(StopIteration):
        next(it)  # closed: nothing more
    def view(entries: Any) -> list[tuple[Any, ...]]:
        return sorted((e.name, outcome(e.is_dir), outcome(e.is_file), e.is_symlink(),
                       e.is_dir(follow_symlinks=False)) for e in entries)

    with fs.scandir("/") as it, os.scandir(host) as want:
        assert view(it) == view(want)


def _tree(root: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), Path(p).read_bytes(),
                            st.st_mtime_ns)
    return out


@pytest.mark.parametrize("symlinks", [True, False])
def test_copytree_copy2_rmtree_move_match_shutil(env: tuple[Any, Path], tmp_path: Path,
                                                 symlinks: bool) -> None:
    fs, host = env
    mirror = tmp_path / "mirror"
    shutil.copytree(host, mirror, symlinks=True)
    for root, copytree, copy2, move, rmtree, do in (
            (host, fs.copytree, fs.copy2, fs.move, fs.rmtree, lambda p: p),
            (mirror, shutil.copytree, shutil.copy2, shutil.move, shutil.rmtree,
             lambda p, r=mirror: str(r / p))):
        os.unlink(root / "loop")  # copytree without symlinks would follow it forever
        copytree(do("d"), do("d2"), symlinks=symlinks)
        copytree(do("."), do("all"), symlinks=symlinks, ignore=shutil.ignore_patterns(
            "dangling", "all*"))
        copy2(do("f"), do("f2"))
        copy2(do("f"), do("d2"))  # into a directory
        move(do("f2"), do("d2/moved"))
        move(do("d2"), do("d3"))
        rmtree(do("all/d"))
    assert _tree(host) == _tree(mirror)
    with pytest.raises(shutil.SameFileError):
        fs.copyfile("f", "lf")
    with pytest.raises(OSError):
        fs.rmtree("ld")  # never through a symbolic link, as shutil
    usage = fs.disk_usage("/")
    assert usage.total >= usage.free > 0 and usage.used >= 0


def test_pathlib_style_paths(env: tuple[Any, Path]) -> None:
    fs, host = env
    root = fs.path("/")
    p = root / "d" / "new.txt"
    assert p.write_text("héllo") == 5 and p.read_text() == "héllo"
    assert (host / "d" / "new.txt").read_text() == "héllo"
    assert p.parent == fs.path("d") and p.name == "new.txt" and p.suffix == ".txt"
    assert p.exists() and p.is_file() and not p.is_dir() and (root / "ld").is_symlink()
    for pattern in ("*", "d/*", "**/*", "**/g", "*/sub/*", "[lf]*", "*.txt", "d/**"):
        mine = sorted(str(x).lstrip("/") for x in root.glob(pattern))
        theirs = sorted(str(x.relative_to(host)) for x in pathlib.Path(host).glob(pattern))
        assert mine == theirs, pattern
    assert sorted(str(x).lstrip("/") for x in fs.path("d").rglob("*")) == sorted(
        str(x.relative_to(host)) for x in (host / "d").rglob("*"))
    assert sorted(x.name for x in fs.path("d").iterdir()) == sorted(
        x.name for x in (host / "d").iterdir())
    (root / "x" / "y").mkdir(parents=True)
    (root / "x" / "y").mkdir(parents=True, exist_ok=True)
    with pytest.raises(FileExistsError):
        (root / "x" / "y").mkdir()
    with pytest.raises(FileExistsError):
        (root / "f").mkdir(exist_ok=True)  # a file in the way
    with pytest.raises(FileNotFoundError):
        (root / "nope" / "z").mkdir()
    (root / "x" / "t").touch()
    assert (host / "x" / "t").is_file()
    (root / "x" / "t").unlink()
    (root / "x" / "t").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        (root / "x" / "t").unlink()
    moved = (root / "x" / "y").rename(fs.path("x/z"))
    assert moved.is_dir() and (host / "x" / "z").is_dir()
    assert (root / "ld" / "g").resolve() == fs.path("/d/g")
    with p.open("rb") as f:
        assert f.read() == "héllo".encode()
    assert p.stat().st_size == 6


def test_makedirs_errors_are_os_makedirs_errors(env: tuple[Any, Path]) -> None:
    fs, host = env
    for path in ("f", "dangling", "f/x/y", "d", "lf"):
        got = outcome(lambda p=path: fs.makedirs(p, exist_ok=True))
        want = outcome(lambda p=path: os.makedirs(host / p, exist_ok=True))
        assert got == want, path
    fs.makedirs("n1/n2/n3")
    assert (host / "n1" / "n2" / "n3").is_dir()
