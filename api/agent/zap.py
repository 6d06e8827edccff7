"""ZAP (ZeroMQ RFC 27): who may connect. Only tenants' CURVE public keys pass the
handshake, and the key names the tenant of every message on that connection."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils import z85

log = logging.getLogger("pyvirtiofs.agent")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"pyvirtiofs"
REFUSAL_LOG_INTERVAL = 60.0  # seconds between log lines about the same refused peer


class ZapHandler:
    """A ZAP (RFC 27) handler thread: accepts CURVE clients whose public key belongs to a
    tenant, refuses everyone else. The User-Id of an accepted connection is the client's
    Z85 public key, which :meth:`Agent.tenant_of` maps to the tenant for every message.

    ``keys`` (Z85 bytes → tenant id) may be replaced at any time (reload)."""

    def __init__(self, context: zmq.Context[Any], keys: dict[bytes, str],
                 event: Callable[..., None]) -> None:
        self.context = context
        self.keys = keys
        self.event = event
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="zap", daemon=True)
        self.accepted = 0
        self.refused = 0
        self._refusals: dict[tuple[str, str, str | None], tuple[float, int]] = {}

    def start(self) -> ZapHandler:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            sock = self.context.socket(zmq.REP)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(ZAP_ENDPOINT)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                request = sock.recv_multipart()
                try:
                    answer = self._answer(request)
                except Exception as exc:  # refuse, and keep answering
                    log.exception("ZAP handler failed")
                    self.refused += 1
                    answer = [b"1.0", request[1] if len(request) > 1 else b"", b"500",
                              f"internal error: {type(exc).__name__}".encode(), b"", b""]
                sock.send_multipart(answer)
        finally:
            sock.close(0)

    def _refuse(self, address: str, reason: str, key: str | None = None) -> None:
        """Count a refusal; log it the first time, then once a minute per peer and key
        (a refused client reconnects ten times a second)."""
        self.refused += 1
        what = (address, reason, key)
        now = time.monotonic()
        seen = self._refusals.get(what)
        if seen is not None and now - seen[0] < REFUSAL_LOG_INTERVAL:
            self._refusals[what] = (seen[0], seen[1] + 1)
            return
        if len(self._refusals) >= 4096:
            self._refusals.clear()
        self._refusals[what] = (now, 0)
        fields: dict[str, Any] = {"address": address, "reason": reason}
        if key is not None:
            fields["key"] = key
        if seen is not None:
            fields["repeated"] = seen[1]
        self.event("auth_refused", None, level=logging.WARNING, **fields)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:
            self.refused += 1
            return [b"1.0", request[1] if len(request) > 1 else b"", b"400",
                    b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = request[:6]
        creds = request[6:]
        address_text = address.decode(errors="replace")
        if version != b"1.0" or mechanism != b"CURVE" or len(creds) != 1 or len(creds[0]) != 32:
            self._refuse(address_text, f"mechanism {mechanism.decode(errors='replace')} "
                                       "not allowed")
            return [b"1.0", request_id, b"400", b"CURVE required", b"", b""]
        key = z85.encode(creds[0])
        tenant = self.keys.get(key)
        if tenant is None:
            self._refuse(address_text, "unknown key", key.decode()[:12] + "...")
            return [b"1.0", request_id, b"400", b"unknown key", b"", b""]
        self.accepted += 1
        self.event("authenticated", tenant, address=address_text)
        return [b"1.0", request_id, b"200", b"OK", key, b""]
