"""How people use a share: ``connect()`` a folder (or ``connect_remote()`` a server) and use
it like the ``os`` module.

Modules and subpackages, by who uses them:
    fs            the os-style facade every access path shares (:class:`ShareFS`)
    local         in-process: :func:`connect`, :class:`VirtioFS`
    remote/       over ZeroMQ: wire format, server, client, keys
    agent/        the multi-tenant agent: config, confinement, ZAP, control
    integrations/ fsspec and the FUSE mount
    cli           the ``pyvirtiofs`` command
"""

from pyvirtiofs.api.fs import DirEntry, RawFile, ShareFS
from pyvirtiofs.api.local import VirtioFS, connect
from pyvirtiofs.api.remote.client import CurveKeys, RemoteFS, connect_remote

__all__ = ["CurveKeys", "DirEntry", "RawFile", "RemoteFS", "ShareFS", "VirtioFS", "connect",
           "connect_remote"]
