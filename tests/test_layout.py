"""The package's shape: one installed import package, and layers that point one way.

* every import of the project's code names ``pyvirtiofs`` (a bare ``import api`` works in
  the repository, where the folder is on ``sys.path``, and breaks everywhere else);
* the layers depend downward only: api → actors → codec, hw; codec and hw import no other
  layer; nothing in the product imports the tools;
* the wheel installs exactly one top-level package, and its console script, its fsspec
  protocol, ``connect`` and ``connect_remote`` work from the installed files alone.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests import REPO

# folder in the repository -> its dotted package
LAYERS = {"pyvirtiofs": "pyvirtiofs", "api": "pyvirtiofs.api", "actors": "pyvirtiofs.actors",
          "codec": "pyvirtiofs.codec", "hw": "pyvirtiofs.hw"}
# which packages each layer may import (itself included)
ALLOWED = {
    "pyvirtiofs.codec": {"pyvirtiofs.codec"},
    "pyvirtiofs.hw": {"pyvirtiofs.hw"},
    "pyvirtiofs.actors": {"pyvirtiofs.actors", "pyvirtiofs.codec", "pyvirtiofs.hw"},
    "pyvirtiofs.api": {"pyvirtiofs.api", "pyvirtiofs.actors", "pyvirtiofs.codec",
                       "pyvirtiofs.hw"},
    "pyvirtiofs.tools": {"pyvirtiofs"},
    "pyvirtiofs": {"pyvirtiofs.api", "pyvirtiofs.actors"},  # the facade
}
OLD_NAMES = {"api", "actors", "codec", "hw"}


def _modules() -> list[tuple[str, Path]]:
    """(dotted module name, file) for every module of the package."""
    out = []
    for folder, package in LAYERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((".".join([package, *parts]), path))
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement in ``path`` names, with its line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            # `from pyvirtiofs.api import agent` imports pyvirtiofs.api.agent too
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return out


def _layer(module: str) -> str:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    raise AssertionError(f"{module} is in no layer")


def _package_of(imported: str, existing: set[str]) -> str | None:
    """The project package an imported name belongs to (None: not ours)."""
    if imported != "pyvirtiofs" and not imported.startswith("pyvirtiofs."):
        return None
    while imported not in existing and "." in imported:
        imported = imported.rpartition(".")[0]  # `from m import name`: a name, not a module
    return _layer(imported)


def test_every_import_of_our_code_names_the_package() -> None:
    bad = [f"{path.relative_to(REPO)}:{line}: import {name}"
           for _, path in _modules() + [("tests", p) for p in (REPO / "tests").rglob("*.py")]
           for line, name in _imports(path) if name.split(".")[0] in OLD_NAMES]
    assert not bad, "\n".join(bad)


def test_layers_point_one_way() -> None:
    modules = _modules()
    existing = {name for name, _ in modules}
    bad = []
    for module, path in modules:
        layer = _layer(module)
        for line, name in _imports(path):
            target = _package_of(name, existing)
            if target is None or target == layer:
                continue
            if not any(target == a or target.startswith(a + ".") for a in ALLOWED[layer]):
                bad.append(f"{path.relative_to(REPO)}:{line}: {layer} imports {name}")
            if target == "pyvirtiofs.tools" and layer != "pyvirtiofs.tools":
                bad.append(f"{path.relative_to(REPO)}:{line}: the product imports a tool")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The layer rule is not vacuous: a codec module importing the actors is caught."""
    sample = tmp_path / "bad.py"
    sample.write_text("from pyvirtiofs.actors import messages\nimport api.fs\n")
    names = [name for _, name in _imports(sample)]
    assert "pyvirtiofs.actors.messages" in names and "api.fs" in names
    target = _package_of("pyvirtiofs.actors.messages", {"pyvirtiofs.actors.messages"})
    assert target == "pyvirtiofs.actors" and target not in ALLOWED["pyvirtiofs.codec"]


def test_commands_do_not_load_the_tools() -> None:
    code = ("import sys; from pyvirtiofs.api.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith('pyvirtiofs.tools')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools leaves build/ and *.egg-info behind in its source.
    source = tmp_path_factory.mktemp("source") / "pyvirtiofs"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "build", "*.egg-info", "__pycache__", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                    str(source)], check=True, timeout=600, capture_output=True)
    (found,) = out.glob("pyvirtiofs-*.whl")
    return found


def test_wheel_has_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
        entry_points = next(z.read(n).decode() for n in names
                            if n.endswith(".dist-info/entry_points.txt"))
        top_level = [z.read(n).decode().split() for n in names
                     if n.endswith(".dist-info/top_level.txt")]
    assert tops == {"pyvirtiofs"}
    assert top_level in ([], [["pyvirtiofs"]])
    for module, path in _modules():  # every module of the source tree, in its place
        rel = module.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py"
                                          else ".py")
        assert rel in names, f"{path.relative_to(REPO)} is not in the wheel"
    assert "pyvirtiofs = pyvirtiofs.api.cli:main" in entry_points
    assert "virtiofs = pyvirtiofs.api.integrations.fsspec_fs:VirtioFileSystem" in entry_points


INSTALLED_CHECK = r"""
import os, sys, fsspec, pyvirtiofs
from pyvirtiofs.api.remote.server import ShareServer, Tenant
assert pyvirtiofs.__file__.startswith(os.environ["TARGET"]), pyvirtiofs.__file__
share = sys.argv[1]
with pyvirtiofs.connect(share) as fs:
    fs.write_bytes("from-wheel.txt", b"installed")
    with ShareServer("tcp://127.0.0.1:0", tenant=Tenant("t", fs)) as server, \
            pyvirtiofs.connect_remote(server.endpoints[0], timeout=30) as remote:
        assert remote.read_bytes("from-wheel.txt") == b"installed"
vfs = fsspec.filesystem("virtiofs", share=share)
assert type(vfs).__module__.startswith("pyvirtiofs."), type(vfs)
assert vfs.cat_file("/from-wheel.txt") == b"installed"
print("ok")
"""


@pytest.mark.daemon
def test_installed_wheel_works_on_its_own(wheel: Path, tmp_path: Path) -> None:
    """Installed in a folder of its own and run away from the repository, the wheel's own
    files serve connect, connect_remote, the fsspec protocol and the console script."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, timeout=300, capture_output=True)
    share = tmp_path / "share"
    share.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "TARGET": str(target)}
    elsewhere = tmp_path  # not the repository: its folders must not be importable
    r = subprocess.run([sys.executable, "-c", INSTALLED_CHECK, str(share)], cwd=elsewhere,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert (share / "from-wheel.txt").read_bytes() == b"installed"
    script = target / "bin" / "pyvirtiofs"
    r = subprocess.run([str(script), "cat", str(share), "/from-wheel.txt"], cwd=elsewhere,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "installed", r.stderr
