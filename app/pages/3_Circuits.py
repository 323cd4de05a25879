"""Circuits: draw a sparse feature circuit file (runs/GROUP/circuits/*.json) as a layered graph;
selecting a node opens its latent card."""

import pathlib

import plotly.graph_objects as go
import streamlit as st
from saelab.app import common as ui

target = ui.setup("Circuits")
st.title("Circuits")


def _layer(node) -> int:
    """A node's column: its block, the embedding's (no block) before block 0."""
    return -1 if node.get("layer") is None else node["layer"]


def load(path: pathlib.Path) -> dict:
    """The circuit file, validated (``load_circuit``: every field the drawing reads has its type)."""
    from saelab.analysis.circuits import load_circuit

    return load_circuit(path)


files = sorted(target.circuits_dir.glob("*.json"))
c1, c2 = st.columns([1, 1])
choice = c1.selectbox("Circuit file", [str(f) for f in files], key="circuit_file",
                      placeholder="none in " + str(target.circuits_dir), index=0 if files else None)
other = c2.text_input("…or a path to a circuit JSON", key="circuit_path")
path = pathlib.Path(other).expanduser() if other.strip() else (pathlib.Path(choice) if choice else None)
if path is None:
    st.info(f"No circuit files in {target.circuits_dir}. Find one with "
            f"`saelab circuit --sae {target.group or target.path} --task induction` "
            "(it writes circuits/NAME.json in the group folder), or type a path above.")
    st.stop()
circ = ui.read(path, load, path)

task = circ.get("task") or {}
st.caption(f"task {task.get('name', '?')} ({task.get('metric', '?')}, {task.get('n_examples', '?')} examples) · "
           f"method {circ.get('method', '?')} · model {circ.get('model', '?')}")
faith = circ.get("faithfulness") or {}
mv = circ.get("metric_values") or {}
cols = st.columns(5)
for col, (name, v) in zip(cols, [("faithfulness (nodes)", faith.get("nodes")), ("faithfulness (edges)",
                                 faith.get("edges")), ("metric: full", mv.get("full")),
                                 ("metric: circuit", mv.get("circuit")), ("metric: empty", mv.get("empty"))]):
    col.metric(name, "—" if v is None else f"{v:.3f}")

nodes = {n["id"]: n for n in circ["nodes"]}
edges = [e for e in circ["edges"] if e.get("src") in nodes and e.get("dst") in nodes]
max_w = max((abs(e["weight"]) for e in edges), default=0.0)
max_n = max((abs(n.get("effect") or 0.0) for n in nodes.values()), default=0.0)
c1, c2 = st.columns(2)
edge_t = c1.slider("Edge threshold |weight|", 0.0, float(max_w) or 1.0, 0.0, key="edge_threshold")
node_t = c2.slider("Node threshold |effect|", 0.0, float(max_n) or 1.0, 0.0, key="node_threshold")
shown = {i: n for i, n in nodes.items() if abs(n.get("effect") or 0.0) >= node_t}
edges = [e for e in edges if abs(e["weight"]) >= edge_t and e["src"] in shown and e["dst"] in shown]
st.caption(f"{len(shown)} of {len(nodes)} nodes, {len(edges)} edges shown")


def node_label(n):
    return f"{n['hook']} · {'error' if n.get('kind') == 'error' else '#' + str(n['latent'])}"


# layout: x = layer, y = rank by |effect| within the layer (error node last)
pos = {}
for layer in sorted({_layer(n) for n in shown.values()}):
    col = sorted((n for n in shown.values() if _layer(n) == layer),
                 key=lambda n: (n.get("kind") == "error", -abs(n.get("effect") or 0.0)))
    for r, n in enumerate(col):
        pos[n["id"]] = (layer, -(r - (len(col) - 1) / 2))

fig = go.Figure()
for e in edges:
    (x0, y0), (x1, y1) = pos[e["src"]], pos[e["dst"]]
    w = e["weight"]
    fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
                             line=dict(width=1 + 6 * abs(w) / (max_w or 1),
                                       color="darkorange" if w > 0 else "steelblue"),
                             opacity=0.35 + 0.6 * abs(w) / (max_w or 1)))
ids = list(pos)
eff = [shown[i].get("effect") or 0.0 for i in ids]
fig.add_trace(go.Scatter(
    x=[pos[i][0] for i in ids], y=[pos[i][1] for i in ids], mode="markers+text", customdata=ids,
    text=["err" if shown[i].get("kind") == "error" else str(shown[i]["latent"]) for i in ids],
    textposition="top center", showlegend=False,
    hovertext=[f"{node_label(shown[i])}<br>effect {eff[k]:+.4f}" for k, i in enumerate(ids)], hoverinfo="text",
    marker=dict(size=[10 + 25 * abs(v) / (max_n or 1) for v in eff],
                symbol=["square" if shown[i].get("kind") == "error" else "circle" for i in ids],
                color=eff, colorscale=[[0, "steelblue"], [0.5, "white"], [1, "darkorange"]], cmid=0,
                line=dict(width=1, color="#333"), colorbar=dict(title="effect"))))
layers = sorted({p[0] for p in pos.values()})
hooks = {_layer(n): n["hook"] for n in shown.values()}
fig.update_layout(height=520, margin=dict(l=10, r=10, t=10, b=10), clickmode="event+select",
                  xaxis=dict(tickvals=layers, ticktext=[hooks[l_] for l_ in layers], title="layer"),
                  yaxis=dict(visible=False))
event = st.plotly_chart(fig, key="circuit_graph", on_select="rerun", selection_mode="points")
points = (event or {}).get("selection", {}).get("points", []) if event else []
clicked = next((p.get("customdata") for p in points if p.get("customdata") in shown), None)
if clicked and st.session_state.get("_last_clicked") != clicked:
    st.session_state["_last_clicked"] = clicked
    st.session_state["circuit_node"] = clicked

options = sorted(shown, key=lambda i: -abs(shown[i].get("effect") or 0.0))
if st.session_state.get("circuit_node") not in options:
    st.session_state.pop("circuit_node", None)
node_id = st.selectbox("Open a node (or click it in the graph)", options, key="circuit_node", index=None,
                       format_func=lambda i: f"{node_label(shown[i])} (effect {shown[i].get('effect') or 0:+.4f})")
if node_id:
    n = shown[node_id]
    if n.get("kind") == "error" or n.get("latent") is None:
        st.info(f"Error node of {n['hook']}: what the SAE does not reconstruct there "
                f"(effect {n.get('effect') or 0:+.4f}). It has no latent card.")
    else:
        # the SAE the circuit names for this hook, else the open folder's SAE at that hook
        named = (circ.get("saes") or {}).get(n["hook"])
        sae_dir = pathlib.Path(named) if named and pathlib.Path(named).is_dir() else target.saes.get(n["hook"])
        if sae_dir is None:
            st.error(f"no SAE for hook {n['hook']} in {target.path}: open the app on the circuit's group folder")
        else:
            ui.sae(sae_dir)  # its weights first: the card's features.h5 is checked against them
            db = ui.feature_db(sae_dir)
            if db is not None:
                ui.render_card(sae_dir, db, int(n["latent"]), key="circuit_card")
