"""Feature absorption (saelab.suites.absorption), SAEBench's scores: on codes built by hand (absorbed, clean, half,
partial, under the thresholds) and against a plain per-row reference; the truth suite's scores on a planted
hierarchy, for the planted dictionary (no absorption) and for an SAE whose child latents absorb their parents; the
first-letter steps on planted letter directions (absorbed words, a control without them); and ``saelab eval
--suite absorption`` on the demo's SAE (the bundled model does not represent first letters: a one-line refusal,
and scores where the probe threshold is lowered)."""

import math

import numpy as np
import pytest
import torch

from saelab.suites import absorption as A
from saelab.suites.absorption import PROPORTION, absorption, letter_scores, row_absorption
from tests.test_outputs import _fails


def _rows(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.empty(n).uniform_(0.5, 1.5, generator=g)  # the parent's activation
    b = torch.empty(n).uniform_(0.5, 1.5, generator=g)  # the child's
    return a, b


def test_a_child_latent_that_carries_its_parent_is_absorption_and_separate_latents_are_not():
    """Latents: 0 = the parent's direction e0 (its main latent), 1 = (e0 + e1)/√2 (a child latent carrying the
    parent), 2 = e1 (the child alone), 3 = a direction of cosine 0.05 with e0. Rows a·e0 + b·e1, so P = a.
    Absorbed: latent 1 alone fires (a·√2): both scores 1. Clean: latents 0 and 2 fire: both 0. Half and half: 0.5
    each. Partial: the main latent keeps half, latent 1 the other half: fraction 0.5, no full absorption."""
    e = torch.eye(4)
    far = 0.05 * e[0] + math.sqrt(1 - 0.05 ** 2) * e[2]
    W = torch.stack([e[0], (e[0] + e[1]) / math.sqrt(2), e[1], far])
    a, b = _rows()
    absorbed = torch.zeros(len(a), 4)
    absorbed[:, 1] = a * math.sqrt(2)
    clean = torch.zeros(len(a), 4)
    clean[:, 0], clean[:, 2] = a, b
    assert absorption(absorbed, W, e[0], [0], a) == pytest.approx((1.0, 1.0))
    assert absorption(clean, W, e[0], [0], a) == pytest.approx((0.0, 0.0))
    half = torch.cat([absorbed[:100], clean[100:]])
    assert absorption(half, W, e[0], [0], a) == pytest.approx((0.5, 0.5))
    part = torch.zeros(len(a), 4)
    part[:, 0], part[:, 1] = 0.5 * a, 0.5 * a * math.sqrt(2)
    assert absorption(part, W, e[0], [0], a) == pytest.approx((0.5, 0.0))
    small = torch.zeros(len(a), 4)  # the other latents carry under PROPORTION of P: no absorption at all
    small[:, 0], small[:, 1] = 0.7 * a, 0.3 * a * math.sqrt(2)
    assert absorption(small, W, e[0], [0], a) == (0.0, 0.0)
    weak = torch.zeros(len(a), 4)
    weak[:, 1] = (PROPORTION - 0.05) * a * math.sqrt(2)  # main silent, the other under PROPORTION of P
    assert absorption(weak, W, e[0], [0], a) == (0.0, 0.0)
    # latent 3 (cosine 0.05: under FRACTION_COS, over FULL_COS) carrying all of P: full absorption, no fraction
    faint = torch.zeros(len(a), 4)
    faint[:, 3] = a / 0.05
    assert absorption(faint, W, e[0], [0], a) == pytest.approx((0.0, 1.0))
    assert absorption(torch.zeros(0, 4), W, e[0], [0], a[:0]) == (0.0, 0.0)


def _reference(codes, W, d, main, P):
    """SAEBench's per-word rules as a plain loop over rows and latents (floats)."""
    d = d / d.norm()
    fracs, fulls = [], []
    for f, p_row in zip(codes.tolist(), P.tolist()):
        dots = [float(w @ d) for w in W]
        cos = [dt / float(w.norm()) for dt, w in zip(dots, W)]
        part = [fi * dt for fi, dt in zip(f, dots)]
        m = sum(part[i] for i in main)
        cand = sorted((part[i] for i in range(len(f)) if i not in main and cos[i] >= A.FRACTION_COS and part[i] > 0),
                      reverse=True)[: A.MAX_ABSORBERS]
        t = sum(cand)
        if p_row <= 0 or m >= p_row or t / p_row < A.PROPORTION:
            frac = 0.0
        elif m <= 0:
            frac = 1.0
        else:
            ab = min(t, p_row - m)
            frac = min(max(ab / (ab + m), 0.0), 1.0)
        top = max(range(len(f)), key=lambda i: part[i])
        full = (p_row > 0 and all(f[i] < A.EPS for i in main) and cos[top] >= A.FULL_COS
                and part[top] / p_row >= A.PROPORTION)
        fracs.append(frac)
        fulls.append(full)
    return fracs, fulls


def test_row_absorption_equals_a_plain_reference_on_random_codes():
    """Fresh random sparse codes over a random decoder whose latents lean towards d: the vectorised scores equal the
    loop's (fractions to 1e-5; full absorption exactly), with rows of every kind among them."""
    g = torch.Generator().manual_seed(3)
    d = torch.randn(16, generator=g)
    W = torch.randn(40, 16, generator=g) + 0.8 * d / d.norm()
    codes = torch.relu(torch.randn(300, 40, generator=g)) * (torch.rand(300, 40, generator=g) < 0.15)
    codes[:100, :2] = 0  # main latents silent on a third of the rows
    P = (codes @ W) @ (d / d.norm()) + 0.3 * torch.randn(300, generator=g)
    frac, full = row_absorption(codes, W, d, [0, 1], P)
    want_frac, want_full = _reference(codes, W, d, [0, 1], P)
    assert frac.tolist() == pytest.approx(want_frac, abs=1e-5)
    assert full.tolist() == want_full
    assert 0 < sum(want_full) < 300 and len({round(x, 3) for x in want_frac}) > 10


@pytest.fixture(scope="module")
def hierarchy_store(tmp_path_factory):
    from saelab.synthetic import SyntheticConfig, write_synthetic

    out = tmp_path_factory.mktemp("abs") / "h"
    write_synthetic(SyntheticConfig(out=str(out), d=64, n_true=40, hierarchy=4, children=4, child_rate=0.8,
                                    exclusive_children=True, active=3, rows=128 * 64), progress=False)
    return out


def _exact_sae(directions, hierarchy: dict, absorb: bool):
    """A ReLU SAE whose codes are the planted coefficients (the encoder is the dictionary's dual basis: 40
    independent directions in 64 dimensions). With ``absorb``, each child latent's decoder also carries its
    parent's direction, and the parent's encoder row subtracts three times its children's coefficients: the
    parent latent is silent wherever a child fires (coefficients ≥ 0.5, the parent's ≤ 1.5) and keeps the rows where
    the parent fires alone. That is absorption as Chanin et al. describe it."""
    from saelab.sae import SAE

    n, d = directions.shape
    sae = SAE.create("relu", d_in=d, d_sae=n, k=3)
    enc = torch.linalg.pinv(directions)  # [d, n]
    dec = directions.clone()
    if absorb:
        for p, kids in hierarchy.items():
            enc[:, p] -= 3 * enc[:, kids].sum(1)
            dec[kids] += directions[p]
    with torch.no_grad():
        sae.W_dec.copy_(dec)
        sae.W_enc.copy_(enc)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.apply_b_dec_to_input = False
    return sae


def test_the_truth_suite_scores_absorption_on_a_planted_hierarchy(hierarchy_store):
    """The planted dictionary itself: every parent's latent fires wherever the parent does, nothing else carries it:
    both scores ≤ 0.05. An SAE whose child latents absorb their parents (80% of a parent's rows have a child):
    both scores ≥ 0.5 (measured about 0.8)."""
    from saelab.store import ActivationStore
    from saelab.suites.truth import truth_scores
    from saelab.synthetic import load_truth

    directions, info = load_truth(hierarchy_store)
    assert len(info["hierarchy"]) == 4
    store = ActivationStore(hierarchy_store)
    clean = truth_scores(_exact_sae(directions, info["hierarchy"], False), store)
    assert clean["mcc"] > 0.999 and clean["mean_absorption_fraction_score"] <= 0.05
    assert clean["mean_full_absorption_score"] <= 0.05
    absorbed = truth_scores(_exact_sae(directions, info["hierarchy"], True), store)
    assert absorbed["mean_absorption_fraction_score"] >= 0.5 and absorbed["mean_full_absorption_score"] >= 0.5
    assert absorbed["mean_absorption_fraction_score"] <= 0.9  # the rows where a parent fires alone are not absorbed


def _letters(absorbed_share: float, n_per=120, d=64, seed=0):
    """Planted first letters: word w of letter L has activation a·u_L + noise (u_L random unit directions). The
    codes: latent L (decoder u_L) carries a; for a share of each letter's words, a latent of that word alone
    (decoder (u_L + r_w)/√2, r_w random) carries it instead, latent L silent: token-level latents that absorb the
    letter, as Chanin et al. find."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(26, d, generator=g)
    u = u / u.norm(dim=1, keepdim=True)
    letter = np.repeat(np.arange(26), n_per)
    n = len(letter)
    a = torch.empty(n).uniform_(0.5, 1.5, generator=g)
    X = a[:, None] * u[letter] + 0.08 * torch.randn(n, d, generator=g)
    takes = torch.rand(n, generator=g) < absorbed_share
    words = takes.nonzero().flatten()
    r = torch.randn(len(words), d, generator=g)
    r = r / r.norm(dim=1, keepdim=True)
    W = torch.cat([u, (u[letter[words.numpy()]] + r) / math.sqrt(2)])
    F = torch.zeros(n, len(W))
    F[torch.arange(n)[~takes], torch.as_tensor(letter)[~takes]] = a[~takes]
    F[words, 26 + torch.arange(len(words))] = a[words] * math.sqrt(2) / (1 + (u[letter[words.numpy()]] * r).sum(1))
    return X, F, letter, W


def test_first_letter_scores_find_absorbing_token_latents_and_none_without_them():
    """On planted letters every probe reads its letter (F1 ≥ 0.9); the main latent of each letter is its own
    (token latents fire on one word each: no F1 jump); with 60% of the words absorbed the mean absorption fraction
    and full-absorption rate are ≥ 0.5, and without absorbing latents ≤ 0.05."""
    X, F, letter, W = _letters(0.6)
    res = letter_scores(X, F, letter, W)
    assert res["n_letters"] == 26 and all(s["f1_probe"] >= 0.9 for s in res["letters"].values())
    assert all(s["split_feats"] == [A.LETTERS.index(c)] for c, s in res["letters"].items())
    assert res["mean_absorption_fraction_score"] >= 0.5 and res["mean_full_absorption_score"] >= 0.5
    assert res["mean_num_split_features"] == 1.0
    X, F, letter, W = _letters(0.0)
    control = letter_scores(X, F, letter, W)
    assert control["n_letters"] == 26
    assert control["mean_absorption_fraction_score"] <= 0.05 and control["mean_full_absorption_score"] <= 0.05
    noise = letter_scores(torch.randn_like(X), F, letter, W)  # activations that hold no letter: nothing scored
    assert noise["n_letters"] == 0 and noise["mean_absorption_fraction_score"] is None
    assert all(v.startswith("probe F1") for v in noise["skipped"].values())


def test_prompts_read_each_word_at_its_own_token(tiny):
    """Each prompt is BOS, ICL_EXAMPLES answered examples of other words, then the word and the template's rest;
    the position given is the word's token."""
    words = A.alpha_words(tiny.tokenizer)[:40]
    seqs, at = A.prompts(tiny.tokenizer, words)
    tail = tiny.tokenizer(A.TEMPLATE.split("{word}")[1], add_special_tokens=False)["input_ids"]
    for (tok, text), seq, i in zip(words, seqs, at):
        assert seq[i] == tok and seq[i + 1:] == list(tail) and seq.count(tok) == 1
        assert tiny.tokenizer.decode(seq[1:]).count(" has the first letter:") == A.ICL_EXAMPLES + 1
    assert all(t.strip().isalpha() for _, t in words)


def test_eval_absorption_on_the_demo(demo_sae, capsys):
    """``saelab eval --suite absorption --model tiny``: the bundled model's first-letter probes stay under F1 0.6
    (it was not trained to spell), so the suite refuses in one line and writes nothing; with --absorption-min-f1 0
    every letter with words is scored, eval.json and the table agree."""
    from saelab.cli import main
    from saelab.layout import read_eval

    base = ["eval", "--sae", demo_sae, "--suite", "absorption", "--absorption-words", "1000", "--quiet"]
    before = (demo_sae / "eval.json").read_text()
    _fails(base, capsys, "--suite absorption reads the model's activations on its vocabulary's words: pass --model")
    _fails([*base, "--model", "tiny"], capsys, "does not represent first letters linearly there")
    assert (demo_sae / "eval.json").read_text() == before
    assert main([str(a) for a in [*base, "--model", "tiny", "--absorption-min-f1", "0"]]) == 0
    out = capsys.readouterr().out
    ev = read_eval(demo_sae)["absorption"]
    assert ev["n_words"] == 1000 and ev["n_letters"] >= A.MIN_LETTERS and ev["min_probe_f1"] == 0
    assert 0 <= ev["mean_absorption_fraction_score"] <= 1 and 0 <= ev["mean_full_absorption_score"] <= 1
    assert ev["mean_absorption_fraction_score"] == pytest.approx(
        np.mean([s["mean_absorption_fraction"] for s in ev["letters"].values()]))
    assert "absorption:" in out and f"{ev['mean_absorption_fraction_score']:.4f}" in out
    _fails([*base, "--model", "tiny", "--absorption-words", "10"], capsys, "--absorption-words")
