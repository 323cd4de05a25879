"""saelab: a workbench for sparse autoencoders on transformer activations.

Harvest activations (``saelab.harvest``) into HDF5 stores (``saelab.store``), train SAEs
on them, and analyse the features. See README.md for the command line.
"""

__version__ = "0.1.0"


class SaelabError(Exception):
    """A user-facing error: the message says what went wrong and names the fix.

    The CLI prints it on one line and exits with status 2; no stack trace.
    """


# the main Python entry points, imported on first use (``import saelab`` and the CLI stay light: no torch)
_LAZY = {"SAE": "saelab.sae", "ActivationStore": "saelab.store", "FeatureDB": "saelab.analysis.features",
         "load_model": "saelab.models"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'saelab' has no attribute {name!r}")


__all__ = ["SaelabError", "__version__", *_LAZY]
