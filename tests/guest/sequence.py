"""One fixed sequence of file operations, to count the requests each transport sends.

``python -B -m tests.guest.sequence DEVICE TOP`` runs it in the guest through a device
(``pci:TAG``) and prints the device's requests per opcode and the tree it left, as JSON;
the host test runs :func:`run_sequence` through the vhost-user transport and compares.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def run_sequence(fs: Any, top: str) -> None:
    """Metadata and data operations a session typically sends, in a fixed order."""
    fs.mkdir(top)
    fs.makedirs(f"{top}/a/b")
    fs.write_bytes(f"{top}/a/small.txt", b"small\n")
    fs.write_bytes(f"{top}/a/b/big.bin", bytes(range(256)) * 12_000)  # 3 MB: several WRITEs
    assert fs.read_bytes(f"{top}/a/b/big.bin")[:256] == bytes(range(256))
    fs.stat(f"{top}/a/small.txt")
    fs.lstat(f"{top}/a/b")
    sorted(fs.listdir(f"{top}/a"))
    with fs.scandir(f"{top}/a") as it:
        [(e.name, e.is_dir()) for e in it]
    fs.rename(f"{top}/a/small.txt", f"{top}/a/b/moved.txt")
    fs.symlink("moved.txt", f"{top}/a/b/link")
    fs.readlink(f"{top}/a/b/link")
    fs.link(f"{top}/a/b/moved.txt", f"{top}/a/hard")
    fs.chmod(f"{top}/a/hard", 0o600)
    fs.truncate(f"{top}/a/b/big.bin", 1000)
    with fs.open(f"{top}/a/b/moved.txt", "r+b") as f:
        f.seek(2)
        f.write(b"XY")
    fs.statvfs("/")
    fs.remove(f"{top}/a/hard")
    try:
        fs.stat(f"{top}/missing")
    except FileNotFoundError:
        pass
    else:
        raise AssertionError("a missing file has a status")


def tree(fs: Any, top: str) -> dict[str, Any]:
    """Every entry under ``top``: file sizes, link targets, directories as None."""
    out: dict[str, Any] = {}
    for dirpath, dirs, files in fs.walk(top):
        for d in dirs:
            out[os.path.join(dirpath, d)[len(top):]] = None
        for name in files:
            path = os.path.join(dirpath, name)
            st = fs.lstat(path)
            out[path[len(top):]] = (fs.readlink(path) if (st.st_mode & 0o170000) == 0o120000
                                    else st.st_size)
    return out


def counts(fs: Any) -> dict[str, int]:
    return {str(k): v for k, v in sorted(fs.stats()["device"]["requests"].items())}


def main(argv: list[str]) -> int:
    from pyvirtiofs.api import connect

    device, top = argv
    with connect(device=device) as fs:
        run_sequence(fs, top)
        requests = counts(fs)
        print(json.dumps({"requests": requests, "tree": tree(fs, top)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
