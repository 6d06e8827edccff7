"""The agent's structured logs: JSON lines (or logfmt-like text) with the tenant id.

Tenants can make the agent log (every refused request, every connection), so the log is
bounded whatever they send:

* **per kind**: each (event, tenant) — or, for other libraries' records, each (logger,
  message template) — may write :data:`LINES_PER_SECOND` lines a second (bursts of
  :data:`LINES_BURST`); the lines held back are counted, and the next line of that kind
  says how many (``suppressed``). Counts nobody reported within a second are written as one
  ``log_suppressed`` line (at most one a second).
* **in total**: at most ``log_rate`` bytes a second (bursts of four seconds' worth); lines
  beyond it are dropped and counted in the next ``log_suppressed`` line. The agent's own
  life-cycle lines (start, stop, drain) are always written.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import threading
import time
from typing import Any

log = logging.getLogger("pyvirtiofs.agent")

LINES_PER_SECOND = 10.0
LINES_BURST = 20.0
DEFAULT_LOG_RATE = 64 << 10  # bytes per second
_ALWAYS = frozenset({"agent_started", "agent_stopping", "agent_stopped", "drained",
                     "agent_failed", "log_suppressed"})
_MAX_KINDS = 4096


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
        suppressed = getattr(record, "suppressed", 0)
        if suppressed:
            out["suppressed"] = suppressed
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
        suppressed = getattr(record, "suppressed", 0)
        if suppressed:
            text += f" suppressed={suppressed}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class LimitedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes at most :data:`LINES_PER_SECOND` lines of each kind
    and ``rate`` bytes per second in all (see the module's doc). Thread-safe."""

    def __init__(self, stream: Any = None, rate: int = DEFAULT_LOG_RATE) -> None:
        super().__init__(stream)
        self.rate = float(rate)
        self._bytes = self.rate * 4
        self._bytes_at = time.monotonic()
        self._kinds: dict[tuple[Any, ...], list[float]] = {}  # [tokens, at, suppressed]
        self._dropped = 0  # lines over the byte budget
        self._unreported = 0.0  # when suppressed counts were last written
        self._mutex = threading.Lock()
        self.written = 0  # bytes written so far (for tests and status)

    @staticmethod
    def _kind(record: logging.LogRecord) -> tuple[Any, ...]:
        event = getattr(record, "event", None)
        if event is not None:
            return (event, getattr(record, "tenant", None))
        return (record.name, record.msg if isinstance(record.msg, str) else "")

    def _admit(self, record: logging.LogRecord, now: float) -> bool:
        kind = self._kind(record)
        state = self._kinds.get(kind)
        if state is None:
            if len(self._kinds) >= _MAX_KINDS:
                self._kinds.clear()
            state = self._kinds[kind] = [LINES_BURST, now, 0.0]
        state[0] = min(LINES_BURST, state[0] + (now - state[1]) * LINES_PER_SECOND)
        state[1] = now
        if state[0] < 1.0 and getattr(record, "event", None) not in _ALWAYS:
            state[2] += 1
            return False
        state[0] -= 1.0
        if state[2]:
            record.suppressed = int(state[2])
            state[2] = 0.0
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            now = time.monotonic()
            with self._mutex:
                if not self._admit(record, now):
                    return
                line = self.format(record) + self.terminator
                self._bytes = min(self.rate * 4,
                                  self._bytes + (now - self._bytes_at) * self.rate)
                self._bytes_at = now
                if (self._bytes < len(line)
                        and getattr(record, "event", None) not in _ALWAYS):
                    self._dropped += 1
                    return
                self._bytes -= len(line)
                self.written += len(line)
                self.stream.write(line)
                self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def report(self) -> None:
        """Write one ``log_suppressed`` line for what was held back and not yet said (call
        it now and then; at most once a second)."""
        now = time.monotonic()
        with self._mutex:
            if now - self._unreported < 1.0:
                return
            self._unreported = now
            held = {f"{k[0]}/{k[1]}": int(v[2]) for k, v in self._kinds.items()
                    if v[2] and now - v[1] >= 1.0}
            for v in self._kinds.values():
                if v[2] and now - v[1] >= 1.0:
                    v[2] = 0.0
            dropped, self._dropped = self._dropped, 0
        if held or dropped:
            log_event("log_suppressed", None, level=logging.WARNING, lines=held,
                      over_rate=dropped)


_handler: LimitedHandler | None = None


def setup_logging(fmt: str = "json", level: str = "info", stream: Any = None,
                  rate: int = DEFAULT_LOG_RATE) -> LimitedHandler:
    """Route every logger of the process through one structured, rate-limited handler."""
    global _handler
    handler = LimitedHandler(stream or sys.stderr, rate)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    logging.getLogger("pykka").setLevel(max(logging.WARNING, root.level))
    _handler = handler
    return handler


def report_suppressed() -> None:
    """Say what the log held back (see :meth:`LimitedHandler.report`)."""
    if _handler is not None:
        _handler.report()


def log_event(event: str, tenant: str | None, *, level: int = logging.INFO,
              **fields: Any) -> None:
    """One structured log line."""
    log.log(level, "%s", event, extra={"event": event, "tenant": tenant, "fields": fields})
