"""File and directory actors: one per open handle.

Each holds its node id and FUSE file handle (and, for files, the open flags and the file
position) and talks to the device actor directly — no hop through the session on the data
path. Both send RELEASE / RELEASEDIR **exactly once**: on :class:`codec.messages.Close`, on
a normal stop (also when their session stops them), and when they die from an error
(``on_failure``). A failed release is logged, never raised.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import pykka

from actors import device as dev
from codec import fuse_requests as rq
from codec import messages as m
from codec.fuse_abi import Opcode
from codec.fuse_types import Attr, Dirent, DirentPlus, InitOut

log = logging.getLogger(__name__)

__all__ = ["DirectoryActor", "FileActor", "HandleLimits"]

PAGE = 4096
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
MAX_OFFSET = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class HandleLimits:
    """Per-request sizes the session negotiated, shared by every handle it opens."""

    max_read: int
    max_write: int
    readdir_size: int
    timeout: float = 60.0

    @classmethod
    def from_init(cls, init: InitOut, readdir_size: int) -> HandleLimits:
        pages = init.max_pages or 32  # before MAX_PAGES: the kernel's 128 KiB default
        max_read = min(pages * PAGE, 1 << 20)
        return cls(max_read=max_read, max_write=max(PAGE, min(init.max_write, 1 << 20)),
                   readdir_size=min(readdir_size, max_read))


class _HandleActor(pykka.ThreadingActor):
    """Shared life cycle of file and directory actors: the exactly-once release."""

    use_daemon_thread = True

    def __init__(self, device: pykka.ActorRef[Any], session: pykka.ActorRef[Any],
                 nodeid: int, fh: int, flags: int, limits: HandleLimits) -> None:
        super().__init__()
        self.device = device
        self.session = session
        self.nodeid = nodeid
        self.fh = fh
        self.flags = flags
        self.limits = limits
        self.released = False
        self._ctx: m.Credentials | None = None  # credentials of the message being handled

    def _call(self, request: Any, **kwargs: Any) -> Any:
        try:
            return dev.call(self.device, request, ctx=self._ctx, **kwargs).get(
                timeout=self.limits.timeout)
        except pykka.Timeout:
            raise OSError(errno.ETIMEDOUT, f"no reply to {Opcode(request.opcode).name}") from None

    def _release_request(self) -> Any:
        raise NotImplementedError

    def _release(self) -> None:
        if self.released:
            return
        self.released = True
        try:
            self._call(self._release_request())
        except Exception as exc:
            log.warning("release of node %d fh %d failed: %s", self.nodeid, self.fh, exc)
        try:
            self.session.tell(m.Forgotten(nodeid=self.nodeid))
        except pykka.ActorDeadError:
            pass  # the session is stopping and forgets everything itself

    def on_stop(self) -> None:
        self._release()

    def on_failure(self, *exc_info: Any) -> None:
        self._release()

    def on_receive(self, message: Any) -> Any:
        handler = self._HANDLERS.get(type(message))
        if handler is None:
            return super().on_receive(message)
        if self.released:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        self._ctx = message.ctx
        try:
            return handler(self, message)
        finally:
            self._ctx = None

    def _close(self, msg: m.Close) -> None:
        self._release()
        self.stop()

    _HANDLERS: ClassVar[dict[type, Any]] = {}


class FileActor(_HandleActor):
    """An open file: read/write of any size (split into negotiated chunks, pipelined),
    positions, fstat, fsync, flush, ftruncate, fallocate, poll."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        # None: "at end of file, not yet known" — after an O_APPEND write the daemon
        # wrote at the end, wherever that was, and only a GETATTR tells.
        self.position: int | None = 0

    def _release_request(self) -> Any:
        return rq.release(self.nodeid, self.fh, self.flags)

    def _size(self) -> int:
        return self._call(rq.getattr(self.nodeid, self.fh)).attr.size

    def _pos(self) -> int:
        if self.position is None:
            self.position = self._size()
        return self.position

    def _changed(self) -> None:
        self.session.tell(m.InvalidateAttr(nodeid=self.nodeid))

    # -- read ------------------------------------------------------------------------------

    def _chunks(self, offset: int, size: int, step: int) -> list[tuple[int, int]]:
        if offset < 0 or size < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        size = min(size, MAX_OFFSET - offset)
        return [(offset + i, min(step, size - i)) for i in range(0, size, step)]

    def _read_at(self, offset: int, size: int, sink: memoryview | None) -> Any:
        chunks = self._chunks(offset, size, self.limits.max_read)
        futures = [
            dev.call(self.device, rq.read(self.nodeid, self.fh, off, n), ctx=self._ctx,
                     sink=None if sink is None else sink[off - offset:off - offset + n])
            for off, n in chunks
        ]
        parts: list[Any] = []
        error: BaseException | None = None
        short = False
        for (_, n), fut in zip(chunks, futures, strict=True):
            try:
                got = fut.get(timeout=self.limits.timeout)
            except pykka.Timeout:
                error = error or OSError(errno.ETIMEDOUT, "READ timed out")
                continue
            except OSError as exc:
                error = error or exc
                continue
            if error is None and not short:
                parts.append(got)
                if (got if sink is not None else len(got)) < n:
                    short = True  # end of file: later chunks are past it
        if error is not None and not parts:
            raise error
        if sink is not None:
            return sum(parts)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read(self, msg: m.Read) -> bytes:
        offset = self._pos() if msg.offset is None else msg.offset
        data: bytes = self._read_at(offset, msg.size, None) if msg.size else b""
        if msg.offset is None:
            self.position = offset + len(data)
        return data

    def _readinto(self, msg: m.ReadInto) -> int:
        buf = memoryview(msg.buffer).cast("B")
        offset = self._pos() if msg.offset is None else msg.offset
        n: int = self._read_at(offset, len(buf), buf) if len(buf) else 0
        if msg.offset is None:
            self.position = offset + n
        return n

    # -- write -----------------------------------------------------------------------------

    def _write(self, msg: m.Write) -> int:
        data = memoryview(msg.data).cast("B")
        append = bool(self.flags & os.O_APPEND)
        offset = (0 if append else self._pos()) if msg.offset is None else msg.offset
        chunks = self._chunks(offset, len(data), self.limits.max_write)
        if append and len(chunks) > 1:
            # Each WRITE appends at the then-current end: send them one at a time so the
            # pieces land in order.
            futures = []
            for off, n in chunks:
                f = dev.call(self.device, rq.write(self.nodeid, self.fh, off,
                                                   data[off - offset:off - offset + n]),
                             ctx=self._ctx)
                f.get(timeout=self.limits.timeout)
                futures.append(f)
        else:
            futures = [dev.call(self.device, rq.write(self.nodeid, self.fh, off,
                                                      data[off - offset:off - offset + n]),
                                ctx=self._ctx)
                       for off, n in chunks]
        written = 0
        error: BaseException | None = None
        for (_, n), fut in zip(chunks, futures, strict=True):
            try:
                got = fut.get(timeout=self.limits.timeout).size
            except (OSError, pykka.Timeout) as exc:
                error = error or (exc if isinstance(exc, OSError)
                                  else OSError(errno.ETIMEDOUT, "WRITE timed out"))
                continue
            if error is None:
                written += got
                if got < n:
                    error = OSError(errno.EIO, "short write")  # stop counting past a gap
        if chunks:
            self._changed()
        if error is not None and written == 0:
            raise error
        if msg.offset is None:
            self.position = None if append else offset + written
        return written

    # -- the rest --------------------------------------------------------------------------

    def _seek(self, msg: m.Seek) -> int:
        whence, offset = msg.whence, msg.offset
        if whence == os.SEEK_SET:
            new = offset
        elif whence == os.SEEK_CUR:
            new = self._pos() + offset
        elif whence == os.SEEK_END:
            new = self._size() + offset
        elif whence in (SEEK_DATA, SEEK_HOLE):
            new = self._call(rq.lseek(self.nodeid, self.fh, offset, whence)).offset
        else:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if new < 0 or new > MAX_OFFSET:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        self.position = new
        return new

    def _fstat(self, msg: m.FStat) -> Attr:
        return self._call(rq.getattr(self.nodeid, self.fh)).attr

    def _fsync(self, msg: m.FSync) -> None:
        self._call(rq.fsync(self.nodeid, self.fh, msg.datasync))

    def _flush(self, msg: m.Flush) -> None:
        self._call(rq.flush(self.nodeid, self.fh))

    def _ftruncate(self, msg: m.FTruncate) -> None:
        if msg.size < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if not self.flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))  # as ftruncate(2) on O_RDONLY
        self._call(rq.setattr(self.nodeid, fh=self.fh, size=msg.size))
        self._changed()

    def _fallocate(self, msg: m.FAllocate) -> None:
        if msg.offset < 0 or msg.length <= 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        self._call(rq.fallocate(self.nodeid, self.fh, msg.offset, msg.length, msg.mode))
        self._changed()

    def _poll(self, msg: m.Poll) -> int:
        return self._call(rq.poll(self.nodeid, self.fh, msg.events)).revents

    _HANDLERS: ClassVar[dict[type, Any]] = {
        m.Read: _read, m.ReadInto: _readinto, m.Write: _write, m.Seek: _seek,
        m.FStat: _fstat, m.FSync: _fsync, m.Flush: _flush, m.FTruncate: _ftruncate,
        m.FAllocate: _fallocate, m.Poll: _poll, m.Close: _HandleActor._close,
    }


class DirectoryActor(_HandleActor):
    """An open directory: pages through all entries by offset cookies; rewind; fsyncdir."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.cookie = 0
        self.at_end = False

    def _release_request(self) -> Any:
        return rq.releasedir(self.nodeid, self.fh)

    def _readdir(self, msg: m.ReadDir) -> list[Dirent] | list[DirentPlus]:
        if self.at_end:
            return []
        size = self.limits.readdir_size
        if msg.plus:
            batch: list[Any] = self._call(rq.readdirplus(self.nodeid, self.fh, self.cookie, size))
            if batch:
                # Each entry with a node id is a lookup the daemon counted: the session
                # takes them over (cache + FORGET later).
                self.session.tell(m.LearnEntries(parent=self.nodeid, entries=batch))
            cookies = [e.dirent.off for e in batch]
        else:
            batch = self._call(rq.readdir(self.nodeid, self.fh, self.cookie, size))
            cookies = [e.off for e in batch]
        if not batch:
            self.at_end = True
            return []
        self.cookie = cookies[-1]
        return batch

    def _rewind(self, msg: m.Rewind) -> None:
        self.cookie = 0
        self.at_end = False

    def _fsyncdir(self, msg: m.FSyncDir) -> None:
        self._call(rq.fsyncdir(self.nodeid, self.fh, msg.datasync))

    _HANDLERS: ClassVar[dict[type, Any]] = {
        m.ReadDir: _readdir, m.Rewind: _rewind, m.FSyncDir: _fsyncdir,
        m.Close: _HandleActor._close,
    }
