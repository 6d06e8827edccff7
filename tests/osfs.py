"""Plain ``os`` calls on a kernel FUSE mount, behind the same API as a share object, so the
behaviour suite can run on the FUSE re-export too."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FUSE_AVAILABLE = (importlib.util.find_spec("pyfuse3") is not None
                  and importlib.util.find_spec("pyvirtiofs.api.integrations.fusemount") is not None
                  and os.path.exists("/dev/fuse"))


class OsFS:
    """The share API, implemented with ``os`` on a mounted directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _p(self, path: Any) -> str:
        return os.path.join(self.root, os.fsdecode(path).lstrip("/"))

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def open(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return open(self._p(path), mode, *args, **kwargs)

    def read_bytes(self, path: Any) -> bytes:
        return Path(self._p(path)).read_bytes()

    def stat(self, path: Any) -> os.stat_result:
        return os.stat(self._p(path))

    def lstat(self, path: Any) -> os.stat_result:
        return os.lstat(self._p(path))

    def listdir(self, path: Any = "/") -> list[str]:
        return os.listdir(self._p(path))

    def scandir(self, path: Any = "/") -> Iterator[os.DirEntry[str]]:
        with os.scandir(self._p(path)) as it:
            yield from it

    def walk(self, top: Any = "/") -> Iterator[tuple[str, list[str], list[str]]]:
        for d, ds, fs in os.walk(self._p(top)):
            yield self._rel(d), ds, fs

    def makedirs(self, path: Any, mode: int = 0o777, exist_ok: bool = False) -> None:
        os.makedirs(self._p(path), mode, exist_ok)

    def access(self, path: Any, mode: int) -> bool:
        return os.access(self._p(path), mode)

    def utime(self, path: Any, *args: Any, **kwargs: Any) -> None:
        os.utime(self._p(path), *args, **kwargs)

    def truncate(self, path: Any, length: int) -> None:
        os.truncate(self._p(path), length)

    def statvfs(self, path: Any = "/") -> os.statvfs_result:
        return os.statvfs(self._p(path))

    def __getattr__(self, name: str) -> Any:
        fn = getattr(os, name)
        two = {"rename", "replace", "link"}

        def call(*args: Any, **kwargs: Any) -> Any:
            if name in two:
                return fn(self._p(args[0]), self._p(args[1]), *args[2:], **kwargs)
            if name == "symlink":
                return fn(args[0], self._p(args[1]), *args[2:], **kwargs)
            return fn(self._p(args[0]), *args[1:], **kwargs)

        return call


@contextlib.contextmanager
def mounted_osfs(fs: Any, mountpoint: Path) -> Iterator[OsFS]:
    """Mount ``fs`` with the FUSE re-export for the duration of the block."""
    from pyvirtiofs.api.integrations import fusemount  # lazily: an optional dependency

    mountpoint.mkdir(exist_ok=True)
    handle = fusemount.mount(fs, str(mountpoint), foreground=False)
    assert handle is not None
    with handle:
        yield OsFS(mountpoint)
