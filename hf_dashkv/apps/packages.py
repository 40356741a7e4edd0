"""Data that ships inside registry packages (models, text): where an installed package's files are.

Such packages are installed for their files, not imported (importing some fails without dependencies they do
not need), so their folder is found from the import system's spec alone.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(import_name: str, pip_args: str) -> Path:
    """The folder of the installed package ``import_name``, or a FileNotFoundError that says
    ``pip install {pip_args}`` (or ``scripts/install.sh``) brings it."""
    found = importlib.util.find_spec(import_name)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"this data comes from the registry package {import_name!r}, which is not installed: run "
            f"`pip install {pip_args}` (or scripts/install.sh)."
        )
    return Path(found.submodule_search_locations[0])
