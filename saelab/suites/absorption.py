"""The ``absorption`` suite: feature absorption (Chanin et al. 2024, "A is for Absorption"), SAEBench's
``absorption_first_letter`` protocol and scores (the fraction score after Demian Till); also the per-row scores the
truth suite gives each planted hierarchy parent.

**Per row** (``row_absorption``), for one property with unit direction d (a probe's, or a planted parent's), the
row's activation x and its codes f: the row's projection P = x · d, and latent i's part of the reconstruction's
projection p_i = f_i (W_dec,i · d) (SAEBench takes f_i cos(W_dec,i, d): the same for the unit-norm decoder rows
SAELens keeps). With M the property's main latents:

- **absorption fraction**: the potential absorbers are the latents outside M with cos(W_dec,i, d) ≥ ``FRACTION_COS``
  and p_i > 0; T is the sum of their largest ``MAX_ABSORBERS`` p_i, and m = Σ_{i∈M} p_i. The fraction is 0 where
  m ≥ P or T < ``PROPORTION`` · P (nothing missing, or nothing carrying it); 1 where m ≤ 0; else a / (a + m) with
  a = min(T, P − m), clipped to [0, 1];
- **full absorption**: every main latent silent (f_i < 1e-8), and the latent of largest p_i has cos ≥ ``FULL_COS``
  and carries p_i ≥ ``PROPORTION`` · P on its own (P ≥ 0).

Rows with P ≤ 0 score 0 on both.

**First letter** (``absorption_scores``): words are the model's vocabulary tokens made of letters only (a leading
space allowed; at most ``WORDS``, a seeded sample), split 80/20 into train and test. Each word is read at its own
token in an in-context prompt: ``ICL_EXAMPLES`` other words, each ``"{word} has the first letter: {LETTER}"``
on its own line, then ``"{word} has the first letter:"``. Then, as SAEBench does:

1. a logistic-regression probe per letter (one against the rest, class-balanced) on the raw activations of the
   train words: its weight is the letter's direction d, and its test F1 (``f1_probe``) decides whether the model
   represents the letter (letters under ``MIN_PROBE_F1`` are not scored);
2. the main latents: an L1-penalised logistic regression per letter on the train words' codes (penalty 0.01 per
   word, SAEBench's ``k_sparse_probe_l1_decay``) ranks the latents by weight; for k = 1 … ``MAX_K`` a
   class-balanced logistic regression on the top k is scored by test F1, and k grows while F1 gains more than
   ``F1_JUMP`` (feature splitting: the letter is split over those k latents);
3. the rows: the test words of the letter that its probe calls positive (decision > 0): each letter's
   ``mean_absorption_fraction`` is the mean per-row fraction over them, its ``full_absorption_rate`` the fraction of
   them fully absorbed.

``mean_absorption_fraction_score``, ``mean_full_absorption_score`` and ``mean_num_split_features`` (SAEBench's
names) are the means over the scored letters (``std_dev_*`` their spread); ``letters`` holds each letter's.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from saelab.device import device_of
from saelab.errors import SaelabError
from saelab.hooks import activation_at
from saelab.models import tokenizer_bos

LETTERS = "abcdefghijklmnopqrstuvwxyz"
#: SAEBench's thresholds (its feature_absorption.py and absorption eval config)
FULL_COS, FRACTION_COS, PROPORTION, MAX_ABSORBERS = 0.025, 0.1, 0.4, 3
F1_JUMP, MAX_K, MIN_PROBE_F1, L1_DECAY = 0.03, 10, 0.6, 0.01
#: in-context examples before each word, the template, and the words read at most (a seeded sample of the vocabulary)
ICL_EXAMPLES, TEMPLATE, WORDS = 10, "{word} has the first letter:", 4000
#: fewest scored letters (probe F1 ≥ MIN_PROBE_F1) for the scores to mean anything; SAEBench asks for 20
MIN_LETTERS = 5
#: a letter needs this many train and test words of its own for its probes
MIN_WORDS = 5
#: prompts per forward
BATCH = 64
EPS = 1e-8


def row_absorption(codes: torch.Tensor, W_dec: torch.Tensor, direction: torch.Tensor, main,
                   projection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(absorption fraction [N], full absorption [N] bool) of rows (see the module docstring): ``codes`` [N, d_sae],
    ``W_dec`` [d_sae, d], ``direction`` [d], ``main`` the main latents' ids, ``projection`` [N] the rows' P = x · d
    (with d made unit)."""
    W = W_dec.detach().float().cpu()
    d = direction.detach().float().cpu()
    d = d / d.norm().clamp_min(1e-12)
    codes, P = codes.detach().float().cpu(), projection.detach().float().cpu()
    main = torch.as_tensor(list(main), dtype=torch.long)
    dots = W @ d
    cos = dots / W.norm(dim=1).clamp_min(1e-12)
    part = codes * dots  # [N, d_sae]: p_i per row
    m = part[:, main].sum(1)
    can = cos >= FRACTION_COS
    can[main] = False
    cand = torch.where(can & (part > 0), part, torch.zeros_like(part))
    T = cand.topk(min(MAX_ABSORBERS, cand.shape[1]), dim=1).values.sum(1)
    pos = P > 0
    safe = torch.where(pos, P, torch.ones_like(P))
    a = torch.minimum(T, P - m)
    frac = torch.where(m <= 0, torch.ones_like(P), (a / (a + m).clamp_min(1e-12)).clamp(0, 1))
    frac = torch.where(pos & (m < P) & (T >= PROPORTION * safe), frac, torch.zeros_like(frac))
    top, at = part.max(1)
    full = pos & (codes[:, main] < EPS).all(1) & (cos[at] >= FULL_COS) & (top >= PROPORTION * safe)
    return frac, full


def absorption(codes, W_dec, direction, main, projection) -> tuple[float, float]:
    """(mean absorption fraction, full-absorption rate) over rows (``row_absorption``); (0, 0) for no rows."""
    if len(codes) == 0:
        return 0.0, 0.0
    frac, full = row_absorption(codes, W_dec, direction, main, projection)
    return float(frac.mean()), float(full.float().mean())


# --------------------------------------------------------------------------------------------- first letter
def alpha_words(tokenizer) -> list[tuple[int, str]]:
    """(token id, text) of the vocabulary's tokens made of ASCII letters only (a leading space allowed), by id."""
    out = []
    for tok, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        text = tokenizer.convert_tokens_to_string([tok])
        word = text[1:] if text.startswith(" ") else text
        if word and word.isascii() and word.isalpha():
            out.append((i, text))
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompts(tokenizer, words: list[tuple[int, str]], seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """(each word's prompt as token ids, BOS first; the position of the word's own token in it): ``ICL_EXAMPLES``
    other words with their answers, one per line, then the word and the template's rest. Built from ids, so the
    word is the one token it is."""
    rng = np.random.default_rng(seed)
    bos = tokenizer_bos(tokenizer)
    head, tail = TEMPLATE.split("{word}")
    head_ids, tail_ids, sep = _ids(tokenizer, head) if head else [], _ids(tokenizer, tail), _ids(tokenizer, "\n")
    answer = {c: _ids(tokenizer, " " + c.upper()) for c in LETTERS}
    out, at = [], []
    for j, (tok, text) in enumerate(words):
        others = rng.choice(len(words) - 1, min(ICL_EXAMPLES, len(words) - 1), replace=False)
        seq = [bos]
        for o in others:
            o_tok, o_text = words[o + (o >= j)]  # any word but this one
            seq += head_ids + [o_tok] + tail_ids + answer[o_text.strip()[0].lower()] + sep
        seq += head_ids + [tok]
        at.append(len(seq) - 1)
        out.append(seq + tail_ids)
    return out, at


@torch.no_grad()
def _activations(model, hook: str, seqs: list[list[int]], at: list[int], progress: bool) -> torch.Tensor:
    """[N, d_in] activations at ``hook`` of each prompt's word token (prompts padded after their end: causal)."""
    from tqdm.auto import tqdm

    device, pad = device_of(model), tokenizer_bos(model.tokenizer)
    out = []
    for a in tqdm(range(0, len(seqs), BATCH), desc="absorption prompts", unit="batch", disable=not progress):
        rows = seqs[a : a + BATCH]
        T = max(map(len, rows))
        toks = torch.tensor([r + [pad] * (T - len(r)) for r in rows], device=device)
        x = activation_at(model, toks, hook, "pass the model this SAE was trained on")
        out.append(x[torch.arange(len(rows), device=x.device), torch.tensor(at[a : a + BATCH], device=x.device)]
                   .float().cpu())
    return torch.cat(out)


@functools.cache
def _l1_penalty() -> dict:
    """scikit-learn's L1 penalty: ``l1_ratio=1`` from 1.8 (where ``penalty`` is deprecated), ``penalty="l1"`` before."""
    import sklearn

    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    return {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, zero_division=0.0))


def split_latents(Ftr: np.ndarray, ytr: np.ndarray, Fte: np.ndarray, yte: np.ndarray, seed: int = 0) \
        -> tuple[list[int], list[float]]:
    """(the main latents of one binary property, the test F1 of each k-sparse probe tried): the latents ranked by
    an L1 logistic regression's weights on the codes, k grown from 1 while test F1 gains more than ``F1_JUMP``."""
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression

    # SAEBench's probe minimises mean loss + L1_DECAY·|w|₁; scikit-learn's C·Σ loss + |w|₁ is the same at this C
    l1 = LogisticRegression(**_l1_penalty(), solver="liblinear", C=1.0 / (L1_DECAY * len(ytr)), max_iter=500,
                            random_state=seed).fit(sparse.csr_matrix(Ftr), ytr)
    order = np.argsort(-l1.coef_[0], kind="stable")
    best, chosen, f1s = -np.inf, [], []
    for k in range(1, min(MAX_K, Ftr.shape[1]) + 1):
        cols = order[:k]
        probe = LogisticRegression(max_iter=500, class_weight="balanced", random_state=seed).fit(Ftr[:, cols], ytr)
        f1 = _f1(yte, probe.decision_function(Fte[:, cols]) > 0)
        f1s.append(f1)
        if f1 <= best + F1_JUMP:
            break
        best, chosen = f1, [int(c) for c in cols]
    return chosen, f1s



def letter_scores(X: torch.Tensor, F: torch.Tensor, letter: np.ndarray, W_dec: torch.Tensor,
                  min_f1: float = MIN_PROBE_F1, seed: int = 0) -> dict:
    """The first-letter scores from the words' activations ``X`` [N, d_in], codes ``F`` [N, d_sae] and letters
    ``letter`` [N] (0 … 25), the SAE's decoder ``W_dec``: steps 1–3 of the module docstring, letters whose probe's
    test F1 is under ``min_f1`` skipped (with the reason)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(letter))
    tr, te = np.sort(order[: int(0.8 * len(order))]), np.sort(order[int(0.8 * len(order)):])
    Xn, Fn = X.numpy(), F.numpy()
    mean = Xn[tr].mean(0)
    per, skipped = {}, {}
    for li, c in enumerate(LETTERS):
        ytr, yte = (letter[tr] == li).astype(int), (letter[te] == li).astype(int)
        if min(ytr.sum(), yte.sum()) < MIN_WORDS:
            skipped[c] = f"{int(ytr.sum())} train / {int(yte.sum())} test words"
            continue
        probe = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed).fit(Xn[tr] - mean, ytr)
        score = probe.decision_function(Xn[te] - mean)
        f1_probe = _f1(yte, score > 0)
        if f1_probe < min_f1:
            skipped[c] = f"probe F1 {f1_probe:.2f}"
            continue
        rows = te[(yte == 1) & (score > 0)]  # the probe's true positives among the test words
        if not len(rows):
            skipped[c] = "no test word its probe calls positive"
            continue
        main, f1s = split_latents(Fn[tr], ytr, Fn[te], yte, seed)
        direction = torch.from_numpy(probe.coef_[0]).float()
        unit = direction / direction.norm().clamp_min(1e-12)
        frac, full = row_absorption(F[rows], W_dec, unit, main, X[rows] @ unit)
        per[c] = {"mean_absorption_fraction": float(frac.mean()), "full_absorption_rate": float(full.float().mean()),
                  "num_split_features": len(main), "split_feats": main, "f1_probe": f1_probe,
                  "f1_sparse_sae": f1s, "num_probe_true_positives": int(len(rows))}
    out = {}
    for key, name in (("mean_absorption_fraction", "absorption_fraction_score"),
                      ("full_absorption_rate", "full_absorption_score"), ("num_split_features", "num_split_features")):
        vals = [s[key] for s in per.values()]
        out[f"mean_{name}"] = float(np.mean(vals)) if vals else None
        out[f"std_dev_{name}"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return {**out, "n_letters": len(per), "min_probe_f1": min_f1, "letters": per, "skipped": skipped}


def absorption_scores(sae, model, words: int = WORDS, min_f1: float = MIN_PROBE_F1, seed: int = 0,
                      progress: bool = False) -> dict:
    """The absorption suite's first-letter scores of ``sae`` over ``model`` (see the module docstring): ``words``
    vocabulary words at most, letters whose probe's F1 is under ``min_f1`` left out; fewer than ``MIN_LETTERS``
    letters left is a one-line error."""
    sae = sae.one_layer("the absorption suite").eval().to(device_of(model))
    hook = sae.cfg.hook_name
    if hook not in model.hook_dict:
        raise SaelabError(f"the model has no hook {hook!r}: pass the model this SAE was trained on (--model)")
    try:
        vocab = alpha_words(model.tokenizer)
    except (AttributeError, NotImplementedError, TypeError):
        raise SaelabError("the absorption suite reads the model's vocabulary, which needs a Hugging Face tokenizer "
                          "(get_vocab, convert_tokens_to_string)") from None
    rng = np.random.default_rng(seed)
    if len(vocab) > words:
        vocab = [vocab[i] for i in sorted(rng.choice(len(vocab), words, replace=False))]
    if len(vocab) < 10 * MIN_WORDS:
        raise SaelabError(f"the model's vocabulary has {len(vocab)} tokens made of letters only: the first-letter "
                          "absorption suite needs a word-level vocabulary (leave absorption out of --suite)")
    seqs, at = prompts(model.tokenizer, vocab, seed)
    X = _activations(model, hook, seqs, at, progress)
    with torch.no_grad():
        F = torch.cat([sae.encode(X[a : a + 4096].to(sae.W_dec.device)).float().cpu()
                       for a in range(0, len(X), 4096)])
    letter = np.array([LETTERS.index(t.strip()[0].lower()) for _, t in vocab])
    res = letter_scores(X, F, letter, sae.W_dec, min_f1, seed)
    if res["n_letters"] < MIN_LETTERS:
        best = max((float(v.split()[-1]) for v in res["skipped"].values() if v.startswith("probe F1")), default=0.0)
        raise SaelabError(f"the absorption suite scores letters whose first-letter probe reaches F1 {min_f1:g} on "
                          f"held-out words; at {hook} this model has {res['n_letters']} such letters (fewer than "
                          f"{MIN_LETTERS}; its best other probe: F1 {best:.2f}): it does not represent first letters "
                          "linearly there. Try another hook or a larger model, lower --absorption-min-f1 (SAEBench "
                          "uses 0.6), or leave absorption out of --suite")
    return {**res, "n_words": len(vocab)}
