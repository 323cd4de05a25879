"""Attribution graphs over MLP transcoders: exact where they must be, pruned and scored as defined, written and read
back, interventions through the real model, and the CLI's refusals."""

from __future__ import annotations

import json
import random

import pytest
import torch

from saelab.analysis.graphs import (build_graph, intervene, load_graph, load_transcoders, prune, scores)
from saelab.analysis.graphs.attribute import _target_values
from saelab.analysis.graphs.replacement import Replacement
from saelab.analysis.logit_lens import direct_logits
from tests.test_outputs import _fails

WORDS = "the king said to queen that he would go castle and she was not there when his men came back with news".split()


@pytest.fixture(scope="module")
def coders(mlp_coders, clt_folder):
    tc = {arch: load_transcoders(mlp_coders / arch) for arch in ("transcoder", "skip-transcoder")}
    tc["clt"] = load_transcoders(clt_folder)
    return tc


def _prompt(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.mark.parametrize("arch", ["transcoder", "skip-transcoder", "clt"])
def test_every_target_is_the_sum_of_its_edges_and_its_constant_part(tiny, coders, arch):
    """Over random prompts: for each feature and logit node, Σ incoming edges + bias = its value within 1e-4, and
    the replacement's values are the real forward's (pre-activations and logits) within 1e-4."""
    rng = random.Random(0)
    for n in (5, 12, 20):
        text = _prompt(rng, n)
        g = build_graph(tiny, coders[arch].coders, text, tiny.to_tokens(text)[0], batch_size=48)
        targets = ~torch.isnan(g.value)
        assert int(targets.sum()) == sum(1 for x in g.nodes if x["kind"] in ("feature", "logit")) > 20
        total = g.adjacency[targets].sum(1) + g.bias[targets]
        torch.testing.assert_close(total, g.value[targets], rtol=0, atol=1e-4)
        assert g.linearization_error < 1e-4
        sources_only = ~targets
        assert not bool(g.adjacency[sources_only].any())  # errors and embeddings have no inputs


def test_a_feature_to_logit_edge_equals_its_analytic_value(tiny, coders):
    """A layer-1 feature at the last position reaches the logits by one path: the residual stream, the final
    LayerNorm (its scale frozen: σ) and the unembedding. Its edge to logit v is a·(u[v] − mean(u)) / σ, u the
    decoder row through that path (``direct_logits``): within 1e-5."""
    text = "the king said to the queen that he would"
    tc = coders["transcoder"]
    g = build_graph(tiny, tc.coders, text, tiny.to_tokens(text)[0])
    rep = Replacement(tiny, tc.coders, tiny.to_tokens(text)[0])
    T = len(g.tokens)
    sigma = float(rep.frozen["ln_final.hook_scale"][0, T - 1, 0])
    ids = {n["id"]: i for i, n in enumerate(g.nodes)}
    last = [i for i, n in enumerate(g.nodes) if n["kind"] == "feature" and n["layer"] == 1 and n["position"] == T - 1]
    logits = [i for i, n in enumerate(g.nodes) if n["kind"] == "logit"]
    assert last and logits
    coder = tc.coders[1]
    checked = 0
    for i in last:
        u = direct_logits(tiny, coder, coder.W_dec[g.nodes[i]["feature"]].detach()).float()
        for j in logits:
            want = g.nodes[i]["activation"] * float(u[g.nodes[j]["feature"]] - u.mean()) / sigma
            assert abs(float(g.adjacency[j, i]) - want) <= 1e-5 * max(1.0, abs(want)), (g.nodes[i]["id"], want)
            checked += 1
    assert checked >= 2 and ids  # and every other layer-1 feature has no edge to a logit of the last position
    others = [i for i, n in enumerate(g.nodes) if n["kind"] == "feature" and n["layer"] == 1 and n["position"] < T - 1]
    assert not bool(g.adjacency[logits][:, others].any())


def test_where_a_feature_drives_another_through_one_path_the_edge_is_analytic(tiny, coders):
    """The bundled model with layer 1's attention output zeroed (its W_O and b_O): a layer-0 feature A at position p
    reaches a layer-1 feature B only through the residual stream at p, and the frozen LayerNorm before MLP 1. The
    A → B edge is then a·(W_dec,A − mean(W_dec,A))·W_enc[:, B] / σ_p (σ_p that LayerNorm's frozen scale at p),
    within 1e-5; at any other position it is 0."""
    import copy

    model = copy.deepcopy(tiny)
    o = model.transformer.h[1]._original_component.attn.o._original_component
    with torch.no_grad():
        o.weight.zero_()
        o.bias.zero_()
    text = "the king said to the queen that he would go back"
    tc = coders["transcoder"]
    toks = model.to_tokens(text)[0]
    g = build_graph(model, tc.coders, text, toks)
    rep = Replacement(model, tc.coders, toks)
    sigma = rep.frozen["blocks.1.ln2.hook_scale"][0, :, 0]
    A = [i for i, n in enumerate(g.nodes) if n["kind"] == "feature" and n["layer"] == 0]
    B = [i for i, n in enumerate(g.nodes) if n["kind"] == "feature" and n["layer"] == 1]
    assert len(A) > 10 and len(B) > 10
    W_dec, W_enc = tc.coders[0].W_dec.detach(), tc.coders[1].W_enc.detach()
    checked = 0
    for b in B:
        nb = g.nodes[b]
        for a in A:
            na = g.nodes[a]
            if na["position"] != nb["position"]:
                assert float(g.adjacency[b, a]) == 0.0
                continue
            d = W_dec[na["feature"]]
            want = na["activation"] * float((d - d.mean()) @ W_enc[:, nb["feature"]]) / float(sigma[na["position"]])
            assert abs(float(g.adjacency[b, a]) - want) <= 1e-5 * max(1.0, abs(want)), (na["id"], nb["id"], want)
            checked += 1
    assert checked > 50


@pytest.mark.parametrize("arch", ["skip-transcoder", "clt"])
def test_each_edge_is_the_change_when_its_source_is_removed(tiny, coders, arch):
    """The backward passes' direct effects against forward passes only: in the affine replacement, the edge s → t
    is t's value minus its value with s's activation set to 0 (every other source kept), within 1e-4. A CLT's
    layer-0 feature writes both MLP outputs: its edges to the logits sum both paths."""
    text = "she said to the king that his men would go back"
    tc = coders[arch]
    toks = tiny.to_tokens(text)[0]
    g = build_graph(tiny, tc.coders, text, toks)
    rep = Replacement(tiny, tc.coders, toks)
    feats = [i for i, n in enumerate(g.nodes) if n["kind"] == "feature"]
    targets = [i for i in feats if g.nodes[i]["layer"] == 1] + [i for i, n in enumerate(g.nodes) if n["kind"] == "logit"]
    spec = {k: torch.tensor(v) for k, v in {
        "kind": [0 if g.nodes[t]["kind"] == "feature" else 1 for t in targets],
        "layer": [g.nodes[t]["layer"] for t in targets], "pos": [g.nodes[t]["position"] for t in targets],
        "feat": [g.nodes[t]["feature"] if g.nodes[t]["kind"] == "feature" else 0 for t in targets],
        "tok": [g.nodes[t]["feature"] if g.nodes[t]["kind"] == "logit" else 0 for t in targets]}.items()}
    base = _target_values(rep, *rep.run(len(targets))[:2], spec)
    rng = random.Random(1)
    layer0 = rep.layers[0]
    for s in rng.sample([i for i in feats if g.nodes[i]["layer"] == 0], 6):
        node = g.nodes[s]
        k = int(((layer0.positions == node["position"]) & (layer0.features == node["feature"])).nonzero())
        keep = layer0.activations[k].clone()
        layer0.activations[k] = 0
        without = _target_values(rep, *rep.run(len(targets))[:2], spec)
        layer0.activations[k] = keep
        torch.testing.assert_close(base - without, g.adjacency[targets, s], rtol=1e-4, atol=1e-4)


def test_pruning_keeps_embeddings_and_logits_and_scores_read_the_error_share(tiny, coders):
    text = "the king said to the queen that he would go to the castle"
    g = build_graph(tiny, coders["transcoder"].coders, text, tiny.to_tokens(text)[0])
    p = prune(g, 0.8, 0.98)
    kinds = [n["kind"] for n in g.nodes]
    assert all(p.node_mask[i] for i, k in enumerate(kinds) if k in ("embedding", "logit"))
    assert 0 < int(p.node_mask.sum()) < len(g.nodes)
    assert not bool((p.edge_mask & (g.adjacency == 0)).any())  # a kept edge is an edge
    kept = p.node_mask
    assert not bool(p.edge_mask[~kept].any()) and not bool(p.edge_mask[:, ~kept].any())
    loose = prune(g, 1.0, 1.0)
    assert int(loose.node_mask.sum()) >= int(p.node_mask.sum()) and int(loose.edge_mask.sum()) > int(p.edge_mask.sum())
    sc = scores(g)
    assert 0 < sc["replacement"] < 1 and 0 < sc["completeness"] < 1
    err = g.kind_slice("error")
    g.adjacency[:, err] = 0  # no error contribution at all: both scores are 1
    assert scores(g) == {"replacement": 1.0, "completeness": 1.0}


def test_setting_a_feature_to_its_own_activation_changes_nothing_and_a_large_value_does(tiny, coders):
    text = "the king said to the queen that he would"
    tc = coders["transcoder"]
    toks = tiny.to_tokens(text)[0]
    g = build_graph(tiny, tc.coders, text, toks)
    f = max((n for n in g.nodes if n["kind"] == "feature" and n["layer"] == 0), key=lambda n: n["activation"])
    clean, same = intervene(tiny, tc.coders, toks, [(0, f["position"], f["feature"], f["activation"])])
    torch.testing.assert_close(same, clean, rtol=1e-4, atol=1e-4)
    _, big = intervene(tiny, tc.coders, toks, [(0, f["position"], f["feature"], 50.0)])
    assert float((big - clean).abs().max()) > 1e-2


def test_a_clt_feature_reaches_later_layers_through_its_own_decoders(tiny, coders):
    """A CLT seen per layer: layer 0's features write MLP outputs 0 and 1 (their decoders to both), layer 1's only
    its own; each layer's error is what makes the replacement write the real MLP output; and an intervention on a
    layer-0 feature moves both outputs, by (value − a)·W_dec[0, f, m] at its position, through the real model."""
    from saelab.hooks import mlp_hooks

    tc = coders["clt"]
    assert sorted(tc.coders) == [0, 1] and set(tc.folders.values()) == {tc.path}
    assert sorted(tc.coders[0].decoders) == [0, 1] and sorted(tc.coders[1].decoders) == [1]
    text = "the king said to the queen that he would"
    toks = tiny.to_tokens(text)[0]
    rep = Replacement(tiny, tc.coders, toks)
    clt = tc.coders[0].clt
    W = (clt.W_dec * clt.mask / clt.out_scale[None, None, :, None]).detach()  # raw units
    last = rep.layers[0].positions == len(toks) - 1  # MLP 1's output reaches the next-token logits only from here
    i = int(torch.where(last, rep.layers[0].activations, -1).argmax())
    f, p, a = int(rep.layers[0].features[i]), int(rep.layers[0].positions[i]), float(rep.layers[0].activations[i])

    def add(m):  # layer 0's input does not move, so its activation stays a: the change is fixed in advance
        def fn(t, hook):
            t = t.clone()
            t[0, p] += 3.0 * W[0, f, m].to(t.dtype)
            return t
        return fn

    clean, new = intervene(tiny, tc.coders, toks, [(0, p, f, a + 3.0)])
    with torch.no_grad():
        want = tiny.run_with_hooks(toks[None], fwd_hooks=[(mlp_hooks(m)[1], add(m)) for m in (0, 1)])[0, -1].float()
        only_own = tiny.run_with_hooks(toks[None], fwd_hooks=[(mlp_hooks(0)[1], add(0))])[0, -1].float()
    torch.testing.assert_close(new, want, rtol=1e-4, atol=1e-4)
    assert float((new - clean).abs().max()) > 1e-3
    assert float((only_own - new).abs().max()) > 1e-4  # the write to layer 1 counts


@pytest.mark.parametrize("act_fn", ["topk", "relu", "jumprelu"])
def test_a_clt_over_some_layers_with_its_own_scales_is_what_its_forward_writes(tiny, act_fn):
    """An unsaved CLT (scales not folded: in_scale, out_scale ≠ 1) over layer 1 only, then over both: each layer's
    b_dec + Σ a·W_dec written into MLP output m is the CLT's own forward on the stacked MLP inputs (1e-5), the
    layers are keyed by model layer, and every target of its graph is the sum of its edges (1e-4), with features
    capped too (the dropped ones' writes join each layer's error). For each activation (JumpReLU: thresholds of
    its own per layer and latent)."""
    from saelab.analysis.graphs.coders import clt_layers
    from saelab.hooks import mlp_hooks
    from saelab.sae import SAE

    toks = tiny.to_tokens("the king said to the queen that he would go")[0]
    with torch.no_grad():
        _, cache = tiny.run_with_cache(toks[None])
    for layers in ([1], [0, 1]):
        torch.manual_seed(len(layers))
        pairs = [":".join(mlp_hooks(L)) for L in layers]
        clt = SAE.create("clt", d_in=128, d_out=128, d_sae=64, k=6, clt_pairs=pairs, hook_name=mlp_hooks(layers[0])[0],
                         hook_name_out=mlp_hooks(layers[0])[1], model_name="tiny", act_fn=act_fn).eval()
        with torch.no_grad():
            if act_fn == "jumprelu":
                clt.log_threshold.copy_(torch.empty_like(clt.log_threshold).uniform_(0.02, 0.3).log())
            clt.in_scale.uniform_(0.5, 2.0)
            clt.out_scale.uniform_(0.5, 2.0)
            clt.b_dec.normal_(0, 0.3)
        coders = clt_layers(clt, "clt")
        assert sorted(coders) == layers and sorted(coders[layers[0]].decoders) == layers
        x = torch.stack([cache[mlp_hooks(L)[0]][0, 1:].float() for L in layers], 1)  # [T-1, layers, d_in]
        with torch.no_grad():
            want = clt(x)
        rep = Replacement(tiny, coders, toks)
        for i, m in enumerate(layers):
            written = rep.inject(m)[1:] - rep.layers[m].error[1:]
            torch.testing.assert_close(written, want[:, i], rtol=1e-5, atol=1e-5)
        for cap in (None, 5):
            g = build_graph(tiny, coders, "p", toks, max_features=cap)
            n_features = sum(n["kind"] == "feature" for n in g.nodes)
            assert n_features == 5 if cap else n_features > 20
            targets = ~torch.isnan(g.value)
            torch.testing.assert_close(g.adjacency[targets].sum(1) + g.bias[targets], g.value[targets], rtol=0,
                                       atol=1e-4)
            assert g.linearization_error < 1e-4


def test_a_clt_over_pairs_that_are_not_an_mlps_is_refused_in_one_line():
    from saelab.analysis.graphs.coders import clt_layers
    from saelab.errors import SaelabError
    from saelab.sae import SAE

    pair = "blocks.0.hook_resid_pre:blocks.0.hook_resid_post"
    clt = SAE.create("clt", d_in=8, d_out=8, d_sae=16, k=2, clt_pairs=[pair], hook_name="blocks.0.hook_resid_pre",
                     hook_name_out="blocks.0.hook_resid_post")
    with pytest.raises(SaelabError, match=r"^c pairs blocks.0.hook_resid_pre with blocks.0.hook_resid_post: .* MLP pairs"):
        clt_layers(clt, "c")


def test_cli_writes_a_graph_file_that_loads_and_replaces_its_own(mlp_coders, tmp_path, capsys):
    from saelab.cli import main

    out = tmp_path / "graph.json"
    argv = ["attribute", "--sae", str(mlp_coders / "transcoder"), "--prompt", "the king said to the queen that he",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "replacement score" in printed and f"wrote {out}" in printed
    data = load_graph(out)
    kinds = {n["kind"] for n in data["nodes"]}
    assert kinds >= {"feature", "embedding", "logit"} and data["edges"]
    assert 0 <= data["scores"]["replacement"] <= 1 and data["prompt"].startswith("the king")
    assert main(argv) == 0 and "(replaced the existing file)" in capsys.readouterr().out
    bad = json.loads(out.read_text())
    bad["edges"][0]["source"] = "nope"
    out.write_text(json.dumps(bad))
    with pytest.raises(Exception, match="is not one of its nodes"):
        load_graph(out)


def test_bad_attribute_input_is_one_line_and_writes_nothing(mlp_coders, demo_group, tmp_path, capsys):
    out = tmp_path / "g.json"
    group = mlp_coders / "transcoder"
    _fails(["attribute", "--sae", str(demo_group.group), "--prompt", "the king", "--out", str(out)], capsys,
           "attribution graphs run over transcoders")
    _fails(["attribute", "--sae", str(group), "--prompt", "the " * 400, "--out", str(out)], capsys, "context")
    _fails(["attribute", "--sae", str(group), "--prompt", "  ", "--out", str(out)], capsys, "empty")
    _fails(["attribute", "--sae", str(group), "--prompt", "the king", "--out", str(out), "--node-threshold", "2"],
           capsys, "--node-threshold")
    _fails(["attribute", "--sae", str(tmp_path), "--prompt", "the king", "--out", str(out)], capsys,
           "neither an SAE group")
    assert not out.exists()
