"""Planted features: synthetic activation stores with a known dictionary, and recovery metrics.

``write_synthetic(cfg)`` writes an ordinary store (``manifest.json`` + shards, readable by
``ActivationStore``) whose rows are sparse non-negative combinations of ``n_true`` random unit
directions in ``d`` dimensions, plus ``truth.npy`` (the directions) and ``truth.json`` (which
features are bidirectional or hierarchical). An SAE trained on it is scored by how well its
decoder rows recover the directions (``mmcs``, ``splits``, ``best_match``).

Feature ids, in order: ``hierarchy`` parents, then each parent's ``children`` children
(child j of parent p is ``hierarchy + p * children + j``), then the ``bidirectional``
features, then the plain ones. Every feature except a child (a "free" feature) fires with its own
probability p_i (``feature_probs``), scaled so a row has ``active`` features on average (children
included): the same p for all (``firing`` "uniform"), or p_i ∝ (rank_i + 1)^-``zipf_exponent`` with
the ranks a seeded permutation of the free features (``firing`` "zipf"). The free features fire
independently, or with ``correlation`` ρ > 0 through a Gaussian copula: feature i fires where
z_i < Φ⁻¹(p_i), z = sqrt(1-ρ)·ε + sqrt(ρ)·(u @ F), ε ~ N(0, I) per feature, u ~ N(0, I_rank) per row and
F [``correlation_rank``, free] seeded factors with unit-norm columns (``correlation_factors``), so each
z_i is N(0, 1), the marginals stay p_i and features whose columns of F align fire together. A child
fires with probability ``child_rate`` (default ``CHILD_RATE``) when its parent fires, never otherwise;
with ``exclusive_children`` at most one child fires with its parent (chosen uniformly), the setting
where a child's latent can absorb its parent's (Chanin et al., "A is for Absorption"); with
``orthogonal_children`` each child's direction has its component along its parent's removed (then unit norm),
the conditionally orthogonal children of hierarchical concepts (Costa et al. 2025). Coefficients are
Uniform(0.5, 1.5), times a random sign for bidirectional features. Rows are drawn in chunks of
``chunk_rows(cfg)`` from one seeded generator, so a seed gives byte-identical stores; the zipf ranks and
the factors F come from generators of their own (``side_seed``), so the options at their defaults
draw what the generator drew before they existed. ``superposition`` > 0 sets ``n_true`` to
round(superposition · d); truth.json records every store's n_true / d and the directions' interference
(``interference``).

With ``d_out`` > 0 the output is a transcoder's pair: a RUN folder of two row-aligned stores,
``synthetic.in`` (rows x = c·A, A the planted directions) and ``synthetic.out`` (rows y = c·B with
the same sparse coefficients c, B [n_true, d_out] random unit rows drawn from the seed after A), each
with its side's directions in truth.npy and a truth.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.config import JSONConfig, _f
from saelab.errors import SaelabError
from saelab.fs import (
    atomic_file,
    atomic_write_text,
    check_free_space,
    no_empty_folder_left,
    out_folder,
    remove_contents,
    run_lock,
)
from saelab.store import DTYPES, ShardWriter, new_manifest, plan_shards

CONTEXT_SIZE = 128  # rows per "context": the store's unit of shards and held-out splits
CHILD_RATE = 0.5  # P(child fires | its parent fires)
COEF_RANGE = (0.5, 1.5)  # coefficient magnitudes are uniform in this range
#: the least firing probability ``sample`` takes: its geometric gaps (up to ~37 / p rows) stay well inside int64
MIN_PROB = 1e-15
TRUTH_NPY, TRUTH_JSON = "truth.npy", "truth.json"
#: the hooks (and store folders) of a planted pair (``d_out`` > 0): the side read, the side reconstructed
IN_HOOK, OUT_HOOK = "synthetic.in", "synthetic.out"
#: the firing-frequency laws of the free features (``--firing``)
FIRINGS = ("uniform", "zipf")
N_TRUE_DEFAULT = 256  # --n-true when not given: --superposition replaces it


@dataclass
class SyntheticConfig(JSONConfig):
    """What `saelab synthetic` writes: a store of rows built from known (planted) features."""

    out: str = _f("", "output store folder (gets manifest.json, shards, truth.npy, truth.json); with --d-out a RUN "
                      f"folder of the two stores {IN_HOOK}/ and {OUT_HOOK}/", required=True)
    d: int = _f(64, "width of each row (the store's d_in)")
    d_out: int = _f(0, f"N > 0: write a transcoder pair instead, {IN_HOOK} (rows c·A of width --d) and {OUT_HOOK} "
                       "(rows c·B of width N: the same sparse coefficients c, B its own random unit directions); 0: "
                       "one store", min=0)
    n_true: int = _f(N_TRUE_DEFAULT, "number of planted feature directions")
    superposition: float = _f(0.0, "S > 0: plant round(S × --d) features instead of --n-true (S features per "
                                   "dimension); 0: --n-true", min=0.0)
    active: float = _f(5.0, "mean number of active features per row")
    rows: int = _f(65536, f"rows to write (rounded down to whole contexts of {CONTEXT_SIZE})")
    bidirectional: int = _f(0, "how many features get a random-sign coefficient (fire in both directions)")
    hierarchy: int = _f(0, "number of parent features, each with --children features that fire only with it")
    children: int = _f(4, "child features per hierarchy parent")
    child_rate: float = _f(CHILD_RATE, "probability that a parent's children fire when it fires: each child on its "
                                       "own, or with --exclusive-children one of them", min=0.0, max=1.0)
    exclusive_children: bool = _f(False, "at most one child fires with its parent (the children exclude each other: "
                                         "a parent's cases split among them)")
    orthogonal_children: bool = _f(False, "make each child's direction orthogonal to its parent's (its component "
                                          "along the parent removed, then unit norm): the conditionally orthogonal "
                                          "children of hierarchical concepts (Costa et al. 2025, MP-SAE)")
    firing: str = _f("uniform", "firing frequencies of the non-child features: uniform (all the same) or zipf "
                                "(p_i ∝ (rank_i + 1)^-exponent over a seeded random ranking), scaled so a row has "
                                "--active features on average", choices=list(FIRINGS))
    zipf_exponent: float = _f(1.0, "exponent of --firing zipf (> 0; larger: a steeper fall from the most frequent "
                                   "feature)")
    correlation: float = _f(0.0, "ρ in [0, 1): the non-child features fire together through a Gaussian copula "
                                 "with --correlation-rank shared factors (each feature's latent z = sqrt(1-ρ)·noise "
                                 "+ sqrt(ρ)·factors, it fires where Φ(z) < p); 0: independently")
    correlation_rank: int = _f(4, "number of shared factors of --correlation", min=1)
    holdout: float = _f(0.05, "fraction of rows (the last contexts) held out for evaluation, in their own shards")
    shard_rows: int = _f(16384, f"target rows per shard (rounded down to whole contexts of {CONTEXT_SIZE})")
    dtype: str = _f("float32", "storage dtype of the rows", choices=["float32", "float16"])
    seed: int = _f(0, "seed of directions and rows; the same seed gives byte-identical stores")

    def __post_init__(self):
        # --superposition S > 0 stands for --n-true round(S × d): n_true holds that from here on (validate refuses
        # another --n-true given with it), so the recorded config gives the same store again
        s = self.superposition
        if (isinstance(s, (int, float)) and math.isfinite(s) and s > 0 and isinstance(self.d, int)
                and self.n_true == N_TRUE_DEFAULT):
            self.n_true = round(s * self.d)

    def validate(self) -> "SyntheticConfig":
        self.check_numbers()  # each number in its type's range before any rule relates them
        if self.d >= 1 and self.superposition > 0:
            want = round(self.superposition * self.d)
            if self.n_true != want:
                raise SaelabError(f"--superposition {self.superposition} (round(S × --d) = {want} features) and "
                                  f"--n-true {self.n_true} both set the number of features: pass one of them")
            if want < 1:
                raise SaelabError(f"--superposition {self.superposition} × --d {self.d} rounds to 0 features: "
                                  "raise --superposition")
        if self.d < 1 or self.n_true < 1:
            raise SaelabError(f"--d and --n-true must be positive (got {self.d}, {self.n_true})")
        if self.firing not in FIRINGS:
            raise SaelabError(f"--firing must be one of {', '.join(FIRINGS)} (got {self.firing})")
        if self.zipf_exponent <= 0:
            raise SaelabError(f"--zipf-exponent must be positive (got {self.zipf_exponent})")
        if not 0 <= self.correlation < 1:
            raise SaelabError(f"--correlation must be in [0, 1) (got {self.correlation})")
        if not 0 < self.active < self.n_true:
            raise SaelabError(f"--active must be in (0, --n-true={self.n_true}) (got {self.active})")
        if min(self.bidirectional, self.hierarchy, self.children) < 0:
            raise SaelabError("--bidirectional, --hierarchy and --children must be non-negative")
        if self.orthogonal_children and not (self.hierarchy and self.children):
            raise SaelabError("--orthogonal-children orients the children of --hierarchy parents, and this store has "
                              "none: pass --hierarchy N (with --children M > 0), or drop it")
        if self.orthogonal_children and self.d < 2:
            raise SaelabError("--orthogonal-children needs --d 2 or more (in one dimension a child cannot be "
                              "orthogonal to its parent)")
        used = self.bidirectional + self.hierarchy * (1 + self.children)
        if used > self.n_true:
            raise SaelabError(f"--bidirectional + --hierarchy * (1 + --children) = {used} exceeds --n-true "
                              f"{self.n_true}: raise --n-true or lower those")
        if feature_prob(self) >= 1:
            raise SaelabError(f"--active {self.active} needs features firing with probability >= 1: lower --active "
                              "or --hierarchy")
        zipf = self.firing == "zipf"
        probs = feature_probs(self) if zipf else None
        if zipf and float(probs.max()) >= 1:
            raise SaelabError(f"--active {self.active} with --firing zipf --zipf-exponent {self.zipf_exponent} gives "
                              f"the most frequent feature a firing probability of {float(probs.max()):.3g} >= 1: "
                              "lower --active or --zipf-exponent")
        if self.rows < CONTEXT_SIZE:
            raise SaelabError(f"--rows must be at least one context ({CONTEXT_SIZE}); got {self.rows}")
        firing = self.active * (self.rows // CONTEXT_SIZE * CONTEXT_SIZE)
        if firing < 1:
            raise SaelabError(f"--active {self.active} over --rows {self.rows} expects {firing:.3g} firing features in "
                              "the whole store (active × rows), under 1: the store would be all zeros; raise --active "
                              "or --rows")
        if feature_prob(self) < MIN_PROB:
            raise SaelabError(f"--active {self.active} gives each feature a firing probability of "
                              f"{feature_prob(self):.3g}, under {MIN_PROB:g} (below it the gaps between firings "
                              "overflow the sampler): raise --active or lower --n-true")
        if zipf and float(probs.min()) < MIN_PROB:
            raise SaelabError(f"--firing zipf --zipf-exponent {self.zipf_exponent} gives the rarest feature a firing "
                              f"probability of {float(probs.min()):.3g}, under {MIN_PROB:g} (below it the gaps "
                              "between firings overflow the sampler): lower --zipf-exponent or --n-true, or raise "
                              "--active")
        if self.shard_rows < CONTEXT_SIZE:
            raise SaelabError(f"--shard-rows ({self.shard_rows}) must hold at least one context ({CONTEXT_SIZE})")
        if not 0 <= self.holdout < 1:
            raise SaelabError(f"--holdout must be in [0, 1) (got {self.holdout})")
        if self.dtype not in DTYPES:
            raise SaelabError(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype})")
        return self



# ------------------------------------------------------------------------- structure
def feature_prob(cfg: SyntheticConfig) -> float:
    """Firing probability p of every non-child feature under ``firing`` "uniform", so that a row has
    ``cfg.active`` on average."""
    n_child = cfg.hierarchy * cfg.children
    return cfg.active / (cfg.n_true - n_child + _per_parent(cfg) * cfg.hierarchy)


def _per_parent(cfg: SyntheticConfig) -> float:
    """Children expected to fire with a parent that fires."""
    return cfg.child_rate * (1 if cfg.exclusive_children and cfg.children else cfg.children)


def side_seed(cfg: SyntheticConfig, what: str) -> int:
    """The seed of a generator of its own for one structure drawn from ``cfg.seed`` (``what`` names it: "zipf
    ranks", "correlation factors"), so that drawing it leaves the directions and rows of the seed's main generator
    as they are: the first 63 bits of sha256("saelab.synthetic:SEED:WHAT")."""
    digest = hashlib.sha256(f"saelab.synthetic:{cfg.seed}:{what}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _side_generator(cfg: SyntheticConfig, what: str) -> torch.Generator:
    return torch.Generator().manual_seed(side_seed(cfg, what))


def zipf_ranks(cfg: SyntheticConfig) -> torch.Tensor:
    """The rank (0: most frequent) of each non-child feature under ``firing`` "zipf" ([free] long, in free order:
    parents, bidirectional, plain), a seeded permutation so the frequent features are not the low ids."""
    return torch.randperm(cfg.n_true - cfg.hierarchy * cfg.children, generator=_side_generator(cfg, "zipf ranks"))


def feature_probs(cfg: SyntheticConfig) -> torch.Tensor:
    """Firing probability p_i of each non-child feature ([free] float64, in free order: parents, bidirectional,
    plain), scaled so that a row has ``cfg.active`` features on average (a parent's children included): all
    ``feature_prob(cfg)`` under ``firing`` "uniform", ∝ (rank_i + 1)^-``zipf_exponent`` under "zipf"."""
    n_free = cfg.n_true - cfg.hierarchy * cfg.children
    if cfg.firing != "zipf":
        return torch.full((n_free,), feature_prob(cfg), dtype=torch.float64)
    w = (zipf_ranks(cfg).double() + 1) ** -float(cfg.zipf_exponent)
    weight = torch.ones(n_free, dtype=torch.float64)
    weight[: cfg.hierarchy] += _per_parent(cfg)  # a parent brings its children's expected firings with it
    return cfg.active * w / float((w * weight).sum())


def feature_probs_by_id(cfg: SyntheticConfig) -> list[float]:
    """P(feature fires) for each feature id; a child's entry is its rate given that its parent fires
    (``child_rate``, or ``child_rate / children`` with ``exclusive_children``)."""
    h, c = cfg.hierarchy, cfg.children
    free = feature_probs(cfg).tolist()
    kid = cfg.child_rate / c if cfg.exclusive_children and c else cfg.child_rate
    return free[:h] + [kid] * (h * c) + free[h:]


def correlation_factors(cfg: SyntheticConfig) -> torch.Tensor:
    """The copula's factors F [``correlation_rank``, free] float64 of ``correlation`` > 0: Gaussian, each column
    scaled to unit norm (so every z_i has variance 1), drawn from the seed by a generator of their own."""
    n_free = cfg.n_true - cfg.hierarchy * cfg.children
    f = torch.randn(cfg.correlation_rank, n_free, generator=_side_generator(cfg, "correlation factors"),
                    dtype=torch.float64)
    return f / f.norm(dim=0, keepdim=True).clamp_min(1e-300)


#: the work ``interference`` spends at most (n² (d + 32): the cosines and their maxima, in multiply-adds): past it
#: the mean is over every stride-th direction
INTERFERENCE_WORK = 1 << 33


def interference_stride(n: int, d: int) -> int:
    """Every how many directions ``interference`` averages over (1: all of them) for n directions of width d."""
    return max(1, math.ceil(n * n * (d + 32) / INTERFERENCE_WORK))


def interference(directions: torch.Tensor) -> float:
    """Mean over the planted directions of the largest |cosine| with another of them (0 for a single one). Past
    ``INTERFERENCE_WORK`` the mean is over every ``interference_stride``-th direction (each still against all the
    others): the directions are independent draws, so that is an unbiased estimate of it."""
    u = torch.as_tensor(directions).float()
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = len(u)
    if n < 2:
        return 0.0
    ids = torch.arange(0, n, interference_stride(n, u.shape[1]))
    step, best = max(1, (1 << 22) // n), []
    for a in range(0, len(ids), step):
        at = ids[a : a + step]
        cos = (u[at] @ u.T).abs()
        cos[torch.arange(len(at)), at] = -1  # not a direction's cosine with itself
        best.append(cos.max(dim=1).values)
    return float(torch.cat(best).double().mean())


def bidirectional_ids(cfg: SyntheticConfig) -> list[int]:
    start = cfg.hierarchy * (1 + cfg.children)
    return list(range(start, start + cfg.bidirectional))


def hierarchy_ids(cfg: SyntheticConfig) -> dict[int, list[int]]:
    """{parent id: [child ids]}."""
    h, c = cfg.hierarchy, cfg.children
    return {p: list(range(h + p * c, h + (p + 1) * c)) for p in range(h)}


def chunk_rows(cfg: SyntheticConfig) -> int:
    """Rows per call of ``sample`` in the writer (a function of the config only, so seeds reproduce)."""
    return CONTEXT_SIZE * max(1, (1 << 24) // (CONTEXT_SIZE * (4 * math.ceil(cfg.active) + cfg.d + cfg.d_out)))


# ---------------------------------------------------------------------------- sampling
def planted(cfg: SyntheticConfig) -> tuple[torch.Tensor, torch.Generator]:
    """(directions [n_true, d] float32 unit rows, the generator to draw rows from), from cfg.seed."""
    gen = torch.Generator().manual_seed(cfg.seed)
    dirs = torch.randn(cfg.n_true, cfg.d, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    if cfg.orthogonal_children:  # no draw: the rows, and every other direction, stay those of the option off
        for p, kids in hierarchy_ids(cfg).items():
            kid = dirs[kids] - (dirs[kids] @ dirs[p])[:, None] * dirs[p]
            dirs[kids] = kid / kid.norm(dim=1, keepdim=True)
    return dirs.float(), gen


def planted_out(cfg: SyntheticConfig, gen: torch.Generator) -> torch.Tensor:
    """A pair's target directions B [n_true, d_out] float32 unit rows, drawn from ``gen`` right after ``planted``'s
    directions (which so stay those of the single store of the same seed)."""
    dirs = torch.randn(cfg.n_true, cfg.d_out, generator=gen, dtype=torch.float64)
    return (dirs / dirs.norm(dim=1, keepdim=True)).float()


def sides(cfg: SyntheticConfig) -> tuple[list[torch.Tensor], torch.Generator]:
    """(the directions of each store written: [A] for one store, [A, B] for a pair, the generator to draw rows
    from)."""
    directions, gen = planted(cfg)
    return ([directions, planted_out(cfg, gen)] if cfg.d_out else [directions]), gen


def sample(cfg: SyntheticConfig, n: int, gen: torch.Generator,
           directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows: (x [n, d] float32, coefficients [n, n_true] sparse COO) with x = coefficients @ directions.

    Work and memory are O(n * (active + d)) for independent features (``correlation`` 0): the firing
    (row, feature) pairs are drawn as geometric gaps, over the flattened [n, features] grid under
    ``firing`` "uniform", along each feature's own rows under "zipf". With ``correlation`` > 0 the
    copula draws dense normals for every (row, free feature): O(n * n_true) work, in blocks of bounded
    memory. Every draw comes from ``gen`` in a fixed order, so the config and the generator's state
    give the same rows.
    """
    h, c = cfg.hierarchy, cfg.children
    n_free = cfg.n_true - h * c  # parents, bidirectional and plain features
    if cfg.correlation > 0:
        rows, free = _copula_firings(cfg, n, gen)
    elif cfg.firing == "zipf":
        rows, free = _zipf_firings(n, feature_probs(cfg), gen)
    else:
        rows, free = _uniform_firings(n, n_free, feature_prob(cfg), gen)
    key = rows * cfg.n_true + torch.where(free < h, free, free + h * c)  # skip the block of child ids
    parent = free < h
    if c and parent.any():  # already sorted by (row, feature) unless children join
        if cfg.exclusive_children:  # one child at most: which one, uniformly
            n_par = int(parent.sum())
            fires = torch.rand(n_par, generator=gen) < cfg.child_rate
            which = torch.randint(0, c, (n_par,), generator=gen)
            pr, kid = fires.nonzero(as_tuple=True)[0], which[fires]
        else:
            fire = torch.rand(int(parent.sum()), c, generator=gen) < cfg.child_rate
            pr, kid = fire.nonzero(as_tuple=True)
        key = torch.cat([key, key[parent][pr] + h + free[parent][pr] * (c - 1) + kid]).sort().values
    rows, feats = key // cfg.n_true, key % cfg.n_true
    vals = torch.empty(len(key)).uniform_(*COEF_RANGE, generator=gen)
    signs = torch.randint(0, 2, (len(key),), generator=gen) * 2 - 1
    bi = bidirectional_ids(cfg)
    if bi:
        vals = torch.where((feats >= bi[0]) & (feats <= bi[-1]), vals * signs, vals)
    coeffs = torch.sparse_coo_tensor(torch.stack([rows, feats]), vals, (n, cfg.n_true), check_invariants=False,
                                     is_coalesced=True)
    x = torch.sparse.mm(coeffs, directions)
    return x, coeffs


def _uniform_firings(n: int, n_free: int, p: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, free feature indices) of the ones in n × n_free iid Bernoulli(p) draws, sorted by (row, feature):
    geometric gaps over the flattened grid."""
    total = n * n_free
    step = int(total * p + 6 * math.sqrt(total * p) + 16)
    pos, last = [], -1
    while True:
        u = 1 - torch.rand(step, generator=gen, dtype=torch.float64)  # (0, 1]
        gaps = torch.floor(torch.log(u) / math.log1p(-p)).long() + 1
        at = last + torch.cumsum(gaps, 0)
        pos.append(at[at < total])
        if at[-1] >= total:
            break
        last = int(at[-1])
    pos = torch.cat(pos)
    return pos // n_free, pos % n_free


def _zipf_firings(n: int, p: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, feature indices) where feature i of len(p) fires, independently in each of n rows with probability
    p[i], sorted by (row, feature): geometric gaps along each feature's rows, each feature drawing a budget of
    n·p_i + 6·sqrt(n·p_i) + 16 gaps per round and the features that have not passed row n drawing again."""
    log_q = torch.log1p(-p)
    last = torch.full((len(p),), -1, dtype=torch.long)  # each feature's last row drawn
    todo = torch.arange(len(p))
    rows, feats = [], []
    while len(todo):
        mu = n * p[todo]
        budget = torch.ceil(mu + 6 * mu.sqrt() + 16).long()
        seg = torch.repeat_interleave(torch.arange(len(todo)), budget)
        u = 1 - torch.rand(len(seg), generator=gen, dtype=torch.float64)  # (0, 1]
        # a gap past row n ends its feature's rows: capped at n + 1, the sums stay far inside int64
        gaps = torch.floor(torch.log(u) / log_q[todo][seg]).clamp(max=n).long() + 1
        total = torch.cumsum(gaps, 0)
        ends = torch.cumsum(budget, 0) - 1
        before = torch.cat([total.new_zeros(1), total[ends[:-1]]])  # the sum of the segments before each
        at = last[todo][seg] + total - before[seg]
        keep = at < n
        rows.append(at[keep])
        feats.append(todo[seg[keep]])
        last[todo] = at[ends]
        todo = todo[at[ends] < n]
    rows, feats = torch.cat(rows), torch.cat(feats)
    order = torch.argsort(rows * len(p) + feats)
    return rows[order], feats[order]


def _copula_firings(cfg: SyntheticConfig, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, free feature indices) of the firings of the free features under ``correlation`` ρ > 0, sorted by
    (row, feature): feature i fires where z_i < Φ⁻¹(p_i) (that is Φ(z_i) < p_i), z = sqrt(1-ρ)·ε + sqrt(ρ)·(u @ F),
    ε [rows, free] and u [rows, rank] standard normals drawn from ``gen`` block by block, F the
    ``correlation_factors``. u @ F is summed factor by factor (elementwise, so no BLAS reorders it)."""
    factors = correlation_factors(cfg)
    threshold = torch.special.ndtri(feature_probs(cfg))
    a, b = math.sqrt(1 - cfg.correlation), math.sqrt(cfg.correlation)
    n_free = factors.shape[1]
    block = max(1, (1 << 22) // n_free)  # rows per draw: 32 MiB of float64 normals
    rows, feats = [], []
    for start in range(0, n, block):
        k = min(block, n - start)
        u = torch.randn(k, cfg.correlation_rank, generator=gen, dtype=torch.float64)
        z = a * torch.randn(k, n_free, generator=gen, dtype=torch.float64)
        for j in range(cfg.correlation_rank):
            z += b * u[:, j : j + 1] * factors[j]
        r, f = (z < threshold).nonzero(as_tuple=True)
        rows.append(r + start)
        feats.append(f)
    return torch.cat(rows), torch.cat(feats)


def stream(cfg: SyntheticConfig, n: int, gen: torch.Generator, directions: torch.Tensor,
           targets: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """The first n rows of the store in chunks of ``chunk_rows(cfg)`` (the last may be shorter); with ``targets``
    (a pair's B) each row is [x | y], x = c·directions and y = c·targets of the same coefficients c."""
    size = chunk_rows(cfg)
    for a in range(0, n, size):
        x, coeffs = sample(cfg, min(size, n - a), gen, directions)
        yield x if targets is None else torch.cat([x, torch.sparse.mm(coeffs, targets)], dim=1)


# ------------------------------------------------------------------------------ writer
def _save_npy(path: pathlib.Path, arr: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def write_synthetic(cfg: SyntheticConfig, progress: bool = True) -> pathlib.Path:
    """Write the store described by cfg at ``cfg.out`` (+ truth.npy, truth.json); returns the folder (with
    ``d_out``, the RUN folder of the pair's two stores)."""
    cfg.validate()
    out = pathlib.Path(cfg.out).expanduser()
    ctx = CONTEXT_SIZE
    n_contexts = cfg.rows // ctx
    # the store's size is known now: a one-line error before the plan (its length grows with --rows) and any write
    width = f"width {cfg.d}" + (f" and {cfg.d_out}, two stores" if cfg.d_out else "")
    check_free_space(out, n_contexts * ctx * (cfg.d + cfg.d_out) * np.dtype(DTYPES[cfg.dtype]).itemsize,
                     f"the synthetic store ({n_contexts * ctx:,} rows of {width})",
                     "free space, pass a smaller --rows or --d, --dtype float16, or another --out")
    plan = plan_shards(n_contexts, cfg.holdout, max(1, cfg.shard_rows // ctx))
    with no_empty_folder_left(out):  # a folder this run made goes again when it fails
        out_folder(out, resumable=False)  # there is no resume: a store is rebuilt from its seed
        with run_lock(out):  # one run at a time in a store folder: a refused one touches nothing
            try:
                return _write_synthetic(cfg, out, plan, n_contexts, progress)
            except BaseException:  # interrupted or failed: no half store (one is rebuilt from its seed)
                remove_contents(out)  # all in it is this run's: it was empty or missing
                raise


def _write_synthetic(cfg: SyntheticConfig, out: pathlib.Path, plan, n_contexts: int, progress: bool) -> pathlib.Path:
    ctx = CONTEXT_SIZE
    dirs, gen = sides(cfg)
    # (folder, hook, truth side) of each store: one store at out, or a pair's two stores in it
    stores = [(out, "synthetic", None)] if not cfg.d_out else [(out / IN_HOOK, IN_HOOK, "input"),
                                                              (out / OUT_HOOK, OUT_HOOK, "target")]
    pairs = [{"input": IN_HOOK, "target": OUT_HOOK}] if cfg.d_out else None
    writers = []
    for (folder, hook, side), directions in zip(stores, dirs):
        folder.mkdir(exist_ok=True)
        _save_npy(folder / TRUTH_NPY, directions.numpy())
        truth = {"n_true": cfg.n_true, "d": directions.shape[1], "bidirectional": bidirectional_ids(cfg),
                 "hierarchy": {str(k): v for k, v in hierarchy_ids(cfg).items()}, "active": cfg.active,
                 "seed": cfg.seed, "feature_prob": feature_prob(cfg) if cfg.firing != "zipf" else
                 float(feature_probs(cfg).mean()), "child_rate": cfg.child_rate,
                 "coef_range": list(COEF_RANGE), "firing": cfg.firing,
                 "superposition": cfg.n_true / directions.shape[1], "interference": interference(directions),
                 "config": cfg.to_dict()}
        if interference_stride(*directions.shape) > 1:  # the interference is the mean over every stride-th feature
            truth["interference_stride"] = interference_stride(*directions.shape)
        if cfg.firing == "zipf":  # per feature id; a child's entry is its rate given that its parent fires
            truth["feature_probs"] = feature_probs_by_id(cfg)
        if cfg.correlation > 0:  # the seed correlation_factors(cfg) draws F [rank, free] from
            truth["correlation"] = {"rho": cfg.correlation, "rank": cfg.correlation_rank,
                                    "factor_seed": side_seed(cfg, "correlation factors")}
        if side:  # which of a pair's directions truth.npy holds (truth_codes makes that side's rows)
            truth["side"] = side
        atomic_write_text(folder / TRUTH_JSON, json.dumps(truth, indent=1) + "\n")
        writers.append(ShardWriter(folder, new_manifest(
            model="synthetic", hook=hook, d_in=directions.shape[1], dtype=cfg.dtype, context_size=ctx,
            bos_included=False, seed=cfg.seed, dataset={"name": "synthetic", "split": None, "text_column": None},
            has_grads=False, head_layout=None, n_contexts_planned=n_contexts, tokenizer_bos=None, model_info=None,
            pairs=pairs)))
    chunks = stream(cfg, n_contexts * ctx, gen, *dirs)
    left = torch.zeros(0, cfg.d + cfg.d_out)
    with tqdm(total=n_contexts * ctx, unit="row", unit_scale=True, disable=not progress, desc="synthetic",
              dynamic_ncols=True) as bar:
        for _, n, hold in plan:
            need, parts, have = n * ctx, [left], len(left)
            while have < need:
                parts.append(next(chunks))
                have += len(parts[-1])
            rows = torch.cat(parts)
            shard, left = rows[:need], rows[need:]
            for w, part in zip(writers, (shard[:, :cfg.d], shard[:, cfg.d:])):  # x | y: each store its columns
                w.write_shard(part.numpy().astype(DTYPES[cfg.dtype]), np.zeros((n, ctx), np.int32), holdout=hold)
            bar.update(need)
    for w in writers:
        w.finish()
    return out


def load_truth(folder: str | os.PathLike) -> tuple[torch.Tensor, dict]:
    """(directions [n_true, d] float32, truth.json as a dict with int keys in "hierarchy") of a synthetic store."""
    folder = pathlib.Path(folder)
    if not (folder / TRUTH_NPY).exists():
        raise SaelabError(f"{folder} holds no {TRUTH_NPY}: pass a store written by `saelab synthetic`")
    info = json.loads((folder / TRUTH_JSON).read_text())
    info["hierarchy"] = {int(k): v for k, v in info["hierarchy"].items()}
    return torch.from_numpy(np.load(folder / TRUTH_NPY, allow_pickle=False)), info


def truth_codes(folder: str | os.PathLike, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(true coefficients [len(rows), n_true], the rows they make [len(rows), d]) for the global rows ``rows`` of
    the synthetic store ``folder``: drawn again from its seed, in the order the writer drew them (row r of the
    store is row r of the draw), so a store keeps its truth in a few bytes. Only the draws up to the last asked
    row are made. Either store of a pair gives the same coefficients, and its own rows (x = c·A or y = c·B)."""
    _, info = load_truth(folder)
    cfg = SyntheticConfig.from_dict(info.get("config") or {})
    rows = np.asarray(rows, dtype=np.int64)
    total = (cfg.rows // CONTEXT_SIZE) * CONTEXT_SIZE
    if rows.size and (rows.min() < 0 or rows.max() >= total):
        raise SaelabError(f"rows must be in [0, {total}) for the store {folder}")
    dirs, gen = sides(cfg)
    directions = dirs[-1] if info.get("side") == "target" else dirs[0]  # this store's side of a pair
    sorted_rows, back = np.unique(rows, return_inverse=True)
    coef = torch.zeros(len(sorted_rows), cfg.n_true)
    x = torch.zeros(len(sorted_rows), directions.shape[1])
    size, start = chunk_rows(cfg), 0
    stop = int(sorted_rows[-1]) + 1 if sorted_rows.size else 0
    while start < stop:
        n = min(size, total - start)
        xs, cs = sample(cfg, n, gen, directions)
        lo, hi = np.searchsorted(sorted_rows, [start, start + n])
        if hi > lo:
            at = torch.arange(lo, hi)
            local = torch.from_numpy(sorted_rows[lo:hi] - start)
            cs = cs.coalesce()
            (r, c), v = cs.indices(), cs.values()
            slot = torch.full((n,), -1, dtype=torch.long)
            slot[local] = at
            keep = slot[r] >= 0
            coef[slot[r[keep]], c[keep]] = v[keep].float()
            x[at] = xs[local]
        start += n
    back = torch.from_numpy(back.reshape(-1))
    return coef[back], x[back]


# ----------------------------------------------------------------------------- metrics
def _cos_blocks(decoder, truth, signed_ids) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows of truth, cosines [rows, d_sae]) in blocks; |cos| for the features in signed_ids."""
    dec = torch.as_tensor(decoder).detach().float()
    tru = torch.as_tensor(truth).detach().float().to(dec.device)
    if dec.shape[1] != tru.shape[1]:
        raise SaelabError(f"decoder rows have width {dec.shape[1]}, truth {tru.shape[1]}: use the matching store")
    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    tru = tru / tru.norm(dim=1, keepdim=True).clamp_min(1e-12)
    signed = torch.zeros(len(tru), dtype=torch.bool, device=dec.device)
    if signed_ids:
        signed[torch.as_tensor(sorted(signed_ids), dtype=torch.long, device=dec.device)] = True
    step = max(1, (1 << 24) // max(1, len(dec)))
    for a in range(0, len(tru), step):
        cos = tru[a : a + step] @ dec.T
        yield slice(a, a + step), torch.where(signed[a : a + step, None], cos.abs(), cos)


def best_match(decoder, truth, signed_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each true feature, (max cosine over decoder rows [n_true], that row's index [n_true])."""
    cos, idx = [], []
    for _, c in _cos_blocks(decoder, truth, signed_ids):
        m = c.max(dim=1)
        cos.append(m.values)
        idx.append(m.indices)
    return torch.cat(cos).cpu(), torch.cat(idx).cpu()


def mmcs(decoder, truth, signed_ids=None) -> float:
    """Mean over true features of the max cosine with any decoder row (|cos| for signed_ids)."""
    return best_match(decoder, truth, signed_ids)[0].mean().item()


def splits(decoder, truth, threshold: float = 0.5, signed_ids=None) -> torch.Tensor:
    """For each true feature, how many decoder rows have cosine >= threshold with it ([n_true] long)."""
    return torch.cat([(c >= threshold).sum(dim=1) for _, c in _cos_blocks(decoder, truth, signed_ids)]).cpu()
