"""SAE architectures: one file each over ``base.SAE``; importing this package registers them."""

from saelab.sae import abstopk, batchtopk, gated, gradient, jumprelu, matryoshka, relu, topk  # noqa: F401  (register)
from saelab.sae.base import SAE

__all__ = ["SAE"]
