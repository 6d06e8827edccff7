"""Shared fixtures. Tests that need the device start a real virtiofsd on a temp folder.

A missing virtiofsd is an error, never a skip: the integration tests are the point.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofs.hw.vhost_user.launcher import find_virtiofsd
from pyvirtiofs.hw.vhost_user.transport import VhostUserTransport, open_private_device


def pytest_configure(config: pytest.Config) -> None:
    # Fail the whole run early and clearly instead of skipping device tests.
    find_virtiofsd()


@pytest.fixture
def share(tmp_path: Path) -> Path:
    """An empty directory to export."""
    d = tmp_path / "share"
    d.mkdir()
    return d


@pytest.fixture
def transport(share: Path) -> Iterator[VhostUserTransport]:
    """A private virtiofsd on ``share``, connected; stopped afterwards."""
    t = open_private_device(share)
    try:
        yield t
    finally:
        t.close()


def open_fd_count(pid: int) -> int:
    """How many file descriptors process ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))
