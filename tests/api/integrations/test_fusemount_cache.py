"""The FUSE mount's caches and concurrency (api/integrations/fusemount.py, "Caches").

The mount is served in this process (``mount(fs, mnt, foreground=False)``) so that the
tests can count what reaches the daemon (``fs.device_client.stats()``) and what the kernel
asked (``FuseMount.stats()``). What is checked:

* the page cache of an unchanged file is kept across opens, and is never stale after a
  write through the mount, nor after a change on the host once the daemon's attribute
  timeout has passed (the documented bound; virtiofsd ``cache=auto``: 1 s);
* xattrs and ACLs still work (set, read, listed, removed, through the mount and from the
  host).

(What stops reaching the daemon, and concurrency: test_fusemount_requests.py — pyfuse3
serves one mount per process, and this module keeps one mounted throughout.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofs.codec.fuse_abi import Opcode

pyfuse3 = pytest.importorskip("pyfuse3", reason="the 'fuse' extra (pyfuse3, trio) is needed")

from pyvirtiofs.api.integrations import fusemount  # noqa: E402 - after the extra's check

pytestmark = [
    pytest.mark.daemon,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts with allow_other: needs root"),
]

ATTR_TIMEOUT = 1.0  # virtiofsd cache=auto: entries and attributes are valid for 1 s
PAST_TIMEOUT = ATTR_TIMEOUT + 0.3  # waiting out the documented bound, not a race


@dataclass
class Mounted:
    fs: Any
    handle: fusemount.FuseMount
    mnt: Path
    share: Path

    def daemon(self) -> dict[str, int]:
        """Requests sent to virtiofsd so far, by opcode name."""
        return {Opcode(int(k)).name: v
                for k, v in self.fs.device_client.stats()["requests"].items()}

    def kernel(self) -> dict[str, int]:
        """The kernel's requests to the mount so far, by operation."""
        return dict(self.handle.stats()["kernel"])

    def count(self, action: Callable[[], Any]) -> tuple[dict[str, int], dict[str, int]]:
        """What ``action`` sent to the daemon and what the kernel asked, by name."""
        d0, k0 = self.daemon(), self.kernel()
        action()
        d1, k1 = self.daemon(), self.kernel()
        return ({k: v - d0.get(k, 0) for k, v in d1.items() if v != d0.get(k, 0)},
                {k: v - k0.get(k, 0) for k, v in k1.items() if v != k0.get(k, 0)})


@contextlib.contextmanager
def _mounted(fs: Any, base: Path, share: Path) -> Iterator[Mounted]:
    mnt = base / "mnt"
    mnt.mkdir()
    handle = fusemount.mount(fs, str(mnt), foreground=False)
    assert handle is not None
    try:
        yield Mounted(fs, handle, mnt, share)
    finally:
        handle.unmount()
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def mounted() -> Iterator[Mounted]:
    from pyvirtiofs.api.local import connect

    base = Path(tempfile.mkdtemp(prefix="pyvirtiofs-fusecache-"))
    share = base / "share"
    share.mkdir()
    try:
        with connect(str(share)) as fs, _mounted(fs, base, share) as m:
            yield m
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def work(mounted: Mounted, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """A fresh directory: (through the mount, on the host)."""
    name = request.node.name.replace("[", "_").replace("]", "_")
    (mounted.mnt / name).mkdir()
    return mounted.mnt / name, mounted.share / name


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- splitting -------------------------------------------------------------------------------


def test_pieces_cover_a_range_without_gaps() -> None:
    assert fusemount._pieces(100, 10, 4) == [(100, 4), (104, 4), (108, 2)]
    assert fusemount._pieces(0, 8, 4) == [(0, 4), (4, 4)]
    assert fusemount._pieces(5, 3, 4) == [(5, 3)]
    assert fusemount._pieces(5, 0, 4) == []


# -- the page cache ----------------------------------------------------------------------------


def test_unchanged_file_keeps_its_page_cache(mounted: Mounted,
                                             work: tuple[Path, Path]) -> None:
    mnt, _ = work
    data = os.urandom(200_000)
    (mnt / "f").write_bytes(data)
    assert _read(mnt / "f") == data  # fills the page cache (the open after the write)
    daemon, kernel = mounted.count(lambda: _read(mnt / "f"))
    assert "READ" not in daemon and "read" not in kernel, (daemon, kernel)
    assert daemon.get("OPEN") == 1  # every open still reaches the daemon


def test_write_through_the_mount_is_never_stale(work: tuple[Path, Path]) -> None:
    mnt, host = work
    (mnt / "f").write_bytes(b"A" * 10_000)
    with open(mnt / "f", "rb") as reader:
        assert reader.read() == b"A" * 10_000  # cached
        with open(mnt / "f", "r+b") as writer:
            writer.seek(5000)
            writer.write(b"B" * 100)
        reader.seek(0)
        expected = b"A" * 5000 + b"B" * 100 + b"A" * 4900
        assert reader.read() == expected  # the open reader sees the write at once
    assert _read(mnt / "f") == expected  # and so does a new open
    assert (host / "f").read_bytes() == expected
    with open(mnt / "f", "r+b") as writer:
        writer.truncate(3000)
    assert _read(mnt / "f") == b"A" * 3000


def test_change_on_the_host_is_seen_within_the_attribute_timeout(
        work: tuple[Path, Path]) -> None:
    mnt, host = work
    (mnt / "f").write_bytes(b"old" * 1000)
    assert _read(mnt / "f") == b"old" * 1000  # cached, with the version it was read at
    # Changed behind the mount's back. (A different size, so the change is visible even
    # on a file system whose timestamps are too coarse to tell two writes apart.)
    (host / "f").write_bytes(b"new!" * 1000)
    time.sleep(PAST_TIMEOUT)
    assert _read(mnt / "f") == b"new!" * 1000
    assert os.stat(mnt / "f").st_size == 4000
    # And again with the same size: the mtime tells it.
    time.sleep(0.05)  # a later timestamp than the read above, on any clock granularity
    (host / "f").write_bytes(b"NEW!" * 1000)
    time.sleep(PAST_TIMEOUT)
    assert _read(mnt / "f") == b"NEW!" * 1000


# -- xattrs and ACLs ---------------------------------------------------------------------------


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A ``system.posix_acl_access`` value: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
UNDEFINED = 0xFFFFFFFF


def test_xattrs_set_read_list_and_remove(work: tuple[Path, Path]) -> None:
    mnt, host = work
    f = mnt / "f"
    f.write_bytes(b"x")
    for name in ("user.a", "security.selinux", "system.posix_acl_access"):
        with pytest.raises(OSError) as info:
            os.getxattr(f, name)
        assert info.value.errno == errno.ENODATA
    # What was learned absent must not hide a value set afterwards.
    os.setxattr(f, "user.a", b"1")
    assert os.getxattr(f, "user.a") == b"1"
    assert os.getxattr(host / "f", "user.a") == b"1"
    assert "user.a" in os.listxattr(f)
    os.removexattr(f, "user.a")
    with pytest.raises(OSError) as info:
        os.getxattr(f, "user.a")
    assert info.value.errno == errno.ENODATA
    assert "user.a" not in os.listxattr(f)
    big = os.urandom(3000)  # a value asked for in one request (ext4: at most a block)
    os.setxattr(f, "user.big", big)
    assert os.getxattr(f, "user.big") == big


def test_acls_set_through_the_mount_and_on_the_host(work: tuple[Path, Path]) -> None:
    mnt, host = work
    f = mnt / "f"
    f.write_bytes(b"x")
    f.chmod(0o640)
    with pytest.raises(OSError) as info:
        os.getxattr(f, "system.posix_acl_access")
    assert info.value.errno == errno.ENODATA
    acl = _acl((ACL_USER_OBJ, 6, UNDEFINED), (ACL_USER, 4, 65534),
               (ACL_GROUP_OBJ, 4, UNDEFINED), (ACL_MASK, 4, UNDEFINED),
               (ACL_OTHER, 0, UNDEFINED))
    os.setxattr(f, "system.posix_acl_access", acl)
    assert os.getxattr(f, "system.posix_acl_access") == acl
    assert os.getxattr(host / "f", "system.posix_acl_access") == acl
    assert "system.posix_acl_access" in os.listxattr(f)
    # Set on the host behind the mount's back, after the mount learned it absent: seen
    # once the daemon's attribute timeout has passed.
    g = mnt / "g"
    g.write_bytes(b"y")
    with pytest.raises(OSError):
        os.getxattr(g, "system.posix_acl_access")
    os.setxattr(host / "g", "system.posix_acl_access", acl)
    os.setxattr(host / "g", "user.host", b"h")
    time.sleep(PAST_TIMEOUT)
    assert os.getxattr(g, "system.posix_acl_access") == acl
    assert os.getxattr(g, "user.host") == b"h"
    os.removexattr(g, "system.posix_acl_access")
    with pytest.raises(OSError) as info:
        os.getxattr(g, "system.posix_acl_access")
    assert info.value.errno == errno.ENODATA
