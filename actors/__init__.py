"""The actors, and the plain rules each one is built around.

Modules:
    device     the device actor: sole owner of the transport and its queues
    channel    the FUSE exchange over the queues (unique, headers, validated replies)
    session    the session actor: INIT, mount points, its life cycle and dispatch
    session_core  the session's state and shared steps (walks, lookups, permission checks)
    attributes / namespace / opening  the session's operations, by kind
    nodes, walk, permissions  the plain rules the session is built around
    handles    one actor per open file or directory (RELEASE exactly once)
    published  attributes the session publishes for lock-free warm stats
    messages   the messages actors exchange (msgspec Structs)
    doorbell   an eventfd that wakes a polling thread (actor inboxes, ZeroMQ I/O threads)
"""
