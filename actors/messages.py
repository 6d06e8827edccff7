"""The messages actors exchange: frozen msgspec Structs, defined once, used on every path.

Paths and names are ``bytes`` (the API encodes callers' ``str`` with ``os.fsencode``): a
name need not be UTF-8, and msgpack must carry it unchanged. Times are
``(seconds, nanoseconds)`` pairs. Replies are the typed values of :mod:`codec.fuse_types`
or plain Python values, as documented per message.

The in-process hop to the device carries a reply future (``FuseCall.reply``); everything
else is plain data and can be msgpack-encoded to cross a process boundary: each message is
tagged with its class name, so a union of them decodes to the right type (see
:mod:`pyvirtiofs.api.remote.wire`).
"""

from __future__ import annotations

from typing import Any

import msgspec

PathArg = bytes
Timespec = tuple[int, int]


Credentials = tuple[int, int, int]


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag=True, omit_defaults=True):
    """Base of all actor messages.

    ``ctx``: the (uid, gid, pid) the daemon should act as for this operation — the FUSE
    request context a kernel would send. None: the session's default (this process).
    ``groups``: that caller's supplementary groups, for the permission checks the client
    makes (FUSE requests carry none)."""

    ctx: Credentials | None = None
    groups: tuple[int, ...] | None = None


# -- device actor ----------------------------------------------------------------------


class FuseCall(_Msg):
    """Submit one FUSE request. ``reply`` (a :class:`pyvirtiofs.actors.runtime.Future`) is
    completed with the decoded reply or an exception, on the device actor's thread.
    ``sink``: a writable buffer READ data is copied into (reply = byte count). ``ctx``:
    (uid, gid, pid) for the request header, or None for the session default.
    ``deadline`` (``time.monotonic()``): past it the call fails with ETIMEDOUT and is
    abandoned; ``timeout`` is what the caller allowed, for the error message."""

    request: Any
    reply: Any
    sink: Any = None
    deadline: float | None = None
    timeout: float | None = None


class Forget(_Msg):
    """Give lookups back: ``items`` are (node id, count) pairs, sent as FORGET or
    BATCH_FORGET on the hiprio queue. No reply (FORGET has none)."""

    items: list[tuple[int, int]]


class Abandon(_Msg):
    """The caller of the :class:`FuseCall` whose future is ``reply`` gave up: drop it if
    it still waits, never deliver its reply — nor copy a READ into its ``sink`` — and
    fail ``reply`` with ECANCELED. In-process only. Reply: None (ask it, and once it
    returns the caller's buffer is its own again)."""

    reply: Any


class WatchDevice(_Msg):
    """Subscribe ``watcher`` (an actor ref, in-process only) to :class:`DeviceLost`: it is
    told once when the device dies or its actor stops — at once if that already happened.
    No reply."""

    watcher: Any


class DeviceLost(_Msg):
    """Told by the device actor to its watchers: the device is gone (``detail`` says why).
    Every request from now on fails with ENOTCONN, and a cache must not answer either."""

    detail: str


class DeviceStats(_Msg):
    """Ask the device actor for its counters. Reply: dict (requests per opcode, in
    flight, backlog, protocol errors, free guest memory)."""


# -- session actor ---------------------------------------------------------------------


class Mount(_Msg):
    """Run FUSE_INIT and build the mount table (sent once, when the session starts).
    Reply: dict mount point → root node id."""


class Stat(_Msg):
    """Reply: :class:`codec.fuse_types.Attr`. ``follow`` False is lstat."""

    path: PathArg
    follow: bool = True


class Access(_Msg):
    """Reply: None, or OSError(EACCES). ``mode`` as for ``os.access`` (F_OK/R_OK/…)."""

    path: PathArg
    mode: int


class ReadLink(_Msg):
    """Reply: bytes (the link's target)."""

    path: PathArg


class MakeDir(_Msg):
    """Reply: Attr of the new directory. ``mode`` is masked by ``umask`` like mkdir(2)."""

    path: PathArg
    mode: int = 0o777
    umask: int = 0o022


class MakeNode(_Msg):
    """mknod: fifos and regular files (devices need privileges on the host)."""

    path: PathArg
    mode: int
    rdev: int = 0
    umask: int = 0o022


class Unlink(_Msg):
    path: PathArg


class RemoveDir(_Msg):
    path: PathArg


class Rename(_Msg):
    """``flags``: 0, RENAME_NOREPLACE (1) or RENAME_EXCHANGE (2)."""

    src: PathArg
    dst: PathArg
    flags: int = 0


class Link(_Msg):
    """Hard link: ``dst`` becomes another name of ``src``. Reply: Attr."""

    src: PathArg
    dst: PathArg


class Symlink(_Msg):
    """Create ``path`` as a symbolic link containing ``target``. Reply: Attr."""

    target: PathArg
    path: PathArg


class SetAttr(_Msg):
    """chmod/chown/truncate/utime on a path. Unset fields are left alone. ``uid``/``gid``
    of -1 mean "unchanged" as in os.chown. ``atime``/``mtime`` of "now" set the current
    time on the device. Reply: Attr."""

    path: PathArg
    follow: bool = True
    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime: Timespec | str | None = None
    mtime: Timespec | str | None = None


class StatFs(_Msg):
    """Reply: :class:`codec.fuse_types.StatfsOut`."""

    path: PathArg = "/"


class GetXattr(_Msg):
    """Reply: bytes."""

    path: PathArg
    name: PathArg
    follow: bool = True


class SetXattr(_Msg):
    """``flags``: 0, XATTR_CREATE (1) or XATTR_REPLACE (2)."""

    path: PathArg
    name: PathArg
    value: bytes
    flags: int = 0
    follow: bool = True


class ListXattr(_Msg):
    """Reply: list[bytes]."""

    path: PathArg
    follow: bool = True


class RemoveXattr(_Msg):
    path: PathArg
    name: PathArg
    follow: bool = True


class Open(_Msg):
    """Open (``flags`` from ``os.O_*``; O_CREAT creates with ``mode`` & ~``umask``).
    Reply: :class:`OpenedFile` naming a new file actor."""

    path: PathArg
    flags: int = 0
    mode: int = 0o666
    umask: int = 0o022


class OpenDir(_Msg):
    """Reply: :class:`OpenedDir` naming a new directory actor."""

    path: PathArg


class OpenedFile(_Msg):
    """A file actor and what the caller needs to know of it."""

    actor: Any  # pykka ActorRef of a FileActor
    nodeid: int
    flags: int
    attr: Any  # Attr at open time (or None)


class OpenedDir(_Msg):
    actor: Any  # pykka ActorRef of a DirectoryActor
    nodeid: int


class ListMounts(_Msg):
    """Reply: dict mount point → node id (the Hermit-style mount table)."""


class Forgotten(_Msg):
    """A handle actor tells its session it no longer needs ``nodeid`` (sent on release);
    ``handle`` is the actor's ref (in-process only)."""

    nodeid: int
    handle: Any = None


class LearnEntries(_Msg):
    """A directory actor hands the session the entries a READDIRPLUS returned: each one is
    a lookup the session must account for (nlookup) and may cache."""

    parent: int
    entries: list[Any]  # list[DirentPlus]


class InvalidateAttr(_Msg):
    """A file actor changed ``nodeid`` (write, truncate, …): drop its cached attributes."""

    nodeid: int


class SessionStats(_Msg):
    """Reply: dict of counters (nodes, cached entries, open handles, forgets sent)."""


# -- file actor ------------------------------------------------------------------------


class Read(_Msg):
    """Reply: bytes (short at end of file). ``offset`` None reads at the file position
    and advances it (read(2)); an int reads there and leaves it (pread(2))."""

    size: int
    offset: int | None = None


class ReadInto(_Msg):
    """Read into a caller buffer (one copy, out of guest memory). Reply: byte count."""

    buffer: Any  # writable memoryview/bytearray
    offset: int | None = None


class Write(_Msg):
    """Reply: bytes written (all of them, or an error). ``offset`` as for Read."""

    data: Any  # bytes-like
    offset: int | None = None


class Seek(_Msg):
    """Reply: the new position. ``whence``: SEEK_SET/CUR/END/DATA/HOLE."""

    offset: int
    whence: int = 0


class FStat(_Msg):
    """Reply: Attr."""


class FSync(_Msg):
    datasync: bool = False


class Flush(_Msg):
    pass


class FTruncate(_Msg):
    size: int


class FAllocate(_Msg):
    offset: int
    length: int
    mode: int = 0


class Poll(_Msg):
    """Reply: revents."""

    events: int


class Close(_Msg):
    """Release the handle now (RELEASE/RELEASEDIR) and stop the actor. Reply: None."""


# -- directory actor -------------------------------------------------------------------


class ReadDir(_Msg):
    """Next batch of entries. ``plus`` uses READDIRPLUS (entries carry attributes).
    Reply: list[Dirent] or list[DirentPlus]; empty at the end of the directory."""

    plus: bool = False


class Rewind(_Msg):
    """Start again from the first entry."""


class FSyncDir(_Msg):
    datasync: bool = False
