"""Confinement at the door: what a tenant may ask, checked before a request reaches the
tenant's actors — path and name limits with Linux's errnos, ``EROFS`` for every modifying
call of a read-only tenant, no device nodes, no set-id bits, no ``chown`` to another owner,
only ``user.`` xattrs writable."""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
from typing import Any

import msgspec

from pyvirtiofs.actors import messages as m
from pyvirtiofs.api.agent.config import TenantConfig

log = logging.getLogger("pyvirtiofs.agent")

PATH_MAX = 4096  # bytes including the terminating NUL: a path of 4096 bytes is too long
NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536


_MODIFYING = (m.MakeDir, m.MakeNode, m.Unlink, m.RemoveDir, m.Rename, m.Link, m.Symlink,
              m.SetAttr, m.SetXattr, m.RemoveXattr, m.Write, m.FTruncate, m.FAllocate)
_XATTR_OPS = (m.GetXattr, m.SetXattr, m.RemoveXattr)
_OPEN_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
_OPEN_ALLOWED = (os.O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND
                 | os.O_NONBLOCK | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_SYNC
                 | os.O_DSYNC | os.O_NOATIME | os.O_NOCTTY | os.O_LARGEFILE | os.O_DIRECT)
_O_PATH = getattr(os, "O_PATH", 0o10000000)
_O_TMPFILE = getattr(os, "O_TMPFILE", 0o20000000 | os.O_DIRECTORY)
_SETID = stat_mod.S_ISUID | stat_mod.S_ISGID
_ALLOWED_NODES = (stat_mod.S_IFREG, stat_mod.S_IFIFO, stat_mod.S_IFSOCK, 0)


def _oserror(code: int, detail: str | None = None, path: Any = None) -> OSError:
    return OSError(code, detail or os.strerror(code), path)


def check_path(path: Any) -> bytes:
    """A path as Linux's path walk would judge it, before anything is looked up."""
    p = os.fsencode(path) if isinstance(path, str) else path
    if not isinstance(p, bytes):
        raise _oserror(errno.EINVAL, "a path must be bytes")
    if b"\0" in p:
        raise _oserror(errno.EINVAL, "embedded null byte in a path", p)
    if not p:
        raise _oserror(errno.ENOENT, "empty path", p)
    if len(p) >= PATH_MAX:
        raise _oserror(errno.ENAMETOOLONG, "path longer than 4095 bytes", p[:64] + b"...")
    if any(len(c) > NAME_MAX for c in p.split(b"/")):
        raise _oserror(errno.ENAMETOOLONG, "name longer than 255 bytes", p[:64] + b"...")
    return p


_MODE_FIELDS = ("mode", "umask", "rdev")  # 32-bit unsigned in every FUSE request


def _check_ints(op: Any) -> None:
    for name in _MODE_FIELDS:
        value = getattr(op, name, None)
        if value is not None and not 0 <= value <= 0xFFFFFFFF:
            raise _oserror(errno.EINVAL, f"{name} out of range", getattr(op, "path", None))
    flags = getattr(op, "flags", None)
    if flags is not None and not 0 <= flags <= 0xFFFFFFFF:
        raise _oserror(errno.EINVAL, "flags out of range", getattr(op, "path", None))


def confine(tc: TenantConfig, op: Any) -> Any:
    """``op`` as a tenant may have it executed, or OSError with Linux's errno.

    The paths themselves are resolved by the tenant's session, inside its root (``..``
    stops at the root, symlinks are followed by the session, never by the daemon, and
    absolute targets start at the root); this adds what a kernel would check first, and
    the privileges a tenant never has."""
    for name in ("path", "src", "dst"):
        value = getattr(op, name, None)
        if value is not None:
            check_path(value)
    _check_ints(op)
    if isinstance(op, m.Symlink):
        target = op.target
        if not isinstance(target, bytes) or b"\0" in target:
            raise _oserror(errno.EINVAL, "bad symlink target")
        if not target:
            raise _oserror(errno.ENOENT, "empty symlink target")
        if len(target) >= PATH_MAX:
            raise _oserror(errno.ENAMETOOLONG, "symlink target too long")
    if isinstance(op, _XATTR_OPS):
        xname = op.name if isinstance(op.name, bytes) else os.fsencode(op.name)
        if b"\0" in xname:
            raise _oserror(errno.EINVAL, "embedded null byte in an attribute name")
        if not xname or len(xname) > XATTR_NAME_MAX:
            raise _oserror(errno.ERANGE, "attribute name empty or longer than 255 bytes")
    if tc.read_only:
        if (isinstance(op, _MODIFYING)
                or (isinstance(op, m.Open) and op.flags & _OPEN_WRITE)
                or (isinstance(op, m.Access) and op.mode & os.W_OK)):
            raise _oserror(errno.EROFS, "read-only share", getattr(op, "path", None))
    if isinstance(op, m.Open):
        flags = op.flags
        if flags & _O_PATH or (flags & _O_TMPFILE) == _O_TMPFILE:
            raise _oserror(errno.EINVAL, "O_PATH and O_TMPFILE are not supported", op.path)
        if flags & os.O_ACCMODE == os.O_ACCMODE:
            raise _oserror(errno.EINVAL, "invalid access mode", op.path)
        return msgspec.structs.replace(op, flags=flags & _OPEN_ALLOWED,
                                       mode=op.mode & 0o777 & ~_SETID)
    if isinstance(op, m.MakeDir):
        return msgspec.structs.replace(op, mode=op.mode & 0o3777 & ~stat_mod.S_ISUID)
    if isinstance(op, m.MakeNode):
        if stat_mod.S_IFMT(op.mode) not in _ALLOWED_NODES:
            raise _oserror(errno.EPERM, "device nodes cannot be made", op.path)
        return msgspec.structs.replace(op, mode=op.mode & ~_SETID, rdev=0)
    if isinstance(op, m.SetAttr):
        if op.mode is not None and op.mode & _SETID:
            raise _oserror(errno.EPERM, "set-user-ID and set-group-ID bits are not allowed",
                           op.path)
        if op.uid not in (None, -1, tc.uid) or op.gid not in (None, -1, tc.gid):
            raise _oserror(errno.EPERM, "files cannot be given to another owner", op.path)
    elif isinstance(op, (m.SetXattr, m.RemoveXattr)):
        if not op.name.startswith(b"user."):
            raise _oserror(errno.EPERM, "only user.* attributes can be changed", op.path)
        if isinstance(op, m.SetXattr) and len(op.value) > XATTR_SIZE_MAX:
            raise _oserror(errno.E2BIG, "attribute value larger than 64 KiB", op.path)
    elif isinstance(op, m.GetXattr) and op.name.startswith(b"trusted."):
        raise _oserror(errno.ENODATA, "no such attribute", op.path)
    elif isinstance(op, m.Rename) and op.flags & ~3:
        raise _oserror(errno.EINVAL, "unsupported rename flags", op.src)
    return op
