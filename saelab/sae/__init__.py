"""SAE architectures: one file each over ``base.SAE``; importing this package registers them."""

from saelab.sae import (  # noqa: F401  (register)
    abstopk,
    batchtopk,
    clt,
    gated,
    gradient,
    jumprelu,
    matryoshka,
    relu,
    topk,
    transcoder,
)
from saelab.sae.base import SAE

__all__ = ["SAE"]
