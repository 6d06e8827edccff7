"""The public API: ``connect()`` a share (or ``connect_remote()`` a server) and use it like
the ``os`` module."""

from api.fs import DirEntry, RawFile, ShareFS
from api.local import VirtioFS, connect
from api.remote import CurveKeys, RemoteFS, connect_remote

__all__ = ["CurveKeys", "DirEntry", "RawFile", "RemoteFS", "ShareFS", "VirtioFS", "connect",
           "connect_remote"]
