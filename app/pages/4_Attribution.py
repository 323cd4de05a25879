"""Attribution: the attribution graph of a prompt over the target's MLP transcoders or cross-layer transcoder
(saelab attribute), drawn by position and layer; a feature node opens its latent card on the Features page, or is
set to a value to see the next-token distribution change."""

import pathlib

import plotly.graph_objects as go
import streamlit as st
from saelab.app import common as ui

from saelab.analysis.graphs.plot import examples_hover, graph_figure, node_label, top_nodes
from saelab.errors import SaelabError, first_line
from saelab.layout import WEIGHTS_FILE

DEFAULT_PROMPT = "the king said to the queen that he would"

target = ui.setup("Attribution")
st.title("Attribution graph")
where = target.group or target.path


def _mtimes(path: str) -> tuple:
    """The target's weight files and their times: a retrained transcoder is a new cache key."""
    return tuple((str(f), f.stat().st_mtime) for f in sorted(pathlib.Path(path).rglob(WEIGHTS_FILE)))


@st.cache_resource(show_spinner="loading the transcoders…")
def _transcoders(path: str, mtimes: tuple):
    from saelab.analysis.graphs import load_transcoders

    return load_transcoders(path)


@st.cache_resource(show_spinner="tracing the attribution graph…", max_entries=16)
def _trace(path: str, mtimes: tuple, prompt: str):
    """The prompt's unpruned graph: traced once, whatever the thresholds (pruning does not change it)."""
    from saelab.analysis.graphs import trace

    tc = _transcoders(path, mtimes)
    model = ui.load_model(tc.model)
    with ui.model_lock():
        return trace(model, tc, prompt)


@st.cache_data(show_spinner="pruning…", max_entries=64)
def _graph(path: str, mtimes: tuple, prompt: str, node_t: float, edge_t: float) -> dict:
    from saelab.analysis.graphs import graph_file

    return graph_file(_trace(path, mtimes, prompt), _transcoders(path, mtimes), node_t, edge_t)[2]


@st.cache_data(show_spinner="running the intervention…", max_entries=256)
def _intervene(path: str, mtimes: tuple, token_ids: tuple, layer: int, pos: int, feature: int, value: float):
    """{token: (clean probability, intervened probability)} of the tokens either run ranks in its top 8."""
    import torch

    from saelab.analysis.graphs import intervene

    tc = _transcoders(path, mtimes)
    model = ui.load_model(tc.model)
    with ui.model_lock():
        clean, new = intervene(model, tc.coders, torch.tensor(token_ids), [(layer, pos, feature, value)])
    pc, pn = clean.softmax(-1), new.softmax(-1)
    ids = list(dict.fromkeys(pc.topk(8).indices.tolist() + pn.topk(8).indices.tolist()))
    return {model.to_string([i]): (float(pc[i]), float(pn[i])) for i in ids}


mtimes = _mtimes(str(where))
try:
    tc = _transcoders(str(where), mtimes)
except SaelabError as e:
    st.info(f"The Attribution page runs over MLP transcoders, and {where} has none: {first_line(e)}. Make a group "
            "of per-layer transcoders and open the app on it:")
    st.code("saelab harvest --pairs mlp --out activations/mlp --tokens 1000000\n"
            "saelab train --arch transcoder --activations activations/mlp --out runs/transcoders\n"
            "saelab app --sae runs/transcoders", language="bash")
    st.stop()
except ui.DAMAGE as e:
    st.error(ui.damage_line(e, where))
    st.stop()
st.sidebar.caption(f"{where}\n\nmodel: {tc.model} · transcoders of layers {', '.join(map(str, sorted(tc.coders)))}")

prompt = st.text_input("Prompt", value=DEFAULT_PROMPT, key="attr_prompt",
                       help="traced from BOS to its last token; the graph explains the next-token logits")
c1, c2 = st.columns(2)
node_t = c1.slider("Node threshold (cumulative influence kept)", 0.5, 0.99, 0.8, 0.01, key="attr_node_threshold")
edge_t = c2.slider("Edge threshold (cumulative influence kept)", 0.5, 0.99, 0.98, 0.01, key="attr_edge_threshold")
if not prompt.strip():
    st.info("Type a prompt to trace its attribution graph.")
    st.stop()
try:
    data = _graph(str(where), mtimes, prompt, float(node_t), float(edge_t))
except SaelabError as e:
    st.error(first_line(e))
    st.stop()

sc = data["scores"]
cols = st.columns(4)
cols[0].metric("replacement score", f"{sc['replacement']:.3f}")
cols[1].metric("completeness score", f"{sc['completeness']:.3f}")
cols[2].metric("nodes kept", f"{len(data['nodes'])} of {data.get('n_nodes_total', '?')}")
cols[3].metric("edges kept", f"{len(data['edges'])} of {data.get('n_edges_total', '?')}")
nodes = {n["id"]: n for n in data["nodes"]}
features = sorted((i for i, n in nodes.items() if n["kind"] == "feature"), key=lambda i: -nodes[i]["influence"])

# a feature's hover names its top activations where its transcoder has a feature database (else the graph's own);
# a cross-layer transcoder (one folder for every layer) has none: analyze reads one layer's SAE
cross_layer = len(set(map(str, tc.folders.values()))) < len(tc.folders)
dbs = {} if cross_layer else {L: ui.feature_db(pathlib.Path(f), show=False) for L, f in tc.folders.items()}
hover = {}
for i in features:
    db = dbs.get(nodes[i]["layer"])
    card = ui.read(db.path, db.card, nodes[i]["feature"], optional=True) if db is not None else None
    hover[i] = examples_hover(card.top) if card is not None else ""
if cross_layer:
    st.caption("a cross-layer transcoder has no feature database (saelab analyze reads one layer's SAE): hover shows "
               "each node's graph values only")
elif not any(hover.values()):
    st.caption(f"no feature database for these transcoders: `saelab analyze --sae {where}` adds each feature's top "
               "activations to its hover")

fig = graph_figure(data, hover)
event = st.plotly_chart(fig, key="attr_graph", on_select="rerun", selection_mode="points")
st.caption("x: the prompt's tokens; y: embeddings, each MLP's transcoder features and error nodes, the logits. "
           "Marker size: influence on the output; edges: orange positive, blue negative, wider for larger |weight|.")
points = (event or {}).get("selection", {}).get("points", []) if event else []
clicked = next((p.get("customdata") for p in points if p.get("customdata") in features), None)
if clicked and st.session_state.get("_attr_clicked") != clicked:
    st.session_state["_attr_clicked"] = clicked
    st.session_state["attr_node"] = clicked

st.subheader("Top nodes by influence")
st.dataframe(top_nodes(data, 20), hide_index=True)
logits = [n for n in data["nodes"] if n["kind"] == "logit"]
if logits:
    st.caption("logits explained: " + " · ".join(f"{n.get('token', '')!r} {n.get('prob') or 0:.3f}" for n in logits))

if not features:
    st.info("No feature node is kept at these thresholds: raise the node threshold to keep more.")
    st.stop()
if st.session_state.get("attr_node") not in features:
    st.session_state.pop("attr_node", None)
label = lambda i: f"{node_label(nodes[i])}  (influence {nodes[i]['influence']:.4f})"  # noqa: E731
st.subheader("A feature node")
node_id = st.selectbox("Feature node (or click it in the graph)", features, key="attr_node", format_func=label)
n = nodes[node_id]
folder = pathlib.Path(tc.folders[n["layer"]])
hook = None if cross_layer else next((h for h, f in target.saes.items()
                                      if pathlib.Path(f).resolve() == folder.resolve()), None)
if hook is not None and st.button(f"Open latent {n['feature']} of layer {n['layer']} on the Features page",
                                  key="attr_open_card"):
    st.session_state["hook"], st.session_state["latent"] = hook, int(n["feature"])
    st.switch_page("pages/1_Features.py")

with st.form("attr_intervene_form"):
    st.markdown(f"**Intervene**: set {node_label(n)} (activation {n['activation']:+.3f}) to a value and run the "
                "real model")
    value = st.number_input("Value (0 ablates it)", value=0.0, step=0.5, key="attr_value")
    if st.form_submit_button("Intervene"):
        st.session_state["attr_intervention"] = (node_id, float(value), tuple(data["token_ids"]))
done = st.session_state.get("attr_intervention")
if done and done[0] in nodes and done[2] == tuple(data["token_ids"]):
    m = nodes[done[0]]
    try:
        probs = _intervene(str(where), mtimes, done[2], m["layer"], m["position"], m["feature"], done[1])
    except SaelabError as e:
        st.error(first_line(e))
        st.stop()
    st.markdown(f"Next token after the prompt, clean vs {node_label(m)} set to {done[1]:+.3f}")
    rows = sorted(({"token": repr(t), "clean": round(a, 4), "intervened": round(b, 4), "change": round(b - a, 4)}
                   for t, (a, b) in probs.items()), key=lambda r: -max(r["clean"], r["intervened"]))
    st.dataframe(rows, hide_index=True)
    bar = go.Figure([go.Bar(name=k, x=[r["token"] for r in rows], y=[r[k] for r in rows], marker_color=c)
                     for k, c in (("clean", "steelblue"), ("intervened", "darkorange"))])
    bar.update_layout(barmode="group", height=260, margin=dict(l=10, r=10, t=10, b=10), yaxis_title="probability")
    st.plotly_chart(bar, key="attr_intervene_chart")
