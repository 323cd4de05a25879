"""Latent cards as HTML: token windows shaded by activation (``tokens_html``, the app's and the notebooks'), and
one self-contained file of cards (``saelab export``): what the app's Features page shows for a
set of latents, readable in any browser with no server, no network and no JavaScript, to share or archive.

For each SAE (one folder, or every SAE of a group folder) it reads the feature database (``features.h5``,
written by ``saelab analyze``) and the labels (``labels.json``), and writes, per chosen latent: the label,
density, mean / max activation, fire count, nesting group, attention heads; the histogram of non-zero
|activations| (inline SVG); the top examples as token windows shaded by activation (hover a token for its
value: the app's ``tokens_html``), the most negative ones for signed SAEs, and the quantile bands (folded,
``<details>``); promoted and suppressed tokens; the decoder neighbours, linked when they are in the file.
An index at the top lists every exported latent. Latents are chosen by ``latents`` (ids and ranges,
``"3,17,100-120"``) or, by default, a seeded random sample of the alive ones (what a reader judging an SAE's
interpretability wants: not the handful that fire most).
"""

from __future__ import annotations

import contextlib
import datetime
import html
import pathlib
import re

import numpy as np
from tqdm.auto import tqdm

from saelab import __version__
from saelab.errors import SaelabError
from saelab.options import ExportOptions
from saelab.outputs import html_generator

_WINDOW = "font-family:monospace;font-size:0.85em;line-height:1.9;white-space:normal"  # the window's div
_TOKEN = "border-radius:2px;padding:0 1px"  # every token's span
_AT = "outline:1.5px solid #333"  # the example's own token
#: the styles ``tokens_html(..., classed=True)`` leaves to a stylesheet (``saelab export`` writes it once)
TOKENS_CSS = f".tw{{{_WINDOW}}}.tw span{{{_TOKEN}}}.tw .at{{{_AT}}}"


def tokens_html(tokens: list[str], acts: list[float], pos: int | None, scale: float, classed: bool = False) -> str:
    """Tokens as inline spans shaded by activation (orange positive, blue negative); hovering one
    shows its value; the example's own token is outlined. ``classed``: the styles every span shares come
    from ``TOKENS_CSS`` (class ``tw``) instead of each span's own style attribute, for a page of many windows."""
    out = []
    scale = scale if scale and scale > 0 else max((abs(a) for a in acts), default=1.0) or 1.0
    for i, (t, a) in enumerate(zip(tokens, acts)):
        alpha = min(abs(a) / scale, 1.0)
        rgb = "255,140,0" if a >= 0 else "30,120,255"
        shade = f"background:rgba({rgb},{alpha:.2f});" if alpha >= 0.005 else ""  # else it would print as 0.00
        text = html.escape(t).replace("\n", "↵").replace(" ", "&nbsp;") or "&nbsp;"
        if classed:
            style = f' style="{shade}"' if shade else ""
            out.append(f'<span title="{a:.3f}"{" class=at" if i == pos else ""}{style}>{text}</span>')
        else:
            border = f"{_AT};" if i == pos else ""
            out.append(f'<span title="{a:.3f}" style="{shade}{border}{_TOKEN}">{text}</span>')
    return ('<div class="tw">' if classed else f'<div style="{_WINDOW}">') + "".join(out) + "</div>"


N_TOP_SHOWN = 10  # top examples shown open; the rest are folded
_CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 12px}
h1{font-size:1.5em}h2{font-size:1.25em;margin:0 0 4px}h3{font-size:1em;margin:12px 0 4px}
.meta{color:#555;font-size:.9em}.card{border:1px solid #ddd;border-radius:6px;padding:12px 16px;margin:18px 0}
.cols{display:flex;gap:24px;flex-wrap:wrap}.left{flex:3;min-width:420px}.right{flex:2;min-width:300px}
.ex{margin:2px 0;display:flex;gap:8px;align-items:baseline}.ex b{min-width:3.5em;flex:none}
table{border-collapse:collapse;font-size:.9em}
td,th{padding:1px 8px;text-align:left;border-bottom:1px solid #eee}code{font-size:.95em}
summary{cursor:pointer;color:#444;margin:4px 0}a{color:#0b5cad}h2.sae{margin-top:28px}
"""


def parse_latents(spec: str, d_sae: int) -> list[int]:
    """``"3,17,100-120"`` → sorted unique ids, each checked against ``d_sae``; a one-line error otherwise."""
    out: set[int] = set()
    for part in (p.strip() for p in str(spec).split(",")):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise SaelabError(f"--latents {spec!r}: {part!r} is not a latent id or a range like 100-120")
        a, b = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if b < a:
            raise SaelabError(f"--latents {spec!r}: the range {part} runs backwards; write {b}-{a}")
        if b >= d_sae:
            raise SaelabError(f"--latents {spec!r}: latent {b} is out of range: this SAE has latents 0..{d_sae - 1}")
        out.update(range(a, b + 1))
    return sorted(out)


def sample_alive(density: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """``n`` latents drawn without replacement from those that fired (all of them when fewer), sorted."""
    if n < 1:
        raise SaelabError(f"--sample {n}: pass 1 or more")
    alive = np.flatnonzero(density > 0)
    if len(alive) <= n:
        return alive.tolist()
    return sorted(np.random.default_rng(seed).choice(alive, size=n, replace=False).tolist())


def _hist_svg(edges: list[float], counts: list[int], w: int = 320, h: int = 90) -> str:
    """Bars of the log-binned histogram (equal widths: the bins are equal in log |activation|)."""
    if not counts:
        return '<p class="meta">never fired</p>'
    top = max(counts) or 1
    bw = w / len(counts)
    bars = "".join(f'<rect x="{i * bw:.1f}" y="{h - h * c / top:.1f}" width="{max(bw - 0.5, 0.5):.1f}" '
                   f'height="{h * c / top:.1f}" fill="darkorange"><title>{a:.3g}–{b:.3g}: {c:,}</title></rect>'
                   for i, (a, b, c) in enumerate(zip(edges[:-1], edges[1:], counts)))
    return (f'<svg width="{w}" height="{h + 16}" role="img" aria-label="histogram">{bars}'
            f'<text x="0" y="{h + 13}" font-size="11">{edges[0]:.3g}</text>'
            f'<text x="{w}" y="{h + 13}" font-size="11" text-anchor="end">{edges[-1]:.3g}</text></svg>')


def _examples(examples, scale: float) -> str:
    if not examples:
        return '<p class="meta">none</p>'
    return "".join(f'<div class="ex"><b>{e.value:+.2f}</b>'
                   f"{tokens_html(e.tokens, e.acts, e.pos, scale, classed=True)}</div>" for e in examples)


def _tokens_table(rows: list[tuple[str, float]]) -> str:
    if not rows:
        return '<p class="meta">none (this hook has no direct path to the logits)</p>'
    return ("<table><tr><th>token</th><th>logit</th></tr>"
            + "".join(f"<tr><td><code>{html.escape(repr(t))}</code></td><td>{v:+.3f}</td></tr>" for t, v in rows)
            + "</table>")


def anchor(sae_name: str, latent: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', sae_name)}-{latent}"


def card_html(card, sae_name: str, label: str, exported: set[int], others=()) -> str:
    """One latent's section; ``exported``: the latents of this SAE in the file (neighbours link to them);
    ``others``: [(hook, SAE name, [(latent, cosine)], that SAE's latents in the file)], the closest latents in
    the group's other SAEs (linked when in the file)."""
    i = card.latent
    facts = [f"density {card.density:.3%}", f"fired on {card.count:,} rows", f"mean {card.mean_act:.3f}",
             f"max {card.max_act:.3f}"]
    if card.min_act < 0:
        facts.append(f"min {card.min_act:.3f}")
    if card.group is not None:
        facts.append(f"nesting group {card.group}")
    if card.heads:
        facts.append("heads " + " · ".join(f"{h} {x:.0%}" for h, x in card.heads[:4] if x >= 0.01))
    scale = card.max_act if card.max_act > 0 else 0.0
    left = [f"<h3>Top activations</h3>{_examples(card.top[:N_TOP_SHOWN], scale)}"]
    if len(card.top) > N_TOP_SHOWN:
        left.append(f"<details><summary>{len(card.top) - N_TOP_SHOWN} more top activations</summary>"
                    f"{_examples(card.top[N_TOP_SHOWN:], scale)}</details>")
    if card.top_negative:
        left.append("<h3>Most negative activations</h3>"
                    + _examples(card.top_negative, max(abs(e.value) for e in card.top_negative)))
    for band, exs in card.quantiles:
        left.append(f"<details><summary>Quantile band {html.escape(band)} ({len(exs)} examples)</summary>"
                    f"{_examples(exs, scale)}</details>")
    nbs = []
    for j, cos in card.neighbours:
        name = f"#{j}"
        nbs.append(f'<a href="#{anchor(sae_name, j)}">{name}</a> ({cos:.2f})' if j in exported
                   else f"{name} ({cos:.2f})")
    right = [f"<h3>Histogram of non-zero |activations|</h3>{_hist_svg(card.hist_edges, card.hist_counts)}",
             f"<h3>Promoted tokens</h3>{_tokens_table(card.logits_top)}",
             f"<h3>Suppressed tokens</h3>{_tokens_table(card.logits_bottom)}",
             "<h3>Neighbours (decoder cosine)</h3><p>" + " · ".join(nbs) + "</p>"]
    if others:
        rows = []
        for hook, name, matches, there in others:
            links = [f'<a href="#{anchor(name, j)}">#{j}</a> ({cos:.2f})' if j in there else f"#{j} ({cos:.2f})"
                     for j, cos in matches]
            rows.append(f"<tr><td><code>{html.escape(hook)}</code></td><td>{' · '.join(links)}</td></tr>")
        right.append("<h3>In the group's other SAEs (decoder cosine)</h3><table>" + "".join(rows) + "</table>")
    title = f"Latent {i}" + (f" — {html.escape(label)}" if label else "")
    return (f'<section class="card" id="{anchor(sae_name, i)}"><h2>{title}</h2>'
            f'<p class="meta">{" · ".join(facts)}</p><div class="cols"><div class="left">{"".join(left)}</div>'
            f'<div class="right">{"".join(right)}</div></div></section>')


def _page(title: str, what: str, body: str) -> str:
    """The whole document: head and stylesheet, ``title``, one line of what is in it, then ``body``."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    title = html.escape(title)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{html_generator("export")}'
            f"<title>{title}</title><style>{_CSS}{TOKENS_CSS}</style></head><body><h1>{title}</h1>"
            f'<p class="meta">{what} · written {now} by saelab {__version__} · shading: orange positive, blue '
            "negative, relative to the latent's max; hover a token for its activation</p>" + body + "</body></html>\n")


def card_document(db, card, label: str = "") -> str:
    """One latent's card as a whole HTML document (the app's download button), from an open FeatureDB."""
    name = db.sae_dir.name
    return _page(f"{db.hook}: latent {card.latent}",
                 f"{html.escape(str(db.sae_dir))} · {html.escape(db.arch)} · {db.d_sae:,} latents · "
                 f"model {html.escape(db.model or '—')} · {db.n_rows:,} rows analysed",
                 card_html(card, name, label, {card.latent}))


def _group_matches(plan, k: int = 3) -> dict:
    """{(folder, latent): [(hook, SAE name, [(latent, cosine)], that SAE's exported latents)]} for the exported
    latents of a group: each one's ``k`` closest latents by decoder cosine in every other SAE of the same d_in
    (absolute cosine when either is signed), as the app's card lists them. Empty for one SAE."""
    if len(plan) < 2:
        return {}
    from saelab.analysis.geometry import decoder_matches
    from saelab.sae.base import SAE

    saes = {folder: SAE.load(folder, device="cpu") for folder, _, _ in plan}
    out: dict = {}
    for folder, _, ids in plan:
        here = saes[folder]
        for other, db, there in plan:
            o = saes[other]
            if other == folder or o.cfg.output_dim != here.cfg.output_dim or not ids:  # decoders of one space
                continue
            top, cos = decoder_matches(here, o, k, latents=ids)
            there = set(there)
            for n, i in enumerate(ids):
                out.setdefault((folder, i), []).append(
                    (db.hook, other.name, list(zip(top[n].tolist(), cos[n].tolist())), there))
    return out


def export_html(sae, out, latents: str | None = None, sample: int = ExportOptions.sample,
                seed: int = ExportOptions.seed, progress: bool = False,
                max_cards: int | None = None, force: bool = False) -> tuple[pathlib.Path, int]:
    """Write the cards of ``sae`` (an SAE folder or a group folder) to the HTML file ``out``; returns
    (out, number of cards). ``latents``: ids and ranges for every SAE; else ``sample`` random alive latents
    per SAE (``seed``). More than ``max_cards`` (default ``ExportOptions.max_cards``) cards in all is refused
    before any is built (``--latents 0-65535`` of a wide SAE would be gigabytes of HTML, built in memory). The file
    appears whole or not at all (temp name, fsync, rename); ``saelab.outputs``' policy says what it may replace
    (``force``: a file saelab export did not write)."""
    from saelab.analysis.features.db import FeatureDB
    from saelab.analysis.features.labels import load_labels
    from saelab.fs import write_output
    from saelab.outputs import check_report
    from saelab.targets import sae_folders

    if seed < 0:
        raise SaelabError(f"--seed must be 0 or more (got {seed})")
    with contextlib.ExitStack() as stack:  # each database opened once, kept open from the checks to the cards
        plan = []  # (folder, database, latent ids): bad --latents / --sample / no database refused before any work
        for folder in sae_folders(sae):
            db = stack.enter_context(FeatureDB(folder))
            plan.append((folder, db, parse_latents(latents, db.d_sae) if latents is not None
                         else sample_alive(db.density, sample, seed)))
        n = sum(len(ids) for _, _, ids in plan)
        max_cards = ExportOptions.max_cards if max_cards is None else max_cards
        if max_cards < 1:
            raise SaelabError(f"--max-cards {max_cards}: pass 1 or more")
        if n > max_cards:
            raise SaelabError(f"{n:,} latent cards is more than --max-cards {max_cards:,} (each card is tens of KiB "
                              f"of HTML, built in memory): choose fewer with --latents or --sample, or pass "
                              f"--max-cards {n} to write them all")
        # an unwritable or forbidden --out fails now, not after the cards are built
        out, _ = check_report(out, "export", example="cards.html", inputs=[f for f, _, _ in plan], force=force)
        parts, index = [], []
        matches = _group_matches(plan)
        for folder, db, ids in plan:
            labels = load_labels(folder)
            name = folder.name
            exported = set(ids)
            head = (f'<h2 class="sae" id="{anchor(name, "sae")}">{html.escape(db.hook)}</h2><p class="meta">'
                    f"{html.escape(str(folder))} · {html.escape(db.arch)} · "
                    f"{db.d_sae:,} latents over d_in {db.d_in} · "
                    f"model {html.escape(db.model or '—')} · {db.n_rows:,} rows analysed · "
                    f"{int((db.density > 0).sum()):,} latents alive · {len(ids)} shown "
                    + ("(chosen)" if latents is not None else f"(random alive, seed {seed})") + "</p>")
            cards, rows = [], []
            for i in tqdm(ids, desc=f"export {db.hook}", disable=not progress, leave=False):
                card = db.card(i)
                lab = labels.get(i, "")
                cards.append(card_html(card, name, lab, exported, matches.get((folder, i), ())))
                top = html.escape(repr(card.logits_top[0][0])) if card.logits_top else "—"
                rows.append(f'<tr><td><a href="#{anchor(name, i)}">{i}</a></td><td>{html.escape(lab)}</td>'
                            f"<td>{card.density:.3%}</td><td>{card.max_act:.3f}</td><td><code>{top}</code></td></tr>")
            index.append(f'<h3><a href="#{anchor(name, "sae")}">{html.escape(db.hook)}</a></h3><table><tr>'
                         "<th>latent</th><th>label</th><th>density</th><th>max</th><th>top promoted token</th></tr>"
                         + "".join(rows) + "</table>")
            parts.append(head + "".join(cards))
    doc = _page(f"saelab latent cards: {pathlib.Path(sae)}",
                f'{n} latents from {len(plan)} SAE{"s" * (len(plan) != 1)}', "".join(index) + "".join(parts))
    return write_output(out, doc), n
