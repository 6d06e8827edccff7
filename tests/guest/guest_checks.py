"""Tests that run *inside* the guest, under pytest there (test_guest_smoke runs them with
``--junitxml`` into the results share). The file name keeps pytest on the host from
collecting it; on the host it skips itself."""

from __future__ import annotations

import errno
import json
import os
import platform
import sys
from pathlib import Path

import pytest

if "PYVIRTIOFS_GUEST_MODE" not in os.environ:
    pytest.skip("runs inside the guest only", allow_module_level=True)

RESULTS = Path(os.environ["GUEST_RESULTS"])


def test_root_is_read_only_and_tmp_is_writable() -> None:
    with pytest.raises(OSError) as info:
        Path(__file__).with_name("guest-write-probe").write_text("x")
    assert info.value.errno == errno.EROFS
    scratch = Path(os.environ["TMPDIR"]) / "scratch"
    scratch.write_text("ok")
    assert scratch.read_text() == "ok"
    assert Path(os.environ["HOME"]).is_dir()


def test_hugepages_are_reserved_and_mounted() -> None:
    meminfo = Path("/proc/meminfo").read_text()
    total = int(next(line for line in meminfo.splitlines()
                     if line.startswith("HugePages_Total")).split()[1])
    assert total > 0
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    assert any(m[1] == "/dev/hugepages" and m[2] == "hugetlbfs" for m in mounts)


def test_result_file_reaches_the_host() -> None:
    (RESULTS / "guest-checks.json").write_text(json.dumps({
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "kernel": platform.release(),
        "mode": os.environ["PYVIRTIOFS_GUEST_MODE"],
        "cwd": os.getcwd(),
    }))
