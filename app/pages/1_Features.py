"""Features: find a latent (by id, prompt, token, density or label) and read its card."""

import numpy as np
import plotly.express as px
import streamlit as st
from saelab.app import common as ui

from saelab.errors import SaelabError

target = ui.setup("Features")
hook, sae_dir = ui.pick_sae(target)
st.title("Features")
sae = ui.sae(sae_dir)  # first: a features.h5 is checked against these weights
db = ui.feature_db(sae_dir)
labels = ui.labels(sae_dir)
explained = ui.explanations(sae_dir)
names = {**explained, **labels}  # what a latent is called: its label, else its autointerp explanation
d_sae = sae.d_sae
if ui.selected_latent() >= d_sae:
    st.session_state["latent"] = 0


def result_buttons(rows, fmt, prefix):
    """One button per found latent: opens its card below."""
    for j, score in rows:
        st.button(f"{ui.latent_name(j, names)}  ({fmt.format(score)})", key=f"{prefix}_{j}", on_click=ui.goto,
                  args=(j,))


mode = st.radio("Find a latent", ["by id", "by prompt", "by token", "by density", "by label"], horizontal=True,
                key="find")
if mode == "by prompt":
    text = st.text_area("Prompt", key="find_prompt", placeholder="type text: the latents firing most on it are listed")
    if text.strip():
        from saelab.analysis.steering import prompt_latents

        try:
            model = ui.load_model(target.model)
            with ui.model_lock():
                toks, acts = prompt_latents(model, sae, text)
        except SaelabError as e:
            st.error(str(e))
        else:
            signed = bool(getattr(sae, "signed", False))  # AbsTopK: both signs count
            peak = (acts.abs() if signed else acts).max(0).values
            order = peak.argsort(descending=True)[:12]
            order = [int(j) for j in order if peak[j] > 0]
            if not order:
                st.info("no latent fires on this text")
            else:
                z = acts[:, order].detach().numpy()
                lim = float(abs(z).max()) or 1.0
                fig = px.imshow(z, x=[ui.latent_name(j, names) for j in order],
                                y=[f"{i}: {t!r}" for i, t in enumerate(toks)],
                                color_continuous_scale="RdBu_r" if signed else "Oranges",
                                zmin=-lim if signed else 0, zmax=lim,
                                aspect="auto", labels=dict(x="latent", y="token", color="activation"))
                fig.update_layout(height=min(120 + 22 * len(toks), 700), margin=dict(l=10, r=10, t=10, b=10))
                fig.update_xaxes(type="category")
                st.plotly_chart(fig, key="prompt_heatmap")
                st.caption("latents by their highest " + ("|activation|" if signed else "activation")
                           + " on the prompt")
                result_buttons([(j, float(peak[j])) for j in order], "max {:.2f}", "open_p")
elif mode == "by token":
    tok = st.text_input("Token", key="find_token", placeholder="e.g. ' park' (leading space matters)")
    if tok and db is not None:
        hits = ui.read(db.path, db.by_token, tok, 20)
        if not hits and not db.in_vocab(tok):
            like = db.similar_tokens(tok)
            st.info(f"{tok!r} is not one token of this model's vocabulary"
                    + (": try " + ", ".join(repr(t) for t in like) if like else ""))
        elif not hits:
            st.info(f"no latent promotes {tok!r} among its top tokens")
        result_buttons(hits, "logit {:+.2f}", "open_t")
elif mode == "by label":
    q = st.text_input("Label or explanation contains", key="find_label",
                      placeholder="words of a label you saved or of an autointerp explanation")
    if q.strip():
        q = q.strip().lower()
        hits = [j for j in sorted(names) if q in labels.get(j, "").lower() or q in explained.get(j, "").lower()]
        if not hits:
            st.info(f"no label or explanation contains {q!r}" + ("" if names else
                    " (this SAE has none yet: save labels on the cards, or run saelab eval --suite autointerp)"))
        dens = np.asarray(db.density) if db is not None else np.zeros(d_sae)
        result_buttons([(j, float(dens[j])) for j in hits[:50]], "density {:.3%}", "open_l")
elif mode == "by density" and db is not None:
    c1, c2 = st.columns(2)
    order = c1.radio("Order", ["densest first", "rarest first (fired at least once)"], key="dens_order")
    n = c2.number_input("Show", 5, 200, 20, key="dens_n")
    dens = np.asarray(db.density)
    if order.startswith("densest"):
        idx = np.argsort(-dens, kind="stable")
    else:
        alive = np.nonzero(dens > 0)[0]
        idx = alive[np.argsort(dens[alive], kind="stable")]
    st.caption(f"dead latents (never fired on the analysed rows): {int((dens == 0).sum())} of {d_sae}")
    result_buttons([(int(j), float(dens[j])) for j in idx[: int(n)]], "density {:.3%}", "open_d")

st.divider()
latent = st.number_input("Latent id", min_value=0, max_value=d_sae - 1, step=1, key="latent")
if db is not None:
    ui.render_card(sae_dir, db, int(latent), others={h: f for h, f in target.saes.items() if h != hook}, labs=labels)
