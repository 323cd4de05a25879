"""saelab: a workbench for sparse autoencoders on transformer activations.

Harvest activations (``saelab.harvest``) into HDF5 stores (``saelab.store``), train SAEs
on them, and analyse the features. See README.md for the command line.
"""

__version__ = "0.1.0"


class SaelabError(Exception):
    """A user-facing error: the message says what went wrong and names the fix.

    The CLI prints it on one line and exits with status 2; no stack trace.
    """


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), for a one-line error that
    quotes a library's own (safetensors, torch, wandb, transformers); at most ``limit`` characters."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if limit is None else line[:limit]


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


__all__ = ["SaelabError", "__version__", "first_line", *_LAZY]
