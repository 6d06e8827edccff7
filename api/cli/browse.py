"""Looking at a share: ``ls``, ``cat``, ``stat``, ``tree``."""

from __future__ import annotations

import argparse
import errno
import grp
import os
import pwd
import stat as stat_mod
import sys
import time
from collections.abc import Iterator
from typing import Any

from pyvirtiofs.api.cli.share import open_share
from pyvirtiofs.api.fs import ShareFS

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


def long_listing(fs: ShareFS, path: str, *, show_all: bool) -> list[str]:
    """Lines as ``LC_ALL=C ls -la`` prints them (for the share's root, ``..`` is the root
    itself, as in a guest that mounts the share at ``/``). A PATH that is not a directory
    gives its own line, without ``total``, as ls does."""
    top = fs.lstat(path)
    if not stat_mod.S_ISDIR(top.st_mode):
        return _long_rows(fs, [(path, top, path)])
    entries = [(e.name, e.stat(follow_symlinks=False), e.path) for e in fs.scandir(path)]
    if show_all:
        # The share's root is its own parent: the host above it is not visible.
        parent = os.path.join(path, "..")
        entries += [(".", fs.stat(path), path), ("..", fs.stat(parent), parent)]
    entries = [e for e in entries if show_all or not e[0].startswith(".")]
    entries.sort(key=lambda e: os.fsencode(e[0]))
    # GNU ls rounds the sum of 512-byte blocks up to whole KiB.
    total = (sum(st.st_blocks for _, st, _ in entries) + 1) // 2
    return [f"total {total}", *_long_rows(fs, entries)]


def _long_rows(fs: ShareFS, entries: list[tuple[str, Any, str]]) -> list[str]:
    now = time.time()
    rows = []
    for name, st, full in entries:
        display = name
        if stat_mod.S_ISLNK(st.st_mode):
            display += " -> " + os.fsdecode(fs.readlink(full))
        size = (f"{os.major(st.st_rdev)}, {os.minor(st.st_rdev)}"
                if stat_mod.S_ISCHR(st.st_mode) or stat_mod.S_ISBLK(st.st_mode)
                else str(st.st_size))
        rows.append((stat_mod.filemode(st.st_mode), str(st.st_nlink), _owner(st.st_uid),
                     _group(st.st_gid), size, _when(st.st_mtime, now), display,
                     str(st.st_uid), str(st.st_gid)))
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for mode, nlink, owner, group, size, when, display, uid, gid in rows:
        # ls left-aligns names but right-aligns the numbers of unnamed owners and groups
        oa = ">" if owner == uid else "<"
        ga = ">" if group == gid else "<"
        lines.append(f"{mode} {nlink:>{widths[1]}} {owner:{oa}{widths[2]}} "
                     f"{group:{ga}{widths[3]}} {size:>{widths[4]}} {when} {display}")
    return lines


def cmd_ls(args: argparse.Namespace) -> int:
    with open_share(args.share) as fs:
        if args.long:
            for line in long_listing(fs, args.path, show_all=args.all):
                print(line)
        elif not stat_mod.S_ISDIR(fs.stat(args.path).st_mode):
            print(args.path)  # ls FILE names the file
        else:
            names = fs.listdir(args.path) + ([".", ".."] if args.all else [])
            for name in sorted(names, key=os.fsencode):
                if args.all or not name.startswith("."):
                    print(name)
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    with open_share(args.share) as fs:
        for path in args.paths:
            try:
                with fs.open(path, "rb", buffering=0) as f:
                    while chunk := f.read(1 << 20):
                        out.write(chunk)
            except OSError as exc:
                if exc.filename is None:  # e.g. EISDIR from the first read: say which path
                    raise OSError(exc.errno, exc.strerror, path) from None
                raise
    out.flush()
    return 0


# -- stat, tree ------------------------------------------------------------------------------


def cmd_stat(args: argparse.Namespace) -> int:
    with open_share(args.share) as fs:
        for path in args.paths:
            st = fs.stat(path) if args.follow else fs.lstat(path)
            kind = _KINDS.get(stat_mod.S_IFMT(st.st_mode), "unknown")
            print(f"  File: {path}")
            print(f"  Size: {st.st_size:<15} Blocks: {st.st_blocks:<10} IO Block: "
                  f"{st.st_blksize:<6} {kind}")
            print(f" Inode: {st.st_ino:<15} Links: {st.st_nlink}")
            print(f"Access: ({stat_mod.S_IMODE(st.st_mode):04o}/{stat_mod.filemode(st.st_mode)})"
                  f"  Uid: ({st.st_uid:>5}/{_owner(st.st_uid):>8})"
                  f"   Gid: ({st.st_gid:>5}/{_group(st.st_gid):>8})")
            for label, ns in (("Access", st.st_atime_ns), ("Modify", st.st_mtime_ns),
                              ("Change", st.st_ctime_ns)):
                sec, frac = divmod(ns, 10**9)
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
                print(f"{label}: {stamp}.{frac:09d}")
    return 0


_KINDS = {stat_mod.S_IFREG: "regular file", stat_mod.S_IFDIR: "directory",
          stat_mod.S_IFLNK: "symbolic link", stat_mod.S_IFIFO: "fifo",
          stat_mod.S_IFSOCK: "socket", stat_mod.S_IFCHR: "character special file",
          stat_mod.S_IFBLK: "block special file"}


def _tree_lines(fs: ShareFS, path: str, prefix: str, counts: list[int],
                show_all: bool) -> Iterator[str]:
    entries = sorted((e for e in fs.scandir(path) if show_all or not e.name.startswith(".")),
                     key=lambda e: os.fsencode(e.name))
    for i, entry in enumerate(entries):
        last = i == len(entries) - 1
        name = entry.name
        if entry.is_symlink():
            name += " -> " + os.fsdecode(fs.readlink(entry.path))
        yield f"{prefix}{'└── ' if last else '├── '}{name}"
        if entry.is_dir(follow_symlinks=False):
            counts[0] += 1
            yield from _tree_lines(fs, entry.path, prefix + ("    " if last else "│   "), counts,
                                   show_all)
        else:
            counts[1] += 1


def cmd_tree(args: argparse.Namespace) -> int:
    with open_share(args.share) as fs:
        counts = [0, 0]
        if not stat_mod.S_ISDIR(fs.stat(args.path).st_mode):  # fail before printing anything
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), args.path)
        print(args.path)
        for line in _tree_lines(fs, args.path, "", counts, args.all):
            print(line)
        dirs, files = counts
        print(f"\n{dirs} director{'y' if dirs == 1 else 'ies'}, "
              f"{files} file{'' if files == 1 else 's'}")
    return 0
