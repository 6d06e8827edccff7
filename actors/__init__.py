"""The actors, and the plain rules each one is built around.

Modules:
    device     the device actor: sole owner of the transport and its queues
    channel    the FUSE exchange over the queues (unique, headers, validated replies)
    session    the session actor: INIT, mount points, path walking, lookups, FORGET
    handles    one actor per open file or directory (RELEASE exactly once)
    published  attributes the session publishes for lock-free warm stats
    messages   the messages actors exchange (msgspec Structs)
    doorbell   an eventfd that wakes a polling thread (actor inboxes, ZeroMQ I/O threads)
"""
