"""The ``pyvirtiofs`` command line.

Every command takes a SHARE — a local folder (a private virtiofsd is started on it for the
duration of the command) — and paths inside it. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import grp
import logging
import os
import pwd
import stat as stat_mod
import sys
import tempfile
import time
from collections.abc import Sequence

from api.local import VirtioFS, connect

__all__ = ["main"]


def _open(share: str) -> VirtioFS:
    if not os.path.isdir(share):
        raise NotADirectoryError(2, "no such folder to share", share)
    return connect(share)


# -- ls ------------------------------------------------------------------------------------


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _when(mtime: float, now: float) -> str:
    # GNU ls: recent files (within ~6 months) show the time, older ones the year.
    t = time.localtime(mtime)
    day = f"{t.tm_mday:>2}"
    if now - 15778476 < mtime <= now + 60:
        return time.strftime(f"%b {day} %H:%M", t)
    return time.strftime(f"%b {day}  %Y", t)


def long_listing(fs: VirtioFS, path: str, *, show_all: bool) -> list[str]:
    """Lines as ``LC_ALL=C ls -la`` prints them (for the share's root, ``..`` is the root
    itself, as in a guest that mounts the share at ``/``)."""
    entries = [(e.name, e.stat(follow_symlinks=False)) for e in fs.scandir(path)]
    if show_all:
        # The share's root is its own parent: the host above it is not visible.
        entries += [(".", fs.stat(path)), ("..", fs.stat(os.path.join(path, "..")))]
    entries = [(n, s) for n, s in entries if show_all or not n.startswith(".")]
    entries.sort(key=lambda e: os.fsencode(e[0]))
    now = time.time()
    rows = []
    for name, st in entries:
        display = name
        if stat_mod.S_ISLNK(st.st_mode):
            display += " -> " + os.fsdecode(fs.readlink(os.path.join(path, name)))
        size = (f"{os.major(st.st_rdev)}, {os.minor(st.st_rdev)}"
                if stat_mod.S_ISCHR(st.st_mode) or stat_mod.S_ISBLK(st.st_mode)
                else str(st.st_size))
        rows.append((stat_mod.filemode(st.st_mode), str(st.st_nlink), _owner(st.st_uid),
                     _group(st.st_gid), size, _when(st.st_mtime, now), display))
    total = sum(st.st_blocks for _, st in entries) // 2
    if not rows:
        return [f"total {total}"]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"total {total}"]
    for mode, nlink, owner, group, size, when, display in rows:
        lines.append(f"{mode} {nlink:>{widths[1]}} {owner:<{widths[2]}} {group:<{widths[3]}} "
                     f"{size:>{widths[4]}} {when} {display}")
    return lines


def cmd_ls(args: argparse.Namespace) -> int:
    with _open(args.share) as fs:
        if args.long:
            for line in long_listing(fs, args.path, show_all=args.all):
                print(line)
        else:
            names = sorted(fs.listdir(args.path), key=os.fsencode)
            for name in names:
                if args.all or not name.startswith("."):
                    print(name)
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    with _open(args.share) as fs:
        for path in args.paths:
            with fs.open(path, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    out.write(chunk)
    out.flush()
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
    with _open(folder) as fs:
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
        print(f"demo: device requests: {fs.stats()['device']['requests']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyvirtiofs",
        description="A userspace virtio-fs client: talk FUSE to a real virtiofsd through "
                    "shared-memory virtqueues. SHARE is a local folder; a private virtiofsd "
                    "is started on it for the command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ls", help="list a directory of a share (like ls)")
    p.add_argument("share", help="the folder to share")
    p.add_argument("path", nargs="?", default="/", help="directory inside the share")
    p.add_argument("-l", dest="long", action="store_true", help="long listing (like ls -l)")
    p.add_argument("-a", dest="all", action="store_true", help="include names starting with .")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("cat", help="print files of a share (like cat)")
    p.add_argument("share", help="the folder to share")
    p.add_argument("paths", nargs="+", help="files inside the share")
    p.set_defaults(func=cmd_cat)

    p = sub.add_parser("demo", help="share a folder and show listing and reading through it")
    p.add_argument("folder", nargs="?", help="folder to share (default: a generated sample)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"pyvirtiofs: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:
        print(f"pyvirtiofs: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
