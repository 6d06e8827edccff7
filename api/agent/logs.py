"""The agent's structured logs: JSON lines (or logfmt-like text) with the tenant id."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

log = logging.getLogger("pyvirtiofs.agent")



class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, tenant, and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "tenant": getattr(record, "tenant", None),
        }
        fields = getattr(record, "fields", None)
        if fields is not None:
            out.update(fields)
        else:
            out["logger"] = record.name
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _TextFormatter(logging.Formatter):
    """``TIME LEVEL EVENT tenant=ID key=value ...`` (logfmt-like)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        fields = getattr(record, "fields", None)
        if fields is None:
            text = f"{ts} {record.levelname.lower()} {record.name}: {record.getMessage()}"
        else:
            pairs = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())
            tenant = getattr(record, "tenant", None)
            text = (f"{ts} {record.levelname.lower()} {getattr(record, 'event', 'log')}"
                    f"{f' tenant={tenant}' if tenant else ''} {pairs}").rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(fmt: str = "json", level: str = "info", stream: Any = None) -> None:
    """Route every logger of the process through one structured handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    logging.getLogger("pykka").setLevel(max(logging.WARNING, root.level))


def log_event(event: str, tenant: str | None, *, level: int = logging.INFO,
              **fields: Any) -> None:
    """One structured log line."""
    log.log(level, "%s", event, extra={"event": event, "tenant": tenant, "fields": fields})
