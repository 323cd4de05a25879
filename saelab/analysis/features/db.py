"""Reading the feature database: ``FeatureDB`` opens ``features.h5`` (refusing one written for another SAE),
reads the small [d_sae] arrays eagerly and one latent's slices per ``card``, and searches latents by token.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import pathlib
import weakref

import h5py
import numpy as np

from saelab.analysis.features.records import (
    EAGER,
    PER_LATENT,
    Example,
    LatentCard,
    check_features_file,
    weights_identity,
)
from saelab.errors import SaelabError, first_line
from saelab.fs import check_regular
from saelab.layout import FEATURES_FILE


class _CountingFile(io.FileIO):
    """A read-only file that counts the bytes HDF5 reads through it (``bytes_read``)."""

    bytes_read = 0

    def readinto(self, b):
        n = super().readinto(b)
        self.bytes_read += n or 0
        return n

    def read(self, size=-1):
        data = super().read(size)
        self.bytes_read += len(data)
        return data


# h5py reads through a Python file object here (to count bytes); closing such a file during
# interpreter teardown, after the modules it calls back into are gone, crashes the process — so
# every database still open is closed at exit, while the interpreter is whole.
_OPEN: "weakref.WeakSet[FeatureDB]" = weakref.WeakSet()


@atexit.register
def _close_open_databases() -> None:
    for db in list(_OPEN):
        db.close()


class FeatureDB:
    """Read access to ``features.h5``: small [d_sae] arrays eagerly, one latent's slices per ``card``.

    Refuses (SaelabError naming the fix) a missing file, or one written for another SAE (weights
    checksum, d_sae or d_in differ). ``bytes_read`` counts the file bytes read so far.
    """

    def __init__(self, sae_dir):
        self.sae_dir = pathlib.Path(sae_dir).expanduser()
        self.path = self.sae_dir / FEATURES_FILE
        fix = f"run `saelab analyze --sae {self.sae_dir}`"
        ident = weights_identity(self.sae_dir)
        if not self.path.exists():
            raise SaelabError(f"{self.path} is missing: {fix}")
        check_regular(self.path)
        self._raw = _CountingFile(self.path, "r")
        _OPEN.add(self)
        try:
            self._f = h5py.File(self._raw, "r")
        except OSError:
            self._raw.close()
            raise SaelabError(f"{self.path} is not a readable features file: {fix} again") from None
        try:
            a, self.sections = check_features_file(self._f, self.path, f"{fix} again")
            theirs = (a["d_sae"], a["d_in"])
            if theirs != (ident["d_sae"], ident["d_in"]):
                raise SaelabError(f"{self.path} was written for another SAE (d_sae {theirs[0]}, d_in {theirs[1]}; this "
                                  f"SAE has {ident['d_sae']}, {ident['d_in']}): {fix} again")
            if a["sae_sha256"] != ident["sae_sha256"]:
                raise SaelabError(f"{self.path} was written for another SAE (the weights' sha256 differs): {fix} again")
        except SaelabError:
            self.close()
            raise
        except OSError as e:  # a damaged file fails to read a dataset's header
            self.close()
            raise SaelabError(f"{self.path} is not a readable features file ({first_line(e, 100)}): {fix} again") \
                from None
        self.d_sae: int = a["d_sae"]
        self.d_in: int = a["d_in"]
        self.signed: bool = a["signed"]
        self.hook: str = a["hook"]
        self.model: str = a["model"]
        self.arch: str = a["arch"]
        self.n_rows: int = a["n_rows"]
        self.context_size: int = a["context_size"]
        self.before: int = a["before"]
        self.n_bands: int = a["n_bands"]
        self.head_layer: int | None = a["head_layer"] if a.get("head_layer", -1) >= 0 else None
        with self._reading():
            for k in EAGER:
                setattr(self, k, self._f[k][:])
            self.hist_edges = self._f["hist_edges"][:]
            self._ds = {k: self._f[k] for k in PER_LATENT if k in self._f}
            self._vocab: list[str] | None = None
            self.vocab()  # shared by every card: read once here, so a card reads only its own slices
        self._logit_index = None

    # -- plumbing
    @contextlib.contextmanager
    def _reading(self):
        """Reads of the file's data: a damaged file (a truncated or overwritten data block) is a one-line error."""
        try:
            yield
        except OSError as e:
            raise SaelabError(f"{self.path} is damaged ({first_line(e, 100)}): run `saelab analyze --sae "
                              f"{self.sae_dir}` again") from None

    @property
    def bytes_read(self) -> int:
        return self._raw.bytes_read

    def close(self) -> None:
        if getattr(self, "_f", None) is not None:
            self._f.close()
            self._f = None
        if not self._raw.closed:
            self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return self.d_sae

    def vocab(self) -> list[str]:
        if self._vocab is None:
            off = self._f["vocab_offsets"][:]
            blob = self._f["vocab_blob"][:].tobytes()
            self._vocab = [blob[off[i] : off[i + 1]].decode("utf-8", "replace") for i in range(len(off) - 1)]
        return self._vocab

    def token_str(self, i: int) -> str:
        v = self.vocab()
        return v[i] if 0 <= i < len(v) else f"#{i}"

    def _latent(self, latent) -> int:
        try:
            i = int(latent)
        except (TypeError, ValueError):
            raise SaelabError(f"latent {latent!r} is not an integer") from None
        if not 0 <= i < self.d_sae:
            raise SaelabError(f"latent {i} is out of range: this SAE has latents 0..{self.d_sae - 1}")
        return i

    # -- cards
    def card(self, latent: int) -> LatentCard:
        """One latent's card; reads only that latent's slice of each per-latent dataset."""
        i = self._latent(latent)
        with self._reading():
            d = {k: ds[i] for k, ds in self._ds.items()}
        rows, vals, toks, acts = d["ex_rows"], d["ex_vals"], d["ex_tokens"], d["ex_acts"]

        def examples(name):
            if name not in self.sections:
                return []
            a, b = self.sections[name]
            return [self._example(rows[e], vals[e], toks[e], acts[e]) for e in range(a, b) if rows[e] >= 0]

        qs = []
        if "quantiles" in self.sections:
            a, _ = self.sections["quantiles"]
            nb = self.n_bands
            per = (self.sections["quantiles"][1] - a) // nb
            of = "of max |act|" if self.signed else "of max"
            for band in reversed(range(nb)):
                lo, hi = band / nb, (band + 1) / nb
                exs = [self._example(rows[e], vals[e], toks[e], acts[e])
                       for e in range(a + band * per, a + (band + 1) * per) if rows[e] >= 0]
                qs.append((f"{lo:.2f}–{hi:.2f} {of}", exs))
        counts = d["hist"]
        nz = np.nonzero(counts)[0]
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
        if "logit_top_ids" in d:
            lt = [(self.token_str(int(t)), float(v)) for t, v in zip(d["logit_top_ids"], d["logit_top"])]
            lb = [(self.token_str(int(t)), float(v)) for t, v in zip(d["logit_bottom_ids"], d["logit_bottom"])]
        else:
            lt = lb = []
        g = int(self.group[i])
        heads = []
        if "head_share" in d:  # hook_z SAEs: the heads the decoder row lives in, largest share first
            L = f"L{self.head_layer}" if self.head_layer is not None else ""
            heads = sorted(((f"{L}H{h}", float(x)) for h, x in enumerate(d["head_share"])), key=lambda t: -t[1])
        return LatentCard(
            latent=i, density=float(self.density[i]), mean_act=float(self.mean_act[i]), max_act=float(self.max_act[i]),
            hist_edges=[float(e) for e in self.hist_edges[lo : hi + 1]] if hi else [],
            hist_counts=[int(c) for c in counts[lo:hi]],
            top=examples("top"), top_negative=examples("top_negative"), quantiles=qs,
            logits_top=lt, logits_bottom=lb,
            neighbours=[(int(j), float(c)) for j, c in zip(d["neighbours"], d["neighbour_cos"])],
            group=g if g >= 0 else None, min_act=float(self.min_act[i]), count=int(self.count[i]), heads=heads,
        )

    def _example(self, row, value, tok, act) -> Example:
        keep = tok >= 0
        p = int(row) % self.context_size
        return Example(row=int(row), tokens=[self.token_str(int(t)) for t in tok[keep]],
                       acts=[float(x) for x in act[keep]], pos=min(p, self.before), value=float(value))

    # -- search
    def by_token(self, token: str, n: int = 20) -> list[tuple[int, float]]:
        """Latents whose logit effect promotes ``token`` (among their top N_LOGITS tokens), by logit
        effect. Exact token-string match first (" the"), else ignoring surrounding spaces."""
        if "logit_top_ids" not in self._ds:
            return []
        ids = self._token_ids(token)
        if not ids:
            return []
        if self._logit_index is None:
            with self._reading():
                self._logit_index = (self._ds["logit_top_ids"][:], self._ds["logit_top"][:])
        top_ids, top_vals = self._logit_index
        hit = np.isin(top_ids, ids)
        score = np.where(hit, top_vals, -np.inf).max(1)
        latents = np.nonzero(np.isfinite(score))[0]
        latents = latents[np.argsort(-score[latents], kind="stable")][:n]
        return [(int(j), float(score[j])) for j in latents]

    def _token_ids(self, token: str) -> list[int]:
        """The vocabulary ids of ``token``: its exact entry, else the entries equal to it ignoring surrounding
        spaces ([] for none)."""
        vocab = self.vocab()
        ids = [i for i, s in enumerate(vocab) if s == token]
        if not ids and token.strip():
            ids = [i for i, s in enumerate(vocab) if s.strip() == token.strip()]
        return ids

    def in_vocab(self, token: str) -> bool:
        """Whether ``token`` is one vocabulary entry (exactly, or ignoring surrounding spaces), as ``by_token``
        matches it."""
        return bool(self._token_ids(token))

    def similar_tokens(self, text: str, n: int = 5) -> list[str]:
        """Up to ``n`` vocabulary entries for a string that is not one: those that start with it (spaces
        ignored), shortest first, then those it starts with, longest first (the first token of a
        multi-token string)."""
        t = text.strip()
        if not t:
            return []
        vocab = [s for s in self.vocab() if s.strip()]
        starts = sorted({s for s in vocab if s.strip().startswith(t)}, key=lambda s: (len(s.strip()), s))
        prefixes = sorted({s for s in vocab if t.startswith(s.strip()) and s not in starts},
                          key=lambda s: (-len(s.strip()), s))
        return (starts + prefixes)[:n]
