"""fsspec given the endpoint of a ``pyvirtiofs serve`` as ``share=``: it connects remotely, as
``remote=`` does, instead of looking for a folder called ``tcp:``."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from pyvirtiofs.api.integrations.fsspec_fs import VirtioFileSystem
from pyvirtiofs.api.local import connect
from pyvirtiofs.api.remote.server import ShareServer, Tenant

pytestmark = pytest.mark.daemon


def test_share_given_a_tcp_endpoint_connects_remotely(share: Path) -> None:
    (share / "a.csv").write_text("x\n1\n")
    with connect(share) as local, ShareServer("tcp://127.0.0.1:0",
                                              tenant=Tenant("t", local)) as server:
        endpoint = server.endpoints[0]
        fs = VirtioFileSystem(share=endpoint, skip_instance_cache=True)
        try:
            assert type(fs.vfs).__name__ == "RemoteFS"
            assert fs.cat_file("/a.csv") == b"x\n1\n"
            fs.pipe("/b.bin", b"over tcp")
            assert (share / "b.bin").read_bytes() == b"over tcp"
        finally:
            fs.close()
        # through fsspec's own entry points, as pandas passes storage options
        with fsspec.open("virtiofs:///a.csv", "rb", share=endpoint,
                         skip_instance_cache=True) as f:
            assert f.read() == b"x\n1\n"
        VirtioFileSystem(share=endpoint, skip_instance_cache=True).close()
    with pytest.raises(ValueError, match="exactly one"):
        VirtioFileSystem(share=endpoint, remote=endpoint, skip_instance_cache=True)
