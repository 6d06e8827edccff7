"""The ``pyvirtiofs`` command line.

Modules:
    main      the parser and ``main()`` (the console script's entry point)
    share     opening the SHARE a command names: folder, endpoint or device
    browse    ls, cat, stat, tree
    copying   get, put, cp: copies as cp -a
    changes   mkdir, rm, mv
    serving   serve, demo
"""

from pyvirtiofs.api.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
