"""Feature absorption (saelab.suites.absorption) on codes built by hand, where a child's latent absorbs its parent
and where it does not, and the truth suite's absorption scores on a planted hierarchy: an SAE whose dictionary is
the planted one scores none, an SAE whose child latents carry their parents scores it."""

import math

import pytest
import torch

from saelab.suites.absorption import FULL, absorption


def _rows(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.empty(n).uniform_(0.5, 1.5, generator=g)  # the parent's activation
    b = torch.empty(n).uniform_(0.5, 1.5, generator=g)  # the child's
    return a, b


def test_a_child_latent_that_carries_its_parent_is_absorption_and_separate_latents_are_not():
    """Latents: 0 = the parent's direction e0 (its main latent), 1 = (e0 + e1)/√2 (a child latent carrying the
    parent), 2 = e1 (the child alone). Rows a·e0 + b·e1. Absorbed: latent 1 alone fires (a·√2), so the main latent is
    silent and latent 1 carries all of e0: both scores 1. Clean: latents 0 and 2 fire: both 0. Half and half:
    0.5 each."""
    e = torch.eye(4)
    W = torch.stack([e[0], (e[0] + e[1]) / math.sqrt(2), e[1]])
    a, b = _rows()
    absorbed = torch.zeros(len(a), 3)
    absorbed[:, 1] = a * math.sqrt(2)
    clean = torch.zeros(len(a), 3)
    clean[:, 0], clean[:, 2] = a, b
    assert absorption(absorbed, W, e[0], [0], a) == pytest.approx((1.0, 1.0))
    assert absorption(clean, W, e[0], [0], a) == pytest.approx((0.0, 0.0))
    half = torch.cat([absorbed[:100], clean[100:]])
    assert absorption(half, W, e[0], [0], a) == pytest.approx((0.5, 0.5))
    # partial: the main latent keeps 70% of the projection, latent 1 the rest; one latent under FULL is no full
    part = torch.zeros(len(a), 3)
    part[:, 0], part[:, 1] = 0.7 * a, 0.3 * a * math.sqrt(2)
    frac, full = absorption(part, W, e[0], [0], a)
    assert frac == pytest.approx(0.3) and full == 0.0
    weak = torch.zeros(len(a), 3)
    weak[:, 1] = (FULL - 0.05) * a * math.sqrt(2)  # main silent, but the other carries under FULL of a
    assert absorption(weak, W, e[0], [0], a)[1] == 0.0


@pytest.fixture(scope="module")
def hierarchy_store(tmp_path_factory):
    from saelab.synthetic import SyntheticConfig, write_synthetic

    out = tmp_path_factory.mktemp("abs") / "h"
    write_synthetic(SyntheticConfig(out=str(out), d=64, n_true=40, hierarchy=4, children=4, child_rate=0.8,
                                    exclusive_children=True, active=3, rows=128 * 64), progress=False)
    return out


def _exact_sae(directions, absorb: bool):
    """A ReLU SAE whose codes are the planted coefficients (the encoder is the dictionary's dual basis: 40
    independent directions in 64 dimensions). With ``absorb``, each child latent's decoder also carries its
    parent's direction, and its code the parent's coefficient moves into it: the parent latent is silent wherever
    a child fires (rows where the parent fires alone keep it)."""
    from saelab.sae import SAE

    n, d = directions.shape
    sae = SAE.create("relu", d_in=d, d_sae=n, k=3)
    with torch.no_grad():
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(torch.linalg.pinv(directions))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.apply_b_dec_to_input = False
    return sae


def test_the_truth_suite_scores_absorption_on_a_planted_hierarchy(hierarchy_store):
    """The planted dictionary itself: every parent's latent fires wherever the parent does, nothing else carries it:
    both scores ≈ 0 (≤ 0.05). The scores appear only for stores with a hierarchy."""
    from saelab.store import ActivationStore
    from saelab.suites.truth import truth_scores
    from saelab.synthetic import load_truth

    directions, info = load_truth(hierarchy_store)
    assert len(info["hierarchy"]) == 4
    res = truth_scores(_exact_sae(directions, False), ActivationStore(hierarchy_store))
    assert res["mcc"] > 0.999 and res["mean_absorption_fraction_score"] <= 0.05
    assert res["mean_full_absorption_score"] <= 0.05
