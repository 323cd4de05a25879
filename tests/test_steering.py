"""Steering through SAE latents on the tiny model with the demo SAEs (saelab.analysis.steering)."""

import pytest
import torch

from saelab.errors import SaelabError

PROMPT = "Once upon a time there was a little girl who loved to play in the"


@pytest.fixture(scope="module")
def sae1(demo_group):
    from saelab.sae.base import SAE

    return SAE.load(demo_group.saes["blocks.1.hook_resid_post"])


@pytest.fixture(scope="module")
def sae0(demo_group):
    from saelab.sae.base import SAE

    return SAE.load(demo_group.saes["blocks.0.hook_resid_post"])


def _top_latent(tiny, sae, text=PROMPT):
    from saelab.analysis.steering import prompt_latents

    _, acts = prompt_latents(tiny, sae, text)
    return int(acts.max(0).values.argmax()), acts


def test_prompt_latents_match_a_manual_encode(tiny, sae1):
    from saelab.analysis.steering import prompt_latents

    toks, acts = prompt_latents(tiny, sae1, PROMPT)
    assert toks == tiny.to_str_tokens(PROMPT, prepend_bos=False)
    _, cache = tiny.run_with_cache(tiny.to_tokens(PROMPT))
    ref = sae1.encode(cache["blocks.1.hook_resid_post"][0, 1:])
    assert acts.shape == (len(toks), sae1.d_sae)
    torch.testing.assert_close(acts, ref)
    assert ((acts != 0).sum(-1) == sae1.cfg.k).all()


def test_large_coefficient_changes_the_output_and_zero_does_not(tiny, sae1):
    from saelab.analysis.steering import Intervention, generate_side_by_side, steer

    lat, _ = _top_latent(tiny, sae1)
    clean, same = generate_side_by_side(tiny, sae1, PROMPT, [Intervention(lat, "add", 0.0)], max_new_tokens=12,
                                        temperature=1.0, seed=3)
    assert clean == same and len(clean) > 0
    r = steer(tiny, sae1, PROMPT, [Intervention(lat, "add", 40.0)], max_new_tokens=12, temperature=1.0, seed=3)
    assert r.clean == clean and r.steered != clean
    assert r.metrics["kl"] > 0.5 and r.metrics["logit_shift"] > 1.0
    # fluency = the clean model's mean loss on each continuation after the prompt (recomputed here)
    prompt = tiny.to_tokens(PROMPT)[0]
    for ids, key in [(r.steered_ids, "fluency"), (r.clean_ids, "fluency_clean")]:
        with torch.no_grad():
            logits = tiny(torch.cat([prompt, torch.tensor(ids)])[None])[0, len(prompt) - 1 : -1]
        want = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids))
        assert abs(r.metrics[key] - float(want)) < 1e-4, (key, r.metrics[key], float(want))
    assert len(r.steered_ids) == 12 and tiny.tokenizer.decode(r.steered_ids) == r.steered
    # the probability change after the prompt lists rises first, falls last, and they are the real differences
    deltas = [p["delta"] for p in r.prob_change]
    assert deltas == sorted(deltas, reverse=True) and deltas[0] > 0 > deltas[-1]
    assert all(abs(p["p_steered"] - p["p_clean"] - p["delta"]) < 1e-6 for p in r.prob_change)
    r0 = steer(tiny, sae1, PROMPT, [lat], max_new_tokens=4, temperature=0.0)
    assert r0.metrics["kl"] == 0.0 and r0.metrics["logit_shift"] == 0.0 and r0.clean == r0.steered


def test_add_adds_the_decoder_row_on_every_position_but_bos(sae0):
    from saelab.analysis.steering import Intervention, steering_hook

    x = torch.randn(2, 5, sae0.d_in)
    out = steering_hook(sae0, [Intervention(7, "add", 2.5), Intervention(9, "add", -1.0)])(x, None)
    want = x.clone()
    want[:, 1:] += 2.5 * sae0.W_dec[7] - sae0.W_dec[9]
    torch.testing.assert_close(out, want.detach())
    # a one-position call (a cached generation step) is steered: it is not BOS
    one = steering_hook(sae0, [Intervention(7, "add", 2.5)])(x[:, :1], None)
    torch.testing.assert_close(one, (x[:, :1] + 2.5 * sae0.W_dec[7]).detach())


def test_clamp_to_the_current_value_is_a_no_op(tiny, sae0):
    from saelab.analysis.steering import Intervention, steering_hook

    hook = sae0.cfg.hook_name
    toks = tiny.to_tokens(" park")  # BOS + one token: one steered position
    _, cache = tiny.run_with_cache(toks)
    x = cache[hook]
    f = sae0.encode(x[0, 1:])[0].detach()
    lat = int(f.argmax())
    assert f[lat] > 0
    out = steering_hook(sae0, [Intervention(lat, "clamp", float(f[lat]))])(x, None)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    with torch.no_grad():
        clean = tiny(toks)
        with tiny.hooks(fwd_hooks=[(hook, steering_hook(sae0, [Intervention(lat, "clamp", float(f[lat]))]))]):
            clamped = tiny(toks)
    torch.testing.assert_close(clamped, clean, atol=1e-4, rtol=0)
    # clamping to another value changes exactly that latent's share: x + (v − f_i)·d_i
    out = steering_hook(sae0, [Intervention(lat, "clamp", 10.0)])(x, None)
    torch.testing.assert_close(out[0, 1], (x[0, 1] + (10.0 - f[lat]) * sae0.W_dec[lat]).detach())


def test_ablation_removes_the_latent_and_keeps_the_error_term(tiny, sae0):
    """Downstream of the hook the activation is decode(f with f_i = 0) + (x − decode(f)): the
    latent's contribution is gone, every other latent's and the SAE error are untouched."""
    from saelab.analysis.steering import Intervention, _fwd_hooks

    hook = sae0.cfg.hook_name
    lat, acts = _top_latent(tiny, sae0)
    toks = tiny.to_tokens(PROMPT)
    seen = {}

    def grab(a, hook):
        seen["x"] = a.detach().clone()
        return a

    with torch.no_grad():
        _, cache = tiny.run_with_cache(toks)
        with tiny.hooks(fwd_hooks=_fwd_hooks(sae0, tiny, [Intervention(lat, "ablate")]) + [(hook, grab)]):
            tiny(toks)
    x = cache[hook][0, 1:]
    f = sae0.encode(x)
    assert (f[:, lat] > 0).any()
    f0 = f.clone()
    f0[:, lat] = 0
    want = sae0.decode(f0) + (x - sae0.decode(f))
    torch.testing.assert_close(seen["x"][0, 1:], want.detach(), atol=1e-5, rtol=0)
    # re-encoding the ablated activation: the latent falls where it fired (the encoder is not the
    # decoder's exact inverse, so it need not read exactly 0), and nowhere does it rise
    after = sae0.encode(seen["x"][0, 1:])[:, lat]
    fired = f[:, lat] > 0
    assert (after[fired] < 0.5 * f[fired, lat]).all() and (after <= f[:, lat] + 1e-5).all()


def test_sweep_kl_grows_with_the_coefficient(tiny, sae1):
    from saelab.analysis.steering import sweep

    lat, _ = _top_latent(tiny, sae1)
    coefs = [0, 2, 8, 32]
    rows = sweep(lat, coefs, model=tiny, sae=sae1, prompt=PROMPT, max_new_tokens=6)
    assert [r["coefficient"] for r in rows] == coefs
    kls = [r["kl"] for r in rows]
    shifts = [r["logit_shift"] for r in rows]
    assert kls[0] == 0.0 and all(b > a for a, b in zip(kls, kls[1:])), kls
    assert shifts[0] == 0.0 and shifts[-1] > shifts[1] > 0, shifts
    assert rows[0]["text"] and rows[0]["fluency"] == rows[0]["fluency_clean"]


def test_bad_input_is_a_one_line_error(tiny, sae1):
    from saelab.analysis.steering import Intervention, steer

    with pytest.raises(SaelabError, match="out of range"):
        steer(tiny, sae1, PROMPT, [Intervention(sae1.d_sae, "add", 1.0)])
    with pytest.raises(SaelabError, match="empty"):
        steer(tiny, sae1, "  ", [1])
    with pytest.raises(SaelabError, match="context"):
        steer(tiny, sae1, "word " * tiny.cfg.n_ctx, [1], max_new_tokens=5)
    with pytest.raises(SaelabError, match=r"the prompt \(\d+ tokens\)"):  # longer than the context: not cut to it
        steer(tiny, sae1, "word " * (2 * tiny.cfg.n_ctx), [1], max_new_tokens=1)
    with pytest.raises(SaelabError, match="mode"):
        Intervention(1, "boost", 1.0)


def test_steering_an_sae_on_attention_outputs(tiny):
    """hook_z activations are [batch, pos, heads, d_head]: the hook flattens the heads. The promoted tokens
    follow the latent's direct path through the layer's W_O, and adding the latent raises their logits; a hook
    with no direct path to the logits (hook_q) has none to follow, so logit_shift is NaN while KL still measures
    the effect."""
    import math

    from saelab.analysis.steering import Intervention, prompt_latents, steer
    from saelab.sae.base import SAE

    torch.manual_seed(0)
    d = tiny.cfg.n_heads * tiny.cfg.d_head
    hook = "blocks.1.attn.hook_z"
    sae = SAE.create("topk", d_in=d, d_sae=256, k=8, hook_name=hook)
    toks, acts = prompt_latents(tiny, sae, PROMPT)
    assert acts.shape == (len(toks), 256)
    r = steer(tiny, sae, PROMPT, [Intervention(3, "add", 20.0)], max_new_tokens=3, temperature=0.0)
    W_O = tiny.blocks[1].attn.W_O.detach()
    direct = torch.einsum("hd,hdm->m", (sae.W_dec[3] / sae.W_dec[3].norm()).detach().reshape(W_O.shape[:2]), W_O)
    expect = ((direct - direct.mean()) @ tiny.W_U.detach()).topk(10).indices
    assert r.metrics["promoted"] == [tiny.tokenizer.decode([int(t)]) for t in expect]
    assert r.metrics["kl"] > 0 and r.metrics["logit_shift"] > 0, r.metrics
    q = SAE.create("topk", d_in=d, d_sae=256, k=8, hook_name="blocks.0.attn.hook_q")
    r = steer(tiny, q, PROMPT, [Intervention(3, "add", 20.0)], max_new_tokens=3, temperature=0.0)
    assert r.metrics["kl"] > 0 and math.isnan(r.metrics["logit_shift"]) and r.metrics["promoted"] == []


def test_nonfinite_value_and_bad_generation_settings_are_one_line(tiny):
    from saelab.analysis.steering import Intervention, steer
    from saelab.sae.base import SAE

    sae = SAE.create("topk", d_in=128, d_sae=256, k=4, hook_name="blocks.0.hook_resid_post", model_name="tiny")
    with pytest.raises(SaelabError, match="not a finite number"):
        steer(tiny, sae, PROMPT, [Intervention(1, "add", float("nan"))], max_new_tokens=2)
    for kw in ({"max_new_tokens": 0}, {"max_new_tokens": 2, "temperature": -1.0}):
        with pytest.raises(SaelabError, match="max_new_tokens must be at least 1 and temperature at least 0"):
            steer(tiny, sae, PROMPT, [Intervention(1, "add", 1.0)], **kw)


def test_prompt_and_latent_spellings_a_notebook_uses(tiny, sae1):
    """A batch of prompts is one line (a list of strings was an AttributeError; a [2, T] token
    tensor was silently flattened into one sequence), generate_side_by_side takes a list of
    strings, and latent ids may be numpy ints, 0-d tensors or (latent, mode, value) tuples."""
    import numpy as np

    from saelab.analysis.steering import Intervention, as_interventions, generate_side_by_side, prompt_latents, steer

    two = ["Once upon a time", "The dog ran"]
    with pytest.raises(SaelabError, match="one prompt at a time: got a list of 2"):
        steer(tiny, sae1, two, 5, max_new_tokens=2)
    with pytest.raises(SaelabError, match=r"one prompt at a time: got token ids of shape \[2, "):
        generate_side_by_side(tiny, sae1, tiny.to_tokens(two), 5, max_new_tokens=2)
    with pytest.raises(SaelabError, match="one prompt at a time"):
        prompt_latents(tiny, sae1, two)
    with pytest.raises(SaelabError, match="token ids must be integers"):
        prompt_latents(tiny, sae1, tiny.to_tokens(two[0]).float())
    pairs = generate_side_by_side(tiny, sae1, two, [Intervention(5, "add", 5.0)], max_new_tokens=3, temperature=0)
    assert pairs == [generate_side_by_side(tiny, sae1, p, [Intervention(5, "add", 5.0)], max_new_tokens=3,
                                           temperature=0) for p in two]
    assert prompt_latents(tiny, sae1, [two[0]])[0] == prompt_latents(tiny, sae1, two[0])[0]
    ids = tiny.to_tokens(two[0])[0].tolist()
    torch.testing.assert_close(prompt_latents(tiny, sae1, ids)[1], prompt_latents(tiny, sae1, two[0])[1])
    ref = [Intervention(5, "add", 2.0)]
    assert as_interventions(np.int64(5), "add", 2) == ref
    assert as_interventions(torch.tensor(5), "add", 2) == ref
    assert as_interventions(torch.tensor([5]), "add", 2) == ref
    assert as_interventions((5, "add", 2.0)) == ref == as_interventions([(np.int64(5), "add", 2)])
    assert Intervention(torch.tensor(5), "add", 2).latent == 5
    assert Intervention(5, "Add", 2.0) == ref[0] and Intervention(5, " CLAMP", 1.0).mode == "clamp"
    with pytest.raises(SaelabError, match="unknown steering mode 'boost'"):
        Intervention(5, "boost", 2.0)
    with pytest.raises(SaelabError, match="a latent id must be an int"):
        Intervention("5", "add", 2.0)


def test_an_sae_that_does_not_fit_the_model_is_one_line(tiny):
    """An SAE of the wrong width at an existing hook (add mode was a raw broadcasting RuntimeError),
    or one with no hook recorded (it said "reads hook ''"), gives a one-line SaelabError; sweep takes
    a single coefficient."""
    from saelab.analysis.steering import generate_side_by_side, steer, sweep
    from saelab.sae.base import SAE

    narrow = SAE.create("topk", d_in=64, d_sae=128, k=4, hook_name="blocks.0.hook_resid_post")
    with pytest.raises(SaelabError, match="this SAE writes 64 values per position, but hook blocks.0.hook_resid_post gives 128"):
        steer(tiny, narrow, "Once upon a time", 5, max_new_tokens=1)
    with pytest.raises(SaelabError, match="no hook recorded"):
        generate_side_by_side(tiny, SAE.create("topk", d_in=128, d_sae=128, k=4), "Once upon a time", 5,
                              max_new_tokens=1)
    sae = SAE.create("topk", d_in=128, d_sae=128, k=4, hook_name="blocks.0.hook_resid_post")
    rows = sweep(5, 2.0, model=tiny, sae=sae, prompt="Once upon a time", max_new_tokens=1)
    assert [r["coefficient"] for r in rows] == [2.0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_clamp_with_the_sae_on_the_cpu_and_the_model_on_the_gpu():
    """clamp/ablate encode on the SAE's own device (add already moved W_dec): an SAE left on the CPU
    steers a model loaded on the GPU (clamp was a device-mismatch error)."""
    from saelab.analysis.steering import Intervention, steer
    from saelab.models import load_model
    from saelab.sae.base import SAE

    model = load_model("tiny", device="cuda")
    sae = SAE.create("topk", d_in=model.cfg.d_model, d_sae=64, k=4, hook_name="blocks.0.hook_resid_post")
    r = steer(model, sae, "Once upon a time", [Intervention(3, "clamp", 5.0), Intervention(4, "ablate")],
              max_new_tokens=2, temperature=0)
    assert r.metrics["kl"] >= 0


# ----------------------------------------------------------------------------- saelab steer
def test_cli_steer_prints_what_the_library_gives_and_writes_json(tiny, sae1, demo_group, tmp_path):
    """`saelab steer` in a subprocess, on the demo group with --hook: the continuations and metrics it prints and
    writes are those of steering.steer on the same settings."""
    import json
    import os
    import subprocess
    import sys

    from saelab.analysis.steering import Intervention, steer

    lat, _ = _top_latent(tiny, sae1)
    out = tmp_path / "runs" / "steer.json"  # its folder does not exist yet
    r = subprocess.run([sys.executable, "-m", "saelab", "steer", "--sae", str(demo_group.group), "--hook",
                        "blocks.1.hook_resid_post", "--prompt", PROMPT, "--steer", f"{lat}:add:40", "--tokens", "8",
                        "--seed", "3", "--json", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    want = steer(tiny, sae1, PROMPT, [Intervention(lat, "add", 40.0)], max_new_tokens=8, temperature=1.0, seed=3,
                 top_n=5)  # the command lists the 5 biggest rises and falls
    assert want.steered != want.clean
    assert f"clean:   {want.clean!r}" in r.stdout and f"steered: {want.steered!r}" in r.stdout
    assert f"KL {want.metrics['kl']:.3f} · logit shift of the promoted tokens {want.metrics['logit_shift']:+.3f}" \
        in r.stdout
    assert f"wrote {out}" in r.stdout
    got = json.loads(out.read_text())
    assert got["clean"] == want.clean and got["steered"] == want.steered and got["hook"] == "blocks.1.hook_resid_post"
    assert got["interventions"] == [{"latent": lat, "mode": "add", "value": 40.0}] and got["model"] == "tiny"
    assert abs(got["metrics"]["kl"] - want.metrics["kl"]) < 1e-6 and got["prob_change"] == want.prob_change


def test_cli_sweep_rows_start_from_the_clean_run(demo_group, tiny, sae1, tmp_path, capsys):
    import json

    from saelab.cli import main

    lat, _ = _top_latent(tiny, sae1)
    out = tmp_path / "sweep.json"
    assert main(["steer", "--sae", str(demo_group.saes["blocks.1.hook_resid_post"]), "--prompt", PROMPT,
                 "--steer", str(lat), "--sweep", "0,40", "--tokens", "6", "--json", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["coefficient"] for r in rows] == [0.0, 40.0]
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0.5 and rows[0]["text"] != rows[1]["text"]
    assert "(greedy, seed 0)" in text and f"{rows[1]['text']!r}" in text
    assert rows[0]["fluency"] == rows[0]["fluency_clean"]  # coefficient 0 is the clean greedy continuation


def test_cli_steer_bad_input_is_one_line(demo_group, tmp_path, capsys):
    from saelab.cli import main

    sae = str(demo_group.saes["blocks.1.hook_resid_post"])
    cases = [
        (["--sae", sae], "nothing to steer"),
        (["--sae", sae, "--steer", "x"], "write LATENT:MODE:VALUE"),
        (["--sae", sae, "--steer", "5:zap:1"], "unknown mode 'zap'"),
        (["--sae", sae, "--steer", "5:add"], "add needs a value"),
        (["--sae", sae, "--steer", "5:clamp:big"], "'big' is not a number"),
        (["--sae", sae, "--steer", "99999:add:1"], "latent 99999 is out of range"),
        (["--sae", str(demo_group.group), "--steer", "5:add:1"], "is a group of 2 SAEs: pass --hook"),
        (["--sae", str(demo_group.group), "--hook", "blocks.7.hook_z", "--steer", "5:add:1"], "is not in"),
        (["--sae", sae, "--steer", "5", "--sweep", "0,x"], "numbers separated by commas"),
        (["--sae", sae, "--steer", "5", "--steer", "6", "--sweep", "0,1"], "--sweep takes one --steer"),
        (["--sae", sae, "--steer", "5:ablate", "--sweep", "0,1"], "varies an add or clamp value"),
        (["--sae", sae, "--steer", "5:add:1", "--tokens", "0"], "--tokens 0: pass 1 or more"),
        (["--sae", sae, "--steer", "5:add:1", "--temperature", "-1"], "--temperature -1.0: pass 0"),
        (["--sae", sae, "--steer", "5:add:1", "--json", "/proc/x.json"], "--json /proc/x.json cannot be written"),
        (["--sae", sae, "--steer", "5:add:1", "--json", str(tmp_path)], "is a folder: pass a file name"),
    ]
    for args, msg in cases:
        assert main(["steer", "--prompt", PROMPT, "--quiet", *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("saelab: error:") and msg in err[0], (args, err)
    assert list(tmp_path.iterdir()) == []


def test_steering_that_overflows_the_model_is_one_line_naming_the_value(demo_group, tiny, sae0, tmp_path, capsys):
    """A value whose steered activations overflow float32 (1e39 · a unit decoder row): NaN logits were a Categorical
    ValueError traceback when sampling, and greedy decoding, --json and --sweep exited 0 with the argmax of NaN
    (KL null, fluency 10). Each path is one line naming the value to lower, and no report is written."""
    from saelab.analysis.steering import Intervention, generate_side_by_side, sweep
    from saelab.cli import main

    sae = str(demo_group.saes["blocks.0.hook_resid_post"])
    out = tmp_path / "steer.json"
    for extra in ([], ["--temperature", "0", "--json", str(out)], ["--steer", "2:add:1"]):
        assert main(["steer", "--sae", sae, "--prompt", "hi", "--steer", "1:add:1e39", "--tokens", "2", "--quiet",
                     *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "NaN or inf" in err[0] and "lower the value 1e+39 of latent 1 (add)" in err[0], err
    assert main(["steer", "--sae", sae, "--prompt", "hi", "--steer", "1", "--sweep", "0,1e39", "--tokens", "2",
                 "--json", str(out), "--quiet"]) == 2
    assert "lower the value 1e+39 of latent 1" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SaelabError, match=r"lower the value -1e\+39 of latent 3 \(clamp\)"):
        generate_side_by_side(tiny, sae0, "hi", [Intervention(3, "clamp", -1e39)], max_new_tokens=2)
    with pytest.raises(SaelabError, match="lower the value 1e"):
        sweep(1, [1e39], model=tiny, sae=sae0, prompt="hi", max_new_tokens=2)
