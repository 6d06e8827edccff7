"""Replies on their way out, and the connections that do not read them.

A reply is handed to ZeroMQ without a copy; a big one (:data:`TRACK_BYTES` or more) is
tracked (``MessageTracker``) and its bytes stay charged to the tenant until ZeroMQ is done
with it (sent, or dropped), so a client that does not read its replies keeps them charged
to its tenant. Small replies go untracked and are charged with the next tracked one of
their connection (ZeroMQ writes a connection's messages in order), at most
:data:`UNTRACKED_BYTES` of them at a time.

A connection whose unsent replies exceed its limit (:data:`CONNECTION_UNSENT_LIMIT`) is not
served further: its requests are deferred here, charged, until its replies have left.

Plain books, no sockets: the server thread sends, and tells this what it sent.
"""

from __future__ import annotations

import collections
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

CONNECTION_UNSENT_LIMIT = 16 << 20  # a connection's unsent reply bytes before it waits
TRACK_BYTES = 16 << 10  # replies this big are tracked until they have left
UNTRACKED_BYTES = 64 << 10  # small replies between two tracked ones, per connection


class Tracker(Protocol):
    """What ZeroMQ's ``MessageTracker`` tells: whether it is done with a message."""

    @property
    def done(self) -> bool: ...


R = TypeVar("R")


@dataclass(eq=False)
class _Unsent:
    """Replies to one connection that ZeroMQ still holds: (tracker, bytes) in send order."""

    tenant: Any
    entries: collections.deque[tuple[Tracker, int]] = field(
        default_factory=collections.deque)
    untracked: int = 0
    total: int = 0


class Outbound(Generic[R]):
    """Each connection's unsent replies, and the requests deferred behind them.

    ``copies``: copies of a reply held until it has left (2 on an encrypted connection:
    ZeroMQ holds an encrypted copy besides ours). ``unsent_limit``: a connection's unsent
    bytes beyond which its requests are deferred."""

    def __init__(self, *, copies: int = 1,
                 unsent_limit: int = CONNECTION_UNSENT_LIMIT) -> None:
        self.copies = copies
        self.unsent_limit = unsent_limit
        self.tracked = 0  # replies tracked until they have left, over all connections
        self._unsent: dict[bytes, _Unsent] = {}
        self._tracking: set[bytes] = set()  # connections with tracked replies not yet gone
        self._deferred: dict[bytes, collections.deque[R]] = {}

    # -- replies ------------------------------------------------------------------------------

    def must_track(self, identity: bytes, size: int) -> bool:
        """Whether a reply of ``size`` bytes to ``identity`` is to be tracked."""
        out = self._unsent.get(identity)
        return size >= TRACK_BYTES or (out is not None
                                       and out.untracked + size > UNTRACKED_BYTES)

    def sent_untracked(self, identity: bytes, tenant: Any, size: int) -> None:
        """A reply went out untracked (``tenant`` None: not a tenant's connection)."""
        out = self._unsent.get(identity)
        if out is not None:
            out.untracked += size
        elif tenant is not None:
            self._unsent[identity] = _Unsent(tenant, untracked=size)

    def sent_tracked(self, identity: bytes, tenant: Any, tracker: Tracker, size: int) -> int:
        """A reply went out tracked by ``tracker``: the bytes to charge to ``tenant`` until
        :meth:`reap` gives them back."""
        out = self._unsent.get(identity)
        if out is None:
            out = self._unsent[identity] = _Unsent(tenant)
        charged = size * self.copies + out.untracked  # (small ones before it leave first)
        out.untracked = 0
        out.entries.append((tracker, charged))
        out.total += charged
        self.tracked += 1
        self._tracking.add(identity)
        return charged

    def reap(self, connected: Container[bytes]) -> list[tuple[Any, int]]:
        """(tenant, bytes) of the replies ZeroMQ has finished with, to uncharge.
        ``connected``: the identities of the connections still served."""
        left: list[tuple[Any, int]] = []
        for identity in list(self._tracking):
            out = self._unsent.get(identity)
            if out is None:
                self._tracking.discard(identity)
                continue
            entries = out.entries
            while entries and entries[0][0].done:
                _, charged = entries.popleft()
                out.total -= charged
                self.tracked -= 1
                left.append((out.tenant, charged))
            if not entries:
                self._tracking.discard(identity)
                if out.untracked == 0 or identity not in connected:
                    del self._unsent[identity]
        return left

    def forget_idle(self) -> None:
        """Forget connections with no tracked reply (their small replies have long left)."""
        for identity, out in list(self._unsent.items()):
            if not out.entries:
                del self._unsent[identity]

    def unsent(self, identity: bytes) -> int:
        """The bytes of a connection's replies that have not left yet."""
        out = self._unsent.get(identity)
        return out.total if out is not None else 0

    def backed_up(self, identity: bytes) -> bool:
        """Whether a connection's replies are piling up unsent (it is not reading)."""
        return self.unsent(identity) > self.unsent_limit

    # -- requests deferred behind them ------------------------------------------------------

    def must_wait(self, identity: bytes) -> bool:
        """Whether a new request of the connection is to be deferred (its replies are not
        leaving, or earlier requests of it are deferred already)."""
        return identity in self._deferred or self.backed_up(identity)

    def defer(self, identity: bytes, request: R) -> None:
        self._deferred.setdefault(identity, collections.deque()).append(request)

    def deferred(self, identity: bytes) -> int:
        """How many requests of the connection are deferred."""
        waiting = self._deferred.get(identity)
        return len(waiting) if waiting is not None else 0

    def any_deferred(self) -> bool:
        return bool(self._deferred)

    def undefer(self) -> list[R]:
        """The deferred requests of the connections whose replies have left, in order."""
        ready: list[R] = []
        for identity in list(self._deferred):
            if not self.backed_up(identity):
                ready += self._deferred.pop(identity)
        return ready

    def drop(self, identity: bytes) -> list[R]:
        """The deferred requests of a connection that is gone (they will not run). Its
        replies stay charged until ZeroMQ is done with them."""
        return list(self._deferred.pop(identity, ()))
