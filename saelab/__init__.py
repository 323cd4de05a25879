"""saelab: a workbench for sparse autoencoders on transformer activations.

Harvest activations (``saelab.harvest``) into HDF5 stores (``saelab.store``), train SAEs
on them, and analyse the features. The documentation site (docs/) has the command line.
"""

__version__ = "0.1.0"

from saelab.errors import SaelabError, first_line

# the main Python entry points, imported on first use (``import saelab`` and the CLI stay light: no torch); SAE
# comes through saelab.hub, which lets SAE.load read hf:// specs
_LAZY = {"SAE": "saelab.hub", "ActivationStore": "saelab.store", "FeatureDB": "saelab.analysis.features.db",
         "load_model": "saelab.models", "load_sae": "saelab.targets"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'saelab' has no attribute {name!r}")


__all__ = ["SaelabError", "__version__", "first_line", *_LAZY]
