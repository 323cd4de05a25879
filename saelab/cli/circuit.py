"""`saelab circuit`: a sparse feature circuit of a task — the flags, the default ``--out``
(``<group>/circuits/<task>.json``), the run and the printed summary."""

from __future__ import annotations

from saelab.cli.common import add_run_flags


def cmd_circuit(args) -> int:
    from saelab.analysis.circuits import find_circuit, load_group, load_group_model, write_circuit
    from saelab.analysis.tasks import make_task
    from saelab.fs import check_output
    from saelab.layout import CIRCUITS_DIR

    group = load_group(args.saes)
    model = load_group_model(group, args.device)
    task = make_task(args.task, model, n=args.n, seed=args.seed)
    # an --out that is a folder or cannot be written is found before the work, not when writing
    out = check_output(args.out or group.path / CIRCUITS_DIR / f"{task.name}.json", "--out", f"{task.name}.json")
    c = find_circuit(model, group, task, method=args.method, ig_steps=args.ig_steps,
                     node_threshold=args.node_threshold, edge_threshold=args.edge_threshold, progress=not args.quiet)
    replaced = out.is_file()
    path = write_circuit(c, out)
    f, mv = c["faithfulness"], c["metric_values"]
    n_lat = sum(1 for x in c["nodes"] if x["kind"] == "latent")
    acc = c["task"]["accuracy"]
    print(f"task {c['task']['name']} ({c['task']['n_examples']} examples, the model right on {100 * acc:.1f}%), "
          f"method {c['method']}: logit diff full {mv['full']:.3f}, all mean-ablated {mv['empty']:.3f}, "
          f"circuit {mv['circuit']:.3f}")
    if acc < 0.5 or mv["full"] <= 0:
        print(f"note: the model prefers the wrong answer on {100 * (1 - acc):.1f}% of these prompts (mean logit "
              f"diff {mv['full']:.3f}): a circuit of a task the model does not do says little; pick a task it solves")

    def count(n, what):
        return f"{n} {what}{'s' * (n != 1)}"

    print(f"faithfulness = {f['nodes']:.3f} (nodes), {f['edges']:.3f} (edges) with {count(len(c['nodes']), 'node')} "
          f"({count(n_lat, 'latent')} = {100 * c['latent_fraction']:.2f}% of {c['n_latents_total']}, "
          f"{count(len(c['nodes']) - n_lat, 'error node')}) and {count(len(c['edges']), 'edge')} "
          f"(node threshold {c['node_threshold']}, edge threshold {c['edge_threshold']})")
    print(f"wrote {path}" + (" (replaced the existing file)" if replaced else ""))
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("circuit", help="sparse feature circuit of a task over an SAE group",
                       description="Node effects (attribution patching or integrated gradients) of every SAE latent "
                                   "and error term, edges between consecutive hooks, faithfulness under mean "
                                   "ablation; writes a circuit JSON file.")
    c.add_argument("--task", required=True, help="induction, ioi, names, or a .jsonl file of "
                                                 '{"clean", "corrupted", "answer", "wrong"} lines')
    c.add_argument("--saes", "--sae", dest="saes", required=True,
                   help="an SAE group folder (runs/GROUP with group.json) or one SAE folder")
    c.add_argument("--out", default=None, help="circuit file (default: <saes>/circuits/<task>.json); an existing "
                                               "file is replaced (atomically), and the output says so")
    c.add_argument("--method", choices=["attrib", "ig"], default="attrib",
                   help="attribution patching (one backward pass) or integrated gradients (default: attrib)")
    c.add_argument("--ig-steps", type=int, default=10, help="integrated-gradient steps (default: 10)")
    c.add_argument("--node-threshold", type=float, default=0.1,
                   help="keep nodes with |effect| above this, in logit-difference units (default: 0.1)")
    c.add_argument("--edge-threshold", type=float, default=0.01,
                   help="keep edges with |weight| at least this (default: 0.01)")
    c.add_argument("--n", type=int, default=64, help="task examples (default: 64)")
    c.add_argument("--seed", type=int, default=0, help="task sampling seed (default: 0)")
    add_run_flags(c)
    c.set_defaults(func=cmd_circuit)
