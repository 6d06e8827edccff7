"""``os.path``'s questions about a share, with ``os.path``'s answers: an error is False
(``exists("file/x")`` is False, not NotADirectoryError), a missing file raises where
``os.path`` raises (``getsize``), and ``realpath`` resolves symbolic links without
following one out of the share."""

from __future__ import annotations

import errno
import os
import posixpath
import stat as stat_mod
from typing import Any

__all__ = ["OsPathMixin"]

_MAX_LINKS = 40


class OsPathMixin:
    """Mixed into :class:`~pyvirtiofs.api.fs.ShareFS`; needs its ``stat``, ``lstat`` and
    ``readlink``."""

    def stat(self, path: Any, *, follow_symlinks: bool = True) -> os.stat_result:
        raise NotImplementedError

    def lstat(self, path: Any) -> os.stat_result:
        raise NotImplementedError

    def readlink(self, path: Any) -> Any:
        raise NotImplementedError

    def _test(self, path: Any, check: Any, *, follow: bool = True) -> bool:
        try:
            st = self.stat(path, follow_symlinks=follow)
        except (OSError, ValueError):
            return False
        return bool(check(st.st_mode))

    def exists(self, path: Any) -> bool:
        return self._test(path, lambda mode: True)

    def lexists(self, path: Any) -> bool:
        return self._test(path, lambda mode: True, follow=False)

    def isfile(self, path: Any) -> bool:
        return self._test(path, stat_mod.S_ISREG)

    def isdir(self, path: Any) -> bool:
        return self._test(path, stat_mod.S_ISDIR)

    def islink(self, path: Any) -> bool:
        return self._test(path, stat_mod.S_ISLNK, follow=False)

    def getsize(self, path: Any) -> int:
        return self.stat(path).st_size

    def getmtime(self, path: Any) -> float:
        return self.stat(path).st_mtime

    def getatime(self, path: Any) -> float:
        return self.stat(path).st_atime

    def getctime(self, path: Any) -> float:
        return self.stat(path).st_ctime

    def samefile(self, a: Any, b: Any) -> bool:
        sa, sb = self.stat(a), self.stat(b)
        return (sa.st_ino, sa.st_dev) == (sb.st_ino, sb.st_dev)

    def realpath(self, path: Any, *, strict: bool = False) -> Any:
        """The canonical path (from the share's root): symbolic links resolved, ``.``
        and ``..`` gone, as ``os.path.realpath`` with the share's root as ``/``.
        ``strict``: a missing component or a link loop raises (else it is kept as is)."""
        as_bytes = isinstance(path, bytes)
        p = os.fsdecode(path)
        done: list[str] = []
        todo = [c for c in p.split("/") if c and c != "."][::-1]
        links = 0
        while todo:
            name = todo.pop()
            if name == "..":
                if done:
                    done.pop()
                continue
            candidate = "/" + "/".join([*done, name])
            try:
                mode = self.lstat(candidate).st_mode
            except OSError:
                if strict:
                    raise
                done.append(name)
                continue
            if not stat_mod.S_ISLNK(mode):
                done.append(name)
                continue
            links += 1
            if links > _MAX_LINKS:
                if strict:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), candidate)
                done.append(name)  # as os.path.realpath: the loop stays in the path
                continue
            target = os.fsdecode(self.readlink(candidate))
            if target.startswith("/"):
                done = []
            todo.extend(c for c in reversed(target.split("/")) if c and c != ".")
        result = posixpath.join("/", *done)
        return os.fsencode(result) if as_bytes else result
