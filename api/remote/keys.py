"""CURVE key pairs for the agent and its tenants (ZeroMQ certificate files).

``pyvirtiofs keygen NAME`` writes ``NAME.key`` (the public key: give it to the other side)
and ``NAME.key_secret`` (public and secret key, mode 0600: keep it) in ZeroMQ's
certificate format, the one :func:`zmq.auth.load_certificate` reads::

    from pyvirtiofs.api import connect_remote
    from pyvirtiofs.api.remote.keys import client_keys
    fs = connect_remote("tcp://agent:5555",
                        curve=client_keys("alice.key_secret", "agent.key"))

Keys are Z85 text, 40 characters (32 bytes), as :func:`zmq.curve_keypair` makes them.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
from typing import Any

import zmq
import zmq.auth
from zmq.utils import z85

from pyvirtiofs.api.remote.client import CurveKeys

__all__ = [
    "ENV_CLIENT_KEY",
    "ENV_SERVER_KEY",
    "add_keygen_parser",
    "client_keys",
    "cmd_keygen",
    "curve_from_env",
    "generate",
    "is_z85_key",
    "load_public",
    "load_secret",
]

ENV_CLIENT_KEY = "PYVIRTIOFS_CLIENT_KEY"  # path of the client's .key_secret file
ENV_SERVER_KEY = "PYVIRTIOFS_SERVER_KEY"  # path of the server's .key file (or a Z85 key)


def is_z85_key(text: str | bytes) -> bool:
    """Whether ``text`` is a 40-character Z85 CURVE key (32 bytes)."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) != 40:
        return False
    try:
        return len(z85.decode(raw)) == 32
    except (ValueError, KeyError, TypeError, IndexError):
        return False


def generate(directory: str | os.PathLike[str], name: str, *,
             force: bool = False) -> tuple[str, str]:
    """Write ``NAME.key`` and ``NAME.key_secret`` into ``directory`` (created 0700 if
    missing); the secret file is never readable by others, not even for a moment.

    Returns (public file, secret file). Refuses to overwrite unless ``force``."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad key name {name!r}: a plain file name is needed")
    directory = os.fspath(directory)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    public_file = os.path.join(directory, f"{name}.key")
    secret_file = os.path.join(directory, f"{name}.key_secret")
    if not force:
        for path in (public_file, secret_file):
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "key file exists (use --force)", path)
    old_umask = os.umask(0o077)
    try:
        for path in (public_file, secret_file):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # never write through a planted symlink
        public_file, secret_file = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old_umask)
    os.chmod(secret_file, 0o600)
    os.chmod(public_file, 0o644)
    return public_file, secret_file


def load_public(path_or_key: str | os.PathLike[str]) -> bytes:
    """A public key: Z85 text itself, or a certificate file holding one."""
    text = os.fspath(path_or_key)
    if is_z85_key(text) and not os.path.exists(text):
        return text.encode()
    public, _ = zmq.auth.load_certificate(text)
    if not is_z85_key(public):
        raise ValueError(f"{text}: not a valid CURVE public key")
    return public


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` certificate file."""
    public, secret = zmq.auth.load_certificate(os.fspath(path))
    if secret is None:
        raise ValueError(f"{os.fspath(path)}: holds no secret key (a .key_secret file is "
                         "needed, not the public .key)")
    if not (is_z85_key(public) and is_z85_key(secret)):
        raise ValueError(f"{os.fspath(path)}: not a valid CURVE key pair")
    return public, secret


def client_keys(secret_file: str | os.PathLike[str],
                server_public: str | os.PathLike[str]) -> CurveKeys:
    """What :func:`api.connect_remote` needs to reach an agent: our key pair (a
    ``.key_secret`` file) and the agent's public key (its ``.key`` file, or Z85 text)."""
    public, secret = load_secret(secret_file)
    return CurveKeys(public=public, secret=secret, server_public=load_public(server_public))


def curve_from_env(environ: dict[str, str] | None = None) -> CurveKeys | None:
    """CURVE keys from ``$PYVIRTIOFS_CLIENT_KEY`` and ``$PYVIRTIOFS_SERVER_KEY``
    (None when neither is set; ValueError when only one is)."""
    env = os.environ if environ is None else environ
    client, server = env.get(ENV_CLIENT_KEY), env.get(ENV_SERVER_KEY)
    if not client and not server:
        return None
    if not (client and server):
        raise ValueError(f"set both {ENV_CLIENT_KEY} (your .key_secret file) and "
                         f"{ENV_SERVER_KEY} (the agent's .key file)")
    return client_keys(client, server)


# -- command line -------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    """``pyvirtiofs keygen NAME [--dir DIR] [--force]``."""
    public_file, secret_file = generate(args.dir, args.name, force=args.force)
    public = load_public(public_file).decode()
    print(f"public key:  {public_file}\nsecret key:  {secret_file} (mode 0600, keep it)\n"
          f"public_key = \"{public}\"")
    return 0


def add_keygen_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``keygen`` to an argparse subparsers object."""
    p = sub.add_parser(
        "keygen", help="write a CURVE key pair (NAME.key, NAME.key_secret)",
        description="Write a ZeroMQ CURVE key pair: NAME.key (public: put it in the agent's "
                    "config, or give it to clients) and NAME.key_secret (mode 0600: keep it).")
    p.add_argument("name", help="base name of the two files, e.g. alice or agent")
    p.add_argument("--dir", default=".", help="directory to write to (default: .)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_keygen)
    return p
