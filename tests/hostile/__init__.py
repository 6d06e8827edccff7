"""Test doubles for hostile-device testing (never shipped, never used as a real device).

:mod:`tests.hostile.backend` is a vhost-user *backend* — the virtiofsd side of the socket —
that answers FUSE requests from a tiny in-memory tree and lets a test inject faults into
any reply, the used ring, the call eventfds or the vhost-user socket.
"""

from tests.hostile.backend import FuseIn, HandshakeFault, Plan, TreeResponder, VhostUserBackend

__all__ = ["FuseIn", "HandshakeFault", "Plan", "TreeResponder", "VhostUserBackend"]
