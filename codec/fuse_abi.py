"""FUSE kernel ABI: constants and precompiled little-endian structs.

Facts come from Linux ``include/uapi/linux/fuse.h`` (protocol 7.38; the layouts used
here are unchanged from 7.27 on, except where a comment says otherwise). Everything is
little-endian: virtio-fs is a virtio 1.x device, and virtio 1.x is little-endian on the
wire whatever the host is, so we never use native byte order.

This module is pure data: no I/O, no imports from other project packages. Each
``struct.Struct`` below is compiled once at import time because encoders and decoders
sit on the hot path of every request.

Notes on signedness:

* ``fuse_attr.{atime,mtime,ctime}`` are declared ``uint64_t`` but Linux stores them in a
  signed ``time64_t`` (times before 1970 arrive as two's complement), so we (un)pack
  them as signed ``q``. ``fuse_setattr_in`` times likewise.
* ``fuse_lseek_in.offset`` is declared ``uint64_t`` but carries a ``loff_t``; we pack it
  signed so that ``SEEK_END`` with a negative offset works.
"""

from __future__ import annotations

import enum
import stat
import struct

# --------------------------------------------------------------------------------------
# Versions and well-known ids
# --------------------------------------------------------------------------------------

FUSE_KERNEL_VERSION = 7
#: The minor version we ASK for in INIT (what this codec implements).
FUSE_KERNEL_MINOR_VERSION = 38
#: Oldest minor version we accept from a daemon (C virtiofsd 7.2 replies 36).
MIN_MINOR = 27
#: Node id of the root inode of a FUSE file system.
FUSE_ROOT_ID = 1

# --------------------------------------------------------------------------------------
# Opcodes
# --------------------------------------------------------------------------------------


class Opcode(enum.IntEnum):
    """``enum fuse_opcode``. Values are fixed by the ABI; 7 is unused since 7.1."""

    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50  # 7.34
    TMPFILE = 51  # 7.37
    STATX = 52  # 7.39: newer than what we ask for; listed so that logs can name it
    CUSE_INIT = 4096


def opcode_name(opcode: int | str) -> str:
    """``opcode``'s name for logs and reports (``"opcode N"`` for one the ABI lacks)."""
    try:
        return Opcode(int(opcode)).name
    except ValueError:
        return f"opcode {opcode}"


# --------------------------------------------------------------------------------------
# INIT flags (fuse_init_in.flags / fuse_init_out.flags; bits 32..63 travel in flags2,
# shifted down by 32, and only when FUSE_INIT_EXT is set in the same message)
# --------------------------------------------------------------------------------------

FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_FILE_OPS = 1 << 2
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_EXPORT_SUPPORT = 1 << 4
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_SPLICE_WRITE = 1 << 7
FUSE_SPLICE_MOVE = 1 << 8
FUSE_SPLICE_READ = 1 << 9
FUSE_FLOCK_LOCKS = 1 << 10
FUSE_HAS_IOCTL_DIR = 1 << 11
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_NO_OPEN_SUPPORT = 1 << 17
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_HANDLE_KILLPRIV = 1 << 19
FUSE_POSIX_ACL = 1 << 20
FUSE_ABORT_ERROR = 1 << 21
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
FUSE_NO_OPENDIR_SUPPORT = 1 << 24
FUSE_EXPLICIT_INVAL_DATA = 1 << 25
FUSE_MAP_ALIGNMENT = 1 << 26
FUSE_SUBMOUNTS = 1 << 27
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
FUSE_SETXATTR_EXT = 1 << 29
FUSE_INIT_EXT = 1 << 30
FUSE_INIT_RESERVED = 1 << 31
FUSE_SECURITY_CTX = 1 << 32
FUSE_HAS_INODE_DAX = 1 << 33
FUSE_CREATE_SUPP_GROUP = 1 << 34
FUSE_HAS_EXPIRE_ONLY = 1 << 35

# --------------------------------------------------------------------------------------
# fuse_setattr_in.valid
# --------------------------------------------------------------------------------------

FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# --------------------------------------------------------------------------------------
# fuse_open_out.open_flags
# --------------------------------------------------------------------------------------

FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# --------------------------------------------------------------------------------------
# Per-request flag fields
# --------------------------------------------------------------------------------------

FUSE_RELEASE_FLUSH = 1 << 0  # fuse_release_in.release_flags
FUSE_RELEASE_FLOCK_UNLOCK = 1 << 1
FUSE_GETATTR_FH = 1 << 0  # fuse_getattr_in.getattr_flags
FUSE_LK_FLOCK = 1 << 0  # fuse_lk_in.lk_flags
FUSE_WRITE_CACHE = 1 << 0  # fuse_write_in.write_flags
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_WRITE_KILL_SUIDGID = 1 << 2
FUSE_WRITE_KILL_PRIV = FUSE_WRITE_KILL_SUIDGID  # obsolete alias
FUSE_READ_LOCKOWNER = 1 << 1  # fuse_read_in.read_flags
FUSE_POLL_SCHEDULE_NOTIFY = 1 << 0  # fuse_poll_in.flags
FUSE_FSYNC_FDATASYNC = 1 << 0  # fuse_fsync_in.fsync_flags
FUSE_ATTR_SUBMOUNT = 1 << 0  # fuse_attr.flags
FUSE_ATTR_DAX = 1 << 1
FUSE_OPEN_KILL_SUIDGID = 1 << 0  # fuse_open_in / fuse_create_in .open_flags
FUSE_SETXATTR_ACL_KILL_SGID = 1 << 0  # fuse_setxattr_in.setxattr_flags (ext layout)
FUSE_EXPIRE_ONLY = 1 << 0  # fuse_notify_inval_entry_out.flags

# renameat2(2) flags carried by fuse_rename2_in.flags
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

# setxattr(2) flags carried by fuse_setxattr_in.flags
XATTR_CREATE = 1
XATTR_REPLACE = 2

# --------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------

U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
#: Largest file offset / size (LLONG_MAX, the kernel's loff_t limit).
OFF_MAX = 0x7FFF_FFFF_FFFF_FFFF
#: Largest errno magnitude a reply may carry (Linux MAX_ERRNO).
MAX_ERRNO = 4095

#: Longest name component we SEND (Linux NAME_MAX); longer gets ENAMETOOLONG.
FUSE_NAME_MAX_REQUEST = 255
#: Longest name we ACCEPT in a reply (the kernel's FUSE_NAME_MAX in fs/fuse/fuse_i.h).
FUSE_NAME_MAX = 1024
#: Longest symlink target (PATH_MAX - 1, the NUL takes the last byte).
SYMLINK_MAX = 4095
#: Linux xattr limits (include/uapi/linux/limits.h).
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536
#: The kernel's minimum read buffer; used as the READLINK reply capacity (one page).
FUSE_MIN_READ_BUFFER = 8192
READLINK_REPLY_SIZE = 4096
#: Our cap on entries per BATCH_FORGET (8 + 16 * 4096 bytes = one 64 KiB + 8 buffer),
#: far below the daemon's 1 MiB + 4 KiB request limit. Callers split larger batches.
BATCH_FORGET_MAX = 4096

# --------------------------------------------------------------------------------------
# Structs. One line per struct: field layout in declaration order.
# --------------------------------------------------------------------------------------

# fuse_attr (88): ino u64, size u64, blocks u64, atime s64, mtime s64, ctime s64,
#   atimensec u32, mtimensec u32, ctimensec u32, mode u32, nlink u32, uid u32, gid u32,
#   rdev u32, blksize u32, flags u32
_ATTR_FMT = "QQQqqqIIIIIIIIII"
ATTR = struct.Struct("<" + _ATTR_FMT)

# fuse_in_header (40): len u32, opcode u32, unique u64, nodeid u64, uid u32, gid u32,
#   pid u32, total_extlen u16 (8-byte units, 7.38), padding u16
IN_HEADER = struct.Struct("<IIQQIIIHH")
# fuse_out_header (16): len u32, error s32 (0 or -errno), unique u64
OUT_HEADER = struct.Struct("<IiQ")

# fuse_entry_out (128): nodeid u64, generation u64, entry_valid u64, attr_valid u64,
#   entry_valid_nsec u32, attr_valid_nsec u32, attr fuse_attr
ENTRY_OUT = struct.Struct("<QQQQII" + _ATTR_FMT)
# fuse_attr_out (104): attr_valid u64, attr_valid_nsec u32, dummy u32, attr fuse_attr
ATTR_OUT = struct.Struct("<QII" + _ATTR_FMT)
# fuse_open_out (16): fh u64, open_flags u32, padding u32 (backing_id s32 in 7.40)
OPEN_OUT = struct.Struct("<QII")
# fuse_write_out (8): size u32, padding u32
WRITE_OUT = struct.Struct("<II")
# fuse_statfs_out = fuse_kstatfs (80): blocks u64, bfree u64, bavail u64, files u64,
#   ffree u64, bsize u32, namelen u32, frsize u32, padding u32, spare u32[6]
STATFS_OUT = struct.Struct("<QQQQQIII28x")  # padding + spare skipped
# fuse_getxattr_out (8): size u32, padding u32
GETXATTR_OUT = struct.Struct("<II")
# fuse_poll_out (8): revents u32, padding u32
POLL_OUT = struct.Struct("<II")
# fuse_lseek_out (8): offset u64
LSEEK_OUT = struct.Struct("<Q")
# fuse_init_out, the part we read (36 of 64): major u32, minor u32, max_readahead u32,
#   flags u32, max_background u16, congestion_threshold u16, max_write u32,
#   time_gran u32, max_pages u16, map_alignment u16, flags2 u32 (7.36);
#   then unused space (max_stack_depth u32 and request_timeout u16 since 7.40/7.43)
INIT_OUT = struct.Struct("<IIIIHHIIHHI")
# fuse_dirent header (24): ino u64, off u64, namelen u32, type u32; name follows,
#   record padded to 8 bytes
DIRENT = struct.Struct("<QQII")

# fuse_init_in, pre-7.36 layout (16): major u32, minor u32, max_readahead u32, flags u32
INIT_IN = struct.Struct("<IIII")
# fuse_init_in, 7.36 layout (64), used when flags has FUSE_INIT_EXT: major u32,
#   minor u32, max_readahead u32, flags u32, flags2 u32, unused u32[11]
INIT_IN_EXT = struct.Struct("<IIIII44x")
# fuse_forget_in (8): nlookup u64
FORGET_IN = struct.Struct("<Q")
# fuse_batch_forget_in (8): count u32, dummy u32; then count x fuse_forget_one
BATCH_FORGET_IN = struct.Struct("<II")
# fuse_forget_one (16): nodeid u64, nlookup u64
FORGET_ONE = struct.Struct("<QQ")
# fuse_getattr_in (16): getattr_flags u32, dummy u32, fh u64
GETATTR_IN = struct.Struct("<IIQ")
# fuse_setattr_in (88): valid u32, padding u32, fh u64, size u64, lock_owner u64,
#   atime s64, mtime s64, ctime s64, atimensec u32, mtimensec u32, ctimensec u32,
#   mode u32, unused4 u32, uid u32, gid u32, unused5 u32
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")
# fuse_mknod_in (16): mode u32, rdev u32 (new_encode_dev), umask u32, padding u32
MKNOD_IN = struct.Struct("<IIII")
# fuse_mkdir_in (8): mode u32, umask u32
MKDIR_IN = struct.Struct("<II")
# fuse_rename_in (8): newdir u64
RENAME_IN = struct.Struct("<Q")
# fuse_rename2_in (16): newdir u64, flags u32, padding u32
RENAME2_IN = struct.Struct("<QII")
# fuse_link_in (8): oldnodeid u64
LINK_IN = struct.Struct("<Q")
# fuse_open_in (8): flags u32, open_flags u32 (FUSE_OPEN_*)
OPEN_IN = struct.Struct("<II")
# fuse_create_in (16): flags u32, mode u32, umask u32, open_flags u32
CREATE_IN = struct.Struct("<IIII")
# fuse_release_in (24): fh u64, flags u32, release_flags u32, lock_owner u64
RELEASE_IN = struct.Struct("<QIIQ")
# fuse_flush_in (24): fh u64, unused u32, padding u32, lock_owner u64
FLUSH_IN = struct.Struct("<QIIQ")
# fuse_read_in (40): fh u64, offset u64, size u32, read_flags u32, lock_owner u64,
#   flags u32, padding u32  (also the READDIR / READDIRPLUS argument)
READ_IN = struct.Struct("<QQIIQII")
# fuse_write_in (40): fh u64, offset u64, size u32, write_flags u32, lock_owner u64,
#   flags u32, padding u32
WRITE_IN = struct.Struct("<QQIIQII")
# fuse_fsync_in (16): fh u64, fsync_flags u32, padding u32
FSYNC_IN = struct.Struct("<QII")
# fuse_setxattr_in, compat layout (8): size u32, flags u32
SETXATTR_IN = struct.Struct("<II")
# fuse_setxattr_in, 7.33 layout (16), only when FUSE_SETXATTR_EXT was negotiated:
#   size u32, flags u32, setxattr_flags u32, padding u32
SETXATTR_IN_EXT = struct.Struct("<IIII")
# fuse_getxattr_in (8): size u32, padding u32  (also the LISTXATTR argument)
GETXATTR_IN = struct.Struct("<II")
# fuse_access_in (8): mask u32, padding u32
ACCESS_IN = struct.Struct("<II")
# fuse_poll_in (24): fh u64, kh u64, flags u32, events u32
POLL_IN = struct.Struct("<QQII")
# fuse_fallocate_in (32): fh u64, offset u64, length u64, mode u32, padding u32
FALLOCATE_IN = struct.Struct("<QQQII")
# fuse_lseek_in (24): fh u64, offset s64 (loff_t), whence u32, padding u32
LSEEK_IN = struct.Struct("<QqII")

# Sizes, named like the C structs, so that nobody hard-codes a number.
IN_HEADER_SIZE = IN_HEADER.size  # 40
OUT_HEADER_SIZE = OUT_HEADER.size  # 16
ATTR_SIZE = ATTR.size  # 88
ENTRY_OUT_SIZE = ENTRY_OUT.size  # 128
ATTR_OUT_SIZE = ATTR_OUT.size  # 104
OPEN_OUT_SIZE = OPEN_OUT.size  # 16
CREATE_OUT_SIZE = ENTRY_OUT_SIZE + OPEN_OUT_SIZE  # 144
WRITE_OUT_SIZE = WRITE_OUT.size  # 8
STATFS_OUT_SIZE = STATFS_OUT.size  # 80
GETXATTR_OUT_SIZE = GETXATTR_OUT.size  # 8
POLL_OUT_SIZE = POLL_OUT.size  # 8
LSEEK_OUT_SIZE = LSEEK_OUT.size  # 8
INIT_OUT_SIZE = 64  # sizeof(struct fuse_init_out) since 7.23
FUSE_COMPAT_22_INIT_OUT_SIZE = 24  # the shortest INIT reply we accept
INIT_IN_SIZE = INIT_IN.size  # 16
INIT_IN_EXT_SIZE = INIT_IN_EXT.size  # 64
FUSE_COMPAT_SETXATTR_IN_SIZE = SETXATTR_IN.size  # 8
DIRENT_SIZE = DIRENT.size  # FUSE_NAME_OFFSET = 24
FUSE_NAME_OFFSET = DIRENT_SIZE
FUSE_NAME_OFFSET_DIRENTPLUS = ENTRY_OUT_SIZE + DIRENT_SIZE  # 152


def fuse_rec_align(n: int) -> int:
    """FUSE_REC_ALIGN: round a record length up to the next multiple of 8."""
    return (n + 7) & ~7


#: Largest READDIR / READDIRPLUS record for a name of FUSE_NAME_MAX_REQUEST bytes. A
#: READDIR buffer smaller than this can make a daemon return an empty reply, which
#: reads as end-of-directory, so the encoders refuse such buffers.
DIRENT_RECORD_MAX = fuse_rec_align(FUSE_NAME_OFFSET + FUSE_NAME_MAX_REQUEST)  # 280
DIRENTPLUS_RECORD_MAX = fuse_rec_align(FUSE_NAME_OFFSET_DIRENTPLUS + FUSE_NAME_MAX_REQUEST)  # 408

#: The seven file types Linux accepts in fuse_attr.mode (fuse_valid_type()).
VALID_FILE_TYPES = frozenset(
    {
        stat.S_IFREG,
        stat.S_IFDIR,
        stat.S_IFLNK,
        stat.S_IFCHR,
        stat.S_IFBLK,
        stat.S_IFIFO,
        stat.S_IFSOCK,
    }
)
S_IFMT = 0o170000
