"""``python -m pyvirtiofs``: the same as the ``pyvirtiofs`` command."""

import sys

from pyvirtiofs.api.cli import main

sys.exit(main())
