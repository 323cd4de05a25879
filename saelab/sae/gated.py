"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders").

One encoder matrix W_enc (the paper's W_gate) serves two paths: the gate decides which latents
fire, the magnitude path how strongly, with W_mag = exp(r_mag) ⊙ W_gate (one scale per latent):

    π_gate = (x − b_dec) W_enc + b_gate        π_mag = exp(r_mag) ⊙ (x − b_dec) W_enc + b_mag
    f = 1[π_gate > 0] ⊙ ReLU(π_mag)            x̂ = f W_dec + b_dec

Loss, the paper's: ‖x − x̂‖² + λ‖ReLU(π_gate)‖₁ + ‖x − x̂_frozen(ReLU(π_gate))‖², where x̂_frozen
decodes with W_dec and b_dec detached. The indicator passes no gradient, so the reconstruction
trains the magnitudes (W_enc through r_mag, b_mag) and the decoder; the L1 and the auxiliary
reconstruction train the gate (W_enc, b_gate) without moving the decoder. Decoder rows have unit
norm (the base's constraint), so the L1 needs no decoder-norm weight.

λ is fixed by ``--l1-coeff`` or, by default, adapted after each step so that the mean L0 reaches
``--k`` (the SparsityController relu uses: architectures compare at equal L0), warmed up over the
first ``--sparsity-warmup`` of the steps.

b_gate is the base's b_enc (``pre_acts`` gives π_gate; ``activation`` derives π_mag from it), saved
under SAELens's name ``b_gate`` (its gated SAE has no b_enc) next to r_mag and b_mag: SAELens loads
the folder as "gated", and saelab loads SAELens's gated folders.

Training runs sparse (``SAE.sparse_codes``) whenever few enough gates open: every term reads the entries π_gate > 0
alone (the codes, ReLU(π_gate) for the L1 and the frozen reconstruction), decoded and differentiated through them;
the dense path (``--kernel reference``, and steps where too many gates open) is the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from saelab.sae.base import SAE, mse
from saelab.sae.control import SparsityController


class GatedSAE(SAE):
    arch = "gated"
    saelens_arch = "gated"
    file_names = {"b_enc": "b_gate"}
    latent_weights = ("r_mag", "b_mag")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae))  # W_mag = W_gate at the start
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae))
        self.control = SparsityController(cfg.l1_coeff, init=0.1, target=cfg.k)

    def activation(self, z, grads=None):
        """Codes from π_gate = z: π_mag = exp(r_mag) ⊙ (z − b_gate) + b_mag shares z's product with W_enc
        (its gradient reaches W_enc and not b_gate)."""
        mag = self.r_mag.exp() * (z - self.b_enc) + self.b_mag
        return (z > 0).to(z.dtype) * F.relu(mag)

    def loss(self, x, step=0, grads=None):
        coeff = self.control.coeff * self.sparsity_warmup(step)
        c = self.sparse_codes(x, 0.0)
        if c is not None:  # the open gates: z = π_gate > 0 at each entry, so the indicator is 1 on all of them
            z, j = c.values, c.cols
            f = c.with_values(F.relu(self.r_mag.exp()[j] * (z - self.b_enc[j]) + self.b_mag[j]))
            x_hat = f.decode(self.W_dec, self.b_dec)
            x_frozen = c.decode(self.W_dec.detach(), self.b_dec.detach())
            return self._out(f, x_hat, mse=mse(x, x_hat), l1=coeff * z.sum() / c.n_rows, aux=mse(x, x_frozen))
        z = self.pre_acts(x)
        f = self.activation(z)
        x_hat = self.decode(f)
        gate = F.relu(z)
        x_frozen = gate @ self.W_dec.detach() + self.b_dec.detach()
        return self._out(f, x_hat, mse=mse(x, x_hat), l1=coeff * gate.sum(-1).mean(), aux=mse(x, x_frozen))

    def extra_weights(self):
        return {"r_mag": self.r_mag, "b_mag": self.b_mag}

    def load_extra_weights(self, w):
        with torch.no_grad():  # from_weights checked that both are there, shaped [d_sae]
            self.r_mag.copy_(w["r_mag"].float())
            self.b_mag.copy_(w["b_mag"].float())
