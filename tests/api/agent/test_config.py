"""The agent's config file: every error names the file, the line and the reason, and the
agent refuses to start; ``keygen`` writes usable key pairs. No daemons needed here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirtiofs.api.agent import ConfigError, LimitsConfig, load_config, parse_size
from pyvirtiofs.api.cli import main
from pyvirtiofs.api.remote.keys import curve_from_env, generate, load_public, load_secret
from tests import REPO
from tests.api.agent.harness import key_files_ok


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """Keys and shares a config can refer to (relative to the config's directory)."""
    for name in ("agent", "alice", "bob"):
        generate(tmp_path / "keys", name)
    (tmp_path / "shares" / "alice" / "projects").mkdir(parents=True)
    (tmp_path / "shares" / "bob").mkdir(parents=True)
    (tmp_path / "shares" / "alice" / "escape").symlink_to("../bob")
    return tmp_path


GOOD = """\
# a two-tenant agent
[agent]
bind = ["tcp://127.0.0.1:5555"]
key_file = "keys/agent.key_secret"
runtime_dir = "run"

[limits]
open_handles = 100

[tenants.alice]
public_key = "keys/alice.key"
share = "shares/alice"
root = "projects"

[tenants.bob]
public_key = "keys/bob.key"
share = "shares/bob"
read_only = true
limits = { bytes_in_flight = "8MiB", requests_per_second = 50 }
"""


def _write(site: Path, text: str) -> Path:
    path = site / "agent.toml"
    path.write_text(text)
    return path


def _error(site: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(_write(site, text))
    return info.value


def test_good_config_loads_with_defaults_and_relative_paths(site: Path) -> None:
    cfg = load_config(_write(site, GOOD))
    assert cfg.bind == ("tcp://127.0.0.1:5555",)
    assert cfg.runtime_dir == str(site / "run")
    alice, bob = cfg.tenants["alice"], cfg.tenants["bob"]
    assert alice.source == str(site / "shares" / "alice" / "projects")
    assert alice.public_key == load_public(site / "keys" / "alice.key")
    assert alice.limits.open_handles == 100  # from [limits]
    assert alice.limits.requests_in_flight == LimitsConfig().requests_in_flight
    assert bob.read_only and bob.limits.bytes_in_flight == 8 << 20
    assert bob.limits.requests_per_second == 50.0 and bob.limits.open_handles == 100
    assert (alice.uid, alice.gid) == (os.getuid(), os.getgid())  # owner of the root


@pytest.mark.parametrize(("edit", "line", "reason"), [
    # syntax errors: tomllib's line
    (lambda t: t.replace('root = "projects"', 'root = "projects'), 13, "TOML syntax"),
    (lambda t: t.replace("[tenants.bob]", "[tenants.bob"), 15, "TOML syntax"),
    (lambda t: t + "[tenants.alice]\n", 20, "TOML syntax"),  # table defined twice
    # meaning: our own line finding
    (lambda t: t.replace("bind = [", "bnid = ["), 3, "unknown key 'bnid'"),
    (lambda t: t.replace('bind = ["tcp://127.0.0.1:5555"]', 'bind = ["udp://x:1"]'), 3,
     "must be tcp://"),
    (lambda t: t.replace('"keys/agent.key_secret"', '"keys/agent.key"'), 4,
     "holds no secret key"),
    (lambda t: t.replace("open_handles = 100", "open_handles = -1"), 8, "must be positive"),
    (lambda t: t.replace("open_handles = 100", "open_handles = true"), 8, "not a boolean"),
    (lambda t: t.replace('public_key = "keys/alice.key"', 'public_key = "nope"'), 11,
     "neither a 40-character Z85 key"),
    (lambda t: t.replace('share = "shares/alice"', 'share = "shares/missing"'), 12,
     "is not a directory"),
    (lambda t: t.replace('root = "projects"', 'root = "../bob"'), 13, "without '..'"),
    (lambda t: t.replace('root = "projects"', 'root = "escape"'), 13, "leads outside the share"),
    (lambda t: t.replace('root = "projects"', 'root = "/etc"'), 13, "relative path"),
    (lambda t: t.replace('share = "shares/alice"', 'socket = "x"\nshare = "shares/alice"'), 10,
     "exactly one of share"),
    (lambda t: t.replace('"keys/bob.key"', '"keys/alice.key"'), 16, "same public key"),
    (lambda t: t.replace("read_only = true", 'read_only = "yes"'), 18, "true or false"),
    (lambda t: t.replace('"8MiB"', '"eight"'), 19, "not a size"),
    (lambda t: t.replace("requests_per_second", "requests_per_sec"), 19,
     "unknown key 'requests_per_sec'"),
    (lambda t: t.replace("[tenants.bob]", '[tenants."bob smith"]'), 15, "tenant id"),
    (lambda t: t.replace("[limits]", "[limit]"), 7, "unknown key 'limit'"),
])
def test_config_errors_name_file_line_and_reason(site: Path, edit, line: int,  # type: ignore[no-untyped-def]
                                                 reason: str) -> None:
    err = _error(site, edit(GOOD))
    assert err.file.endswith("agent.toml")
    assert err.line == line, str(err)
    assert reason in err.reason, str(err)
    assert str(err).startswith(f"{err.file}:{line}: ")


def test_missing_sections_are_reported(site: Path) -> None:
    err = _error(site, "[agent]\nkey_file = \"keys/agent.key_secret\"\n")
    assert err.line == 1 and "bind" in err.reason
    err = _error(site, "[agent]\nbind = \"tcp://127.0.0.1:1\"\n")
    assert err.line == 1 and "key_file" in err.reason
    err = _error(site, GOOD.replace('public_key = "keys/alice.key"\n', ""))
    assert err.line == 10 and "needs public_key" in err.reason


def test_agent_refuses_to_start_on_a_bad_config(site: Path) -> None:
    path = _write(site, GOOD.replace("open_handles = 100", "open_handles = 0"))
    out = subprocess.run([sys.executable, "-m", "pyvirtiofs", "agent", "--config", str(path)],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2
    assert f"{path}:8: open_handles must be positive" in out.stderr
    assert not (site / "run").exists()  # nothing was started


def test_check_only_validates(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "--config", str(_write(site, GOOD)), "--check"]) == 0
    assert "2 tenant(s): alice, bob" in capsys.readouterr().out
    assert main(["agent", "--config", str(_write(site, "[agent\n")), "--check"]) == 2
    assert "agent.toml:1: TOML syntax" in capsys.readouterr().err


def test_sizes() -> None:
    assert parse_size("64MiB") == 64 << 20
    assert parse_size("1.5 GiB") == 3 << 29
    assert parse_size("512") == parse_size(512) == 512
    with pytest.raises(ValueError):
        parse_size("lots")


def test_keygen_writes_a_private_pair(tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "carol", "--dir", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert key_files_ok(tmp_path / "k", "carol")
    assert os.stat(tmp_path / "k" / "carol.key_secret").st_mode & 0o777 == 0o600
    public = load_public(tmp_path / "k" / "carol.key").decode()
    assert f'public_key = "{public}"' in out
    assert main(["keygen", "carol", "--dir", str(tmp_path / "k")]) == 1
    assert "exists" in capsys.readouterr().err  # never overwritten silently


def test_client_keys_from_the_environment(tmp_path: Path) -> None:
    generate(tmp_path, "me")
    generate(tmp_path, "server")
    env = {"PYVIRTIOFS_CLIENT_KEY": str(tmp_path / "me.key_secret"),
           "PYVIRTIOFS_SERVER_KEY": str(tmp_path / "server.key")}
    keys = curve_from_env(env)
    assert keys is not None
    assert (keys.public, keys.secret) == load_secret(tmp_path / "me.key_secret")
    assert keys.server_public == load_public(tmp_path / "server.key")
    assert curve_from_env({}) is None
    with pytest.raises(ValueError):
        curve_from_env({"PYVIRTIOFS_CLIENT_KEY": env["PYVIRTIOFS_CLIENT_KEY"]})
