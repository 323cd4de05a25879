"""Sparse feature circuits on the demo SAE group: attribution vs actual patching, integrated-gradient
convergence, the induction circuit's faithfulness, edges, the circuit file, and CLI errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from saelab.analysis import circuits as C
from saelab.analysis.circuits.nodes import hooked_run
from saelab.analysis.tasks import induction_task, logit_diff, make_task
from saelab.errors import SaelabError


@pytest.fixture(scope="module")
def group(demo_group):
    return C.load_group(demo_group.group)


def _metric_with(model, group, task, hook, f, e):
    """m with the hook's output rebuilt from these latents and error term (the actual effect of a patch)."""
    sae = group.saes[hook]
    with torch.no_grad():
        x = f @ sae.W_dec + sae.b_dec + e
        logits, _ = hooked_run(model, task.clean, {hook: lambda act: x})
        return float(logit_diff(logits, task).mean())


def test_attribution_matches_single_latent_patch(tiny, group):
    """Linear regime: move one latent a small step towards its corrupted value; the actual change of
    the metric equals the attribution estimate ε·∇m·(a_clean − a_patch) within 5%."""
    task = induction_task(tiny, n=4, seed=1)
    clean = C.node_values(tiny, group, task.clean)
    patch = C.node_values(tiny, group, task.corrupted)
    eff = C.attribution_effects(tiny, group, task, clean, patch)
    with torch.no_grad():
        m_clean = float(logit_diff(tiny(task.clean), task).mean())
    eps = 0.02
    checked = 0
    for hook in group.hooks:
        lat, _ = eff[hook]
        for i in lat.abs().topk(3).indices.tolist():
            f = clean.f[hook].clone()
            f[..., i] -= eps * (clean.f[hook][..., i] - patch.f[hook][..., i])   # patch that one latent by ε
            actual = m_clean - _metric_with(tiny, group, task, hook, f, clean.e[hook])
            predicted = eps * float(lat[i])
            assert abs(actual - predicted) <= 0.05 * abs(predicted) + 1e-4, (hook, i, actual, predicted)
            checked += 1
        # and the error node the same way
        e = clean.e[hook] - eps * (clean.e[hook] - patch.e[hook])
        actual = m_clean - _metric_with(tiny, group, task, hook, clean.f[hook], e)
        assert abs(actual - eps * eff[hook][1]) <= 0.05 * abs(eps * eff[hook][1]) + 1e-4
    assert checked == 3 * len(group.hooks)


def test_ig_converges_to_exact_difference(tiny, group):
    """The IG effects at a hook sum to m(clean) − m(that hook patched); the error shrinks with steps.
    At the last hook (before ln_final) attribution patching is far off, IG is not."""
    task = induction_task(tiny, n=4, seed=2)
    clean = C.node_values(tiny, group, task.clean)
    patch = C.node_values(tiny, group, task.corrupted)
    hook = group.hooks[-1]
    with torch.no_grad():
        m_clean = float(logit_diff(tiny(task.clean), task).mean())
    exact = m_clean - _metric_with(tiny, group, task, hook, patch.f[hook], patch.e[hook])
    assert abs(exact) > 1.0
    errs = []
    for steps in (1, 4, 16):
        eff = C.ig_effects(tiny, group, task, clean, patch, steps=steps, hooks=[hook])
        total = float(eff[hook][0].sum()) + eff[hook][1]
        errs.append(abs(total - exact))
    assert errs[2] < errs[0] and errs[2] <= 0.02 * abs(exact), (errs, exact)
    att = C.attribution_effects(tiny, group, task, clean, patch)
    assert abs(float(att[hook][0].sum()) + att[hook][1] - exact) > 5 * errs[2]


def test_edge_faithfulness_with_all_edges_equals_node_faithfulness(tiny, group):
    task = induction_task(tiny, n=8, seed=3)
    clean = C.node_values(tiny, group, task.clean)
    patch = C.node_values(tiny, group, task.corrupted)
    eff = C.attribution_effects(tiny, group, task, clean, patch)
    sel = C.select_nodes(eff, 0.05)
    means = C.task_means(clean)
    edges = C.edge_weights(tiny, group, task, clean, patch, sel)
    n_up = len(sel[group.hooks[0]][0]) + int(sel[group.hooks[0]][1])
    n_down = len(sel[group.hooks[1]][0]) + int(sel[group.hooks[1]][1])
    assert len(edges) == n_up * n_down > 0
    m_nodes = C.ablated_metric(tiny, group, task, means, sel)
    m_all_edges = C.edge_ablated_metric(tiny, group, task, means, sel, edges, threshold=0.0)
    assert m_all_edges == pytest.approx(m_nodes, abs=1e-3)
    # with no edge kept, each downstream node sees only means upstream: a different (lower) metric
    m_no_edges = C.edge_ablated_metric(tiny, group, task, means, sel, edges, threshold=float("inf"))
    assert abs(m_no_edges - m_nodes) > 1e-3


@pytest.fixture(scope="module")
def induction_circuit(demo_group, tmp_path_factory):
    """`saelab circuit` on the induction task, driven as a user would (subprocess): 8 prompts,
    integrated gradients, node threshold 0.03."""
    out = tmp_path_factory.mktemp("circ") / "circuits" / "induction.json"
    r = subprocess.run([sys.executable, "-m", "saelab", "circuit", "--task", "induction", "--saes",
                        str(demo_group.group), "--out", str(out), "--n", "8", "--method", "ig",
                        "--node-threshold", "0.03", "--quiet"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    return r.stdout, C.load_circuit(out)


def test_cli_induction_circuit(induction_circuit, demo_group):
    stdout, c = induction_circuit
    assert "faithfulness = " in stdout
    assert c["task"] == {"name": "induction", "n_examples": 8, "metric": "logit_diff", "accuracy": 1.0}
    assert "examples, the model right on 100.0%)" in stdout and "note:" not in stdout, stdout
    assert c["hooks"] == list(demo_group.saes) and c["model"] == "tiny"
    assert set(c["saes"]) == set(c["hooks"]) and c["method"] == "ig" and c["ig_steps"] == 10
    ids = {n["id"] for n in c["nodes"]}
    assert all(abs(n["effect"]) > c["node_threshold"] for n in c["nodes"])
    assert all(e["src"] in ids and e["dst"] in ids and abs(e["weight"]) >= c["edge_threshold"] for e in c["edges"])
    assert c["edges"] and {n["layer"] for n in c["nodes"]} == {0, 1}
    mv, f = c["metric_values"], c["faithfulness"]
    assert mv["full"] > mv["empty"] + 5
    # The demo SAEs train a little differently on each CPU (GEMM rounding, which kernel path `auto` takes), so
    # the circuit at one fixed threshold moves: at 0.03, 316 latents (7.7% of 4096) → 0.87 on an Intel CPU with
    # avx512_bf16, 274 (6.7%) → 0.75 on an AMD EPYC (AVX2); there 0.02 gives 367 (9.0%) → 0.85. What holds on
    # both: the file's node sweep reaches faithfulness >= 0.8 within 10% of the latents.
    assert f["nodes"] >= 0.6 and c["latent_fraction"] <= 0.10, (f["nodes"], c["latent_fraction"])
    total = c["n_latents_total"]
    assert any(r["faithfulness"] >= 0.8 and r["n_latents"] <= 0.10 * total for r in f["node_sweep"]), f["node_sweep"]
    # keeping every edge among circuit nodes reproduces the node circuit; fewer edges, less faithful
    sweep = {r["threshold"]: r["faithfulness"] for r in f["edge_sweep"]}
    assert sweep[0.0] == pytest.approx(f["nodes"], abs=0.02)
    assert f["edges"] < sweep[0.0]


@pytest.fixture(scope="module")
def wide_group(demo_group, tiny):
    """The wide group (TopK k 16, 2 x 16384 latents at the demo's hooks, 500k tokens each on the demo's stores; built
    once per test demo folder, then reused by notebook 02)."""
    from saelab.demo import ensure_wide_group

    return C.load_group(ensure_wide_group(demo_group.root, progress=False, model=tiny).group)


def test_induction_circuit_within_5_percent_of_latents(tiny, wide_group):
    """On random-token induction: faithfulness >= 0.8 with at most 5% of all SAE latents, on 16 prompts with the
    wide SAEs (the demo group's 2 x 2048 latents need more than 5% at 16 prompts: notebook 02 shows both)."""
    task = make_task("induction", tiny, n=16)
    c = C.find_circuit(tiny, wide_group, task, method="ig", node_threshold=0.005, edges=False, progress=False,
                       node_sweep=(0.02, 0.01))
    n_lat = sum(nd["kind"] == "latent" for nd in c["nodes"])
    print(f"\nfaithfulness = {c['faithfulness']['nodes']:.3f} with {n_lat} latents "
          f"({100 * c['latent_fraction']:.2f}% of {c['n_latents_total']}) + "
          f"{len(c['nodes']) - n_lat} error nodes; sweep {c['faithfulness']['node_sweep']}")
    assert c["n_latents_total"] == 2 * 16384 and len(c["nodes"]) - n_lat <= 2
    assert c["faithfulness"]["nodes"] >= 0.8 and c["latent_fraction"] <= 0.05, (c["faithfulness"], c["latent_fraction"])
    sweep = {r["threshold"]: r for r in c["faithfulness"]["node_sweep"]}
    assert sweep[0.02]["n_latents"] < n_lat and sweep[0.02]["faithfulness"] < c["faithfulness"]["nodes"]


def test_names_induction_circuit_within_5_percent(tiny, group):
    """Induction in natural language over corpus names (tokens recur across prompts): faithfulness
    >= 0.8 with at most 5% of all latents on 64 prompts (measured: 155 latents = 3.8%, 0.87)."""
    task = make_task("names", tiny, n=64)
    c = C.find_circuit(tiny, group, task, method="ig", node_threshold=0.02, edges=False, progress=False,
                       node_sweep=(0.1, 0.05))
    assert c["faithfulness"]["nodes"] >= 0.8 and c["latent_fraction"] <= 0.05, (c["faithfulness"], c["latent_fraction"])
    sweep = c["faithfulness"]["node_sweep"]
    assert sweep[0]["faithfulness"] < c["faithfulness"]["nodes"]   # fewer nodes (threshold 0.1), less faithful


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "saelab", "circuit", *args, "--quiet"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_errors(demo_group, tmp_path, capsys):
    """Bad input → one line on stderr, exit 2, no traceback (in-process main(); one case as a subprocess)."""
    import shutil

    from saelab.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"clean": "When Mia and Tom went", "corrupted": "When Mia and Sam went",
                               "answer": " extraordinarily", "wrong": " Tom"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    # SAEs from different models: a copy of the group whose second SAE claims another model
    mixed = tmp_path / "mixed"
    shutil.copytree(demo_group.group, mixed, ignore=shutil.ignore_patterns("features.h5", "checkpoint.pt", "circuits"))
    cfg_path = mixed / list(demo_group.saes)[1] / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_name"] = cfg["metadata"]["model_name"] = cfg["saelab"]["model_name"] = "gpt2"
    cfg_path.write_text(json.dumps(cfg))
    r = _cli("--task", "induction", "--saes", str(mixed))
    assert r.returncode == 2 and "different models" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for args, match in [(("--task", str(bad), "--saes", str(demo_group.group)), "not one"),
                        (("--task", str(empty), "--saes", str(demo_group.group)), "no examples"),
                        (("--task", "induction", "--saes", str(demo_group.group), "--n", "0"), "at least one"),
                        (("--task", "induction", "--saes", str(tmp_path)), "neither an SAE group")]:
        capsys.readouterr()
        assert main(["circuit", *args, "--quiet", "--device", "cpu"]) == 2, args
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1 and err.startswith("saelab: error:"), err


def test_load_circuit_validation(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(SaelabError, match="kind"):
        C.load_circuit(p)
    good = {"format_version": 1, "kind": C.KIND, "model": "tiny", "group": "g", "saes": {"h": "p"}, "hooks": ["h"],
            "task": {"name": "t"}, "method": "attrib", "node_threshold": 0.1, "edge_threshold": 0.01,
            "nodes": [{"id": "h/1", "hook": "h", "layer": 0, "kind": "latent", "latent": 1, "effect": 0.5}],
            "edges": [{"src": "h/1", "dst": "h/2", "weight": 0.1}], "faithfulness": {}}
    p.write_text(json.dumps(good))
    with pytest.raises(SaelabError, match="not in the circuit"):
        C.load_circuit(p)
    good["edges"] = []
    p.write_text(json.dumps(good))
    assert C.load_circuit(p)["nodes"][0]["latent"] == 1
    p.write_text("{broken")
    with pytest.raises(SaelabError, match="is not a valid circuit file: not JSON"):
        C.load_circuit(p)


@pytest.fixture(scope="module")
def attn_group(small_run, tmp_path_factory):
    """A group of two small TopK SAEs: blocks.0.hook_resid_post and blocks.1.attn.hook_z (heads flattened)."""
    from saelab.config import SAEConfig, TrainConfig
    from saelab.train import train

    cfg, _ = small_run
    out = tmp_path_factory.mktemp("attn") / "group"
    train(TrainConfig(activations=cfg.out, out=str(out), tokens=4096, batch_size=512),
          SAEConfig(arch="topk", k=8, width=256), progress=False)
    return out


def test_circuit_through_an_attention_sae(tiny, attn_group):
    """An attn.hook_z SAE in a circuit: its latents are patched with the heads flattened and put back in the
    model's [n, T, heads, d_head]; keeping every node splices exactly, and attribution matches the actual
    effect of patching one hook_z latent by a small step (linear regime), as for residual-stream SAEs."""
    hook = "blocks.1.attn.hook_z"
    group = C.load_group(attn_group)
    assert group.hooks == ["blocks.0.hook_resid_post", hook]
    task = induction_task(tiny, n=4, seed=1)
    c = C.find_circuit(tiny, attn_group, task, node_threshold=0.0, edges=True, node_sweep=(), edge_sweep=(),
                       progress=False)
    assert abs(c["faithfulness"]["nodes"] - 1.0) < 1e-3, c["faithfulness"]
    assert any(e["src"].startswith("blocks.0") and e["dst"].startswith(hook) for e in c["edges"])
    clean = C.node_values(tiny, group, task.clean)
    patch = C.node_values(tiny, group, task.corrupted)
    assert clean.f[hook].shape == (*task.clean.shape, group.saes[hook].d_sae)
    eff = C.attribution_effects(tiny, group, task, clean, patch)
    with torch.no_grad():
        m_clean = float(logit_diff(tiny(task.clean), task).mean())
    lat, _ = eff[hook]
    assert lat.abs().max() > 1e-2  # effects big enough for the comparison to mean something
    for i in lat.abs().topk(3).indices.tolist():
        f = clean.f[hook].clone()
        f[..., i] -= 0.02 * (clean.f[hook][..., i] - patch.f[hook][..., i])
        actual = m_clean - _metric_with(tiny, group, task, hook, f, clean.e[hook])
        predicted = 0.02 * float(lat[i])
        assert abs(actual - predicted) <= 0.05 * abs(predicted) + 1e-4, (i, actual, predicted)


def test_circuit_refuses_synthetic_saes_and_negative_thresholds(small_run, attn_group, tmp_path, capsys):
    from saelab.cli import main
    from saelab.config import SAEConfig, TrainConfig
    from saelab.synthetic import SyntheticConfig, write_synthetic
    from saelab.train import train

    syn = write_synthetic(SyntheticConfig(out=str(tmp_path / "planted"), d=16, n_true=32, active=3, rows=4096),
                          progress=False)
    train(TrainConfig(activations=str(syn), out=str(tmp_path / "syn"), tokens=2048, batch_size=1024),
          SAEConfig(arch="topk", k=4, width=64), progress=False)
    capsys.readouterr()
    out = tmp_path / "syn.json"
    assert main(["circuit", "--task", "induction", "--saes", str(tmp_path / "syn"), "--n", "4", "--out", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "synthetic store" in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    for flag in ("--node-threshold", "--edge-threshold"):
        out = tmp_path / "neg.json"
        assert main(["circuit", "--task", "induction", "--saes", str(attn_group), "--n", "4", "--out", str(out),
                     flag, "-1", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert "must be at least 0" in err and len(err.splitlines()) == 1, err
        assert not out.exists()


def test_cli_circuit_out_replaces_an_existing_file_and_says_so(small_run, tmp_path, capsys):
    """--out: an existing file saelab did not write is refused (kept as it was) unless --force; a circuit file is
    replaced atomically (no temporary left) and the output says so; a folder is refused before the work."""
    from saelab.cli import main
    from saelab.config import SAEConfig, TrainConfig
    from saelab.train import train

    _, stores = small_run
    train(TrainConfig(activations=str(stores["blocks.0.hook_resid_post"]), out=str(tmp_path / "s"), tokens=2048,
                      batch_size=1024), SAEConfig(arch="topk", k=4, width=64), progress=False)
    res = tmp_path / "res"
    res.mkdir()
    out = res / "c.json"
    out.write_text("old")
    args = ["circuit", "--task", "induction", "--saes", str(tmp_path / "s"), "--n", "4", "--quiet", "--device", "cpu"]
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a file saelab circuit wrote" in err and "--force" in err and out.read_text() == "old", err
    assert main([*args, "--out", str(out), "--force"]) == 0, capsys.readouterr().err
    assert f"wrote {out} (replaced the existing file)" in capsys.readouterr().out
    assert C.load_circuit(out)["task"]["name"] == "induction"
    assert [p.name for p in res.iterdir()] == ["c.json"]
    assert main([*args, "--out", str(out)]) == 0  # a circuit file: replaced without --force
    assert f"wrote {out} (replaced the existing file)" in capsys.readouterr().out
    out.unlink()
    assert main([*args, "--out", str(out)]) == 0
    assert "replaced" not in capsys.readouterr().out and out.is_file()
    assert main([*args, "--out", str(res)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a folder" in err and len(err.splitlines()) == 1, err
    # a task the model gets wrong (the answers name what induction does not predict): said, not silently used
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text("".join(json.dumps(r) + "\n" for r in [
        {"clean": " red blue green yellow red blue green", "corrupted": " cat dog bird fish red blue green",
         "answer": " red", "wrong": " yellow"},
        {"clean": " one two three four one two three", "corrupted": " cat dog bird fish one two three",
         "answer": " five", "wrong": " four"}]))
    assert main([*args[:2], str(swapped), *args[3:], "--out", str(res / "swapped.json")]) == 0
    out_text = capsys.readouterr().out
    assert "the model right on 0.0%" in out_text and "note: the model prefers the wrong answer on 100.0%" in out_text
    assert C.load_circuit(res / "swapped.json")["task"]["accuracy"] == 0.0


def test_find_circuit_takes_a_group_folder_and_a_task_spec(tiny, group, demo_group, tmp_path):
    """find_circuit(model, "<group folder>", "<task>.jsonl") works as with load_group / make_task
    (a folder was AttributeError 'str' object has no attribute 'model'; a task name: '... clean');
    any other type is a one-line SaelabError."""
    path = tmp_path / "ioi.jsonl"
    rows = [{"clean": "When Mary and John went to the store, John gave a drink to",
             "corrupted": "When Mary and John went to the store, Mary gave a drink to", "answer": " Mary", "wrong": " John"},
            {"clean": "When Tom and Anna went to the park, Anna gave a ball to",
             "corrupted": "When Tom and Anna went to the park, Tom gave a ball to", "answer": " Tom", "wrong": " Anna"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(edges=False, node_sweep=(), progress=False)
    ref = C.find_circuit(tiny, group, make_task(str(path), tiny), **kw)
    got = C.find_circuit(tiny, str(demo_group.group), path, **kw)
    assert got["nodes"] == ref["nodes"] and got["faithfulness"]["nodes"] == ref["faithfulness"]["nodes"]
    with pytest.raises(SaelabError, match="task must be a Task"):
        C.find_circuit(tiny, group, 3, **kw)
    with pytest.raises(SaelabError, match="group must be an SAE group folder"):
        C.find_circuit(tiny, 3, path, **kw)
