"""Starting virtiofsd: clear failures, and the ways of running it with and without root.

The daemons that fail here are real processes (small scripts that answer ``--version`` as
QEMU's daemon does and then fail the way a daemon can); the ones that work are the real
virtiofsd. Unprivileged runs are in tests/api/test_unprivileged.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirtiofs.api.local import connect
from pyvirtiofs.hw.vhost_user import launcher
from pyvirtiofs.hw.vhost_user.launcher import (
    LaunchMode,
    UserNamespace,
    Virtiofsd,
    VirtiofsdFailed,
    VirtiofsdNotFound,
    find_virtiofsd,
    launch_candidates,
)
from pyvirtiofs.hw.vhost_user.transport import VhostUserTransport, open_private_device
from tests import REPO

CLI = [sys.executable, "-m", "pyvirtiofs"]


def fake_daemon(folder: Path, body: str) -> Path:
    """An executable that says it is QEMU's virtiofsd, then runs ``body`` (sh)."""
    path = folder / "fake-virtiofsd"
    path.write_text("#!/bin/sh\n"
                    'if [ "$1" = --version ]; then echo "virtiofsd version 7.2.0 (fake QEMU)";'
                    " exit 0; fi\n" + body)
    path.chmod(0o755)
    return path


def cli(*args: object, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env}, cwd=REPO,
                          timeout=60, check=False)


def one_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 1, res.stderr
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("pyvirtiofs: "), res.stderr
    return res.stderr.strip()


# -- which binary ----------------------------------------------------------------------------


def test_a_named_binary_that_is_missing_is_an_error_not_a_fallback(
        tmp_path: Path, share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no-such-virtiofsd"
    monkeypatch.setenv("PYVIRTIOFS_VIRTIOFSD", str(missing))
    with pytest.raises(VirtiofsdNotFound) as info:
        find_virtiofsd()
    assert info.value.filename == str(missing)
    assert "$PYVIRTIOFS_VIRTIOFSD names no file" in str(info.value)
    with pytest.raises(VirtiofsdNotFound):
        connect(share)
    not_executable = tmp_path / "plain-file"
    not_executable.write_text("")
    monkeypatch.setenv("PYVIRTIOFS_VIRTIOFSD", str(not_executable))
    with pytest.raises(VirtiofsdNotFound) as info:
        find_virtiofsd()
    assert "not an executable file" in str(info.value)
    monkeypatch.delenv("PYVIRTIOFS_VIRTIOFSD")
    with pytest.raises(VirtiofsdNotFound) as info:
        find_virtiofsd(str(missing))
    assert info.value.filename == str(missing)
    assert find_virtiofsd() in (launcher.shutil.which("virtiofsd"),
                                *launcher.DEFAULT_LOCATIONS)
    line = one_line(cli("ls", share, PYVIRTIOFS_VIRTIOFSD=str(missing)))
    assert line == f"pyvirtiofs: $PYVIRTIOFS_VIRTIOFSD names no file: {missing}"


# -- a daemon that dies at start ---------------------------------------------------------------


def test_a_daemon_that_exits_at_start_is_reported_with_path_status_and_last_line(
        tmp_path: Path, share: Path) -> None:
    fake = fake_daemon(tmp_path, 'echo "fake: starting" >&2\n'
                                 'echo "fake: cannot open the source: Permission denied" >&2\n'
                                 "exit 3\n")
    with pytest.raises(VirtiofsdFailed) as info:
        open_private_device(share, binary=str(fake))
    err = info.value
    assert err.binary == str(fake) and err.returncode == 3
    assert str(fake) in err.strerror
    assert "exited at start: exit status 3" in err.strerror
    assert err.strerror.endswith("it said: fake: cannot open the source: Permission denied")
    assert "fake: starting" in err.stderr
    line = one_line(cli("ls", share, PYVIRTIOFS_VIRTIOFSD=str(fake)))
    assert str(fake) in line and "exit status 3" in line
    assert line.endswith("it said: fake: cannot open the source: Permission denied")


def test_a_daemon_killed_at_start_is_reported_with_the_signal(tmp_path: Path,
                                                              share: Path) -> None:
    fake = fake_daemon(tmp_path, 'echo "fake: about to crash" >&2\nkill -SEGV $$\n')
    with pytest.raises(VirtiofsdFailed) as info:
        connect(share, virtiofsd=str(fake))
    assert "killed by SIGSEGV" in info.value.strerror
    assert info.value.strerror.endswith("it said: fake: about to crash")


# -- the shared folder -------------------------------------------------------------------------


def test_a_missing_share_folder_is_file_not_found_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "not-there"
    for call in (lambda: open_private_device(missing), lambda: connect(missing),
                 lambda: connect(str(missing), restart=True)):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert info.value.filename == str(missing)
        assert not isinstance(info.value, VirtiofsdNotFound)
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(NotADirectoryError) as info2:
        open_private_device(a_file)
    assert info2.value.filename == str(a_file)


# -- ways to run it ---------------------------------------------------------------------------


def test_launch_candidates_as_root_and_as_an_ordinary_user(
        monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() == 0:
        assert launch_candidates(launcher.DaemonFlavor.C) == [
            LaunchMode("namespace"), LaunchMode("chroot")]
    monkeypatch.setattr(launcher.os, "geteuid", lambda: 1000)
    c = launch_candidates(launcher.DaemonFlavor.C)
    # util-linux's unshare here has --map-current-user and --keep-caps (2.38+): the user
    # stays themselves in the namespace.
    assert c == [LaunchMode("namespace", UserNamespace.IDENTITY),
                 LaunchMode("chroot", UserNamespace.IDENTITY)]
    assert launch_candidates(launcher.DaemonFlavor.RUST) == [
        LaunchMode("namespace", UserNamespace.ROOT), LaunchMode("none")]


def test_the_user_namespace_command_line(share: Path) -> None:
    d = Virtiofsd(share, userns=UserNamespace.IDENTITY)
    argv = d.command(7)
    unshare = argv.index(launcher.shutil.which("unshare"))
    assert argv[unshare:unshare + 6] == [argv[unshare], "--user", "--map-current-user",
                                         "--keep-caps", "--mount", "--fork"]
    assert "mount -t tmpfs" in argv[argv.index("-c") + 1]
    assert argv[argv.index("-c") + 2:] == d.daemon_command(7)
    assert d.credentials is None
    assert Virtiofsd(share, userns=UserNamespace.ROOT).credentials == (0, 0)
    assert "--map-root-user" in Virtiofsd(share, userns=UserNamespace.ROOT).command(7)
    assert Virtiofsd(share).command(7) == Virtiofsd(share).daemon_command(7) or \
        os.geteuid() != 0


def test_a_launched_daemon_leaves_no_socket_behind_once_connected(
        transport: VhostUserTransport) -> None:
    """The socket's folder goes as soon as the frontend is connected, so a client killed
    later (no clean-up runs on SIGKILL) leaves nothing in the temporary folder."""
    daemon = transport.daemon
    assert daemon is not None and daemon.alive()
    with pytest.raises(RuntimeError):
        daemon.socket_path  # noqa: B018 (the property raises once the folder is gone)
