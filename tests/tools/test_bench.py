"""The benchmark runs (``--quick``, fewer files) and reports what it promises.

Times are never asserted: this machine may be busy. Structure, request economy counts
and the n/a path of a missing remote configuration are.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from pyvirtiofs.tools import bench


def _results(report: dict, workload: str) -> dict[str, dict]:
    return {r["config"]: r for r in report["results"] if r["workload"] == workload}


@pytest.mark.timeout(900)
def test_quick_bench_runs_every_workload_on_every_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = bench.main(["--quick", "--files", "60", "--json", str(out_json), "--chart",
                     str(out_png), "--workdir", str(tmp_path), "--quiet"])
    stdout = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    errors = [r for r in report["results"] if r["status"] == "error"]
    assert not errors, errors
    assert rc == 0
    assert report["meta"]["params"]["quick"] is True
    assert report["meta"]["params"]["files"] == 60

    for w in bench.WORKLOAD_NAMES:
        rows = _results(report, w)
        assert set(rows) == set(bench.CONFIG_ORDER), w
        for config, r in rows.items():
            if r["status"] == "n/a":
                assert config == "remote" and r["reason"]
                continue
            assert r["reps"] == len(r["times_s"]) >= 5
            assert r["min_s"] <= r["median_s"] <= r["max_s"]
            assert r["ops"] > 0 and r["per_op_us"] > 0
            assert r["rss_peak_mib"] is None or r["rss_peak_mib"] > 0
            assert r["ratio_native"] is not None and r["ratio_hermit"] is not None
            if config == "native":
                assert r["ratio_native"] == pytest.approx(1.0)
                assert r["requests_per_op"] is None  # no device
            if config in ("inproc", "hermit"):
                assert r["requests_per_op"] is not None, (w, config)
            if w.startswith("seq_") or w == "streams":
                assert r["mib_s"] > 0

    # The request economy is counted by the client, per opcode and per operation. An entry
    # may expire (1 s) on a very busy machine and cost one more LOOKUP: hence approx.
    inproc = {w: _results(report, w)["inproc"]["requests_per_op"] for w in bench.WORKLOAD_NAMES}
    assert inproc["stat_cold"].get("LOOKUP") == pytest.approx(1.0, abs=0.05), inproc["stat_cold"]
    assert sum(inproc["stat_warm"].values()) <= 0.05, inproc["stat_warm"]  # from the cache
    assert inproc["getattr"] == {"GETATTR": 1.0}, inproc["getattr"]
    assert inproc["seq_read"] == {"READ": 1.0}, inproc["seq_read"]  # 1 MiB READ per call
    hermit = _results(report, "seq_read")["hermit"]["requests_per_op"]
    assert hermit["READ"] == pytest.approx(16.0, rel=0.05), hermit  # 64 KiB requests
    listing = inproc["ls_l"]
    assert listing.get("READDIRPLUS", 0) > 0, listing
    others = {k: v for k, v in listing.items() if k not in ("OPENDIR", "READDIRPLUS",
                                                            "RELEASEDIR")}
    assert sum(others.values()) <= 0.05, listing  # attributes come with the listing

    targets = {t["target"]: t for t in report["targets"]}
    assert any(k.startswith("cold stat") for k in targets)
    assert all(t["met"] in (True, False, None) for t in targets.values())
    assert "getattr_us" in report["floor"]

    assert "| workload | config |" in stdout and "Targets:" in stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_configuration_that_cannot_start_is_na_with_its_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-virtiofsd"
    out = tmp_path / "r.json"
    rc = bench.main(["--quick", "--files", "10", "--only", "getattr,stat_warm", "--configs",
                     "native,inproc", "--virtiofsd", str(missing), "--json", str(out),
                     "--workdir", str(tmp_path), "--quiet"])
    assert rc == 0
    report = json.loads(out.read_text())
    inproc = _results(report, "getattr")["inproc"]
    assert inproc["status"] == "n/a" and str(missing) in inproc["reason"]
    assert report["meta"]["configs"]["inproc"]["available"] is False
    assert _results(report, "getattr")["native"]["status"] == "ok"
    assert "n/a" in capsys.readouterr().out


def test_cli_wiring_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    from pyvirtiofs.api.cli import main

    with pytest.raises(SystemExit):  # `pyvirtiofs bench` hands its arguments to the bench
        main(["bench", "--help"])
    assert "--quick" in capsys.readouterr().out
    parser = argparse.ArgumentParser(prog="pyvirtiofs bench")
    bench.configure_parser(parser)
    args = parser.parse_args(["--quick", "--size", "48M", "--reps", "7",
                              "--configs", "native,hermit", "--only", "seq_read"])
    p = bench.params_from_args(args)
    assert p.quick and p.reps == 7 and p.big_size == 48 << 20 and p.call_size == 1 << 20
    assert args.configs == ["native", "hermit"] and args.only == ["seq_read"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--only", "no_such_workload"])
    assert bench._parse_size("1G") == 1 << 30
    assert bench._parse_size("64KiB") == 64 << 10
