"""Concurrency through the actors: many threads on one session, and requests far larger
than one FUSE request (split, pipelined, and put back together byte for byte)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from pyvirtiofs.actors import messages as m
from tests.actors.helpers import mounted

THREADS = 32
ROUNDS = 12


def _content(thread: int, k: int) -> bytes:
    return f"thread {thread} round {k}\n".encode() * (1 + (thread * 7 + k) % 50)


def test_32_threads_mixed_operations_on_one_session(share: Path) -> None:
    shared = os.urandom(3 << 20)
    (share / "shared.bin").write_bytes(shared)
    digest = hashlib.sha256(shared).digest()
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    with mounted(share) as (fs, _):
        def worker(i: int) -> None:
            try:
                start.wait(timeout=30)
                d = f"t{i:02d}"
                fs.mkdir(d)
                for k in range(ROUNDS):
                    data = _content(i, k)
                    with fs.open(f"{d}/f{k}", "wb") as f:
                        f.write(data)
                    assert fs.stat(f"{d}/f{k}").st_size == len(data)
                    with fs.open(f"{d}/f{k}", "rb") as f:
                        assert f.read() == data
                    fs.rename(f"{d}/f{k}", f"{d}/g{k}")
                    fs.symlink(f"g{k}", f"{d}/l{k}")
                    assert fs.readlink(f"{d}/l{k}") == f"g{k}"
                    if k % 2:
                        fs.unlink(f"{d}/l{k}")
                    if k % 4 == i % 4:  # shared reads, from several threads at once
                        with fs.open("shared.bin", "rb", buffering=0) as f:
                            f.seek(k * 1000)
                            assert f.read(4096) == shared[k * 1000:k * 1000 + 4096]
                        assert hashlib.sha256(fs.read_bytes("shared.bin")).digest() == digest
                expected = {f"g{k}" for k in range(ROUNDS)} | {
                    f"l{k}" for k in range(0, ROUNDS, 2)}
                assert set(fs.listdir(d)) == expected
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not [t for t in threads if t.is_alive()], "threads still running"
        assert not errors, errors[:3]
        assert fs.session.ask(m.SessionStats())["handles"] == 0

    # And on disk, as the threads left it.
    for i in range(THREADS):
        d = share / f"t{i:02d}"
        for k in range(ROUNDS):
            assert (d / f"g{k}").read_bytes() == _content(i, k)
            assert os.readlink(d / f"l{k}") == f"g{k}" if k % 2 == 0 else not (
                d / f"l{k}").is_symlink()


def test_one_read_larger_than_max_write_is_byte_exact(share: Path) -> None:
    data = os.urandom(8 << 20)
    (share / "big").write_bytes(data + b"tail")
    with mounted(share) as (fs, _):
        max_write = fs.session.ask(m.SessionStats())["max_write"]
        assert len(data) > max_write  # the point: one call, many FUSE READs
        with fs.open("big", "rb", buffering=0) as f:
            assert f.read(len(data)) == data
            buf = bytearray(len(data) + 100)
            assert f.readinto(buf) == 4
            assert bytes(buf[:4]) == b"tail"
            odd = 12345  # not aligned to anything: chunk edges fall mid-page
            assert f.pread(len(data), odd) == data[odd:] + b"tail"
            view = memoryview(buf)[:len(data)]
            f.seek(0)
            assert f.readinto(view) == len(data)
            assert view == data


def test_64_mib_write_then_read_back(share: Path) -> None:
    data = os.urandom(1 << 20) * 32 + os.urandom(32 << 20)  # 64 MiB, as big as guest memory
    with mounted(share) as (fs, _):
        with fs.open("big", "wb", buffering=0) as f:
            assert f.write(data) == len(data)
        assert fs.stat("big").st_size == len(data)
        with fs.open("big", "rb", buffering=0) as f:
            back = f.read(len(data) + 1)
        assert len(back) == len(data)
        assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    assert hashlib.sha256((share / "big").read_bytes()).digest() == hashlib.sha256(
        data).digest()
