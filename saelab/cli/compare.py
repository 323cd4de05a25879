"""`saelab compare`: match the latents of two SAEs."""

from __future__ import annotations

from saelab.cli.common import add_command, from_args
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


def run_compare(sae, other, *, hook: str | None = None, other_hook: str | None = None, json_out=None,
                device: str = CompareOptions.device, force: bool = False) -> tuple[dict, list[str]]:
    """(the comparison as a JSON-ready dict, the lines to print) of two SAEs; ``json_out``: also write that dict
    there (atomically; ``saelab.outputs``' policy, ``force``: replace a file it did not write). Two group folders without ``hook`` / ``other_hook`` are compared hook by hook over the
    hooks both hold (the result is then ``{"pairs": {hook: result}}``). Bad input is a one-line error before the
    matching."""
    from saelab.analysis.compare import compare_sides, load_pair, shared_hooks
    from saelab.device import pick_device

    device = pick_device(device)  # "cuda" without CUDA: a one-line error before any loading
    if json_out is not None:
        json_out, replaced = check_report(json_out, "compare", flag="--json", example="compare.json",
                                          inputs=[p for p in (sae, other) if not hub_spec(p)], force=force)
    groups = shared_hooks(sae, other) if hook is None and other_hook is None else None
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
        a, b = load_pair(sae, other, hook, other_hook)
        res = compare_sides(a, b, device=device)
        lines = pair_lines(res, a, b)
    if json_out is not None:
        lines.append(wrote(write_report(json_out, res, "compare", "--json"), replaced))
    return res, lines


def cmd_compare(args) -> int:
    o = from_args(CompareOptions, args)
    _, lines = run_compare(o.sae, o.other, hook=o.hook, other_hook=o.other_hook, json_out=o.json, device=o.device,
                           force=o.force)
    print("\n".join(lines))
    return 0


def add_parser(sub) -> None:
    add_command(sub, "compare", CompareOptions, cmd_compare,
                help="match the latents of two SAEs by decoder cosine (MMCS, mutual matches)",
                description="Which latents of one SAE the other also learned: for every latent the other SAE's latent "
                            "of highest decoder cosine, summarised as MMCS, the fractions above 0.9 / 0.7 / 0.5 and "
                            "the mutual best matches (also over the latents that fired, where features.h5 exists). "
                            "Two seeds, widths, architectures, or two layers of one model's residual stream; two "
                            "group folders without hook flags: hook by hook.", run_flags=False)
