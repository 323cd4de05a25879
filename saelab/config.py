"""Configuration dataclasses: one source of truth for defaults, validation and ``--help``.

Each field documents itself once, in ``metadata["help"]``; the CLI builds its flags from
the fields (``add_arguments``), and runs store the config as JSON (``to_json``) so they can
be resumed from their folder alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import typing
from dataclasses import dataclass, field
from typing import Any

from saelab import SaelabError

# the files of an SAE folder (saelab train, SAELens) and of a group folder (one SAE per hook)
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
TRAIN_FILE = "train.json"  # the training settings and the store's absolute path
GROUP_FILE = "group.json"  # {"model": name, "hooks": {hook: SAE folder}}
SOURCE_FILE = "source.json"  # a fetched SAE's origin: {repo_id, subfolder, revision, commit | path, format, fetched}
HUB_PREFIX = "hf://"  # an SAE on the Hugging Face hub: hf://ORG/REPO/SUBFOLDER


def _f(default=dataclasses.MISSING, help: str = "", **meta):  # noqa: A002 - mirrors argparse
    """A dataclass field whose metadata carries the CLI help (and optional flag settings)."""
    kw: dict[str, Any] = {"metadata": {"help": help, **meta}}
    if isinstance(default, list):
        kw["default_factory"] = lambda d=default: list(d)
    elif default is not dataclasses.MISSING:
        kw["default"] = default
    return field(**kw)


class JSONConfig:
    """JSON round trip shared by the config dataclasses (unknown keys are ignored on load)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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
        required=True,
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
        if not self.hooks:
            raise SaelabError("no hook given: pass --hook NAME (e.g. --hook blocks.0.hook_resid_post)")
        twice = sorted({h for h in self.hooks if self.hooks.count(h) > 1})
        if twice:
            raise SaelabError(f"--hook {twice[0]} is given more than once: pass each hook once")
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



ARCHS = ["relu", "jumprelu", "topk", "batchtopk", "abstopk", "matryoshka", "gradient"]


@dataclass
class SAEConfig(JSONConfig):
    """What an SAE is: its architecture, sizes and the settings of its activation and loss.

    Stored as ``saelab`` inside the SAE folder's cfg.json, so a folder alone rebuilds it."""

    arch: str = _f("topk", "architecture: " + ", ".join(ARCHS))
    k: int = _f(32, "active latents per token; for relu/jumprelu the target L0 that the sparsity "
                    "coefficient is adapted to reach (unless --l1-coeff/--l0-coeff fix it)")
    width: int | None = _f(None, "number of latents d_sae (default: --expansion × d_in)")
    expansion: int = _f(16, "d_sae = expansion × d_in when --width is not given")
    d_in: int = _f(0, "input width (taken from the store)", cli=False)
    hook_name: str = _f("", "hook the SAE reads (taken from the store)", cli=False)
    model_name: str = _f("", "model the activations came from (taken from the store)", cli=False)
    k_aux: int | None = _f(None, "latents in the aux-k loss (TopK family; default d_in/2)")
    aux_coeff: float = _f(1 / 32, "aux-k loss coefficient (TopK family)")
    enc_init: float | None = _f(None, "init W_enc = enc_init · W_decᵀ (unit-norm decoder rows); default 0.3 for "
                                      "the TopK family (topk, abstopk, matryoshka, gradient), 1 otherwise")
    dead_tokens: int = _f(10_000_000, "a latent is dead after not firing for this many tokens "
                                      "(capped at the store's training rows)")
    l1_coeff: float | None = _f(None, "relu: fixed L1 coefficient (default: adapted to reach L0 = k)")
    l0_coeff: float | None = _f(None, "jumprelu: fixed L0 coefficient (default: adapted to reach L0 = k)")
    sparsity_warmup: float = _f(0.05, "relu/jumprelu: sparsity coefficient warm-up, fraction of the steps")
    bandwidth: float = _f(0.1, "jumprelu: straight-through rectangle kernel width ε, in the trainer's units "
                                "(mean ‖x‖ = √d_in; the paper's 0.001 assumed E‖x‖² = 1 and billions of tokens)")
    init_threshold: float = _f(0.5, "jumprelu: initial threshold θ (same units)")
    threshold_momentum: float = _f(0.99, "batchtopk: EMA momentum of the inference threshold")
    matryoshka_mode: str = _f("prefix", "matryoshka: nested prefixes of latents, or nested k values",
                              choices=["prefix", "k"])
    matryoshka_prefixes: list[float] = _f([0.25, 0.5, 1.0], "matryoshka prefix mode: prefix sizes as "
                                          "fractions of d_sae (repeat the flag)", flag="--matryoshka-prefix")
    matryoshka_ks: list[int] = _f([], "matryoshka k mode: the k values (repeat the flag; default k/4, k/2, k)",
                                  flag="--matryoshka-k")
    matryoshka_weighting: str = _f("uniform", "matryoshka k mode: loss weights over the ks",
                                   choices=["uniform", "reverse"])
    grad_beta: float = _f(1.0, "gradient (g-SAE): weight β of the gradient term in the selection score")

    @property
    def d_sae(self) -> int:
        return self.width if self.width else self.expansion * self.d_in

    def validate(self) -> "SAEConfig":
        if self.arch not in ARCHS:
            raise SaelabError(f"unknown --arch {self.arch!r}: choose one of {', '.join(ARCHS)}")
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
        if not all(0 < p <= 1 for p in self.matryoshka_prefixes) or not all(k >= 1 for k in self.matryoshka_ks):
            raise SaelabError(f"--matryoshka-prefix values must be fractions in (0, 1] and --matryoshka-k values at "
                              f"least 1 (got {self.matryoshka_prefixes}, {self.matryoshka_ks})")
        if self.arch == "matryoshka" and self.matryoshka_mode == "k" and self.matryoshka_ks \
                and max(self.matryoshka_ks) != self.k:
            raise SaelabError(f"--matryoshka-k values must end at --k {self.k}: add --matryoshka-k {self.k}")
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
    grad_clip: float = _f(1.0, "gradient norm clip (0: none)")
    seed: int = _f(0, "seed of the init and the batch order; the same seed on the same data gives the same weights")
    include_bos: bool = _f(False, "train on position 0 (BOS) rows too (by default they are skipped: "
                                  "their activations are outliers)")
    buffer_rows: int = _f(1 << 18, "rows in the shuffle buffer (resident memory ≈ 3 × buffer_rows × d_in × 4 bytes, "
                                   "whatever the store's size; smaller mixes less)")
    log_every: int = _f(20, "steps between metrics.jsonl lines")
    eval_every: int = _f(0, "steps between held-out FVU/L0 measurements (0: only at the end)")
    checkpoint_every: int = _f(500, "steps between checkpoints (atomic; --resume continues from the last)")
    kernel: str = _f("auto", "TopK/AbsTopK/Matryoshka training encode: triton (CUDA: fused kernel), chunked "
                             "(fused: no [batch, d_sae] tensor), screened (chunked with a bf16 screen and exact "
                             "fp32 rescoring; CPU), or reference (dense torch.topk); auto = the "
                             "SAELAB_KERNEL variable, else triton on CUDA when triton imports, else screened "
                             "on a CPU with native bf16 (avx512_bf16/AMX) for fp32 SAEs of at least 2^22 (≈4.2M) "
                             "encoder weights (d_in × d_sae) while torch runs at most 2 threads, else chunked",
                     choices=["auto", "triton", "chunked", "screened", "reference"])
    autocast: str = _f("none", "mixed precision for the forward (weights stay fp32)", choices=["none", "bf16"])
    log: str = _f("none", "also log to TensorBoard or wandb (if installed)", choices=["none", "tensorboard", "wandb"])
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")

    def validate(self) -> "TrainConfig":
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
        return self



def to_json(cfg, path: pathlib.Path) -> None:
    from saelab.store import atomic_write_text

    atomic_write_text(path, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


# ------------------------------------------------------------------------ CLI builder
def add_arguments(parser, cls) -> None:
    """Add one flag per dataclass field, help text from the field's metadata."""
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
        if meta.get("required"):
            kw["required"] = True
        elif "default" in kw and kw["default"] not in (None, "", []):
            kw["help"] += f" (default: {kw['default']})"
        parser.add_argument(flag, **kw)


def from_args(cls, ns):
    values = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        v = getattr(ns, f.name)
        if v is None and f.default_factory is not dataclasses.MISSING:
            v = f.default_factory()
        values[f.name] = v
    return cls(**values)


def group_json(model: str, hooks) -> str:
    """The text of a group.json for SAE folders named after their hooks (``read_group`` reads it back)."""
    return json.dumps({"model": model, "hooks": {h: h for h in hooks}}, indent=2) + "\n"


def read_group(path: str | pathlib.Path) -> tuple[str | None, dict[str, pathlib.Path]] | None:
    """A group folder's (model name or None, {hook: SAE folder}) from its group.json; None when
    ``path`` holds no group.json. A malformed group file is a one-line error."""
    check_local_sae(path)
    path = pathlib.Path(path).expanduser()
    f = path / GROUP_FILE
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
        hooks, model = meta["hooks"], meta.get("model")
        if not isinstance(hooks, dict) or not all(isinstance(v, str) for v in hooks.values()) \
                or not (model is None or isinstance(model, str)):
            raise TypeError
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        raise SaelabError(f"{f} is not a valid group file ({{\"model\": ..., \"hooks\": {{hook: folder}}}}): "
                          "re-run saelab train on the RUN folder") from None
    return model or None, {h: path / sub for h, sub in hooks.items()}


def read_train_info(folder: str | pathlib.Path, fix: str) -> dict:
    """A run folder's train.json as a dict ({} when it has none); a damaged one (unreadable, not JSON, not a
    JSON object) is a one-line error ending in ``fix``."""
    path = pathlib.Path(folder).expanduser() / TRAIN_FILE
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        raise SaelabError(f"{path} is damaged (not a readable JSON object): restore it, or {fix}")
    return info


def read_json_object(path: str | pathlib.Path | None) -> dict | None:
    """The JSON object in the file ``path``, or None when there is none (no path, a missing or unreadable file,
    not JSON, not an object): for optional files whose absence is no error."""
    if path is None:
        return None
    try:
        raw = json.loads(pathlib.Path(path).expanduser().read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def read_source(folder: str | pathlib.Path) -> dict | None:
    """A fetched SAE folder's source.json ({repo_id, subfolder, revision, commit, format, fetched}, or {path,
    format, fetched} for one fetched from a local folder; see
    ``saelab fetch``), or None when it has none (or an unreadable one)."""
    return read_json_object(pathlib.Path(folder).expanduser() / SOURCE_FILE)


def hub_spec(path) -> str | None:
    """``hf://ORG/REPO/SUBFOLDER`` when ``path`` names an SAE on the hub (also as a pathlib.Path, which folds
    the double slash), else None."""
    text = str(path)
    if not text.startswith(("hf://", "hf:/")):
        return None
    return HUB_PREFIX + text.split(":", 1)[1].lstrip("/")


# SAEConfig fields that only some architectures (or matryoshka modes) read; the CLI refuses them elsewhere
ARCH_ONLY = {"l1_coeff": ("relu",), "l0_coeff": ("jumprelu",), "sparsity_warmup": ("relu", "jumprelu"),
             "bandwidth": ("jumprelu",), "init_threshold": ("jumprelu",), "threshold_momentum": ("batchtopk",),
             "matryoshka_mode": ("matryoshka",), "matryoshka_prefixes": ("matryoshka",),
             "matryoshka_ks": ("matryoshka",), "matryoshka_weighting": ("matryoshka",), "grad_beta": ("gradient",)}
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
    for name, archs in ARCH_ONLY.items():
        if given(name) and ns.arch not in archs:
            raise SaelabError(f"{flag_of(name)} applies to --arch {' or '.join(archs)} only, and this run trains "
                              f"{ns.arch}: drop it, or pass --arch {archs[0]}")
    for name, mode in MODE_ONLY.items():
        if given(name) and ns.arch == "matryoshka" and ns.matryoshka_mode != mode:
            raise SaelabError(f"{flag_of(name)} applies to --matryoshka-mode {mode} only, and this run uses "
                              f"{ns.matryoshka_mode}: drop it, or pass --matryoshka-mode {mode}")


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


def flag_of(name: str) -> str:
    """The command-line flag of a config field (``hooks`` → ``--hook``, ``matryoshka_prefixes`` →
    ``--matryoshka-prefix``)."""
    for cls in (HarvestConfig, SAEConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f.metadata.get("flag", "--" + name.replace("_", "-"))
    return "--" + name.replace("_", "-")


def check_local_sae(path) -> None:
    """A one-line error for a hub spec (``hf://ORG/REPO/SUBFOLDER``) where a folder is needed: commands write
    next to the SAE (features.h5, eval.json), so ``saelab fetch`` must make a folder of it first."""
    spec = hub_spec(path)
    if spec:
        raise SaelabError(f"{spec} is a hub SAE; this needs a folder: saelab fetch {spec} --out runs/NAME, then pass "
                          "runs/NAME (SAE.load reads hf:// directly)")


def read_sae_cfg(path: str | pathlib.Path) -> dict:
    """The parsed cfg.json of an SAE folder (saelab or SAELens); a one-line error when ``path`` is
    no SAE folder (missing, no cfg.json or weights, unreadable JSON)."""
    check_local_sae(path)
    path = pathlib.Path(path).expanduser()
    if not path.is_dir():
        raise SaelabError(f"{path}: no such folder; pass an SAE folder written by saelab train or SAELens")
    if (path / GROUP_FILE).is_file() and not (path / CFG_FILE).is_file():
        hooks = sorted(p.name for p in path.iterdir() if (p / CFG_FILE).is_file())
        raise SaelabError(f"{path} is an SAE group, not one SAE: pass one of its SAE folders "
                          f"({', '.join(str(path / h) for h in hooks[:3]) or path / 'HOOK'})")
    if not (path / CFG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        from saelab.formats import folder_layout

        layout = folder_layout(path)
        if layout:  # Gemma Scope's or sparsify's layout: fetch converts it
            raise SaelabError(f"{path} holds an SAE in {layout}'s layout, not saelab's: convert it once with "
                              f"`saelab fetch {path} --out runs/NAME` and pass runs/NAME")
        raise SaelabError(f"{path} is not an SAE folder (needs {CFG_FILE} and {WEIGHTS_FILE}): "
                          "pass a folder written by saelab train or SAELens, or a group folder")
    try:
        raw = json.loads((path / CFG_FILE).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise SaelabError(f"{path / CFG_FILE} is not readable ({e}); re-save the SAE") from None
    except json.JSONDecodeError as e:
        raise SaelabError(f"{path / CFG_FILE} is not valid JSON ({e.msg}); re-save the SAE") from None
    if not isinstance(raw, dict):
        raise SaelabError(f"{path / CFG_FILE} is not an SAE config (a JSON object); re-save the SAE")
    own = raw.get("saelab", {})
    if not isinstance(own, dict):
        raise SaelabError(f"{path / CFG_FILE}: its \"saelab\" entry is {type(own).__name__}, not an object; "
                          "re-save the SAE")
    for key in ("d_in", "d_sae"):  # every reader sizes things by these (an old SAELens config may give no d_sae)
        v = raw.get(key, own.get(key))
        if v is None and key == "d_sae":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SaelabError(f"{path / CFG_FILE}: {key} is {v!r}, not a positive whole number; re-save the SAE")
    arch = own.get("arch")
    if arch is not None:
        if arch not in ARCHS:
            raise SaelabError(f"{path / CFG_FILE}: architecture {arch!r} is not one saelab knows "
                              f"({', '.join(ARCHS)}); re-save the SAE")
    return raw
