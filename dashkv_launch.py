"""The console commands ``dashkv`` and ``lightning``: set the process up, then import the package.

OpenMP reads ``OMP_WAIT_POLICY`` once, when PyTorch is imported, and ``import hf_dashkv`` imports PyTorch, so
the setting has to come before any import of the package: with the default (active waiting) pool every parallel
op on these small CPUs stalls ~8 ms, and a 0.2 ms matmul takes ~16 ms. A user's own setting is kept.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def dashkv() -> int:
    from hf_dashkv.apps.cli import main

    return main()


def lightning() -> None:
    from hf_dashkv.apps.lightning_cli import main

    main()
