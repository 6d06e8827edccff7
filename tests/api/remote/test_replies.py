"""The sending side with a fake socket: completions go out round-robin over tenants,
failures become error replies counted against their tenant, an open that completes after
its client left is not answered and its actor is stopped, and exceptions map to errnos."""

from __future__ import annotations

import errno
from typing import Any

import pykka

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.runtime import done, failed
from pyvirtiofs.api.remote import wire
from pyvirtiofs.api.remote.admission import Admission
from pyvirtiofs.api.remote.connections import Connections
from pyvirtiofs.api.remote.dispatch import Completion, Dispatcher, Pending
from pyvirtiofs.api.remote.outbound import Outbound
from pyvirtiofs.api.remote.replies import Replies, wire_error
from pyvirtiofs.api.remote.scheduler import Scheduler
from pyvirtiofs.api.remote.tenancy import Tenant


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[list[Any]] = []

    def send_multipart(self, frames: list[Any], copy: bool = True) -> None:
        self.sent.append(list(frames))

    def replies(self) -> list[tuple[bytes, wire.ReplyHeader]]:
        return [(frames[0], wire.decode_reply(frames[1])) for frames in self.sent]


class FakeActor:
    stops = 0

    def stop(self, block: bool = True) -> None:
        self.stops += 1


class Opened:
    def __init__(self) -> None:
        self.actor, self.nodeid, self.flags, self.attr = FakeActor(), 5, 0, None


class Rig:
    def __init__(self) -> None:
        self.connections = Connections()
        self.outbound: Outbound[Pending] = Outbound()
        self.admission = Admission(0.0)
        self.dispatcher = Dispatcher(self.connections, self.admission,
                                     Scheduler(0.0, pipeline_window=None,
                                               contended_bulk_rate=None),
                                     self.outbound, call_soon=lambda fn: None,
                                     poke=lambda: None, event=lambda *a, **k: None)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.replies = Replies(self.connections, self.admission, self.outbound,
                               self.dispatcher,
                               event=lambda e, t, msg, **f: self.events.append((e, f)))
        self.sock = FakeSocket()

    def complete(self, conn: Any, request_id: int, op: Any, future: Any) -> None:
        conn.tenant.stats.requests_in_flight += 1  # (as dispatching it did)
        self.dispatcher.completed(Completion(conn, request_id, op, 0, future=future))


def _tenant(name: str) -> Tenant:
    return Tenant(name, fs=None)  # type: ignore[arg-type]


def test_completions_go_out_round_robin_over_tenants() -> None:
    rig = Rig()
    a = rig.connections.add(b"a", _tenant("alice"), 0.0)
    b = rig.connections.add(b"b", _tenant("bob"), 0.0)
    for request_id in (1, 2, 3):
        rig.complete(a, request_id, m.Unlink(path=b"f"), done(None))
    rig.complete(b, 9, m.Unlink(path=b"f"), done(None))
    rig.replies.send_completed(rig.sock)  # type: ignore[arg-type]
    assert [(who, h.id) for who, h in rig.sock.replies()] == [
        (b"a", 1), (b"b", 9), (b"a", 2), (b"a", 3)]
    assert a.tenant.stats.requests_in_flight == 0 and not rig.dispatcher.done


def test_a_failure_is_an_error_reply_counted_and_reported() -> None:
    rig = Rig()
    a = rig.connections.add(b"a", _tenant("alice"), 0.0)
    rig.complete(a, 4, m.Stat(path=b"f"),
                 failed(FileNotFoundError(errno.ENOENT, "No such file", "f")))
    rig.replies.send_completed(rig.sock)  # type: ignore[arg-type]
    ((_, header),) = rig.sock.replies()
    assert header.id == 4 and header.error is not None and header.error.errno == errno.ENOENT
    assert a.tenant.stats.errors == 1
    assert rig.events == [("error", {"client": b"a".hex(), "op": "Stat", "errno": "ENOENT",
                                     "detail": "No such file"})]


def test_an_open_completing_after_its_client_left_is_not_answered() -> None:
    rig = Rig()
    a = rig.connections.add(b"a", _tenant("alice"), 0.0)
    opened = Opened()
    rig.complete(a, 6, m.Open(path=b"f", flags=0), done(opened))
    rig.connections.remove(a)
    rig.replies.send_completed(rig.sock)  # type: ignore[arg-type]
    assert rig.sock.sent == [] and opened.actor.stops == 1


def test_an_open_gets_a_handle_on_its_connection() -> None:
    rig = Rig()
    a = rig.connections.add(b"a", _tenant("alice"), 0.0)
    rig.complete(a, 6, m.Open(path=b"f", flags=0), done(Opened()))
    rig.replies.send_completed(rig.sock)  # type: ignore[arg-type]
    ((_, header),) = rig.sock.replies()
    handle = wire.decode_value(m.Open(path=b""), header.value)
    assert handle.handle in a.handles and handle.nodeid == 5
    assert a.tenant.stats.open_handles == 1


def test_exceptions_map_to_errnos() -> None:
    err = wire_error(OSError(errno.EXDEV, "Cross-device link", "a", None, "b"))
    assert (err.errno, err.strerror, err.filename, err.filename2) == (
        errno.EXDEV, "Cross-device link", b"a", b"b")
    assert wire_error(wire.WireFormatError("bad", errno.EPROTO)).errno == errno.EPROTO
    assert wire_error(pykka.ActorDeadError("gone")).errno == errno.EBADF
    unexpected = wire_error(RuntimeError("bug"))
    assert unexpected.errno == errno.EIO and "RuntimeError" in unexpected.strerror
