"""Small ReLU SAEs, one per attention head, as one batched model, and their training.

``HeadSAEs`` holds G independent SAEs with a leading head dimension on every weight; their loss is the
sum of the per-head losses, so every head's SAE gets exactly the gradients it would get alone.
``train_head_saes`` writes those gradients out by hand (``_fit_fused``: no autograd; each bias an extra
row of its weight matrix, so the products also give the bias gradients; one flat buffer that torch's
fused Adam kernel updates); ``train_head_saes_reference`` is the plain loop of separate autograd
trainings, and ``tests/test_heads.py`` compares the two.
"""

from __future__ import annotations

import math

import torch

from saelab.device import one_thread

# per-head SAE defaults: with them the tiny model's induction heads lead the code ranking on the induction task
# (tests/test_heads.py), and 10 full-batch steps keep the training a fraction of one forward pass
D_SAE, L1, STEPS, LR = 32, 0.1, 10, 1e-1
_FUSED_ADAM = getattr(torch, "_fused_adam_", None)  # torch's fused Adam kernel (CPU since torch 2.4)


class HeadSAEs(torch.nn.Module):
    """G independent ReLU SAEs, one per head, as batched weights.

    ``W_enc`` [G, d_in, d_sae], ``b_enc`` [G, d_sae], ``W_dec`` [G, d_sae, d_in] (unit-norm rows),
    ``b_dec`` [G, d_in]; ``scale`` [G] multiplies inputs first (mean ‖x‖ = √d_in per head).
    ``encode(x [G, N, d_in]) -> [G, N, d_sae]``.
    """

    def __init__(self, n_groups: int, d_in: int, d_sae: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n_groups, d_sae, d_in, generator=g)
        w = w / w.norm(dim=-1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.transpose(1, 2).clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(n_groups, d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(n_groups, d_in))
        self.register_buffer("scale", torch.ones(n_groups))

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[-1]

    def select(self, g: int) -> "HeadSAEs":
        """A one-head copy of head g's SAE (same weights)."""
        one = HeadSAEs(1, self.W_enc.shape[1], self.d_sae)
        with torch.no_grad():
            for name, t in list(self.named_parameters()) + list(self.named_buffers()):
                getattr(one, name).copy_(t[g : g + 1])
        return one

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale[:, None, None]
        return torch.relu(torch.baddbmm(self.b_enc[:, None], x - self.b_dec[:, None], self.W_enc))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.b_dec[:, None], f, self.W_dec)

    def losses(self, x: torch.Tensor, l1: float) -> torch.Tensor:
        """Per-head loss [G]: mean squared error per element + l1 × mean over rows of ‖f‖₁ (in scaled units)."""
        f = self.encode(x)
        err = self.decode(f) - x * self.scale[:, None, None]
        return err.pow(2).mean((1, 2)) + l1 * f.sum(-1).mean(-1)

    @torch.no_grad()
    def normalise_decoder(self):
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))


def _init_scale(sae: HeadSAEs, x: torch.Tensor) -> torch.Tensor:
    """Set the per-head input scale (mean ‖x‖ = √d_in) and b_dec (the scaled mean); returns the scaled x."""
    with torch.no_grad():
        norms = x.norm(dim=-1).mean(-1).clamp_min(1e-8)  # [G]
        sae.scale.copy_(x.shape[-1] ** 0.5 / norms)
        xs = x * sae.scale[:, None, None]
        sae.b_dec.copy_(xs.mean(1))
    return xs


def _fit(sae: HeadSAEs, x: torch.Tensor, l1: float, steps: int, lr: float) -> HeadSAEs:
    """The plain reference training: autograd on ``sae.losses`` and torch.optim.Adam."""
    _init_scale(sae, x)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    with torch.enable_grad(), one_thread():
        for _ in range(steps):
            loss = sae.losses(x, l1).sum()  # heads are independent: the sum keeps their gradients apart
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sae.normalise_decoder()
    return sae.eval()


@torch.no_grad()
def _fit_fused(sae: HeadSAEs, x: torch.Tensor, l1: float, steps: int, lr: float,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> HeadSAEs:
    """The same training as ``_fit`` (same loss, Adam with torch's defaults, decoder rows renormalised
    after each step) with the gradients written out by hand.

    Biases ride along as an extra row of their weight matrix (``[W_enc; b_enc]`` times ``[xc, 1]``,
    ``[W_dec; b_dec]`` times ``[f, 1]``), so the products also give the bias gradients; both augmented
    matrices lie in one flat buffer that one fused Adam call updates. Every intermediate has a buffer
    allocated once and every transposed view is made once: 11 ops per step besides Adam and the decoder
    renormalisation, no autograd graph, no optimizer object. The results agree with ``_fit`` to float32
    rounding; ``test_heads.py`` compares the two."""
    G, N, d = x.shape
    s = sae.d_sae
    xs = _init_scale(sae, x)
    n_enc = G * (d + 1) * s
    flat = torch.cat([torch.cat([sae.W_enc, sae.b_enc[:, None]], 1).reshape(-1),
                      torch.cat([sae.W_dec, sae.b_dec[:, None]], 1).reshape(-1)])
    grad, m, v = torch.zeros_like(flat), torch.zeros_like(flat), torch.zeros_like(flat)
    enc, dec = flat[:n_enc].view(G, d + 1, s), flat[n_enc:].view(G, s + 1, d)  # [W_enc; b_enc], [W_dec; b_dec]
    g_enc, g_dec = grad[:n_enc].view(G, d + 1, s), grad[n_enc:].view(G, s + 1, d)
    W_enc, W_dec, b_dec = enc[:, :d], dec[:, :s], dec[:, s:]
    xc1, f1 = x.new_ones(G, N, d + 1), x.new_ones(G, N, s + 1)  # [xs − b_dec, 1], [f, 1]
    xc, f = xc1[..., :d], f1[..., :s]
    pre, act, e, df = (x.new_empty(G, N, k) for k in (s, s, d, s))
    l1_grad = x.new_full((G, N, s), l1 / N)  # d(l1 · mean_n Σf)/d f
    c_err = 2.0 / (N * d)  # d(mean squared error)/d err
    xc1_t, f1_t, W_dec_t = xc1.transpose(1, 2), f1.transpose(1, 2), W_dec.transpose(1, 2)
    # b_dec's gradient also has the encoder's part, −(Σ_n df) W_encᵀ: a product with all of [W_enc; b_enc]ᵀ
    # (its last column is not used), as baddbmm_ into g_dec's strided row would fall back to a per-head loop
    g_b_enc, g_b_dec, enc_t, corr = g_enc[:, d:], g_dec[:, s:], enc.transpose(1, 2), x.new_empty(G, 1, d + 1)
    corr_d = corr[..., :d]
    b1, b2 = betas
    step_counts = torch.arange(1.0, steps + 1, device=x.device).unbind()  # fused Adam reads its step from a tensor
    with one_thread():
        for t in range(steps):
            torch.sub(xs, b_dec, out=xc)
            torch.bmm(xc1, enc, out=pre)
            torch.clamp_min(pre, 0, out=f)
            torch.sign(f, out=act)  # ReLU's derivative: 1 where pre > 0, else 0
            torch.baddbmm(xs, f1, dec, beta=-c_err, alpha=c_err, out=e)  # (f W_dec + b_dec − xs) · c_err
            torch.bmm(f1_t, e, out=g_dec)  # [f^T e; Σ_n e]
            torch.baddbmm(l1_grad, e, W_dec_t, out=df).mul_(act)
            torch.bmm(xc1_t, df, out=g_enc)  # [xc^T df; Σ_n df]
            torch.bmm(g_b_enc, enc_t, out=corr)
            g_b_dec.sub_(corr_d)
            _adam_step(flat, grad, m, v, step_counts[t], lr, b1, b2, eps)
            W_dec.div_(torch.linalg.vector_norm(W_dec, dim=-1, keepdim=True).clamp_min_(1e-8))
    for p, val in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), (W_enc, enc[:, d], W_dec, dec[:, s])):
        p.copy_(val)
    return sae.eval()


def _adam_step(param, grad, m, v, step, lr, b1, b2, eps):
    """One Adam update (torch's defaults, no weight decay) of a flat parameter buffer in place; ``step``: a
    0-d float tensor holding the 1-based step. torch's fused CPU kernel (what ``Adam(fused=True)`` runs, without
    the optimizer's bookkeeping: one op for the six below) when this torch has it, else the same formula in ops."""
    if _FUSED_ADAM is not None:
        _FUSED_ADAM([param], [grad], [m], [v], [], [step], lr=lr, beta1=b1, beta2=b2, weight_decay=0.0, eps=eps,
                    amsgrad=False, maximize=False)
        return
    t = float(step)
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    param.addcdiv_(m, v.sqrt().div_(math.sqrt(1 - b2**t)).add_(eps), value=-lr / (1 - b1**t))


def train_head_saes(x: torch.Tensor, d_sae: int = D_SAE, l1: float = L1, steps: int = STEPS, lr: float = LR,
                    seed: int = 0) -> HeadSAEs:
    """Train one SAE per head on x [G, N, d_in], all heads in one batched model (hand-written gradients)."""
    return _fit_fused(HeadSAEs(x.shape[0], x.shape[-1], d_sae, seed), x, l1, steps, lr)


def train_head_saes_reference(x: torch.Tensor, d_sae: int = D_SAE, l1: float = L1, steps: int = STEPS,
                              lr: float = LR, seed: int = 0) -> list[HeadSAEs]:
    """The plain reference: G separate one-head trainings from the same initial weights."""
    init = HeadSAEs(x.shape[0], x.shape[-1], d_sae, seed)
    return [_fit(init.select(g), x[g : g + 1], l1, steps, lr) for g in range(x.shape[0])]
