"""Files on a share: :class:`RawFile`, the unbuffered file every ``open`` builds on."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import TYPE_CHECKING, Any

from pyvirtiofs.actors import messages as m

if TYPE_CHECKING:
    from pyvirtiofs.api.fs import ShareFS

__all__ = ["RawFile", "mode_to_flags"]


def mode_to_flags(mode: str) -> tuple[int, bool, bool]:
    """``open()``'s mode string as ``os.open`` flags, and whether it reads and writes."""
    if not mode or len(set(mode)) != len(mode) or set(mode) - set("rwaxbt+"):
        raise ValueError(f"invalid mode: {mode!r}")
    kinds = [c for c in mode if c in "rwax"]
    if len(kinds) != 1 or ("b" in mode and "t" in mode):
        raise ValueError(f"invalid mode: {mode!r}")
    plus = "+" in mode
    kind = kinds[0]
    rw = os.O_RDWR if plus else (os.O_RDONLY if kind == "r" else os.O_WRONLY)
    extra = {"r": 0, "w": os.O_CREAT | os.O_TRUNC, "a": os.O_CREAT | os.O_APPEND,
             "x": os.O_CREAT | os.O_EXCL}[kind]
    return rw | extra, kind == "r" or plus, kind != "r" or plus


class RawFile(io.RawIOBase):
    """An unbuffered file on a share, backed by a file actor (no OS file descriptor).

    As with built-in files, one that is garbage-collected unclosed is closed then (its
    handle released) with a ``ResourceWarning``."""

    _finalizing = False

    def __init__(self, fs: ShareFS, handle: Any, name: str, flags: int) -> None:
        super().__init__()
        self._fs = fs
        self._handle = handle
        self.name = name
        self.flags = flags
        acc = flags & os.O_ACCMODE
        self.readable_ = acc in (os.O_RDONLY, os.O_RDWR)
        self.writable_ = acc in (os.O_WRONLY, os.O_RDWR)

    def _ask(self, message: Any) -> Any:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        return self._fs._ask_handle(self._handle, message, self.name)

    def readable(self) -> bool:
        return self.readable_

    def writable(self) -> bool:
        return self.writable_

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a virtio-fs file has no OS file descriptor")

    def readinto(self, buffer: Any) -> int:
        if not self.readable_:
            raise io.UnsupportedOperation("not readable")
        return self._fs._readinto(self._handle, buffer, self.name)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if not self.readable_:
            raise io.UnsupportedOperation("not readable")
        return self._ask(m.Read(size=size))

    def readall(self) -> bytes:
        chunks = []
        while chunk := self.read(4 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    def pread(self, size: int, offset: int) -> bytes:
        return self._ask(m.Read(size=size, offset=offset))

    def write(self, data: Any) -> int:
        if not self.writable_:
            raise io.UnsupportedOperation("not writable")
        return self._ask(m.Write(data=data))

    def pwrite(self, data: Any, offset: int) -> int:
        return self._ask(m.Write(data=data, offset=offset))

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._ask(m.Seek(offset=offset, whence=whence))

    def tell(self) -> int:
        return self.seek(0, os.SEEK_CUR)

    def truncate(self, size: int | None = None) -> int:
        if size is None:
            size = self.tell()
        self._ask(m.FTruncate(size=size))
        return size

    def stat(self) -> os.stat_result:
        return self._ask(m.FStat()).to_stat_result()

    def fsync(self, datasync: bool = False) -> None:
        self._ask(m.FSync(datasync=datasync))

    def close(self) -> None:
        if not self.closed:
            try:
                self._fs._close_handle(self._handle, wait=not self._finalizing)
            finally:
                super().close()

    def _dealloc_warn(self, source: Any) -> None:
        """A buffered wrapper is being finalized unclosed (it calls this as it does for
        FileIO): warn, and let its close() release without waiting."""
        if not self.closed:
            self._finalizing = True
            warnings.warn(f"unclosed file {source!r}", ResourceWarning, stacklevel=2,
                          source=source)

    def __del__(self) -> None:
        if getattr(self, "_fs", None) is None or self.closed:
            return
        if not self._finalizing:
            self._finalizing = True
            warnings.warn(f"unclosed file {self!r}", ResourceWarning, stacklevel=2,
                          source=self)
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"<pyvirtiofs.RawFile name={self.name!r}>"
