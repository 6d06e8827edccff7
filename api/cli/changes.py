"""Changing a share: ``mkdir``, ``rm`` (never the share's root), ``mv``."""

from __future__ import annotations

import argparse
import errno
import os
import stat as stat_mod
import sys

from pyvirtiofs.api.cli.share import open_share
from pyvirtiofs.api.fs import ShareFS

# -- changes ---------------------------------------------------------------------------------


def cmd_mkdir(args: argparse.Namespace) -> int:
    with open_share(args.share) as fs:
        for path in args.paths:
            if args.parents:
                fs.makedirs(path, exist_ok=True)
            else:
                fs.mkdir(path)
    return 0


def _report(exc: OSError, path: str) -> None:
    print(f"pyvirtiofs: {exc.strerror or exc}: {exc.filename or path}", file=sys.stderr,
          flush=True)


def _remove_tree(fs: ShareFS, path: str, *, keep_top: bool = False) -> bool:
    """Remove ``path`` and everything below it, as ``rm -r`` does: an entry that cannot be
    removed is reported and the rest goes on (its directories then stay, silently).
    Returns whether everything went."""
    ok = True
    try:
        with fs.scandir(path) as it:
            entries = [(e.path, e.is_dir(follow_symlinks=False)) for e in it]
    except OSError as exc:
        _report(exc, path)
        return False
    for entry, is_dir in entries:
        if is_dir:
            ok = _remove_tree(fs, entry) and ok
            continue
        try:
            fs.remove(entry)
        except FileNotFoundError:
            pass  # gone meanwhile: what rm -r wanted
        except OSError as exc:
            _report(exc, entry)
            ok = False
    if ok and not keep_top:
        try:
            fs.rmdir(path)
        except OSError as exc:
            _report(exc, path)
            ok = False
    return ok


def _is_share_root(fs: ShareFS, path: str, st: os.stat_result) -> bool:
    """Whether ``path`` is the share's root: by name ("/", ".", "a/..") or, as GNU rm
    checks, by being the same directory (device and inode)."""
    if os.path.normpath(os.path.join("/", path)) == "/":
        return True
    root = fs.stat("/")
    return stat_mod.S_ISDIR(st.st_mode) and (st.st_ino, st.st_dev) == (root.st_ino,
                                                                       root.st_dev)


def cmd_rm(args: argparse.Namespace) -> int:
    status = 0
    with open_share(args.share) as fs:
        for path in args.paths:
            try:
                st = fs.lstat(path)
                if stat_mod.S_ISDIR(st.st_mode):
                    if not args.recursive:
                        raise IsADirectoryError(errno.EISDIR, "is a directory (use -r)", path)
                    root = _is_share_root(fs, path, st)
                    if root and args.preserve_root:
                        raise OSError(errno.EPERM, "it is dangerous to operate recursively on "
                                      "the share's root (use --no-preserve-root to override "
                                      "this failsafe)", path)
                    # The root itself cannot go; with --no-preserve-root, what is in it does.
                    if not _remove_tree(fs, path, keep_top=root):
                        status = 1
                else:
                    fs.remove(path)
            except FileNotFoundError as exc:
                if not args.force:
                    _report(exc, path)
                    status = 1
            except OSError as exc:
                _report(exc, path)
                status = 1
    return status


def cmd_mv(args: argparse.Namespace) -> int:
    with open_share(args.share) as fs:
        dst = args.dst
        try:
            if stat_mod.S_ISDIR(fs.stat(dst).st_mode):
                dst = os.path.join(dst, os.path.basename(args.src.rstrip("/")))
        except FileNotFoundError:
            pass
        fs.rename(args.src, dst)
    return 0
