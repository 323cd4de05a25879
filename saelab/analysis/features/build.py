"""Building the feature database: ``analyze`` streams a store once through an SAE and writes ``features.h5``
into the SAE folder, atomically.

One pass, bounded memory, over the store in row order (``ActivationStore.batches(shuffle=False)``; batches
hold whole contexts). Per batch the SAE's codes become sparse entries (``codes.sparse_codes``) that the
accumulators take in (``accumulate.Accumulator``). After the pass: logit effects (``logit_lens.logit_effects``),
nearest latents by decoder cosine (``geometry.neighbours``), head shares for ``attn.hook_z`` SAEs, Matryoshka
nesting groups; then the file is written (its layout: ``records``) under its temp name and renamed into place,
h5py writing through a Python file object (``_Sink``), so a full disk is an OSError, not a crash. The SAE folder's
run lock is held from before the model loads to the rename: one analyze (or eval, or train) at a time in it.
"""

from __future__ import annotations

import json
import pathlib

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from saelab import interrupts
from saelab.analysis.features.accumulate import Accumulator
from saelab.analysis.features.codes import Batch, TokenReader, sparse_codes
from saelab.analysis.features.records import (
    AFTER,
    BEFORE,
    FORMAT_VERSION,
    N_BANDS,
    N_BINS,
    PER_BAND,
    WINDOW,
    weights_identity,
)
from saelab.analysis.geometry import head_shares, neighbours
from saelab.analysis.logit_lens import logit_effects
from saelab.device import one_thread, pick_device
from saelab.errors import SaelabError
from saelab.fs import atomic_file, check_free_space, check_writable_in, run_lock, write_error
from saelab.hooks import hook_layer
from saelab.layout import FEATURES_FILE, GROUP_FILE
from saelab.options import AnalyzeOptions
from saelab.targets import sae_folders, store_for_sae

BATCH_ROWS = 4096
MAX_TOP = 1000  # --top beyond this is a mistake: 1000 examples × 2 × d_sae windows is already gigabytes wide


def _head_layout(store, sae, model) -> dict | None:
    """{"n_heads", "layer"} when the SAE's decoder writes attn.hook_z with its heads flattened (an SAE reading it;
    a transcoder writing it), else None."""
    hook = sae.cfg.output_hook or store.hook
    if not hook.endswith("attn.hook_z"):
        return None
    n_heads = ((store.manifest.get("head_layout") or {}).get("n_heads") if hook == store.hook else None) or getattr(
        getattr(model, "cfg", None), "n_heads", None)
    if not n_heads or sae.cfg.output_dim % int(n_heads):
        return None
    return {"n_heads": int(n_heads), "layer": hook_layer(hook)}


def nesting_groups(sae) -> np.ndarray | None:
    """Matryoshka (prefix mode): the index of the smallest nested prefix holding each latent."""
    if getattr(sae, "arch", "") != "matryoshka" or sae.cfg.matryoshka_mode != "prefix":
        return None
    return np.searchsorted(np.array(sae.prefixes()), np.arange(sae.d_sae), side="right")


def _vocab(model) -> list[str]:
    tok = getattr(model, "tokenizer", None) if model is not None else None
    if tok is None:
        return []
    n = int(model.cfg.d_vocab)
    return tok.batch_decode([[i] for i in range(n)])


@torch.no_grad()
def analyze(sae_dir, activations=None, *, tokens=None, top=AnalyzeOptions.top, model=None, device="auto",
            progress=True, batch_size: int = BATCH_ROWS) -> pathlib.Path:
    """Writes <sae_dir>/features.h5 (atomically) and returns its path. activations: store folder or RUN
    folder (default: the store the SAE was trained on, from train.json). ``tokens``: analyse only the
    first N rows (rounded up to whole contexts). ``model``: a loaded model for logit effects and token
    strings (default: load the store's model; none for synthetic stores)."""
    sae_dir = pathlib.Path(sae_dir).expanduser()
    if (sae_dir / GROUP_FILE).is_file():
        raise SaelabError(f"{sae_dir} is a group folder: analyse it with `saelab analyze --sae {sae_dir}` "
                          "(or analyze() each of its SAE folders)")
    if not 1 <= int(top) <= MAX_TOP:  # every latent keeps 2 × top examples with their windows: d_sae × top sized
        raise SaelabError(f"--top must be between 1 and {MAX_TOP} (got {top}): it is the examples kept per latent, "
                          f"each with a {WINDOW}-token window (the default 20 is what the app shows)")
    if tokens is not None and int(tokens) < 1:
        raise SaelabError(f"--tokens must be at least 1 (got {tokens})")
    ident = weights_identity(sae_dir)
    check_writable_in(sae_dir, FEATURES_FILE)  # features.h5 is written at the end of the pass
    # one run at a time in an SAE folder (train holds it while it trains there), taken before the model loads
    with run_lock(sae_dir, alternative="analyse a copy of the SAE folder"):
        return _build(sae_dir, ident, activations, tokens=tokens, top=top, model=model, device=device,
                      progress=progress, batch_size=batch_size)


def _file_bytes(d_sae: int, top: int, signed: bool) -> int:
    """About how large features.h5 will be (its examples and histograms; the rest is small beside them), known
    before the pass from the SAE alone."""
    examples = top * (2 if signed else 1) + N_BANDS * PER_BAND
    per_example = 8 + 4 + 2 * 4 * WINDOW  # row, value, the window's tokens and activations
    return d_sae * (examples * per_example + 8 * N_BINS)


def _build(sae_dir: pathlib.Path, ident: dict, activations, *, tokens, top, model, device, progress,
           batch_size) -> pathlib.Path:
    from saelab.models import load_model
    from saelab.sae.base import SAE

    dev = pick_device(device)
    sae = SAE.load(sae_dir, device=dev).eval().one_layer("saelab analyze").check_finite(sae_dir)
    signed = bool(getattr(sae, "signed", False))
    check_free_space(sae_dir, _file_bytes(sae.d_sae, int(top), signed), f"the feature database of {sae_dir}",
                     "free space, or analyse a copy of the SAE folder on a disk with room")
    store = store_for_sae(sae_dir, sae, activations)
    name = store.manifest.get("model") or sae.cfg.model_name
    if model is None and name and name != "synthetic":
        model = load_model(name, device=str(dev))

    ctx = store.context_size
    n_all = store.n_rows("all")
    n = n_all if tokens is None else min(n_all, -(-int(tokens) // ctx) * ctx)
    bs = ctx * max(1, int(batch_size) // ctx)
    it = store.batches(bs, split="all", tokens=n, shuffle=False, device=dev)
    bos = bool(store.manifest.get("bos_included", False))
    acc = Accumulator(sae.d_sae, int(top), signed, dev)
    reader = TokenReader(store)
    r0 = 0
    with tqdm(total=n, disable=not progress, desc=f"analyze {store.hook}", unit="tok", unit_scale=True) as bar:
        for x in it:
            keys, vals = sparse_codes(sae, x)
            toks = torch.from_numpy(reader.get(r0, r0 + len(x))).to(dev)
            with one_thread(dev):
                acc.add(Batch(keys, vals, toks, r0, ctx, sae.d_sae), bos)
            r0 += len(x)
            bar.update(len(x))
    store.close()

    W_dec = sae.W_dec.detach()
    lt = logit_effects(model, sae)
    nb_ids, nb_cos = neighbours(W_dec)
    groups = nesting_groups(sae)
    heads = _head_layout(store, sae, model)
    q_rows, q_vals, q_tok, q_act = acc.quantiles()

    def np_(t):
        return t.detach().cpu().numpy()

    sections, ex = {}, {"rows": [], "vals": [], "tok": [], "act": []}

    def add_section(name, rows, vals, tok, act):
        start = sum(x.shape[1] for x in ex["rows"])
        sections[name] = [start, start + rows.shape[1]]
        for k_, t in zip(("rows", "vals", "tok", "act"), (rows, vals, tok, act)):
            ex[k_].append(t)

    for sec, buf in (("top", acc.pos), ("top_negative", acc.neg)):
        if buf is not None:
            _, val, row, tok, act = buf.sorted()
            add_section(sec, row, torch.where(row >= 0, val, 0.0), tok, act)
    add_section("quantiles", q_rows, q_vals, q_tok, q_act)

    cnt = acc.count
    fired = cnt > 0
    rows_counted = max(acc.rows, 1)
    small = {
        "density": np_(cnt.double() / rows_counted),
        "mean_act": np_(torch.where(fired, acc.sum / cnt.clamp_min(1), 0.0).float()),
        "max_act": np_(torch.where(fired, acc.max, 0.0)),
        "min_act": np_(torch.where(fired, acc.min, 0.0)),
        "count": np_(cnt),
        "group": groups if groups is not None else np.full(sae.d_sae, -1, dtype=np.int64),
    }
    edges = acc.edges if acc.edges is not None else torch.logspace(-3, 3, N_BINS + 1)
    per = {
        "ex_rows": np_(torch.cat(ex["rows"], 1)),
        "ex_vals": np_(torch.cat(ex["vals"], 1)).astype(np.float32),
        "ex_tokens": np_(torch.cat(ex["tok"], 1)).astype(np.int32),
        "ex_acts": np_(torch.cat(ex["act"], 1)).astype(np.float32),
        "hist": np_(acc.hist.view(sae.d_sae, N_BINS)),
        "neighbours": np_(nb_ids).astype(np.int32),
        "neighbour_cos": np_(nb_cos).astype(np.float32),
    }
    if lt is not None:
        per.update(logit_top_ids=np_(lt[0]).astype(np.int32), logit_top=np_(lt[1]),
                   logit_bottom_ids=np_(lt[2]).astype(np.int32), logit_bottom=np_(lt[3]))
    if heads is not None:
        per["head_share"] = np_(head_shares(W_dec, heads["n_heads"])).astype(np.float32)
    vocab = _vocab(model)
    attrs = {
        "format_version": FORMAT_VERSION, **ident, "hook": store.hook, "model": name or "",
        "arch": sae.arch, "signed": signed, "store": str(store.path), "n_rows": acc.rows, "context_size": ctx,
        "before": BEFORE, "after": AFTER, "top": int(top), "n_bands": N_BANDS, "per_band": PER_BAND,
        "sections": json.dumps(sections), "bos_excluded": bos,
        **({"n_heads": heads["n_heads"], "head_layer": -1 if heads["layer"] is None else heads["layer"]}
           if heads is not None else {}),
    }
    final = sae_dir / FEATURES_FILE
    _check_finite({**small, **per}, store, final)
    try:
        with atomic_file(final) as tmp:
            _write(tmp, attrs, small, per, np_(edges).astype(np.float64), vocab)
    except OSError as e:  # a full disk or a file-size limit: the temp file is gone, the previous features.h5 kept
        raise write_error(final, e, f"free space, or analyse a copy of the SAE folder on a disk with room; the "
                                    f"previous {FEATURES_FILE} (if any) is kept") from None
    return final


def _check_finite(arrays: dict, store, final: pathlib.Path) -> None:
    """No NaN or inf goes into features.h5: the weights are checked before the pass, so one here came from the
    store's rows (a one-line error naming the store and the first dataset it reached)."""
    for name, a in arrays.items():
        if a.dtype.kind != "f":
            continue
        flat = a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)
        for i in range(0, flat.shape[0], 4096):  # in blocks: the check's own memory stays small
            if not np.isfinite(flat[i : i + 4096]).all():
                raise SaelabError(f"store {store.path}: its rows hold NaN or inf values ({name} would hold them), so "
                                  f"no {final.name} is written: harvest the store again")


class _Sink:
    """The file h5py writes features.h5 through (``h5py.File(fileobj)``): every call goes to the real file, and the
    first exception of one (an OSError of a full disk or a file-size limit, the KeyboardInterrupt of a Ctrl-C or
    SIGTERM held over the write) is kept, because h5py turns an exception in its file callbacks into one of its
    own (a RuntimeError, a SystemError) or loses it. HDF5 writing the file itself, under its own file driver,
    crashed the process (a segfault) when a write failed; through Python the failure comes back as the exception.
    A held interrupt is raised here, in a callback, and nowhere else inside h5py."""

    def __init__(self, f, hold: interrupts.Held):
        self._f, self._hold, self.error = f, hold, None

    def __getattr__(self, name):
        method = getattr(self._f, name)
        if not callable(method):
            return method

        def call(*args):
            if self.error is not None:  # the file is broken: nothing more goes into it
                raise self.error
            try:
                self._hold.check()
                return method(*args)
            except BaseException as e:
                self.error = e
                raise
        return call


def _write(tmp: pathlib.Path, attrs: dict, small: dict, per: dict, edges: np.ndarray, vocab: list[str]) -> None:
    with open(tmp, "wb") as raw, interrupts.held() as hold:
        sink = _Sink(raw, hold)
        try:
            with h5py.File(sink, "w", libver="latest") as f:
                _fill(f, attrs, small, per, edges, vocab)
        except BaseException:
            if sink.error is not None:
                raise sink.error from None
            raise
        if sink.error is not None:  # h5py swallowed it: the file is not whole
            raise sink.error


def _fill(f: h5py.File, attrs: dict, small: dict, per: dict, edges: np.ndarray, vocab: list[str]) -> None:
    f.attrs.update(attrs)
    for k_, v in small.items():
        f.create_dataset(k_, data=v)
    for k_, v in per.items():  # contiguous, row-major: one latent = one contiguous byte range
        f.create_dataset(k_, data=v)
    f.create_dataset("hist_edges", data=edges)
    blob = [s.encode("utf-8", "surrogatepass") for s in vocab]
    f.create_dataset("vocab_offsets", data=np.concatenate([[0], np.cumsum([len(s) for s in blob])]).astype(np.int64))
    f.create_dataset("vocab_blob", data=np.frombuffer(b"".join(blob), dtype=np.uint8))


def analyze_all(path, activations=None, **kw) -> list[pathlib.Path]:
    """``analyze`` every SAE of ``path`` (a group folder's SAEs, or the one SAE folder)."""
    return [analyze(folder, activations, **kw) for folder in sae_folders(path)]
