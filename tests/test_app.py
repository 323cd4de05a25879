"""The Streamlit app (saelab/app): every page through Streamlit's AppTest, the `saelab app` command,
and one real-browser test (headless Chromium via selenium) against a served app."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from saelab.app import HOME

from tests.appserver import serving

HOOK1 = "blocks.1.hook_resid_post"
PROMPT = "Once upon a time there was a little girl who went to the park"
TIMEOUT = 120


@pytest.fixture(scope="session")
def app_group(demo_group, tmp_path_factory):
    """A private copy of the demo SAE group with a feature database per SAE (analysed here on a
    slice of the store when the demo has none) and a hand-written circuit file."""
    from saelab.analysis.features.build import analyze
    from saelab.layout import FEATURES_FILE

    for hook, folder in demo_group.saes.items():
        if not (folder / FEATURES_FILE).is_file():
            analyze(folder, demo_group.stores[hook], tokens=128 * 256, progress=False)
    group = tmp_path_factory.mktemp("app") / "demo"
    shutil.copytree(demo_group.group, group, ignore=shutil.ignore_patterns("labels.json", "circuits",
                                                                            "checkpoint.pt"))
    return group


@pytest.fixture(scope="session")
def circuit_file(app_group):
    """A small circuit in the format of INTERFACES.md §3, written by hand."""
    h0, h1 = "blocks.0.hook_resid_post", HOOK1
    nodes = [
        {"id": f"{h0}/5", "hook": h0, "layer": 0, "kind": "latent", "latent": 5, "effect": 0.4},
        {"id": f"{h0}/error", "hook": h0, "layer": 0, "kind": "error", "latent": None, "effect": 0.02},
        {"id": f"{h1}/401", "hook": h1, "layer": 1, "kind": "latent", "latent": 401, "effect": 0.9},
        {"id": f"{h1}/7", "hook": h1, "layer": 1, "kind": "latent", "latent": 7, "effect": -0.1},
    ]
    edges = [{"src": f"{h0}/5", "dst": f"{h1}/401", "weight": 0.3},
             {"src": f"{h0}/error", "dst": f"{h1}/7", "weight": -0.05}]
    c = {"format_version": 1, "kind": "sparse_feature_circuit", "model": "tiny", "group": str(app_group),
         "saes": {h: str(app_group / h) for h in (h0, h1)}, "hooks": [h0, h1],
         "task": {"name": "induction", "n_examples": 8, "metric": "logit_diff"}, "method": "attrib",
         "node_threshold": 0.05, "edge_threshold": 0.01, "nodes": nodes, "edges": edges,
         "faithfulness": {"nodes": 0.86, "edges": 0.81}, "metric_values": {"full": 3.1, "empty": 0.2, "circuit": 2.7}}
    path = app_group / "circuits" / "hand.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(c))
    return path


@pytest.fixture(scope="session")
def top_latent(app_group, tiny) -> int:
    """The latent of the block-1 SAE that fires most on PROMPT (computed here, not by the app)."""
    from saelab.sae.base import SAE

    sae = SAE.load(app_group / HOOK1)
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tiny.to_tokens(PROMPT))
        acts = sae.encode(cache[HOOK1][0, 1:])  # BOS dropped, as the app does
    return int(acts.max(0).values.argmax())


@pytest.fixture(scope="session")
def db1(app_group):
    from saelab.analysis.features.db import FeatureDB

    db = FeatureDB(app_group / HOOK1)
    yield db
    db.close()


def _app(monkeypatch, target, page=None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAELAB_APP_SAE", str(target))
    at = AppTest.from_file(str(HOME), default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    if page:
        at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
    return at


def _features(monkeypatch, target, hook=HOOK1):
    at = _app(monkeypatch, target, "pages/1_Features.py")
    if at.selectbox and at.selectbox(key="hook").value != hook:
        at.selectbox(key="hook").set_value(hook).run()
    return at


def _ok(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def _card_title(at) -> str:
    return next(s.value for s in at.subheader if s.value.startswith("Latent "))


def _result_buttons(at, prefix):
    return [b for b in at.button if (b.key or "").startswith(prefix)]


# ----------------------------------------------------------------------------- pages render
def test_home_lists_the_group(monkeypatch, app_group):
    at = _ok(_app(monkeypatch, app_group))
    df = at.dataframe[0].value
    assert list(df["hook"]) == ["blocks.0.hook_resid_post", HOOK1]
    assert df["features.h5"].all() and (df["d_sae"] == 2048).all()
    assert list(df["source"]) == ["trained here"] * 2
    # the latent-density histogram: log10 of each alive latent's density, one trace per SAE naming its dead count
    from saelab.analysis.features.db import FeatureDB

    (chart,) = at.get("plotly_chart")
    traces = json.loads(chart.proto.spec)["data"]
    assert len(traces) == 2
    for trace, hook in zip(traces, ["blocks.0.hook_resid_post", HOOK1]):
        with FeatureDB(app_group / hook) as db:
            d = np.asarray(db.density)
        assert trace["name"] == f"{hook} ({int((d == 0).sum())} dead)"
        np.testing.assert_allclose(trace["x"], np.log10(d[d > 0]), rtol=1e-6)


HUB_SOURCE = {"repo_id": "someone/saes", "subfolder": HOOK1, "revision": None,
              "commit": "0123456789abcdef0123456789abcdef01234567"}


@pytest.mark.parametrize("source,shown", [
    (HUB_SOURCE, f"hub: someone/saes/{HOOK1}@0123456"),
    ({**HUB_SOURCE, "format": "saelens"}, f"hub: someone/saes/{HOOK1}@0123456"),
    ({**HUB_SOURCE, "format": "gemma-scope"}, f"hub: someone/saes/{HOOK1}@0123456 (gemma-scope)"),
    ({"path": "/data/run/layers.1", "format": "sparsify"}, "local: /data/run/layers.1 (sparsify)"),
])
def test_home_names_a_fetched_sae_source_and_the_store_analyze_needs(monkeypatch, tmp_path, source, shown):
    """An SAE from `saelab fetch` (source.json, no train.json, no features.h5): Home shows its hub origin (and the
    layout it was converted from; stop-15 source.json files have no format) and the analyze command with the
    --activations it needs (it names no store)."""
    import json

    from saelab.sae.base import SAE

    folder = tmp_path / "fetched"
    SAE.create("relu", d_in=128, d_sae=256, hook_name=HOOK1, model_name="tiny").save(folder)
    (folder / "source.json").write_text(json.dumps(source))
    at = _ok(_app(monkeypatch, folder))
    assert list(at.dataframe[0].value["source"]) == [shown]
    info = " ".join(i.value for i in at.info)
    assert f"saelab analyze --sae {folder} --activations STORE_OR_RUN" in info, info


def test_features_by_id_shows_the_card(monkeypatch, app_group, db1, top_latent):
    lat = top_latent
    at = _features(monkeypatch, app_group)
    at.number_input(key="latent").set_value(lat).run()
    _ok(at)
    card = db1.card(lat)
    assert _card_title(at) == f"Latent {lat}"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["density"] == f"{card.density:.3%}" and metrics["max activation"] == f"{card.max_act:.3f}"
    # the top example's tokens are on the page, each shaded span carrying its activation as a tooltip
    html = "".join(m.value for m in at.markdown)
    ex = card.top[0]
    assert f'title="{ex.acts[ex.pos]:.3f}"' in html and f"<b>{ex.value:+.2f}</b>" in html
    # the card can be downloaded as one HTML file (saelab.analysis.cards.card_document, tested in test_export)
    dl = at.get("download_button")
    assert [d.proto.label for d in dl] == ["Download this card (HTML)"] and dl[0].proto.url.endswith(".html")
    # clicking a neighbour opens its card
    j = card.neighbours[0][0]
    at.button(key=f"card_nb_{lat}_{j}").click().run()
    assert _card_title(_ok(at)) == f"Latent {j}"


def test_card_links_the_closest_latents_of_the_group_s_other_sae(monkeypatch, app_group, top_latent):
    """A group's card lists, per other SAE, the 3 latents of highest decoder cosine (geometry.best_matches on the
    SAE files, computed here); clicking one switches the SAE and opens that latent's card."""
    from saelab.analysis.geometry import best_matches
    from saelab.sae.base import SAE

    h0 = "blocks.0.hook_resid_post"
    lat = top_latent
    at = _features(monkeypatch, app_group)
    at.number_input(key="latent").set_value(lat).run()
    _ok(at)
    ids, cos = best_matches(SAE.load(app_group / HOOK1).W_dec[lat : lat + 1], SAE.load(app_group / h0).W_dec, 3)
    buttons = _result_buttons(at, f"card_other_{lat}_")
    assert [b.label for b in buttons] == [f"{h0} #{j}  (cos {c:.2f})" for j, c in zip(ids[0].tolist(), cos[0].tolist())]
    shared = "SAEs trained from one seed start from the same directions"
    assert any(shared in c.value for c in at.caption) == (lat in ids[0].tolist())  # the same index is flagged
    buttons[0].click().run()
    _ok(at)
    assert at.selectbox(key="hook").value == h0 and _card_title(at) == f"Latent {ids[0, 0].item()}"
    assert not _result_buttons(at, f"card_other_{ids[0, 0].item()}_{h0}")  # the SAE shown is not among the others
    assert _result_buttons(at, f"card_other_{ids[0, 0].item()}_{HOOK1}")


def test_a_group_of_many_saes_matches_the_latent_on_request(monkeypatch, app_group, tmp_path, top_latent):
    """With more than MATCH_AT_ONCE other SAEs (a whole model's layers), the card matches its latent in them only
    when asked (a checkbox): then one row of buttons per other SAE of the same d_in; an SAE of another d_in is
    skipped."""
    import json
    import shutil

    from saelab.app.common import MATCH_AT_ONCE

    from saelab.sae.base import SAE

    group = tmp_path / "many"
    group.mkdir()
    shutil.copytree(app_group / HOOK1, group / HOOK1)  # analysed: its card renders
    hooks = {HOOK1: HOOK1}
    for layer in range(2, 2 + MATCH_AT_ONCE):
        h = f"blocks.{layer}.hook_resid_post"
        SAE.create("topk", d_in=128, d_sae=64, k=4, hook_name=h, model_name="tiny").save(group / h)
        hooks[h] = h
    narrow = "blocks.9.hook_resid_post"  # another width: no cosine with a 128-wide decoder
    SAE.create("topk", d_in=16, d_sae=64, k=4, hook_name=narrow, model_name="tiny").save(group / narrow)
    hooks[narrow] = narrow
    (group / "group.json").write_text(json.dumps({"model": "tiny", "hooks": hooks}))
    at = _features(monkeypatch, group)
    at.number_input(key="latent").set_value(top_latent).run()
    _ok(at)
    assert not _result_buttons(at, f"card_other_{top_latent}_")  # not matched until asked
    at.checkbox(key=f"card_others_{top_latent}").check().run()
    _ok(at)
    buttons = _result_buttons(at, f"card_other_{top_latent}_")
    got = {b.key.removeprefix(f"card_other_{top_latent}_").rsplit("_", 1)[0] for b in buttons}
    assert got == set(hooks) - {HOOK1, narrow} and len(buttons) == 3 * len(got)


def test_card_of_an_attention_sae_names_its_heads(monkeypatch, small_run, tmp_path):
    """An SAE on attn.hook_z: the card lists the heads its decoder row lives in, as features.h5 records them."""
    import torch

    from saelab.analysis.features.build import analyze
    from saelab.analysis.features.db import FeatureDB
    from saelab.sae.base import SAE

    _, stores = small_run
    hook = "blocks.1.attn.hook_z"
    torch.manual_seed(0)
    sae = SAE.create("topk", d_in=128, d_sae=64, k=4, hook_name=hook, model_name="tiny")
    with torch.no_grad():  # latent 3 lives mostly in head 2
        sae.W_dec[3] = 0.1
        sae.W_dec[3, 64:96] = 1.0
    folder = tmp_path / "attn"
    sae.save(folder)
    analyze(folder, stores[hook], tokens=512, progress=False)
    from saelab.analysis.cards import card_document

    with FeatureDB(folder) as db:
        heads = db.card(3).heads
        doc = card_document(db, db.card(3))  # the downloaded / exported card names the head too
    assert heads[0][0] == "L1H2" and heads[0][1] > 0.8
    assert f"heads L1H2 {heads[0][1]:.0%}" in doc
    at = _features(monkeypatch, folder, hook=hook)
    at.number_input(key="latent").set_value(3).run()
    text = " ".join(m.value for m in _ok(at).markdown)
    assert f"**Heads** (share of the decoder row's squared norm): L1H2 {heads[0][1]:.0%}" in text, text


def test_features_by_prompt_finds_the_latent_that_fires_most(monkeypatch, app_group, top_latent):
    want = top_latent
    at = _features(monkeypatch, app_group)
    at.radio(key="find").set_value("by prompt").run()
    at.text_area(key="find_prompt").set_value(PROMPT).run()
    _ok(at)
    found = _result_buttons(at, "open_p_")
    assert found[0].key == f"open_p_{want}" and found[0].label.startswith(f"#{want}")
    assert len(at.get("plotly_chart")) >= 1  # the token × latent heatmap
    found[0].click().run()
    assert _card_title(_ok(at)) == f"Latent {want}"


def test_features_by_token_and_by_density(monkeypatch, app_group, db1, top_latent):
    import numpy as np

    lat = top_latent
    token = db1.card(lat).logits_top[0][0]  # the token this latent promotes most
    at = _features(monkeypatch, app_group)
    at.radio(key="find").set_value("by token").run()
    at.text_input(key="find_token").set_value(token).run()
    _ok(at)
    keys = [b.key for b in _result_buttons(at, "open_t_")]
    hits = db1.by_token(token)
    assert keys == [f"open_t_{j}" for j, _ in hits] and len(hits) >= 1
    # hand check: every latent listed promotes the token (it is among its card's promoted tokens)
    assert all(token in [t for t, _ in db1.card(j).logits_top] for j, _ in hits)
    if lat in dict(hits):
        assert dict(hits)[lat] == dict(db1.card(lat).logits_top)[token]
    first = hits[0][0]
    at.button(key=f"open_t_{first}").click().run()
    assert _card_title(_ok(at)).startswith(f"Latent {first}")

    # a string of several tokens is named as such, with vocabulary entries like it
    words = token.strip() + " and then some more"
    assert not db1.in_vocab(words) and db1.by_token(words) == []
    like = db1.similar_tokens(words)
    assert like and all(words.startswith(t.strip()) or t.strip().startswith(words) for t in like)
    assert db1.in_vocab(like[0])
    at.text_input(key="find_token").set_value(words).run()
    msg = " ".join(i.value for i in _ok(at).info)
    assert "is not one token" in msg and repr(like[0]) in msg, msg

    at.radio(key="find").set_value("by density").run()
    dens = np.asarray(db1.density)
    assert _result_buttons(_ok(at), "open_d_")[0].key == f"open_d_{int(dens.argmax())}"


def test_a_saved_label_persists_across_a_reload(monkeypatch, app_group, top_latent):
    from saelab.analysis.features.labels import load_labels

    lat = top_latent
    at = _features(monkeypatch, app_group)
    at.number_input(key="latent").set_value(lat).run()
    at.text_input(key=f"card_label_{HOOK1}_{lat}").set_value("my label")
    next(b for b in at.button if b.label == "Save label").click().run()
    _ok(at)
    assert load_labels(app_group / HOOK1) == {lat: "my label"}
    assert _card_title(at) == f"Latent {lat} — my label"
    # a fresh session (a browser reload) shows it in the card's title and in search results
    at = _features(monkeypatch, app_group)
    at.number_input(key="latent").set_value(lat).run()
    assert _card_title(_ok(at)) == f"Latent {lat} — my label"
    at.radio(key="find").set_value("by prompt").run()
    at.text_area(key="find_prompt").set_value(PROMPT).run()
    assert _result_buttons(_ok(at), "open_p_")[0].label.startswith(f"#{lat} — my label")


def test_missing_feature_database_is_a_readable_message(monkeypatch, app_group, tmp_path):
    sae = tmp_path / "bare"
    shutil.copytree(app_group / HOOK1, sae, ignore=shutil.ignore_patterns("features.h5"))
    at = _app(monkeypatch, sae, "pages/1_Features.py")
    assert not at.exception
    assert any("saelab analyze" in i.value for i in at.info)
    assert any(f"saelab analyze --sae {sae}" in c.value for c in at.code)
    # prompt search needs only the model and the SAE: it still works
    at.radio(key="find").set_value("by prompt").run()
    at.text_area(key="find_prompt").set_value(PROMPT).run()
    assert _result_buttons(_ok(at), "open_p_")


def test_not_an_sae_folder_is_a_readable_error(monkeypatch, tmp_path):
    for page in (None, "pages/1_Features.py", "pages/2_Steering.py", "pages/3_Circuits.py"):
        from streamlit.testing.v1 import AppTest

        monkeypatch.setenv("SAELAB_APP_SAE", str(tmp_path))
        at = AppTest.from_file(str(HOME), default_timeout=TIMEOUT).run()
        if page:
            at.switch_page(page).run()
        assert not at.exception and "neither an SAE folder" in at.error[0].value


# ----------------------------------------------------------------------------- steering
def test_steering_changes_the_output_for_a_large_coefficient_and_not_for_zero(monkeypatch, app_group, top_latent):
    at = _app(monkeypatch, app_group, "pages/2_Steering.py")
    if at.selectbox(key="hook").value != HOOK1:
        at.selectbox(key="hook").set_value(HOOK1).run()
    at.text_input(key="steer_latents").set_value(str(top_latent))
    at.text_area(key="steer_prompt").set_value("Once upon a time there was a little")
    at.number_input(key="steer_max_new").set_value(12)
    at.number_input(key="steer_value").set_value(0.0)
    at.button(key="steer_run").click().run()
    _ok(at)
    clean, steered = at.code[0].value, at.code[1].value
    assert clean == steered and clean.startswith("Once upon a time there was a little")
    assert {m.label: m.value for m in at.metric}["KL(steered ‖ clean), mean over the prompt"] == "0.000"

    at.number_input(key="steer_value").set_value(40.0)
    at.button(key="steer_run").click().run()
    _ok(at)
    assert at.code[0].value == clean and at.code[1].value != clean
    assert float({m.label: m.value for m in at.metric}["KL(steered ‖ clean), mean over the prompt"]) > 0.5
    assert any(getattr(c, "proto", None) is not None for c in at.get("plotly_chart"))  # probability bars

    at.radio(key="steer_mode").set_value("ablate").run()
    at.button(key="steer_run").click().run()
    _ok(at)

    at.text_input(key="sweep_coefs").set_value("0, 10, 40")
    at.button(key="sweep_run").click().run()
    rows = _ok(at).dataframe[-1].value
    assert list(rows["coefficient"]) == [0.0, 10.0, 40.0] and rows["kl"].iloc[0] == 0 < rows["kl"].iloc[2]


def test_steering_bad_latent_is_a_readable_error(monkeypatch, app_group):
    at = _app(monkeypatch, app_group, "pages/2_Steering.py")
    at.text_input(key="steer_latents").set_value("99999").run()
    at.button(key="steer_run").click().run()
    assert not at.exception and "out of range" in at.error[0].value
    at.text_input(key="steer_latents").set_value("a, b").run()
    assert not at.exception and "integer ids" in at.error[0].value


# ----------------------------------------------------------------------------- circuits
def test_circuits_page_draws_the_file_and_opens_a_node(monkeypatch, app_group, circuit_file):
    at = _ok(_app(monkeypatch, app_group, "pages/3_Circuits.py"))
    assert at.selectbox(key="circuit_file").value == str(circuit_file)
    assert "4 of 4 nodes, 2 edges shown" in " ".join(c.value for c in at.caption)
    at.slider(key="edge_threshold").set_value(0.1).run()
    assert "4 of 4 nodes, 1 edges shown" in " ".join(c.value for c in _ok(at).caption)
    at.selectbox(key="circuit_node").set_value(f"{HOOK1}/401").run()
    assert _card_title(_ok(at)).startswith("Latent 401")  # (its label, when a test saved one)
    at.selectbox(key="circuit_node").set_value("blocks.0.hook_resid_post/error").run()
    assert any("Error node" in i.value for i in _ok(at).info)


def test_circuits_page_without_circuits_or_with_a_bad_file(monkeypatch, app_group, tmp_path):
    single = tmp_path / "single"
    shutil.copytree(app_group / HOOK1, single)
    at = _app(monkeypatch, single, "pages/3_Circuits.py")
    assert not at.exception and "saelab circuit" in at.info[0].value
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": 3}')
    at.text_input(key="circuit_path").set_value(str(bad)).run()
    assert not at.exception and at.error


# ----------------------------------------------------------------------------- the command
def _saelab(*args, **kw):
    return subprocess.run([sys.executable, "-m", "saelab", *args], capture_output=True, text=True, timeout=60, **kw)


def test_app_command_rejects_bad_folders_and_busy_ports(app_group, tmp_path):
    r = _saelab("app", "--sae", str(tmp_path))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "neither an SAE folder" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = _saelab("app", "--sae", str(app_group), "--port", str(s.getsockname()[1]))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "free --port" in r.stderr


def test_demo_prints_the_app_command_instead_of_blocking(monkeypatch, capsys, app_group):
    import argparse

    from saelab.cli.demo import _demo_open_app

    monkeypatch.setenv("CI", "true")
    assert _demo_open_app(argparse.Namespace(no_app=False), app_group) == 0
    assert f"saelab app --sae {app_group}" in capsys.readouterr().out
    monkeypatch.delenv("CI")
    assert _demo_open_app(argparse.Namespace(no_app=True), app_group) == 0  # --no-app, whatever the terminal


# ----------------------------------------------------------------------------- a real browser
@contextlib.contextmanager
def chromium(tmp_path):
    """A headless Chromium driven by Selenium (Debian's chromium and chromium-driver), quit when the block ends."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1400,1800", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.skipif(not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_browser_renders_the_features_page_and_a_latent_card(app_group, db1, top_latent, circuit_file, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with serving(app_group) as (url, _), chromium(tmp_path) as driver:
        driver.get(f"{url}/Features?hook={HOOK1}&latent={top_latent}")
        body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
        WebDriverWait(driver, 90).until(lambda d: "Top activations" in body(d) and "Neighbours" in body(d))
        text = body(driver)
        card = db1.card(top_latent)
        assert f"Latent {top_latent}" in text and f"{card.density:.3%}" in text and "Promoted tokens" in text
        assert f"{card.top[0].value:+.2f}" in text
        # hovering a token shows its activation: the spans carry it as a tooltip
        spans = driver.find_elements(By.CSS_SELECTOR, "span[title]")
        assert spans and f"{card.top[0].acts[card.top[0].pos]:.3f}" in {s.get_attribute("title") for s in spans}
        shot = tmp_path / "features.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        # Circuits: clicking a node in the Plotly graph opens its card (the biggest marker: latent 401)
        driver.get(f"{url}/Circuits")
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "g.points path.point")) == 4)
        time.sleep(1)  # let the graph settle before clicking
        node = max(driver.find_elements(By.CSS_SELECTOR, "g.points path.point"), key=lambda e: e.rect["width"])
        ActionChains(driver).move_to_element(node).click().perform()
        WebDriverWait(driver, 60).until(lambda d: "Latent 401" in body(d) and "Top activations" in body(d))
        driver.save_screenshot(str(tmp_path / "circuits.png"))


def test_signed_sae_card_shows_both_signs(monkeypatch, demo_group, tiny, tmp_path):
    """An AbsTopK SAE (latents fire with either sign): prompt search ranks by |activation| and the
    card lists the most negative examples too."""
    from saelab.analysis.features.build import analyze
    from saelab.analysis.features.db import FeatureDB
    from saelab.sae.base import SAE

    torch.manual_seed(0)
    sae = SAE.create("abstopk", d_in=tiny.cfg.d_model, d_sae=256, k=8, hook_name=HOOK1, model_name="tiny")
    folder = sae.save(tmp_path / "abstopk")
    analyze(folder, demo_group.stores[HOOK1], tokens=128 * 32, model=tiny, progress=False)
    from saelab.analysis.cards import card_document

    with FeatureDB(folder) as db:
        lat = next(j for j in range(256) if db.card(j).top_negative)
        neg = db.card(lat).top_negative[0]
        doc = card_document(db, db.card(lat))  # the downloaded / exported card has both signs too
    assert "<h3>Most negative activations</h3>" in doc and f"<b>{neg.value:+.2f}</b>" in doc
    at = _app(monkeypatch, folder, "pages/1_Features.py")
    at.number_input(key="latent").set_value(lat).run()
    _ok(at)
    assert any(m.value == "**Most negative activations**" for m in at.markdown)
    assert f"<b>{neg.value:+.2f}</b>" in "".join(m.value for m in at.markdown)
    at.radio(key="find").set_value("by prompt").run()
    at.text_area(key="find_prompt").set_value(PROMPT).run()
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tiny.to_tokens(PROMPT))
        acts = sae.encode(cache[HOOK1][0, 1:])
    assert (acts < 0).any()
    want = int(acts.abs().max(0).values.argmax())
    assert _result_buttons(_ok(at), "open_p_")[0].key == f"open_p_{want}"


def test_app_command_names_host_for_an_unknown_host(tmp_path, capsys):
    from saelab.cli import main
    from saelab.sae.base import SAE

    SAE.create("topk", d_in=8, d_sae=16, k=2, hook_name="blocks.0.hook_resid_post", model_name="tiny").save(tmp_path)
    assert main(["app", "--sae", str(tmp_path), "--host", "999.1.1.1", "--port", "8599"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pass a valid --host" in err and len(err.splitlines()) == 1, err


def test_autointerp_explanations_name_latents_and_are_searched(monkeypatch, app_group, tmp_path):
    """An SAE with autointerp explanations (written as the suite writes them): the label search finds a latent by
    its explanation and by a saved label, its card shows the explanation, and a saved label takes its place in the
    result; explanations of other weights are not shown."""
    from saelab.analysis.features.labels import save_label
    from saelab.suites.autointerp import AUTOINTERP_FILE, Record

    group = tmp_path / "g"
    shutil.copytree(app_group, group)
    sae_dir = group / HOOK1
    record = Record(sae_dir, "tokens")
    record.put(5, explanation='tokens "castle" "king"')
    record.put(9, explanation='tokens "queen"')
    save_label(sae_dir, 9, "royal women")
    at = _features(monkeypatch, group)
    at.radio(key="find").set_value("by label").run()
    at.text_input(key="find_label").set_value("CASTLE").run()
    found = _result_buttons(_ok(at), "open_l_")
    assert [b.key for b in found] == ["open_l_5"] and found[0].label.startswith('#5 — tokens "castle" "king"')
    at.button(key="open_l_5").click().run()
    assert _card_title(_ok(at)) == 'Latent 5 — tokens "castle" "king"'
    assert any("autointerp explanation" in c.value for c in at.caption)
    at.text_input(key="find_label").set_value("queen").run()  # the explanation of 9 is searched, its label shown
    assert [b.label.split("  (")[0] for b in _result_buttons(_ok(at), "open_l_")] == ["#9 — royal women"]
    data = json.loads((sae_dir / AUTOINTERP_FILE).read_text())
    data["sae_sha256"] = "0" * 64  # another SAE's explanations
    (sae_dir / AUTOINTERP_FILE).write_text(json.dumps(data))
    at = _features(monkeypatch, group)
    at.radio(key="find").set_value("by label").run()
    at.text_input(key="find_label").set_value("castle").run()
    assert not _result_buttons(_ok(at), "open_l_") and "no label or explanation contains" in at.info[0].value
