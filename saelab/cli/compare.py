"""`saelab compare`: match the latents of two SAEs."""

from __future__ import annotations

from saelab.cli.common import add_command, from_args
from saelab.errors import SaelabError
from saelab.layout import hub_spec
from saelab.options import CompareOptions
from saelab.outputs import check_report, write_report, wrote

SAME_INDEX_NOTE = 0.05  # more than this fraction of A's latents matching their own index: a shared init, said so


def _describe(side) -> str:
    c = side.sae.cfg
    return f"{side.where}: {c.arch}, {side.sae.d_sae:,} latents, hook {c.hook_name or '?'}, model {c.model_name or '?'}"


def pair_lines(res: dict, a, b) -> list[str]:
    """The printed comparison of two sides (``saelab.analysis.compare.Side``) and their result."""
    from saelab.analysis.compare import LEVELS

    lines = [f"A  {_describe(a)}", f"B  {_describe(b)}"]
    ha, hb = a.sae.cfg.output_hook, b.sae.cfg.output_hook  # where the decoders write
    if ha and hb and ha != hb:
        lines.append(f"(different hooks: matching directions across {ha} and {hb})")
    if res["signed"]:
        lines.append("(a signed SAE: cosines are absolute)")
    lines.append(f"{'':8}{'latents':>9}{'MMCS':>8}{'median':>8}" + "".join(f"{'≥' + str(t):>7}" for t in LEVELS))
    for key, label in (("a_to_b", "A → B"), ("b_to_a", "B → A")):
        s = res[key]
        lines.append(f"{label:8}{s['latents']:>9,}{s['mmcs']:>8.3f}{s['median']:>8.3f}"
                     + "".join(f"{s[f'frac_{t}']:>7.1%}" for t in LEVELS))
        if "alive" in s:
            lines.append(f"{'  alive':8}{s['alive']:>9,}{s['mmcs_alive']:>8.3f}{'':>8}"
                         + "".join(f"{s[f'frac_{t}_alive']:>7.1%}" for t in LEVELS))
    ch = res["chance_mmcs"]
    lines.append(f"chance (isotropic random directions of the other's count): MMCS {ch['a_to_b']:.3f} A → B, "
                 f"{ch['b_to_a']:.3f} B → A")
    lines.append(f"mutual matches: {res['mutual']:,} pairs are each other's best match, {res['mutual_0.9']:,} of "
                 "them at cosine ≥ 0.9")
    if res["same_index"] > SAME_INDEX_NOTE * a.sae.d_sae:
        lines.append(f"note: {res['same_index']:,} of A's {a.sae.d_sae:,} latents match the latent of the same index "
                     "in B (chance: about 1): the SAEs likely started from the same init (the same --seed), and part "
                     "of this similarity is that shared start; train with different seeds to compare what they "
                     "learned")
    return lines


def universality_stores(a, b, activations, other_activations=None) -> tuple:
    """(the store side ``a`` reads, the store side ``b`` reads) for ``--universality``: ``activations`` (a store,
    or a RUN folder whose store of A's hook is taken), and ``other_activations`` (the same), by default the store
    of B's hook beside A's (one harvest run: two layers of one model). A store of another hook, width or model
    than its SAE's is a one-line error."""
    from saelab.layout import MANIFEST
    from saelab.models import same_model
    from saelab.targets import store_for_sae

    store_a = store_for_sae(a.where, a.sae, activations)
    if other_activations is None:
        run, hook = store_a.path.parent, b.sae.cfg.hook_name
        if hook and not (run / hook / MANIFEST).exists():
            raise SaelabError(f"{run} holds no store of {hook}, the hook SAE B reads: pass --other-activations with "
                              f"the store SAE B reads, row-aligned with {store_a.path}")
        other_activations = run
    store_b = store_for_sae(b.where, b.sae, other_activations)
    for name, side, store, flag in (("A", a, store_a, "--activations"), ("B", b, store_b, "--other-activations")):
        held = store.manifest.get("model")
        if held and side.model and not same_model(held, side.model):
            raise SaelabError(f"store {store.path} holds activations of {held} but SAE {name} belongs to "
                              f"{side.model}: pass {flag} with a store of {side.model}")
    return store_a, store_b


def universality_lines(u: dict) -> list[str]:
    """The printed block of a universality result (``saelab.analysis.universality.store_universality``)."""
    where = "of the held-out split" if u["split"] == "holdout" else "(the store's first)"
    return [f"universality (Lan et al. 2024), over {u['rows']:,} rows {where}:",
            f"  pairs: {u['pairs']:,} one-to-one by activation correlation, of A's {u['alive']['a']:,} live latents "
            f"({u['alive']['b']:,} live in B); mean pair correlation {u['mean_pair_corr']:.3f}",
            f"  SVCCA of the paired decoder rows: {u['svcca']:.3f} ({u['dims']['a']} and {u['dims']['b']} directions "
            f"for {u['variance_kept']:.0%} of the variance); random pairings {u['random_svcca_mean']:.3f} ± "
            f"{u['random_svcca_std']:.3f} over {u['draws']} draws; p = {u['p_value']:.3f}"]


def _universality_flags(activations, other_activations, rows) -> None:
    """Without --universality: its flags, given, are a one-line error (they would be ignored)."""
    for flag, given in (("--activations", activations is not None), ("--other-activations",
                        other_activations is not None), ("--rows", rows != CompareOptions.rows)):
        if given:
            raise SaelabError(f"{flag} applies to --universality only: add --universality, or drop {flag}")


def run_compare(sae, other, *, hook: str | None = None, other_hook: str | None = None, json_out=None,
                device: str = CompareOptions.device, force: bool = False, universality: bool = False,
                activations=None, other_activations=None, rows: int = CompareOptions.rows,
                progress: bool = False) -> tuple[dict, list[str]]:
    """(the comparison as a JSON-ready dict, the lines to print) of two SAEs; ``json_out``: also write that dict
    there (atomically; ``saelab.outputs``' policy, ``force``: replace a file it did not write). Two group folders
    without ``hook`` / ``other_hook`` are compared hook by hook over the hooks both hold (the result is then
    ``{"pairs": {hook: result}}``). ``universality``: also the universality of the two SAEs
    (``saelab.analysis.universality``) on ``activations`` / ``other_activations`` (``universality_stores``) over
    at most ``rows`` rows, under ``"universality"``; SAEs of two models or widths are then taken, and their
    decoder cosines left out. Bad input is a one-line error before the matching."""
    from saelab.analysis.compare import compare_sides, load_pair, one_model, shared_hooks
    from saelab.device import pick_device

    device = pick_device(device)  # "cuda" without CUDA: a one-line error before any loading
    if not universality:
        _universality_flags(activations, other_activations, rows)
    elif activations is None:
        raise SaelabError("--universality encodes the same tokens with both SAEs: pass --activations STORE_OR_RUN, "
                          "the store SAE A reads (and --other-activations where B's is not in its RUN folder)")
    if json_out is not None:
        json_out, replaced = check_report(json_out, "compare", flag="--json", example="compare.json",
                                          inputs=[p for p in (sae, other) if not hub_spec(p)], force=force)
    groups = shared_hooks(sae, other) if hook is None and other_hook is None else None
    if groups and universality:
        raise SaelabError("--universality compares one SAE of each side: pass --hook and --other-hook")
    if groups:
        ga, gb, common = groups
        res, lines = {"pairs": {}}, []
        for h in common:
            a, b = load_pair(ga[h], gb[h])
            res["pairs"][h] = compare_sides(a, b, device=device)
            lines += [f"== {h}", *pair_lines(res["pairs"][h], a, b)]
        skipped = [h for h in [*ga, *gb] if h not in common]
        if skipped:
            lines.append(f"(not in both groups, not compared: {', '.join(skipped)})")
    else:
        a, b = load_pair(sae, other, hook, other_hook, other_model=universality)
        if universality:  # the stores resolved and held to row alignment before any matching
            from saelab.analysis.universality import plan_rows, store_universality

            stores = universality_stores(a, b, activations, other_activations)
            plan = plan_rows(*stores, rows)
        if not universality or (one_model(a, b) and a.sae.cfg.output_dim == b.sae.cfg.output_dim):
            res = compare_sides(a, b, device=device)
            lines = pair_lines(res, a, b)
        else:  # with universality only: decoders of two models or widths share no space to take cosines in
            res = {"a": a.who(), "b": b.who()}
            lines = [f"A  {_describe(a)}", f"B  {_describe(b)}", "(two models or decoder widths: decoder cosines "
                     "are not compared, the latents are paired through their activations)"]
        if universality:
            res["universality"] = store_universality(a.sae, b.sae, *stores, plan=plan, device=device,
                                                     progress=progress)
            lines += universality_lines(res["universality"])
    if json_out is not None:
        lines.append(wrote(write_report(json_out, res, "compare", "--json"), replaced))
    return res, lines


def cmd_compare(args) -> int:
    o = from_args(CompareOptions, args)
    _, lines = run_compare(o.sae, o.other, hook=o.hook, other_hook=o.other_hook, json_out=o.json, device=o.device,
                           force=o.force, universality=o.universality, activations=o.activations,
                           other_activations=o.other_activations, rows=o.rows, progress=not o.quiet)
    print("\n".join(lines))
    return 0


def add_parser(sub) -> None:
    add_command(sub, "compare", CompareOptions, cmd_compare,
                help="match the latents of two SAEs by decoder cosine (MMCS, mutual matches)",
                description="Which latents of one SAE the other also learned: for every latent the other SAE's latent "
                            "of highest decoder cosine, summarised as MMCS, the fractions above 0.9 / 0.7 / 0.5 and "
                            "the mutual best matches (also over the latents that fired, where features.h5 exists). "
                            "Two seeds, widths, architectures, or two layers of one model's residual stream; two "
                            "group folders without hook flags: hook by hook. With --universality, also how "
                            "universal the two feature spaces are (Lan et al. 2024): latents paired by activation "
                            "correlation on the same tokens, the paired decoder rows scored by SVCCA against random "
                            "pairings; SAEs of two models too.", run_flags=False)
