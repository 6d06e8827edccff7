"""The copy benchmark runs every workload against the host's cp and reports medians and
ratios. Times are never asserted (this machine may be busy); the copies are checked by the
tool itself (it exits on a copy that differs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pyvirtiofs.tools import copybench


@pytest.mark.timeout(600)
def test_copybench_runs_each_workload_against_cp(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "copybench.json"
    work = tmp_path / "work"
    rc = copybench.main(["--runs", "1", "--files", "30", "--tree-mib", "3", "--file-mib",
                         "40", "--dir", str(work), "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [r["workload"] for r in report["results"]] == list(copybench.WORKLOADS)
    for r in report["results"]:
        assert len(r["ours"]) == len(r["cp"]) == 1
        assert r["ratio"] == pytest.approx(r["ours"][0] / r["cp"][0])
        assert f"{r['ratio']:6.2f}×" in text
    assert "fixed cost of one pyvirtiofs command" in text
    # the scratch tree is what was asked for, and the copies were cleaned up
    files = [Path(d, f) for d, _s, fs in os.walk(work / "tree") for f in fs]
    assert len(files) == 30 and sum(f.stat().st_size for f in files) == 3 << 20
    assert sorted(os.listdir(work / "share")) == ["file.bin", "tree"]
    assert (work / "file.bin").stat().st_size == 40 << 20


def test_tree_sizes_add_up() -> None:
    import random

    sizes = copybench._sizes(2000, 512 << 20, random.Random(1))
    assert len(sizes) == 2000 and sum(sizes) == 512 << 20
    assert min(sizes) >= 1 and max(sizes) < 64 << 20
