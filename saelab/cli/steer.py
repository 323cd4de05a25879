"""`saelab steer`: steer the model with SAE latents."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from saelab.cli.common import add_command, from_args
from saelab.errors import SaelabError
from saelab.layout import hub_spec
from saelab.options import SteerOptions
from saelab.outputs import check_report, write_report, wrote
from saelab.targets import pick_sae


def parse_intervention(spec: str, value_needed: bool = True):
    """``"401:add:5"``, ``"401:clamp:2.5"``, ``"401:ablate"`` (``saelab steer --steer``) → Intervention. Without
    ``value_needed`` (a sweep gives the values) ``"401"`` and ``"401:add"`` are enough."""
    from saelab.analysis.steering import MODES, Intervention

    parts = str(spec).strip().split(":")
    example = "e.g. 401:add:5, 401:clamp:2.5 or 401:ablate"
    if not parts[0].strip().isdigit() or len(parts) > 3:
        raise SaelabError(f"--steer {spec!r}: write LATENT:MODE:VALUE, {example}")
    mode = parts[1].strip().lower() if len(parts) > 1 else "add"
    if mode not in MODES:
        raise SaelabError(f"--steer {spec!r}: unknown mode {parts[1]!r}: choose one of {', '.join(MODES)}")
    if len(parts) < 3:
        if value_needed and mode != "ablate":
            raise SaelabError(f"--steer {spec!r}: {mode} needs a value, {example}")
        return Intervention(int(parts[0]), mode)
    try:
        value = float(parts[2])
    except ValueError:
        raise SaelabError(f"--steer {spec!r}: {parts[2]!r} is not a number, {example}") from None
    return Intervention(int(parts[0]), mode, value)


def _changes(rows: list[dict]) -> str:
    return ", ".join(f"{p['token']!r} {p['p_clean']:.3f} → {p['p_steered']:.3f}" for p in rows) or "none"


def _fmt(x: float, sign: bool = False) -> str:
    return "n/a" if not math.isfinite(x) else (f"{x:+.3f}" if sign else f"{x:.3f}")


def run_steer(sae, prompt: str, steers: Sequence[str], *, hook: str | None = None, sweep_values: str | None = None,
              model: str | None = None, max_new_tokens: int = SteerOptions.tokens, temperature: float | None = None,
              seed: int = SteerOptions.seed, device: str = "auto", json_out=None, progress: bool = False,
              force: bool = False) -> tuple[dict, list[str]]:
    """Load the SAE (and the model it names, unless ``model``), steer, and return (the result as a JSON-ready
    dict, the lines to print); ``json_out``: also write that dict there (atomically).
    ``sweep_values`` ("0,2,5,10"): one row per coefficient for the one latent of ``steers`` instead.
    ``temperature`` None: 1.0, or 0 (greedy) for a sweep, so that its rows differ only by the coefficient."""
    from saelab.analysis.steering import steer, sweep
    from saelab.models import load_model

    if not steers:
        raise SaelabError("nothing to steer: pass --steer LATENT:MODE:VALUE (e.g. 401:add:5) one or more times")
    if max_new_tokens < 1:
        raise SaelabError(f"--tokens {max_new_tokens}: pass 1 or more new tokens")
    if temperature is not None and not temperature >= 0:
        raise SaelabError(f"--temperature {temperature}: pass 0 (greedy) or more")
    coefs = None
    if sweep_values is not None:
        try:
            coefs = [float(c) for c in str(sweep_values).split(",") if c.strip()]
        except ValueError:
            raise SaelabError(f"--sweep {sweep_values!r}: pass numbers separated by commas, e.g. 0,2,5,10") from None
        if not coefs or len(steers) != 1:
            raise SaelabError("--sweep takes one --steer LATENT[:add|clamp] and coefficients, e.g. "
                              "--steer 401:add --sweep 0,2,5,10")
    interventions = [parse_intervention(s, value_needed=coefs is None) for s in steers]
    if temperature is None:
        temperature = 1.0 if coefs is None else 0.0
    if coefs is not None and interventions[0].mode == "ablate":
        raise SaelabError("--sweep varies an add or clamp value: --steer LATENT:add or LATENT:clamp")
    if json_out is not None:  # an unwritable --json fails now, not after the generations
        json_out, replaced = check_report(json_out, "steer", flag="--json", example="steer.json",
                                          inputs=[] if hub_spec(sae) else [sae], force=force)
    folder, loaded, model_name = pick_sae(sae, hook)
    for it in interventions:  # before the model loads: a big model takes a while
        if not 0 <= it.latent < loaded.d_sae:
            raise SaelabError(f"--steer: latent {it.latent} is out of range: this SAE has latents "
                              f"0..{loaded.d_sae - 1}")
    name = model or model_name
    if not name:
        raise SaelabError(f"{folder} names no model: pass --model (e.g. gpt2)")
    lm = load_model(name, device=device)
    c = loaded.cfg  # a transcoder reads one hook and steers at the one it writes
    head = (f"{c.hook_name} → {c.hook_name_out}" if c.hook_name_out else c.hook_name) + f" of {name} ({folder})"
    result = {"sae": str(folder), "model": name, "hook": c.hook_name, "hook_out": c.output_hook, "prompt": prompt}
    if coefs is not None:
        it = interventions[0]
        rows = sweep(it.latent, coefs, model=lm, sae=loaded, prompt=prompt, mode=it.mode,
                     max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, progress=progress)
        result.update(latent=it.latent, mode=it.mode, rows=rows)
        lines = [head, f"prompt: {prompt!r}; latent {it.latent}, {it.mode} sweep "
                       f"({'greedy' if temperature == 0 else f'temperature {temperature}'}, seed {seed})",
                 f"{'coefficient':>11}  {'KL':>7}  {'logit shift':>11}  {'fluency':>7}  continuation"]
        lines += [f"{r['coefficient']:>11g}  {_fmt(r['kl']):>7}  {_fmt(r['logit_shift'], True):>11}  "
                  f"{_fmt(r['fluency']):>7}  {r['text']!r}" for r in rows]
        lines.append(f"(fluency of the clean continuation: {_fmt(rows[0]['fluency_clean'])})")
    else:
        r = steer(lm, loaded, prompt, interventions, max_new_tokens=max_new_tokens, temperature=temperature,
                  seed=seed, top_n=5)
        result.update(interventions=[dataclasses.asdict(i) for i in interventions], **dataclasses.asdict(r))
        m = r.metrics
        what = ", ".join(f"latent {i.latent} {i.mode}" + (f" {i.value:g}" if i.mode != "ablate" else "")
                         for i in interventions)
        rises = [p for p in r.prob_change if p["delta"] > 0][:5]
        falls = [p for p in reversed(r.prob_change) if p["delta"] < 0][:5]
        lines = [head, f"prompt:  {prompt!r}; {what}", f"clean:   {r.clean!r}", f"steered: {r.steered!r}",
                 f"KL {_fmt(m['kl'])} · logit shift of the promoted tokens {_fmt(m['logit_shift'], True)} · "
                 f"fluency {_fmt(m['fluency'])} (clean {_fmt(m['fluency_clean'])})"
                 + (" · promoted " + ", ".join(repr(t) for t in m["promoted"][:5]) if m["promoted"] else ""),
                 f"next token after the prompt, biggest rises: {_changes(rises)}; biggest falls: {_changes(falls)}"]
    if json_out is not None:
        lines.append(wrote(write_report(json_out, result, "steer", "--json", indent=2), replaced))
    return result, lines


def cmd_steer(args) -> int:
    o = from_args(SteerOptions, args)
    _, lines = run_steer(o.sae, o.prompt, o.steer, hook=o.hook, sweep_values=o.sweep, model=o.model,
                         max_new_tokens=o.tokens, temperature=o.temperature, seed=o.seed, device=args.device,
                         json_out=o.json, progress=not args.quiet, force=o.force)
    print("\n".join(lines))
    return 0


def add_parser(sub) -> None:
    add_command(sub, "steer", SteerOptions, cmd_steer,
                help="steer the model with SAE latents: clean vs steered continuation and metrics",
                description="Add a multiple of latents' decoder rows at the SAE's hook (add), set latents to a value "
                            "(clamp) or to zero (ablate) on every position; print the clean and steered "
                            "continuations, KL, the logit shift of the tokens the latents promote, fluency and the "
                            "next-token probability changes (--sweep: one row per coefficient).")
