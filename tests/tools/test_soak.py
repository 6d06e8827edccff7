"""Soak tests (marker ``soak``): a 60-second mixed workload from 16 clients, in-process and
remote, every result checked against a model; and a shorter one during which both daemons
are killed and restarted.

What is asserted is correctness: no unexpected error or model mismatch, nothing lost,
ENOTCONN/ESTALE only in a restart window, fds back to their baseline. Latencies and RSS
are printed (``pytest -s``), not asserted: this runs on a small machine shared with other
tests. The long run (10 minutes, 64 clients, RSS checked) is in RELIABILITY.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofs.tools.soak import SoakConfig, format_summary, run_soak
from tests import REPO

ROOT = REPO

pytestmark = [pytest.mark.soak, pytest.mark.daemon]


def _assert_correct(result: dict[str, Any]) -> None:
    print("\n" + format_summary(result))
    assert result["operations"] > 0
    assert result["errors_unexpected"] == {}, result["failures"][:10]
    assert result["restart_hits"]["unexpected"] == 0
    for name, check in result["checks"].items():
        if name.startswith("fds") or name == "unexpected errors":
            assert check["ok"], (name, check)
    assert result["clients_cleaned"] == result["clients"]


@pytest.mark.timeout(600)
def test_soak_60_seconds(tmp_path: Path) -> None:
    """16 clients for 60 s: 8 in-process, 8 remote through the multi-tenant agent (two
    tenants, each with its own daemon)."""
    result = run_soak(SoakConfig(duration=60.0, clients=16, server="agent", agent_tenants=2,
                                 directory=str(tmp_path), progress=0.0), out=None)
    _assert_correct(result)
    # every kind of operation ran and was checked
    for op in ("mkdir", "rename", "unlink", "rmdir", "stat", "listdir", "open", "close",
               "write_1MiB", "read_1MiB", "small_write", "small_read", "shared_read"):
        assert result["latency"].get(op, {}).get("count", 0) > 0, op
    assert result["errors_expected"].get("ENOENT", 0) > 0  # the model's predicted errors


@pytest.mark.timeout(600)
def test_soak_survives_daemon_restart(tmp_path: Path) -> None:
    """Both daemons (the in-process share's and the server's) are SIGKILLed once mid-run:
    callers see ENOTCONN/ESTALE only until their share restarted, and nothing else is
    lost (the model resyncs what failed operations may or may not have done)."""
    result = run_soak(SoakConfig(duration=30.0, clients=8, restart_daemon=1,
                                 directory=str(tmp_path), progress=0.0), out=None)
    _assert_correct(result)
    assert len(result["kills"]) == 1
    assert set(result["kills"][0]["killed"]) == {"local", "remote"}
    assert result["restarts"]["local"] >= 1 and result["restarts"]["remote"] >= 1


@pytest.mark.timeout(300)
def test_soak_command_line(tmp_path: Path) -> None:
    """``pyvirtiofs soak`` runs, prints the summary, writes JSON, exits 0 when clean."""
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pyvirtiofs", "soak", "--seconds", "5", "--clients", "2", "--quiet",
         "--warmup", "1", "--rss-limit", "1000", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert "== soak summary: PASS ==" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 0
    result = json.loads(out.read_text())
    assert result["clients"] == 2 and result["passed"]
    assert {"p50", "p99", "p999"} <= set(result["latency"]["stat"])
