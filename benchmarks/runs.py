"""What the benchmarks that drive the CLI share: ``saelab`` run as a user runs it (a subprocess, offline, at a set
number of torch threads, its progress bars off), and the planted-feature store they train on (``saelab synthetic``:
d 64, 256 features, ~5 active, coefficients uniform in [0.5, 1.5])."""

import os
import pathlib
import subprocess
import sys

#: the planted store's description, as the result files state it
PLANTED = "`saelab synthetic --d 64 --n-true 256 --active 5`, 262,144 rows"


def saelab_cli(threads: int):
    """A function running ``saelab ARGS --quiet`` in a subprocess (an error stops the benchmark)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}

    def saelab(*argv):
        subprocess.run([sys.executable, "-m", "saelab", *map(str, argv), "--quiet"], check=True, env=env,
                       stdout=subprocess.DEVNULL)

    return saelab


def planted_store(saelab, root: pathlib.Path) -> pathlib.Path:
    """The planted-feature store, written under ``root``."""
    store = root / "planted"
    saelab("synthetic", "--out", store, "--d", 64, "--n-true", 256, "--active", 5, "--rows", 262144)
    return store
