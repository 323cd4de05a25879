"""`saelab fetch`: pretrained SAEs from the hub or local folders in other layouts."""

from __future__ import annotations

from saelab.errors import SaelabError


def cmd_fetch(args) -> int:
    from saelab.hub import fetch_group, fetch_sae, list_hub_saes
    from saelab.layout import read_source

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


def add_parser(sub) -> None:
    f = sub.add_parser("fetch", help="download a pretrained SAE (SAELens, Gemma Scope, sparsify or dictionary_learning "
                                     "layout) from the "
                                     "Hugging Face hub",
                       description="Download the SAE in ORG/REPO/SUBFOLDER from the Hugging Face hub (its cache, login "
                                   "and HF_HUB_OFFLINE apply): SAELens's cfg.json + sae_weights.safetensors, Gemma "
                                   "Scope's params.npz, EleutherAI sparsify's cfg.json + sae.safetensors or "
                                   "dictionary_learning's (SAEBench's) ae.pt. saelab checks that it loads "
                                   "(converting the latter three) and writes it with source.json "
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
