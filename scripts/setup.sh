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
# A second environment for the tests that run as an unprivileged user
# (tests/api/test_unprivileged.py): that user must be able to execute its interpreter, which
# a Python built under root's home (mode 0700) is not. Made from the first interpreter an
# unprivileged user can run, with the runtime and test dependencies at the versions .venv
# has; world-readable. Only as root (only root can run tests as another user).
uvenv=.cache/unprivileged-venv
if [ "$(id -u)" -eq 0 ] && command -v setpriv >/dev/null 2>&1; then
    ustamp="$uvenv/.pyvirtiofs-installed"
    if [ ! -f "$ustamp" ] || [ pyproject.toml -nt "$ustamp" ]; then
        upy=""
        for cand in /usr/bin/python3 "$(command -v "$PY" 2>/dev/null || true)"; do
            [ -n "$cand" ] || continue
            if setpriv --reuid=65534 --regid=65534 --clear-groups "$cand" -c \
                    'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
                upy="$cand"; break
            fi
        done
        if [ -z "$upy" ] && [ -x /usr/bin/python3 ]; then
            apt_install python3-venv  # Debian's python3 without its venv module
            upy=/usr/bin/python3
        fi
        if [ -n "$upy" ]; then
            rm -rf "$uvenv"
            mkdir -p .cache
            if ! "$upy" -m venv "$uvenv" >/dev/null 2>&1; then
                rm -rf "$uvenv"
                apt_install python3-venv
                "$upy" -m venv "$uvenv"
            fi
            pins=$(.venv/bin/python -m pip freeze 2>/dev/null | grep -iE \
                   '^(pykka|msgspec|pyzmq|tqdm|pytest|pytest-timeout|hypothesis)==' || true)
            log=$(mktemp)
            # shellcheck disable=SC2086  # one requirement per word
            if ! "$uvenv/bin/python" -m pip install -q --disable-pip-version-check \
                    ${pins:-pykka msgspec pyzmq tqdm pytest pytest-timeout hypothesis} \
                    >"$log" 2>&1; then
                cat "$log" >&2; rm -f "$log"; exit 1
            fi
            rm -f "$log"
            chmod -R a+rX "$uvenv"
            touch "$ustamp"
        else
            echo "setup: no Python >= 3.11 that an unprivileged user can run;" \
                 "the unprivileged tests will fail" >&2
        fi
    fi
fi
# The mount bench (pyvirtiofs bench --mount): libfuse's passthrough_ll example (from
# libfuse3-dev, installed above) and fsxlite (pyvirtiofs/tools/fsxlite.c), built into
# .cache/mountbench by the bench's own --build; strace and py-spy for its --syscalls and
# --profile. Not fatal: nothing but that bench needs them.
command -v strace >/dev/null 2>&1 || apt_install strace || echo "setup: could not install strace" >&2
[ -x .venv/bin/py-spy ] || .venv/bin/python -m pip install -q py-spy >/dev/null 2>&1 \
    || echo "setup: could not install py-spy (pyvirtiofs bench --mount --profile)" >&2
if [ ! -x .cache/mountbench/passthrough_ll ] || [ ! -x .cache/mountbench/fsxlite ] \
        || [ pyvirtiofs/tools/fsxlite.c -nt .cache/mountbench/fsxlite ]; then
    .venv/bin/python -m pyvirtiofs.tools.mountbench --build --quiet \
        || echo "setup: could not build the mount bench's helpers" >&2
fi
echo "setup: ready (virtiofsd: $(find_virtiofsd))" >&2
