"""pyvirtiofs: a virtio-fs client in Python.

    import pyvirtiofs

    with pyvirtiofs.connect("/srv/share") as fs:        # a private virtiofsd on the folder
        print(fs.listdir("/"))
    with pyvirtiofs.connect_remote("tcp://127.0.0.1:5555") as fs:   # `pyvirtiofs serve`
        print(fs.stat("/a.txt").st_size)

The package's layers, each a subpackage (dependencies point one way, down):

    api      how people use it: the os-style facade, remote server and client, the
             multi-tenant agent, fsspec and FUSE integrations, the command line
    actors   the actors: device (owns the queues), session (paths, lookups), open handles
    codec    the FUSE wire format, pure: bytes in, validated values out
    hw       transports: how buffers reach a virtio-fs device (vhost-user, ...)
    tools    the benchmark and the soak (loaded only by their commands)
"""


from pyvirtiofs.actors.session import SessionConfig
from pyvirtiofs.api import (
    CurveKeys,
    DirEntry,
    RawFile,
    RemoteFS,
    ShareFS,
    VirtioFS,
    connect,
    connect_remote,
)
from pyvirtiofs.api.remote.keys import client_keys


def __getattr__(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    # The version comes from the installed metadata: read only when asked (importlib's
    # metadata machinery costs every command ~25 ms otherwise).
    if name == "__version__":
        try:
            return version("pyvirtiofs")
        except PackageNotFoundError:  # a source tree that was never installed
            return "0+unknown"
    raise AttributeError(f"module 'pyvirtiofs' has no attribute {name!r}")

__all__ = [
    "CurveKeys",
    "DirEntry",
    "RawFile",
    "RemoteFS",
    "SessionConfig",
    "ShareFS",
    "VirtioFS",
    "__version__",
    "client_keys",
    "connect",
    "connect_remote",
]
