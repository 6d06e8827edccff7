"""The ``pyvirtiofs`` command line.

Every file command takes a SHARE — a local folder (a private virtiofsd is started on it for
the duration of the command) or a server endpoint (``tcp://HOST:PORT``, ``ipc://PATH``)
started with ``pyvirtiofs serve`` — and paths inside it. Errors print one line and exit
non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import grp
import importlib
import logging
import os
import pwd
import signal
import stat as stat_mod
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

from pyvirtiofs.api.fs import ShareFS
from pyvirtiofs.api.local import connect
from pyvirtiofs.api.remote.client import connect_remote

__all__ = ["main"]

REMOTE_SCHEMES = ("tcp://", "ipc://")
COPY_CHUNK = 1 << 20


def open_share(share: str) -> ShareFS:
    """A local folder (private daemon) or a server endpoint."""
    if share.startswith(REMOTE_SCHEMES):
        from pyvirtiofs.api.remote.keys import curve_from_env

        fs = connect_remote(share, timeout=5.0, curve=curve_from_env())
        try:
            fs.stat("/")  # fail now, with a clear message, if nobody answers
        except BaseException:
            fs.timeout = 0.0  # nobody answered: don't wait for a reply to Bye either
            fs.close()
            raise
        fs.timeout = 60.0
        return fs
    if not os.path.isdir(share):
        if os.path.exists(share):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder, cannot share it", share)
        raise FileNotFoundError(errno.ENOENT, "no such folder to share", share)
    return connect(os.path.abspath(share))  # virtiofsd runs elsewhere: no relative paths


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


# -- copies ----------------------------------------------------------------------------------


class _Progress:
    """A progress bar on stderr for long copies (tqdm), silent when not wanted."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                            file=sys.stderr, leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _want_progress(args: argparse.Namespace) -> bool:
    return args.progress or (args.progress is None and sys.stderr.isatty())


def _copy_stream(src: Any, dst: Any, progress: _Progress) -> None:
    while chunk := src.read(COPY_CHUNK):
        dst.write(chunk)
        progress.update(len(chunk))


class _Side:
    """One end of a copy: the share or the local disk, behind the same few calls."""

    def __init__(self, fs: ShareFS | None) -> None:
        self.fs = fs

    def is_dir(self, path: str) -> bool:
        if self.fs is None:
            return os.path.isdir(path)
        try:
            return stat_mod.S_ISDIR(self.fs.stat(path).st_mode)
        except FileNotFoundError:
            return False

    def size(self, path: str) -> int:
        return (os.stat(path) if self.fs is None else self.fs.stat(path)).st_size

    def open(self, path: str, mode: str) -> Any:
        return open(path, mode) if self.fs is None else self.fs.open(path, mode)

    def makedirs(self, path: str) -> None:
        if self.fs is None:
            os.makedirs(path, exist_ok=True)
        else:
            self.fs.makedirs(path, exist_ok=True)

    def walk(self, path: str) -> Iterator[tuple[str, list[str], list[str]]]:
        return os.walk(path) if self.fs is None else self.fs.walk(path)


def _copy(src: _Side, src_path: str, dst: _Side, dst_path: str, *, recursive: bool,
          progress: bool) -> None:
    if src.is_dir(src_path):
        if not recursive:
            raise IsADirectoryError(errno.EISDIR, "is a directory (use -r)", src_path)
        if dst.is_dir(dst_path):
            dst_path = os.path.join(dst_path, os.path.basename(src_path.rstrip("/")) or ".")
        if src.fs is not None and src.fs is dst.fs:
            inner = os.path.relpath(os.path.normpath(os.path.join("/", dst_path)),
                                    os.path.normpath(os.path.join("/", src_path)))
            if inner != ".." and not inner.startswith("../"):
                # The walk would find the copy and copy it again, without end.
                raise OSError(errno.EINVAL, "cannot copy a directory into itself", dst_path)
        files: list[tuple[str, str]] = []
        for dirpath, _dirs, names in src.walk(src_path):
            rel = os.path.relpath(dirpath, src_path)
            dst.makedirs(os.path.normpath(os.path.join(dst_path, rel)))
            files += [(os.path.join(dirpath, n), os.path.normpath(os.path.join(dst_path, rel, n)))
                      for n in names]
    else:
        if dst.is_dir(dst_path):
            dst_path = os.path.join(dst_path, os.path.basename(src_path))
        files = [(src_path, dst_path)]
    bar = _Progress(progress, sum(src.size(s) for s, _ in files))
    try:
        for s, d in files:
            with src.open(s, "rb") as fin, dst.open(d, "wb") as fout:
                _copy_stream(fin, fout, bar)
    finally:
        bar.close()


def cmd_get(args: argparse.Namespace) -> int:
    with open_share(args.share) as fs:
        _copy(_Side(fs), args.src, _Side(None), args.dst, recursive=args.recursive,
              progress=_want_progress(args))
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    with open_share(args.share) as fs:
        _copy(_Side(None), args.src, _Side(fs), args.dst, recursive=args.recursive,
              progress=_want_progress(args))
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    with open_share(args.share) as fs:
        side = _Side(fs)
        _copy(side, args.src, side, args.dst, recursive=args.recursive,
              progress=_want_progress(args))
    return 0


# -- changes ---------------------------------------------------------------------------------


def cmd_mkdir(args: argparse.Namespace) -> int:
    with open_share(args.share) as fs:
        for path in args.paths:
            if args.parents:
                fs.makedirs(path, exist_ok=True)
            else:
                fs.mkdir(path)
    return 0


def _remove_tree(fs: ShareFS, path: str) -> None:
    for entry in list(fs.scandir(path)):
        if entry.is_dir(follow_symlinks=False):
            _remove_tree(fs, entry.path)
        else:
            fs.remove(entry.path)
    fs.rmdir(path)


def cmd_rm(args: argparse.Namespace) -> int:
    with open_share(args.share) as fs:
        for path in args.paths:
            try:
                st = fs.lstat(path)
                if stat_mod.S_ISDIR(st.st_mode):
                    if not args.recursive:
                        raise IsADirectoryError(errno.EISDIR, "is a directory (use -r)", path)
                    _remove_tree(fs, path)
                else:
                    fs.remove(path)
            except FileNotFoundError:
                if not args.force:
                    raise
    return 0


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
        print(f"demo: device requests: {fs.stats()['device']['requests']}")
    return 0


# -- the parser ------------------------------------------------------------------------------

#: The benchmark and the soak are tools, not part of the product: their modules are loaded
#: only when their command runs, which hands its arguments to the tool's own parser.
TOOLS = {
    "bench": ("pyvirtiofs.tools.bench", "benchmark against native os and the Hermit design"),
    "soak": ("pyvirtiofs.tools.soak",
             "run a mixed workload from many clients and check every result"),
}

_SHARE_HELP = ("a local folder (a private virtiofsd is started on it for the command) or the "
               "tcp://HOST:PORT or ipc://PATH endpoint of `pyvirtiofs serve`")


def _share_cmd(sub: Any, name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("share", metavar="SHARE", help=_SHARE_HELP)
    p.set_defaults(func=func)
    return p


def _progress_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-r", "--recursive", action="store_true", help="copy directories")
    p.add_argument("--progress", action="store_true", default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyvirtiofs",
        description="A userspace virtio-fs client: FUSE to a real virtiofsd through "
                    "shared-memory virtqueues. SHARE is a local folder (a private virtiofsd "
                    "is started on it for the command) or the endpoint of `pyvirtiofs "
                    "serve`. Paths inside a share start at its root.",
        epilog="examples:\n  pyvirtiofs ls -l ~/data /\n  pyvirtiofs put ~/data report.pdf "
               "/docs/\n  pyvirtiofs serve ~/data --bind tcp://127.0.0.1:5555\n"
               "  pyvirtiofs cat tcp://127.0.0.1:5555 /docs/notes.txt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _share_cmd(sub, "ls", "list a directory (like ls)", cmd_ls)
    p.add_argument("path", nargs="?", default="/",
                   help="directory (or file) inside the share, default /")
    p.add_argument("-l", dest="long", action="store_true", help="long listing (like ls -l)")
    p.add_argument("-a", dest="all", action="store_true", help="include names starting with .")

    p = _share_cmd(sub, "stat", "show file status (like stat)", cmd_stat)
    p.add_argument("paths", nargs="+", help="paths inside the share")
    p.add_argument("-L", dest="follow", action="store_true", help="follow symbolic links")

    p = _share_cmd(sub, "cat", "print files (like cat)", cmd_cat)
    p.add_argument("paths", nargs="+", help="files inside the share")

    p = _share_cmd(sub, "tree", "show a directory tree (like tree)", cmd_tree)
    p.add_argument("path", nargs="?", default="/", help="directory inside the share")
    p.add_argument("-a", dest="all", action="store_true", help="include names starting with .")

    p = _share_cmd(sub, "get", "copy from the share to the local disk", cmd_get)
    p.add_argument("src", help="path inside the share")
    p.add_argument("dst", help="local path (a directory: copy into it)")
    _progress_flags(p)

    p = _share_cmd(sub, "put", "copy from the local disk into the share", cmd_put)
    p.add_argument("src", help="local path")
    p.add_argument("dst", help="path inside the share (a directory: copy into it)")
    _progress_flags(p)

    p = _share_cmd(sub, "cp", "copy inside the share", cmd_cp)
    p.add_argument("src", help="source path inside the share")
    p.add_argument("dst", help="destination path inside the share")
    _progress_flags(p)

    p = _share_cmd(sub, "mkdir", "make directories", cmd_mkdir)
    p.add_argument("paths", nargs="+")
    p.add_argument("-p", dest="parents", action="store_true",
                   help="make parents as needed, no error if existing")

    p = _share_cmd(sub, "rm", "remove files or directories", cmd_rm)
    p.add_argument("paths", nargs="+")
    p.add_argument("-r", dest="recursive", action="store_true", help="remove directories")
    p.add_argument("-f", dest="force", action="store_true", help="ignore missing files")

    p = _share_cmd(sub, "mv", "move or rename (like mv)", cmd_mv)
    p.add_argument("src")
    p.add_argument("dst")

    p = sub.add_parser("serve", help="serve a folder to remote clients over ZeroMQ",
                       description="Start a virtiofsd on FOLDER and serve it over ZeroMQ until "
                                   "SIGINT/SIGTERM. Clients: pyvirtiofs COMMAND ENDPOINT … or "
                                   "api.connect_remote(ENDPOINT).")
    p.add_argument("folder", metavar="FOLDER", help="the folder to share")
    p.add_argument("--bind", action="append", required=True,
                   help="endpoint, e.g. tcp://127.0.0.1:5555 or ipc:///tmp/share.sock "
                        "(repeatable)")
    p.add_argument("--heartbeat-timeout", type=float, default=10.0,
                   help="seconds of client silence before its handles are released")
    p.set_defaults(func=cmd_serve)

    from pyvirtiofs.api import agent
    from pyvirtiofs.api.integrations import fusemount
    from pyvirtiofs.api.remote import keys

    agent.add_agent_parser(sub)
    agent.add_status_parser(sub)
    keys.add_keygen_parser(sub)
    for name, (_module, help_text) in TOOLS.items():
        # Listed here; run by main() before this parser exists (see TOOLS).
        sub.add_parser(name, help=help_text, add_help=False)

    p = sub.add_parser("mount", help="mount a share with FUSE so every program can use it",
                       description=fusemount.cmd_mount.__doc__)
    fusemount.add_arguments(p)
    p.set_defaults(func=fusemount.cmd_mount)

    p = sub.add_parser("demo", help="share a folder and show listing and reading through it")
    p.add_argument("folder", nargs="?", help="folder to share (default: a generated sample)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        return int(importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    # Without -v only errors are logged: a command that works prints nothing else (no
    # "sandbox=chroot" notices in containers), one that fails prints its one line.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("pykka").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"pyvirtiofs: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:
        print(f"pyvirtiofs: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
