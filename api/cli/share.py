"""Opening the SHARE a command names: a folder, a server endpoint or a device."""

from __future__ import annotations

import errno
import os

from pyvirtiofs.api.fs import ShareFS
from pyvirtiofs.api.local import connect
from pyvirtiofs.api.remote.client import connect_remote
from pyvirtiofs.hw.guest.spec import is_device_spec

REMOTE_SCHEMES = ("tcp://", "ipc://")


def open_share(share: str) -> ShareFS:
    """A local folder (private daemon), a server endpoint or a device of this VM."""
    if is_device_spec(share):
        return connect(device=share)
    if share.startswith(REMOTE_SCHEMES):
        from pyvirtiofs.api.remote.keys import curve_from_env

        fs = connect_remote(share, timeout=5.0, curve=curve_from_env())
        try:
            fs.stat("/")  # fail now, with a clear message, if nobody answers
        except BaseException:
            fs.timeout = 0.0  # nobody answered: don't wait for a reply to Bye either
            fs.close()
            raise
        fs.timeout = 60.0
        return fs
    if not os.path.isdir(share):
        if os.path.exists(share):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder, cannot share it", share)
        raise FileNotFoundError(errno.ENOENT, "no such folder to share", share)
    return connect(os.path.abspath(share))  # virtiofsd runs elsewhere: no relative paths
