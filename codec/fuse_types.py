"""Typed results of decoded FUSE replies, as frozen msgspec Structs.

They live apart from the decoders so that message definitions (for actors and for the
ZeroMQ wire) can reuse them without importing decoding machinery. All are frozen
(immutable, hashable, safe to share between threads) and ``gc=False`` (they hold only
ints and bytes, so they cannot form reference cycles; skipping GC tracking makes them
cheaper to create on the hot path).

Values are exactly what the daemon sent, after validation by ``codec.fuse_replies``;
nothing is rounded or clamped here.
"""

from __future__ import annotations

import os
import stat

import msgspec

from pyvirtiofs.codec.fuse_abi import FUSE_INIT_EXT, FUSE_KERNEL_MINOR_VERSION, S_IFMT

_NS = 1_000_000_000


class Attr(msgspec.Struct, frozen=True, gc=False):
    """``struct fuse_attr``: the daemon's view of an inode's ``stat``.

    Times are seconds (signed) plus nanoseconds (``< 10**9``, validated). ``rdev`` is
    the 32-bit ``new_encode_dev`` encoding, which ``os.major``/``os.minor`` understand
    for majors below 4096. ``blksize`` 0 means "daemon did not say" (Linux then uses the
    superblock's block size). ``flags`` holds ``FUSE_ATTR_*`` bits.
    """

    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int

    @property
    def file_type(self) -> int:
        """``mode & S_IFMT`` (one of ``stat.S_IFREG``, ``stat.S_IFDIR``, ...)."""
        return self.mode & S_IFMT

    @property
    def atime_ns(self) -> int:
        return self.atime * _NS + self.atimensec

    @property
    def mtime_ns(self) -> int:
        return self.mtime * _NS + self.mtimensec

    @property
    def ctime_ns(self) -> int:
        return self.ctime * _NS + self.ctimensec

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def is_lnk(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def to_stat_result(self, dev: int = 0) -> os.stat_result:
        """Build the ``os.stat_result`` that ``os.stat`` would return for this inode.

        ``os.stat_result`` takes the 10 sequence fields positionally (the three times as
        ints, as CPython does) and the named-only fields in a dict: float and ns times,
        ``st_blksize``, ``st_blocks``, ``st_rdev``. FUSE has no device number, so the
        caller supplies ``dev`` (e.g. one per mounted share).
        """
        return os.stat_result(
            (
                self.mode,
                self.ino,
                dev,
                self.nlink,
                self.uid,
                self.gid,
                self.size,
                self.atime,
                self.mtime,
                self.ctime,
            ),
            {
                "st_atime": self.atime + self.atimensec * 1e-9,
                "st_mtime": self.mtime + self.mtimensec * 1e-9,
                "st_ctime": self.ctime + self.ctimensec * 1e-9,
                "st_atime_ns": self.atime_ns,
                "st_mtime_ns": self.mtime_ns,
                "st_ctime_ns": self.ctime_ns,
                "st_blksize": self.blksize,
                "st_blocks": self.blocks,
                "st_rdev": self.rdev,
            },
        )


class EntryOut(msgspec.Struct, frozen=True, gc=False):
    """``struct fuse_entry_out`` (LOOKUP, MKDIR, MKNOD, SYMLINK, LINK, CREATE, READDIRPLUS).

    ``nodeid == 0`` is a *negative entry*: the name does not exist and the absence may
    be cached for ``entry_valid`` seconds; its ``attr`` is then unvalidated filler.
    Every positive entry counts one lookup in the daemon, to be paid back by FORGET.
    Timeouts are seconds + nanoseconds (unsigned).
    """

    nodeid: int
    generation: int
    entry_valid: int
    entry_valid_nsec: int
    attr_valid: int
    attr_valid_nsec: int
    attr: Attr

    @property
    def is_negative(self) -> bool:
        return self.nodeid == 0

    @property
    def entry_valid_ns(self) -> int:
        """Name cache timeout in nanoseconds (add to a ``time.monotonic_ns()``)."""
        return self.entry_valid * _NS + self.entry_valid_nsec

    @property
    def attr_valid_ns(self) -> int:
        """Attribute cache timeout in nanoseconds."""
        return self.attr_valid * _NS + self.attr_valid_nsec


class AttrOut(msgspec.Struct, frozen=True, gc=False):
    """``struct fuse_attr_out`` (GETATTR, SETATTR)."""

    attr_valid: int
    attr_valid_nsec: int
    attr: Attr

    @property
    def attr_valid_ns(self) -> int:
        return self.attr_valid * _NS + self.attr_valid_nsec


class OpenOut(msgspec.Struct, frozen=True, gc=False):
    """``struct fuse_open_out`` (OPEN, OPENDIR): the handle and ``FOPEN_*`` flags."""

    fh: int
    open_flags: int


class CreateOut(msgspec.Struct, frozen=True, gc=False):
    """CREATE reply: ``fuse_entry_out`` followed by ``fuse_open_out``."""

    entry: EntryOut
    open: OpenOut


class WriteOut(msgspec.Struct, frozen=True, gc=False):
    """``struct fuse_write_out``: bytes written (never more than requested)."""

    size: int


class StatfsOut(msgspec.Struct, frozen=True, gc=False):
    """``struct fuse_kstatfs`` (field names as in ``statvfs`` without the ``f_``)."""

    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int

    def to_statvfs_result(self) -> os.statvfs_result:
        """As ``os.statvfs`` returns it (``f_favail`` = ``f_ffree``; no mount flags)."""
        frsize = self.frsize or self.bsize
        return os.statvfs_result((self.bsize, frsize, self.blocks, self.bfree, self.bavail,
                                  self.files, self.ffree, self.ffree, 0, self.namelen))


class InitOut(msgspec.Struct, frozen=True, gc=False):
    """``struct fuse_init_out``. Fields a short (older) reply lacks are 0.

    Fields are raw: ``max_pages`` means something only when ``FUSE_MAX_PAGES`` is in
    ``flags``, ``map_alignment`` only with ``FUSE_MAP_ALIGNMENT``, and ``flags2`` only
    with ``FUSE_INIT_EXT`` (use :attr:`all_flags`, which applies that rule as Linux's
    ``process_init_reply`` does).
    """

    major: int
    minor: int
    max_readahead: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int
    max_pages: int
    map_alignment: int
    flags2: int

    @property
    def all_flags(self) -> int:
        """64-bit flags: ``flags | flags2 << 32`` when ``FUSE_INIT_EXT`` is set."""
        if self.flags & FUSE_INIT_EXT:
            return self.flags | (self.flags2 << 32)
        return self.flags

    @property
    def negotiated_minor(self) -> int:
        """The minor both sides speak: the smaller of the reply's and ours.

        Daemons built on libfuse reply with *their* minor whatever we asked, so a newer
        daemon can say 45 while we speak 38.
        """
        return min(self.minor, FUSE_KERNEL_MINOR_VERSION)


class Dirent(msgspec.Struct, frozen=True, gc=False):
    """``struct fuse_dirent``: one READDIR record.

    ``off`` is an opaque cookie: pass the last entry's ``off`` to the next READDIR to
    resume after it. ``type`` is the ``DT_*`` value (``mode >> 12``), 0 if unknown.
    ``name`` is raw bytes (not decoded: file names need not be UTF-8); it is never
    empty and never contains ``/`` or NUL, but may be ``.`` or ``..``.
    """

    ino: int
    off: int
    type: int
    name: bytes


class DirentPlus(msgspec.Struct, frozen=True, gc=False):
    """``struct fuse_direntplus``: a READDIRPLUS record.

    ``entry.nodeid != 0`` means the daemon took one lookup reference on that node,
    exactly as a LOOKUP would: keep it (count it) or FORGET it. ``entry.nodeid == 0``
    means "no entry information" (virtiofsd sends that for ``.`` and ``..``), NOT a
    negative entry; its ``entry.attr`` is unvalidated filler.
    """

    entry: EntryOut
    dirent: Dirent


class LseekOut(msgspec.Struct, frozen=True, gc=False):
    """``struct fuse_lseek_out``: the resulting offset (0 .. 2**63-1)."""

    offset: int


class PollOut(msgspec.Struct, frozen=True, gc=False):
    """``struct fuse_poll_out``: ready events (``select.POLL*`` bits)."""

    revents: int


class GetxattrSize(msgspec.Struct, frozen=True, gc=False):
    """``struct fuse_getxattr_out``: the size a GETXATTR/LISTXATTR with size 0 asked for.

    Raw daemon value; Linux clamps it to 65536 (XATTR_SIZE_MAX / XATTR_LIST_MAX).
    """

    size: int
