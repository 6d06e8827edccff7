"""The ``pyvirtiofs`` command line.

Every file command takes a SHARE — a local folder (a private virtiofsd is started on it for
the duration of the command), a server endpoint (``tcp://HOST:PORT``, ``ipc://PATH``)
started with ``pyvirtiofs serve``, or a virtio-fs device of the VM the command runs in
(``pci:TAG``, ``mmio:TAG``, …; also given as ``--device SPEC``) — and paths inside it.
Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pyvirtiofs.api.cli.browse import cmd_cat, cmd_ls, cmd_stat, cmd_tree
from pyvirtiofs.api.cli.changes import cmd_mkdir, cmd_mv, cmd_rm
from pyvirtiofs.api.cli.copying import DEFAULT_JOBS, CopyIncomplete, cmd_cp, cmd_get, cmd_put
from pyvirtiofs.api.cli.serving import cmd_demo, cmd_serve

# -- the parser ------------------------------------------------------------------------------

#: The benchmark and the soak are tools, not part of the product: their modules are loaded
#: only when their command runs, which hands its arguments to the tool's own parser.
TOOLS = {
    "bench": ("pyvirtiofs.tools.bench", "benchmark against native os and the Hermit design"),
    "soak": ("pyvirtiofs.tools.soak",
             "run a mixed workload from many clients and check every result"),
}

_SHARE_HELP = ("a local folder (a private virtiofsd is started on it for the command), the "
               "tcp://HOST:PORT or ipc://PATH endpoint of `pyvirtiofs serve`, or a virtio-fs "
               "device of this VM (pci:TAG, mmio:TAG, ...; see --device)")
_DEVICE_HELP = ("use a virtio-fs device of the VM this runs in, in place of SHARE: pci:TAG, "
                "pci:0000:00:04.0, mmio:TAG or mmio:0xADDRESS (needs root and hugepages)")


def _device_option(p: argparse.ArgumentParser) -> None:
    # Documented here; main() turns `--device SPEC` into the SHARE argument.
    p.add_argument("--device", metavar="SPEC", help=_DEVICE_HELP)


def _share_cmd(sub: Any, name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("share", metavar="SHARE", help=_SHARE_HELP)
    _device_option(p)
    p.set_defaults(func=func)
    return p


def _device_as_share(argv: list[str]) -> list[str]:
    """``COMMAND … --device SPEC …`` as ``COMMAND SPEC …`` (the device is the SHARE)."""
    end = argv.index("--") if "--" in argv else len(argv)
    for i, arg in enumerate(argv[:end]):
        if arg == "--device" or arg.startswith("--device="):
            spec = arg.partition("=")[2] if "=" in arg else None
            rest = argv[:i] + argv[i + (1 if spec is not None else 2):]
            if spec is None:
                if i + 1 >= end:
                    return argv  # argparse reports the missing value
                spec = argv[i + 1]
            command = next((j for j, a in enumerate(rest) if not a.startswith("-")), None)
            if command is None:
                return argv
            return [*rest[:command + 1], spec, *rest[command + 1:]]
    return argv


def _progress_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-r", "-R", "--recursive", action="store_true",
                   help="copy directories recursively, symbolic links as links (as cp -r)")
    p.add_argument("-a", "--archive", action="store_true",
                   help="as cp -a: -r, and keep modes, times, owners (when allowed), hard "
                        "links and extended attributes")
    p.add_argument("-j", "--jobs", type=int, default=DEFAULT_JOBS, metavar="N",
                   help=f"files (or parts of a big file) copied at once (default "
                        f"{DEFAULT_JOBS})")
    p.add_argument("--progress", action="store_true", default=None,
                   help="show files and bytes copied, and a summary at the end (default: "
                        "when stderr is a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def build_parser(*, with_mount: bool = True) -> argparse.ArgumentParser:
    """The command line's parser; ``with_mount=False`` leaves the arguments of ``mount``
    out (its module is slow to import), for commands that are not ``mount``."""
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
    p.add_argument("-r", "-R", "--recursive", dest="recursive", action="store_true",
                   help="remove directories and what is in them")
    p.add_argument("-f", "--force", dest="force", action="store_true",
                   help="ignore missing files")
    p.add_argument("--no-preserve-root", dest="preserve_root", action="store_false",
                   help="let -r empty the share's root (refused by default, as GNU rm "
                        "--preserve-root does)")

    p = _share_cmd(sub, "mv", "move or rename (like mv)", cmd_mv)
    p.add_argument("src")
    p.add_argument("dst")

    p = sub.add_parser("serve", help="serve a folder to remote clients over ZeroMQ",
                       description="Start a virtiofsd on FOLDER and serve it over ZeroMQ until "
                                   "SIGINT/SIGTERM. Clients: pyvirtiofs COMMAND ENDPOINT … or "
                                   "api.connect_remote(ENDPOINT).")
    p.add_argument("folder", metavar="FOLDER",
                   help="the folder to share, or a virtio-fs device of this VM (pci:TAG, ...)")
    _device_option(p)
    p.add_argument("--bind", action="append", required=True,
                   help="endpoint, e.g. tcp://127.0.0.1:5555 or ipc:///tmp/share.sock "
                        "(repeatable)")
    p.add_argument("--heartbeat-timeout", type=float, default=10.0,
                   help="seconds of client silence before its handles are released")
    p.set_defaults(func=cmd_serve)

    from pyvirtiofs.api import agent
    from pyvirtiofs.api.remote import keys

    agent.add_agent_parser(sub)
    agent.add_status_parser(sub)
    keys.add_keygen_parser(sub)
    for name, (_module, help_text) in TOOLS.items():
        # Listed here; run by main() before this parser exists (see TOOLS).
        sub.add_parser(name, help=help_text, add_help=False)

    p = sub.add_parser("mount", help="mount a share with FUSE so every program can use it",
                       add_help=with_mount)
    if with_mount:
        # pyfuse3 and trio take a tenth of a second to import: only for this command.
        from pyvirtiofs.api.integrations import fusemount

        p.description = fusemount.cmd_mount.__doc__
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
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(with_mount=command == "mount")
    args = parser.parse_args(_device_as_share(argv))
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
    except CopyIncomplete as exc:  # each failure was reported as it happened
        print(f"pyvirtiofs: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:
        print(f"pyvirtiofs: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
