"""Planted features: synthetic activation stores with a known dictionary, and recovery metrics.

``write_synthetic(cfg)`` writes an ordinary store (``manifest.json`` + shards, readable by
``ActivationStore``) whose rows are sparse non-negative combinations of ``n_true`` random unit
directions in ``d`` dimensions, plus ``truth.npy`` (the directions) and ``truth.json`` (which
features are bidirectional or hierarchical). An SAE trained on it is scored by how well its
decoder rows recover the directions (``mmcs``, ``splits``, ``best_match``).

Feature ids, in order: ``hierarchy`` parents, then each parent's ``children`` children
(child j of parent p is ``hierarchy + p * children + j``), then the ``bidirectional``
features, then the plain ones. Every feature except a child fires independently with the same
probability p, chosen so a row has ``active`` features on average; a child fires with
probability ``child_rate`` (default ``CHILD_RATE``) when its parent fires, never otherwise; with
``exclusive_children`` at most one child fires with its parent (chosen uniformly), the setting where
a child's latent can absorb its parent's (Chanin et al., "A is for Absorption"). Coefficients are
Uniform(0.5, 1.5), times a random sign for bidirectional features. Rows are drawn in chunks of
``chunk_rows(cfg)`` from one seeded generator, so a seed gives byte-identical stores.

With ``d_out`` > 0 the output is a transcoder's pair: a RUN folder of two row-aligned stores,
``synthetic.in`` (rows x = c·A, A the planted directions) and ``synthetic.out`` (rows y = c·B with
the same sparse coefficients c, B [n_true, d_out] random unit rows drawn from the seed after A), each
with its side's directions in truth.npy and a truth.json.
"""

from __future__ import annotations

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


@dataclass
class SyntheticConfig(JSONConfig):
    """What `saelab synthetic` writes: a store of rows built from known (planted) features."""

    out: str = _f("", "output store folder (gets manifest.json, shards, truth.npy, truth.json); with --d-out a RUN "
                      f"folder of the two stores {IN_HOOK}/ and {OUT_HOOK}/", required=True)
    d: int = _f(64, "width of each row (the store's d_in)")
    d_out: int = _f(0, f"N > 0: write a transcoder pair instead, {IN_HOOK} (rows c·A of width --d) and {OUT_HOOK} "
                       "(rows c·B of width N: the same sparse coefficients c, B its own random unit directions); 0: "
                       "one store", min=0)
    n_true: int = _f(256, "number of planted feature directions")
    active: float = _f(5.0, "mean number of active features per row")
    rows: int = _f(65536, f"rows to write (rounded down to whole contexts of {CONTEXT_SIZE})")
    bidirectional: int = _f(0, "how many features get a random-sign coefficient (fire in both directions)")
    hierarchy: int = _f(0, "number of parent features, each with --children features that fire only with it")
    children: int = _f(4, "child features per hierarchy parent")
    child_rate: float = _f(CHILD_RATE, "probability that a parent's children fire when it fires: each child on its "
                                       "own, or with --exclusive-children one of them", min=0.0, max=1.0)
    exclusive_children: bool = _f(False, "at most one child fires with its parent (the children exclude each other: "
                                         "a parent's cases split among them)")
    holdout: float = _f(0.05, "fraction of rows (the last contexts) held out for evaluation, in their own shards")
    shard_rows: int = _f(16384, f"target rows per shard (rounded down to whole contexts of {CONTEXT_SIZE})")
    dtype: str = _f("float32", "storage dtype of the rows", choices=["float32", "float16"])
    seed: int = _f(0, "seed of directions and rows; the same seed gives byte-identical stores")

    def validate(self) -> "SyntheticConfig":
        self.check_numbers()  # each number in its type's range before any rule relates them
        if self.d < 1 or self.n_true < 1:
            raise SaelabError(f"--d and --n-true must be positive (got {self.d}, {self.n_true})")
        if not 0 < self.active < self.n_true:
            raise SaelabError(f"--active must be in (0, --n-true={self.n_true}) (got {self.active})")
        if min(self.bidirectional, self.hierarchy, self.children) < 0:
            raise SaelabError("--bidirectional, --hierarchy and --children must be non-negative")
        used = self.bidirectional + self.hierarchy * (1 + self.children)
        if used > self.n_true:
            raise SaelabError(f"--bidirectional + --hierarchy * (1 + --children) = {used} exceeds --n-true "
                              f"{self.n_true}: raise --n-true or lower those")
        if feature_prob(self) >= 1:
            raise SaelabError(f"--active {self.active} needs features firing with probability >= 1: lower --active "
                              "or --hierarchy")
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
        if self.shard_rows < CONTEXT_SIZE:
            raise SaelabError(f"--shard-rows ({self.shard_rows}) must hold at least one context ({CONTEXT_SIZE})")
        if not 0 <= self.holdout < 1:
            raise SaelabError(f"--holdout must be in [0, 1) (got {self.holdout})")
        if self.dtype not in DTYPES:
            raise SaelabError(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype})")
        return self



# ------------------------------------------------------------------------- structure
def feature_prob(cfg: SyntheticConfig) -> float:
    """Firing probability p of every non-child feature, so that a row has ``cfg.active`` on average."""
    n_child = cfg.hierarchy * cfg.children
    per_parent = cfg.child_rate * (1 if cfg.exclusive_children and cfg.children else cfg.children)
    return cfg.active / (cfg.n_true - n_child + per_parent * cfg.hierarchy)


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
    return (dirs / dirs.norm(dim=1, keepdim=True)).float(), gen


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

    Work and memory are O(n * (active + d)): the firing (row, feature) pairs of the independent
    features are drawn as geometric gaps over the flattened [n, features] grid.
    """
    h, c = cfg.hierarchy, cfg.children
    n_free = cfg.n_true - h * c  # parents, bidirectional and plain features
    p, total = feature_prob(cfg), n * n_free
    step = int(total * p + 6 * math.sqrt(total * p) + 16)
    pos, last = [], -1
    while True:  # positions of the ones in n * n_free iid Bernoulli(p) draws
        u = 1 - torch.rand(step, generator=gen, dtype=torch.float64)  # (0, 1]
        gaps = torch.floor(torch.log(u) / math.log1p(-p)).long() + 1
        at = last + torch.cumsum(gaps, 0)
        pos.append(at[at < total])
        if at[-1] >= total:
            break
        last = int(at[-1])
    pos = torch.cat(pos)
    rows, free = pos // n_free, pos % n_free
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
                 "seed": cfg.seed, "feature_prob": feature_prob(cfg), "child_rate": cfg.child_rate,
                 "coef_range": list(COEF_RANGE), "config": cfg.to_dict()}
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
