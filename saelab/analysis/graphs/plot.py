"""A graph file's content (``graph.json``, as ``attribute`` returns it) as a Plotly figure and as table rows.

The figure puts a node at x = its token position (the prompt's tokens label the axis) and y = its layer, the
embeddings at the bottom (-1) and the logits on top (``n_layers``); nodes sharing a position and a layer sit side
by side within the position's slot. A marker's size grows with the node's influence, its colour names its kind;
an edge is a line from source to target, orange where its weight is positive and blue where negative, wider for a
larger |weight|. Plotly is imported when a figure is made (it is an optional dependency: ``.[app]``).
"""

from __future__ import annotations

KIND_COLOR = {"embedding": "#8c8c8c", "feature": "#2a9d8f", "error": "#e9c46a", "logit": "#6a4c93"}
KIND_SYMBOL = {"embedding": "square", "feature": "circle", "error": "diamond", "logit": "star"}
EDGE_BINS = 4  # edges are drawn in this many width bins per sign: a few traces, whatever the number of edges


def node_label(n: dict) -> str:
    """A node in a few characters: L0#12@3 for a feature, err L1@2, emb 'the'@1, logit ' queen'."""
    kind, pos = n["kind"], n["position"]
    if kind == "feature":
        return f"L{n['layer']}#{n['feature']}@{pos}"
    if kind == "error":
        return f"err L{n['layer']}@{pos}"
    if kind == "embedding":
        return f"emb {n.get('token', '')!r}@{pos}"
    return f"logit {n.get('token', '')!r}"


def _fmt(x) -> str:
    return "—" if x is None else f"{x:+.4g}"


def top_nodes(data: dict, n: int = 20, kinds=("feature", "error", "embedding")) -> list[dict]:
    """Table rows of the ``n`` nodes of ``kinds`` of most influence, most first."""
    nodes = sorted((x for x in data["nodes"] if x["kind"] in kinds), key=lambda x: -abs(x["influence"]))[:n]
    return [{"node": node_label(x), "kind": x["kind"], "layer": x["layer"], "position": x["position"],
             "token": data["tokens"][x["position"]] if x["position"] < len(data["tokens"]) else "",
             "feature": x["feature"], "activation": x["activation"], "influence": x["influence"]} for x in nodes]


def node_xy(data: dict) -> dict[str, tuple[float, float]]:
    """{node id: (x, y)}: x the position (nodes of one position and layer spread within ±0.4 of it, most
    influential nearest the middle), y the layer (embeddings -1, logits n_layers)."""
    cells: dict[tuple[int, int], list[dict]] = {}
    for x in data["nodes"]:
        cells.setdefault((x["position"], x["layer"]), []).append(x)
    xy = {}
    for (pos, layer), nodes in cells.items():
        nodes.sort(key=lambda x: -abs(x["influence"]))
        k = len(nodes)
        step = min(0.8 / k, 0.25)
        order = sorted(range(k), key=lambda r: abs(r - (k - 1) / 2))  # middle slots to the most influential
        for x, r in zip(nodes, order):
            xy[x["id"]] = (pos + (r - (k - 1) / 2) * step, layer)
    return xy


def hover_text(n: dict, tokens: list[str], extra: str = "") -> str:
    pos = n["position"]
    tok = n.get("token") if n["kind"] == "logit" else (tokens[pos] if pos < len(tokens) else "")
    lines = [n["id"], f"{n['kind']} · layer {n['layer']} · position {pos} {tok!r}",
             f"activation {_fmt(n.get('activation'))} · influence {n['influence']:.4f}"]
    if n["kind"] == "logit" and n.get("prob") is not None:
        lines.append(f"probability {n['prob']:.3f}")
    if extra:
        lines.append(extra)
    return "<br>".join(lines)


def graph_figure(data: dict, hover: dict[str, str] | None = None, height: int = 560):
    """The figure of a graph file's content; ``hover`` {node id: more hover text (HTML)}, e.g. a feature's top
    activations. Node traces carry each node's id as customdata (a click on the figure names the node)."""
    import plotly.graph_objects as go

    hover = hover or {}
    nodes = data["nodes"]
    xy = node_xy(data)
    fig = go.Figure()
    edges = [e for e in data["edges"] if e["source"] in xy and e["target"] in xy]
    max_w = max((abs(e["weight"]) for e in edges), default=0.0) or 1.0
    for sign, color in ((1, "darkorange"), (-1, "steelblue")):
        bins: list[list[dict]] = [[] for _ in range(EDGE_BINS)]
        for e in edges:
            if (e["weight"] > 0) == (sign > 0):
                bins[min(int(abs(e["weight"]) / max_w * EDGE_BINS), EDGE_BINS - 1)].append(e)
        for b, es in enumerate(bins):
            if not es:
                continue
            xs, ys = [], []
            for e in es:
                (x0, y0), (x1, y1) = xy[e["source"]], xy[e["target"]]
                xs += [x0, x1, None]
                ys += [y0, y1, None]
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                     line=dict(width=0.5 + 5 * (b + 1) / EDGE_BINS, color=color),
                                     opacity=0.25 + 0.6 * (b + 1) / EDGE_BINS))
    max_inf = max((abs(n["influence"]) for n in nodes), default=0.0) or 1.0
    for kind, color in KIND_COLOR.items():
        ns = [n for n in nodes if n["kind"] == kind]
        if not ns:
            continue
        fig.add_trace(go.Scatter(
            x=[xy[n["id"]][0] for n in ns], y=[xy[n["id"]][1] for n in ns], mode="markers", name=kind,
            customdata=[n["id"] for n in ns], hoverinfo="text",
            hovertext=[hover_text(n, data["tokens"], hover.get(n["id"], "")) for n in ns],
            marker=dict(size=[8 + 22 * (abs(n["influence"]) / max_inf) ** 0.5 for n in ns], color=color,
                        symbol=KIND_SYMBOL[kind], line=dict(width=1, color="#333"))))
    L = int(data.get("n_layers") or max((n["layer"] for n in nodes), default=0))
    tokens = data["tokens"]
    fig.update_layout(
        height=height, margin=dict(l=10, r=10, t=10, b=10), clickmode="event+select", legend=dict(orientation="h"),
        xaxis=dict(tickvals=list(range(len(tokens))), ticktext=[repr(t)[1:-1] or "␣" for t in tokens],
                   title="position", range=[-0.6, len(tokens) - 0.4]),
        yaxis=dict(tickvals=list(range(-1, L + 1)), ticktext=["embeddings"] + [f"MLP {i}" for i in range(L)]
                   + ["logits"], range=[-1.5, L + 0.5], title="layer"))
    return fig


def examples_hover(examples, n: int = 3, before: int = 4, after: int = 1) -> str:
    """Hover lines (HTML) of a latent's first ``n`` top activations (``Example``s of a latent card): each its value
    and a few tokens around the activating one, which is bracketed."""
    import html

    lines = []
    for e in examples[:n]:
        toks = e.tokens[max(0, e.pos - before): e.pos] + [f"[{e.tokens[e.pos]}]"] + e.tokens[e.pos + 1: e.pos + 1 + after]
        lines.append(f"{e.value:+.2f} " + html.escape("".join(toks).replace("\n", "⏎")))
    return "top activations:<br>" + "<br>".join(lines) if lines else ""
