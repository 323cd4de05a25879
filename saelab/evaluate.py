"""Evaluation: reconstruction metrics on a store's held-out rows, and the SAE spliced into the model.

* ``evaluate_store``: FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖², explained variance = 1 − FVU, mean L0,
  fraction of dead latents (never fired on the evaluated rows) and dense ones (> 10% of tokens).
* ``evaluate_model``: next-token CE of the clean model, with the SAE's reconstruction spliced in
  at its hook (a transcoder's output, computed from its input hook, in place of its output hook: the
  MLP replaced), and with that hook zero-ablated; CE-loss recovered =
  (CE_ablate − CE_sae) / (CE_ablate − CE_clean); KL(clean ‖ spliced) per token.
Streaming: bounded memory whatever the store's size. TopK-family SAEs (topk, abstopk,
matryoshka; gradient without grads) encode through the fused ``topk_encode`` + ``sparse_decode``
(no [batch, d_sae] tensor) on the path ``kernel`` names (default: the SAE's ``kernel``, i.e. the
``--kernel`` / ``SAELAB_KERNEL`` / auto dispatch); ``kernel="reference"`` is the dense encode.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saelab.device import device_of, pick_device
from saelab.errors import SaelabError
from saelab.fs import atomic_write_text, check_writable_in, run_lock
from saelab.hooks import flat_hook, mlp_hooks, relay
from saelab.kernels import sparse_decode
from saelab.kernels.dispatch import resolve_kernel
from saelab.layout import EVAL_FILE, check_eval, check_local_sae, read_eval, read_train_info
from saelab.options import EvalOptions
from saelab.sae.clt import as_pairs, decode_layer
from saelab.sae.topk import TopKSAE
from saelab.store import ActivationStore
from saelab.store.stream import PairedBatches

DENSE = 0.1
DENSE_BUDGET = 1 << 25  # elements of one [rows, d_sae] code tensor on the dense (non-TopK) paths: 128 MiB


def sparse_codes(sae, x: torch.Tensor, kernel: str | None = None):
    """(values [B, k], indices [B, k]) of a TopK-family SAE's inference codes through the fused
    encode, or None when the SAE is not in the family or the path is the dense reference."""
    kernel = kernel or getattr(sae, "kernel", "auto")
    if not isinstance(sae, TopKSAE) or resolve_kernel(kernel, x.device) == "reference":
        return None
    return sae.fused_codes(x, kernel=kernel)


def dense_chunks(sae, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(first row, rows) slices of ``x`` for a dense encode: each [rows, d_sae] code tensor within
    ``DENSE_BUDGET`` elements, so a wide non-TopK SAE (a 262k-latent Gemma Scope JumpReLU: 4 GiB per tensor for
    4,096 rows) never holds the batch's whole code matrix."""
    rows = max(1, DENSE_BUDGET // sae.d_sae)
    return [(a, x[a : a + rows]) for a in range(0, len(x), rows)]


def reconstruct(sae, x: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
    """x̂ = decode(encode(x)) (a skip transcoder's skip path added), sparse for the TopK family (see
    ``sparse_codes``), else dense in row chunks."""
    codes = sparse_codes(sae, x, kernel)
    if codes is not None:
        return sae.add_skip(x, sparse_decode(*codes, sae.W_dec, sae.b_dec))
    return torch.cat([sae(part) for _, part in dense_chunks(sae, x)])


@torch.no_grad()
def evaluate_store(sae, store: ActivationStore, split: str | None = None, skip_bos: bool = True,
                   max_rows: int = 1 << 17, batch_size: int = 4096, device="cpu", progress: bool = False,
                   scale: float = 1.0, kernel: str | None = None, target: ActivationStore | None = None,
                   scale_out: float = 1.0) -> dict:
    """Reconstruction metrics over the first ``max_rows`` rows of the split (in store order);
    ``scale`` multiplies the rows first (the trainer evaluates in its normalised units);
    ``kernel``: the TopK-family encode path (module docstring). A transcoder is scored against ``target``, the
    store of its output hook (row-aligned with ``store``; its rows times ``scale_out``): FVU of y."""
    from saelab.kernels import sparse_decode

    split = split or ("holdout" if store.split_shards("holdout") else "train")
    skip_bos = skip_bos and store.manifest.get("bos_included", False)
    n_avail = store.n_rows(split)
    if skip_bos:
        n_avail -= n_avail // store.context_size
    n = min(max_rows, n_avail)
    sae = sae.to(device).eval()
    it = store.batches(batch_size, split=split, tokens=n, seed=0, skip_bos=skip_bos, device=device, shuffle=False)
    if target is not None:  # the same settings over the aligned store: the same rows, in the same order
        it = PairedBatches(it, target.batches(batch_size, split=split, tokens=n, seed=0, skip_bos=skip_bos,
                                              device=device, shuffle=False))
    sq_err = sum_sq = 0.0
    sum_x = torch.zeros((target or store).d_in, dtype=torch.float64, device=device)
    fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    l0_sum, rows = 0.0, 0
    for x in tqdm(it, disable=not progress, desc="eval", unit="batch"):
        x, y = (x[0] * scale, x[1] * scale_out) if target is not None else (x * scale, None)
        codes = sparse_codes(sae, x, kernel)
        if codes is None:  # dense, in row chunks
            parts = []
            for _, part in dense_chunks(sae, x):
                f = sae.encode(part)
                parts.append(sae.decode(f))
                nz = f != 0
                fired += nz.sum(0)
                l0_sum += float(nz.sum())
            x_hat = torch.cat(parts)
        else:  # values, indices: a zero value (ReLU of a negative pick) is not a firing
            v, i = codes
            x_hat = sparse_decode(v, i, sae.W_dec, sae.b_dec)
            nz = v != 0
            fired.index_add_(0, i[nz], torch.ones_like(i[nz]))
            l0_sum += float(nz.sum())
        x_hat = sae.add_skip(x, x_hat)
        if y is not None:  # from here on x is what x_hat reconstructs
            x = y
        sq_err += float((x - x_hat).double().pow(2).sum())
        sum_sq += float(x.double().pow(2).sum())
        sum_x += x.double().sum(0)
        rows += len(x)
    total_var = sum_sq - float(sum_x.pow(2).sum()) / rows
    if total_var <= 1e-9 * sum_sq or sum_sq == 0:  # NaN compares false: check_fvu names it
        raise SaelabError(f"store {(target or store).path}: its {split} rows are constant (no variance), so the FVU is "
                          "undefined: harvest the store again")
    fvu = sq_err / total_var
    freq = fired.double() / rows
    return {"split": split, "rows": rows, "fvu": fvu, "explained_variance": 1 - fvu, "l0": l0_sum / rows,
            "dead_frac": float((fired == 0).double().mean()), "dense_frac": float((freq > DENSE).double().mean())}


@torch.no_grad()
def evaluate_layers(clt, inputs: list, targets: list, split: str | None = None, skip_bos: bool = True,
                    max_rows: int = 1 << 17, batch_size: int = 4096, device="cpu", progress: bool = False) -> dict:
    """A cross-layer transcoder's reconstruction metrics over its layers' aligned stores (``inputs``, ``targets``:
    one per layer): FVU of all the targets together and per layer (``fvu_layers``), mean L0 per layer (``l0``; the
    total over layers is ``l0_total``), and the dead and dense fractions over every layer's latents."""
    split = split or ("holdout" if inputs[0].split_shards("holdout") else "train")
    skip_bos = skip_bos and inputs[0].manifest.get("bos_included", False)
    n_avail = inputs[0].n_rows(split)
    if skip_bos:
        n_avail -= n_avail // inputs[0].context_size
    n = min(max_rows, n_avail)
    clt = clt.to(device).eval()

    def batches(stores):
        return [st.batches(batch_size, split=split, tokens=n, seed=0, skip_bos=skip_bos, device=device, shuffle=False)
                for st in stores]

    L = len(inputs)
    sq_err, sum_sq = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    sum_y = torch.zeros(L, targets[0].d_in, dtype=torch.float64)
    fired = torch.zeros(L, clt.d_sae, dtype=torch.long, device=device)
    l0_sum, rows = torch.zeros(L, dtype=torch.float64), 0
    for x, y in tqdm(PairedBatches(batches(inputs), batches(targets)), disable=not progress, desc="eval",
                     unit="batch"):
        codes = clt.codes(x * clt.in_scale[:, None])  # encoded once: the codes and the reconstruction
        y_hat = clt.decode_codes(codes) / clt.out_scale[:, None]
        nz = clt.dense(codes) != 0
        fired += nz.sum(0)
        l0_sum += nz.sum((0, 2)).double().cpu()
        sq_err += (y - y_hat).double().pow(2).sum((0, 2)).cpu()
        sum_sq += y.double().pow(2).sum((0, 2)).cpu()
        sum_y += y.double().sum(0).cpu()
        rows += len(x)
    var = sum_sq - sum_y.pow(2).sum(-1) / rows
    if bool((var <= 1e-9 * sum_sq).any()):
        raise SaelabError(f"store {targets[0].path}: its {split} rows are constant (no variance), so the FVU is "
                          "undefined: harvest the store again")
    fvu = float(sq_err.sum() / var.sum())
    freq = fired.double() / rows
    l0 = (l0_sum / rows).tolist()
    return {"split": split, "rows": rows, "fvu": fvu, "explained_variance": 1 - fvu, "l0": sum(l0) / L,
            "l0_total": sum(l0), "dead_frac": float((fired == 0).double().mean()),
            "dense_frac": float((freq > DENSE).double().mean()), "fvu_layers": (sq_err / var).tolist(), "l0_layers": l0}


def check_fvu(res: dict, sae, store, folder) -> dict:
    """``res`` (``evaluate_store``'s metrics) once its FVU is a number; a NaN or inf one is a one-line error naming
    which side holds them, the SAE's weights or the store's rows, so none reaches eval.json."""
    if not math.isfinite(res["fvu"]):
        sae.check_finite(folder)
        raise SaelabError(f"store {store.path}: its {res['split']} rows hold NaN or inf values, so the FVU is "
                          "undefined: harvest the store again")
    return res


def kl_per_position(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) at each position, over the vocabulary: [...] from logits [..., vocab]."""
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _zeroed(first: int):
    """A hook function zeroing an activation from position ``first`` on (the zero ablation)."""
    def zero(flat):
        new = flat.clone()
        new[:, first:] = 0
        return new
    return flat_hook(zero)


def _ce(model, tokens: np.ndarray, spliced_hooks: list, zero_hooks: list, batch_size: int, progress: bool) -> dict:
    """Next-token CE of the clean model, with ``spliced_hooks`` and with ``zero_hooks`` over these contexts;
    CE-loss recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean) and KL(clean ‖ spliced) per token."""
    device = device_of(model)
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0
    for a in tqdm(range(0, len(tokens), batch_size), disable=not progress, desc="eval CE", unit="batch"):
        t = torch.from_numpy(np.asarray(tokens[a : a + batch_size])).long().to(device)
        tgt = t[:, 1:]
        clean = model(t)[:, :-1].float()
        spliced = model.run_with_hooks(t, fwd_hooks=spliced_hooks)[:, :-1].float()
        ablated = model.run_with_hooks(t, fwd_hooks=zero_hooks)[:, :-1].float()
        for name, logits in [("clean", clean), ("sae", spliced), ("zero", ablated)]:
            totals[name] += float(F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum"))
        totals["kl"] += float(kl_per_position(clean, spliced).sum())
        count += tgt.numel()
    ce = {k: v / count for k, v in totals.items()}
    denom = ce["zero"] - ce["clean"]
    return {"ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"],
            # undefined (null) when zero-ablating costs nothing: no loss to recover
            "ce_loss_recovered": (ce["zero"] - ce["sae"]) / denom if abs(denom) > 1e-9 else None,
            "kl": ce["kl"], "eval_tokens": count}


@torch.no_grad()
def evaluate_model(sae, model, tokens: np.ndarray, skip_bos: bool = True, batch_size: int = 16,
                   progress: bool = False, kernel: str | None = None) -> dict:
    """CE clean / spliced / zero-ablated over these contexts, CE-loss recovered and KL
    (``kernel``: the TopK-family encode path of the splice, module docstring)."""
    hook, write = sae.cfg.hook_name, sae.cfg.output_hook  # a transcoder reads one hook and replaces another
    for h in dict.fromkeys((hook, write)):
        if h not in model.hook_dict:
            raise SaelabError(f"the SAE uses hook {h!r}, which model {getattr(model.cfg, 'model_name', '')} "
                              "does not have: pass the model the SAE was trained on")
    sae = sae.to(device_of(model)).eval()
    first = 1 if skip_bos else 0

    def spliced(x, flat):  # x: what the SAE reads, flat: what it replaces ([n, T, features] each)
        new = flat.clone()
        part = x[:, first:]
        new[:, first:] = reconstruct(sae, part.reshape(-1, part.shape[-1]).float(), kernel).to(flat.dtype) \
            .reshape(new[:, first:].shape)
        return new

    return _ce(model, tokens, relay(hook, write, spliced), [(write, _zeroed(first))], batch_size, progress)


def replacement_hooks(coders, first: int = 1, kernel: str | None = None) -> list:
    """Forward hooks replacing MLPs by transcoders, all in one forward: ``coders`` is {layer: transcoder} (each MLP
    by its own) or a cross-layer transcoder (every layer's MLP by the sum of what its layers up to it write).
    Positions before ``first`` (BOS) keep the real MLP outputs."""
    live: dict = {}  # {layer: its live MLP input, or a CLT layer's codes of it}, this forward's
    clt = coders if getattr(coders, "arch", None) == "clt" else None
    layers = range(clt.n_layers) if clt is not None else sorted(coders)

    def keep(L):
        def fn(flat):
            if clt is None:
                live[L] = flat
            else:  # a CLT layer's codes read its own input only: encoded once, decoded into every later output
                x = flat[:, first:].reshape(-1, clt.d_in).float()
                live[L] = as_pairs(clt.layer_codes(x * clt.in_scale[L], L, kernel))
        return flat_hook(fn)

    def write(m):
        def fn(flat):
            new = flat.clone()
            if clt is not None:  # what every layer up to m writes to m
                W = clt.W_dec * clt.mask
                y = clt.b_dec[m] + sum(decode_layer(live[l], W[l, :, m]) for l in range(m + 1))
                y = y / clt.out_scale[m]
            else:
                x = live[m][:, first:]
                y = reconstruct(coders[m], x.reshape(-1, x.shape[-1]).float(), kernel)
            new[:, first:] = y.to(flat.dtype).reshape(new[:, first:].shape)
            return new
        return flat_hook(fn)

    hooks = []
    for L in layers:
        read, out = mlp_hooks(L)
        hooks += [(read, keep(L)), (out, write(L))]
    return hooks


@torch.no_grad()
def evaluate_replacement(coders, model, tokens: np.ndarray, skip_bos: bool = True, batch_size: int = 16,
                         progress: bool = False, kernel: str | None = None) -> dict:
    """CE of the clean model, of the replacement model (every MLP that ``coders`` covers replaced at once:
    ``replacement_hooks``) and with those MLPs zero-ablated; CE-loss recovered and KL(clean ‖ replacement)."""
    first = 1 if skip_bos else 0
    clt = getattr(coders, "arch", None) == "clt"
    layers = list(range(coders.n_layers)) if clt else sorted(coders)
    for L in layers:
        for h in mlp_hooks(L):
            if h not in model.hook_dict:
                raise SaelabError(f"the model has no hook {h!r}: pass the model the transcoders were trained on")
    for c in ([coders] if clt else coders.values()):
        c.to(device_of(model)).eval()
    zeros = [(mlp_hooks(L)[1], _zeroed(first)) for L in layers]
    return _ce(model, tokens, replacement_hooks(coders, first, kernel), zeros, batch_size, progress)


def evaluate(sae_path, activations: str | None = None, model_name: str | None = None,
             n_contexts: int = EvalOptions.contexts, device: str = "auto", progress: bool = True, write: bool = True,
             model=None, suites=EvalOptions.suite, against=(), probe_datasets=(), judge=None,
             autointerp_latents: int = EvalOptions.autointerp_latents,
             absorption_words: int = EvalOptions.absorption_words,
             absorption_min_f1: float = EvalOptions.absorption_min_f1) -> dict:
    """What `saelab eval` does for one SAE folder: the ``suites`` named (``saelab.suites.SUITES``; "core": store
    metrics, and CE metrics when a model is given by name, ``model_name``, or already loaded, ``model``: a group's
    SAEs share one; "truth": planted-feature recovery; "absorption": first-letter absorption over that model's
    vocabulary (``absorption_words`` words at most, letters whose probe reaches F1 ``absorption_min_f1``); "probing": k-sparse probes over that model, on the bundled
    tasks and ``probe_datasets`` [(name, text column, label column)]; "autointerp": ``autointerp_latents`` latents
    explained and scored by ``judge``, default ``TokensJudge()``; "stability": agreement with the SAEs
    ``against``); writes
    eval.json (core's metrics at its top level, each other suite's under its name). The store is ``activations``
    or the one the SAE's train.json names; with neither, a one-line error."""
    from saelab.suites import parse_suites
    from saelab.targets import load_sae

    suites = parse_suites(suites)
    if n_contexts < 1:
        raise SaelabError(f"--contexts must be positive (got {n_contexts})")
    if "stability" in suites and not against:
        raise SaelabError("--suite stability compares SAEs that differ only by seed: pass the others with --against "
                          "SAE (once per SAE)")
    for s, what in (("absorption", "the model's activations on its vocabulary's words"),
                    ("probing", "the model's activations on labelled text"),
                    ("autointerp", "the model's activations on held-out text")):
        if s in suites and model is None and not model_name:
            raise SaelabError(f"--suite {s} reads {what}: pass --model, the model the SAE was trained on (e.g. tiny)")
    if write:
        check_local_sae(sae_path)  # eval.json is written next to the SAE
    sae_path = pathlib.Path(sae_path)
    sae = load_sae(sae_path)
    for s in ("truth", "absorption", "probing", "autointerp"):  # suites of one layer's SAE: a CLT is refused before any pass
        if s in suites:
            sae.one_layer(f"the {s} suite")
    others = [load_sae(p) for p in against] if "stability" in suites else []
    if "autointerp" in suites and judge is None:
        from saelab.suites.judges import TokensJudge

        judge = TokensJudge()
    args = (sae_path, sae, activations, model_name, n_contexts, device, progress, write, model, suites, others,
            probe_datasets, judge, autointerp_latents, absorption_words, absorption_min_f1)
    if not write:
        return _evaluate(*args)
    check_writable_in(sae_path, EVAL_FILE)  # before the pass, not after it
    # one run at a time in an SAE folder (train holds it while it trains there), from before the pass to eval.json
    with run_lock(sae_path, alternative="evaluate a copy of the SAE folder"):
        return _evaluate(*args)


def _evaluate(sae_path: pathlib.Path, sae, activations, model_name, n_contexts, device, progress, write,
              model, suites, others, probe_datasets, judge, autointerp_latents, absorption_words,
              absorption_min_f1) -> dict:
    from saelab.suites.absorption import absorption_scores
    from saelab.suites.autointerp import autointerp_scores
    from saelab.suites.probing import probing_scores
    from saelab.suites.stability import stability
    from saelab.suites.truth import truth_scores
    from saelab.targets import store_for_sae, target_store_for

    res: dict = {}
    if {"core", "truth", "autointerp"} & set(suites):  # FVU needs rows, CE and autointerp its text, truth its truth
        store = store_for_sae(sae_path, sae, activations)
    if model is None and model_name and {"core", "absorption", "probing", "autointerp"} & set(suites):  # once
        from saelab.models import load_model

        model = load_model(model_name, str(pick_device(device)))
    if "core" in suites:
        res.update(_core(sae_path, sae, store, n_contexts, device, progress, model))
    if "truth" in suites:
        res["truth"] = truth_scores(sae, store, target=target_store_for(sae, store))
    if "absorption" in suites:
        res["absorption"] = absorption_scores(sae, model, absorption_words, absorption_min_f1, progress=progress)
    if "probing" in suites:
        res["probing"] = probing_scores(sae, model, list(probe_datasets), progress=progress)
    if "autointerp" in suites:
        res["autointerp"] = autointerp_scores(sae, sae_path, model, store, judge, autointerp_latents,
                                              progress=progress)
    if "stability" in suites:
        res["stability"] = stability([sae, *others])
    if write:
        try:
            old = read_eval(sae_path) or {}
        except SaelabError:  # a damaged one: this run's replaces it whole
            old = {}
        if "ce_contexts" in res:
            old.pop("ce_contexts_asked", None)  # an earlier run's shortfall, not this one's
        new = check_eval({**old, **res}, sae_path / EVAL_FILE)
        atomic_write_text(sae_path / EVAL_FILE, json.dumps(new, indent=2) + "\n")
    return res


def _core(sae_path: pathlib.Path, sae, store, n_contexts, device, progress, model) -> dict:
    """The core suite: store metrics, and CE metrics with a model (``_evaluate`` loads the one named)."""
    from saelab.targets import layer_stores_for, target_store_for

    dev = pick_device(device)
    info = read_train_info(sae_path, "delete it and pass --activations STORE_OR_RUN")
    skip_bos = not info.get("train", {}).get("include_bos", False)
    res: dict = {}
    clt = sae.cfg.arch == "clt"
    if clt:  # every layer's stores; its CE replaces every MLP at once
        inputs, targets = layer_stores_for(sae, store)
        res.update(check_fvu(evaluate_layers(sae, inputs, targets, skip_bos=skip_bos, device=dev, progress=progress),
                             sae, store, sae_path))
    else:
        target = target_store_for(sae, store)  # a transcoder's output rows; None for an SAE
        res.update(check_fvu(evaluate_store(sae, store, skip_bos=skip_bos, device=dev, progress=progress,
                                            target=target), sae, store, sae_path))
    if model is not None:
        split = "holdout" if store.split_shards("holdout") else "train"
        toks = store.tokens(split)[:n_contexts]
        ce = (evaluate_replacement(sae, model, toks, skip_bos=skip_bos, progress=progress) if clt
              else evaluate_model(sae, model, toks, skip_bos=skip_bos, progress=progress))
        res.update(ce, ce_contexts=len(toks), ce_split=split)
        if len(toks) < n_contexts:
            res["ce_contexts_asked"] = n_contexts
    return res
