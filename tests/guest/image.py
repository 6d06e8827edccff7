"""Build and cache the guest's kernel and initramfs from Debian packages.

The kernel is the package Debian's ``linux-image-amd64`` meta-package points at; it is
fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` (never installed). The
initramfs is written here, in Python: ``busybox-static`` (also fetched, not installed) with
a link per applet, the modules the guest needs (decompressed, each with the list of its
dependencies in load order, read from the module's own ``.modinfo`` section) and ``init.sh``
as ``/init``.

Images live in ``<repo>/.cache/guest/<key>/`` (``$PYVIRTIOFS_GUEST_CACHE`` overrides the
folder). The key hashes every input: both packages' names and versions, the module list,
the init script and this file. A build happens in a temporary folder next to the cache
entry and is renamed into place when complete, under a lock file, so concurrent runs build
once and an interrupted build never leaves a half-written entry.

``python -m tests.guest.image`` builds (if needed) and prints the paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_MODULES",
    "GuestImage",
    "ImageBuildError",
    "cache_root",
    "ensure_image",
    "module_info",
    "resolve_packages",
]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
INIT_SCRIPT = HERE / "init.sh"
CACHE_ENV = "PYVIRTIOFS_GUEST_CACHE"
KERNEL_ENV = "PYVIRTIOFS_GUEST_KERNEL"
KERNEL_META = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"

#: Modules the guest loads (their dependencies are added automatically). The order does
#: not matter: ``/init`` loads each by name, dependencies first.
DEFAULT_MODULES: tuple[str, ...] = (
    "virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "virtio_mmio",
    "netfs", "9pnet", "9pnet_virtio", "9p",
    "uio", "uio_pci_generic",
    "virtio_net",
    "virtiofs",  # loaded only for share views (GuestVM(share_views=True))
)

#: Entries whose files are older than this and are not among the newest few are pruned.
_PRUNE_AGE = 7 * 24 * 3600
_KEEP_NEWEST = 2


class ImageBuildError(RuntimeError):
    """The guest image could not be built (a package could not be resolved or fetched, a
    module is missing, ...)."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: what QEMU needs (``kernel``, ``initrd``) and what it is."""

    directory: Path
    kernel: Path  #: the bzImage, for ``qemu -kernel``
    initrd: Path  #: an uncompressed newc cpio archive, for ``qemu -initrd``
    config: Path  #: the kernel's ``.config``
    kernel_package: str  #: e.g. ``linux-image-6.1.0-57-amd64``
    kernel_version: str  #: the Debian version of that package
    kernel_release: str  #: ``uname -r`` in the guest
    modules: tuple[str, ...]  #: every module in the initramfs, in a valid load order
    build_seconds: float  #: how long the build that made this entry took

    def config_value(self, option: str) -> str | None:
        """The value of ``CONFIG_<option>`` in the kernel's config (``y``, ``m``, a string),
        or None when it is not set."""
        name = option if option.startswith("CONFIG_") else f"CONFIG_{option}"
        for line in self.config.read_text().splitlines():
            if line.startswith(name + "="):
                return line.split("=", 1)[1].strip('"')
        return None

    def kernel_has_module(self, name: str) -> bool:
        """Whether the kernel package ships module ``name`` (in the initramfs or not)."""
        order = (self.directory / "modules.order").read_text().split()
        return any(_module_name(Path(p)) == _norm(name) for p in order)


def cache_root() -> Path:
    """Where images are cached: ``$PYVIRTIOFS_GUEST_CACHE`` or ``<repo>/.cache/guest``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else REPO / ".cache" / "guest"


# -- packages ------------------------------------------------------------------------------


def _run(argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 300) -> str:
    try:
        out = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True,
                             timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError(f"{' '.join(argv)}: {exc}") from exc
    if out.returncode != 0:
        raise ImageBuildError(f"{' '.join(argv)} exited with {out.returncode}: "
                              f"{(out.stderr or out.stdout).strip()[-2000:]}")
    return out.stdout


def _candidate(package: str) -> dict[str, str]:
    """The fields of ``package``'s candidate version in the local apt lists."""
    try:
        text = _run(["apt-cache", "show", "--no-all-versions", package], timeout=60)
    except ImageBuildError as exc:
        raise ImageBuildError(
            f"apt does not know {package!r} (run `apt-get update`, or scripts/setup.sh): {exc}"
        ) from exc
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # first stanza only
            continue
        if line[0].isspace() or ":" not in line:
            continue
        key, value = line.split(":", 1)
        fields[key] = value.strip()
    if "Version" not in fields:
        raise ImageBuildError(f"apt has no candidate version of {package!r}")
    return fields


def resolve_packages(kernel_package: str | None = None) -> dict[str, str]:
    """Which packages (and versions) an image is built from, without downloading anything:
    ``{"kernel": name, "kernel_version": v, "busybox": name, "busybox_version": v}``.

    ``kernel_package`` (or ``$PYVIRTIOFS_GUEST_KERNEL``) pins a ``linux-image-*`` package;
    by default it is the one ``linux-image-amd64`` depends on."""
    kernel = kernel_package or os.environ.get(KERNEL_ENV)
    if not kernel:
        depends = _candidate(KERNEL_META).get("Depends", "")
        m = re.search(r"\blinux-image-[0-9][\w.+~-]*-amd64\b", depends)
        if not m:
            raise ImageBuildError(f"cannot find the kernel package in {KERNEL_META}'s "
                                  f"dependencies: {depends!r}")
        kernel = m.group(0)
    return {
        "kernel": kernel,
        "kernel_version": _candidate(kernel)["Version"],
        "busybox": BUSYBOX_PACKAGE,
        "busybox_version": _candidate(BUSYBOX_PACKAGE)["Version"],
    }


def _apt_fingerprint() -> str:
    """Changes whenever apt's view of the archive can have changed (lists, sources,
    preferences), so that a resolution can be reused until then."""
    h = hashlib.sha256()
    for d in ("/var/lib/apt/lists", "/etc/apt/sources.list.d", "/etc/apt/preferences.d"):
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.name in ("lock", "partial") or not e.is_file():
                continue
            st = e.stat()
            h.update(f"{e.path} {st.st_mtime_ns} {st.st_size}\n".encode())
    with contextlib.suppress(OSError):
        st = os.stat("/etc/apt/sources.list")
        h.update(f"sources.list {st.st_mtime_ns} {st.st_size}\n".encode())
    return h.hexdigest()


def _resolve_cached(root: Path, kernel_package: str | None) -> dict[str, str]:
    """:func:`resolve_packages`, remembered in ``root/resolved.json`` while apt's lists do not
    change (each apt-cache call costs most of a second)."""
    pin = kernel_package or os.environ.get(KERNEL_ENV) or ""
    fingerprint = _apt_fingerprint()
    path = root / "resolved.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        saved = json.loads(path.read_text())
        if saved["fingerprint"] == fingerprint and saved["pin"] == pin:
            return dict(saved["packages"])
    packages = resolve_packages(kernel_package)
    with contextlib.suppress(OSError):
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".resolved-{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "pin": pin,
                                   "packages": packages}))
        tmp.replace(path)
    return packages


def _download_and_unpack(package: str, version: str, workdir: Path, dest: Path) -> None:
    """``apt-get download package=version`` into ``workdir``, ``dpkg-deb -x`` into ``dest``."""
    before = set(workdir.glob("*.deb"))
    # Running as root, apt wants to drop to its `_apt` user, which cannot write here.
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{package}={version}"],
         cwd=workdir, timeout=600)
    debs = sorted(set(workdir.glob("*.deb")) - before)
    if len(debs) != 1:
        raise ImageBuildError(f"apt-get download {package} left {debs}")
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(debs[0]), str(dest)], timeout=600)
    debs[0].unlink()


# -- modules -------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".gz", ".zst"):
        name = name.removesuffix(suffix)
    return _norm(name.removesuffix(".ko"))


def _read_module(path: Path) -> bytes:
    """A module's ELF image, decompressed."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        try:
            return subprocess.run(["zstd", "-dc"], input=data, capture_output=True,
                                  check=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise ImageBuildError(f"cannot decompress {path} (zstd): {exc}") from exc
    return data


def module_info(elf: bytes) -> dict[str, list[str]]:
    """The ``key=value`` pairs of a module's ``.modinfo`` section (what ``modinfo`` prints),
    each key with all its values."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ImageBuildError("not a little-endian 64-bit ELF module")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize)
        return name, offset, size

    _, stroff, strsize = section(shstrndx)
    names = elf[stroff:stroff + strsize]
    for i in range(shnum):
        name, offset, size = section(i)
        if names[name:names.index(b"\0", name)] == b".modinfo":
            info: dict[str, list[str]] = {}
            for item in elf[offset:offset + size].split(b"\0"):
                if b"=" in item:
                    key, value = item.decode(errors="replace").split("=", 1)
                    info.setdefault(key, []).append(value)
            return info
    raise ImageBuildError("module has no .modinfo section")


def _resolve_modules(moddir: Path, wanted: Iterable[str]) -> list[tuple[str, bytes, list[str]]]:
    """``(name, elf, dependencies)`` for ``wanted`` and everything they depend on, ordered so
    that each module comes after its dependencies."""
    index = {_module_name(p): p for p in moddir.rglob("*.ko*") if p.is_file()}
    loaded: dict[str, tuple[bytes, list[str]]] = {}
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in loaded:
            return
        if name in chain:
            raise ImageBuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        path = index.get(name)
        if path is None:
            raise ImageBuildError(f"module {name!r} is not in {moddir} (built in, or renamed?)")
        elf = _read_module(path)
        deps = [_norm(d) for v in module_info(elf).get("depends", []) for d in v.split(",") if d]
        for dep in deps:
            visit(dep, (*chain, name))
        loaded[name] = (elf, deps)
        order.append(name)

    for name in wanted:
        visit(_norm(name), ())

    def closure(name: str) -> list[str]:
        seen: list[str] = []
        for dep in loaded[name][1]:
            for d in [*closure(dep), dep]:
                if d not in seen:
                    seen.append(d)
        return seen

    return [(n, loaded[n][0], sorted(closure(n), key=order.index)) for n in order]


# -- cpio ----------------------------------------------------------------------------------


class _Cpio:
    """A writer for the kernel's initramfs format ("newc" cpio, no compression), so that no
    cpio binary, root or real device nodes are needed to build one."""

    def __init__(self, path: Path) -> None:
        self._f = path.open("wb")
        self._ino = 0
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               ) -> None:
        self._ino += 1
        raw = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1 if not stat.S_ISDIR(mode) else 2, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(raw), 0)
        self._f.write(b"070701" + b"".join(b"%08X" % v for v in fields) + raw)
        self._f.write(b"\0" * (-(110 + len(raw)) % 4))
        self._f.write(data)
        self._f.write(b"\0" * (-len(data) % 4))

    def mkdir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self._dirs:
                self._dirs.add(d)
                self._entry(d, stat.S_IFDIR | 0o755)

    def _parent(self, name: str) -> str:
        name = name.strip("/")
        self.mkdir(os.path.dirname(name))
        return name

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(self._parent(name), stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(self._parent(name), stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(self._parent(name), stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)
        self._f.close()


# -- build ---------------------------------------------------------------------------------


def _cache_key(packages: dict[str, str], modules: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"packages": packages, "modules": sorted(_norm(m) for m in modules)},
                        sort_keys=True).encode())
    h.update(INIT_SCRIPT.read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def _build(entry: Path, work: Path, packages: dict[str, str], modules: Sequence[str]) -> None:
    """Build an image into ``entry`` (a fresh folder), using ``work`` for downloads."""
    start = time.monotonic()
    kroot, broot = work / "kernel", work / "busybox"
    _download_and_unpack(packages["kernel"], packages["kernel_version"], work, kroot)
    _download_and_unpack(packages["busybox"], packages["busybox_version"], work, broot)

    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    configs = sorted((kroot / "boot").glob("config-*"))
    releases = sorted(p.name for p in (kroot / "lib" / "modules").iterdir())
    if len(vmlinuz) != 1 or len(configs) != 1 or len(releases) != 1:
        raise ImageBuildError(f"unexpected layout of {packages['kernel']}: "
                              f"{vmlinuz} {configs} {releases}")
    release = releases[0]
    moddir = kroot / "lib" / "modules" / release
    busybox = broot / "bin" / "busybox"
    if not busybox.is_file():
        raise ImageBuildError(f"{packages['busybox']} has no bin/busybox")

    resolved = _resolve_modules(moddir / "kernel", modules)
    applets = _run([str(busybox), "--list-full"], timeout=60).split()

    cpio = _Cpio(entry / "initrd.cpio")
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run",
              "mnt/host", "mnt/results", "modules"):
        cpio.mkdir(d)
    # The kernel opens /dev/console for init before init can mount devtmpfs.
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in applets:
        if applet.rsplit("/", 1)[-1] != "busybox":  # the list includes busybox itself
            cpio.symlink(applet, "/bin/busybox")
    for name, elf, deps in resolved:
        cpio.file(f"modules/{name}.ko", elf)
        cpio.file(f"modules/{name}.deps", "".join(d + "\n" for d in deps).encode())
    cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    cpio.close()

    shutil.copyfile(vmlinuz[0], entry / "vmlinuz")
    shutil.copyfile(configs[0], entry / "config")
    shutil.copyfile(moddir / "modules.order", entry / "modules.order")
    manifest = {
        "kernel_package": packages["kernel"],
        "kernel_version": packages["kernel_version"],
        "busybox_version": packages["busybox_version"],
        "kernel_release": release,
        "modules": [name for name, _, _ in resolved],
        "build_seconds": round(time.monotonic() - start, 2),
        "built_at": time.time(),
    }
    (entry / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def _load(entry: Path) -> GuestImage:
    m = json.loads((entry / "manifest.json").read_text())
    return GuestImage(
        directory=entry, kernel=entry / "vmlinuz", initrd=entry / "initrd.cpio",
        config=entry / "config", kernel_package=m["kernel_package"],
        kernel_version=m["kernel_version"], kernel_release=m["kernel_release"],
        modules=tuple(m["modules"]), build_seconds=float(m["build_seconds"]),
    )


@contextlib.contextmanager
def _locked(root: Path, timeout: float) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ImageBuildError(f"timed out waiting for the build lock in {root}"
                                          ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prune(root: Path, keep: Path) -> None:
    """Remove leftovers of interrupted builds and old entries (called under the lock)."""
    for tmp in root.glob(".build-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    entries = sorted((p for p in root.iterdir() if (p / "manifest.json").is_file() and p != keep),
                     key=lambda p: (p / "manifest.json").stat().st_mtime, reverse=True)
    for old in entries[_KEEP_NEWEST:]:
        if time.time() - (old / "manifest.json").stat().st_mtime > _PRUNE_AGE:
            shutil.rmtree(old, ignore_errors=True)


def ensure_image(
    *,
    modules: Sequence[str] = DEFAULT_MODULES,
    kernel_package: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    timeout: float = 900,
) -> GuestImage:
    """The guest image for these inputs, built first if it is not cached.

    ``modules``: module names the initramfs must contain (dependencies are added).
    ``kernel_package``: a ``linux-image-*`` package to use instead of the one
    ``linux-image-amd64`` points at. ``cache_dir``: the cache folder (default
    :func:`cache_root`). ``timeout``: how long to wait for another process's build."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    packages = _resolve_cached(root, kernel_package)
    entry = root / _cache_key(packages, modules)
    if (entry / "manifest.json").is_file():
        return _load(entry)
    with _locked(root, timeout):
        if (entry / "manifest.json").is_file():  # another process built it meanwhile
            return _load(entry)
        _prune(root, entry)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            staged = tmp / "entry"
            staged.mkdir()
            work = tmp / "work"
            work.mkdir()
            _build(staged, work, packages, modules)
            shutil.rmtree(work)
            staged.rename(entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _load(entry)


def main() -> int:
    started = time.monotonic()
    image = ensure_image()
    print(f"kernel  {image.kernel}")
    print(f"initrd  {image.initrd}")
    print(f"config  {image.config}")
    print(f"package {image.kernel_package} {image.kernel_version} ({image.kernel_release})")
    print(f"modules {' '.join(image.modules)}")
    print(f"built in {image.build_seconds:.1f} s; this call took "
          f"{time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
