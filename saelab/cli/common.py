"""What every command shares: the run flags, the config dataclasses as flags, and the lines they print."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from saelab.config import TRANSCODER_ACTIVATIONS, TRANSCODERS, SAEConfig, flag_of
from saelab.errors import SaelabError


def add_run_flags(p, device: bool = True) -> None:
    """The flags every long-running subcommand shares: --device (unless the config has it) and --quiet."""
    if device:
        p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_distributed_arguments(p) -> None:
    """--nproc and --dist-timeout (``DistributedOptions``; ``main`` checks them before the command runs)."""
    from saelab.options import DistributedOptions

    add_arguments(p, DistributedOptions)


def store_summary(stores: dict) -> str:
    from saelab.store import ActivationStore

    lines = []
    for hook, path in stores.items():
        s = ActivationStore(path, verify=False)
        size = sum((path / sh["file"]).stat().st_size for sh in s.shards)
        lines.append(f"  {path}: {s.n_rows('all'):,} rows × d_in {s.d_in} ({s.manifest['dtype']}), "
                     f"{len(s.shards)} shards ({len(s.manifest['holdout_shards'])} held out), {size / 2**20:.1f} MiB")
    return "\n".join(lines)


def eval_line(ev: dict) -> str:
    """The core metrics of an eval.json on one line ("no core metrics" where it has none)."""
    if "fvu" not in ev:
        return "no core metrics (saelab eval --suite core measures them)"
    parts = [f"FVU {ev['fvu']:.3f}", f"L0 {ev['l0']:.1f}", f"dead {100 * ev['dead_frac']:.1f}%",
             f"dense {100 * ev['dense_frac']:.1f}%"]
    if "ce_loss_recovered" in ev:
        parts += [f"CE clean {ev['ce_clean']:.3f} / SAE {ev['ce_sae']:.3f} / zero-ablated {ev['ce_zero_ablation']:.3f}",
                  "CE-loss recovered " + (f"{ev['ce_loss_recovered']:.3f}" if ev["ce_loss_recovered"] is not None
                                          else "undefined (zero-ablating the hook costs no loss)"),
                  f"KL {ev['kl']:.4f}"]
        if "ce_contexts" in ev:  # the contexts the CE metrics ran on, where the eval.json records them
            n, asked = ev["ce_contexts"], ev.get("ce_contexts_asked")
            split = "training" if ev.get("ce_split") == "train" else "held-out"
            parts[-1] += (f" (over {n} {split} context{'s' * (n != 1)}"
                          + (f": --contexts {asked} asked, the store has no more" if asked else "") + ")")
    return ", ".join(parts)


def suite_table(rows: list[tuple[str, dict]]) -> str:
    """One suite's scores as a table: a row per SAE (its name, then its scores), a column per number (lists and
    nested scores, e.g. probing's tasks, are eval.json's only)."""
    keys = list(dict.fromkeys(k for _, scores in rows for k, v in scores.items() if not isinstance(v, (dict, list))))
    cells = [["SAE", *keys]] + [[name, *(_cell(scores.get(k)) for k in keys)] for name, scores in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(keys) + 1)]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def add_arguments(parser, cls) -> None:
    """Add one flag per dataclass field: its name (or ``flag``, and ``aliases``), type, default, ``choices`` and
    ``metavar`` from the field, the help text from its metadata with the default appended."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli") is False:
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        hint = hints[f.name]
        kw: dict[str, Any] = {"dest": f.name, "help": meta.get("help", "")}
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if hint is bool:
            kw["action"] = "store_true"
        elif origin is list:
            kw.update(action="append", type=args[0], default=None)
        else:
            base = next((a for a in args if a is not type(None)), hint) if args else hint
            kw.update(type=base, default=default)
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if meta.get("required"):
            kw["required"] = True
        elif "default" in kw and kw["default"] not in (None, "", []):
            kw["help"] += f" (default: {kw['default']})"
        parser.add_argument(flag, *meta.get("aliases", ()), **kw)


def add_command(sub, name: str, options, func, *, help: str, description: str, run_flags: bool = True,  # noqa: A002
                device: bool = True):
    """A subcommand whose flags are the fields of the dataclass ``options`` (plus ``--device`` and ``--quiet``
    with ``run_flags``), handled by ``func(args)``; returns its parser for any flag of its own."""
    p = sub.add_parser(name, help=help, description=description)
    add_arguments(p, options)
    if run_flags:
        add_run_flags(p, device=device)
    p.set_defaults(func=func)
    return p


def from_args(cls, ns):
    """The dataclass ``cls`` of the parsed flags (a list flag never given: its default). A class without a
    ``validate`` of its own (a command's options) gets its numbers checked here; the run configs check theirs in
    ``validate``, after their own rules."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        v = getattr(ns, f.name)
        if v is None and f.default_factory is not dataclasses.MISSING:
            v = f.default_factory()
        values[f.name] = v
    cfg = cls(**values)
    return cfg if hasattr(cfg, "validate") else cfg.check_numbers()


# SAEConfig fields that only some architectures (or matryoshka modes) read; the CLI refuses them elsewhere
ARCH_ONLY = {"l1_coeff": ("relu", "gated", "panneal"), "l0_coeff": ("jumprelu",),
             "sparsity_warmup": ("relu", "jumprelu", "gated", "panneal"),
             **{f: ("panneal",) for f in ("p_start", "p_end", "anneal_start", "p_updates", "p_penalty")},
             "archetypal_points": ("archetypal",), "archetypal_delta": ("archetypal",),
             "bandwidth": ("jumprelu",),
             "init_threshold": ("jumprelu",), "threshold_lr": ("jumprelu",), "threshold_momentum": ("batchtopk", "mutualchoice", "featurechoice"),
             "fc_m": ("featurechoice",),
             "matryoshka_mode": ("matryoshka",), "matryoshka_prefixes": ("matryoshka",),
             "matryoshka_ks": ("matryoshka",), "matryoshka_weighting": ("matryoshka",), "grad_beta": ("gradient",),
             "mp_residual": ("mp",),
             **{f: ("relu",) for f in ("bias_adaptation", "gba_groups", "gba_span", "gba_every", "gba_rate")}}
MODE_ONLY = {"matryoshka_prefixes": "prefix", "matryoshka_ks": "k", "matryoshka_weighting": "k"}


def check_sae_flags(ns) -> None:
    """One-line errors for SAE flags the command line was given that the run would ignore: --width together
    with --expansion, and a flag of another architecture (or matryoshka mode) than the one trained. A flag
    counts as given when its value differs from its default (passing the default is harmless)."""
    fields = {f.name: f for f in dataclasses.fields(SAEConfig)}

    def given(name):
        v, f = getattr(ns, name, None), fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        return v is not None and v != default

    if getattr(ns, "width", None) and given("expansion"):
        raise SaelabError(f"--width {ns.width} and --expansion {ns.expansion} both set the number of latents: "
                          "pass one of them")
    coder = ns.arch in TRANSCODERS
    if given("act_fn") and not coder:
        raise SaelabError(f"--act-fn applies to --arch {' or '.join(TRANSCODERS)} only, and this run trains {ns.arch}: "
                          "drop it (the architecture is the activation), or pass --arch transcoder")
    arch = ns.act_fn if coder else ns.arch  # a transcoder reads the settings of its activation's architecture
    for name, archs in ARCH_ONLY.items():
        if given(name) and arch not in archs:
            trains = f"a {ns.arch} with --act-fn {arch}" if coder else arch
            fix = f"--act-fn {archs[0]}" if coder and archs[0] in TRANSCODER_ACTIVATIONS else f"--arch {archs[0]}"
            raise SaelabError(f"{flag_of(name)} applies to --arch {' or '.join(archs)} only, and this run trains "
                              f"{trains}: drop it, or pass {fix}")
    for name, mode in MODE_ONLY.items():
        if given(name) and ns.arch == "matryoshka" and ns.matryoshka_mode != mode:
            raise SaelabError(f"{flag_of(name)} applies to --matryoshka-mode {mode} only, and this run uses "
                              f"{ns.matryoshka_mode}: drop it, or pass --matryoshka-mode {mode}")
