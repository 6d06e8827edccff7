"""``python -m pyvirtiofs.tools.copybench``: the CLI's copies against the host's ``cp``.

    python -m pyvirtiofs.tools.copybench                 # 5 interleaved runs, ~3 minutes
    python -m pyvirtiofs.tools.copybench --quick         # small tree and file, 3 runs
    python -m pyvirtiofs.tools.copybench --py-spy prof/  # and a flame graph of each of ours

Workloads, each a whole command as a user runs it (Python's start-up, the private
virtiofsd's start and stop included):

* ``tree-put``: ``pyvirtiofs put -r SHARE TREE /dst``   vs ``cp -r TREE SHARE_DIR/dst``
* ``tree-get``: ``pyvirtiofs get -r SHARE /tree DST``   vs ``cp -r SHARE_DIR/tree DST``
* ``file-put``: ``pyvirtiofs put SHARE FILE /dst.bin``  vs ``cp FILE SHARE_DIR/dst.bin``
* ``file-get``: ``pyvirtiofs get SHARE /file.bin DST``  vs ``cp SHARE_DIR/file.bin DST``

TREE has ``--files`` files (default 2,000) in nested directories, ``--tree-mib`` in all
(default 512; sizes spread log-uniformly from 1 KiB to 8 MiB), FILE is ``--file-mib``
(default 500). Everything lives in one scratch folder on one file system, so both sides
read from and write to the same disk with the same page cache. Runs are interleaved (ours
then cp, then cp then ours, …) after one untimed warm-up of each; every destination is
removed and ``sync`` called before each timed command, so no run pays for another's
dirty pages. Reported: median and min–max of ``--runs`` runs (≥ 5 for the record), and
the ratio of the medians (ours / cp). Each copy is checked (sizes, and the bytes of the
big file) once.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

__all__ = ["main"]

WORKLOADS = ("tree-put", "tree-get", "file-put", "file-get")


@dataclass
class Result:
    workload: str
    ours: list[float] = field(default_factory=list)
    cp: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ours) / statistics.median(self.cp)


def _sizes(files: int, total: int, rng: random.Random) -> list[int]:
    """``files`` sizes, log-uniform between 1 KiB and 8 MiB, scaled to sum to ``total``."""
    raw = [math.exp(rng.uniform(math.log(1 << 10), math.log(8 << 20))) for _ in range(files)]
    scale = total / sum(raw)
    sizes = [max(1, int(r * scale)) for r in raw]
    sizes[0] += total - sum(sizes)
    return sizes


def make_tree(root: str, files: int, total: int, seed: int = 1) -> None:
    """``files`` files of random bytes under ``root``: 20 top directories, each with 5
    sub-directories, the files spread over all of them."""
    rng = random.Random(seed)
    dirs = [os.path.join(root, f"d{i:02d}", f"s{j}") for i in range(20) for j in range(5)]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    block = rng.randbytes(16 << 20)
    for i, size in enumerate(_sizes(files, total, rng)):
        start = rng.randrange(0, len(block) - min(size, len(block)) + 1)
        data = block[start:start + size] if size <= len(block) else (
            block * (size // len(block) + 1))[:size]
        with open(os.path.join(dirs[i % len(dirs)], f"f{i:05d}.bin"), "wb") as f:
            f.write(data)


def make_file(path: str, size: int, seed: int = 2) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(rng.randbytes(n))
            left -= n


def _tree_size(root: str) -> tuple[int, int]:
    files = total = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            files += 1
            total += os.lstat(os.path.join(dirpath, n)).st_size
    return files, total


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _timed(argv: list[str], profile: str | None = None) -> float:
    if profile:
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        argv = [spy, "record", "--subprocesses", "-r", "200", "-o", profile, "--", *argv]
    t0 = time.perf_counter()
    res = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"copybench: {' '.join(argv)} failed ({res.returncode}): "
                         f"{res.stderr.decode(errors='replace').strip()}")
    return elapsed


class Bench:
    def __init__(self, work: str, args: argparse.Namespace) -> None:
        self.work = work
        self.args = args
        self.share = os.path.join(work, "share")
        self.tree = os.path.join(work, "tree")
        self.file = os.path.join(work, "file.bin")
        self.ours = [sys.executable, "-m", "pyvirtiofs"]
        self.jobs = ["-j", str(args.jobs)] if args.jobs else []

    def prepare(self) -> None:
        os.makedirs(self.share, exist_ok=True)
        t0 = time.perf_counter()
        if not os.path.isdir(self.tree):
            make_tree(self.tree, self.args.files, self.args.tree_mib << 20)
        if not os.path.isfile(self.file):
            make_file(self.file, self.args.file_mib << 20)
        # The share's copies, for the gets (made natively, untimed).
        if not os.path.isdir(os.path.join(self.share, "tree")):
            shutil.copytree(self.tree, os.path.join(self.share, "tree"))
        if not os.path.isfile(os.path.join(self.share, "file.bin")):
            shutil.copyfile(self.file, os.path.join(self.share, "file.bin"))
        os.sync()
        files, total = _tree_size(self.tree)
        print(f"copybench: tree of {files} files, {total / (1 << 20):.0f} MiB; file of "
              f"{os.path.getsize(self.file) / (1 << 20):.0f} MiB "
              f"(made in {time.perf_counter() - t0:.1f} s) in {self.work}", flush=True)

    def commands(self, workload: str) -> tuple[list[str], list[str], str, str]:
        """(ours, cp, our destination, cp's destination) on the host's side."""
        s, w = self.share, self.work
        o = self.ours
        if workload == "tree-put":
            return ([*o, "put", "-r", *self.jobs, s, self.tree, "/out-ours"],
                    ["cp", "-r", self.tree, f"{s}/out-cp"], f"{s}/out-ours", f"{s}/out-cp")
        if workload == "tree-get":
            return ([*o, "get", "-r", *self.jobs, s, "/tree", f"{w}/out-ours"],
                    ["cp", "-r", f"{s}/tree", f"{w}/out-cp"], f"{w}/out-ours", f"{w}/out-cp")
        if workload == "file-put":
            return ([*o, "put", *self.jobs, s, self.file, "/out-ours.bin"],
                    ["cp", self.file, f"{s}/out-cp.bin"], f"{s}/out-ours.bin",
                    f"{s}/out-cp.bin")
        assert workload == "file-get"
        return ([*o, "get", *self.jobs, s, "/file.bin", f"{w}/out-ours.bin"],
                ["cp", f"{s}/file.bin", f"{w}/out-cp.bin"], f"{w}/out-ours.bin",
                f"{w}/out-cp.bin")

    def check(self, workload: str, ours: str, theirs: str) -> None:
        if workload.startswith("tree"):
            if _tree_size(ours) != _tree_size(theirs):
                raise SystemExit(f"copybench: {workload}: {ours} differs from {theirs}")
        elif not filecmp.cmp(ours, theirs, shallow=False):
            raise SystemExit(f"copybench: {workload}: {ours} differs from {theirs}")

    def run(self) -> list[Result]:
        results = {w: Result(w) for w in self.args.workloads}
        fixed = []
        for run in range(-1, self.args.runs):  # run -1: the untimed warm-up
            for workload in self.args.workloads:
                ours, cp, ours_dst, cp_dst = self.commands(workload)
                order = [("ours", ours, ours_dst), ("cp", cp, cp_dst)]
                if run % 2:
                    order.reverse()
                for who, argv, dst in order:
                    _remove(dst)
                    os.sync()
                    profile = None
                    if who == "ours" and run == -1 and self.args.py_spy:
                        os.makedirs(self.args.py_spy, exist_ok=True)
                        profile = os.path.join(self.args.py_spy, f"{workload}.svg")
                    elapsed = _timed(argv, profile)
                    if run >= 0:
                        getattr(results[workload], who).append(elapsed)
                if run == -1:
                    self.check(workload, ours_dst, cp_dst)
                print(f"copybench: run {run + 1 if run >= 0 else 'warm-up'} {workload}: "
                      f"ours {results[workload].ours[-1:] or '-'} cp "
                      f"{results[workload].cp[-1:] or '-'}", flush=True)
                _remove(ours_dst)
                _remove(cp_dst)
            if run >= 0:
                fixed.append(_timed([*self.ours, "ls", self.share, "/"]))
        self.fixed = fixed
        return list(results.values())


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):6.2f} s ({min(values):.2f}–{max(values):.2f})"


def report(results: list[Result], fixed: list[float], args: argparse.Namespace) -> str:
    lines = [f"{'workload':10} {'pyvirtiofs (median, min–max)':>30} "
             f"{'host cp (median, min–max)':>28} {'ratio':>7} {'less fixed':>11}"]
    base = statistics.median(fixed) if fixed else 0.0
    for r in results:
        ratio = f"{r.ratio:6.2f}×" if r.ours and r.cp else "-"
        # The ratio with the fixed cost of a command (start-up) taken off ours: what the
        # copying itself costs against cp.
        less = (f"{(statistics.median(r.ours) - base) / statistics.median(r.cp):6.2f}×"
                if r.ours and r.cp and base else "-")
        lines.append(f"{r.workload:10} {_fmt(r.ours):>30} {_fmt(r.cp):>28} {ratio:>7} "
                     f"{less:>11}")
    if fixed:
        lines.append(f"fixed cost of one pyvirtiofs command (ls of the share's root: Python "
                     f"start-up, imports, daemon start and stop): {_fmt(fixed)}")
    lines.append(f"runs: {args.runs}, interleaved; tree {args.files} files / "
                 f"{args.tree_mib} MiB; file {args.file_mib} MiB; jobs "
                 f"{args.jobs or 'default'}; {os.cpu_count()} CPUs")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pyvirtiofs.tools.copybench",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=5, help="timed runs of each (default 5)")
    p.add_argument("--files", type=int, default=2000, help="files in the tree")
    p.add_argument("--tree-mib", type=int, default=512, help="size of the tree, MiB")
    p.add_argument("--file-mib", type=int, default=500, help="size of the big file, MiB")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--jobs", type=int, default=0, help="pyvirtiofs -j (default: its own)")
    p.add_argument("--dir", help="scratch folder (kept; default: a new temporary one, "
                                 "removed at the end)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--py-spy", metavar="DIR",
                   help="profile our command in the (untimed) warm-up of each workload with "
                        "py-spy: a flame graph DIR/WORKLOAD.svg")
    p.add_argument("--quick", action="store_true",
                   help="200 files / 64 MiB, a 64 MiB file, 3 runs: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.files, args.tree_mib, args.file_mib = 200, 64, 64
        args.runs = min(args.runs, 3)
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.dir or tempfile.mkdtemp(prefix="copybench-")
    os.makedirs(work, exist_ok=True)
    try:
        bench = Bench(work, args)
        bench.prepare()
        results = bench.run()
        text = report(results, bench.fixed, args)
        print(text, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"results": [asdict(r) | {"ratio": r.ratio} for r in results],
                           "fixed": bench.fixed, "args": {
                               k: v for k, v in vars(args).items() if k != "json"}},
                          f, indent=2)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
