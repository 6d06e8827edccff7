"""The lower layers (hw + codec + channel, no actors) against a real virtiofsd."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pyvirtiofs.actors.channel import BlockingDevice
from pyvirtiofs.codec import fuse_requests as rq
from pyvirtiofs.codec.fuse_abi import FUSE_ROOT_ID
from pyvirtiofs.hw.transport import DeviceGone
from pyvirtiofs.hw.vhost_user.frontend import VhostUserError, VirtioFeature
from pyvirtiofs.hw.vhost_user.launcher import (
    DaemonFlavor,
    Virtiofsd,
    detect_flavor,
    find_virtiofsd,
)
from pyvirtiofs.hw.vhost_user.transport import VhostUserTransport, open_private_device


def _init(dev: BlockingDevice):
    return dev.call(rq.init(1 << 20, rq.DEFAULT_INIT_FLAGS))


def _walk(dev: BlockingDevice, path: str) -> int:
    nodeid = FUSE_ROOT_ID
    for part in [p for p in path.split("/") if p]:
        nodeid = dev.call(rq.lookup(nodeid, part)).nodeid
    return nodeid


def test_handshake_negotiates_version1_and_event_idx(transport: VhostUserTransport) -> None:
    fe = transport.frontend
    assert fe.has_feature(VirtioFeature.VERSION_1)
    assert transport.event_idx == fe.has_feature(VirtioFeature.EVENT_IDX)
    assert len(transport.queues) == 2
    assert transport.alive()


def test_init_records_negotiated_limits(transport: VhostUserTransport) -> None:
    dev = BlockingDevice(transport)
    init = _init(dev)
    assert init.major == 7
    assert 27 <= init.minor <= 38
    # We ask for FUSE_MAX_PAGES: the C daemon then offers 1 MiB writes in 256 pages.
    assert init.max_write >= 128 << 10
    if init.all_flags & (1 << 22):
        assert init.max_pages >= 32
    print(f"negotiated: minor={init.minor} max_write={init.max_write} "
          f"max_pages={init.max_pages} max_readahead={init.max_readahead}")


def test_lookup_of_nested_path_component_by_component(transport: VhostUserTransport,
                                                     share: Path) -> None:
    (share / "a" / "b" / "c").mkdir(parents=True)
    (share / "a" / "b" / "c" / "leaf.txt").write_bytes(b"x" * 1234)
    dev = BlockingDevice(transport)
    _init(dev)
    leaf = _walk(dev, "a/b/c/leaf.txt")
    attr = dev.call(rq.getattr(leaf)).attr
    assert attr.size == 1234
    assert attr.ino == os.stat(share / "a/b/c/leaf.txt").st_ino
    with pytest.raises(FileNotFoundError):
        _walk(dev, "a/b/missing")
    # A whole path as one name is refused before it reaches the daemon.
    with pytest.raises(OSError) as info:
        dev.call(rq.lookup(FUSE_ROOT_ID, "a/b"))
    assert info.value.errno == errno.EINVAL


def test_directory_with_5000_entries_is_listed_completely(transport: VhostUserTransport,
                                                          share: Path) -> None:
    big = share / "big"
    big.mkdir()
    names = {f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(5000)}
    for name in names:
        (big / name).touch()
    dev = BlockingDevice(transport)
    _init(dev)
    nodeid = _walk(dev, "big")
    fh = dev.call(rq.opendir(nodeid)).fh
    seen: list[bytes] = []
    offset, pages = 0, 0
    while batch := dev.call(rq.readdir(nodeid, fh, offset, 16 << 10)):
        seen += [e.name for e in batch]
        offset = batch[-1].off
        pages += 1
    dev.call(rq.releasedir(nodeid, fh))
    got = {n.decode() for n in seen} - {".", ".."}
    assert got == names
    assert len(seen) == len(set(seen))  # no entry twice across pages
    assert pages > 1


def test_read_64_mib_file_byte_exact(transport: VhostUserTransport, share: Path) -> None:
    data = os.urandom(1 << 20) * 63 + os.urandom(1 << 20)  # 64 MiB, not all the same
    (share / "big.bin").write_bytes(data)
    dev = BlockingDevice(transport)
    init = _init(dev)
    chunk = min(init.max_write, (init.max_pages or 32) * 4096)
    nodeid = _walk(dev, "big.bin")
    fh = dev.call(rq.open(nodeid, os.O_RDONLY)).fh
    digest = hashlib.sha256()
    offset = 0
    while True:
        piece = dev.call(rq.read(nodeid, fh, offset, chunk))
        if not piece:
            break
        digest.update(piece)
        offset += len(piece)
    dev.call(rq.release(nodeid, fh, os.O_RDONLY))
    assert offset == len(data)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_daemon_killed_mid_session_fails_the_pending_call(share: Path) -> None:
    (share / "f").write_bytes(b"data")
    transport = open_private_device(share)
    try:
        dev = BlockingDevice(transport, timeout=30)
        _init(dev)
        daemon = transport.daemon
        assert daemon is not None and daemon.alive()
        # Calls keep going while the daemon is killed: the one in flight must fail fast.
        killer = threading.Timer(0.3, daemon.kill, (signal.SIGKILL,))
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(DeviceGone) as info:
            _block_until_dead(dev)
        assert info.value.errno == errno.ENOTCONN
        assert time.monotonic() - t0 < 5
        killer.join()
    finally:
        transport.close()


def _block_until_dead(dev: BlockingDevice) -> None:
    """Keep calling until the daemon dies under us (the last call is the pending one)."""
    nodeid = _walk(dev, "f")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        dev.call(rq.getattr(nodeid))
    raise AssertionError("daemon did not die")


def test_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VhostUserError) as info:
        VhostUserTransport.connect(str(tmp_path / "nothing.sock"))
    assert "cannot connect" in str(info.value)


def test_launcher_knows_the_command_line(share: Path) -> None:
    binary = find_virtiofsd()
    d = Virtiofsd(share, binary=binary)
    argv = d.command(7)
    if detect_flavor(binary) is DaemonFlavor.C:
        assert "--fd=7" in argv and f"source={share}" in argv
    else:
        assert "--shared-dir" in argv
    with pytest.raises(FileNotFoundError) as info:
        Virtiofsd(share / "nope")
    assert info.value.filename == str(share / "nope")
    (share / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        Virtiofsd(share / "file")
