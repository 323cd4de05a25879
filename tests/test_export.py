"""saelab export: latent cards as one self-contained HTML file, checked against FeatureDB's cards, driven
through the CLI, and opened in a real browser."""

import html.parser
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

HOOK1 = "blocks.1.hook_resid_post"


class _Page(html.parser.HTMLParser):
    """Section ids with their text, every href and src, span titles, and the text of the whole page."""

    def __init__(self, doc: str):
        super().__init__()
        self.sections: dict[str, list[str]] = {}
        self.links: dict[str, list[str]] = {}  # section id → the hrefs inside it
        self.ids, self.hrefs, self.srcs, self.titles, self.text = set(), [], [], [], []
        self._open: list[str] = []  # the section being read (sections do not nest)
        self.feed(doc)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "section":
            self._open = [a["id"]]
            self.sections[a["id"]] = []
            self.links[a["id"]] = []
        if "href" in a:
            self.hrefs.append(a["href"])
            if self._open:
                self.links[self._open[0]].append(a["href"])
        if "src" in a:
            self.srcs.append(a["src"])
        if tag == "span" and "title" in a:
            self.titles.append(a["title"])

    def handle_endtag(self, tag):
        if tag == "section":
            self._open = []

    def handle_data(self, data):
        self.text.append(data)
        if self._open:
            self.sections[self._open[0]].append(data)


def _cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "saelab", "export", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def sae_copy(demo_group, tmp_path_factory):
    """One analysed demo SAE, copied (labels are written into it)."""
    from saelab.analysis.features.build import analyze
    from saelab.layout import FEATURES_FILE

    src = demo_group.saes[HOOK1]
    if not (src / FEATURES_FILE).is_file():
        analyze(src, demo_group.stores[HOOK1], tokens=128 * 256, progress=False)
    dst = tmp_path_factory.mktemp("export") / HOOK1
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("labels.json", "checkpoint.pt"))
    return dst


def test_cli_writes_the_chosen_cards_as_featuredb_reads_them(sae_copy, tmp_path):
    """Every chosen latent gets a section whose numbers are FeatureDB's (density, top values, promoted tokens,
    the hover value of the top token), the label is escaped, neighbour links land on sections in the file,
    and nothing is fetched from elsewhere (no src, no http links)."""
    from saelab.analysis.features.db import FeatureDB
    from saelab.analysis.features.labels import save_label

    with FeatureDB(sae_copy) as db:
        first = int(db.density.argmax())
        nb = db.card(first).neighbours[0][0]  # in the file: the card links to it
        want = sorted({first, nb, 10, 11, 12})
        save_label(sae_copy, first, "<b>dogs</b> & cats")
        out = tmp_path / "new" / "cards.html"  # its folder does not exist yet
        r = _cli("--sae", sae_copy, "--latents", f"{first},{nb},10-12", "--out", out, "--quiet")
        assert r.returncode == 0, r.stderr
        assert f"wrote {out}: {len(want)} latent cards" in r.stdout
        doc = out.read_text(encoding="utf-8")
        page = _Page(doc)
        assert sorted(page.sections) == sorted(f"{HOOK1}-{i}" for i in want)
        for i in want:
            card, text = db.card(i), "".join(page.sections[f"{HOOK1}-{i}"])
            assert f"density {card.density:.3%}" in text and f"fired on {card.count:,} rows" in text
            assert f"max {card.max_act:.3f}" in text
            for e in card.top:
                assert f"{e.value:+.2f}" in text
            assert all(repr(t) in text for t, _ in card.logits_top) and card.logits_top
            assert f"{card.top[0].acts[card.top[0].pos]:.3f}" in page.titles
            for j, cos in card.neighbours:
                assert f"#{j} ({cos:.2f})" in text
        assert "Latent " + str(first) + " — <b>dogs</b> & cats" in "".join(page.sections[f"{HOOK1}-{first}"])
        assert "<b>dogs</b>" not in doc  # escaped, not markup
        assert f"#{HOOK1}-{nb}" in page.links[f"{HOOK1}-{first}"]
        internal = [h for h in page.hrefs if h.startswith("#")]
        assert internal and all(h[1:] in page.ids for h in internal)
        assert any(h == f"#{HOOK1}-11" for h in internal)  # the index links every card
        assert not page.srcs and not [h for h in page.hrefs if not h.startswith("#")]
        assert not list(out.parent.glob(".*tmp"))


def test_card_document_is_one_whole_card(sae_copy):
    """What the app's download button serves: a whole page holding exactly that latent's card."""
    from saelab.analysis.cards import card_document
    from saelab.analysis.features.db import FeatureDB

    with FeatureDB(sae_copy) as db:
        latent = int(db.density.argmax())
        card = db.card(latent)
        doc = card_document(db, card, label="a & b")
    assert doc.startswith("<!doctype html>") and doc.rstrip().endswith("</html>")
    page = _Page(doc)
    assert list(page.sections) == [f"{HOOK1}-{latent}"]
    text = "".join(page.sections[f"{HOOK1}-{latent}"])
    assert f"Latent {latent} — a & b" in text and f"density {card.density:.3%}" in text
    assert f"{card.top[0].acts[card.top[0].pos]:.3f}" in page.titles
    assert not page.hrefs  # neighbours not in the file are not links


def test_sample_is_alive_seeded_and_covers_every_sae_of_a_group(demo_group, tmp_path):
    from saelab.analysis.cards import export_html
    from saelab.analysis.features.db import FeatureDB

    a, n = export_html(demo_group.group, tmp_path / "a.html", sample=4, seed=1)
    b, _ = export_html(demo_group.group, tmp_path / "b.html", sample=4, seed=1)
    c, _ = export_html(demo_group.group, tmp_path / "c.html", sample=4, seed=2)
    assert n == 4 * len(demo_group.saes)
    pa, pb, pc = (_Page(p.read_text(encoding="utf-8")) for p in (a, b, c))
    assert sorted(pa.sections) == sorted(pb.sections) != sorted(pc.sections)
    for hook, folder in demo_group.saes.items():
        ids = [int(s.rsplit("-", 1)[1]) for s in pa.sections if s.startswith(hook + "-")]
        assert len(ids) == 4
        with FeatureDB(folder) as db:
            assert all(db.density[i] > 0 for i in ids)
    # each card lists its 3 closest latents in the group's other SAE (best_matches of the SAE files, computed
    # here), linked when that card is in the file
    from saelab.analysis.geometry import best_matches
    from saelab.sae.base import SAE

    (h0, f0), (h1, f1) = sorted(demo_group.saes.items())
    W0, W1 = SAE.load(f0).W_dec, SAE.load(f1).W_dec
    in1 = {int(s.rsplit("-", 1)[1]) for s in pa.sections if s.startswith(h1 + "-")}
    for sec in (s for s in pa.sections if s.startswith(h0 + "-")):
        i = int(sec.rsplit("-", 1)[1])
        top, cos = best_matches(W0[i : i + 1], W1, 3)
        text = "".join(pa.sections[sec])
        assert "In the group's other SAEs" in text and h1 in text
        assert " · ".join(f"#{j} ({c:.2f})" for j, c in zip(top[0].tolist(), cos[0].tolist())) in text
        linked = {h for h in pa.links[sec] if h.startswith(f"#{h1}-")}
        assert linked == {f"#{h1}-{j}" for j in top[0].tolist() if j in in1}


def test_sample_of_an_sae_with_few_alive_latents_takes_them_all():
    import numpy as np

    from saelab.analysis.cards import sample_alive

    density = np.zeros(100)
    density[[3, 50, 97]] = 0.1
    assert sample_alive(density, 50) == [3, 50, 97]
    picked = sample_alive(np.linspace(0, 1, 1000), 10, seed=3)
    assert len(set(picked)) == 10 and picked == sorted(picked) and 0 not in picked


def test_bad_input_is_one_line_and_writes_nothing(sae_copy, tmp_path):
    """Each refusal names its fix, before any card is built; through the CLI (two cases: the error path is
    shared; ``--latents`` parsing is the same function as in process) it is one line on stderr; no file or temp
    file is left."""
    from saelab.analysis.cards import export_html
    from saelab.errors import SaelabError

    bare = tmp_path / "bare"  # an SAE that was never analysed
    bare.mkdir()
    for f in ("cfg.json", "sae_weights.safetensors"):
        shutil.copy(sae_copy / f, bare / f)
    out = tmp_path / "x.html"
    cases = [
        (dict(sae=sae_copy, out=out, latents="x1"), "is not a latent id"),
        (dict(sae=sae_copy, out=out, latents="9-3"), "runs backwards; write 3-9"),
        (dict(sae=sae_copy, out=out, latents="99999"), "out of range"),
        (dict(sae=sae_copy, out=out, sample=0), "--sample 0: pass 1 or more"),
        (dict(sae=bare, out=out), "saelab analyze --sae"),
        (dict(sae=tmp_path / "missing", out=out), "no such folder"),
        (dict(sae=sae_copy, out=tmp_path), "is a folder: pass a file name"),
        (dict(sae=sae_copy, out="/proc/cards.html"), "cannot be written"),
        (dict(sae=sae_copy, out=out, latents="0-3", max_cards=3), "4 latent cards is more than --max-cards 3"),
        (dict(sae=sae_copy, out=out, sample=4, max_cards=3), "or pass --max-cards 4 to write them all"),
        (dict(sae=sae_copy, out=out, max_cards=0), "--max-cards 0: pass 1 or more"),
    ]
    for kw, msg in cases:
        with pytest.raises(SaelabError, match=re.escape(msg)):
            export_html(**kw)
    for args, msg in [(("--sae", sae_copy, "--latents", "0-3", "--max-cards", "3", "--out", out), "--max-cards 4"),
                      (("--sae", bare, "--out", out), "saelab analyze --sae")]:
        r = _cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1, (args, r.stderr)
        assert lines[0].startswith("saelab: error:") and msg in lines[0], (args, r.stderr)
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))
    assert export_html(sae_copy, out, latents="0-2", max_cards=3)[1] == 3  # the cap itself is allowed


@pytest.mark.skipif(not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_browser_opens_the_file_offline_and_unfolds_a_band(sae_copy, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from saelab.analysis.cards import export_html
    from saelab.analysis.features.db import FeatureDB

    with FeatureDB(sae_copy) as db:
        latent = int(db.density.argmax())
        card = db.card(latent)
    out, _ = export_html(sae_copy, tmp_path / "cards.html", latents=str(latent))
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--window-size=1300,1400",
              f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(pathlib.Path(out).as_uri())
        body = driver.find_element(By.TAG_NAME, "body").text
        assert f"Latent {latent}" in body and f"{card.top[0].value:+.2f}" in body and "Promoted tokens" in body
        band, exs = next((b, e) for b, e in card.quantiles if e)
        hidden = f"{exs[0].value:+.2f}"
        summary = next(s for s in driver.find_elements(By.TAG_NAME, "summary") if band in s.text)
        details = summary.find_element(By.XPATH, "..")
        assert details.get_attribute("open") is None
        summary.click()
        assert details.get_attribute("open") is not None and hidden in details.text
        bars = driver.find_elements(By.CSS_SELECTOR, "svg rect")
        assert len(bars) == len(card.hist_counts) and max(b.rect["height"] for b in bars) > 50
        shot = tmp_path / "cards.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        driver.quit()
