"""`saelab eval`: the evaluation suites (core: reconstruction and, with --model, CE-loss recovered and KL; truth;
stability) of an SAE or each SAE of a group."""

from __future__ import annotations

from saelab.cli.common import add_command, eval_line, from_args, suite_table
from saelab.options import EvalOptions


def _against(against: list[str], folders: list) -> dict:
    """{SAE folder: [the --against SAEs it is compared with]}: with a group as --sae, each --against is a group
    whose SAE of the same hook is taken."""
    from saelab.errors import SaelabError
    from saelab.layout import read_sae_cfg, sae_identity
    from saelab.targets import sae_folders

    if len(folders) == 1:
        return {folders[0]: list(against)}

    def by_hook(paths):
        return {sae_identity(read_sae_cfg(p), p)["hook"]: p for p in paths}

    mine, theirs = by_hook(folders), [by_hook(sae_folders(a)) for a in against]
    out = {}
    for hook, folder in mine.items():
        missing = [a for a, t in zip(against, theirs) if hook not in t]
        if missing:
            raise SaelabError(f"--against {missing[0]} has no SAE of hook {hook}: pass groups of the same hooks")
        out[folder] = [t[hook] for t in theirs]
    return out


def _short(scores: dict) -> dict:
    """Probing's accuracies under short column names ("raw", "raw top 5", "sae", "sae top 5"), in that order."""
    out = {}
    for who, name in (("llm", "raw"), ("sae", "sae")):
        out[name] = scores[f"{who}_test_accuracy"]
        out.update({f"{name} top {k}": scores[f"{who}_top_{k}_test_accuracy"] for k in _ks(scores)})
    return out


def _ks(scores: dict) -> list[int]:
    return sorted(int(k.split("_")[2]) for k in scores if k.startswith("sae_top_") and k.endswith("_test_accuracy"))


def cmd_eval(args) -> int:
    from saelab.evaluate import evaluate
    from saelab.suites import parse_suites
    from saelab.targets import sae_folders

    o = from_args(EvalOptions, args)
    suites = parse_suites(o.suite)
    folders = sae_folders(o.sae)  # a group folder: each of its SAEs, spliced into one loaded model
    against = _against(o.against, folders) if "stability" in suites else {f: [] for f in folders}
    model = None
    judge = None
    if "autointerp" in suites and o.explainer == "openai":  # a missing client or model: refused before any pass
        from saelab.suites.judges import OpenAIJudge

        judge = OpenAIJudge(o.openai_model, o.openai_url, o.openai_key, o.openai_timeout)
    if o.model and len(folders) > 1 and {"core", "absorption", "probing", "autointerp"} & set(suites):
        from saelab.device import pick_device
        from saelab.models import load_model

        model = load_model(o.model, str(pick_device(args.device)))
    tables: dict[str, list] = {s: [] for s in suites if s != "core"}
    probes = [(d, o.probe_text_column, o.probe_label_column) for d in o.probe_dataset]
    for folder in folders:
        ev = evaluate(folder, o.activations, o.model, n_contexts=o.contexts, device=args.device,
                      progress=not args.quiet, model=model, suites=suites, against=against[folder],
                      probe_datasets=probes, judge=judge, autointerp_latents=o.autointerp_latents,
                      absorption_words=o.absorption_words, absorption_min_f1=o.absorption_min_f1)
        if "core" in suites:
            print(f"{folder}: {eval_line(ev)}")
        for s in tables:
            tables[s].append((str(folder), ev[s]))
    for s, rows in tables.items():
        print(f"\n{s}:\n{suite_table([(n, _short(r)) for n, r in rows] if s == 'probing' else rows)}")
        if s == "probing":  # each task's, under the means
            per_task = [(f"{name} {task}", _short(v)) for name, r in rows for task, v in r["tasks"].items()]
            print(f"\nprobing, per task:\n{suite_table(per_task)}")
    return 0


def add_parser(sub) -> None:
    add_command(sub, "eval", EvalOptions, cmd_eval,
                help="evaluation suites: FVU, L0, dead/dense latents, CE-loss recovered and KL (core); planted-"
                     "feature recovery (truth); absorption; k-sparse probing; autointerp; seed stability (stability)",
                description="Evaluate an SAE (each SAE of a group folder) and write the scores into its eval.json: "
                            "core (reconstruction over the store's held-out rows; with --model, the SAE spliced into "
                            "the model for CE-loss recovered and KL), truth (a synthetic store's planted features "
                            "recovered: MCC, precision/recall), absorption (first-letter feature absorption, "
                            "SAEBench's protocol), probing (k-sparse probes), autointerp (latents explained and "
                            "scored), stability (decoders matched against --against SAEs "
                            "of other seeds).")
