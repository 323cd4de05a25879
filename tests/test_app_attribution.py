"""The app's Attribution page (AppTest and one real browser) on the test suite's transcoder group, and the plot
helpers it draws with."""

import json
import os
import time

import pytest

from tests.test_app import _app, _ok, chromium
from tests.appserver import serving

PAGE = "pages/4_Attribution.py"
PROMPT = "the king said to the queen that the king"
FEATURE_FILL = "rgb(42, 157, 143)"  # graphs.plot.KIND_COLOR["feature"], as the browser writes a marker's fill


def _table(at, first_column: str):
    """The page's one table whose first column is ``first_column`` (a read-only st.dataframe carries no key)."""
    (table,) = [d.value for d in at.dataframe if list(d.value.columns[:1]) == [first_column]]
    return table


def test_plot_helpers_place_nodes_by_position_and_layer():
    from saelab.analysis.graphs.plot import examples_hover, graph_figure, node_xy, top_nodes
    from saelab.analysis.features.records import Example

    nodes = [{"id": "e0", "kind": "embedding", "layer": -1, "position": 0, "feature": None, "activation": 1.0,
              "influence": 0.3, "token": "a"},
             {"id": "f1", "kind": "feature", "layer": 0, "position": 1, "feature": 7, "activation": 2.0,
              "influence": 0.5},
             {"id": "f2", "kind": "feature", "layer": 0, "position": 1, "feature": 9, "activation": 1.0,
              "influence": 0.1},
             {"id": "l", "kind": "logit", "layer": 2, "position": 1, "feature": 3, "activation": None,
              "influence": 0.0, "token": "c", "prob": 0.4}]
    data = {"nodes": nodes, "tokens": ["a", "b"], "n_layers": 2,
            "edges": [{"source": "e0", "target": "f1", "weight": 0.8}, {"source": "f2", "target": "l", "weight": -0.2},
                      {"source": "f1", "target": "l", "weight": 0.1}]}
    xy = node_xy(data)
    assert xy["e0"] == (0, -1) and xy["l"] == (1, 2)
    assert xy["f1"][1] == xy["f2"][1] == 0 and abs(xy["f1"][0] - 1) <= 0.4 and xy["f1"][0] != xy["f2"][0]
    assert [r["node"] for r in top_nodes(data, 2)] == ["L0#7@1", "emb 'a'@0"]
    fig = graph_figure(data, {"f1": "top activations:<br>x"})
    markers = {t.name: t for t in fig.data if t.mode == "markers"}
    assert set(markers) == {"embedding", "feature", "logit"}
    assert list(markers["feature"].customdata) == ["f1", "f2"] and "top activations" in markers["feature"].hovertext[0]
    lines = [t for t in fig.data if t.mode == "lines"]
    assert {t.line.color for t in lines} == {"darkorange", "steelblue"}
    assert sum(len(t.x) for t in lines) == 3 * 3  # every edge once: two ends and a break
    assert list(fig.layout.yaxis.ticktext) == ["embeddings", "MLP 0", "MLP 1", "logits"]
    assert list(fig.layout.xaxis.ticktext) == ["a", "b"]
    ex = Example(row=0, tokens=["x", " y", " z"], acts=[0, 2, 0], pos=1, value=2.0)
    assert examples_hover([ex]) == "top activations:<br>+2.00 x[ y] z" and examples_hover([]) == ""


def test_attribution_page_traces_a_prompt_and_intervenes(monkeypatch, mlp_coders):
    at = _ok(_app(monkeypatch, mlp_coders / "transcoder", PAGE))
    at.text_input(key="attr_prompt").set_value(PROMPT).run()
    _ok(at)
    metrics = {m.label: m.value for m in at.metric}
    assert 0 < float(metrics["replacement score"]) <= 1 and 0 < float(metrics["completeness score"]) <= 1
    (graph,) = [c for c in at.get("plotly_chart") if "embeddings" in c.proto.spec]
    spec = json.loads(graph.proto.spec)
    assert spec["layout"]["xaxis"]["ticktext"][-1] == " king"
    assert {t.get("name") for t in spec["data"]} >= {"embedding", "feature", "logit"}
    table = _table(at, "node")
    assert len(table) > 0 and (table["influence"].diff().dropna() <= 1e-9).all()
    # an intervention: the chosen feature set to 0, the next-token table clean vs intervened
    node = at.selectbox(key="attr_node").value
    at.number_input(key="attr_value").set_value(0.0)
    at.button[-1].click().run()  # the form's submit button
    _ok(at)
    rows = _table(at, "token")
    assert len(rows) >= 8 and list(rows.columns) == ["token", "clean", "intervened", "change"]
    assert (rows["clean"] >= 0).all() and abs(rows["change"]).max() > 0
    (L, f), pos = node.split("@")[0].split("."), node.split("@")[1]  # a feature node's id: LAYER.FEATURE@POSITION
    assert any(f"clean vs L{L}#{f}@{pos} set to +0.000" in m.value for m in at.markdown), [m.value for m in at.markdown]
    # a latent card on the Features page: the button switches there with its hook and latent
    at.button(key="attr_open_card").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["latent"] == int(node.split("@")[0].split(".")[1])


def test_a_new_threshold_prunes_again_without_tracing_again(monkeypatch, mlp_coders):
    import saelab.analysis.graphs as graphs

    calls, real = [], graphs.build_graph
    monkeypatch.setattr(graphs, "build_graph", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    at = _ok(_app(monkeypatch, mlp_coders / "transcoder", PAGE))
    prompt = "the queen said to the king that the queen"
    at.text_input(key="attr_prompt").set_value(prompt).run()
    kept = {m.label: m.value for m in _ok(at).metric}["nodes kept"]
    at.slider(key="attr_node_threshold").set_value(0.95).run()
    more = {m.label: m.value for m in _ok(at).metric}["nodes kept"]
    assert calls.count(prompt) == 1, calls  # traced once; pruned at both thresholds
    assert int(more.split()[0]) > int(kept.split()[0]), (kept, more)


def test_attribution_hover_names_a_features_top_activations(monkeypatch, mlp_coders, tmp_path):
    """Where the transcoders have feature databases (saelab analyze), a feature node's hover lists its top
    activations, read from its layer's database."""
    import shutil

    from saelab.analysis.features.db import FeatureDB
    from saelab.cli import main

    group = tmp_path / "transcoder"
    shutil.copytree(mlp_coders / "transcoder", group)
    assert main(["analyze", "--sae", str(group), "--tokens", "4096", "--quiet"]) == 0
    at = _ok(_app(monkeypatch, group, PAGE))
    at.text_input(key="attr_prompt").set_value(PROMPT).run()
    _ok(at)
    assert not any("no feature database" in c.value for c in at.caption)
    (graph,) = [c for c in at.get("plotly_chart") if "embeddings" in c.proto.spec]
    (trace,) = [t for t in json.loads(graph.proto.spec)["data"] if t.get("name") == "feature"]
    node, text = trace["customdata"][0], trace["hovertext"][0]
    layer, feature = (int(x) for x in node.split("@")[0].split("."))  # a feature node's id: LAYER.FEATURE@POSITION
    assert "top activations:" in text, text
    hook = f"blocks.{layer}.ln2.hook_normalized"
    with FeatureDB(group / hook) as db:
        card = db.card(feature)
    assert card.top and f"{card.top[0].value:+.2f}" in text


def test_attribution_page_over_a_cross_layer_transcoder(monkeypatch, clt_folder):
    """A CLT's folder: the page traces over its layers and intervenes through every output a feature writes."""
    at = _ok(_app(monkeypatch, clt_folder, PAGE))
    assert "transcoders of layers 0, 1" in "".join(c.value for c in at.sidebar.caption)
    assert any("cross-layer transcoder has no feature database" in c.value for c in at.caption)
    assert not [b for b in at.button if b.key == "attr_open_card"]  # no latent card: analyze reads one layer
    metrics = {m.label: m.value for m in at.metric}
    assert 0 < float(metrics["replacement score"]) <= 1
    at.number_input(key="attr_value").set_value(0.0)
    at.button[-1].click().run()
    rows = _table(_ok(at), "token")
    assert len(rows) >= 8 and abs(rows["change"]).max() > 0


def test_attribution_page_without_transcoders_names_how_to_make_them(monkeypatch, demo_group):
    at = _app(monkeypatch, demo_group.group, PAGE)
    assert not at.exception and not at.error
    (info,) = at.info
    assert "transcoders" in info.value and "--arch transcoder" in at.code[0].value


@pytest.mark.skipif(not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_browser_renders_the_attribution_graph(mlp_coders, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with serving(mlp_coders / "transcoder") as (url, _), chromium(tmp_path) as driver:
        driver.get(f"{url}/Attribution")
        body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
        WebDriverWait(driver, 90).until(lambda d: "replacement score" in body(d)
                                        and len(d.find_elements(By.CSS_SELECTOR, "g.points path.point")) > 3)
        assert "Top nodes by influence" in body(driver)
        assert driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot g.xtick")
        shot = tmp_path / "attribution.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        # hover the least influential feature marker (the selectbox starts on the most influential one): its
        # hover names it; a click selects it, and the page offers its latent card
        time.sleep(1)  # let the graph settle before hovering
        feats = [p for p in driver.find_elements(By.CSS_SELECTOR, "g.points path.point")
                 if FEATURE_FILL in (p.get_attribute("style") or "")]
        assert len(feats) >= 2
        point = min(feats, key=lambda e: e.rect["width"])
        ActionChains(driver).move_to_element(point).perform()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "g.hovertext"))
        hover = driver.find_element(By.CSS_SELECTOR, "g.hovertext").text
        node = hover.split()[0]  # the first hover line is the node's id: LAYER.FEATURE@POSITION
        layer, feature = node.split("@")[0].split(".")
        assert "feature · layer" in hover and "influence" in hover, hover
        ActionChains(driver).move_to_element(point).click().perform()
        WebDriverWait(driver, 60).until(lambda d: f"Open latent {feature} of layer {layer}" in body(d))
