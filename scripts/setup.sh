#!/usr/bin/env bash
# Idempotent set-up on Debian/Ubuntu: a virtiofsd binary, what the FUSE re-export needs,
# a virtual environment in .venv, and this project installed into it (editable, with the
# test, fuse, fsspec and bench extras). Safe to run again: a machine that has everything costs
# no apt or pip call.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
apt_updated=""
apt_install() {
    if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

find_virtiofsd() {
    local p
    for p in "${PYVIRTIOFS_VIRTIOFSD:-}" "$(command -v virtiofsd 2>/dev/null || true)" \
             /usr/libexec/virtiofsd /usr/lib/qemu/virtiofsd; do
        if [ -n "$p" ] && [ -x "$p" ]; then echo "$p"; return 0; fi
    done
    return 1
}

if ! find_virtiofsd >/dev/null; then
    echo "setup: no virtiofsd found, installing one" >&2
    $SUDO apt-get update -qq; apt_updated=1
    # Newer releases ship the Rust daemon as its own package; Debian 12 has QEMU's C one.
    if apt-cache policy virtiofsd 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        apt_install virtiofsd
    else
        apt_install qemu-system-common
    fi
    find_virtiofsd >/dev/null || { echo "setup: could not install virtiofsd" >&2; exit 1; }
fi

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: Python >= 3.11 is required ($PY is too old or missing)" >&2; exit 1
fi

# FUSE re-export (api/fusemount.py, `pyvirtiofs mount`): the kernel side (fusermount3),
# libfuse3 headers + pkg-config + a compiler to build pyfuse3 (an sdist, so Python.h too),
# git and setpriv for its tests.
need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
pkg-config --exists fuse3 2>/dev/null || need+=(libfuse3-dev)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v git >/dev/null 2>&1 || need+=(git)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
"$PY" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    2>/dev/null || need+=(python3-dev)
if [ "${#need[@]}" -gt 0 ]; then apt_install "${need[@]}"; fi

# Guest tests (tests/guest): QEMU to boot a TCG VM. The guest's kernel and busybox are not
# installed here: tests/guest/image.py fetches them with `apt-get download` and unpacks them
# with dpkg-deb (it decompresses modules and writes the initramfs itself), so it only needs
# the package lists, refreshed once if they do not know the kernel meta-package.
guest=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || guest+=(qemu-system-x86)
command -v dpkg-deb >/dev/null 2>&1 || guest+=(dpkg)
if [ "${#guest[@]}" -gt 0 ]; then apt_install --no-install-recommends "${guest[@]}"; fi
if [ -z "$apt_updated" ] && ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
    $SUDO apt-get update -qq; apt_updated=1
fi

if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -m venv .venv 2>/dev/null; then
        rm -rf .venv
        apt_install python3-venv
        "$PY" -m venv .venv
    fi
fi
stamp=.venv/.pyvirtiofs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -e '.[test,fuse,fsspec,bench]'
    touch "$stamp"
fi
echo "setup: ready (virtiofsd: $(find_virtiofsd))" >&2
