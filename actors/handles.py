"""File and directory actors: one per open handle, none with a thread of its own.

Each holds its node id and FUSE file handle (and, for files, the open flags and the file
position) and talks to the device directly — no hop through the session on the data path.
They are :class:`~pyvirtiofs.actors.runtime.InlineActor` s: run by the threads that send
to them, so 10,000 open files are 10,000 small objects, not 10,000 threads, and a read
costs two thread hand-offs (caller → device → caller). Both send RELEASE / RELEASEDIR
**exactly once**: on :class:`~pyvirtiofs.actors.messages.Close`, on a stop (also when
their session stops them), and when they die from an error (``on_failure``). A failed
release is logged, never raised.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, ClassVar

import pykka

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.device_client import DeviceClient
from pyvirtiofs.actors.published import PublishedAttrs
from pyvirtiofs.actors.runtime import Future, InlineActor
from pyvirtiofs.codec import fuse_requests as rq
from pyvirtiofs.codec.fuse_types import InitOut

log = logging.getLogger(__name__)

Task = Generator[Future[Any], Any, Any]

__all__ = ["DirectoryActor", "FileActor", "HandleLimits"]

PAGE = 4096
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
MAX_OFFSET = (1 << 63) - 1
MAX_RW_COUNT = (1 << 31) - PAGE  # Linux's cap on one read(2)/write(2)
# Requests in flight per read/write call: enough to keep the daemon busy, and a bound on
# what a read far past the end of a file sends.
READ_WINDOW = 16
WRITE_WINDOW = 16


@dataclass(slots=True)
class _ReadAhead:
    """A READ sent for the bytes a sequential reader will most likely ask for next."""

    offset: int
    size: int
    future: Any
    version: tuple[int, int]  # PublishedAttrs.data_version when it was sent


@dataclass(frozen=True, slots=True)
class HandleLimits:
    """Per-request sizes the session negotiated, shared by every handle it opens."""

    max_read: int
    max_write: int
    readdir_size: int
    timeout: float = 60.0
    read_ahead: bool = True

    @classmethod
    def from_init(cls, init: InitOut, readdir_size: int, timeout: float = 60.0,
                  max_request: int | None = None, read_ahead: bool = True) -> HandleLimits:
        """The limits the daemon granted, optionally capped at ``max_request`` bytes per
        READ/WRITE/READDIR (e.g. 64 KiB to behave like the Hermit driver)."""
        pages = init.max_pages or 32  # before MAX_PAGES: the kernel's 128 KiB default
        cap = 1 << 20 if max_request is None else max(PAGE, min(max_request, 1 << 20))
        max_read = min(pages * PAGE, cap)
        return cls(max_read=max_read, max_write=max(PAGE, min(init.max_write, cap)),
                   readdir_size=min(readdir_size, max_read), timeout=timeout,
                   read_ahead=read_ahead)


class _HandleActor(InlineActor):
    """Shared life cycle of file and directory actors: the exactly-once release.

    Exclusive: a message is handled to its end (its device requests answered) before the
    next one starts, so a read sees the position the write before it left."""

    exclusive = True

    def __init__(self, device: DeviceClient, session: pykka.ActorRef[Any],
                 nodeid: int, fh: int, flags: int, limits: HandleLimits,
                 published: PublishedAttrs | None = None) -> None:
        super().__init__()
        self.published = published
        self.device = device
        self.session = session
        self.nodeid = nodeid
        self.fh = fh
        self.flags = flags
        self.limits = limits
        self.released = False

    def _send(self, request: Any, ctx: m.Credentials | None, *, sink: Any = None,
              ) -> Future[Any]:
        return self.device.submit(request, ctx=ctx, sink=sink)

    @staticmethod
    def release_request(nodeid: int, fh: int, flags: int) -> Any:
        """The request that gives the handle back (the session uses it too, when the
        actor for a handle it opened cannot be started)."""
        raise NotImplementedError

    def _tell_session(self, message: Any) -> None:
        """Notes to the session are advisory: a session that is stopping has already
        dropped its cache and forgets every node itself, so a dead one is no error."""
        with contextlib.suppress(pykka.ActorDeadError):
            self.session.tell(message)

    def _release(self) -> Future[Any] | None:
        """Send RELEASE (or RELEASEDIR) — once; the future of that request."""
        if self.released:
            return None
        self.released = True
        future = self._send(self.release_request(self.nodeid, self.fh, self.flags), None)
        future.add_done_callback(self._after_release)
        return future

    def _after_release(self, future: Future[Any]) -> None:
        _, error = future.result_or_error()
        if error is not None:
            log.warning("release of node %d fh %d failed: %s", self.nodeid, self.fh, error)
        self._tell_session(m.Forgotten(nodeid=self.nodeid, handle=self.actor_ref))

    def on_stop(self) -> Any:
        future = self._release()
        if future is not None:
            return _wait_quietly(future)
        return None

    def on_failure(self, *exc_info: Any) -> None:
        self._release()

    def on_receive(self, message: Any) -> Any:
        handler = self._HANDLERS.get(type(message))
        if handler is None:
            return super().on_receive(message)
        if self.released:
            if isinstance(message, m.Close):
                return None  # closing twice is no error
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return handler(self, message)

    def _close(self, msg: m.Close) -> Task:
        future = self._release()
        self._stop()  # at once: what is queued behind this is refused, not handled
        if future is not None:
            yield from _wait_quietly(future)

    _HANDLERS: ClassVar[dict[type, Any]] = {}


def _wait_quietly(future: Future[Any]) -> Task:
    """Wait for ``future``; its failure is logged where it completes, not raised here."""
    with contextlib.suppress(OSError):
        yield future


class FileActor(_HandleActor):
    """An open file: read/write of any size (split into negotiated chunks, pipelined),
    positions, fstat, fsync, flush, ftruncate, fallocate, poll.

    A directory opened with open(2) is a file actor too, with ``O_DIRECTORY`` in its flags
    (the session opened it with OPENDIR): read and write fail with EISDIR as on Linux, and
    it is released with RELEASEDIR.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.position = 0
        self.directory = bool(self.flags & os.O_DIRECTORY)
        # Sequential reads: where the last one through the file position ended, and the
        # READ already sent for what follows it (see _read_ahead).
        self._sequential_end: int | None = None
        self._ahead: _ReadAhead | None = None

    @staticmethod
    def release_request(nodeid: int, fh: int, flags: int) -> Any:
        if flags & os.O_DIRECTORY:
            return rq.releasedir(nodeid, fh)
        return rq.release(nodeid, fh, flags)

    def _data_handle(self, *, write: bool) -> None:
        """read/write need a file (EISDIR on a directory, as Linux) opened for that
        (EBADF otherwise, as read(2)/write(2) on a descriptor opened the other way)."""
        if self.directory:
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        access = self.flags & os.O_ACCMODE
        if access == (os.O_RDONLY if write else os.O_WRONLY):
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    def _size(self, ctx: m.Credentials | None) -> Generator[Future[Any], Any, int]:
        out = yield self._send(rq.getattr(self.nodeid, self.fh), ctx)
        size: int = out.attr.size
        return size

    def _changed(self) -> None:
        self._drop_ahead()
        if self.published is not None:
            self.published.invalidate_node(self.nodeid)  # before our caller hears back
            self.published.data_changed(self.nodeid)
        self._tell_session(m.InvalidateAttr(nodeid=self.nodeid))

    # -- read ------------------------------------------------------------------------------

    @staticmethod
    def _chunks(offset: int, size: int, step: int) -> list[tuple[int, int]]:
        if offset < 0 or size < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        size = min(size, MAX_RW_COUNT, MAX_OFFSET - offset)
        return [(offset + i, min(step, size - i)) for i in range(0, size, step)]

    @staticmethod
    def _transfer(chunks: list[tuple[int, int]], send: Callable[[int, int], Future[Any]],
                  amount: Callable[[Any], int], window: int,
                  ) -> Generator[Future[Any], Any, tuple[list[Any], OSError | None]]:
        """Pipeline one request per chunk, at most ``window`` in flight, and collect the
        replies in order.

        Sending stops at the first short reply (end of file, disk full) or error — a huge
        read of a small file costs a window of requests, not one per chunk — but every
        request sent is waited for: a READ still in flight may write into the caller's
        buffer. Returns the replies of the complete prefix and the first error.
        """
        results: list[Any] = []
        error: OSError | None = None
        pending: collections.deque[tuple[int, Future[Any]]] = collections.deque()
        todo = iter(chunks)
        done_sending = False
        prefix_ended = False  # an error or a short reply: later replies do not count
        while True:
            while not done_sending and len(pending) < window:
                chunk = next(todo, None)
                if chunk is None:
                    done_sending = True
                else:
                    pending.append((chunk[1], send(*chunk)))
            if not pending:
                return results, error
            size, future = pending.popleft()
            try:
                got = yield future
            except OSError as exc:
                got, error = None, error or exc
            if error is not None or prefix_ended:
                done_sending = prefix_ended = True
                continue
            results.append(got)
            if amount(got) < size:
                done_sending = prefix_ended = True

    @staticmethod
    def _outcome(error: OSError | None, progress: int) -> None:
        """Raise ``error`` unless the call made progress and may return a short count, as
        read(2)/write(2) do (the next call meets the error again). A lost device always
        raises: a short read would pass for the end of the file."""
        if error is None:
            return
        if progress == 0 or error.errno == errno.ENOTCONN:
            raise error

    def _read_at(self, offset: int, size: int, sink: memoryview | None,
                 ctx: m.Credentials | None) -> Task:
        def send(off: int, n: int) -> Future[Any]:
            part = None if sink is None else sink[off - offset:off - offset + n]
            return self._send(rq.read(self.nodeid, self.fh, off, n), ctx, sink=part)

        def amount(got: Any) -> int:
            return got if sink is not None else len(got)

        parts, error = yield from self._transfer(
            self._chunks(offset, size, self.limits.max_read), send, amount, READ_WINDOW)
        total = sum(amount(p) for p in parts)
        self._outcome(error, total)
        if sink is not None:
            return total
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read(self, msg: m.Read) -> Task:
        self._data_handle(write=False)
        if msg.offset is not None:
            return (yield from self._read_at(msg.offset, msg.size, None, msg.ctx)
                    ) if msg.size else b""
        offset = self.position
        data = yield from self._take_ahead(offset, msg.size, msg.ctx)
        if data is None:
            data = (yield from self._read_at(offset, msg.size, None, msg.ctx)
                    ) if msg.size else b""
        self._advance(offset, msg.size, len(data), msg.ctx)
        return data

    def _readinto(self, msg: m.ReadInto) -> Task:
        self._data_handle(write=False)
        buf = memoryview(msg.buffer).cast("B")
        if msg.offset is not None:
            return (yield from self._read_at(msg.offset, len(buf), buf, msg.ctx)
                    ) if len(buf) else 0
        offset = self.position
        # A read() just before may have sent one.
        data = yield from self._take_ahead(offset, len(buf), msg.ctx)
        if data is None:
            n: int = (yield from self._read_at(offset, len(buf), buf, msg.ctx)
                      ) if len(buf) else 0
        else:
            n = len(data)
            buf[:n] = data
        # No read-ahead for readinto: the reply lands in the caller's buffer straight from
        # guest memory, one copy; a read-ahead would need a second one (measured slower).
        self._advance(offset, len(buf), n, msg.ctx, read_ahead=False)
        return n

    # -- read-ahead ------------------------------------------------------------------------
    #
    # A reader that calls read() again right where its last read ended is streaming the
    # file: while it handles one chunk, the daemon (another process, another core) can
    # already be reading the next. So after the second such read in a row, a READ for the
    # same amount that follows is sent before replying; the next read() takes its reply
    # if it asks for that offset. Reads at explicit offsets (pread) never read ahead. The
    # request count is unchanged for a reader that goes on: the READ it would have sent
    # is just sent earlier. Freshness: a write, ftruncate or fallocate through any handle
    # of this share (and a truncate by path) changes the file's data version and the
    # read-ahead is dropped — never older data than a completed write, as with one page
    # cache per file. Changes made behind the share's back (on the host) may be seen one
    # chunk late, as the kernel's cache=auto page cache may.

    def _advance(self, offset: int, asked: int, got: int, ctx: m.Credentials | None, *,
                 read_ahead: bool = True) -> None:
        """Move the position after a read through it, and read ahead when streaming."""
        streaming = self._sequential_end == offset
        self.position = self._sequential_end = offset + got
        if streaming and got == asked and got > 0 and read_ahead and self.limits.read_ahead:
            size = min(asked, self.limits.max_read)
            future = self._send(rq.read(self.nodeid, self.fh, offset + got, size), ctx)
            self._ahead = _ReadAhead(offset + got, size, future, self._data_version())

    def _data_version(self) -> tuple[int, int]:
        return (0, 0) if self.published is None else self.published.data_version(self.nodeid)

    def _take_ahead(self, offset: int, size: int, ctx: m.Credentials | None,
                    ) -> Generator[Future[Any], Any, bytes | None]:
        """The bytes at ``offset`` (up to ``size``) if read ahead and still fresh, else
        None (read them now). A dropped read-ahead needs no clean-up: READ holds nothing
        on the daemon's side, and its reply buffer is freed when it completes."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead.offset != offset or ahead.size > size:
            return None
        try:
            data: bytes = yield ahead.future
        except OSError:
            return None  # read again now: that read reports the error as it stands
        if ahead.version != self._data_version():
            return None  # written meanwhile: that data may be old
        if len(data) < ahead.size or size == ahead.size:
            return data
        rest = yield from self._read_at(offset + len(data), size - len(data), None, ctx)
        return data + rest

    def _drop_ahead(self) -> None:
        self._ahead = None
        self._sequential_end = None

    # -- write -----------------------------------------------------------------------------

    def _write(self, msg: m.Write) -> Task:
        self._data_handle(write=True)
        data = memoryview(msg.data).cast("B")
        append = bool(self.flags & os.O_APPEND)
        if msg.offset is not None:
            offset = msg.offset
        else:
            offset = 0 if append else self.position

        def send(off: int, n: int) -> Future[Any]:
            piece = data[off - offset:off - offset + n]
            return self._send(rq.write(self.nodeid, self.fh, off, piece), msg.ctx)

        chunks = self._chunks(offset, len(data), self.limits.max_write)
        if not chunks:
            return 0  # nothing written: the position stays (an O_APPEND one too)
        # With O_APPEND each WRITE lands at the then-current end: one at a time, so the
        # pieces land in order. Where the file position is then — the end right after
        # the last piece, as Linux leaves it — a GETATTR sent behind the WRITEs says
        # (the daemon serves a queue in order): no extra wait, no guess later.
        replies, error = yield from self._transfer(chunks, send, lambda out: out.size,
                                                   1 if append else WRITE_WINDOW)
        self._changed()
        written = sum(out.size for out in replies)
        self._outcome(error, written)
        if msg.offset is None:
            if append:
                self.position = (yield self._send(rq.getattr(self.nodeid, self.fh),
                                                  msg.ctx)).attr.size
            else:
                self.position = offset + written
        return written

    # -- the rest --------------------------------------------------------------------------

    def _seek(self, msg: m.Seek) -> Task:
        whence, offset = msg.whence, msg.offset
        if whence == os.SEEK_SET:
            new = offset
        elif whence == os.SEEK_CUR:
            new = self.position + offset
        elif whence == os.SEEK_END:
            new = (yield from self._size(msg.ctx)) + offset
        elif whence in (SEEK_DATA, SEEK_HOLE):
            if offset < 0:
                raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))  # as Linux's lseek
            out = yield self._send(rq.lseek(self.nodeid, self.fh, offset, whence), msg.ctx)
            new = out.offset
        else:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if new < 0 or new > MAX_OFFSET:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        self.position = new
        return new

    def _fstat(self, msg: m.FStat) -> Task:
        out = yield self._send(rq.getattr(self.nodeid, self.fh), msg.ctx)
        return out.attr

    def _fsync(self, msg: m.FSync) -> Task:
        sync = rq.fsyncdir if self.directory else rq.fsync
        yield self._send(sync(self.nodeid, self.fh, msg.datasync), msg.ctx)

    def _flush(self, msg: m.Flush) -> Task:
        yield self._send(rq.flush(self.nodeid, self.fh), msg.ctx)

    def _ftruncate(self, msg: m.FTruncate) -> Task:
        if msg.size < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if not self.flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))  # as ftruncate(2) on O_RDONLY
        yield self._send(rq.setattr(self.nodeid, fh=self.fh, size=msg.size), msg.ctx)
        self._changed()

    def _fallocate(self, msg: m.FAllocate) -> Task:
        if msg.offset < 0 or msg.length <= 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        yield self._send(rq.fallocate(self.nodeid, self.fh, msg.offset, msg.length, msg.mode),
                         msg.ctx)
        self._changed()

    def _poll(self, msg: m.Poll) -> Task:
        out = yield self._send(rq.poll(self.nodeid, self.fh, msg.events), msg.ctx)
        return out.revents

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

    @staticmethod
    def release_request(nodeid: int, fh: int, flags: int) -> Any:
        return rq.releasedir(nodeid, fh)

    def _readdir(self, msg: m.ReadDir) -> Task:
        if self.at_end:
            return []
        size = self.limits.readdir_size
        if msg.plus:
            batch: list[Any] = yield self._send(
                rq.readdirplus(self.nodeid, self.fh, self.cookie, size), msg.ctx)
            if batch:
                # Each entry with a node id is a lookup the daemon counted: the session
                # takes them over (cache + FORGET later).
                self._tell_session(m.LearnEntries(parent=self.nodeid, entries=batch))
            cookies = [e.dirent.off for e in batch]
        else:
            batch = yield self._send(rq.readdir(self.nodeid, self.fh, self.cookie, size),
                                     msg.ctx)
            cookies = [e.off for e in batch]
        if not batch:
            self.at_end = True
            return []
        self.cookie = cookies[-1]
        return batch

    def _rewind(self, msg: m.Rewind) -> None:
        self.cookie = 0
        self.at_end = False

    def _fsyncdir(self, msg: m.FSyncDir) -> Task:
        yield self._send(rq.fsyncdir(self.nodeid, self.fh, msg.datasync), msg.ctx)

    _HANDLERS: ClassVar[dict[type, Any]] = {
        m.ReadDir: _readdir, m.Rewind: _rewind, m.FSyncDir: _fsyncdir,
        m.Close: _HandleActor._close,
    }
