"""`saelab attribute`: the attribution graph of a prompt over MLP transcoders — the flags, the default ``--out``
(``<group>/graphs/<the prompt's first words>.json``), the run and the printed summary."""

from __future__ import annotations

import re

from saelab.cli.common import add_command, from_args
from saelab.layout import GRAPHS_DIR
from saelab.options import AttributeOptions


def _slug(prompt: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", prompt)[:6]
    return "_".join(words).lower()[:60] or "graph"


def cmd_attribute(args) -> int:
    from saelab.analysis.graphs import attribute, load_transcoders, write_graph
    from saelab.device import pick_device
    from saelab.models import load_model
    from saelab.outputs import check_report, wrote

    o = from_args(AttributeOptions, args)
    device = pick_device(args.device)
    tc = load_transcoders(o.sae, device)
    out, replaced = check_report(o.out or tc.path / GRAPHS_DIR / f"{_slug(o.prompt)}.json", "attribute",
                                 example="graph.json", inputs=list(tc.folders.values()), force=o.force)
    model = load_model(tc.model, device)
    g, p, sc, data = attribute(model, tc, o.prompt, node_threshold=o.node_threshold, edge_threshold=o.edge_threshold,
                               max_logits=o.max_logits, logit_prob=o.logit_prob, batch_size=o.batch_size,
                               max_features=o.max_features, progress=not args.quiet)
    path = write_graph(data, out)
    kinds = [n["kind"] for n in data["nodes"]]
    top = ", ".join(f"{n['token']!r} {n['prob']:.2f}" for n in data["nodes"] if n["kind"] == "logit")
    n_feat = sum(1 for n in g.nodes if n["kind"] == "feature")
    print(f"{len(g.tokens)} tokens, {n_feat} active features over {len(tc.coders)} transcoder(s); next token: {top}")
    print(f"kept {len(data['nodes'])} of {len(g.nodes)} nodes ({kinds.count('feature')} features, "
          f"{kinds.count('error')} error nodes) and {len(data['edges'])} of {data['n_edges_total']} edges "
          f"(node threshold {o.node_threshold}, edge threshold {o.edge_threshold}); replacement score "
          f"{sc['replacement']:.3f}, completeness {sc['completeness']:.3f}")
    print(wrote(path, replaced))
    return 0


def add_parser(sub) -> None:
    add_command(sub, "attribute", AttributeOptions, cmd_attribute,
                help="attribution graph of a prompt over MLP transcoders or a cross-layer transcoder",
                description="The local replacement model of the prompt (attention patterns and LayerNorm scales "
                            "frozen, each MLP replaced by its transcoder, or by what a cross-layer transcoder writes "
                            "there, plus an error node): the direct effects between active features, error nodes, "
                            "token embeddings and the top logits, pruned by influence; writes a graph JSON file.")
