"""saelab app — home: what is open, and the pages."""

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from saelab.app import common as ui

from saelab.layout import (
    CFG_FILE,
    EVAL_FILE,
    FEATURES_FILE,
    SOURCE_FILE,
    TRAIN_FILE,
    read_eval,
    read_sae_cfg,
    read_source,
)


def _source(folder) -> str:
    """Where an SAE came from: the hub repo/subfolder@commit of a fetched one (and the layout it was converted
    from, when not SAELens's), else trained here."""
    src = ui.read(folder / SOURCE_FILE, read_source, folder, optional=True)
    if src:
        fmt = f" ({src['format']})" if src.get("format") not in (None, "saelens") else ""
        if src.get("path"):  # fetched from a local folder
            return f"local: {src['path']}{fmt}"
        sub = f"/{src['subfolder']}" if src.get("subfolder") else ""
        return f"hub: {src.get('repo_id')}{sub}@{(src.get('commit') or src.get('revision') or 'main')[:7]}{fmt}"
    return "trained here" if (folder / TRAIN_FILE).is_file() else "local folder"


target = ui.setup("Home")
st.title("saelab")
kind = "SAE group" if target.group else "SAE"
st.markdown(f"**{kind}** `{target.path}` · model **{target.model}**")

rows = []
for hook, folder in target.saes.items():
    cfg = ui.read(folder / CFG_FILE, read_sae_cfg, folder)
    ev = ui.read(folder / EVAL_FILE, read_eval, folder, optional=True) or {}
    s = cfg.get("saelab") or {}
    rows.append({"hook": hook, "arch": s.get("arch") or cfg.get("architecture"), "d_sae": cfg.get("d_sae"),
                 "k": s.get("k") or cfg.get("k"), "FVU": ev.get("fvu"), "L0": ev.get("l0"),
                 "CE recovered": ev.get("ce_loss_recovered"), FEATURES_FILE: (folder / FEATURES_FILE).is_file(),
                 "labels": len(ui.labels(folder)), "source": _source(folder)})
st.dataframe(rows, hide_index=True)
# the latent-density histogram, the first health check of an SAE: a bump of dense latents at the right, a long
# tail of rare ones at the left, and the dead ones (never fired on the analysed rows) counted apart
dbs = {h: ui.feature_db(f, show=False) for h, f in target.saes.items()}
dens = {h: np.asarray(db.density) for h, db in dbs.items() if db is not None}
if dens:
    st.markdown("**Latent density**: log₁₀ of the fraction of analysed tokens on which each latent fires")
    fig = go.Figure()
    for h, d in dens.items():
        fig.add_trace(go.Histogram(x=np.log10(d[d > 0]).tolist(), name=f"{h} ({int((d == 0).sum())} dead)",
                                   nbinsx=50, opacity=0.6))
    fig.update_layout(barmode="overlay", height=300, margin=dict(l=10, r=10, t=10, b=10),
                      xaxis_title="log₁₀ density", yaxis_title="latents", legend=dict(orientation="h", y=-0.3))
    st.plotly_chart(fig, key="density_hist")
missing = [h for h, f in target.saes.items() if not (f / FEATURES_FILE).is_file()]
if missing:
    # an SAE not trained here (fetched, or SAELens-written) names no store: analyze needs one of its hook
    store = "" if all((target.saes[h] / TRAIN_FILE).is_file() for h in missing) else " --activations STORE_OR_RUN"
    st.info("The Features page needs a feature database; create it with "
            f"`saelab analyze --sae {target.group or target.path}{store}` ({', '.join(missing)} lack one).")

st.page_link("pages/1_Features.py", label="Features — find latents by id, prompt, token, density or label; latent cards")
st.page_link("pages/2_Steering.py", label="Steering — add / clamp / ablate latents, side-by-side generations, "
                                          "effect metrics, sweeps")
st.page_link("pages/3_Circuits.py", label="Circuits — sparse feature circuits as layered graphs")
st.page_link("pages/4_Attribution.py", label="Attribution — attribution graphs over transcoders: trace a prompt, "
                                             "intervene on a feature")
st.page_link("pages/5_Evaluations.py", label="Evaluations — every eval score against L0 across SAEs, seed spreads, "
                                             "sparse-probing curves")
