"""The p-annealing SAE (saelab.sae.panneal): its schedule, its penalty against a plain loop (and finite gradients at
zero codes below p = 1), the coefficient rescaled when p changes, the CLI's refusals; planted-feature recovery is in
tests/test_train.py (test_planted_features_recovered)."""

import math

import pytest
import torch

from saelab.config import SAEConfig
from saelab.sae import SAE
from saelab.sae.panneal import QUEUE, lp_penalty, p_schedule
from tests.test_outputs import _fails


def test_the_schedule_runs_from_anneal_start_to_the_last_step():
    cfg = SAEConfig(arch="panneal", d_in=8, expansion=2, k=2, p_start=1.0, p_end=0.2, anneal_start=0.2, p_updates=5)
    steps, values = p_schedule(cfg, 100)
    assert steps == [20, 40, 60, 79, 99] and values == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert p_schedule(cfg, 1)[0] == [0] * 5  # a one-step run: every update at its only step


@pytest.mark.parametrize("form", ["lp", "lp^p"])
@pytest.mark.parametrize("p", [1.0, 0.5, 0.2])
def test_the_penalty_equals_a_plain_loop_and_its_gradient_is_finite_at_zero_codes(form, p):
    """Fresh random codes with zeros (and an all-zero row): the mean of (Σᵢ fᵢ^p)^(1/p) or Σᵢ fᵢ^p over rows, to
    1e-5 relative; through the ReLU the gradient has no NaN or inf, and zero codes get none."""
    g = torch.Generator().manual_seed(int(p * 10))
    z = torch.randn(64, 32, generator=g, requires_grad=True)
    with torch.no_grad():
        z[0] = -1.0
    f = torch.relu(z)
    want = 0.0
    for row in f.tolist():
        s = sum(v ** p for v in row if v > 0)
        want += s if form == "lp^p" else s ** (1 / p)
    got = lp_penalty(f, p, form)
    assert float(got.detach()) == pytest.approx(want / len(f), rel=1e-5)
    got.backward()
    assert torch.isfinite(z.grad).all() and (z.grad[z <= 0] == 0).all()


def test_a_change_of_p_rescales_the_coefficient_by_the_recent_penalties():
    """Steps run without an optimiser on fresh rows: p takes each scheduled value after its step, and at each
    change after the first λ is multiplied by mean(penalty at the old p) / mean(penalty at the new p) over the last
    QUEUE steps (the fixed coefficient moves too, as dictionary_learning's does)."""
    cfg = SAEConfig(arch="panneal", d_in=16, expansion=4, k=4, l1_coeff=0.5, anneal_start=0.25, p_updates=4).validate()
    sae = SAE.create("panneal", **{k: getattr(cfg, k) for k in ("d_in", "expansion", "k", "l1_coeff", "anneal_start",
                                                                "p_updates")})
    sae.total_steps = 80
    steps, values = p_schedule(sae.cfg, 80)
    g = torch.Generator().manual_seed(0)
    pairs, ps = [], []
    for step in range(80):
        out = sae.loss(torch.randn(128, 16, generator=g), step)
        ps.append(float(out["p"]))
        nxt = sae.next_p()
        before = sae.control.coeff
        if nxt is not None:
            pairs.append(sae._pair.tolist())
        sae.after_step(out, step)
        if step in steps[1:]:
            old, new = (sum(c) / len(c) for c in zip(*pairs[-QUEUE:]))
            assert sae.control.coeff == pytest.approx(before * old / new, rel=1e-5)
        if step in steps:
            pairs = []
    assert ps[steps[0]] == 1.0 and ps[-1] == pytest.approx(values[-2])  # the last value takes effect after the run
    assert [ps[s + 1] for s in steps[:-1]] == pytest.approx(values[:-1])
    assert sae.control.coeff != pytest.approx(0.5) and math.isfinite(sae.control.coeff)


def test_bad_panneal_settings_are_one_line(tmp_path, capsys):
    from saelab.synthetic import SyntheticConfig, write_synthetic

    store = write_synthetic(SyntheticConfig(out=str(tmp_path / "s"), d=16, n_true=32, active=2, rows=4096),
                            progress=False)
    base = ["train", "--activations", store, "--out", tmp_path / "o", "--tokens", "4096", "--quiet"]
    _fails([*base, "--arch", "panneal", "--p-end", "0"], capsys, "--p-end must be in (0, --p-start]")
    _fails([*base, "--arch", "panneal", "--p-end", "0.5", "--p-start", "0.4"], capsys, "--p-end must be in")
    _fails([*base, "--arch", "panneal", "--anneal-start", "1"], capsys, "--anneal-start in [0, 1)")
    _fails([*base, "--arch", "relu", "--p-end", "0.5"], capsys, "--p-end")
    assert not (tmp_path / "o").exists()
