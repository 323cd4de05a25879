"""Harvest: run a model over text and store the activations of chosen hooks.

``harvest(cfg)`` writes one store per hook under ``cfg.out`` in a single pass of the model
(stopping after the deepest hooked block unless gradients need the loss). Shards are
planned up front from the number of contexts, written by a background thread while the
model computes the next shard, and each enters its manifest only once complete, so a run
killed at any point resumes (``resume=True``) to exactly the rows of an uninterrupted run.

Under ``torchrun`` (N ranks) the shard plan is the single-process one; rank r takes the
contiguous shards [r·S/N, (r+1)·S/N) of it (their contexts are a disjoint slice of the token
stream), writes them as a store of its own in ``<hook>/.rank<r>/``, and after a barrier rank 0
merges them (renamed into global order, ``first_row`` renumbered) under one manifest: the same
shards, rows and row numbers as a single-process harvest of the same tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import pathlib
import queue
import shutil
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saelab import distributed as dist
from saelab.config import HarvestConfig, check_resume_settings
from saelab.data import count_contexts, is_streaming, iter_contexts, load_documents
from saelab.errors import SaelabError
from saelab.fs import (atomic_write_text, check_free_space, fsync_dir, no_empty_folder_left, out_folder, run_lock,
                       sha256_file)
from saelab.hooks import check_reached, expand_hooks, flat_rows, forward
from saelab.layout import MANIFEST, RUN_FILE, RUN_SCHEMA, shard_name
from saelab.schema import read_json
from saelab.models import load_model, model_info, tokenizer_bos
from saelab.store import DTYPES, ShardWriter, new_manifest, plan_shards, read_manifest


def local_key(name: str) -> str:
    """How a run records ``--dataset`` and ``--model``: a local file or folder that exists as its
    absolute resolved path (so ``data/x.txt`` and ``/home/me/data/x.txt`` are one dataset on
    ``--resume``, and the manifest's model loads from any working folder); ``tiny`` and hub names
    as given."""
    if name == "tiny":  # the bundled corpus, even where a folder named tiny exists
        return name
    path = pathlib.Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _check_out(out: pathlib.Path, resume: bool) -> None:
    out_folder(out, resume=resume)
    if resume and not (out / RUN_FILE).exists():
        raise SaelabError(f"--resume: {out} holds no {RUN_FILE} to resume from; start it without --resume")


# below this many tokens, the up-front count keeps the token ids (int32: 128 MiB) for the run
KEEP_TOKENS = 1 << 25


def _keep(acts: dict, name: str, with_grads: bool):
    """A hook function that keeps the hooked tensor in ``acts`` under ``name`` (the name asked for: the bridge's
    hook points answer to aliases) and lets grads reach it."""
    def fn(tensor, hook):
        if with_grads:
            if tensor.requires_grad:
                tensor.retain_grad()
            else:
                tensor.requires_grad_(True)
        acts[name] = tensor

    return fn


def forward_batch(model, tokens: torch.Tensor, hooks: list[str], with_grads: bool, require_all: bool = True):
    """Run one batch; returns {hook: (acts [rows, d], grads [rows, d] | None)} on the CPU. Without grads the forward
    stops after the deepest hook. ``require_all``: a hook the forward never reached is an error (the probe checks
    them itself: a glob's matches may not run)."""
    acts: dict = {}
    fwd_hooks = [(h, _keep(acts, h, with_grads)) for h in hooks]
    if with_grads:
        with torch.enable_grad():
            logits, _ = forward(model, tokens, fwd_hooks)
            # next-token cross-entropy, summed over each context (and so over the batch)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
            loss.backward()
        return {h: (flat_rows(t.detach()).cpu(), flat_rows(t.grad).cpu()) for h, t in acts.items()}
    with torch.no_grad():
        _, reached = forward(model, tokens, fwd_hooks, stop_after=hooks)
    if require_all:
        check_reached(hooks, reached)
    return {h: (flat_rows(t).cpu(), None) for h, t in acts.items()}


def _take(contexts, n: int, ctx: int) -> np.ndarray:
    """The next n contexts as [≤n, ctx] int32 (fewer when the dataset runs out)."""
    got = list(itertools.islice(contexts, n))
    return np.stack(got) if got else np.empty((0, ctx), np.int32)


def harvest(cfg: HarvestConfig, resume: bool = False, progress: bool = True, model=None) -> dict[str, pathlib.Path]:
    """Run the harvest described by cfg; returns {hook: store folder}."""
    cfg.validate()
    cfg = dataclasses.replace(cfg, dataset=local_key(cfg.dataset), model=local_key(cfg.model))
    with no_empty_folder_left(cfg.out):  # a run that fails before writing leaves no empty --out behind
        return _checked_harvest(cfg, resume, progress, model)


def _intact_shards(folder: pathlib.Path) -> int:
    """How many of a store's first shards are whole (present, checksum as recorded); a damaged one is reported on
    stderr, and --resume rewrites from it on."""
    shards = read_manifest(folder)["shards"]
    for i, sh in enumerate(shards):
        path = folder / sh["file"]
        if not path.is_file() or sha256_file(path) != sh.get("sha256"):
            print(f"saelab: {path} is {'damaged' if path.is_file() else 'missing'}: harvesting it and the "
                  f"{len(shards) - i - 1} shard(s) after it again", file=sys.stderr)
            return i
    return len(shards)


def _checked_harvest(cfg: HarvestConfig, resume: bool, progress: bool, model) -> dict[str, pathlib.Path]:
    out = pathlib.Path(cfg.out)
    _check_out(out, resume)
    dist.barrier()  # every rank has checked --out before rank 0 writes into it
    with run_lock(out) if dist.is_main() else contextlib.nullcontext():  # one run at a time in a RUN folder
        if resume:
            _check_resumable(out, cfg)
        model = model if model is not None else load_model(cfg.model, dist.device_for(cfg.device))
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:  # grads are taken w.r.t. activations only
            p.requires_grad_(False)
        try:
            return _harvest(cfg, model, out, resume, progress)
        finally:
            for p in frozen:
                p.requires_grad_(True)


def _check_resumable(out: pathlib.Path, cfg: HarvestConfig) -> None:
    """--resume: the run's harvest.json is readable and records these settings and this many ranks."""
    saved = read_json(out / RUN_FILE, RUN_SCHEMA, "harvest record",
                      "the run cannot be resumed: harvest to a new --out")
    recorded = dict(saved["config"])
    for key in ("dataset", "model"):  # a run of an older saelab may hold a relative path
        if isinstance(recorded.get(key), str):
            recorded[key] = local_key(recorded[key])
    check_resume_settings(recorded, cfg.to_dict(), {"batch_size", "device", "out"}, out, "harvest to a new --out")
    if saved.get("world_size", 1) != dist.world_size():
        raise SaelabError(f"--resume with {dist.world_size()} process(es), but the run in {out} used "
                          f"{saved.get('world_size', 1)}: resume with the same number")


def _harvest(cfg: HarvestConfig, model, out: pathlib.Path, resume: bool, progress: bool) -> dict[str, pathlib.Path]:
    device = next(model.parameters()).device
    info = model_info(model)
    hooks = expand_hooks(model, cfg.hooks)
    pairs = cfg.all_pairs(info["n_layers"])
    for a, b in pairs:  # both hooks of a pair join the run's hooks (a hook also given by --hook once)
        try:
            hooks += [h for h in expand_hooks(model, [a, b]) if h not in hooks]
        except SaelabError as e:
            raise SaelabError(f"--pair {a}:{b}: {e}") from None
    if cfg.context_size > info["n_ctx"]:
        raise SaelabError(f"--context-size {cfg.context_size} exceeds the model's {info['n_ctx']} positions: lower it")
    tokenizer = model.tokenizer
    bos = tokenizer_bos(tokenizer)
    docs, text_col = load_documents(cfg.dataset, cfg.split, cfg.text_column, cfg.seed)

    ctx = cfg.context_size
    pretokenized = None
    if is_streaming(docs):
        if cfg.tokens is None:
            raise SaelabError(f"--dataset {cfg.dataset} is streamed from the hub: pass --tokens N (how many to harvest)")
        n_contexts = cfg.tokens // ctx
    else:
        wanted = None if cfg.tokens is None else cfg.tokens // ctx
        if wanted is not None and wanted * ctx <= KEEP_TOKENS:  # tokenize once, keep the ids
            pretokenized = _take(iter_contexts(docs, tokenizer, ctx, bos, text_col), wanted, ctx)
            available = len(pretokenized) if len(pretokenized) == wanted else count_contexts(
                docs, tokenizer, ctx, bos, text_col)
        else:
            available = count_contexts(docs, tokenizer, ctx, bos, text_col, limit=wanted)
        n_contexts = available if wanted is None else wanted
        if n_contexts > available:
            raise SaelabError(f"--tokens {cfg.tokens:,} is more than dataset '{cfg.dataset}' (split '{cfg.split}') "
                              f"provides: it gives "
                              f"{available * ctx:,} tokens ({available:,} contexts of {ctx}); pass --tokens "
                              f"{available * ctx} or fewer")
    if n_contexts < 1:
        raise SaelabError(f"dataset '{cfg.dataset}' gives no whole context of {ctx} tokens: lower --context-size")
    plan = plan_shards(n_contexts, cfg.holdout, max(1, cfg.shard_rows // ctx))

    for h in hooks:  # one folder per hook, named exactly by the hook
        if "/" in h or h.startswith("."):
            raise SaelabError(f"hook name {h} cannot name a folder")

    # probe one context for each hook's width and layout
    probe_acts: dict = {}
    with torch.no_grad():
        forward(model, torch.full((1, ctx), bos, dtype=torch.long, device=device),
                [(h, _keep(probe_acts, h, False)) for h in hooks], stop_after=hooks)
    acts = probe_acts
    # hooks asked for by name (by --hook or a pair), not by a pattern
    named = {h for h in cfg.hooks if not any(c in h for c in "*?[")} | {h for p in pairs for h in p}

    def per_pair(t):
        return t.ndim < 3 or tuple(t.shape[:2]) != (1, ctx) or (t.ndim == 4 and tuple(t.shape[2:]) == (ctx, ctx))

    # a pattern's matches the forward never reaches (bridge-internal aliases) or that are per pair of positions
    # (attention patterns) are left out, said on stderr; a hook named alone is an error
    dropped = [h for h in hooks if h not in named and (h not in acts or per_pair(acts[h]))]
    if dropped:
        hooks = [h for h in hooks if h not in dropped]
        if not hooks:
            raise SaelabError(f"the hook pattern(s) {', '.join(cfg.hooks)} match no per-position hook this model runs "
                              f"(left out: {', '.join(dropped[:4])}{', …' if len(dropped) > 4 else ''}): name hooks, "
                              "e.g. blocks.0.hook_resid_post")
        if dist.is_main():
            print(f"saelab: the hook pattern(s) also matched {len(dropped)} hook(s) this model never runs or that are "
                  f"per pair of positions ({', '.join(dropped[:4])}{', …' if len(dropped) > 4 else ''}): harvesting "
                  f"the other {len(hooks)}", file=sys.stderr)
    check_reached(hooks, set(acts))
    probe = {}
    for h in hooks:
        t = acts[h]
        if per_pair(t):
            raise SaelabError(f"hook {h} gives {list(t.shape)} for one context of {ctx} tokens, not one vector per "
                              "position (attention scores/patterns are per pair of positions): choose a "
                              "per-position hook, e.g. attn.hook_z or hook_attn_out")
        probe[h] = dict(d_in=int(np.prod(t.shape[2:])), shape=list(t.shape[2:]))

    if not resume:  # the store's size is known now, before the first shard
        row_bytes = sum(probe[h]["d_in"] for h in hooks) * np.dtype(DTYPES[cfg.dtype]).itemsize
        check_free_space(out, n_contexts * ctx * row_bytes * (2 if cfg.with_grads else 1),
                         f"the harvest ({n_contexts * ctx:,} rows of {len(hooks)} hook(s))",
                         "free space, pass a smaller --tokens, --dtype float16, or another --out")
    pair_records = [{"input": a, "target": b} for a, b in pairs]
    run_info = {"config": cfg.to_dict(), "hooks": hooks, "pairs": pair_records, "n_contexts": n_contexts, "plan": plan,
                "model_info": info, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    rank, world = dist.rank(), dist.world_size()
    if world > 1:
        run_info["world_size"] = world
    if not resume and rank == 0:
        atomic_write_text(out / RUN_FILE, json.dumps(run_info, indent=1) + "\n")
    dist.barrier()  # no rank writes a shard before the run file exists (else a kill could not be resumed)

    # this rank's shards: all of them in one process, a contiguous slice of the plan under torchrun
    mine = plan[len(plan) * rank // world : len(plan) * (rank + 1) // world]
    folders = {h: out / h if world == 1 else out / h / f".rank{rank}" for h in hooks}
    if world > 1 and resume and all(_complete(out / h) for h in hooks):
        dist.barrier()
        return {h: out / h for h in hooks}  # merged earlier
    writers: dict[str, ShardWriter] = {}
    if resume:  # the shards every hook holds whole (checksums checked: a damaged one is harvested again)
        done = min(_intact_shards(folders[h]) if (folders[h] / MANIFEST).exists() else 0 for h in hooks)
        for h in hooks:
            if (folders[h] / MANIFEST).exists():
                writers[h] = ShardWriter.resume(folders[h], done)
    else:
        done = 0
    for h in hooks:
        if h not in writers:
            head_layout = None
            if h.endswith("hook_z") and len(probe[h]["shape"]) == 2:
                head_layout = {"n_heads": probe[h]["shape"][0], "d_head": probe[h]["shape"][1]}
            writers[h] = ShardWriter(folders[h], new_manifest(
                model=cfg.model, hook=h, d_in=probe[h]["d_in"], dtype=cfg.dtype, context_size=ctx, bos_included=True,
                seed=cfg.seed, dataset={"name": cfg.dataset, "split": cfg.split, "text_column": text_col},
                has_grads=cfg.with_grads, head_layout=head_layout, n_contexts_planned=n_contexts,
                tokenizer_bos=bos, model_info=info,
                pairs=[r for r in pair_records if h in (r["input"], r["target"])] or None))

    contexts = iter(pretokenized) if pretokenized is not None else iter_contexts(docs, tokenizer, ctx, bos, text_col)
    skip = (mine[0][0] if mine else 0) + sum(n for _, n, _ in mine[:done])
    contexts = itertools.islice(contexts, skip, None)
    np_dtype = DTYPES[cfg.dtype]

    # the writer thread writes shard i while the model computes shard i+1
    q: queue.Queue = queue.Queue(maxsize=1)
    errors: list[BaseException] = []

    def writer():
        while (item := q.get()) is not None:
            try:
                if not errors:
                    for h, (acts, grads, toks, hold) in item.items():
                        writers[h].write_shard(acts, toks, grads, holdout=hold)
            except BaseException as e:  # surfaced in the main thread
                errors.append(e)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    total_rows = sum(n for _, n, _ in mine) * ctx
    bar = tqdm(total=total_rows, initial=sum(n for _, n, _ in mine[:done]) * ctx, unit="tok", unit_scale=True,
               disable=not progress or rank != 0, dynamic_ncols=True,
               desc=f"harvest {len(hooks)} hook{'s' if len(hooks) > 1 else ''}" +
                    (f" (rank 0 of {world})" if world > 1 else ""))
    try:
        for first, n, hold in mine[done:]:
            toks = _take(contexts, n, ctx)
            if len(toks) != n:
                raise SaelabError(f"dataset '{cfg.dataset}' ran out after {first + len(toks)} contexts: lower --tokens")
            rows = n * ctx
            bufs = {h: np.empty((rows, probe[h]["d_in"]), np_dtype) for h in hooks}
            gbufs = {h: np.empty((rows, probe[h]["d_in"]), np_dtype) for h in hooks} if cfg.with_grads else {}
            for a in range(0, n, cfg.batch_size):
                batch = torch.from_numpy(toks[a : a + cfg.batch_size]).long().to(device)
                res = forward_batch(model, batch, hooks, cfg.with_grads)
                r0, r1 = a * ctx, (a + len(batch)) * ctx
                for h, (acts, grads) in res.items():
                    bufs[h][r0:r1] = acts.numpy()
                    if grads is not None:
                        gbufs[h][r0:r1] = grads.numpy()
                bar.update(r1 - r0)
            if errors:
                raise errors[0]
            q.put({h: (bufs[h], gbufs.get(h), toks, hold) for h in hooks})
    finally:
        q.put(None)
        thread.join()
        bar.close()
    if errors:
        raise errors[0]
    for w in writers.values():
        w.finish()
    if world > 1:
        dist.barrier()  # every rank's shards are complete
        if rank == 0:
            for h in hooks:
                merge_rank_stores(out / h, world)
        dist.barrier()
    return {h: out / h for h in hooks}


def _complete(folder: pathlib.Path) -> bool:
    return (folder / MANIFEST).exists() and bool(read_manifest(folder).get("complete"))


def merge_rank_stores(folder: pathlib.Path, world: int) -> None:
    """Merge the per-rank stores ``folder/.rank<r>/`` (r in rank order) into the store ``folder``:
    shards renamed to global numbers, ``first_row`` renumbered, one manifest. Restartable: a
    merge killed half-way finds the shards it already moved."""
    parts = [read_manifest(folder / f".rank{r}") for r in range(world)]
    m = {**parts[0], "shards": [], "holdout_shards": [], "n_tokens": 0}
    for r, part in enumerate(parts):
        hold = set(part["holdout_shards"])
        for s in part["shards"]:
            name = shard_name(len(m["shards"]))
            src, dst = folder / f".rank{r}" / s["file"], folder / name
            if src.exists():
                os.replace(src, dst)
            elif not dst.exists():
                raise SaelabError(f"shard {src} of rank {r} is missing: harvest again into a new --out")
            m["shards"].append({**s, "file": name, "first_row": m["n_tokens"]})
            m["n_tokens"] += s["rows"]
            if s["file"] in hold:
                m["holdout_shards"].append(name)
    m["complete"] = True
    fsync_dir(folder)
    atomic_write_text(folder / MANIFEST, json.dumps(m, indent=1) + "\n")
    for r in range(world):
        shutil.rmtree(folder / f".rank{r}", ignore_errors=True)
