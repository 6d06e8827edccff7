"""Remote access over ZeroMQ: the same os-style API in another process or machine.

Modules:
    wire     the wire format (msgspec messages, bulk data in separate frames), pure
    server   :class:`ShareServer`: one ROUTER socket in front of a share's actors
    client   :class:`RemoteFS` and :func:`connect_remote`
    keys     CURVE key pairs (``pyvirtiofs keygen``)
    process  malloc settings for long-running servers
"""
