"""SAE architectures: one file each over ``base.SAE``; importing this package registers them."""

from saelab.sae import (  # noqa: F401  (register)
    abstopk,
    archetypal,
    batchtopk,
    choice,
    clt,
    gated,
    gradient,
    jumprelu,
    matryoshka,
    mp,
    panneal,
    relu,
    topk,
    transcoder,
)
from saelab.sae.base import SAE

__all__ = ["SAE"]
