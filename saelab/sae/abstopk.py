"""AbsTopK SAE: keep the k largest |z| with their signs, no ReLU — one latent can carry both
directions of a concept (a bidirectional feature), where TopK needs one latent per sign."""

from __future__ import annotations

from saelab.sae.topk import TopKSAE


class AbsTopKSAE(TopKSAE):
    arch = "abstopk"
    saelens_arch = "abstopk"
    signed = True
