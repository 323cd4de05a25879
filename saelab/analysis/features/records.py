"""The features file: its format (``features.h5`` layout and sizes), the SAE it is bound to, and the
records a latent's card is read into.

``features.h5`` layout (``FORMAT_VERSION`` 1). The per-latent datasets are stored contiguous and
row-major, so one latent's slice of each is one contiguous byte range that HDF5 reads directly,
with no chunk index to consult:

* attrs: format_version, sae_sha256 (of sae_weights.safetensors), d_sae, d_in, hook, model,
  arch, signed, store, n_rows (rows analysed, BOS excluded), context_size, before, after, top,
  n_bands, per_band, sections (JSON: name → [start, stop) in the example axis).
* [d_sae] arrays (read eagerly by FeatureDB): density, mean_act, max_act, min_act, count,
  group (−1 = none).
* per-latent arrays [d_sae, ...]: ex_rows [d_sae, E] int64 (−1 = empty),
  ex_vals [d_sae, E], ex_tokens [d_sae, E, W] int32 token ids (−1 = past the context's end),
  ex_acts [d_sae, E, W], hist [d_sae, N_BINS] int64, logit_top_ids / logit_top /
  logit_bottom_ids / logit_bottom [d_sae, N_LOGITS], neighbours / neighbour_cos
  [d_sae, N_NEIGHBOURS]; for ``hook_z`` SAEs head_share [d_sae, n_heads] (attr n_heads): each
  head's share of the decoder row's squared norm. Window j of example e starts at context position
  max(0, p − before) for p = row % context_size, so the example's own token is at index
  min(p, before).
* shared: hist_edges [N_BINS + 1]; vocab_blob (uint8, UTF-8) + vocab_offsets [V + 1]: the token
  strings, so a card is decoded without loading the model or its tokenizer.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field

import numpy as np

from saelab.errors import SaelabError
from saelab.fs import sha256_file
from saelab.layout import WEIGHTS_FILE, read_sae_cfg
from saelab.schema import BOOL, POSITIVE, TEXT, WHOLE, check, obj

FORMAT_VERSION = 1
BEFORE, AFTER = 10, 4  # tokens of context shown before / after an example's token
WINDOW = BEFORE + 1 + AFTER
N_BANDS = 4  # quantile bands: equal fractions of the latent's max |activation|
PER_BAND = 5  # examples kept per band
RESERVOIR = 8  # random samples kept per (latent, running band) during the pass
N_BINS = 64
PER_LATENT = ("ex_rows", "ex_vals", "ex_tokens", "ex_acts", "hist", "logit_top_ids", "logit_top",
              "logit_bottom_ids", "logit_bottom", "neighbours", "neighbour_cos", "head_share")
EAGER = ("density", "mean_act", "max_act", "min_act", "count", "group")
LOGITS = ("logit_top_ids", "logit_top", "logit_bottom_ids", "logit_bottom")

#: the attributes of features.h5, as Python values (see ``file_attrs``)
ATTRS_SCHEMA = obj({
    "format_version": POSITIVE, "sae_sha256": TEXT, "d_sae": POSITIVE, "d_in": POSITIVE, "hook": TEXT, "model": TEXT,
    "arch": TEXT, "signed": BOOL, "store": TEXT, "n_rows": WHOLE, "context_size": POSITIVE, "before": WHOLE,
    "after": WHOLE, "top": WHOLE, "n_bands": POSITIVE, "per_band": WHOLE, "sections": TEXT, "bos_excluded": BOOL,
    "n_heads": POSITIVE, "head_layer": {"type": "integer", "minimum": -1},
}, required=("format_version", "sae_sha256", "d_sae", "d_in", "hook", "model", "arch", "signed", "n_rows",
             "context_size", "before", "n_bands", "sections"))
#: the "sections" attribute: example-axis ranges by name
SECTIONS_SCHEMA = {"type": "object", "additionalProperties": {"type": "array", "items": WHOLE, "minItems": 2,
                                                              "maxItems": 2}}


def file_attrs(attrs) -> dict:
    """An HDF5 attribute set as Python values (numpy scalars unwrapped, bytes decoded), for ``ATTRS_SCHEMA``."""
    out = {}
    for k, v in attrs.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        out[k] = v if isinstance(v, (bool, int, float, str)) else repr(v)
    return out


def check_features_file(f, path, fix: str) -> tuple[dict, dict]:
    """(attrs, sections) of the open features file ``f`` once every attribute has its type and range and every
    dataset a card or search reads has the kind and shape the format gives it (see the module docstring), so a
    reader can index it without a check of its own; SaelabError naming the file and the field otherwise."""
    def bad(why):
        return SaelabError(f"{path} is not a valid features file: {why}; {fix}")

    attrs = check(file_attrs(f.attrs), ATTRS_SCHEMA, path, "features file", fix)
    if attrs["format_version"] > FORMAT_VERSION:
        raise SaelabError(f"{path} has format {attrs['format_version']}, newer than this saelab: upgrade saelab")
    try:
        sections = json.loads(attrs["sections"])
    except ValueError:
        raise bad("sections: not JSON") from None
    check(sections, SECTIONS_SCHEMA, path, "features file (its sections attribute)", fix)
    d = attrs["d_sae"]

    def dataset(name, ndim, kind, lead=d):
        ds = f.get(name)
        if ds is None or not hasattr(ds, "shape"):
            raise bad(f"{name}: missing")
        if len(ds.shape) != ndim or (lead is not None and ds.shape[0] != lead) or ds.dtype.kind not in kind:
            raise bad(f"{name}: {ds.dtype} {tuple(ds.shape)}, not {'an integer' if kind == 'iu' else 'a float'} "
                      f"array of {ndim} dimension(s)" + (f" over {lead} latents" if lead is not None else ""))
        return ds

    for name in EAGER:
        dataset(name, 1, "iu" if name in ("count", "group") else "f")
    n_ex = dataset("ex_rows", 2, "iu").shape[1]
    if dataset("ex_vals", 2, "f").shape[1] != n_ex:
        raise bad(f"ex_vals: {n_ex} examples in ex_rows, a different number here")
    for name, kind in (("ex_tokens", "iu"), ("ex_acts", "f")):
        if dataset(name, 3, kind).shape[1] != n_ex:
            raise bad(f"{name}: {n_ex} examples in ex_rows, a different number here")
    edges = dataset("hist_edges", 1, "f", lead=None)
    if dataset("hist", 2, "iu").shape[1] != edges.shape[0] - 1:
        raise bad(f"hist: not one count per bin of hist_edges ({edges.shape[0] - 1})")
    if dataset("neighbour_cos", 2, "f").shape != dataset("neighbours", 2, "iu").shape:
        raise bad("neighbour_cos: not one value per entry of neighbours")
    present = [k for k in LOGITS if k in f]
    if present and len(present) != len(LOGITS):
        raise bad(f"{sorted(set(LOGITS) - set(present))[0]}: missing (the logit datasets come together)")
    for name in present:
        dataset(name, 2, "iu" if name.endswith("_ids") else "f")
    if "head_share" in f:
        dataset("head_share", 2, "f")
    dataset("vocab_blob", 1, "u", lead=None)
    offsets = dataset("vocab_offsets", 1, "iu", lead=None)[:]
    if len(offsets) < 1 or offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] > f["vocab_blob"].shape[0]:
        raise bad("vocab_offsets: not rising offsets into vocab_blob")
    for name, (a, b) in sections.items():
        if not a <= b <= n_ex:
            raise bad(f"sections[{json.dumps(name)}]: [{a}, {b}) is not within the {n_ex} examples")
    return attrs, sections


@dataclass
class Example:
    """One context window around an activating token."""

    row: int  # global row id in the store
    tokens: list[str]  # decoded token strings of the window
    acts: list[float]  # this latent's activation on each token of the window
    pos: int  # index in the window of the token the example is about
    value: float  # activation at pos


@dataclass
class LatentCard:
    latent: int
    density: float  # firing frequency (fraction of non-BOS rows with act != 0)
    mean_act: float  # mean of non-zero activations
    max_act: float  # largest activation
    hist_edges: list[float]  # histogram of non-zero |activations|, log-spaced bins
    hist_counts: list[int]
    top: list[Example]  # top-N by activation (signed SAEs: most positive)
    top_negative: list[Example]  # signed (abstopk) SAEs only: most negative; else []
    quantiles: list[tuple[str, list[Example]]]  # (band label, examples)
    logits_top: list[tuple[str, float]]  # tokens the decoder row promotes (via W_U)
    logits_bottom: list[tuple[str, float]]
    neighbours: list[tuple[int, float]]  # nearest latents by decoder cosine
    group: int | None  # matryoshka nesting group index, else None
    min_act: float = 0.0  # smallest activation (negative only for signed SAEs)
    count: int = 0  # rows where the latent fired
    heads: list[tuple[str, float]] = field(default_factory=list)  # hook_z SAEs: ("L1H2", share), largest first


def weights_identity(sae_dir) -> dict:
    """{"sae_sha256", "d_sae", "d_in"} of an SAE folder: what a features.h5 is written with and must match."""
    sae_dir = pathlib.Path(sae_dir).expanduser()
    cfg = read_sae_cfg(sae_dir)
    weights = sae_dir / WEIGHTS_FILE
    try:
        st = weights.stat()
    except OSError:
        raise SaelabError(f"{weights} is missing; point at an SAE folder (cfg.json + {WEIGHTS_FILE})") from None
    # the weights are written atomically (a new inode per save), so (inode, size, mtime) names one version:
    # hash each version once per process, not on every open of its features.h5
    key = (str(weights.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(weights)
    return {"sae_sha256": _SHA_CACHE[key], "d_sae": int(cfg["d_sae"]), "d_in": int(cfg["d_in"])}


_SHA_CACHE: dict[tuple, str] = {}
