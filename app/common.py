"""What every page shares: the SAE target, cached model/SAE/feature-db loading, the hook selector,
and the latent card. Thin over saelab.analysis; nothing heavy is computed here."""

from __future__ import annotations

import os
import pathlib

import streamlit as st

from saelab.analysis.cards import tokens_html
from saelab.errors import SaelabError, first_line
from saelab.layout import CFG_FILE, FEATURES_FILE, LABELS_FILE, WEIGHTS_FILE
from saelab.targets import Target, resolve_target, target_from_argv_or_env

MATCH_AT_ONCE = 2  # a group with more other SAEs than this matches a card's latent in them on request (a checkbox)

#: what reading a damaged file raises: a reader's SaelabError (it names the file, the field and the fix), and what
#: a library raises below a reader that does not check that part of the file (h5py's KeyError for a missing
#: dataset or attribute and its OSError, int() or json of an attribute of the wrong type, an array of the wrong
#: shape); each is shown as one line on the page. Streamlit's own control flow (st.stop, reruns) is none of these.
DAMAGE = (SaelabError, OSError, ValueError, TypeError, KeyError, IndexError)
#: how a file the app reads is made again, for a damage its reader did not word
REMAKE = {FEATURES_FILE: "run `saelab analyze --sae {folder}` again", LABELS_FILE: "fix it or delete it",
          CFG_FILE: "re-save, re-train or re-fetch the SAE", WEIGHTS_FILE: "re-save, re-train or re-fetch the SAE"}


# ----------------------------------------------------------------------------- reading files
def damage_line(e: BaseException, file) -> str:
    """One line for an error reading ``file``: a SaelabError's own (it names its file), else the file, the library's
    first line and how the file is made again."""
    if isinstance(e, SaelabError):
        return first_line(e)
    file = pathlib.Path(str(file))
    fix = REMAKE.get(file.name, "restore it or write it again").format(folder=file.parent)
    return f"{file} is damaged ({type(e).__name__}: {first_line(e)}): {fix}"


def read(file, step, *args, optional: bool = False):
    """``step(*args)``: the page reading ``file``. A damaged file is a message on the page naming it, never a
    traceback: one the page needs is an error that ends the page (``st.stop``); an ``optional`` one is a warning,
    and None, so the page goes on without it."""
    try:
        return step(*args)
    except DAMAGE as e:
        line = damage_line(e, file)
    if optional:
        st.warning(line)
        return None
    st.error(line)
    st.stop()


# ----------------------------------------------------------------------------- loading (cached)
@st.cache_resource(show_spinner="loading the model…")
def load_model(name: str):
    from saelab.models import load_model as _load

    return _load(name, device="cpu")


@st.cache_resource
def model_lock():
    """One lock per server around model runs: steering adds hooks to the shared model, which a
    concurrent session's clean run must not see."""
    import threading

    return threading.Lock()


@st.cache_resource(show_spinner="loading the SAE…")
def load_sae(path: str, mtime: float):
    from saelab.sae.base import SAE

    return SAE.load(path).eval()


@st.cache_resource(show_spinner="opening the feature database…")
def _feature_db(path: str, mtime: float):
    from saelab.analysis.features.db import FeatureDB

    return FeatureDB(path)


def _mtime(p: pathlib.Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def sae(sae_dir: pathlib.Path):
    """The SAE of this folder (cached per version of its weights); a damaged cfg.json or weights file ends the
    page with an error naming it."""
    return read(sae_dir / WEIGHTS_FILE, load_sae, str(sae_dir), _mtime(sae_dir / WEIGHTS_FILE))


def feature_db(sae_dir: pathlib.Path, show: bool = True):
    """The FeatureDB of this SAE. None when it has none yet: with ``show``, after a message naming the command that
    makes one. A damaged one (or one written for other weights) ends the page with an error naming it; without
    ``show`` (a page that does without it) it is a warning and None."""
    path = sae_dir / FEATURES_FILE
    if not os.path.lexists(path):
        if show:
            st.info(f"No feature database for this SAE yet ({FEATURES_FILE} is missing): make one with "
                    f"`saelab analyze --sae {sae_dir}`")
            st.code(f"saelab analyze --sae {sae_dir}", language="bash")
        return None
    return read(path, _feature_db, str(sae_dir), _mtime(path), optional=not show)


def labels(sae_dir: pathlib.Path) -> dict[int, str]:
    """{latent: label} of this SAE ({} when it has none); a damaged labels.json is a warning naming it, and {}."""
    from saelab.analysis.features.labels import load_labels

    return read(sae_dir / LABELS_FILE, load_labels, sae_dir, optional=True) or {}


def explanations(sae_dir: pathlib.Path) -> dict[int, str]:
    """{latent: explanation} that ``saelab eval --suite autointerp`` wrote for this SAE's weights ({} when none)."""
    from saelab.analysis.features.records import weights_identity
    from saelab.errors import SaelabError
    from saelab.suites.autointerp import load_explanations

    try:  # the weights' sha256, hashed once per version of the file (not on every rerun of a page)
        sha = weights_identity(sae_dir)["sae_sha256"]
    except SaelabError:
        return {}
    return load_explanations(sae_dir, sha)


# ----------------------------------------------------------------------------- target and hook
def setup(title: str) -> Target:
    """Page config + the SAE target (from ``--sae`` / $SAELAB_APP_SAE); stops the page with a
    readable error when there is none."""
    st.set_page_config(page_title=f"saelab · {title}", layout="wide")
    path = target_from_argv_or_env()
    return read(path, resolve_target, path)


def pick_sae(target: Target) -> tuple[str, pathlib.Path]:
    """(hook, SAE folder): a sidebar selector when the target is a group (also set by ?hook=)."""
    hooks = list(target.saes)
    want = st.query_params.get("hook")
    if "hook" not in st.session_state or st.session_state["hook"] not in hooks:
        st.session_state["hook"] = want if want in hooks else hooks[-1]
    if len(hooks) > 1:
        st.sidebar.selectbox("SAE (hook)", hooks, key="hook")
    hook = st.session_state["hook"]
    st.sidebar.caption(f"{target.saes[hook]}\n\nmodel: {target.model}")
    return hook, target.saes[hook]


def selected_latent(default: int = 0) -> int:
    if "latent" not in st.session_state:
        q = st.query_params.get("latent")
        st.session_state["latent"] = int(q) if q is not None and str(q).isdigit() else default
    return int(st.session_state["latent"])


def goto(latent: int) -> None:
    """Button callback: open this latent's card."""
    st.session_state["latent"] = int(latent)


def goto_sae(hook: str, latent: int) -> None:
    """Button callback: open this latent's card in the group's SAE at ``hook``."""
    st.session_state["hook"] = hook
    st.session_state["latent"] = int(latent)


@st.cache_data(show_spinner="matching the latent in the group's other SAEs…", max_entries=4096)
def _other_matches(here: str, here_mtime: float, latent: int, others: tuple, k: int) -> list[tuple[str, list]]:
    from saelab.analysis.geometry import decoder_matches

    sae_here = load_sae(here, here_mtime)
    out = []
    for h, folder, mtime in others:
        there = load_sae(folder, mtime)
        if there.cfg.output_dim != sae_here.cfg.output_dim:  # decoders of another space: no matches
            continue
        ids, cos = decoder_matches(sae_here, there, k, latents=[latent])
        out.append((h, list(zip(ids[0].tolist(), cos[0].tolist()))))
    return out


def other_matches(sae_dir: pathlib.Path, latent: int, others: dict, k: int = 3) -> list[tuple[str, list]]:
    """[(hook, [(latent, cosine)] best first)]: the latents of the group's other SAEs (``others`` {hook: folder})
    whose decoder rows are closest to this latent's (absolute cosine when either SAE is signed); SAEs of another
    d_in (another activation space) are skipped. Cached per latent: a wide group's products are not redone on
    every rerun of the card."""
    return _other_matches(str(sae_dir), _mtime(sae_dir / WEIGHTS_FILE), int(latent),
                          tuple((h, str(f), _mtime(f / WEIGHTS_FILE)) for h, f in others.items()), k)


def latent_name(latent: int, labels: dict[int, str]) -> str:
    lab = labels.get(int(latent))
    return f"#{latent}" + (f" — {lab}" if lab else "")


# ----------------------------------------------------------------------------- rendering
def examples_block(examples, scale: float) -> None:
    if not examples:
        st.caption("none")
        return
    st.markdown("".join(f'<div style="margin:2px 0"><b>{e.value:+.2f}</b> '
                        f'{tokens_html(e.tokens, e.acts, e.pos, scale)}</div>' for e in examples),
                unsafe_allow_html=True)


def render_card(sae_dir: pathlib.Path, db, latent: int, key: str = "card", others: dict | None = None,
                labs: dict | None = None) -> None:
    """The latent card: stats, histogram, examples, logit effects, neighbours, label field; with ``others`` (the
    group's other SAEs, {hook: folder}) also this latent's closest latents in each of them. ``labs``: the SAE's
    labels where the page has read them already (else read here)."""
    import plotly.graph_objects as go

    from saelab.analysis.cards import card_document
    from saelab.analysis.features.labels import save_label

    card = read(db.path, db.card, latent)
    labs = labels(sae_dir) if labs is None else labs
    head = st.container()  # filled after the label form, so a label saved in this run shows at once
    with st.form(key=f"{key}_label_form_{latent}", border=False):
        cols = st.columns([4, 1])
        text = cols[0].text_input("Label", value=labs.get(latent, ""), key=f"{key}_label_{sae_dir.name}_{latent}",
                                  placeholder="what this latent means (saved to labels.json)")
        if cols[1].form_submit_button("Save label"):
            try:
                save_label(sae_dir, latent, text)
                labs = labels(sae_dir)
                st.success("label saved" if text.strip() else "label removed")
            except SaelabError as e:
                st.error(str(e))
    with head:
        expl = explanations(sae_dir).get(latent)
        st.subheader(f"Latent {latent}" + (f" — {labs[latent]}" if latent in labs else f" — {expl}" if expl else ""))
        if expl:
            st.caption(f"autointerp explanation: {expl}")
        c = st.columns(4)
        c[0].metric("density", f"{card.density:.3%}")
        c[1].metric("mean activation", f"{card.mean_act:.3f}")
        c[2].metric("max activation", f"{card.max_act:.3f}")
        c[3].metric("nesting group", "—" if card.group is None else str(card.group))
        st.download_button("Download this card (HTML)", data=card_document(db, card, labs.get(latent, "")),
                           file_name=f"{sae_dir.name}-latent-{latent}.html", mime="text/html",
                           key=f"{key}_download_{latent}",
                           help="one self-contained file that any browser opens offline (saelab export for many)")

    left, right = st.columns([3, 2])
    with left:
        st.markdown("**Top activations**")
        examples_block(card.top[:10], card.max_act)
        if len(card.top) > 10:
            with st.expander(f"{len(card.top) - 10} more top activations"):
                examples_block(card.top[10:], card.max_act)
        if card.top_negative:
            st.markdown("**Most negative activations**")
            examples_block(card.top_negative, max(abs(e.value) for e in card.top_negative))
        for band, exs in card.quantiles:
            with st.expander(f"Quantile band {band} ({len(exs)} examples)"):
                examples_block(exs, card.max_act)
    with right:
        if card.hist_counts:
            st.markdown("**Histogram** of the non-zero |activations|")
            e = card.hist_edges
            mids = [(a * b) ** 0.5 if a > 0 else (a + b) / 2 for a, b in zip(e[:-1], e[1:])]
            fig = go.Figure(go.Bar(x=mids, y=card.hist_counts, width=[b - a for a, b in zip(e[:-1], e[1:])],
                                   marker_color="darkorange"))
            fig.update_layout(height=220, margin=dict(l=10, r=10, t=10, b=10), xaxis_type="log",
                              xaxis_title="|activation|",
                              yaxis_title="count")
            st.plotly_chart(fig, key=f"{key}_hist_{latent}")
        if card.heads:  # an attention SAE: the heads its decoder row lives in
            st.markdown("**Heads** (share of the decoder row's squared norm): "
                        + " · ".join(f"{h} {x:.0%}" for h, x in card.heads[:4] if x >= 0.01))
        lt, lb = st.columns(2)
        lt.markdown("**Promoted tokens**")
        lt.dataframe([{"token": repr(t), "logit": round(v, 3)} for t, v in card.logits_top], hide_index=True)
        lb.markdown("**Suppressed tokens**")
        lb.dataframe([{"token": repr(t), "logit": round(v, 3)} for t, v in card.logits_bottom], hide_index=True)
        st.markdown("**Neighbours** (decoder cosine) — click to open")
        for j, cos in card.neighbours:
            st.button(f"{latent_name(j, labs)}  (cos {cos:.2f})", key=f"{key}_nb_{latent}_{j}", on_click=goto,
                      args=(j,))
        # a group of many SAEs (e.g. every layer of a model): matched on request, not on every card
        show = bool(others) and (len(others) <= MATCH_AT_ONCE or st.checkbox(
            f"Closest latents in the group's {len(others)} other SAEs", key=f"{key}_others_{latent}"))
        matches = other_matches(sae_dir, latent, others) if show else []
        if matches:
            st.markdown("**In the group's other SAEs** (decoder cosine) — click to open")
            if any(j == latent for _, rows in matches for j, _ in rows):
                st.caption(f"#{latent} in another SAE: SAEs trained from one seed start from the same directions, so a "
                           "match of the same index can be that shared start rather than the same feature "
                           "(saelab compare measures it)")
            for h, rows in matches:
                for j, cos in rows:
                    st.button(f"{h} #{j}  (cos {cos:.2f})", key=f"{key}_other_{latent}_{h}_{j}", on_click=goto_sae,
                              args=(h, j))
