"""The ZeroMQ server and remote client: concurrency, handle ownership, hostile input."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

from pyvirtiofs.actors import messages as m
from pyvirtiofs.api import connect, connect_remote
from pyvirtiofs.api.local import VirtioFS
from pyvirtiofs.api.remote import wire
from pyvirtiofs.api.remote.server import ShareServer, Tenant
from pyvirtiofs.tools import procfs
from tests import REPO
from tests.conftest import open_fd_count


@pytest.fixture
def served(share: Path) -> Iterator[tuple[VirtioFS, ShareServer]]:
    fs = connect(share)
    server = ShareServer("tcp://127.0.0.1:0", tenant=Tenant("t", fs), heartbeat_timeout=1.5)
    server.start()
    try:
        yield fs, server
    finally:
        server.stop()
        fs.close()


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_16_clients_500_mixed_operations_each(served: tuple[VirtioFS, ShareServer],
                                              share: Path) -> None:
    _, server = served
    errors: list[BaseException] = []

    def client(n: int) -> None:
        rng = random.Random(n)
        model: dict[str, bytes] = {}
        try:
            with connect_remote(server.endpoints[0], timeout=60) as fs:
                base = f"c{n}"
                fs.mkdir(base)
                for i in range(500):
                    op = rng.random()
                    name = f"{base}/f{rng.randrange(20)}"
                    if op < 0.35 or not model:
                        data = os.urandom(rng.randrange(0, 70000))
                        with fs.open(name, "wb") as f:
                            f.write(data)
                        model[name] = data
                    elif op < 0.65:
                        name = rng.choice(sorted(model))
                        assert fs.read_bytes(name) == model[name]
                    elif op < 0.8:
                        name = rng.choice(sorted(model))
                        assert fs.stat(name).st_size == len(model[name])
                    elif op < 0.9:
                        assert sorted(fs.listdir(base)) == sorted(
                            p.split("/")[1] for p in model)
                    else:
                        name = rng.choice(sorted(model))
                        new = f"{base}/r{i}"
                        fs.rename(name, new)
                        model[new] = model.pop(name)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
        assert not t.is_alive()
    assert not errors, errors[0]
    assert server.stats()["tenants"].get("t", {"handles": 0})["handles"] == 0


def test_killed_client_handles_are_released_after_heartbeat_timeout(
        served: tuple[VirtioFS, ShareServer], share: Path) -> None:
    fs, server = served
    for i in range(20):
        (share / f"f{i}").write_bytes(b"data")
    for i in range(20):
        fs.stat(f"f{i}")  # the session caches these lookups (one O_PATH fd each): not a leak
    pid = fs.daemon_pid
    assert pid is not None
    baseline = open_fd_count(pid)
    script = textwrap.dedent(f"""
        import os, sys
        from pyvirtiofs.api import connect_remote
        fs = connect_remote({server.endpoints[0]!r})
        files = [fs.open(f"f{{i}}", "rb") for i in range(20)]
        dirs = [fs.scandir("/") for _ in range(1)]
        print("open", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, cwd=REPO, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "open"
        _wait_for(lambda: server.stats()["tenants"].get("t", {}).get("handles", 0) >= 20,
                  10, "the handles to show on the server")
        assert open_fd_count(pid) >= baseline + 20
        proc.kill()
        proc.wait()
        _wait_for(lambda: server.stats()["tenants"].get("t", {}).get("handles", 0) == 0,
                  10, "the server to release the dead client's handles")
        _wait_for(lambda: open_fd_count(pid) <= baseline, 10, "the daemon's fds to drop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _malformed_messages(rng: random.Random) -> Iterator[list[bytes]]:
    enc = msgspec.msgpack.encode
    good = wire.encode_request(7, m.Stat(path=b"x"))
    samples: list[list[bytes]] = [
        [b""], [b"\xc1"], [enc([1])], [enc([1, {"type": "NoSuchOp"}])],
        [enc([1, {"type": "Stat", "path": 5}])],
        [enc([1, {"type": "Forgotten", "nodeid": 1}])],  # internal message: refused
        [enc([1, {"type": "Read", "size": -1}, 5])],
        [enc([1, {"type": "Read", "size": 1 << 40}, 5])],
        [enc([1, {"type": "Write", "data": b"inline"}, 5])],
        [wire.encode_request(3, m.Write(data=None), 5)],  # data frame missing
        [wire.encode_request(3, m.Read(size=10), 0)],  # no handle
        [wire.encode_request(3, m.Read(size=10), 12345)],  # not our handle
        [good, b"extra frame"],
        [enc([1, {"type": "Stat", "path": b"x" * 5000}])],
        [b"\xdd\xff\xff\xff\xff"],  # array claiming 4G elements
        [b"\xdb\xff\xff\xff\xf0abc"],  # str claiming 4G bytes
        [enc([-5, {"type": "Stat", "path": b"x", "follow": "yes"}])],
    ]
    for i in range(1000):
        if i < len(samples):
            yield samples[i]
        elif i % 3 == 0:
            yield [rng.randbytes(rng.randrange(0, 200))]
        elif i % 3 == 1:
            b = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            yield [bytes(b)]
        else:
            yield [rng.randbytes(20), rng.randbytes(rng.randrange(0, 50))]


def test_1000_malformed_messages_get_error_replies_and_service_goes_on(
        served: tuple[VirtioFS, ShareServer], share: Path) -> None:
    _, server = served
    (share / "x").write_bytes(b"ok")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoints[0])
    rng = random.Random(1234)
    try:
        sent = 0
        for frames in _malformed_messages(rng):
            sock.send_multipart(frames)
            sent += 1
        replies = 0
        errors = 0
        while replies < sent:
            if not sock.poll(20000):
                break
            header = wire.decode_reply(sock.recv_multipart()[0])
            replies += 1
            errors += header.error is not None
        # Every message was answered; almost all are errors (a random mutation can still
        # be a well-formed Stat — which then must succeed or fail like any request).
        assert replies == sent
        assert errors >= sent - 50
        with connect_remote(server.endpoints[0], timeout=10) as fs:
            assert fs.read_bytes("x") == b"ok"
        assert server.malformed >= 900
    finally:
        sock.close(0)
        ctx.term()


def test_handles_are_per_connection_and_unguessable(served: tuple[VirtioFS, ShareServer],
                                                    share: Path) -> None:
    _, server = served
    (share / "f").write_bytes(b"secret")
    with connect_remote(server.endpoints[0]) as a, connect_remote(server.endpoints[0]) as b:
        handle, _ = a._open_file(m.Open(path=b"f", flags=os.O_RDONLY))
        assert handle > 1 << 20
        with pytest.raises(OSError) as info:
            b._ask_handle(handle, m.Read(size=6))
        assert info.value.errno == 9  # EBADF: not b's handle
        assert a._ask_handle(handle, m.Read(size=6)) == b"secret"
        a._close_handle(handle)
        with pytest.raises(OSError):
            a._ask_handle(handle, m.Read(size=6))


def test_request_timeout_is_an_oserror(tmp_path: Path) -> None:
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)  # accepts connections, never answers
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        with connect_remote(f"tcp://127.0.0.1:{port}", timeout=0.5) as fs:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                fs.stat("/")
            assert time.monotonic() - t0 < 5
    finally:
        silent.close(0)
        ctx.term()


def _thread_cpu_seconds(name_prefix: str) -> float:
    """CPU time used so far by this process's threads whose name starts with the prefix."""
    total = 0.0
    for t in threading.enumerate():
        if t.name.startswith(name_prefix) and t.native_id is not None:
            total += procfs.cpu_seconds("self", t.native_id) or 0.0
    return total


def test_idle_server_and_client_do_not_spin(served: tuple[VirtioFS, ShareServer]) -> None:
    """With a client connected and nothing to do, the server's and the client's I/O
    threads sleep in poll (a wake-up eventfd that is never drained would make both spin)."""
    _, server = served
    with connect_remote(server.endpoints[0], heartbeat_interval=0.5) as fs:
        fs.listdir("/")
        before = _thread_cpu_seconds("ShareServer") + _thread_cpu_seconds("RemoteFS-io")
        time.sleep(1.5)
        used = _thread_cpu_seconds("ShareServer") + _thread_cpu_seconds("RemoteFS-io")
        assert used - before < 0.3, f"idle I/O threads used {used - before:.2f} s of CPU"
