"""Pretrained SAEs from the Hugging Face hub: the only package that reaches the network.

- ``download``: hub specs (``ORG/REPO/SUBFOLDER``, ``hf://…``), listing, downloading into the hub's cache, reading
  an SAE in any layout saelab reads (``load_hub_sae``);
- ``fetch``: ``fetch_sae`` / ``fetch_group``, which write ordinary SAE (group) folders.

Importing it registers ``load_hub_sae`` as ``SAE.load``'s loader of ``hf://`` specs (the SAE reads local files
only; ``saelab.load_sae`` and ``from saelab import SAE`` import this package).
"""

from saelab.hub.download import default_out, list_hub_saes, load_hub_sae, local_folder, parse_spec
from saelab.hub.fetch import fetch_group, fetch_sae
from saelab.layout import HUB_PREFIX
from saelab.sae import SAE

SAE.remote_loaders[HUB_PREFIX] = load_hub_sae

__all__ = ["default_out", "fetch_group", "fetch_sae", "list_hub_saes", "load_hub_sae", "local_folder", "parse_spec"]
