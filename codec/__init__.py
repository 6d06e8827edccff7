"""Pure FUSE codec (sans-I/O): request encoders, reply decoders, ABI constants, types.

Modules:
    fuse_abi       constants and precompiled little-endian structs (fuse.h, 7.38)
    fuse_requests  one encoder per opcode -> FuseRequest; in-header packing
    fuse_replies   out-header parsing and validated reply decoders
    fuse_types     frozen msgspec Structs for decoded replies (reused by messages)

No I/O, no threads, no imports from other project packages.
"""

from pyvirtiofs.codec.fuse_replies import FuseProtocolError
from pyvirtiofs.codec.fuse_requests import FuseRequest

__all__ = ["FuseProtocolError", "FuseRequest"]
