"""Who may do what to a file: the kernel's ``generic_permission``, as a FUSE client with
``default_permissions`` applies it. Pure: attributes and credentials in, a verdict out.

virtiofsd checks no permissions itself (it acts with the privileges it has, and only sets
the owner of new files), so the client must: the owner, group and other bits of the mode,
supplementary groups, the sticky bit of directories, and root's exemptions (read and write
anything; execute a file only when some execute bit is set; search any directory).
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from typing import NamedTuple

from pyvirtiofs.codec.fuse_types import Attr

__all__ = ["Cred", "may", "may_delete", "require", "require_owner"]

R, W, X = os.R_OK, os.W_OK, os.X_OK


class Cred(NamedTuple):
    """A caller: user, primary group and supplementary groups."""

    uid: int
    gid: int
    groups: frozenset[int] = frozenset()

    @property
    def root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


def may(attr: Attr, cred: Cred, want: int) -> bool:
    """Whether ``cred`` has every access in ``want`` (R_OK | W_OK | X_OK) on ``attr``."""
    if not want:
        return True
    mode = attr.mode
    if cred.root:
        # Root reads and writes anything, searches any directory, and executes a file
        # only when some execute bit is set.
        return not want & X or stat_mod.S_ISDIR(mode) or bool(mode & 0o111)
    if cred.uid == attr.uid:
        have = (mode >> 6) & 7
    elif cred.in_group(attr.gid):
        have = (mode >> 3) & 7
    else:
        have = mode & 7
    return (have & want) == want


def require(attr: Attr, cred: Cred, want: int) -> None:
    """EACCES unless :func:`may`."""
    if not may(attr, cred, want):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))


def may_delete(directory: Attr, victim: Attr, cred: Cred) -> bool:
    """The sticky-bit rule: in a sticky directory only the owner of the entry, the owner
    of the directory, or root may remove or rename it (write and search permission on the
    directory are checked apart)."""
    if not directory.mode & stat_mod.S_ISVTX or cred.root:
        return True
    return cred.uid in (victim.uid, directory.uid)


def require_owner(attr: Attr, cred: Cred) -> None:
    """EPERM unless ``cred`` owns the file or is root (chmod, utime to a given time)."""
    if not cred.root and cred.uid != attr.uid:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))
