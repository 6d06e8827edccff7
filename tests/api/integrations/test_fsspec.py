"""The fsspec filesystem (``pyvirtiofs.api.integrations.fsspec_fs``) against a real virtiofsd
on a temp folder: our own checks, pandas and pyarrow through it, and fsspec's generic
test-suite classes."""

from __future__ import annotations

import datetime
import io
import os
import pickle
import posixpath
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.tests.abstract import AbstractFixtures
from fsspec.tests.abstract.copy import AbstractCopyTests
from fsspec.tests.abstract.get import AbstractGetTests
from fsspec.tests.abstract.open import AbstractOpenTests
from fsspec.tests.abstract.pipe import AbstractPipeTests
from fsspec.tests.abstract.put import AbstractPutTests

from pyvirtiofs.api.integrations.fsspec_fs import (
    VirtioBufferedRandom,
    VirtioBufferedReader,
    VirtioBufferedWriter,
    VirtioCachingFile,
    VirtioFileSystem,
)
from tests import REPO

pytestmark = pytest.mark.daemon


@pytest.fixture(scope="module")
def host_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The host folder one private virtiofsd exports for the whole module."""
    return tmp_path_factory.mktemp("fsspec-share")


@pytest.fixture(scope="module", autouse=True)
def _registered() -> Iterator[None]:
    fsspec.register_implementation("virtiofs", VirtioFileSystem, clobber=True)
    yield
    VirtioFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def vfs_fs(host_dir: Path) -> Iterator[VirtioFileSystem]:
    fs = VirtioFileSystem(share=str(host_dir))
    yield fs
    fs.close()


@pytest.fixture
def fs(vfs_fs: VirtioFileSystem) -> VirtioFileSystem:
    return vfs_fs


@pytest.fixture
def root(fs: VirtioFileSystem, host_dir: Path) -> Iterator[tuple[str, Path]]:
    """A fresh directory in the share: (its fsspec path, the same on the host)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    fs.mkdir(f"/{name}")
    yield f"/{name}", host_dir / name
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


# -- basic operations ------------------------------------------------------------------------------


def test_fsspec_open_url_writes_through_the_share(host_dir: Path) -> None:
    with fsspec.open("virtiofs:///hello.csv", "w", share=str(host_dir)) as f:
        f.write("a,b\n1,2\n")
    assert (host_dir / "hello.csv").read_text() == "a,b\n1,2\n"
    with fsspec.open("virtiofs:///hello.csv", "r", share=str(host_dir)) as f:
        assert f.read() == "a,b\n1,2\n"
    fs, path = fsspec.core.url_to_fs("virtiofs:///hello.csv", share=str(host_dir))
    assert isinstance(fs, VirtioFileSystem) and path == "/hello.csv"
    # One connection per share, whatever instance (or thread) asks.
    assert fs.vfs is VirtioFileSystem(share=str(host_dir), auto_mkdir=True).vfs


def test_threads_share_one_connection(host_dir: Path, root: tuple[str, Path]) -> None:
    """fsspec caches instances per thread; the connection (one daemon) is per share."""
    base, host = root

    def work(i: int) -> Any:
        fs = fsspec.filesystem("virtiofs", share=str(host_dir))
        fs.pipe(f"{base}/t{i}", b"%d" % i)
        assert fs.cat(f"{base}/t{i}") == b"%d" % i
        return fs.vfs

    with ThreadPoolExecutor(8) as pool:
        conns = list(pool.map(work, range(16)))
    assert all(c is conns[0] for c in conns)
    assert sorted(p.name for p in host.iterdir()) == sorted(f"t{i}" for i in range(16))


def test_mapper_and_pickling(fs: VirtioFileSystem, root: tuple[str, Path]) -> None:
    base, host = root
    mapper = fs.get_mapper(f"{base}/store")
    mapper["a/b"] = b"1"
    mapper["c"] = b"22"
    assert (host / "store/a/b").read_bytes() == b"1"
    assert sorted(mapper) == ["a/b", "c"] and mapper["c"] == b"22"
    del mapper["c"]
    assert "c" not in mapper
    clone = pickle.loads(pickle.dumps(fs))
    assert clone.cat(f"{base}/store/a/b") == b"1" and clone.vfs is fs.vfs


def test_paths_are_absolute_in_the_share(fs: VirtioFileSystem) -> None:
    strip = fs._strip_protocol
    assert strip("virtiofs:///a/b/") == "/a/b"
    assert strip("virtiofs://a//b") == "/a/b"
    assert strip("a/b") == "/a/b"
    assert strip("virtiofs:///") == "/"
    assert fs.unstrip_protocol("/a/b") == "virtiofs:///a/b"
    assert fs._parent("/a/b") == "/a" and fs._parent("/a") == "/"


def test_ls_info_and_metadata(fs: VirtioFileSystem, root: tuple[str, Path]) -> None:
    base, host = root
    (host / "f.txt").write_bytes(b"12345")
    (host / "d").mkdir()
    os.symlink("f.txt", host / "link")
    os.symlink("missing", host / "dangling")
    os.utime(host / "f.txt", (1_600_000_000, 1_600_000_000.5))

    assert sorted(fs.ls(base, detail=False)) == sorted(
        f"{base}/{n}" for n in ("f.txt", "d", "link", "dangling"))
    listing = {e["name"]: e for e in fs.ls(base, detail=True)}
    f = listing[f"{base}/f.txt"]
    assert f["type"] == "file" and f["size"] == 5 and not f["islink"]
    assert f["mode"] == os.stat(host / "f.txt").st_mode
    assert f["mtime"] == pytest.approx(1_600_000_000.5)
    assert listing[f"{base}/d"]["type"] == "directory"
    link = listing[f"{base}/link"]
    assert link["islink"] and link["type"] == "file" and link["size"] == 5
    assert link["destination"] == "f.txt"
    dangling = listing[f"{base}/dangling"]
    assert dangling["islink"] and dangling["type"] == "other"
    # info() says what ls() says, and the other questions agree with it.
    assert fs.info(f"virtiofs://{base}/f.txt") == f
    assert fs.info(f"{base}/link") == link
    assert fs.ls(f"{base}/f.txt") == [f]
    assert fs.isfile(f"{base}/link") and fs.isdir(f"{base}/d") and fs.islink(f"{base}/link")
    assert not fs.exists(f"{base}/dangling") and fs.lexists(f"{base}/dangling")
    assert not fs.exists(f"{base}/nope") and not fs.exists(f"{base}/f.txt/below")
    assert fs.size(f"{base}/f.txt") == 5
    assert fs.modified(f"{base}/f.txt") == datetime.datetime.fromtimestamp(
        1_600_000_000.5, tz=datetime.UTC)
    assert fs.created(f"{base}/f.txt").tzinfo is datetime.UTC
    with pytest.raises(FileNotFoundError):
        fs.info(f"{base}/nope")
    with pytest.raises(FileNotFoundError):
        fs.ls(f"{base}/nope")
    assert fs.info("/")["type"] == "directory"


def test_mkdir_makedirs_rmdir(fs: VirtioFileSystem, root: tuple[str, Path]) -> None:
    base, host = root
    fs.mkdir(f"{base}/a/b/c")  # create_parents=True by default
    assert (host / "a/b/c").is_dir()
    with pytest.raises(FileExistsError):
        fs.mkdir(f"{base}/a/b/c")
    with pytest.raises(FileNotFoundError):
        fs.mkdir(f"{base}/x/y", create_parents=False)
    fs.makedirs(f"{base}/a/b/c", exist_ok=True)
    with pytest.raises(FileExistsError):
        fs.makedirs(f"{base}/a/b/c")
    fs.mkdir(f"{base}/m", mode=0o700)
    assert (host / "m").stat().st_mode & 0o777 == 0o700 & ~_umask()
    with pytest.raises(OSError):
        fs.rmdir(f"{base}/a")  # not empty
    fs.rmdir(f"{base}/a/b/c")
    assert not (host / "a/b/c").exists()


def test_rm_files_trees_and_globs(fs: VirtioFileSystem, root: tuple[str, Path]) -> None:
    base, host = root
    for p in ("t/x/1", "t/x/2", "t/y/3", "g1.txt", "g2.txt", "keep.bin"):
        (host / p).parent.mkdir(parents=True, exist_ok=True)
        (host / p).write_bytes(b"x")
    (host / "outside").mkdir()
    (host / "outside/precious").write_bytes(b"p")
    os.symlink(host / "outside", host / "t/link-to-dir")
    with pytest.raises(IsADirectoryError):
        fs.rm(f"{base}/t")
    fs.rm(f"{base}/t", recursive=True)  # removes the link, never what it points to
    assert not (host / "t").exists() and (host / "outside/precious").exists()
    fs.rm(f"{base}/g*.txt")
    assert sorted(p.name for p in host.iterdir()) == ["keep.bin", "outside"]
    fs.rm_file(f"{base}/keep.bin")
    with pytest.raises(FileNotFoundError):
        fs.rm(f"{base}/keep.bin")
    with pytest.raises(FileNotFoundError):
        fs.rm_file(f"{base}/keep.bin")


def test_mv_renames_on_the_share(fs: VirtioFileSystem, root: tuple[str, Path]) -> None:
    base, host = root
    (host / "src/sub").mkdir(parents=True)
    (host / "src/sub/f").write_bytes(b"data")
    ino = (host / "src/sub/f").stat().st_ino
    fs.mv(f"{base}/src", f"{base}/dst")  # a whole tree, without recursive=True
    assert (host / "dst/sub/f").stat().st_ino == ino  # renamed, not copied
    fs.mkdir(f"{base}/into")
    fs.mv(f"{base}/dst/sub/f", f"{base}/into")  # into an existing directory
    assert (host / "into/f").read_bytes() == b"data"
    fs.pipe(f"{base}/other", b"other")
    fs.mv(f"{base}/other", f"{base}/into/f")  # over an existing file
    assert (host / "into/f").read_bytes() == b"other"
    for i in range(3):
        fs.pipe(f"{base}/glob{i}", b"%d" % i)
    fs.mv(f"{base}/glob*", f"{base}/globbed")
    assert sorted(fs.ls(f"{base}/globbed", detail=False)) == [
        f"{base}/globbed/glob{i}" for i in range(3)]
    with pytest.raises(FileNotFoundError):
        fs.mv(f"{base}/missing", f"{base}/whatever")


def test_cp_file_copy_get_put(fs: VirtioFileSystem, root: tuple[str, Path],
                              tmp_path: Path) -> None:
    base, host = root
    payload = os.urandom(3 * (1 << 20) + 123)
    (host / "big.bin").write_bytes(payload)
    fs.cp_file(f"{base}/big.bin", f"{base}/new/dir/copy.bin")  # parents are created
    assert (host / "new/dir/copy.bin").read_bytes() == payload
    fs.get(f"{base}/big.bin", str(tmp_path / "local.bin"))
    assert (tmp_path / "local.bin").read_bytes() == payload
    fs.put(str(tmp_path / "local.bin"), f"{base}/up/loaded.bin")
    assert (host / "up/loaded.bin").read_bytes() == payload
    with pytest.raises(FileExistsError):
        fs.put_file(str(tmp_path / "local.bin"), f"{base}/up/loaded.bin", mode="create")
    fs.cp(f"{base}/new", f"{base}/tree", recursive=True)
    assert (host / "tree/dir/copy.bin").read_bytes() == payload
    buf = io.BytesIO()
    fs.get_file(f"{base}/big.bin", buf)
    assert buf.getvalue() == payload
    os.link(host / "big.bin", host / "hardlink")
    with pytest.raises(shutil.SameFileError):  # and not an emptied source
        fs.cp_file(f"{base}/big.bin", f"{base}/hardlink")
    assert (host / "big.bin").read_bytes() == payload


def test_cat_pipe_touch(fs: VirtioFileSystem, root: tuple[str, Path]) -> None:
    base, host = root
    data = bytes(range(256)) * 41_000  # ~10 MiB: several requests
    fs.pipe_file(f"{base}/d.bin", data)
    assert (host / "d.bin").read_bytes() == data
    assert fs.cat_file(f"{base}/d.bin") == data
    assert fs.cat(f"virtiofs://{base}/d.bin") == data
    for start, end in [(0, 10), (5, None), (None, 7), (-10, None), (-10, -2), (100, 50),
                       (len(data) - 3, len(data) + 100), (len(data) + 5, None),
                       (1 << 20, 3 << 20)]:
        assert fs.cat_file(f"{base}/d.bin", start, end) == data[start:end], (start, end)
    assert fs.cat_ranges([f"{base}/d.bin"] * 3 + [f"{base}/nope"],
                         [0, 10, -5, 0], [4, 20, None, 1])[:3] == [
        data[0:4], data[10:20], data[-5:]]
    with pytest.raises(FileNotFoundError):
        fs.cat_ranges([f"{base}/nope"], 0, 1, on_error="raise")
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{base}/d.bin", b"x", mode="create")
    fs.pipe({f"{base}/m1": b"1", f"{base}/m2": b"22"})
    assert fs.cat([f"{base}/m1", f"{base}/m2"]) == {f"{base}/m1": b"1", f"{base}/m2": b"22"}
    assert fs.head(f"{base}/d.bin", 3) == data[:3] and fs.tail(f"{base}/d.bin", 3) == data[-3:]

    fs.touch(f"{base}/t")
    assert (host / "t").read_bytes() == b""
    (host / "t").write_bytes(b"keep")
    os.utime(host / "t", (1_000_000_000, 1_000_000_000))
    fs.touch(f"{base}/t", truncate=False)
    assert (host / "t").read_bytes() == b"keep"
    assert (host / "t").stat().st_mtime > 1_000_000_000
    fs.touch(f"{base}/t")
    assert (host / "t").read_bytes() == b""


def test_open_modes_and_file_objects(fs: VirtioFileSystem, root: tuple[str, Path]) -> None:
    base = root[0]
    p = f"{base}/f.bin"
    with fs.open(p, "wb") as f:
        assert isinstance(f, VirtioBufferedWriter) and f.mode == "wb" and f.path == p
        f.write(b"hello ")
        f.write(b"world")
        assert f.tell() == 11
    with fs.open(p, "ab") as f:
        f.write(b"!")
    with pytest.raises(FileExistsError):
        fs.open(p, "xb")
    with fs.open(p, "rb") as f:
        assert isinstance(f, VirtioBufferedReader)
        assert f.size == 12 and f.info()["size"] == 12 and f.full_name == f"virtiofs://{p}"
        assert f.read(5) == b"hello"
        assert f.seek(-6, os.SEEK_END) == 6 and f.read() == b"world!"
        assert f._fetch_range(0, 5) == b"hello"
        f.seek(2)
        clone = pickle.loads(pickle.dumps(f))
        assert clone.read() == b"llo world!"
        clone.close()
    with fs.open(p, "rb") as f:
        assert f.read(3) == b"hel"
        with fs.open(p, "ab") as g:
            g.write(b"+grown")  # after the reader learnt the size: read() still sees it
        assert f.read() == b"lo world!+grown"
        assert f.read() == b""
    fs.pipe_file(p, b"hello world!")
    with fs.open(p, "r+b") as f:
        assert isinstance(f, VirtioBufferedRandom)
        f.seek(6)
        f.write(b"W")
        f.seek(0)
        assert f.read() == b"hello World!"
    with fs.open(p, "rb", cache_type="bytes", block_size=4) as f:
        assert isinstance(f, VirtioCachingFile)
        assert f.read(5) == b"hello" and f.read() == b" World!"
    with pytest.raises(IsADirectoryError):
        fs.open(base, "wb")
    with pytest.raises(IsADirectoryError):
        fs.open(base, "rb")  # refused at open, as the built-in open() does
    with pytest.raises(FileNotFoundError):
        fs.open(f"{base}/nope", "rb")
    with pytest.raises(FileNotFoundError):
        fs.open(f"{base}/no/dir/f", "wb")  # auto_mkdir is off by default
    with pytest.raises(TypeError):
        pickle.dumps(fs.open(f"{base}/w", "wb"))


def test_text_mode_lines_and_compression(fs: VirtioFileSystem, root: tuple[str, Path]) -> None:
    base, host = root
    lines = [f"line {i} ünïcode\n" for i in range(50_000)]
    with fs.open(f"{base}/t.txt", "w", encoding="utf-8") as f:
        f.writelines(lines)
    assert (host / "t.txt").read_text("utf-8") == "".join(lines)
    with fs.open(f"{base}/t.txt", "r", encoding="utf-8") as f:
        assert list(f) == lines
    with fs.open(f"{base}/t.txt", "rb") as f:
        assert sum(1 for _ in f) == len(lines)
    with fs.open(f"{base}/t.txt.gz", "wt", compression="gzip") as f:
        f.write("compressed\n")
    with fs.open(f"{base}/t.txt.gz", "rt", compression="infer") as f:
        assert f.read() == "compressed\n"


def test_text_reads_are_whole_blocks(fs: VirtioFileSystem, root: tuple[str, Path]) -> None:
    """TextIOWrapper reads 8 KiB at a time: the file must still ask the share for whole
    blocks, not one request per 8 KiB."""
    base, host = root
    (host / "big.txt").write_bytes((b"x" * 99 + b"\n") * 40_000)  # 4 MB
    with fs.open(f"{base}/big.txt", "rb") as f:
        calls: list[int] = []
        real = f.raw.readinto

        def counting_readinto(buffer: Any) -> int:
            calls.append(len(buffer))
            return real(buffer)

        f.raw.readinto = counting_readinto
        text = io.TextIOWrapper(f, encoding="ascii")
        assert sum(1 for _ in text) == 40_000
    # 4 MB: four 1 MiB requests, then the two reads that find the end of the file
    # (without the fix: ~490 requests of 8 KiB).
    assert len(calls) <= 6 and calls[:3] == [1 << 20] * 3


def test_transactions_commit_and_discard(fs: VirtioFileSystem, root: tuple[str, Path]) -> None:
    base, host = root
    with fs.transaction:
        with fs.open(f"{base}/a", "wb") as f:
            f.write(b"committed")
        assert not (host / "a").exists()  # not visible before the commit
    assert (host / "a").read_bytes() == b"committed"
    assert [p.name for p in host.iterdir()] == ["a"]
    with pytest.raises(RuntimeError), fs.transaction:
        with fs.open(f"{base}/b", "wb") as f:
            f.write(b"lost")
        raise RuntimeError("abort")
    assert [p.name for p in host.iterdir()] == ["a"]
    with pytest.raises(FileExistsError), fs.transaction:
        fs.open(f"{base}/a", "xb")


def test_auto_mkdir(host_dir: Path, root: tuple[str, Path]) -> None:
    base, host = root
    fs = VirtioFileSystem(share=str(host_dir), auto_mkdir=True)
    with fs.open(f"{base}/deep/er/f", "wb") as f:
        f.write(b"x")
    fs.pipe_file(f"{base}/p/q/r", b"y")
    fs.touch(f"{base}/s/t")
    assert (host / "deep/er/f").read_bytes() == b"x" and (host / "p/q/r").read_bytes() == b"y"
    assert (host / "s/t").exists()


def test_wrong_or_missing_options(host_dir: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        VirtioFileSystem()
    with pytest.raises(ValueError, match="exactly one"):
        VirtioFileSystem(share=str(host_dir), socket="/nonexistent.sock")
    with pytest.raises(OSError):
        VirtioFileSystem(share=str(host_dir / "does-not-exist"), skip_instance_cache=True)


def test_vfs_object(host_dir: Path, root: tuple[str, Path]) -> None:
    import pyvirtiofs.api as api
    base, host = root
    (host / "x").write_bytes(b"x")
    with api.connect(str(host_dir)) as share:
        fs = VirtioFileSystem(vfs=share)
        assert fs.cat(f"{base}/x") == b"x"
        fs.close()  # not ours to close
        assert share.exists(f"{base}/x")


def test_socket_share(tmp_path: Path) -> None:
    """``socket=PATH``: attach to a virtiofsd someone else started."""
    from pyvirtiofs.hw.vhost_user.launcher import Virtiofsd

    (tmp_path / "s").mkdir()
    (tmp_path / "s/in.txt").write_bytes(b"from the host")
    daemon = Virtiofsd(tmp_path / "s").start()
    try:
        url = "virtiofs:///in.txt"
        with fsspec.open(url, "rb", socket=daemon.socket_path) as f:
            assert f.read() == b"from the host"
        fs = VirtioFileSystem(socket=daemon.socket_path)  # the same connection
        fs.pipe("/out.txt", b"from fsspec")
        assert (tmp_path / "s/out.txt").read_bytes() == b"from fsspec"
        fs.close()
    finally:
        daemon.stop()


def test_remote_share(host_dir: Path, root: tuple[str, Path]) -> None:
    """``remote="tcp://…"``: the same filesystem over the ZeroMQ client."""
    server_mod = pytest.importorskip("pyvirtiofs.api.remote.server",
                                     reason="no ZeroMQ server in this tree")
    import pyvirtiofs.api as api
    base, host = root
    with api.connect(str(host_dir)) as share:
        server = server_mod.ShareServer("tcp://127.0.0.1:0",
                                        tenant=server_mod.Tenant("t", share))
        server.start()
        try:
            fs = VirtioFileSystem(remote=server.endpoints[0], skip_instance_cache=True)
            fs.pipe(f"{base}/r.bin", b"over zeromq")
            assert (host / "r.bin").read_bytes() == b"over zeromq"
            assert fs.ls(base, detail=False) == [f"{base}/r.bin"]
            with fs.open(f"{base}/r.bin", "rb") as f:
                assert f.read(4) == b"over" and f.read() == b" zeromq"
            fs.cp_file(f"{base}/r.bin", f"{base}/c.bin")
            assert fs.cat_file(f"{base}/c.bin", -6) == b"zeromq"
            fs.rm(f"{base}/c.bin")
            fs.close()
        finally:
            server.stop()


def test_blockcache_and_simplecache_layers(host_dir: Path, root: tuple[str, Path],
                                           tmp_path: Path) -> None:
    """fsspec's caching layers on top: ``blockcache`` swaps in its own cache on the file
    object (an AbstractBufferedFile here), ``simplecache`` downloads with cat/get."""
    base, host = root
    data = os.urandom(3 << 20)
    (host / "x").write_bytes(data)
    for proto in ("blockcache", "simplecache"):
        url = f"{proto}::virtiofs://{base}/x"
        with fsspec.open(url, "rb", virtiofs={"share": str(host_dir)},
                         **{proto: {"cache_storage": str(tmp_path / proto)}}) as f:
            assert f.read(10) == data[:10]
            f.seek(2 << 20)
            assert f.read() == data[2 << 20:]
        assert any((tmp_path / proto).iterdir())


def test_fork_and_interpreter_exit(tmp_path: Path) -> None:
    """A forked child gets its own connection (it must not use, or close, the parent's
    daemon); a process that exits with shares open exits cleanly (the at-exit hook closes
    them) and leaves no daemon behind."""
    share = tmp_path / "proc-share"
    share.mkdir()
    code = f"""
import os, fsspec
from pyvirtiofs.api.integrations.fsspec_fs import VirtioFileSystem
fsspec.register_implementation("virtiofs", VirtioFileSystem, clobber=True)
with fsspec.open("virtiofs:///parent", "wb", share={str(share)!r}) as f:
    f.write(b"p")
fs = VirtioFileSystem(share={str(share)!r})
pid = os.fork()
if pid == 0:
    fs.pipe("/child", b"c")
    os._exit(0 if fs.cat("/parent") == b"p" else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0
assert fs.cat("/child") == b"c"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.stdout.strip() == "ok" and out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert (share / "parent").read_bytes() == b"p" and (share / "child").read_bytes() == b"c"
    deadline = time.monotonic() + 10
    while _daemons_serving(share) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _daemons_serving(share)


def _daemons_serving(directory: Path) -> list[int]:
    """Pids of virtiofsd processes whose command line names ``directory``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"virtiofsd" in cmdline and os.fsencode(directory) in cmdline:
            pids.append(int(entry.name))
    return pids


# -- pandas and pyarrow --------------------------------------------------------------------------


def test_pandas_csv_roundtrip(host_dir: Path, root: tuple[str, Path]) -> None:
    pd = pytest.importorskip("pandas")
    base, host = root
    df = pd.DataFrame({"i": range(5_000), "s": [f"row {i}" for i in range(5_000)],
                       "f": [i / 7 for i in range(5_000)]})
    opts = {"share": str(host_dir)}
    df.to_csv(f"virtiofs://{base}/df.csv", index=False, storage_options=opts)
    assert pd.read_csv(host / "df.csv").equals(df)
    back = pd.read_csv(f"virtiofs://{base}/df.csv", storage_options=opts)
    pd.testing.assert_frame_equal(back, df)
    with fsspec.open(f"virtiofs://{base}/df2.csv.gz", "w", compression="gzip", **opts) as f:
        df.to_csv(f, index=False)
    with fsspec.open(f"virtiofs://{base}/df2.csv.gz", "r", compression="gzip", **opts) as f:
        pd.testing.assert_frame_equal(pd.read_csv(f), df)


def test_pyarrow_parquet_roundtrip(fs: VirtioFileSystem, host_dir: Path,
                                   root: tuple[str, Path]) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pd = pytest.importorskip("pandas")
    base, host = root
    n = 30_000
    table = pa.table({"a": list(range(n)), "b": [f"v{i % 97}" for i in range(n)]})
    # Through the filesystem object (pyarrow wraps it in its PyFileSystem/FSSpecHandler) …
    pq.write_table(table, f"{base}/t.parquet", filesystem=fs, row_group_size=5_000)
    assert pq.read_table(host / "t.parquet").equals(table)
    assert pq.read_table(f"{base}/t.parquet", filesystem=fs).equals(table)
    assert pq.read_table(f"{base}/t.parquet", filesystem=fs, columns=["b"]).equals(
        table.select(["b"]))
    # … through fsspec.open file objects …
    with fsspec.open(f"virtiofs://{base}/t2.parquet", "wb", share=str(host_dir)) as f:
        pq.write_table(table, f)
    with fsspec.open(f"virtiofs://{base}/t2.parquet", "rb", share=str(host_dir)) as f:
        assert pq.ParquetFile(f).metadata.num_rows == n
        assert pq.read_table(f).equals(table)
    # … a partitioned dataset, and pandas' to_parquet/read_parquet with storage_options.
    pq.write_to_dataset(table.slice(0, 1000).append_column(
        "part", pa.array([i % 3 for i in range(1000)])), f"{base}/ds",
        partition_cols=["part"], filesystem=fs)
    assert pq.read_table(f"{base}/ds", filesystem=fs).num_rows == 1000
    df = table.to_pandas()
    df.to_parquet(f"virtiofs://{base}/p.parquet", storage_options={"share": str(host_dir)})
    back = pd.read_parquet(f"virtiofs://{base}/p.parquet",
                           storage_options={"share": str(host_dir)})
    pd.testing.assert_frame_equal(back, df)


# -- fsspec's generic test suites ------------------------------------------------------------------


class VirtioFixtures(AbstractFixtures):
    """The fixtures fsspec's abstract tests need, as fsspec's own ``LocalFixtures``:
    a filesystem that creates parent directories on write, and a directory to work in —
    one per class inside the module's share.

    The source trees on the share (``fs_*_scenario`` …) are built once per class instead
    of once per test — the copy and get tests only read them — which halves the
    requests the suites make; a class that changed one fails at its teardown."""

    @pytest.fixture(scope="class")
    @classmethod
    def fs(cls, host_dir: Path) -> VirtioFileSystem:  # type: ignore[override]
        return VirtioFileSystem(share=str(host_dir), auto_mkdir=True)

    @pytest.fixture(scope="class")
    @classmethod
    def fs_path(cls, fs: VirtioFileSystem) -> Iterator[str]:  # type: ignore[override]
        path = f"/abstract-{uuid.uuid4().hex[:8]}"
        fs.mkdir(path)
        yield path
        fs.rm(path, recursive=True)

    @classmethod
    def _shared(cls, fs: VirtioFileSystem, fs_path: str, build: str) -> Iterator[str]:
        source = getattr(cls(), build)(fs, posixpath.join, posixpath.join(fs_path, build))
        before = sorted(fs.find(source, withdirs=True))
        yield source
        assert sorted(fs.find(source, withdirs=True)) == before, "a test changed the source"

    @pytest.fixture(scope="class")
    @classmethod
    def fs_bulk_operations_scenario_0(cls, fs: VirtioFileSystem,
                                      fs_path: str) -> Iterator[str]:
        yield from cls._shared(fs, fs_path, "_bulk_operations_scenario_0")

    @pytest.fixture(scope="class")
    @classmethod
    def fs_glob_edge_cases_files(cls, fs: VirtioFileSystem, fs_path: str) -> Iterator[str]:
        yield from cls._shared(fs, fs_path, "_glob_edge_cases_files")

    @pytest.fixture(scope="class")
    @classmethod
    def fs_dir_and_file_with_same_name_prefix(cls, fs: VirtioFileSystem,
                                              fs_path: str) -> Iterator[str]:
        yield from cls._shared(fs, fs_path, "_dir_and_file_with_same_name_prefix")

    @pytest.fixture(scope="class")
    @classmethod
    def fs_10_files_with_hashed_names(cls, fs: VirtioFileSystem,
                                      fs_path: str) -> Iterator[str]:
        yield from cls._shared(fs, fs_path, "_10_files_with_hashed_names")


class TestVirtioCopy(AbstractCopyTests, VirtioFixtures):
    pass


class TestVirtioGet(AbstractGetTests, VirtioFixtures):
    pass


class TestVirtioPut(AbstractPutTests, VirtioFixtures):
    pass


class TestVirtioOpen(AbstractOpenTests, VirtioFixtures):
    pass


class TestVirtioPipe(AbstractPipeTests, VirtioFixtures):
    pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
