"""Universality of two SAEs' feature spaces: SAEs of two models (or two layers) paired latent by latent on the
same tokens, and the paired decoder directions compared by SVCCA against random pairings.

Source: Lan, Torr, Meek, Khakzar, Krueger and Barez, "Sparse Autoencoders Reveal Universal Feature Spaces Across
Large Language Models", arXiv:2410.06981 (2024); SVCCA: Raghu, Gilmer, Yosinski and Sohl-Dickstein, "SVCCA:
Singular Vector Canonical Correlation Analysis for Deep Learning Dynamics and Interpretability", NeurIPS 2017.

1. **Pairing by activation correlation.** Row t of both stores is the same token (``check_row_aligned``); f_i(t) is
   latent i of SAE A on A's row t, g_j(t) latent j of B on B's row t. Over the T rows, from streaming sums of f, f²,
   g, g² and fg (row batch by row batch; the [d_sae_A, d_sae_B] sums of fg in chunks of A's latents of at most
   ``CORR_BUDGET`` bytes, one pass over the rows per chunk)::

       ρ_ij = (Σ_t f_i g_j / T − μ_i ν_j) / (σ_i τ_j)

   Each live latent i of A (one that fired on the rows, σ_i > 0) takes j(i) = argmax_j ρ_ij over B's live latents.
   Where several latents of A pick the same j only the one of highest ρ keeps it (Lan et al. drop many-to-one
   pairs): the pairs are one-to-one. ``mean_pair_corr`` is the mean ρ over them. When either SAE is signed
   (AbsTopK, which reads a feature with either sign) the pairing is by |ρ|, and B's decoder row of a pair of
   negative ρ is negated before step 2.
2. **SVCCA of the paired decoder rows.** X = W_dec^A[pairs] [n, d_a] and Y = W_dec^B[pairs] [n, d_b], the n pairs
   the samples: each side centred, then reduced to its top singular directions that explain ``keep`` (99%) of
   its variance (``numpy.linalg.svd``), then CCA of the two reduced sides: the canonical correlations are the
   singular values of Q_Xᵀ Q_Y, Q the orthonormal bases (QR) of the centred reduced sides (the cosines of the
   principal angles between their column spaces). The score is their mean, in [0, 1]; it is
   invariant to any invertible linear map of either side's kept directions (a rotation of a model's basis).
3. **Baseline.** The same SVCCA with Y's rows permuted (``draws`` seeded permutations): the score of a pairing
   that carries no information. ``p_value`` = (1 + #{random ≥ real}) / (1 + draws), at least 1 / (1 + draws).

Few pairs for the directions kept force canonical correlations to 1 whatever the data: with n pairs and k_a, k_b
directions kept, at least k_a + k_b − n + 1 of them are 1 (two subspaces of the n − 1 dimensions of centred
samples). The random baseline rises with them, which is why the score is read beside it.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.errors import SaelabError
from saelab.options import CompareOptions

#: the most bytes of the [d_sae_A, d_sae_B] correlation sums held at once (float64); wider pairs of SAEs take
#: one pass over the rows per chunk of A's latents
CORR_BUDGET = 256 << 20
#: elements of one [rows, d_sae] code tensor per row batch (as ``saelab.evaluate``'s dense paths)
CODE_BUDGET = 1 << 25
KEEP = 0.99
DRAWS = 20
#: how the stores of the two SAEs are harvested so that their rows are the same tokens
ALIGN_FIX = "harvest both models on the same --dataset, --tokens, --context-size, --holdout and --seed"


# ---------------------------------------------------------------------------------------------------- SVCCA
def cca(X, Y) -> np.ndarray:
    """The canonical correlations of X [n, p] and Y [n, q] (rows the samples), descending, min(rank X, rank Y) of
    them: the singular values of Q_Xᵀ Q_Y, Q a side's orthonormal basis (``_basis``), clipped to [0, 1]."""
    return _canonical(_basis(X, "X"), _basis(Y, "Y"))


def _canonical(qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
    return np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0)


def _basis(X, name: str) -> np.ndarray:
    """An orthonormal basis [n, rank] of the centred columns of X (``scipy.linalg.qr`` with column pivoting: the
    columns of |R_ii| below 1e-10 of the largest, dependent on the others, add none)."""
    from scipy.linalg import qr

    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) < 2:
        raise SaelabError(f"CCA needs {name} as [samples, features] with 2 or more samples (got shape {X.shape})")
    q, r, _ = qr(X - X.mean(0), mode="economic", pivoting=True)
    d = np.abs(np.diag(r))
    if not (d.size and d[0] > 0):
        raise SaelabError(f"CCA of a constant {name} (all {len(X)} samples equal) is undefined")
    return q[:, d > 1e-10 * d[0]]


def reduce(X, keep: float = KEEP) -> tuple[np.ndarray, float]:
    """(X centred and projected onto its fewest top singular directions that explain ``keep`` of its variance
    [n, k], the fraction of the variance they explain)."""
    if not 0 < keep <= 1:
        raise SaelabError(f"keep must be in (0, 1] (got {keep})")
    X = np.asarray(X, dtype=np.float64)
    u, s, _ = np.linalg.svd(X - X.mean(0), full_matrices=False)
    var = s ** 2
    total = var.sum()
    if not total > 0:
        raise SaelabError(f"SVCCA of {len(X)} equal rows is undefined: the paired directions hold no variance")
    frac = np.cumsum(var) / total
    k = min(int(np.searchsorted(frac, keep * (1 - 1e-12))) + 1, len(s))  # the fewest reaching ``keep``
    return u[:, :k] * s[:k], float(frac[k - 1])


def one_blas_thread():
    """A context that runs numpy's and scipy's linear algebra on one BLAS thread (``threadpoolctl``, which
    scikit-learn depends on). SVCCA's SVDs and QRs are of [pairs, d] matrices, where threads gain little, and on
    a busy CPU they wait on each other (on a loaded 2-core machine a 115 × 118 SVD took 0.6 s on two threads and
    3 ms on one; ``saelab.device.one_thread`` does the same for torch)."""
    import scipy.linalg  # noqa: F401 - its BLAS loaded first: the limit covers the libraries loaded when it starts
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def svcca(X, Y, keep: float = KEEP) -> dict:
    """SVCCA of X [n, d_a] and Y [n, d_b], rows paired (the module docstring, step 2): {"score" (the mean
    canonical correlation), "corrs" (all of them, descending), "dims" (directions kept on each side),
    "variance" (the fraction each side's kept directions explain)}."""
    if len(X) != len(Y):
        raise SaelabError(f"SVCCA pairs rows: X has {len(X)} and Y {len(Y)}")
    with one_blas_thread():
        xr, fx = reduce(X, keep)
        yr, fy = reduce(Y, keep)
        corrs = cca(xr, yr)
    return {"score": float(corrs.mean()), "corrs": corrs, "dims": (xr.shape[1], yr.shape[1]), "variance": (fx, fy)}


def random_svcca(X, Y, draws: int = DRAWS, seed: int = 0, keep: float = KEEP) -> np.ndarray:
    """SVCCA scores of X against ``draws`` seeded permutations of Y's rows (random pairings):
    ``svcca(X, Y[perm])["score"]`` for each ``perm`` of ``numpy.random.default_rng(seed).permutation``, from one
    reduction and basis of each side (permuting Y's rows permutes its basis's rows, and leaves its mean and
    singular values as they are)."""
    if len(X) != len(Y):
        raise SaelabError(f"SVCCA pairs rows: X has {len(X)} and Y {len(Y)}")
    rng = np.random.default_rng(seed)
    with one_blas_thread():
        qx, qy = _basis(reduce(X, keep)[0], "X"), _basis(reduce(Y, keep)[0], "Y")
        return np.array([_canonical(qx, qy[rng.permutation(len(qy))]).mean() for _ in range(draws)])


def p_value(real: float, random) -> float:
    """The permutation p-value of ``real`` among the ``random`` scores: (1 + #{random ≥ real}) / (1 + draws)."""
    random = np.asarray(random, dtype=np.float64)
    return float((1 + (random >= real).sum()) / (1 + len(random)))


# ---------------------------------------------------------------------------------------------------- pairing
@torch.no_grad()
def correlate(sae_a, sae_b, batches, *, signed: bool | None = None, budget: int = CORR_BUDGET,
              device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """Each latent of ``sae_a``'s best-correlated latent of ``sae_b`` (step 1, before the one-to-one rule).
    ``batches``: a function returning an iterable of (xa [rows, d_in_A], xb [rows, d_in_B]) row batches, row r of
    both the same token, the same rows in the same order each call (one call per chunk of A's latents).
    Returns {"best" [d_sae_A] (B's latent; -1 for a latent of A that never fired), "corr" [d_sae_A] (ρ, |ρ| when
    signed; NaN where best is -1), "sign" [d_sae_A] (signed: the sign of ρ; else 1), "alive_a", "alive_b"
    (boolean masks of the live latents), "rows"}, numpy arrays."""
    from saelab.analysis.geometry import either_signed

    signed = either_signed(sae_a, sae_b) if signed is None else signed
    sae_a, sae_b = sae_a.to(device).eval(), sae_b.to(device).eval()
    da, db = sae_a.d_sae, sae_b.d_sae
    chunk = max(1, min(da, budget // (8 * db)))
    spans = [(lo, min(lo + chunk, da)) for lo in range(0, da, chunk)]
    f64 = {"dtype": torch.float64, "device": device}
    s_a, ss_a, s_b, ss_b = (torch.zeros(d, **f64) for d in (da, da, db, db))
    best = np.full(da, -1, np.int64)
    corr, sign = np.full(da, np.nan), np.ones(da)
    rows = 0
    for p, (lo, hi) in enumerate(spans):
        sxy = torch.zeros(hi - lo, db, **f64)
        n = 0
        it = batches()
        desc = "universality" + (f" {p + 1}/{len(spans)}" if len(spans) > 1 else "")
        for xa, xb in tqdm(it, total=_len(it), desc=desc, unit="batch", disable=not progress):
            if len(xa) != len(xb):
                raise SaelabError(f"a row batch holds {len(xa)} rows of A and {len(xb)} of B: the stores are not "
                                  f"row-aligned; {ALIGN_FIX}")
            fa = sae_a.encode(xa.to(device)).float()
            fb = sae_b.encode(xb.to(device)).float()
            if p == 0:  # the per-latent sums, once
                s_a += fa.sum(0, dtype=torch.float64)
                ss_a += fa.double().pow(2).sum(0)
                s_b += fb.sum(0, dtype=torch.float64)
                ss_b += fb.double().pow(2).sum(0)
            sxy += (fa[:, lo:hi].T @ fb).double()  # float32 products within a batch, float64 across batches
            n += len(xa)
        if p == 0:
            rows = n
            if rows < 2:
                raise SaelabError(f"correlations need 2 or more rows (got {rows}): pass more rows")
            mu_a, mu_b = s_a / rows, s_b / rows
            sd_a = (ss_a / rows - mu_a ** 2).clamp_min(0).sqrt()
            sd_b = (ss_b / rows - mu_b ** 2).clamp_min(0).sqrt()
            # a latent is live where it varies over the rows: it fired (and not with one value on every row)
            alive_a = sd_a > 1e-6 * (ss_a / rows).sqrt()
            alive_b = sd_b > 1e-6 * (ss_b / rows).sqrt()
        elif n != rows:
            raise SaelabError(f"the row batches gave {n} rows on pass {p + 1} and {rows} on the first: pass batches "
                              "that serve the same rows on every call")
        # ρ in place of the sums (no second matrix of the chunk's size; a signed pair adds |ρ|)
        r = sxy.div_(rows).addr_(mu_a[lo:hi], mu_b, alpha=-1)
        r.div_(sd_a[lo:hi, None].clamp_min(1e-300)).div_(sd_b[None, :].clamp_min(1e-300)).clamp_(-1.0, 1.0)
        if signed:
            score = r.abs()
            score[:, ~alive_b] = -1.0
            v, j = score.max(1)
            del score
        else:
            r[:, ~alive_b] = -torch.inf
            v, j = r.max(1)
        rj = r.gather(1, j[:, None])[:, 0]
        live = alive_a[lo:hi].cpu().numpy() & bool(alive_b.any())
        best[lo:hi] = np.where(live, j.cpu().numpy(), -1)
        corr[lo:hi] = np.where(live, v.cpu().numpy(), np.nan)
        sign[lo:hi] = np.where(signed & (rj.cpu().numpy() < 0), -1.0, 1.0)  # unsigned: the rows as they are
    return {"best": best, "corr": corr, "sign": sign, "alive_a": alive_a.cpu().numpy(),
            "alive_b": alive_b.cpu().numpy(), "rows": rows}


def _len(it) -> int | None:
    try:
        return len(it)
    except TypeError:
        return None


def one_to_one(best: np.ndarray, corr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A's latents, B's latents) of the pairs kept: of the latents of A with a match (``best`` ≥ 0), where several
    pick the same latent of B only the one of highest ``corr`` (the lowest id on a tie); ordered by A's id."""
    a = np.flatnonzero(best >= 0)
    order = a[np.lexsort((a, -corr[a]))]  # by correlation, descending; ties by A's id
    _, first = np.unique(best[order], return_index=True)
    kept = np.sort(order[first])
    return kept, best[kept]


def pair_latents(sae_a, sae_b, batches, **kw) -> dict:
    """``correlate``, then the one-to-one pairs: {"a", "b" (latent ids of each pair, by A's id), "corr" (ρ of each
    pair), "sign" (of ρ; signed SAEs only, else 1), "mean_pair_corr", "alive_a", "alive_b" (counts of live latents:
    each live latent of A has a match before the one-to-one rule), "rows"}."""
    c = correlate(sae_a, sae_b, batches, **kw)
    a, b = one_to_one(c["best"], c["corr"])
    return {"a": a, "b": b, "corr": c["corr"][a], "sign": c["sign"][a],
            "mean_pair_corr": float(c["corr"][a].mean()) if len(a) else float("nan"),
            "alive_a": int(c["alive_a"].sum()), "alive_b": int(c["alive_b"].sum()), "rows": c["rows"]}


def decoder_rows(sae) -> np.ndarray:
    """The SAE's decoder rows [d_sae, d_out] as float64 (where each latent writes)."""
    return sae.W_dec.detach().double().cpu().numpy()


def universality(sae_a, sae_b, batches, *, keep: float = KEEP, draws: int = DRAWS, seed: int = 0,
                 signed: bool | None = None, budget: int = CORR_BUDGET, device: str | torch.device = "cpu",
                 progress: bool = False) -> dict:
    """Steps 1–3 of the module docstring for SAEs ``sae_a`` and ``sae_b`` on the row batches ``batches``
    (``correlate``). Returns a JSON-ready dict: "pairs" (one-to-one pairs), "mean_pair_corr", "svcca",
    "random_svcca_mean", "random_svcca_std" (over ``draws`` seeded permutations), "p_value", "rows",
    "variance_kept" (``keep``), "dims" {a, b} (directions each side kept), "alive" {a, b} (live latents),
    "draws", "signed", and "matches" {a, b, corr} (per pair, as lists). Fewer than 3 pairs: a one-line error."""
    from saelab.analysis.geometry import either_signed

    signed = either_signed(sae_a, sae_b) if signed is None else signed
    p = pair_latents(sae_a, sae_b, batches, signed=signed, budget=budget, device=device, progress=progress)
    n = len(p["a"])
    if n < 3:
        raise SaelabError(f"only {n} latent pair{'s' * (n != 1)} over {p['rows']:,} rows ({p['alive_a']} latents of A "
                          f"and {p['alive_b']} of B fired): SVCCA needs 3 or more; pass more --rows")
    X = decoder_rows(sae_a)[p["a"]]
    Y = decoder_rows(sae_b)[p["b"]] * p["sign"][:, None]  # a pair of negative ρ (signed SAEs): B's row negated
    real = svcca(X, Y, keep)
    rand = random_svcca(X, Y, draws, seed, keep)
    return {"pairs": n, "mean_pair_corr": p["mean_pair_corr"], "svcca": real["score"],
            "random_svcca_mean": float(rand.mean()), "random_svcca_std": float(rand.std()),
            "p_value": p_value(real["score"], rand), "rows": p["rows"],
            "variance_kept": keep, "dims": {"a": real["dims"][0], "b": real["dims"][1]},
            "alive": {"a": p["alive_a"], "b": p["alive_b"]}, "draws": draws,
            "signed": signed, "matches": {"a": p["a"].tolist(), "b": p["b"].tolist(),
                                          "corr": [float(v) for v in p["corr"]]}}


# ---------------------------------------------------------------------------------------------------- stores
def _ranges(store, split: str) -> list[tuple[int, int]]:
    """The global rows of ``split`` as merged [start, stop) ranges."""
    out: list[list[int]] = []
    for i in store.split_shards(split):
        a = store.shards[i]["first_row"]
        b = a + store.shards[i]["rows"]
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [tuple(r) for r in out]


def _first_contexts(store, split: str, n: int) -> np.ndarray | None:
    """The token ids of the first ``n`` contexts of ``split`` [n, context_size]; None where a shard keeps none."""
    parts, have = [], 0
    for i in store.split_shards(split):
        if have >= n:
            break
        take = min(n - have, store.shards[i]["rows"] // store.context_size)
        try:
            parts.append(store.read(i, 0, take, "tokens"))
        except KeyError:
            return None
        have += take
    return np.concatenate(parts) if parts else np.zeros((0, store.context_size), np.int32)


def plan_rows(store_a, store_b, rows: int) -> dict:
    """Which rows the two stores are read at: {"split" (holdout where A has held-out shards, else all), "rows" (at
    most ``rows`` of it, the first ones, BOS positions left out where the stores keep them), "skip_bos"}, once
    the stores are row-aligned over them (``check_row_aligned``); fewer than 2 rows: a one-line error."""
    split = "holdout" if store_a.split_shards("holdout") else "all"
    skip_bos = bool(store_a.manifest.get("bos_included", False))
    avail = store_a.n_rows(split)
    if skip_bos:
        avail -= avail // store_a.context_size
    plan = {"split": split, "rows": min(int(rows), avail), "skip_bos": skip_bos}
    if plan["rows"] < 2:
        raise SaelabError(f"store {store_a.path} has {avail} usable rows in its {split} split: harvest more tokens")
    check_row_aligned(store_a, store_b, plan)
    return plan


def check_row_aligned(store_a, store_b, plan: dict) -> None:
    """Hold two stores (of one model or two) to row alignment over the rows ``plan`` reads: row r of one is row r of
    the other, the same token. Both have one context size, BOS handling and row count, the same rows in the split,
    and, where both keep token ids, the same tokens in the contexts read; otherwise a one-line error naming both
    stores, the first difference and ``ALIGN_FIX``."""
    a, b = store_a.manifest, store_b.manifest

    def differ(what: str) -> SaelabError:
        return SaelabError(f"stores {store_a.path} and {store_b.path} are not row-aligned ({what}): {ALIGN_FIX}")

    for key in ("context_size", "bos_included", "n_tokens"):
        if a.get(key) != b.get(key):
            raise differ(f"{key} {a.get(key)!r} vs {b.get(key)!r}")
    split = plan["split"]
    if _ranges(store_a, split) != _ranges(store_b, split):
        raise differ(f"their {split} splits hold other rows")
    ctx = store_a.context_size
    per = ctx - 1 if plan["skip_bos"] else ctx
    n_ctx = -(-plan["rows"] // per)
    ta, tb = _first_contexts(store_a, split, n_ctx), _first_contexts(store_b, split, n_ctx)
    if ta is not None and tb is not None and not np.array_equal(ta, tb):
        bad = int(np.flatnonzero((ta != tb).any(1))[0])
        raise differ(f"context {bad} of the {split} split holds other tokens")


def store_batches(store_a, store_b, plan: dict, batch_size: int):
    """A function returning the row batches (xa, xb) of ``plan`` (``plan_rows``), in store order, for
    ``correlate``: the same rows of both stores in the same order on every call."""
    from saelab.store.stream import PairedBatches

    def batches():
        kw = {"split": plan["split"], "tokens": plan["rows"], "seed": 0, "skip_bos": plan["skip_bos"],
              "shuffle": False}
        return PairedBatches(store_a.batches(batch_size, **kw), store_b.batches(batch_size, **kw))

    return batches


def store_universality(sae_a, sae_b, store_a, store_b, *, rows: int = CompareOptions.rows, plan: dict | None = None,
                       device="cpu", progress: bool = False, **kw) -> dict:
    """``universality`` of two SAEs on their stores (``store_a`` read by ``sae_a``, ``store_b`` by ``sae_b``,
    row-aligned): at most ``rows`` rows of the held-out split (``plan_rows``, or the ``plan`` it gave); the result
    also names the ``split``. Width mismatches between an SAE and its store are one-line errors."""
    for name, sae, store in (("A", sae_a, store_a), ("B", sae_b, store_b)):
        if store.d_in != sae.d_in:
            raise SaelabError(f"store {store.path} has width {store.d_in} but SAE {name} reads d_in {sae.d_in}: pass "
                              "the store of the SAE's hook")
    plan = plan or plan_rows(store_a, store_b, rows)
    bs = max(1, min(4096, CODE_BUDGET // max(sae_a.d_sae, sae_b.d_sae)))
    res = universality(sae_a, sae_b, store_batches(store_a, store_b, plan, bs), device=device, progress=progress,
                       **kw)
    return {**res, "split": plan["split"]}
