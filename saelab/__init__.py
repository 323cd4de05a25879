"""saelab: a workbench for sparse autoencoders on transformer activations.

Harvest activations (``saelab.harvest``) into HDF5 stores (``saelab.store``), train SAEs
on them, and analyse the features. See README.md for the command line.
"""

__version__ = "0.1.0"


class SaelabError(Exception):
    """A user-facing error: the message says what went wrong and names the fix.

    The CLI prints it on one line and exits with status 2; no stack trace.
    """


__all__ = ["SaelabError", "__version__"]
