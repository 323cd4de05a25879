"""The app's Evaluations page (AppTest and one real browser) and ``saelab.analysis.scores``, on copies of the demo
SAEs whose eval.json files are the suites' (core from training; probing, autointerp written in their schema)."""

import json
import os
import shutil

import pytest

from tests.appserver import serving
from tests.test_app import _app, _ok, chromium

PAGE = "pages/5_Evaluations.py"
HOOK1 = "blocks.1.hook_resid_post"


def _suites(ev: dict, shift: float) -> dict:
    from saelab.layout import EVAL_FILE, check_eval

    probing = {"llm_test_accuracy": 0.95, "sae_test_accuracy": 0.9 - shift, "k_values": [1, 2, 5, 20],
               "tasks": {"register": {"llm_test_accuracy": 1.0, "sae_test_accuracy": 1.0}}}
    for k, acc in zip((1, 2, 5, 20), (0.6, 0.7, 0.8, 0.9)):
        probing[f"llm_top_{k}_test_accuracy"] = acc
        probing[f"sae_top_{k}_test_accuracy"] = acc - shift
    auto = {"explainer": "tokens", "n_latents": 50, "detection": 0.7 + shift, "detection_control": 0.5,
            "fuzzing": 0.7}
    return check_eval({**ev, "probing": probing, "autointerp": auto}, EVAL_FILE)


@pytest.fixture
def sweep(demo_group, tmp_path):
    """The demo group's copy, and beside it three seeds of its layer-1 SAE (train.json's seed 0, 1, 2, and a token
    budget of their own) whose FVUs are 0.10, 0.12 and 0.14 at equal L0."""
    group = tmp_path / "demo"
    shutil.copytree(demo_group.group, group, ignore=shutil.ignore_patterns("features.h5", "checkpoint.pt"))
    for i, folder in enumerate(sorted(p for p in group.iterdir() if (p / "eval.json").is_file())):
        ev = json.loads((folder / "eval.json").read_text())
        (folder / "eval.json").write_text(json.dumps(_suites(ev, 0.05 * i)))
    seeds = tmp_path / "seeds"
    for s in range(3):
        dst = seeds / f"s{s}"
        shutil.copytree(group / HOOK1, dst)
        info = json.loads((dst / "train.json").read_text())
        info["train"].update(seed=s, tokens=123_456)  # a setting of their own, apart from the group's SAE
        (dst / "train.json").write_text(json.dumps(info))
        ev = json.loads((dst / "eval.json").read_text())
        ev.update(fvu=0.10 + 0.02 * s, l0=16.0)
        (dst / "eval.json").write_text(json.dumps(ev))
    return group, seeds


def test_scores_gather_seeds_into_one_setting(sweep):
    from saelab.analysis.scores import expand, flat_scores, metrics, score_rows, settings

    group, seeds = sweep
    folders = expand([str(group), str(seeds / "*")])
    assert len(folders) == 5 and expand(f"{seeds}/s0, {seeds}/s0") == [seeds / "s0"]
    rows = score_rows(folders)
    by = {len(g): g for g in settings(rows)}
    assert sorted(len(g) for g in settings(rows)) == [1, 1, 3] and sorted(r.seed for r in by[3]) == [0, 1, 2]
    assert "probing.sae_top_1_test_accuracy" in metrics(rows) and metrics(rows).index("fvu") < metrics(rows).index(
        "probing.llm_test_accuracy")
    flat = flat_scores({"fvu": 0.1, "rows": 9, "truth": {"mcc": 0.9, "rows": 3, "n": True}})
    assert flat == {"fvu": 0.1, "truth.mcc": 0.9}


def test_evaluations_page_plots_each_metric_against_l0_with_seed_bars(monkeypatch, sweep):
    group, seeds = sweep
    at = _ok(_app(monkeypatch, group, PAGE))
    assert len(at.dataframe[0].value) == 2
    at.text_input(key="eval_more").set_value(f"{seeds}/*").run()
    _ok(at)
    assert len(at.dataframe[0].value) == 5
    at.selectbox(key="eval_metric").set_value("fvu").run()
    spec = json.loads(next(c for c in _ok(at).get("plotly_chart") if "L0 (mean" in c.proto.spec).proto.spec)
    (trace,) = spec["data"]
    i = next(n for n, t in enumerate(trace["text"]) if "3 seeds" in t)
    assert trace["y"][i] == pytest.approx(0.12) and trace["x"][i] == pytest.approx(16.0)
    assert trace["error_y"]["array"][i] == pytest.approx(0.02) and trace["error_y"]["arrayminus"][i] == pytest.approx(
        0.02)
    assert len(trace["x"]) == 3  # two demo SAEs and the one setting of three seeds
    probe = json.loads(next(c for c in at.get("plotly_chart") if "raw dims" in c.proto.spec).proto.spec)
    (sae1,) = [t for t in probe["data"] if t["name"].endswith(f"{HOOK1} (latents)")]
    assert sae1["x"] == [1, 2, 5, 20] and sae1["y"][0] == pytest.approx(0.6 - 0.05)
    at.text_input(key="eval_more").set_value(str(seeds / "nothing-here")).run()
    assert "no such folder" in at.error[0].value


def test_evaluations_page_without_evaluations_says_what_to_run(monkeypatch, demo_group, tmp_path):
    group = tmp_path / "g"
    shutil.copytree(demo_group.group, group, ignore=shutil.ignore_patterns("features.h5", "checkpoint.pt", "eval.json"))
    at = _ok(_app(monkeypatch, group, PAGE))
    assert "saelab eval --sae" in at.info[0].value


@pytest.mark.skipif(not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_browser_renders_the_evaluations_page(sweep, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    group, _ = sweep
    with serving(group) as (url, _), chromium(tmp_path) as driver:
        driver.get(f"{url}/Evaluations")
        WebDriverWait(driver, 90).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 2)
        plots = driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")
        assert "L0 (mean active latents per token)" in plots[0].text
        assert len(plots[0].find_elements(By.CSS_SELECTOR, "g.points path")) == 2  # the two demo SAEs
        assert "Sparse probing" in driver.find_element(By.TAG_NAME, "body").text
