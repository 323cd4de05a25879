"""`saelab compare`: match the latents of two SAEs."""

from __future__ import annotations




def cmd_compare(args) -> int:
    from saelab.analysis.compare import run_compare

    _, lines = run_compare(args.sae, args.other, hook=args.hook, other_hook=args.other_hook, json_out=args.json,
                           device=args.device)
    print("\n".join(lines))
    return 0


def add_parser(sub) -> None:
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
