"""The ``saelab`` command line: thin wrappers that parse, call the library, and report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from saelab import SaelabError, __version__
from saelab.config import HarvestConfig, SAEConfig, TrainConfig, add_arguments, from_args


def _summary(stores: dict) -> str:
    from saelab.store import ActivationStore

    lines = []
    for hook, path in stores.items():
        s = ActivationStore(path, verify=False)
        size = sum((path / sh["file"]).stat().st_size for sh in s.shards)
        lines.append(f"  {path}: {s.n_rows('all'):,} rows × d_in {s.d_in} ({s.manifest['dtype']}), "
                     f"{len(s.shards)} shards ({len(s.manifest['holdout_shards'])} held out), {size / 2**20:.1f} MiB")
    return "\n".join(lines)


def cmd_harvest(args) -> int:
    from saelab import distributed
    from saelab.harvest import harvest

    cfg = from_args(HarvestConfig, args)
    with distributed.session(cfg.device, args.dist_timeout, "the harvest"):
        stores = harvest(cfg, resume=args.resume, progress=not args.quiet)
        if not distributed.is_main():
            return 0
    print(f"wrote {len(stores)} store{'s' if len(stores) != 1 else ''}:\n" + _summary(stores))
    return 0


def _eval_line(ev: dict) -> str:
    parts = [f"FVU {ev['fvu']:.3f}", f"L0 {ev['l0']:.1f}", f"dead {100 * ev['dead_frac']:.1f}%",
             f"dense {100 * ev['dense_frac']:.1f}%"]
    if "ce_loss_recovered" in ev:
        parts += [f"CE clean {ev['ce_clean']:.3f} / SAE {ev['ce_sae']:.3f} / zero-ablated {ev['ce_zero_ablation']:.3f}",
                  f"CE-loss recovered {ev['ce_loss_recovered']:.3f}", f"KL {ev['kl']:.4f}"]
        if "ce_contexts" in ev:  # written by saelab eval (train's own eval.json predates it)
            n, asked = ev["ce_contexts"], ev.get("ce_contexts_asked")
            split = "training" if ev.get("ce_split") == "train" else "held-out"
            parts[-1] += (f" (over {n} {split} context{'s' * (n != 1)}"
                          + (f": --contexts {asked} asked, the store has no more" if asked else "") + ")")
    return ", ".join(parts)


def cmd_train(args) -> int:
    from saelab import distributed
    from saelab.config import check_sae_flags
    from saelab.train import train

    check_sae_flags(args)
    tcfg, scfg = from_args(TrainConfig, args), from_args(SAEConfig, args)
    with distributed.session(tcfg.device, args.dist_timeout, "training"):
        folders = train(tcfg, scfg, resume=args.resume, progress=not args.quiet)
        if not distributed.is_main():
            return 0
    for hook, folder in folders.items():
        ev = json.loads((folder / "eval.json").read_text())
        print(f"{folder}: {hook}: {_eval_line(ev)} ({ev.get('epochs', 0):.2f} epochs of the store)")
    return 0


def cmd_eval(args) -> int:
    from saelab.analysis.features import sae_folders
    from saelab.evaluate import evaluate

    folders = sae_folders(args.sae)  # a group folder: each of its SAEs, spliced into one loaded model
    model = None
    if args.model and len(folders) > 1:
        from saelab.models import load_model
        from saelab.train import pick_device

        model = load_model(args.model, str(pick_device(args.device)))
    for folder in folders:
        ev = evaluate(folder, args.activations, args.model, n_contexts=args.contexts, device=args.device,
                      progress=not args.quiet, model=model)
        print(f"{folder}: {_eval_line(ev)}")
    return 0


def cmd_synthetic(args) -> int:
    from saelab.synthetic import SyntheticConfig, write_synthetic

    cfg = from_args(SyntheticConfig, args)
    path = write_synthetic(cfg, progress=not args.quiet)
    print("wrote a planted-feature store:\n" + _summary({"synthetic": path}))
    return 0


def cmd_analyze(args) -> int:
    import numpy as np

    from saelab.analysis.features import FeatureDB, analyze, sae_folders

    for folder in sae_folders(args.sae):
        path = analyze(folder, args.activations, tokens=args.tokens, top=args.top, device=args.device,
                       progress=not args.quiet)
        with FeatureDB(folder) as db:
            alive = db.density > 0
            med = float(np.median(db.density[alive])) if alive.any() else 0.0
            print(f"wrote {path}: {db.hook}, {db.n_rows:,} rows, {int(alive.sum()):,} of {db.d_sae:,} latents alive "
                  f"({100 * alive.mean():.1f}%), median density of the alive {med:.2e}")
    return 0


def cmd_export(args) -> int:
    from saelab.app.export import export_html

    out, n = export_html(args.sae, args.out, latents=args.latents, sample=args.sample, seed=args.seed,
                         progress=not args.quiet, max_cards=args.max_cards)
    size = out.stat().st_size
    shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"
    print(f"wrote {out}: {n} latent card{'s' * (n != 1)}, {shown} (open it in any browser)")
    return 0


def cmd_compare(args) -> int:
    from saelab.analysis.compare import run_compare

    _, lines = run_compare(args.sae, args.other, hook=args.hook, other_hook=args.other_hook, json_out=args.json,
                           device=args.device)
    print("\n".join(lines))
    return 0


def cmd_steer(args) -> int:
    from saelab.analysis.steering import run_steer

    _, lines = run_steer(args.sae, args.prompt, args.steer, hook=args.hook, sweep_values=args.sweep, model=args.model,
                         max_new_tokens=args.tokens, temperature=args.temperature, seed=args.seed, device=args.device,
                         json_out=args.json, progress=not args.quiet)
    print("\n".join(lines))
    return 0


def cmd_fetch(args) -> int:
    from saelab.config import read_source
    from saelab.hub import fetch_group, fetch_sae, list_hub_saes

    if args.list:
        for repo in args.sae:
            folders, online = list_hub_saes(repo, revision=args.revision)
            print(f"{repo}: {len(folders)} SAE folder{'s' * (len(folders) != 1)}"
                  + ("" if online else " in the local cache (offline: only what was downloaded before)"))
            for f in folders:
                print(f"  {f}")
        return 0
    if len(args.sae) == 1:
        out, sae, fetched = fetch_sae(args.sae[0], args.out, revision=args.revision, progress=not args.quiet,
                                      model=args.model, hook=args.hook)
        saes = {sae.cfg.hook_name: (out, sae)}
    else:
        if args.hook is not None:
            raise SaelabError("--hook names one SAE's hook: fetch several SAEs without it (a group holds one per "
                              "hook), or fetch each alone with its --hook")
        out, by_hook, fetched = fetch_group(args.sae, args.out, revision=args.revision, progress=not args.quiet,
                                            model=args.model)
        saes = {h: (out / h, sae) for h, sae in by_hook.items()}
    print(f"{'fetched' if fetched else 'already fetched'} into {out}:")
    for hook, (folder, sae) in saes.items():
        c = sae.cfg
        linked = (read_source(folder) or {}).get("weights")  # weights hard-linked to the hub cache: say so
        print(f"  {folder}: {c.arch}, d_in {sae.d_in}, {sae.d_sae:,} latents, hook {hook or '?'}, "
              f"model {c.model_name or '?'}" + (f" (weights {linked})" if linked else ""))
    hooks = [h for h in saes if h]
    if hooks:
        model = next(iter(saes.values()))[1].cfg.model_name or "MODEL"
        print(f"next: saelab harvest --model {model} {' '.join('--hook ' + h for h in hooks)} "
              f"--out activations/{out.name}\n"
              f"      saelab analyze --sae {out} --activations activations/{out.name}"
              + (f"\n      saelab circuit --task induction --saes {out}" if len(saes) > 1 else ""))
    return 0


def cmd_demo(args) -> int:
    from saelab.config import GROUP_FILE
    from saelab.demo import DEMO_HOOKS, DEMO_K, demo_root, ensure_group
    from saelab.evaluate import evaluate

    for flag, v in (("--tokens", args.tokens), ("--train-tokens", args.train_tokens)):
        if v is not None and v < 1:  # checked before harvesting (a bad --train-tokens failed after it, naming --tokens)
            raise SaelabError(f"{flag} must be positive (got {v})")
    root = demo_root(args.dir)
    finished = (root / "runs" / "demo" / GROUP_FILE).is_file()
    if finished:
        print(f"demo: reusing the finished demo in {root} ({root / 'activations/demo'}, {root / 'runs/demo'}; "
              "delete them to build it again)")
    else:
        print(f"demo: harvesting {', '.join(DEMO_HOOKS)} from the bundled tiny model on the bundled corpus, then "
              f"training one TopK SAE (k={DEMO_K}) per hook → {root / 'activations/demo'}, {root / 'runs/demo'} "
              "(an interrupted demo resumes)")
    demo = ensure_group(root, tokens=args.tokens, train_tokens=args.train_tokens, progress=not args.quiet)
    print(f"{'the' if finished else 'wrote'} {len(demo.stores)} stores:\n" + _summary(demo.stores))
    for hook, folder in demo.saes.items():
        ev = evaluate(folder, str(demo.stores[hook]), "tiny", progress=not args.quiet)
        print(f"{folder}: {_eval_line(ev)}")
    print(f"SAE group: {demo.group}")
    return _demo_open_app(args, demo.group)


def _app_argv(sae: str, port: int, host: str) -> list[str]:
    """The `streamlit run` command line for the app (fileWatcherType none: watching the venv overflows inotify)."""
    from saelab.app import HOME

    return [sys.executable, "-m", "streamlit", "run", str(HOME), "--server.headless", "true",
            "--server.fileWatcherType", "none", "--server.address", host, "--server.port", str(port),
            "--browser.gatherUsageStats", "false", "--", "--sae", sae]


def _check_port(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except socket.gaierror as e:
            raise SaelabError(f"cannot serve on {host}:{port} ({e.strerror or e}): pass a valid --host, e.g. "
                              "127.0.0.1") from None
        except OSError as e:
            raise SaelabError(f"cannot serve on {host}:{port} ({e.strerror or e}): pass a free --port") from None


def cmd_app(args) -> int:
    from saelab.app import ENV_VAR, resolve_target

    try:
        import streamlit  # noqa: F401
        import plotly  # noqa: F401
    except ImportError:
        raise SaelabError("the app needs streamlit and plotly: pip install 'saelab[app]'") from None
    target = resolve_target(args.sae)
    if not 0 < args.port < 65536:
        raise SaelabError(f"--port {args.port} is not a TCP port: pass 1..65535")
    _check_port(args.host, args.port)
    argv = _app_argv(str(target.path), args.port, args.host)
    print(f"saelab app: {target.path} on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    os.environ[ENV_VAR] = str(target.path)
    os.execv(sys.executable, argv)  # this process becomes the server: its PID stops it


def _demo_open_app(args, group) -> int:
    """Open the app on the demo group, unless --no-app, $CI, or no terminal (then say how)."""
    cmd = f"saelab app --sae {group}"
    if args.no_app or os.environ.get("CI") or not (sys.stdin.isatty() and sys.stdout.isatty()):
        print(f"open the app with: {cmd}")
        return 0
    print(f"opening the app: {cmd}")
    args.sae, args.port, args.host = str(group), 8501, "127.0.0.1"
    return cmd_app(args)


def cmd_heads(args) -> int:
    from saelab.analysis.heads import run_heads

    _, lines = run_heads(args.task, model=args.model, n=args.n, top=args.top, compare_ablation=args.compare_ablation,
                         ablation_positions=args.ablation_positions, out=args.out, seed=args.seed,
                         position=args.position, device=args.device, progress=not args.quiet, repeats=args.repeats,
                         threads=args.threads or None)
    print("\n".join(lines))
    return 0


def cmd_circuit(args) -> int:
    from saelab.analysis.circuits import circuit

    replaced = []
    path, c = circuit(args.task, args.saes, args.out, method=args.method, ig_steps=args.ig_steps,
                      node_threshold=args.node_threshold, edge_threshold=args.edge_threshold, n=args.n,
                      seed=args.seed, device=args.device, progress=not args.quiet,
                      before_write=lambda p: replaced.append(p.is_file()))
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
    print(f"wrote {path}" + (" (replaced the existing file)" if any(replaced) else ""))
    return 0


def _add_run_flags(p, device: bool = True) -> None:
    """The flags every long-running subcommand shares: --device (unless the config has it) and --quiet."""
    if device:
        p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_distributed_arguments(p) -> None:
    p.add_argument("--nproc", type=int, default=None,
                   help="run as N processes: execs `python -m torch.distributed.run --standalone "
                        "--nproc_per_node N -m saelab ...` (or launch with torchrun yourself)")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="under torchrun: seconds a collective may wait for the other ranks before the run stops "
                        "(default: $SAELAB_DIST_TIMEOUT, else 300)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saelab", description="Sparse autoencoder workbench.")
    p.add_argument("--version", action="version", version=f"saelab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    h = sub.add_parser("harvest", help="record hook activations of a model into HDF5 stores",
                       description="Record activations at TransformerLens hooks into activations/RUN/<hook>/.")
    add_arguments(h, HarvestConfig)
    h.add_argument("--resume", action="store_true", help="continue an interrupted harvest in --out")
    _add_run_flags(h, device=False)
    _add_distributed_arguments(h)
    h.set_defaults(func=cmd_harvest)

    t = sub.add_parser("train", help="train SAEs on an activation store (one per hook of a RUN folder)",
                       description="Train sparse autoencoders on stored activations.")
    add_arguments(t, TrainConfig)
    add_arguments(t, SAEConfig)
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    _add_run_flags(t, device=False)
    _add_distributed_arguments(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="FVU, L0, dead/dense latents; with --model, CE-loss recovered and KL",
                       description="Reconstruction metrics of an SAE over its store's held-out rows; with --model, the "
                                   "SAE spliced into the model for CE-loss recovered and KL. Writes eval.json into the "
                                   "SAE folder (each SAE of a group folder).")
    e.add_argument("--sae", required=True, help="an SAE folder (saelab or SAELens) or a group folder (group.json)")
    e.add_argument("--activations", default=None, help="store or RUN folder (default: the one it was trained on)")
    e.add_argument("--model", default=None, help="splice the SAE into this model for CE metrics (e.g. tiny)")
    e.add_argument("--contexts", type=int, default=64, help="held-out contexts for the CE metrics (default: 64)")
    _add_run_flags(e)
    e.set_defaults(func=cmd_eval)

    from saelab.synthetic import SyntheticConfig

    y = sub.add_parser("synthetic", help="write a planted-feature store (known ground truth)",
                       description="Write sparse combinations of planted directions as an ordinary store.")
    add_arguments(y, SyntheticConfig)
    _add_run_flags(y, device=False)
    y.set_defaults(func=cmd_synthetic)

    a = sub.add_parser("analyze", help="feature database: density, top/quantile examples, logit effects -> features.h5",
                       description="One streaming pass over a store through an SAE; writes features.h5 into the SAE "
                                   "folder (each SAE of a group folder).")
    a.add_argument("--sae", required=True, help="an SAE folder (saelab or SAELens) or a group folder (group.json)")
    a.add_argument("--activations", default=None,
                   help="store or RUN folder (default: the store each SAE was trained on, from its train.json)")
    a.add_argument("--tokens", type=int, default=None, help="analyse only the first N rows (default: the whole store)")
    a.add_argument("--top", type=int, default=20, help="top-activating examples kept per latent (default: 20)")
    _add_run_flags(a)
    a.set_defaults(func=cmd_analyze)

    st = sub.add_parser("steer", help="steer the model with SAE latents: clean vs steered continuation and metrics",
                        description="Add a multiple of latents' decoder rows at the SAE's hook (add), set latents to "
                                    "a value (clamp) or to zero (ablate) on every position; print the clean and "
                                    "steered continuations, KL, the logit shift of the tokens the latents promote, "
                                    "fluency and the next-token probability changes (--sweep: one row per "
                                    "coefficient).")
    st.add_argument("--sae", required=True,
                    help="an SAE folder, a group folder with --hook, or a hub SAE hf://ORG/REPO/SUBFOLDER")
    st.add_argument("--prompt", required=True, help="the text to continue")
    st.add_argument("--steer", action="append", default=[], metavar="LATENT:MODE[:VALUE]",
                    help="e.g. 401:add:5, 401:clamp:2.5, 401:ablate; repeat for several latents")
    st.add_argument("--sweep", default=None, metavar="C1,C2,...",
                    help="one --steer LATENT:add (or :clamp) at each of these values, e.g. 0,2,5,10,20")
    st.add_argument("--hook", default=None, help="which SAE of a group folder")
    st.add_argument("--model", default=None, help="the model to steer (default: the one the SAE names)")
    st.add_argument("--tokens", type=int, default=30, help="new tokens to generate (default: 30)")
    st.add_argument("--temperature", type=float, default=None,
                    help="sampling temperature, 0 = greedy (default: 1.0; 0 with --sweep)")
    st.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both runs (default: 0)")
    st.add_argument("--json", default=None, help="also write the result as JSON to this file")
    _add_run_flags(st)
    st.set_defaults(func=cmd_steer)

    x = sub.add_parser("export", help="latent cards as one self-contained HTML file (no server needed)",
                       description="Write the feature cards of chosen latents (default: a random sample of the alive "
                                   "ones) from features.h5 into one HTML file that any browser opens offline.")
    x.add_argument("--sae", required=True, help="an analysed SAE folder, or a group folder (every SAE in it)")
    x.add_argument("--out", required=True, help="the HTML file to write, e.g. cards.html")
    x.add_argument("--latents", default=None, help="latent ids and ranges, e.g. 3,17,100-120 (default: --sample)")
    x.add_argument("--sample", type=int, default=50,
                   help="without --latents: this many random latents that fired, per SAE (default: 50)")
    x.add_argument("--seed", type=int, default=0, help="seed of the sample (default: 0)")
    x.add_argument("--max-cards", type=int, default=None,
                   help="refuse to write more cards than this in all (each is tens of KiB of HTML) (default: 2000)")
    _add_run_flags(x, device=False)
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("compare", help="match the latents of two SAEs by decoder cosine (MMCS, mutual matches)",
                       description="Which latents of one SAE the other also learned: for every latent the other "
                                   "SAE's latent of highest decoder cosine, summarised as MMCS, the fractions above "
                                   "0.9 / 0.7 / 0.5 and the mutual best matches (also over the latents that fired, "
                                   "where features.h5 exists). Two seeds, widths, architectures, or two layers of one "
                                   "model's residual stream; two group folders without hook flags: hook by hook.")
    c.add_argument("--sae", required=True, help="SAE A: an SAE folder, a group folder (with --hook), or "
                                                "hf://ORG/REPO/SUBFOLDER")
    c.add_argument("--other", required=True, help="SAE B, as --sae (a group with --other-hook)")
    c.add_argument("--hook", default=None, help="with a group folder as --sae: the hook whose SAE is A")
    c.add_argument("--other-hook", default=None, help="with a group folder as --other: the hook whose SAE is B")
    c.add_argument("--json", default=None, help="also write the summary and every latent's match to this file")
    c.add_argument("--device", default="auto", help="where the cosines are computed: cpu, cuda or auto")
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("demo", help="run the pipeline on the bundled tiny model and corpus",
                       description="Harvest the tiny model, train one TopK SAE per residual hook (a group), "
                                   "evaluate them. Re-running reuses what is finished.")
    d.add_argument("--dir", default=None, help="where activations/demo and runs/demo go "
                                               "(default: $SAELAB_DEMO_DIR, else the current folder)")
    d.add_argument("--tokens", type=int, default=None, help="tokens to harvest (default: the whole corpus)")
    d.add_argument("--train-tokens", type=int, default=2_000_000, help="SAE training tokens per hook (default: 2M)")
    d.add_argument("--no-app", action="store_true", help="never open the browser (also implied by CI or no terminal)")
    _add_run_flags(d, device=False)
    d.set_defaults(func=cmd_demo)

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
    _add_run_flags(c)
    c.set_defaults(func=cmd_circuit)

    ap = sub.add_parser("app", help="open the feature browser / steering / circuits app (Streamlit)",
                        description="Serve the Streamlit app on an SAE folder or a group folder.")
    ap.add_argument("--sae", required=True, help="an SAE folder or a group folder (runs/NAME_OR_GROUP)")
    ap.add_argument("--port", type=int, default=8501, help="port to serve on (default: 8501)")
    ap.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    ap.set_defaults(func=cmd_app)

    hd = sub.add_parser("heads", help="rank attention heads by discrete SAE codes unique to a task's positive examples",
                        description="Discrete-code head identification (O'Neill & Bui 2024): one small SAE per head "
                                    "on its hook_z output over n clean (positive) and n corrupted (negative) prompts; "
                                    "heads ranked by the codes seen only on positives. --compare-ablation also runs "
                                    "the per-head ablation sweep and compares rankings and run times.")
    hd.add_argument("--task", required=True, help="induction, ioi, names, or a .jsonl file of "
                                                  "{clean, corrupted, answer, wrong} lines")
    hd.add_argument("--model", default="tiny", help="tiny (bundled), a local Hugging Face folder or a hub name")
    hd.add_argument("--n", type=int, default=8, help="positive examples (as many negatives) (default: 8)")
    hd.add_argument("--top", type=int, default=3, help="heads to print and to score precision/recall at (default: 3)")
    hd.add_argument("--position", choices=["last", "mean"], default="last",
                    help="which hook_z the codes read: the last position (default) or the mean over positions")
    hd.add_argument("--compare-ablation", action="store_true",
                    help="also mean-ablate each head and report precision/recall@top and both run times")
    hd.add_argument("--ablation-positions", choices=["all", "last"], default="all",
                    help="ablate each head at every position (default) or only at the last one")
    hd.add_argument("--repeats", type=int, default=5,
                    help="with --compare-ablation: run both methods this many times, alternated, and report the "
                         "median times (default: 5)")
    hd.add_argument("--threads", type=int, default=1,
                    help="torch threads (with --compare-ablation: for both methods alike); 0 keeps torch's default "
                         "(default: 1, faster for these small forwards on a shared CPU)")
    hd.add_argument("--seed", type=int, default=0, help="task and SAE seed (default: 0)")
    hd.add_argument("--out", default=None, help="write the rankings, timings and comparison to this JSON file "
                                                "(an existing file is replaced, atomically, and the output says so)")
    _add_run_flags(hd)
    hd.set_defaults(func=cmd_heads)
    f = sub.add_parser("fetch", help="download a pretrained SAE (SAELens, Gemma Scope or sparsify layout) from the "
                                     "Hugging Face hub",
                       description="Download the SAE in ORG/REPO/SUBFOLDER from the Hugging Face hub (its cache, login "
                                   "and HF_HUB_OFFLINE apply): SAELens's cfg.json + sae_weights.safetensors, Gemma "
                                   "Scope's params.npz or EleutherAI sparsify's cfg.json + sae.safetensors. saelab "
                                   "checks that it loads (converting the latter two) and writes it with source.json "
                                   "into --out: an SAE folder for analyze, eval, the app and steering.")
    f.add_argument("sae", nargs="+", help="ORG/REPO/SUBFOLDER, e.g. jbloom/GPT2-Small-SAEs-Reformatted/"
                                          "blocks.8.hook_resid_pre or google/gemma-scope-2b-pt-res/layer_20/width_16k/"
                                          "average_l0_71, or a local folder in one of these layouts (an existing "
                                          "folder wins over a hub spec of the same name); several (one model, one "
                                          "per hook) make a group")
    f.add_argument("--out", default=None, help="the SAE folder to write (default: runs/<repo name>/<subfolder>), or "
                                               "with several SAEs the group folder (required); rerunning into a "
                                               "folder that holds the same SAEs does nothing")
    f.add_argument("--revision", default=None, help="branch, tag or commit (default: the repo's main)")
    f.add_argument("--model", default=None, help="record this model instead of the one the SAE names (for SAEs "
                                                 "that name none, e.g. a sparsify run without its config.json)")
    f.add_argument("--hook", default=None, help="record this TransformerLens hook instead of the one the SAE names "
                                                "(one SAE only)")
    f.add_argument("--list", action="store_true", help="list the SAE folders (in any of those layouts) of each "
                                                       "ORG/REPO (or local folder) instead of fetching")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_fetch)

    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "nproc", None) is not None and args.nproc < 1:
            raise SaelabError(f"--nproc {args.nproc}: pass 1 or more processes (or leave it out for one)")
        if (getattr(args, "nproc", None) or 1) > 1 and not os.environ.get("WORLD_SIZE"):
            from saelab import distributed

            distributed.exec_torchrun(args.nproc, distributed.strip_nproc(sys.argv[1:] if argv is None else argv))
        return args.func(args)
    except SaelabError as e:
        print(f"saelab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saelab: interrupted" + (" (resume with --resume)" if hasattr(args, "resume") else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
