"""The agent's commands: ``pyvirtiofs agent``, ``pyvirtiofs status`` (and ``keygen``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from pyvirtiofs.api.agent.config import ConfigError, default_runtime_dir, load_config
from pyvirtiofs.api.agent.control import format_status, query_control
from pyvirtiofs.api.agent.logs import log_event, setup_logging
from pyvirtiofs.api.agent.service import Agent
from pyvirtiofs.api.remote.process import tune_malloc_for_servers


def _runtime_dir_of(args: argparse.Namespace) -> str:
    if args.runtime_dir:
        return str(args.runtime_dir)
    if args.config:
        return load_config(args.config).runtime_dir
    return default_runtime_dir()


def cmd_agent(args: argparse.Namespace) -> int:
    """``pyvirtiofs agent --config FILE [--check]``."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"pyvirtiofs agent: {exc}", file=sys.stderr)
        return 2
    if args.check:
        for warning in config.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{config.path}: OK, {len(config.tenants)} tenant(s): "
              f"{', '.join(sorted(config.tenants))}")
        return 0
    setup_logging(config.log_format, config.log_level, rate=config.log_rate)
    tune_malloc_for_servers()
    agent = Agent(config)
    try:
        return agent.run()
    except Exception as exc:
        log_event("agent_failed", None, level=logging.ERROR, detail=str(exc))
        print(f"pyvirtiofs agent: cannot start: {exc}", file=sys.stderr)
        return 1


def cmd_status(args: argparse.Namespace) -> int:
    """``pyvirtiofs status [--config FILE | --runtime-dir DIR] [--json]``."""
    try:
        status = query_control(_runtime_dir_of(args), "status", timeout=args.timeout)
    except ConfigError as exc:
        print(f"pyvirtiofs status: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"pyvirtiofs status: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2, default=str) if args.json else format_status(status))
    return 0


def add_agent_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``agent`` to an argparse subparsers object."""
    p = sub.add_parser(
        "agent", help="serve many tenants, each confined to its share (see AGENT.md)",
        description="Run the multi-tenant agent described by a TOML config until SIGTERM "
                    "(drains, releases every handle, stops the daemons, exits 0). SIGHUP "
                    "reloads the config without dropping unchanged tenants' sessions.")
    p.add_argument("--config", required=True, help="the agent's TOML config file")
    p.add_argument("--check", action="store_true",
                   help="only check the config (errors as FILE:LINE: reason) and exit")
    p.set_defaults(func=cmd_agent)
    return p


def add_status_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``status`` to an argparse subparsers object."""
    p = sub.add_parser(
        "status", help="show a running agent's tenants, handles, bytes in flight, rates",
        description="Ask a running agent (through its control socket, RUNTIME_DIR/"
                    "control.sock) for its tenants' counters.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", help="the agent's config (to find its runtime_dir)")
    where.add_argument("--runtime-dir", help="the agent's runtime_dir")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the agent")
    p.set_defaults(func=cmd_status)
    return p
