"""The test suite; its folders mirror the package's layers."""

from pathlib import Path

#: The repository's root: the working directory of the commands the tests run.
REPO = Path(__file__).resolve().parent.parent
