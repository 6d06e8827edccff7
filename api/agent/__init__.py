"""The multi-tenant agent (see AGENT.md): many tenants, each authenticated by its CURVE key,
confined to its own share, limited, and isolated from the others.

Modules, by who uses them:
    config    the TOML config, every error as FILE:LINE: reason
    confine   what a tenant may ask, checked at the door
    tenant    a configured tenant: share, confinement, restarts
    zap       which keys may connect
    logs      structured logs
    service   :class:`Agent`: start, reload, drain, stop
    control   the control socket's client (``status``)
    cli       ``pyvirtiofs agent`` and ``pyvirtiofs status``
"""

from pyvirtiofs.api.agent.cli import add_agent_parser, add_status_parser
from pyvirtiofs.api.agent.config import (
    AgentConfig,
    ConfigError,
    LimitsConfig,
    TenantConfig,
    load_config,
    parse_size,
)
from pyvirtiofs.api.agent.confine import check_path, confine
from pyvirtiofs.api.agent.control import format_status, query_control
from pyvirtiofs.api.agent.service import Agent
from pyvirtiofs.api.agent.tenant import AgentTenant
from pyvirtiofs.api.agent.zap import ZapHandler

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentTenant",
    "ConfigError",
    "LimitsConfig",
    "TenantConfig",
    "ZapHandler",
    "add_agent_parser",
    "add_status_parser",
    "check_path",
    "confine",
    "format_status",
    "load_config",
    "parse_size",
    "query_control",
]
