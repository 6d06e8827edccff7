"""``pyvirtiofs soak --hostile``, briefly: every phase runs for two seconds against a real
agent, and the summary must show each of them, the well-behaved tenant served without an
error throughout, and the agent's descriptors and RSS within what its configuration bounds
them to. The long run (minutes) and its figures are in RELIABILITY.md.

Latency ratios are printed, not asserted here: two seconds a phase on a shared machine
say little about a p99 (tests/api/agent/test_agent.py measures fairness by turns).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofs.api.agent.config import AgentConfig, LimitsConfig, TenantConfig
from pyvirtiofs.tools.hostile import (
    PHASES,
    HostileConfig,
    HostileRun,
    check_bounds,
    format_summary,
)
from tests import REPO

pytestmark = [pytest.mark.soak, pytest.mark.daemon]

# What a run must satisfy whatever the machine's load (the fairness ratio is not here).
BOUNDS = ("good tenant errors", "good tenant served", "agent fds", "agent RSS", "log growth",
          "recovered after each phase", "attacks ran", "clean stop", "reloads applied",
          "connection cap held")


@pytest.mark.timeout(420)
def test_a_short_hostile_run_keeps_every_bound(tmp_path: Path) -> None:
    out = tmp_path / "hostile.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pyvirtiofs", "soak", "--hostile", "--phase-seconds", "2",
         "--quiet", "--json", str(out), "--dir", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=400, check=False)
    print("\n" + proc.stdout + proc.stderr[-3000:])
    assert "== hostile soak:" in proc.stdout, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    assert [p["phase"] for p in result["phases"]] == list(PHASES)
    for phase in result["phases"]:
        assert phase["good"]["ops"] > 0, phase["phase"]
        assert phase["good"]["errors"] == 0, (phase["phase"], phase["good"]["error_samples"])
        assert phase["agent"]["fds_peak"] is not None and phase["agent"]["rss_peak_mib"]
    checks = result["checks"]
    for name in BOUNDS:
        assert checks[name]["ok"], (name, checks[name])
    assert checks["agent fds"]["peak"] <= checks["agent fds"]["bound"]
    assert checks["agent RSS"]["peak_mib"] <= checks["agent RSS"]["bound_mib"]
    # Each attack did what it is there for.
    attacks = {p["phase"]: p["attack"] for p in result["phases"]}
    assert attacks["unread-replies"]["refused"] > 0  # beyond the tenant's budget
    assert attacks["message-flood"]["dropped"] > 0  # beyond ten times the rate
    assert attacks["half-open-flood"]["peers"] > 0
    assert attacks["streaming"]["streamed_mib"] > 0
    assert attacks["signals"]["storms"] > 0
    assert proc.returncode == (0 if result["passed"] else 1)


def test_the_checks_fail_on_errors_and_bounds_exceeded(tmp_path: Path) -> None:
    """The summary's checks are not vacuous: a good tenant's error, descriptors over the
    gate's bound, RSS over the configured total and an unclean stop are each reported."""
    run = HostileRun(HostileConfig(phase_seconds=1, phases=("idle", "half-open-flood")),
                     tmp_path, None)
    run.baseline_fds = 80

    def phase(name: str, errors: int, fds: int, rss: float) -> dict[str, Any]:
        return {"phase": name, "seconds": 1.0, "recovery_seconds": 0.0, "failure": None,
                "recovered": True, "attack": {}, "recovery": {"seconds": 0.0},
                "good": {"ops": 10, "errors": errors, "p50": 1.0, "p99": 2.0,
                         "by_op": {op: {"p99": 2.0} for op in ("stat", "read", "write")}},
                "agent": {"fds_peak": fds, "rss_peak_mib": rss, "log_growth_bytes": 0}}

    run.phases = [phase("idle", 0, 80, 40.0), phase("half-open-flood", 0, 90, 50.0)]
    assert all(c["ok"] for c in check_bounds(run, 0).values())
    run.phases = [phase("idle", 0, 80, 40.0), phase("half-open-flood", 3, 80 + 5000, 2000.0)]
    checks = check_bounds(run, 1)
    assert not checks["good tenant errors"]["ok"]
    assert not checks["agent fds"]["ok"]
    assert not checks["agent RSS"]["ok"]
    assert not checks["clean stop"]["ok"]
    summary = format_summary({"phases": run.phases, "checks": checks, "passed": False,
                              "baseline_fds": 80, "settings": {}})
    assert "FAIL" in summary and "half-open-flood" in summary


@pytest.mark.parametrize(("most", "ok"), [(0, False), (1, True), (64, True), (65, False)])
def test_the_connection_flood_is_checked_against_the_flooders_cap(tmp_path: Path, most: int,
                                                                    ok: bool) -> None:
    """The flooder must get some connections (handshakes are not starved) and no more
    than its cap."""
    run = HostileRun(HostileConfig(phase_seconds=1, phases=("connection-flood",)), tmp_path,
                     None)
    flooder = TenantConfig(id="flooder", public_key=b"", share="/", socket=None, root="/",
                           read_only=False, uid=0, gid=0, limits=LimitsConfig(connections=64))
    run.agent_config = AgentConfig(path="", bind=(), public_key=b"", secret_key=b"",
                                   runtime_dir="", tenants={"flooder": flooder})
    run.phases = [{"phase": "connection-flood", "seconds": 1.0, "recovery_seconds": 0.0,
                   "failure": None, "recovered": True, "attack": {"flooder_most": most},
                   "good": {"ops": 10, "errors": 0},
                   "agent": {"fds_peak": 90, "rss_peak_mib": 40.0, "log_growth_bytes": 0}}]
    check = check_bounds(run, 0)["connection cap held"]
    assert check["ok"] is ok and check["cap"] == 64
