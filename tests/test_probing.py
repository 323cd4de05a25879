"""The probing suite: the selection and the probe on planted columns, the token tasks' labels from characters, and
``saelab eval --suite probing`` on a demo SAE (bundled tasks, a labelled file, random labels as a control, bad
input). The CLI runs use fewer examples per task than the defaults (``N_TRAIN``, ``N_TEST``) to stay quick; the
defaults are measured by ``benchmarks/bench_suites.py``."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from saelab.suites import probing
from tests.test_outputs import _fails


def test_top_by_mean_difference_finds_the_planted_column_and_the_probe_reads_it():
    """One column (17) of 64 separates the classes: the selection ranks it first, a probe on it alone is near 1,
    and the same probe with the labels shuffled is near chance (≤ 0.65)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 600)
    X = rng.normal(size=(600, 64))
    X[:, 17] += 3.0 * y
    X[:, 5] += 0.8 * y  # a weaker second one
    top = probing.top_by_mean_difference(X[:400], y[:400], 2)
    assert list(top) == [17, 5]
    assert probing.probe_accuracy(X[:400, [17]], y[:400], X[400:, [17]], y[400:]) > 0.9
    shuffled = rng.permutation(y[:400])
    assert probing.probe_accuracy(X[:400], shuffled, X[400:], y[400:]) <= 0.65


def test_token_labels_come_from_the_characters_each_token_covers(tiny):
    text = 'Tom said "go home now" and Lily ran.'
    spans = probing._offsets(tiny.tokenizer, [text])[0]
    pieces = [text[a:b] for a, b in spans]
    quotes = dict(zip(pieces, probing._token_labels(text, spans, "in_quotes")))
    caps = dict(zip(pieces, probing._token_labels(text, spans, "capitalized")))
    inside = [p for p in pieces if p.strip() in ("go", "home", "now")]
    assert inside and all(quotes[p] == 1 for p in inside)
    assert quotes[" said"] == 0 and quotes[" ran"] == 0
    assert all(quotes[p] == -1 for p in pieces if '"' in p)  # a quote mark is no example
    assert caps["Tom"] == 1 and caps[" said"] == 0 and caps.get(".", -1) == -1


@pytest.fixture
def small_tasks(monkeypatch):
    monkeypatch.setattr(probing, "N_TRAIN", 256)
    monkeypatch.setattr(probing, "N_TEST", 128)


def _paragraphs(n):
    from saelab.data import CORPUS_DIR

    out = []
    for name, label in (("tinystories_sample.txt", "story"), ("tinyshakespeare.txt", "play")):
        paras = [p.strip() for p in (CORPUS_DIR / "heldout" / name).read_text().split("\n\n") if len(p.strip()) > 40]
        out += [(p, label) for p in paras[:n]]
    return out


def test_eval_probing_scores_the_bundled_tasks_a_labelled_file_and_not_random_labels(demo_sae, small_tasks,
                                                                                    tmp_path, capsys):
    """``saelab eval --suite probing --model tiny`` with two labelled files: the register one (story/play, from the
    held-out paragraphs) and the same texts with random labels. The raw probe separates the registers (≥ 0.95);
    random labels stay near chance (≤ 0.65) for the raw and the SAE probes; the table and eval.json agree."""
    from saelab.cli import main
    from saelab.layout import read_eval

    rows = _paragraphs(200)
    rng = random.Random(0)
    labelled, noise = tmp_path / "register.jsonl", tmp_path / "noise.jsonl"
    labelled.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    noise.write_text("".join(json.dumps({"text": t, "label": rng.choice("ab")}) + "\n" for t, _ in rows))
    assert main(["eval", "--sae", str(demo_sae), "--suite", "probing", "--model", "tiny", "--probe-dataset",
                 str(labelled), "--probe-dataset", str(noise), "--quiet"]) == 0
    out = capsys.readouterr().out
    ev = read_eval(demo_sae)["probing"]
    tasks = ev["tasks"]
    assert set(tasks) == {"register", "capitalized", "in_quotes", "register:story", "noise:a"}
    assert tasks["register"]["llm_test_accuracy"] >= 0.95 and tasks["register:story"]["llm_test_accuracy"] >= 0.95
    assert tasks["noise:a"]["llm_test_accuracy"] <= 0.65 and tasks["noise:a"]["sae_top_20_test_accuracy"] <= 0.65
    for scores in tasks.values():
        accs = [v for k, v in scores.items() if k.endswith("accuracy")]
        assert len(accs) == 2 + 2 * len(probing.K_VALUES) and all(0 <= a <= 1 for a in accs)
        assert len(scores["top_latents"]) == max(probing.K_VALUES) and scores["n_train"] <= 256
    mean = np.mean([s["sae_top_1_test_accuracy"] for s in tasks.values()])
    assert ev["sae_top_1_test_accuracy"] == pytest.approx(mean)
    assert "probing, per task:" in out and f"{tasks['register']['sae_top_1_test_accuracy']:.4f}" in out
    assert "sae top 20" in out


def test_bad_probing_input_is_one_line(demo_sae, small_tasks, tmp_path, capsys):
    one_class = tmp_path / "one.jsonl"
    one_class.write_text("".join(json.dumps({"text": t, "label": "x"}) + "\n" for t, _ in _paragraphs(20)))
    no_label = tmp_path / "nolabel.jsonl"
    no_label.write_text("".join(json.dumps({"text": t, "y": 1}) + "\n" for t, _ in _paragraphs(20)))
    before = (demo_sae / "eval.json").read_text()
    base = ["eval", "--sae", demo_sae, "--suite", "probing"]
    _fails(base, capsys, "--suite probing reads the model's activations on labelled text: pass --model")
    _fails([*base, "--model", "tiny", "--probe-dataset", one_class], capsys, "a probe needs at least two classes")
    _fails([*base, "--model", "tiny", "--probe-dataset", no_label], capsys, "has no column 'label': pass "
           "--probe-label-column")
    _fails([*base, "--model", "tiny", "--probe-dataset", tmp_path / "missing.jsonl"], capsys, "no such file")
    small = tmp_path / "small.jsonl"  # 40 texts: no class reaches MIN_CLASS texts
    small.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in _paragraphs(20)))
    _fails([*base, "--model", "tiny", "--probe-dataset", small], capsys, f"no label value has {probing.MIN_CLASS} texts")
    big = "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in _paragraphs(60))
    for folder in ("a", "b"):  # two files of one name give tasks of one name
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "reg.jsonl").write_text(big)
    _fails([*base, "--model", "tiny", "--probe-dataset", tmp_path / "a" / "reg.jsonl", "--probe-dataset",
            tmp_path / "b" / "reg.jsonl"], capsys, "two probing tasks are named 'reg:")
    assert (demo_sae / "eval.json").read_text() == before  # nothing written by a refused run
