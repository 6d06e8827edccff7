"""The public API: ``connect()`` a share and use it like the ``os`` module."""

from api.local import DirEntry, RawFile, VirtioFS, connect

__all__ = ["DirEntry", "RawFile", "VirtioFS", "connect"]
