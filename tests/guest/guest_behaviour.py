"""The shared behaviour suite (tests/api/test_behaviour.py), run *inside* the guest through
a virtio-fs device of the VM (``$PYVIRTIOFS_GUEST_DEVICE``, e.g. ``pci:pvfs``).

Each test gets a fresh folder of the device's share as its root, and checks what happened
on disk through ``$PYVIRTIOFS_GUEST_VIEW``: the same host folder mounted by the guest
kernel's own virtiofs driver from a second device (its own virtiofsd, ``cache=none``), a
view that is not the client under test. (9p would not do: Linux's 9p client reports the
host's inode numbers plus 2 and sets times to the second.) The file name keeps pytest on
the host from collecting it; on the host it skips itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if "PYVIRTIOFS_GUEST_DEVICE" not in os.environ:
    pytest.skip("runs inside the guest only", allow_module_level=True)

from pyvirtiofs.api import connect
from tests.api import test_behaviour
from tests.api.test_behaviour import *  # noqa: F403  (the suite's tests, collected here)

DEVICE = os.environ["PYVIRTIOFS_GUEST_DEVICE"]
VIEW = Path(os.environ["PYVIRTIOFS_GUEST_VIEW"])
PREFIX = os.environ.get("PYVIRTIOFS_GUEST_PREFIX", "behaviour")

#: How many tests this module runs (the host checks the report against it).
SUITE = sorted(name for name in dir(test_behaviour) if name.startswith("test_"))


@pytest.fixture
def env(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Path]]:
    name = f"{PREFIX}-{re.sub(r'[^A-Za-z0-9_]', '_', request.node.name)}"
    host = VIEW / name
    host.mkdir()
    fs = connect(device=DEVICE, root=name)
    try:
        yield fs, host
    finally:
        fs.close()
