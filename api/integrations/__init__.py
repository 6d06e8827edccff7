"""A share under other people's interfaces: an fsspec filesystem (``fsspec_fs``, protocol
``virtiofs``) and a kernel FUSE mount (``fusemount``, ``pyvirtiofs mount``)."""
