"""``pyvirtiofs serve`` and ``pyvirtiofs demo``."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import tempfile
import time
from typing import Any

from pyvirtiofs.api.cli.browse import long_listing
from pyvirtiofs.api.cli.share import open_share
from pyvirtiofs.api.local import connect
from pyvirtiofs.codec.fuse_abi import opcode_name

# -- serving ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from pyvirtiofs.api.remote.process import tune_malloc_for_servers
    from pyvirtiofs.api.remote.server import ShareServer, Tenant

    tune_malloc_for_servers()
    fs = open_share(args.folder)
    server = ShareServer(args.bind, tenant=Tenant("default", fs),  # type: ignore[arg-type]
                         heartbeat_timeout=args.heartbeat_timeout)

    def stop(signum: int, frame: Any) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.start()
    except Exception as exc:  # zmq.ZMQError: address in use, unknown transport, …
        server.stop()
        fs.close()
        # ZeroMQ names the endpoint in its message already.
        raise OSError(getattr(exc, "errno", None) or errno.EINVAL, str(exc)) from None
    print(f"serving {args.folder} on {' '.join(server.endpoints)}", flush=True)
    try:
        while server._thread is not None and server._thread.is_alive():
            server._thread.join(0.5)
    finally:
        server.stop()
        fs.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Share a folder (a sample one by default), then list and read it through virtio-fs."""
    folder = args.folder
    if folder is None:
        folder = tempfile.mkdtemp(prefix="pyvirtiofs-demo-")
        os.makedirs(os.path.join(folder, "docs"))
        with open(os.path.join(folder, "docs", "hello.txt"), "w") as f:
            f.write("Hello from the host, read through virtio-fs.\n")
        with open(os.path.join(folder, "data.bin"), "wb") as f:
            f.write(os.urandom(3 << 20))
        os.symlink("docs/hello.txt", os.path.join(folder, "link"))
        print(f"demo: sharing a sample folder {folder}")
    with connect(folder) as fs:
        st = fs.stats()["session"]
        print(f"demo: FUSE 7.{st['minor']}, max_write {st['max_write']} bytes, "
              f"max_pages {st['max_pages']}")
        for dirpath, _dirs, files in fs.walk("/"):
            for line in long_listing(fs, dirpath, show_all=False):
                print(f"{dirpath}: {line}" if line.startswith("total") else f"  {line}")
            for name in files:
                p = os.path.join(dirpath, name)
                if name.endswith(".txt"):
                    print(f"--- {p}:\n{fs.read_bytes(p).decode(errors='replace')}", end="")
        t0 = time.perf_counter()
        total = 0
        for dirpath, _dirs, files in fs.walk("/"):
            for name in files:
                total += len(fs.read_bytes(os.path.join(dirpath, name)))
        dt = time.perf_counter() - t0
        print(f"demo: read {total} bytes back in {dt * 1000:.1f} ms")
        counts = fs.stats()["device"]["requests"]
        print("demo: device requests: " + ", ".join(
            f"{opcode_name(op)} {n}" for op, n in sorted(counts.items(), key=lambda c: -c[1])))
    return 0
