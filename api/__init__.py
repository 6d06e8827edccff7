"""The public API: ``connect()`` a share and use it like the ``os`` module."""

from api.fs import DirEntry, RawFile, ShareFS
from api.local import VirtioFS, connect

__all__ = ["DirEntry", "RawFile", "ShareFS", "VirtioFS", "connect"]
