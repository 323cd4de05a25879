"""Decoder geometry: how SAE latents relate through their decoder rows.

Cosine matching between two sets of decoder directions (``best_matches``, ``decoder_matches``), a latent's
nearest neighbours within its own SAE (``neighbours``), and, for SAEs on ``attn.hook_z``, each head's share of a
decoder row (``head_shares``). Every product runs in chunks of rows sized by a budget of cosines, so the
temporary stays bounded whatever the widths.
"""

from __future__ import annotations

import math

import torch

N_NEIGHBOURS = 10  # nearest latents kept per latent in features.h5


def unit_rows(W: torch.Tensor) -> torch.Tensor:
    """The rows of ``W`` (decoder directions) scaled to unit norm, in float32 (all-zero rows stay zero)."""
    W = W.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def best_matches(A: torch.Tensor, B: torch.Tensor, k: int = 1, budget: int = 1 << 25, signed: bool = False,
                 exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, cosines) [len(A), k]: for every row of ``A`` the ``k`` rows of ``B`` of highest cosine, best first
    (rows unit-normed here). ``signed``: rank by |cosine| and report it (a signed SAE's latent is the same
    feature read with either sign of its direction). ``exclude_self``: A is B, and a row is not its own match.
    Rows of A go in chunks of ``budget // len(B)`` (at least 1), so one chunk's [rows, len(B)] cosines stay within
    128 MiB at the default whatever the widths."""
    An, Bn = unit_rows(A), unit_rows(B)
    nb = Bn.shape[0]
    k = min(k, nb - int(exclude_self))
    chunk = max(1, budget // nb)
    ids, cos = [], []
    for c0 in range(0, An.shape[0], chunk):
        S = An[c0 : c0 + chunk] @ Bn.T
        if signed:
            S.abs_()
        if exclude_self:
            n = S.shape[0]
            S[torch.arange(n), torch.arange(c0, c0 + n)] = -math.inf
        v, i = S.topk(k, dim=1)
        ids.append(i)
        cos.append(v)
    return torch.cat(ids), torch.cat(cos)


def either_signed(a, b) -> bool:
    """Whether either SAE reads its features with both signs (AbsTopK): their latents then match by |cosine|."""
    return bool(getattr(a, "signed", False) or getattr(b, "signed", False))


def decoder_matches(a, b, k: int = 1, latents=None, budget: int = 1 << 25,
                    device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, cosines) [n, k], on the CPU: for each latent of SAE ``a`` (all, or the ids ``latents``) the ``k``
    latents of SAE ``b`` whose decoder rows are closest (``best_matches``; by |cosine| when either is signed).
    ``device``: where the products run (default: where the decoders are)."""
    Wa, Wb = a.W_dec.detach(), b.W_dec.detach()
    if latents is not None:
        Wa = Wa[latents]
    if device is not None:
        Wa, Wb = Wa.to(device), Wb.to(device)
    ids, cos = best_matches(Wa, Wb, k, budget, signed=either_signed(a, b))
    return ids.cpu(), cos.cpu()


def neighbours(W_dec: torch.Tensor, k: int = N_NEIGHBOURS, budget: int = 1 << 25):
    """(ids, cosines) [d_sae, k] of the nearest other latents by decoder cosine (``best_matches`` of the
    decoder with itself, in chunks: within 128 MiB of cosines at the default, however many latents)."""
    return best_matches(W_dec, W_dec, k, budget, exclude_self=True)


def head_shares(W_dec: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[d_sae, n_heads]: each head's share of every decoder row's squared norm, for an SAE on
    ``attn.hook_z`` with the heads flattened head-major (as harvest stores them). A latent whose
    row lives in one head's slice has share 1 there: the head it reads from and writes through."""
    sq = W_dec.detach().float().reshape(W_dec.shape[0], n_heads, -1).pow(2).sum(-1)
    return sq / sq.sum(-1, keepdim=True).clamp_min(1e-30)
