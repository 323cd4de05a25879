"""Discrete-code head identification, and the ablation sweep it is checked against.

The method of O'Neill & Bui, "Sparse Autoencoders Enable Scalable and Reliable Circuit
Identification in Language Models" (2024), at the head level:

1. One forward pass over ``n`` positive prompts (a task's clean prompts: the behaviour is
   there) and ``n`` negative ones (its corrupted prompts: the behaviour cannot happen) records
   every head's output ``blocks.L.attn.hook_z[:, pos, head]`` (d_head numbers). ``position``:
   ``"last"`` (the position whose next token the task scores; default) or ``"mean"`` (the mean
   over the non-BOS positions, what the paper's code stores for its datasets).
2. A small ReLU SAE per head (``d_sae`` latents, L1 penalty, unit-norm decoder rows) is trained
   full-batch with Adam on those 2n vectors. All heads train at once: a batched SAE whose
   weights carry a leading head dimension (``HeadSAEs``); its loss is the sum of the per-head
   losses, so every head's SAE gets exactly the gradients it would get alone. ``_fit_fused``
   writes those gradients out by hand (no autograd; each bias an extra row of its weight matrix, so
   the products also give the bias gradients; one flat buffer that torch's fused Adam kernel
   updates); ``train_head_saes_reference`` is the plain loop of separate autograd trainings, and a
   test compares the two.
3. Each example's SAE code is discretised to one integer: the index of its largest latent (the
   paper's argmax), or ``d_sae`` when no latent fires.
4. Per head, the codes seen on positives but never on negatives are counted; heads are ranked by
   that count, ties broken by the count divided by the number of distinct codes seen at all (the
   paper's two variants, ``normalise=False/True``). A head whose output takes states on the task
   that it never takes without it is flagged, with no ablation at all.

Where this follows the paper's code and where not: the paper trains one SAE shared by all heads on
their per-head residual contributions (``hook_z @ W_O``, d_model wide) averaged over positions, 200
latents, L1 0.02-0.05, 500 full-batch epochs on 10 examples, then codes all 500 examples. Here, as
the issue asks, each head has its own SAE on its ``hook_z`` (d_head wide), trained and scored on the
same 2n examples; the codes read the last position by default, because with the mean over positions
every head of the tiny model gets nearly the maximal count on the induction task (token identity
dominates the mean), while the last position separates the induction heads cleanly.

What the method cannot see: a head that is necessary but behaves the same on positives and negatives.
On the induction task the corrupted prompt replaces the earlier copy's tokens; layer 0's
previous-token head does the same thing on any tokens, so none of its codes is unique to positives,
although ablating it at every position hurts the task most (the induction heads' keys read it).

``ablation_ranking`` is the baseline: mean-ablate (or zero-ablate) one head's ``hook_z`` at every
position (or only the last) of the clean prompts and measure the drop of the mean logit difference;
one forward per head. ``compare`` gives precision/recall of the identification's top-N against the
heads the ablation marks as important. Both rankings carry their wall-clock time (``timed_rankings``
alternates the two and keeps the medians): the sweep costs 1 + n_layers·n_heads full forwards of n
prompts, identification one forward of 2n prompts stopped after the deepest ``hook_z`` plus ~1.5-3 ms of
SAE training and scoring, so the ratio is bounded below by that one forward's share — on the tiny model
(8 heads) 0.060 in multiply-adds, 0.07-0.09 measured on a less busy machine and 0.09-0.12 with a CI run
sharing this 2-core CPU, where the whole identification measures 0.09-0.13: at the floor, not reliably
under 1/10 (README "Head identification")."""

from __future__ import annotations

import json
import math
import pathlib
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.device import device_of, one_thread
from saelab.errors import SaelabError
from saelab.hooks import forward
from saelab.analysis.tasks import as_task, logit_diff

HOOK = "blocks.{layer}.attn.hook_z"
POSITIONS = ("last", "mean")
# per-head SAE defaults: on the induction task the top 4 are the 4 induction heads, 5-13 codes ahead of the 5th,
# for every task seed 0-4 at n = 8 and 16 with 5-50 full-batch Adam steps at lr 3e-2 or 1e-1; 10 steps at 1e-1
# cost ~1.5 ms (the fused trainer, setup included; ~3 ms right after the ablation sweep on a loaded 2-core CPU), a
# fraction of one forward pass (README "Head identification")
D_SAE, L1, STEPS, LR = 32, 0.1, 10, 1e-1
_FUSED_ADAM = getattr(torch, "_fused_adam_", None)  # torch's fused Adam kernel (CPU since torch 2.4)


class HeadRanking(list):
    """``[(layer, head, score)]``, best first, plus what produced it.

    ``method`` ("codes" or "ablation"), ``seconds`` (wall clock of the whole method on these
    examples, model loading and task building excluded), ``scores`` [n_layers, n_heads] (numpy),
    ``n_examples``, ``info`` (method-specific numbers: per-stage times, code counts, …).
    """

    def __init__(self, items, *, method: str, seconds: float, scores: np.ndarray, n_examples: int,
                 info: dict | None = None):
        super().__init__(items)
        self.method, self.seconds, self.scores = method, seconds, scores
        self.n_examples, self.info = n_examples, info or {}

    def heads(self, top: int | None = None) -> list[tuple[int, int]]:
        return [(layer, head) for layer, head, _ in self[:top]]

    def rank_of(self, layer: int, head: int) -> int:
        """1-based rank of a head by score, ties sharing the best rank (1 + heads with a higher score):
        the code counts are integers up to n, so several heads can tie."""
        score = self._score(layer, head)
        return 1 + sum(s > score for _, _, s in self)

    def tied_with(self, layer: int, head: int) -> int:
        """How many other heads have exactly this head's score."""
        score = self._score(layer, head)
        return sum(s == score for _, _, s in self) - 1

    def _score(self, layer: int, head: int):
        for l, h, s in self:
            if (l, h) == (layer, head):
                return s
        n_l, n_h = 1 + max(l for l, _, _ in self), 1 + max(h for _, h, _ in self)
        raise SaelabError(f"no head ({layer}, {head}) in this ranking: the model has layers 0..{n_l - 1} and "
                          f"heads 0..{n_h - 1}; pass (layer, head) in those ranges")

    def to_dict(self) -> dict:
        return {"method": self.method, "seconds": self.seconds, "n_examples": self.n_examples,
                "ranking": [{"layer": l, "head": h, "score": s} for l, h, s in self],
                "info": self.info}


def _ranking(scores: np.ndarray, tiebreak: np.ndarray | None = None) -> list[tuple[int, int, float]]:
    """Heads sorted by score (then tiebreak) descending, then by (layer, head)."""
    n_layers, n_heads = scores.shape
    keys = [(-float(scores[l, h]), -float(tiebreak[l, h]) if tiebreak is not None else 0.0, l, h)
            for l in range(n_layers) for h in range(n_heads)]
    return [(l, h, float(scores[l, h])) for _, _, l, h in sorted(keys)]


def _slice_task(task, n: int | None, model):
    """The task's first ``n`` examples; a task name or .jsonl path (str or Path) is built with
    ``make_task(task, model, n)`` first, as ``saelab heads`` does."""
    if n is not None and n < 1:
        raise SaelabError(f"n_examples={n}: head identification needs at least one example; pass 5 or more")
    task = as_task(task, model, n=64 if n is None else n)
    if n is None:
        return task
    return task.subset(range(min(n, len(task))))


def _check_task(task):
    if task.clean.ndim != 2 or len(task.clean) == 0:
        raise SaelabError(f"task '{task.name}' has no examples: give it at least one clean/corrupted pair")
    if task.clean.shape != task.corrupted.shape:
        raise SaelabError(f"task '{task.name}': clean {tuple(task.clean.shape)} and corrupted "
                          f"{tuple(task.corrupted.shape)} prompts differ in shape; they must tokenize to equal lengths")


# ----------------------------------------------------------------------------- activations
@torch.no_grad()
def head_activations(model, tokens: torch.Tensor, position: str = "last", batch_size: int = 64) -> torch.Tensor:
    """Every head's ``hook_z`` output, [N, n_layers * n_heads, d_head] (head g = layer * n_heads + head): a
    transposed view of a head-major [n_layers * n_heads, N, d_head] float32 buffer (``.transpose(0, 1)`` gives
    it back, contiguous).

    One forward per batch, stopped right after the deepest ``hook_z`` (``saelab.hooks.forward``: the last MLP,
    ln_final and the unembedding never run); each hook copies only the position(s) it needs straight into the
    buffer."""
    if position not in POSITIONS:
        raise SaelabError(f"position '{position}' is not one of {', '.join(POSITIONS)}")
    cfg = model.cfg
    n_heads, d_head = cfg.n_heads, cfg.d_head
    hooks = [HOOK.format(layer=l) for l in range(cfg.n_layers)]
    dev = device_of(model)
    out = torch.empty(cfg.n_layers * n_heads, len(tokens), d_head, device=dev)
    batch = slice(0, 0)  # the rows of the batch running now
    seen: set[int] = set()

    def make(layer):
        rows = out[layer * n_heads : (layer + 1) * n_heads]  # [n_heads, N, d_head]

        def keep(z, hook):
            kept = z[:, -1] if position == "last" else z[:, 1:].mean(1)
            rows[:, batch].copy_(kept.reshape(len(kept), n_heads, d_head).transpose(0, 1))
            seen.add(layer)

        return keep

    fwd_hooks = [(h, make(l)) for l, h in enumerate(hooks)]
    for a in range(0, len(tokens), batch_size):
        batch = slice(a, min(a + batch_size, len(tokens)))
        seen.clear()
        forward(model, tokens[batch].to(dev), fwd_hooks, stop_after=hooks)
        if len(seen) < len(hooks):
            raise SaelabError(f"the model's forward never reached "
                              f"{', '.join(h for l, h in enumerate(hooks) if l not in seen)}: "
                              "head identification needs every layer's attn.hook_z")
    return out.transpose(0, 1)


# ----------------------------------------------------------------------------- batched SAE
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
    renormalisation, no autograd graph, no optimizer object. 10 steps on 8 heads × 16 examples × d_head 32,
    setup included: ~1.5 ms alone on this 2-core CPU under load, against ~2.8-3.1 ms for the previous version
    (25 ops a step, six of them Adam's, and a ``baddbmm_`` into a strided row that torch ran as a per-head
    loop). The results agree with ``_fit`` to ~1e-6 (the previous version drifted to 5e-3 on 50 steps);
    ``test_heads.py`` compares the two."""
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
    the optimizer's ~70 µs of bookkeeping: one op, ~22 µs against ~85 µs for the six below on 8.6k parameters)
    when this torch has it, else the same formula in ops."""
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


# ----------------------------------------------------------------------------- codes and scores
def discretise(acts: torch.Tensor) -> torch.Tensor:
    """SAE codes [..., d_sae] → one integer each: the argmax latent, or d_sae when none fires."""
    top, code = acts.max(-1)  # the first index of the maximum, as argmax
    return torch.where(top > 0, code, acts.shape[-1])


def unique_positive_codes(codes: torch.Tensor, positive: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per head: (number of codes seen on positives and never on negatives, that number / distinct codes).

    codes [G, N] integers, positive [N] bool."""
    counts, fracs = [], []
    positive = positive.tolist()
    for row in codes.tolist():
        pos = {c for c, p in zip(row, positive) if p}
        neg = {c for c, p in zip(row, positive) if not p}
        only = len(pos - neg)
        counts.append(only)
        fracs.append(only / max(len(pos | neg), 1))
    return np.array(counts, dtype=np.float64), np.array(fracs, dtype=np.float64)


# ----------------------------------------------------------------------------- the two methods
def identify_heads(model, task, n_examples: int = 8, *, d_sae: int = D_SAE, l1: float = L1, steps: int = STEPS,
                   lr: float = LR, position: str = "last", seed: int = 0, progress: bool = False) -> HeadRanking:
    """Rank every attention head by the SAE codes unique to the task's positive examples.

    ``task``: a ``saelab.analysis.tasks.Task`` (its first ``n_examples`` clean prompts are the
    positives, the matching corrupted prompts the negatives). Returns a HeadRanking whose score
    is the number of codes unique to positives (``info["fraction"]`` the normalised variant)."""
    task = _slice_task(task, n_examples, model)
    _check_task(task)
    cfg = model.cfg
    n = len(task.clean)
    bar = tqdm(total=3, desc="heads: forward, SAEs, codes", disable=not progress, leave=False)
    t0 = time.perf_counter()
    x = head_activations(model, torch.cat([task.clean, task.corrupted]), position)  # [2n, G, d_head]
    t1 = time.perf_counter()
    bar.update()
    x = x.transpose(0, 1).contiguous()  # [G, 2n, d_head] (head_activations' buffer: no copy)
    sae = train_head_saes(x, d_sae=d_sae, l1=l1, steps=steps, lr=lr, seed=seed)
    t2 = time.perf_counter()
    bar.update()
    with torch.no_grad():
        codes = discretise(sae.encode(x))
    positive = torch.arange(2 * n) < n
    counts, fracs = unique_positive_codes(codes, positive)
    t3 = time.perf_counter()
    bar.update()
    bar.close()
    shape = (cfg.n_layers, cfg.n_heads)
    scores, frac = counts.reshape(shape), fracs.reshape(shape)
    info = {"forward_s": t1 - t0, "train_s": t2 - t1, "score_s": t3 - t2, "position": position, "d_sae": d_sae,
            "l1": l1, "steps": steps, "lr": lr, "seed": seed, "fraction": frac.tolist(),
            "codes": codes.view(*shape, 2 * n).tolist()}
    return HeadRanking(_ranking(scores, frac), method="codes", seconds=t3 - t0, scores=scores, n_examples=n,
                       info=info)


@torch.no_grad()
def ablation_ranking(model, task, n_examples: int = 8, *, mode: str = "mean", positions: str = "all",
                     progress: bool = False) -> HeadRanking:
    """Rank heads by how much ablating each one alone lowers the mean logit difference on the clean prompts.

    ``mode="mean"`` replaces the head's ``hook_z`` by its mean over these clean prompts (per position);
    ``"zero"`` by zeros. One forward for the baseline (which also gives the means) + one per head."""
    if mode not in ("mean", "zero"):
        raise SaelabError(f"ablation mode '{mode}' is not one of mean, zero")
    if positions not in ("all", "last"):
        raise SaelabError(f"ablation positions '{positions}' is not one of all, last")
    sl = slice(None) if positions == "all" else slice(-1, None)
    task = _slice_task(task, n_examples, model)
    _check_task(task)
    cfg = model.cfg
    dev = device_of(model)
    clean = task.clean.to(dev)
    t0 = time.perf_counter()
    hooks = [HOOK.format(layer=l) for l in range(cfg.n_layers)]
    logits, cache = model.run_with_cache(clean, names_filter=lambda name: name in hooks)
    base = float(logit_diff(logits, task).mean())
    means = {h: cache[h].mean(0, keepdim=True) for h in hooks}
    del cache
    drops = np.zeros((cfg.n_layers, cfg.n_heads))
    per_head_s = []
    bar = tqdm(total=cfg.n_layers * cfg.n_heads, desc="ablating heads", disable=not progress, leave=False)
    for layer in range(cfg.n_layers):
        hook = hooks[layer]
        for head in range(cfg.n_heads):
            def ablate(z, hook, head=head, layer_hook=hook):
                z = z.clone()
                z[:, sl, head] = means[layer_hook][:, sl, head] if mode == "mean" else 0.0
                return z

            th = time.perf_counter()
            out = model.run_with_hooks(clean, fwd_hooks=[(hook, ablate)])
            drops[layer, head] = base - float(logit_diff(out, task).mean())
            per_head_s.append(time.perf_counter() - th)
            bar.update()
    bar.close()
    seconds = time.perf_counter() - t0
    info = {"mode": mode, "positions": positions, "clean_logit_diff": base, "per_head_s": float(np.median(per_head_s))}
    return HeadRanking(_ranking(drops), method="ablation", seconds=seconds, scores=drops, n_examples=len(clean),
                       info=info)


def _median_run(runs: list[HeadRanking]) -> HeadRanking:
    """The run with the median wall time (runs are deterministic for a seed: same rankings), marked with
    every run's time and how many there were."""
    mid = sorted(runs, key=lambda r: r.seconds)[(len(runs) - 1) // 2]
    mid.info.update(repeats=len(runs), seconds_runs=[r.seconds for r in runs])
    return mid


def timed_rankings(model, task, n_examples: int = 8, repeats: int = 5, *, ablation_positions: str = "all",
                   threads: int | None = 1, progress: bool = False, **identify_kw) -> tuple[HeadRanking, HeadRanking]:
    """Identification and the ablation sweep on the same examples, alternated ``repeats`` times (a busy
    CPU slows both alike); returns each method's median-time run. Warm the model up before calling.

    ``threads``: torch threads for both methods alike (None: as set). The default 1: forwards of 8-16
    short prompts gain little from more threads, and on a CPU shared with other work several threads
    wait on each other (on this 2-core machine, with two other busy processes, a 5 ms forward took
    ~1 s at 2 threads)."""
    if repeats < 1:
        raise SaelabError(f"--repeats {repeats}: pass 1 or more")
    if threads is not None and threads < 1:
        raise SaelabError(f"--threads {threads}: pass 1 or more")
    before = torch.get_num_threads()
    ident, abl = [], []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for _ in tqdm(range(repeats), desc="identification / ablation sweep", disable=not progress, leave=False):
            ident.append(identify_heads(model, task, n_examples, **identify_kw))
            abl.append(ablation_ranking(model, task, n_examples, positions=ablation_positions))
    finally:
        torch.set_num_threads(before)
    first = ident[0].heads()
    assert all(r.heads() == first for r in ident), "head identification is deterministic for a seed"
    ident, abl = _median_run(ident), _median_run(abl)
    ident.info["threads"] = abl.info["threads"] = threads or before
    return ident, abl


def compare(identified: HeadRanking, ablation: HeadRanking, top: int = 3, truth_frac: float = 0.25) -> dict:
    """Precision / recall of the identification's top-``top`` heads against the ablation's important heads.

    Important heads: those whose ablation lowers the logit difference by at least ``truth_frac`` of the
    largest drop. Also: where the most important head lands in the identification ranking, and the
    two wall-clock times and their ratio."""
    if top < 1:
        raise SaelabError(f"--top {top}: pass a positive number of heads")
    best = float(ablation.scores.max())
    truth = {(l, h) for l, h, s in ablation if best > 0 and s >= truth_frac * best}
    pred = set(identified.heads(top))
    hit = len(pred & truth)
    l0, h0, _ = ablation[0]
    return {"top": top, "truth_frac": truth_frac, "important_heads": sorted(truth), "predicted": identified.heads(top),
            "precision": hit / len(pred), "recall": hit / len(truth) if truth else None,
            "ablation_top_head": (l0, h0), "ablation_top_head_rank": identified.rank_of(l0, h0),
            "ablation_top_head_ties": identified.tied_with(l0, h0),
            "identify_s": identified.seconds, "ablation_s": ablation.seconds,
            "time_ratio": identified.seconds / ablation.seconds,
            "forward_ratio": identified.info.get("forward_s", float("nan")) / ablation.seconds}


def _fmt_heads(ranking: HeadRanking, top: int, fmt: str) -> str:
    return ", ".join(f"L{l}H{h} ({fmt.format(s)})" for l, h, s in ranking[:top])


def report(ident: HeadRanking, abl: HeadRanking | None = None, top: int = 3, task_name: str = "") -> list[str]:
    """The lines ``saelab heads`` prints."""
    top = min(top, len(ident))
    lines = [f"head identification on '{task_name}' ({ident.n_examples} positive + {ident.n_examples} negative "
             f"examples, {len(ident)} heads, codes at position '{ident.info['position']}'): {ident.seconds:.3f} s "
             f"(forward {ident.info['forward_s']:.3f} s, SAEs {ident.info['train_s']:.3f} s)",
             "  top heads by codes unique to positives: " + _fmt_heads(ident, top, "{:.0f}")]
    d_sae = ident.info.get("d_sae", D_SAE)
    if ident.n_examples > d_sae:
        lines.append(f"  note: {ident.n_examples} examples a side is more than a head's {d_sae + 1} possible codes, so "
                     "codes recur on both sides and the counts lose meaning; the method is meant for 5-10 examples "
                     "(--n 8)")
    if abl is None:
        return lines
    cmp = compare(ident, abl, top)
    where = "every position" if abl.info["positions"] == "all" else "the last position"
    lh = cmp["ablation_top_head"]
    lines += [f"ablation sweep ({abl.info['mode']}-ablate one head's hook_z at {where}: 1 baseline + {len(abl)} "
              f"forwards on {abl.n_examples} clean prompts): {abl.seconds:.3f} s",
              "  top heads by logit-diff drop: " + _fmt_heads(abl, top, "{:.3f}"),
              (f"  precision@{top} {cmp['precision']:.2f}, recall@{top} {cmp['recall']:.2f} (important = drop >= "
               f"{cmp['truth_frac']:.0%} of the largest: " + ", ".join(f"L{l}H{h}" for l, h in cmp["important_heads"])
               + ")") if cmp["important_heads"] else
              "  precision/recall: n/a (no head's ablation lowers the logit difference: does the model do this task?)",
              f"  the head whose ablation hurts most, L{lh[0]}H{lh[1]}, is #{cmp['ablation_top_head_rank']} of "
              f"{len(ident)} by codes" + (f" (tied with {cmp['ablation_top_head_ties']} other heads)"
                                          if cmp["ablation_top_head_ties"] else ""),
              f"  time: identification {ident.seconds:.3f} s ({ident.seconds / len(ident) * 1000:.1f} ms per head), "
              f"ablation sweep {abl.seconds:.3f} s ({abl.info['per_head_s'] * 1000:.1f} ms per head); "
              f"ratio {cmp['time_ratio']:.3f} (identification's forward pass alone: {cmp['forward_ratio']:.3f})"
              + (f"; medians of {ident.info['repeats']} alternated runs" if ident.info.get("repeats", 1) > 1 else "")
              + (f", {ident.info['threads']} torch thread(s)" if "threads" in ident.info else "")]
    return lines


def run_heads(task: str, model: str = "tiny", n: int = 8, top: int = 3, compare_ablation: bool = False,
              ablation_positions: str = "all", out: str | None = None, seed: int = 0, position: str = "last",
              device: str = "auto", progress: bool = True, repeats: int = 5,
              threads: int | None = 1) -> tuple[dict, list[str]]:
    """What ``saelab heads`` does: (result dict, report lines); writes ``out`` (JSON, atomically) if given.
    With ``compare_ablation`` both methods run ``repeats`` times, alternated; the times are their medians."""
    from saelab.analysis.tasks import make_task
    from saelab.models import load_model
    from saelab.fs import check_output, finite_json, write_output

    if n < 1:
        raise SaelabError(f"--n {n}: head identification needs at least one example; pass --n 5 or more")
    if top < 1:
        raise SaelabError(f"--top {top}: pass a positive number of heads")
    if repeats < 1:
        raise SaelabError(f"--repeats {repeats}: pass 1 or more")
    if threads is not None and threads < 1:
        raise SaelabError(f"--threads {threads}: pass 1 or more, or 0 for torch's default")
    if out:  # an --out that is a folder or cannot be written is found before the work, not when writing
        replaced = pathlib.Path(out).expanduser().is_file()
        out = check_output(out, "--out", "heads.json")
    m = load_model(model, device)
    t = make_task(task, m, n=n, seed=seed)
    with torch.no_grad():  # warm-up: the first forward of a process pays one-off costs neither method should
        m(t.clean[:1].to(device_of(m)))
    abl = None
    if compare_ablation:
        ident, abl = timed_rankings(m, t, n, repeats, ablation_positions=ablation_positions, threads=threads,
                                    progress=progress, position=position, seed=seed)
    else:
        before = torch.get_num_threads()
        try:
            if threads:
                torch.set_num_threads(threads)
            ident = identify_heads(m, t, n, position=position, seed=seed, progress=progress)
        finally:
            torch.set_num_threads(before)
    res = {"task": t.name, "model": model, "identify": ident.to_dict()}
    if abl is not None:
        res.update(ablation=abl.to_dict(), compare=compare(ident, abl, min(top, len(ident))))
    lines = report(ident, abl, top, t.name)
    if out:
        path = write_output(out, json.dumps(finite_json(res), indent=2) + "\n")
        lines.append(f"wrote {path}" + (" (replaced the existing file)" if replaced else ""))
    return res, lines
