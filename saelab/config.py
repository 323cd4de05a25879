"""Configuration dataclasses: one source of truth for defaults, validation and ``--help``.

Each field documents itself once, in ``metadata["help"]``; the CLI builds its flags from
the fields (``add_arguments``), and runs store the config as JSON (``to_json``) so they can
be resumed from their folder alone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import typing
from dataclasses import dataclass, field
from typing import Any

from saelab.errors import SaelabError
from saelab.fs import atomic_write_text
from saelab.hooks import MLP_PAIR


def _f(default=dataclasses.MISSING, help: str = "", **meta):  # noqa: A002 - mirrors argparse
    """A dataclass field whose metadata carries the CLI help (and optional flag settings)."""
    kw: dict[str, Any] = {"metadata": {"help": help, **meta}}
    if isinstance(default, list):
        kw["default_factory"] = lambda d=default: list(d)
    elif default is not dataclasses.MISSING:
        kw["default"] = default
    return field(**kw)


#: the largest whole number a flag takes: what a 64-bit count (numpy, torch, HDF5) holds with room to add
INT_LIMIT = 2**62


class JSONConfig:
    """JSON round trip shared by the config dataclasses (unknown keys are ignored on load), and the one check of
    every numeric field: a whole number within ``INT_LIMIT`` (and the field's ``min`` / ``max``), a real number
    finite (and within them). A value off its range is a one-line error naming the flag."""

    def check_numbers(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v, lo, hi = getattr(self, f.name), f.metadata.get("min"), f.metadata.get("max")
            values = v if isinstance(v, list) else [v]
            whole = int in (typing.get_args(hints[f.name]) or (hints[f.name],))
            for x in values:
                if x is None or isinstance(x, (bool, str)):
                    continue
                if whole and not isinstance(x, int):
                    raise SaelabError(f"{flag_of(f.name, type(self))} {x}: pass a whole number")
                if isinstance(x, int):
                    lo_i = -INT_LIMIT if lo is None else lo
                    hi_i = INT_LIMIT if hi is None else hi
                    if not lo_i <= x <= hi_i:
                        span = f"from {lo:,} to {hi_i:,}" if lo is not None else f"of magnitude at most {hi_i:,}"
                        raise SaelabError(f"{flag_of(f.name, type(self))} {x} is out of range: pass a whole number "
                                          f"{span}")
                elif isinstance(x, float):
                    if not math.isfinite(x) or (lo is not None and x < lo) or (hi is not None and x > hi):
                        where = " and ".join(t for t in (f"at least {lo}" if lo is not None else "",
                                                         f"at most {hi}" if hi is not None else "") if t)
                        raise SaelabError(f"{flag_of(f.name, type(self))} {x}: pass a finite number"
                                          + (f" {where}" if where else ""))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    @functools.cache
    def json_schema(cls) -> dict:
        """The JSON Schema of this config as a run folder records it (``to_dict``): each field's type, range
        (``min`` / ``max``, whole numbers within ``INT_LIMIT``) and choices, from the field that declares them.
        No field is required and other keys are allowed (``from_dict`` takes defaults and ignores the rest)."""
        hints = typing.get_type_hints(cls)
        props = {}
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            args = typing.get_args(hint)
            optional = type(None) in args
            base = next((a for a in args if a is not type(None)), hint) if optional else hint
            item = typing.get_args(base)[0] if typing.get_origin(base) is list else None
            props[f.name] = _field_schema(item or base, f.metadata)
            if item is not None:
                props[f.name] = {"type": "array", "items": props[f.name]}
            if optional:
                props[f.name] = {"anyOf": [props[f.name], {"type": "null"}]}
        return {"type": "object", "properties": props, "additionalProperties": True,
                "description": f"the fields of {cls.__name__} (one per flag: see the CLI reference)"}

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _field_schema(kind, meta) -> dict:
    """One value's JSON Schema for a config field of type ``kind`` with ``meta`` (min, max, choices)."""
    sch: dict[str, Any] = {"type": {int: "integer", float: "number", str: "string", bool: "boolean"}[kind]}
    if kind is int:
        sch.update(minimum=-INT_LIMIT, maximum=INT_LIMIT)
    if kind in (int, float):
        sch.update({k: meta[m] for k, m in (("minimum", "min"), ("maximum", "max")) if meta.get(m) is not None})
    if meta.get("choices"):
        sch["enum"] = list(meta["choices"])
    return sch


@dataclass
class HarvestConfig(JSONConfig):
    """What `saelab harvest` does: which model, hooks, text and how to store the rows."""

    hooks: list[str] = _f(
        [],
        "TransformerLens hook name to record, e.g. blocks.1.hook_resid_post; repeat the flag for "
        "several (one pass of the model serves all); a glob such as 'blocks.*.hook_resid_post' "
        "expands to every matching hook (a hook matched by a glob and also named, or by two globs, is "
        "recorded once; the same name given twice is an error)",
        flag="--hook",
    )
    #: a --pairs preset → (input hook, target hook) of layer L, as format strings of L
    PAIR_PRESETS: typing.ClassVar[dict[str, tuple[str, str]]] = {
        "mlp": MLP_PAIR}
    pairs: str | None = _f(
        None,
        "harvest a transcoder pair at every layer L: 'mlp' reads the MLP's input blocks.L.ln2.hook_normalized and "
        "its output blocks.L.hook_mlp_out (both join the hooks; each store's manifest records its pairs)",
        choices=list(PAIR_PRESETS),
    )
    pair: list[str] = _f(
        [],
        "a transcoder pair IN_HOOK:OUT_HOOK to harvest, row-aligned (both join the hooks; each store's manifest "
        "records its pairs); repeat the flag for several",
        metavar="IN_HOOK:OUT_HOOK",
    )
    out: str = _f("", "output RUN folder; one store per hook is written to OUT/<hook>/", required=True)
    model: str = _f("tiny", "model: 'tiny' (bundled), a local Hugging Face folder, or a hub name such as gpt2")
    dataset: str = _f(
        "tiny",
        "text: 'tiny' (the bundled corpus), a local .txt/.jsonl/.json/.parquet file or folder, "
        "or a Hugging Face datasets hub name",
    )
    split: str = _f("train", "dataset split to read")
    text_column: str = _f("text", "column holding the text (json/jsonl/parquet/hub datasets)")
    context_size: int = _f(128, "tokens per context, BOS included")
    tokens: int | None = _f(None, "rows (tokens) to harvest; default: every whole context the dataset gives")
    dtype: str = _f("float32", "storage dtype of activations", choices=["float32", "float16"])
    batch_size: int = _f(32, "contexts per forward pass")
    shard_rows: int = _f(65536, "target rows per shard (rounded down to whole contexts)")
    holdout: float = _f(0.05, "fraction of contexts (the last ones) held out for evaluation, in their own shards")
    seed: int = _f(0, "seed of the document shuffle; the same seed gives byte-identical stores")
    with_grads: bool = _f(False, "also store the gradient of the next-token loss w.r.t. each hooked activation")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")

    def validate(self) -> "HarvestConfig":
        self.check_numbers()  # each number in its type's range before any rule relates them
        if not self.hooks and not self.pairs and not self.pair:
            raise SaelabError("no hook given: pass --hook NAME (e.g. --hook blocks.0.hook_resid_post), or a "
                              "transcoder pair with --pairs mlp or --pair IN_HOOK:OUT_HOOK")
        twice = sorted({h for h in self.hooks if self.hooks.count(h) > 1})
        if twice:
            raise SaelabError(f"--hook {twice[0]} is given more than once: pass each hook once")
        if self.pairs is not None and self.pairs not in self.PAIR_PRESETS:
            raise SaelabError(f"--pairs {self.pairs!r}: choose one of {', '.join(self.PAIR_PRESETS)}")
        self.explicit_pairs()
        if self.context_size < 2:
            raise SaelabError(f"--context-size must be at least 2 (got {self.context_size})")
        if self.tokens is not None and self.tokens < self.context_size:
            raise SaelabError(f"--tokens must be at least one context ({self.context_size}); got {self.tokens}")
        if not 0 <= self.holdout < 1:
            raise SaelabError(f"--holdout must be in [0, 1) (got {self.holdout})")
        if self.batch_size < 1 or self.shard_rows < 1:
            raise SaelabError("--batch-size and --shard-rows must be positive")
        if self.shard_rows < self.context_size:
            raise SaelabError(f"--shard-rows ({self.shard_rows}) must hold at least one context ({self.context_size})")
        if self.seed < 0:
            raise SaelabError(f"--seed must be 0 or more (got {self.seed})")
        return self

    def explicit_pairs(self) -> list[tuple[str, str]]:
        """The --pair flags as (input hook, target hook), in the order given: each one colon between two hook
        names (no glob: a pair names two hooks), two different hooks, and no pair twice."""
        out: list[tuple[str, str]] = []
        for spec in self.pair:
            a, sep, b = spec.partition(":")
            if not sep or not a or not b or ":" in b:
                raise SaelabError(f"--pair {spec!r} is not IN_HOOK:OUT_HOOK: pass two hook names joined by one colon, "
                                  "e.g. --pair blocks.0.ln2.hook_normalized:blocks.0.hook_mlp_out")
            if any(c in spec for c in "*?["):
                raise SaelabError(f"--pair {spec} holds a glob: name both hooks (--pairs mlp gives every layer's MLP "
                                  "pair)")
            if a == b:
                raise SaelabError(f"--pair {spec} reads and reconstructs the same hook: pass two different hooks")
            if (a, b) in out:
                raise SaelabError(f"--pair {spec} is given more than once: pass each pair once")
            out.append((a, b))
        return out

    def all_pairs(self, n_layers: int) -> list[tuple[str, str]]:
        """Every pair of the run, for a model of ``n_layers`` blocks: the --pairs preset's (layer by layer), then the
        --pair flags; a --pair the preset already gives is an error (each pair once)."""
        preset = [] if self.pairs is None else [tuple(t.format(L=L) for t in self.PAIR_PRESETS[self.pairs])
                                                for L in range(n_layers)]
        for a, b in self.explicit_pairs():
            if (a, b) in preset:
                raise SaelabError(f"--pair {a}:{b} is one of --pairs {self.pairs} already: drop it")
        return preset + self.explicit_pairs()



ARCHS = ["relu", "jumprelu", "gated", "topk", "batchtopk",
         "mutualchoice", "featurechoice", "abstopk", "matryoshka", "gradient", "panneal", "archetypal", "mp"]
#: the transcoders: read one hook of a pair of stores, reconstruct the other (an MLP's input → its output)
TRANSCODERS = ["transcoder", "skip-transcoder", "clt"]
#: the cross-layer transcoder: one model over every pair of a RUN folder (the others: one per pair)
CLT = "clt"
#: the activations a transcoder takes, each with its architecture's sparsity settings (--k, --l1-coeff, ...)
TRANSCODER_ACTIVATIONS = ["topk", "relu", "jumprelu"]


@dataclass
class SAEConfig(JSONConfig):
    """What an SAE is: its architecture, sizes and the settings of its activation and loss.

    Stored as ``saelab`` inside the SAE folder's cfg.json, so a folder alone rebuilds it."""

    arch: str = _f("topk", "architecture: " + ", ".join(ARCHS) + "; transcoders (on paired stores): "
                   + ", ".join(TRANSCODERS))
    act_fn: str = _f("topk", "transcoder, skip-transcoder, clt: the activation, with the sparsity settings of that "
                             "architecture", choices=TRANSCODER_ACTIVATIONS)
    k: int = _f(32, "active latents per token; for relu/jumprelu/gated the target L0 that the sparsity "
                    "coefficient is adapted to reach (unless --l1-coeff/--l0-coeff fix it)")
    width: int | None = _f(None, "number of latents d_sae (default: --expansion × d_in)")
    expansion: int = _f(16, "d_sae = expansion × d_in when --width is not given")
    d_in: int = _f(0, "input width (taken from the store)", cli=False)
    hook_name: str = _f("", "hook the SAE reads (taken from the store)", cli=False)
    d_out: int = _f(0, "output width of a transcoder (taken from its target store); 0 for an SAE (d_in)", cli=False)
    hook_name_out: str = _f("", "hook a transcoder reconstructs (taken from its target store); empty for an SAE",
                            cli=False)
    clt_pairs: list[str] = _f([], "clt: its layers' pairs IN_HOOK:OUT_HOOK in layer order (taken from the RUN folder)",
                              cli=False)
    model_name: str = _f("", "model the activations came from (taken from the store)", cli=False)
    k_aux: int | None = _f(None, "latents in the aux-k loss (TopK family; default d_in/2)")
    aux_coeff: float = _f(1 / 32, "aux-k loss coefficient (TopK family)")
    enc_init: float | None = _f(None, "init W_enc = enc_init · W_decᵀ (unit-norm decoder rows); default 0.3 for "
                                      "the TopK family (topk, abstopk, matryoshka, gradient), 1 otherwise")
    dead_tokens: int = _f(10_000_000, "a latent is dead after not firing for this many tokens "
                                      "(capped at the store's training rows)")
    l1_coeff: float | None = _f(None, "relu, gated: fixed L1 coefficient (default: adapted to reach L0 = k)")
    l0_coeff: float | None = _f(None, "jumprelu: fixed L0 coefficient (default: adapted to reach L0 = k)")
    bias_adaptation: bool = _f(False, "relu: group bias adaptation (GBA, Chen et al. 2025) in place of the L1 penalty: "
                                      "the encoder biases are not trained by the gradient but set after every "
                                      "--gba-every steps so that each group of latents fires at its target frequency "
                                      "(--gba-groups groups, targets spaced geometrically over --gba-span, their sum "
                                      "--k); the decoder rows are kept unit-norm")
    gba_groups: int = _f(10, "--bias-adaptation: groups of latents, each with its own target frequency", min=1)
    gba_span: float = _f(100.0, "--bias-adaptation: ratio of the first group's target frequency to the last's", min=1.0)
    gba_every: int = _f(2, "--bias-adaptation: steps whose firing counts each bias update reads", min=1)
    gba_rate: float = _f(0.2, "--bias-adaptation: the largest step of a bias per update, in the trainer's units "
                               "(pre-activations of order 1)", min=0.0)
    sparsity_warmup: float = _f(0.05, "relu/jumprelu/gated: sparsity coefficient warm-up, fraction of the steps")
    bandwidth: float = _f(0.1, "jumprelu: straight-through rectangle kernel width ε, in the trainer's units "
                                "(mean ‖x‖ = √d_in; the paper's 0.001 assumed E‖x‖² = 1 and billions of tokens)")
    init_threshold: float = _f(0.5, "jumprelu: initial threshold θ (same units)")
    threshold_lr: float = _f(10.0, "jumprelu: the thresholds' learning rate as a multiple of --lr (Adam moves log θ by "
                                  "about LR × this per step)", min=0.0)
    threshold_momentum: float = _f(0.99, "batchtopk, mutualchoice, featurechoice: EMA momentum of the inference "
                                         "threshold")
    fc_m: int | None = _f(None, "featurechoice: tokens each latent takes from a batch (default round(k × batch size / "
                                "d_sae): k per token on average)", min=1)
    archetypal_points: int = _f(2048, "archetypal: training rows whose convex hull the atoms live in (a seeded "
                                      "sample of the store, drawn before the first step)", min=1)
    archetypal_delta: float = _f(1.0, "archetypal: the relaxation, the largest norm of an atom's step out of the hull "
                                      "(in the trainer's units: rows of mean norm sqrt(d_in)); 0: the hull itself",
                                 min=0.0)
    p_start: float = _f(1.0, "panneal: the exponent p of the Lp sparsity penalty until annealing starts")
    p_end: float = _f(0.2, "panneal: the exponent p reached at the end of the run (0 < p_end <= p_start)")
    anneal_start: float = _f(0.2, "panneal: fraction of the steps after which p is annealed (linearly, in "
                                  "--p-updates steps, to --p-end at the last step)")
    p_updates: int = _f(10, "panneal: how many times p changes (each change rescales the coefficient)", min=2)
    p_penalty: str = _f("lp", "panneal: the penalty, the Lp norm of the codes (lp) or its p-th power (lp^p)",
                        choices=["lp", "lp^p"])
    matryoshka_mode: str = _f("prefix", "matryoshka: nested prefixes of latents, or nested k values",
                              choices=["prefix", "k"])
    matryoshka_prefixes: list[float] = _f([0.25, 0.5, 1.0], "matryoshka prefix mode: prefix sizes as "
                                          "fractions of d_sae (repeat the flag)", flag="--matryoshka-prefix")
    matryoshka_ks: list[int] = _f([], "matryoshka k mode: the k values (repeat the flag; default k/4, k/2, k)",
                                  flag="--matryoshka-k")
    matryoshka_weighting: str = _f("uniform", "matryoshka k mode: loss weights over the ks",
                                   choices=["uniform", "reverse"])
    grad_beta: float = _f(1.0, "gradient (g-SAE): weight β of the gradient term in the selection score")
    mp_residual: float = _f(0.0, "mp: at inference a token's pursuit stops before its k steps once its residual norm "
                                 "falls under this fraction of ‖x − b_dec‖ (adaptive L0; training always takes k "
                                 "steps); 0: off", min=0.0)

    @property
    def d_sae(self) -> int:
        return self.width if self.width else self.expansion * self.d_in

    @property
    def output_dim(self) -> int:
        """The width the decoder writes: d_out for a transcoder, d_in for an SAE."""
        return self.d_out or self.d_in

    @property
    def n_layers(self) -> int:
        """A cross-layer transcoder's layers (its pairs); 1 for every other architecture."""
        return len(self.clt_pairs) if self.arch == CLT else 1

    @property
    def output_hook(self) -> str:
        """The hook the decoder writes: hook_name_out for a transcoder, the hook read for an SAE."""
        return self.hook_name_out or self.hook_name

    def validate(self) -> "SAEConfig":
        self.check_numbers()  # each number in its type's range before any rule relates them
        if self.arch not in ARCHS + TRANSCODERS:
            raise SaelabError(f"unknown --arch {self.arch!r}: choose one of {', '.join(ARCHS + TRANSCODERS)}")
        if self.act_fn not in TRANSCODER_ACTIVATIONS:
            raise SaelabError(f"unknown --act-fn {self.act_fn!r}: choose one of {', '.join(TRANSCODER_ACTIVATIONS)}")
        if self.arch == CLT and not self.clt_pairs:
            raise SaelabError("--arch clt trains over the pairs of a RUN folder: train it with --activations RUN "
                              "harvested with --pairs mlp")
        if self.d_out < 0 or (self.d_out and self.arch not in TRANSCODERS):
            raise SaelabError(f"d_out {self.d_out} is for transcoders (--arch {' or '.join(TRANSCODERS)}), "
                              "a non-negative width")
        if self.d_in < 1:
            raise SaelabError(f"d_in must be positive (got {self.d_in})")
        if self.d_sae < 1 or (self.width is not None and self.width < 1):
            raise SaelabError(f"--width / --expansion must give at least one latent (got --width {self.width}, "
                              f"--expansion {self.expansion})")
        if not 0 <= self.aux_coeff < math.inf:
            raise SaelabError(f"--aux-coeff must be 0 or a positive finite number (got {self.aux_coeff})")
        if self.enc_init is not None and not self.enc_init > 0:
            raise SaelabError(f"--enc-init must be positive (got {self.enc_init})")
        if self.k_aux is not None and not 1 <= self.k_aux <= self.d_sae:
            raise SaelabError(f"--k-aux {self.k_aux} must be between 1 and the width {self.d_sae}: lower it, or drop "
                              "it for the default d_in/2")
        if self.dead_tokens < 1:
            raise SaelabError(f"--dead-tokens must be positive (got {self.dead_tokens}): pass the number of tokens "
                              "without firing after which a latent counts as dead")
        if not 0 < self.k < self.d_sae:
            raise SaelabError(f"--k {self.k} must be between 1 and {self.d_sae - 1} (below the width {self.d_sae}): "
                              "lower --k or widen the SAE")
        if not self.bandwidth > 0 or not 0 <= self.threshold_momentum < 1:
            raise SaelabError(f"--bandwidth must be positive and --threshold-momentum in [0, 1) (got {self.bandwidth}, "
                              f"{self.threshold_momentum})")
        if not 0 < self.p_end <= self.p_start or not 0 <= self.anneal_start < 1 or self.p_penalty not in ("lp", "lp^p"):
            raise SaelabError(f"--p-end must be in (0, --p-start], --anneal-start in [0, 1) and --p-penalty lp or lp^p "
                              f"(got {self.p_end}, {self.p_start}, {self.anneal_start}, {self.p_penalty})")
        if not all(0 < p <= 1 for p in self.matryoshka_prefixes) or not all(k >= 1 for k in self.matryoshka_ks):
            raise SaelabError(f"--matryoshka-prefix values must be fractions in (0, 1] and --matryoshka-k values at "
                              f"least 1 (got {self.matryoshka_prefixes}, {self.matryoshka_ks})")
        if self.arch == "matryoshka" and self.matryoshka_mode == "k" and self.matryoshka_ks \
                and max(self.matryoshka_ks) != self.k:
            raise SaelabError(f"--matryoshka-k values must end at --k {self.k}: add --matryoshka-k {self.k}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in ("gba_groups", "gba_span", "gba_every", "gba_rate"):
            if not self.bias_adaptation and getattr(self, name) != defaults[name]:
                raise SaelabError(f"{flag_of(name)} applies with --bias-adaptation only: pass --bias-adaptation, or "
                                  "drop it")
        if self.bias_adaptation and self.arch != "relu":
            raise SaelabError(f"--bias-adaptation sets a ReLU SAE's encoder biases, and this run trains {self.arch}: "
                              "pass --arch relu, or drop --bias-adaptation")
        if self.bias_adaptation and self.l1_coeff is not None:
            raise SaelabError("--bias-adaptation and --l1-coeff both set the sparsity (GBA trains without an L1 "
                              "penalty): pass one of them")
        if self.bias_adaptation and self.gba_groups > self.d_sae:
            raise SaelabError(f"--gba-groups {self.gba_groups} is more than the {self.d_sae} latents: lower it")
        if not 0 <= self.mp_residual < 1:
            raise SaelabError(f"--mp-residual must be in [0, 1) (got {self.mp_residual}): the fraction of ‖x − b_dec‖ "
                              "under which a token's pursuit stops, or 0 for k steps always")
        return self



@dataclass
class TrainConfig(JSONConfig):
    """How `saelab train` trains: data, budget, optimiser, schedule, checkpoints, logging."""

    activations: str = _f("", "a store folder (holds manifest.json) or a RUN folder (one SAE per hook "
                              "into a group, unless --hook picks one)", required=True)
    out: str = _f("", "output folder: the SAE folder, or the group folder for several hooks", required=True)
    hook: str | None = _f(None, "with a RUN folder: train only the SAE of this hook")
    tokens: int | None = _f(None, "training tokens; may exceed the store (it is replayed, reshuffled); "
                                  "default: one epoch of the store's training rows")
    batch_size: int = _f(4096, "rows per step")
    lr: float | None = _f(None, "Adam learning rate (default: 2e-4 / sqrt(d_sae / 16384), the TopK "
                                "scaling rule of Gao et al. 2024)")
    lr_warmup_steps: int = _f(1000, "linear LR warm-up steps (capped at 5%% of the run)")
    lr_decay: float = _f(0.2, "fraction of the run, at its end, over which the LR decays linearly to 0")
    grad_clip: float = _f(1.0, "gradient norm clip (0: none)", min=0)
    seed: int = _f(0, "seed of the init and the batch order; the same seed on the same data gives the same weights")
    include_bos: bool = _f(False, "train on position 0 (BOS) rows too (by default they are skipped: "
                                  "their activations are outliers)")
    buffer_rows: int = _f(1 << 18, "rows in the shuffle buffer (resident memory ≈ 3 × buffer_rows × d_in × 4 bytes, "
                                   "whatever the store's size; smaller mixes less)")
    log_every: int = _f(20, "steps between metrics.jsonl lines")
    eval_every: int = _f(0, "steps between held-out FVU/L0 measurements (0: only at the end)")
    checkpoint_every: int = _f(500, "steps between checkpoints (atomic; --resume continues from the last)")
    kernel: str = _f("auto", "training encode: reference runs every architecture dense; otherwise the TopK family "
                             "takes its fused encode and the others their sparse paths. The TopK encode: triton "
                             "(CUDA: fused kernel), chunked "
                             "(fused: no [batch, d_sae] tensor), screened (chunked with a bf16 screen and exact "
                             "fp32 rescoring; CPU), or reference (dense torch.topk); auto = the "
                             "SAELAB_KERNEL variable, else triton on CUDA when triton imports, else screened "
                             "on a CPU with native bf16 (avx512_bf16/AMX) for fp32 SAEs of at least 2^22 (≈4.2M) "
                             "encoder weights (d_in × d_sae) while torch runs at most 2 threads, else chunked",
                     choices=["auto", "triton", "chunked", "screened", "reference"])
    mfr: int = _f(0, "mutual feature regularisation (Marks et al. 2024): train this many SAEs (2 or more) together "
                     "on the same batches, each from its own init (seeds --seed, --seed + 1, ...), with a penalty on how "
                     "far their dictionaries are apart, into OUT/sae-0, OUT/sae-1, ... and OUT/mfr.json; 0: one SAE",
                  min=0)
    mfr_coeff: float = _f(0.1, "--mfr: weight of the penalty coeff × d_in × (1 − mean MMCS of the members' decoders), "
                               "d_in being a row's squared norm in the trainer's units; 0 trains the members "
                               "independently (the baseline)", min=0.0)
    mfr_warmup: float = _f(0.05, "--mfr: fraction of the steps over which the penalty's weight ramps from 0 to 1",
                           min=0.0, max=1.0)
    objective: str = _f("mse", "what the SAE is trained to reconstruct: mse (the activations), kl (end-to-end, "
                               "Braun et al. 2024: the SAE spliced into the frozen model, the KL of its next-token "
                               "distribution against the clean model's) or kl+ds (kl plus the later layers' residual "
                               "streams); kl and kl+ds run the model on the store's contexts",
                        choices=["mse", "kl", "kl+ds"])
    kl_coeff: float = _f(1.0, "--objective kl, kl+ds: weight of the term kl_coeff × d_in × KL per token", min=0.0)
    ds_coeff: float = _f(1.0, "--objective kl+ds: weight of the term ds_coeff × d_in × the later layers' mean "
                              "squared error as a fraction of their squared norm", min=0.0)
    model: str | None = _f(None, "--objective kl, kl+ds: the model to splice the SAE into (default: the store's, "
                                 "as its manifest names it)")
    autocast: str = _f("none", "mixed precision for the forward (weights stay fp32)", choices=["none", "bf16"])
    log: str = _f("none", "also log to TensorBoard or wandb (if installed)", choices=["none", "tensorboard", "wandb"])
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")

    def validate(self) -> "TrainConfig":
        self.check_numbers()  # each number in its type's range before any rule relates them
        if self.batch_size < 1:
            raise SaelabError(f"--batch-size must be positive (got {self.batch_size})")
        if self.tokens is not None and self.tokens < self.batch_size:
            raise SaelabError(f"--tokens {self.tokens} is less than one batch ({self.batch_size}): raise it")
        if self.lr is not None and not 0 < self.lr < math.inf:  # nan and inf fail too (they trained to NaN weights)
            raise SaelabError(f"--lr must be a positive finite number (got {self.lr})")
        if not 0 <= self.grad_clip < math.inf:
            raise SaelabError(f"--grad-clip must be 0 (no clipping) or a positive finite number (got {self.grad_clip})")
        if self.lr_warmup_steps < 0:
            raise SaelabError(f"--lr-warmup-steps must be 0 or more (got {self.lr_warmup_steps})")
        if self.seed < 0:
            raise SaelabError(f"--seed must be 0 or more (got {self.seed})")
        if not 0 <= self.lr_decay <= 1:
            raise SaelabError(f"--lr-decay must be in [0, 1] (got {self.lr_decay})")
        if self.buffer_rows < 1:
            raise SaelabError(f"--buffer-rows must be positive (got {self.buffer_rows})")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise SaelabError(f"--log-every and --checkpoint-every must be positive (got {self.log_every}, "
                              f"{self.checkpoint_every})")
        if self.eval_every < 0:
            raise SaelabError(f"--eval-every must be 0 (only at the end) or positive (got {self.eval_every})")
        if self.mfr == 1:
            raise SaelabError("--mfr 1 trains one SAE, and mutual feature regularisation aligns two or more: pass "
                              "--mfr 2 or more, or drop --mfr")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, needs in (("kl_coeff", ("kl", "kl+ds")), ("ds_coeff", ("kl+ds",)), ("model", ("kl", "kl+ds"))):
            if self.objective not in needs and getattr(self, name) != defaults[name]:
                raise SaelabError(f"{flag_of(name)} applies to --objective {' or '.join(needs)} only, and this run "
                                  f"trains on {self.objective}: drop it, or pass --objective {needs[-1]}")
        if self.objective != "mse" and self.mfr:
            raise SaelabError(f"--objective {self.objective} with --mfr: train end-to-end SAEs one at a time (drop "
                              "--mfr), or train the group with --objective mse")
        for name in ("mfr_coeff", "mfr_warmup"):
            if not self.mfr and getattr(self, name) != defaults[name]:
                raise SaelabError(f"{flag_of(name)} applies with --mfr N only, and this run trains one SAE: drop it, "
                                  "or pass --mfr 2")
        return self



def to_json(cfg, path: pathlib.Path) -> None:
    atomic_write_text(path, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def describe_changes(recorded: dict, now: dict, keys) -> str:
    """``--flag: the run has X, this command Y`` for each key, joined by "; " (a --resume refusal shows what
    to pass, not only which flags differ)."""
    def short(v):
        if v is None:
            return "the default"
        if isinstance(v, str):
            return v  # paths, names: whole (the value to pass back)
        text = json.dumps(v)
        return text if len(text) <= 120 else text[:58] + "…" + text[-58:]

    return "; ".join(f"{flag_of(k)}: the run has {short(recorded.get(k))}, this command {short(now.get(k))}"
                     for k in keys)


def check_resume_settings(recorded: dict, now: dict, free, where, redo: str) -> None:
    """A one-line refusal of ``--resume`` when a setting differs from the run's (``recorded``; keys it lacks, written
    by an older saelab, are skipped), other than the ``free`` ones (where things are, where it runs, how often it
    reports); ``redo`` ends the message (e.g. "train to a new --out")."""
    changed = sorted(k for k, v in now.items() if k not in free and k in recorded and recorded[k] != v)
    if changed:
        raise SaelabError(f"--resume with different settings than the run in {where} "
                          f"({describe_changes(recorded, now, changed)}): pass the run's values, or {redo}")


def flag_of(name: str, cls=None) -> str:
    """The command-line flag of a config field (``hooks`` → ``--hook``, ``matryoshka_prefixes`` →
    ``--matryoshka-prefix``), of ``cls`` or of the run configs."""
    for cls in ((cls,) if cls is not None else (HarvestConfig, SAEConfig, TrainConfig)):
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f.metadata.get("flag", "--" + name.replace("_", "-"))
    return "--" + name.replace("_", "-")
