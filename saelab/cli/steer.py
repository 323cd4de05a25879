"""`saelab steer`: steer the model with SAE latents."""

from __future__ import annotations


from saelab.cli.common import (add_run_flags)


def cmd_steer(args) -> int:
    from saelab.analysis.steering import run_steer

    _, lines = run_steer(args.sae, args.prompt, args.steer, hook=args.hook, sweep_values=args.sweep, model=args.model,
                         max_new_tokens=args.tokens, temperature=args.temperature, seed=args.seed, device=args.device,
                         json_out=args.json, progress=not args.quiet)
    print("\n".join(lines))
    return 0


def add_parser(sub) -> None:
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
    add_run_flags(st)
    st.set_defaults(func=cmd_steer)
