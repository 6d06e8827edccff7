"""A ``pathlib``-style path bound to a share: ``fs.path("docs") / "a.txt"``.

Pure-path behaviour (``/``, ``name``, ``suffix``, ``parent``, ``parts``, ``with_name``
…) is ``pathlib.PurePosixPath``'s own; the methods that touch files go to the share.
Paths start at the share's root: ``fs.path("a")`` is ``/a``.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

__all__ = ["SharePath", "path_class"]


class SharePath(PurePosixPath):
    """Made by ``fs.path(...)``; every path derived from it (``/``, ``parent`` …) is bound
    to the same share (each share has its own subclass, so derivation keeps it)."""

    _fs: Any = None

    # -- reading and writing -------------------------------------------------------------

    def open(self, mode: str = "r", buffering: int = -1, encoding: str | None = None,
             errors: str | None = None, newline: str | None = None) -> Any:
        return self._fs.open(str(self), mode, buffering, encoding, errors, newline)

    def read_bytes(self) -> bytes:
        data: bytes = self._fs.read_bytes(str(self))
        return data

    def read_text(self, encoding: str | None = None, errors: str | None = None) -> str:
        with self.open("r", encoding=encoding, errors=errors) as f:
            text: str = f.read()
            return text

    def write_bytes(self, data: bytes) -> int:
        view = memoryview(data)
        with self.open("wb") as f:
            n: int = f.write(view)
            return n

    def write_text(self, data: str, encoding: str | None = None, errors: str | None = None,
                   newline: str | None = None) -> int:
        if not isinstance(data, str):
            raise TypeError(f"data must be str, not {type(data).__name__}")
        with self.open("w", encoding=encoding, errors=errors, newline=newline) as f:
            n: int = f.write(data)
            return n

    # -- questions -----------------------------------------------------------------------

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        result: os.stat_result = self._fs.stat(str(self), follow_symlinks=follow_symlinks)
        return result

    def lstat(self) -> os.stat_result:
        return self.stat(follow_symlinks=False)

    def exists(self) -> bool:
        return bool(self._fs.exists(str(self)))

    def is_dir(self) -> bool:
        return bool(self._fs.isdir(str(self)))

    def is_file(self) -> bool:
        return bool(self._fs.isfile(str(self)))

    def is_symlink(self) -> bool:
        return bool(self._fs.islink(str(self)))

    def samefile(self, other: Any) -> bool:
        return bool(self._fs.samefile(str(self), str(other)))

    def readlink(self) -> SharePath:
        return type(self)(self._fs.readlink(str(self)))

    def resolve(self, strict: bool = False) -> SharePath:
        return type(self)(self._fs.realpath(str(self), strict=strict))

    def absolute(self) -> SharePath:
        return self if self.is_absolute() else type(self)("/", self)

    # -- changes -------------------------------------------------------------------------

    def mkdir(self, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        try:
            self._fs.mkdir(str(self), mode)
        except FileNotFoundError:
            if not parents or self.parent == self:
                raise
            self.parent.mkdir(parents=True, exist_ok=True)
            self.mkdir(mode, parents=False, exist_ok=exist_ok)
        except OSError:
            if not exist_ok or not self.is_dir():
                raise

    def touch(self, mode: int = 0o666, exist_ok: bool = True) -> None:
        if exist_ok:
            try:
                self._fs.utime(str(self))
                return
            except OSError:
                pass
        flags = os.O_CREAT | os.O_WRONLY | (0 if exist_ok else os.O_EXCL)
        self._fs.open_raw(str(self), flags, mode).close()

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._fs.unlink(str(self))
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmdir(self) -> None:
        self._fs.rmdir(str(self))

    def rename(self, target: Any) -> SharePath:
        self._fs.rename(str(self), str(target))
        return type(self)(target)

    def replace(self, target: Any) -> SharePath:
        return self.rename(target)

    def chmod(self, mode: int, *, follow_symlinks: bool = True) -> None:
        self._fs.chmod(str(self), mode, follow_symlinks=follow_symlinks)

    def symlink_to(self, target: Any, target_is_directory: bool = False) -> None:
        self._fs.symlink(str(target), str(self))

    def hardlink_to(self, target: Any) -> None:
        self._fs.link(str(target), str(self))

    # -- listing -------------------------------------------------------------------------

    def iterdir(self) -> Iterator[SharePath]:
        for name in self._fs.listdir(str(self)):
            yield self / name

    def glob(self, pattern: str) -> Iterator[SharePath]:
        """As ``pathlib.Path.glob``: ``*``, ``?``, ``[…]`` within a component, ``**`` for
        any depth of directories; hidden names match as fnmatch says (pathlib's way)."""
        if not pattern or pattern.startswith("/"):
            raise ValueError("Non-relative patterns are unsupported")
        parts = [p for p in pattern.split("/") if p and p != "."]
        seen: set[str] = set()
        for found in self._glob(self, parts):
            key = str(found)
            if key not in seen:
                seen.add(key)
                yield found

    def rglob(self, pattern: str) -> Iterator[SharePath]:
        return self.glob("**/" + pattern)

    def _glob(self, base: SharePath, parts: list[str]) -> Iterator[SharePath]:
        if not parts:
            yield base
            return
        head, rest = parts[0], parts[1:]
        if head == "**":
            yield from self._glob(base, rest)  # zero directories
            for child in self._children(base):
                if child.is_dir() and not child.is_symlink():
                    yield from self._glob(child, parts)
            return
        if not _MAGIC.search(head):
            child = base / head
            if (rest and child.is_dir()) or (not rest and child.exists()):
                yield from self._glob(child, rest)
            return
        regex = re.compile(fnmatch.translate(head))
        for child in self._children(base):
            if regex.match(child.name) and (not rest or child.is_dir()):
                yield from self._glob(child, rest)

    @staticmethod
    def _children(base: SharePath) -> list[SharePath]:
        try:
            return list(base.iterdir())
        except (NotADirectoryError, FileNotFoundError, PermissionError):
            return []


_MAGIC = re.compile(r"[*?\[]")


def path_class(fs: Any) -> type[SharePath]:
    """A SharePath subclass bound to ``fs`` (paths derived from its instances keep it)."""
    return type("SharePath", (SharePath,), {"_fs": fs, "__slots__": ()})
