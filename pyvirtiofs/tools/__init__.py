"""Tools that measure the product, outside its import graph: ``pyvirtiofs bench`` and
``pyvirtiofs soak`` load these modules only when they run."""
