"""`saelab circuit`: a sparse feature circuit of a task — the flags, the default ``--out``
(``<group>/circuits/<task>.json``), the run and the printed summary."""

from __future__ import annotations

from saelab.cli.common import add_command, from_args
from saelab.options import CircuitOptions


def cmd_circuit(args) -> int:
    from saelab.analysis.circuits import find_circuit, load_group, load_group_model, write_circuit
    from saelab.analysis.tasks import make_task
    from saelab.cli.heads import _task_files
    from saelab.layout import CIRCUITS_DIR
    from saelab.outputs import check_report, wrote

    o = from_args(CircuitOptions, args)
    group = load_group(o.saes)
    model = load_group_model(group, args.device)
    task = make_task(o.task, model, n=o.n, seed=o.seed)
    # an --out that is a folder or cannot be written is found before the work, not when writing
    out, replaced = check_report(o.out or group.path / CIRCUITS_DIR / f"{task.name}.json", "circuit",
                                 example=f"{task.name}.json", inputs=[*_task_files(o.task), *group.folders.values()],
                                 force=o.force)
    c = find_circuit(model, group, task, method=o.method, ig_steps=o.ig_steps, node_threshold=o.node_threshold,
                     edge_threshold=o.edge_threshold, progress=not args.quiet)
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
    print(wrote(path, replaced))
    return 0


def add_parser(sub) -> None:
    add_command(sub, "circuit", CircuitOptions, cmd_circuit,
                help="sparse feature circuit of a task over an SAE group",
                description="Node effects (attribution patching or integrated gradients) of every SAE latent and "
                            "error term, edges between consecutive hooks, faithfulness under mean ablation; writes a "
                            "circuit JSON file.")
