"""The on-disk layout: every file name of a store, an SAE folder, a group and a run, and their readers.

Folders have fixed names inside, so the app, notebooks and commands find everything from a folder
alone:

- a store (``activations/RUN/<hook>/``): ``manifest.json`` + ``shard_XXXXX.h5``; a RUN folder adds
  ``harvest.json`` (the run's settings, for ``--resume``);
- an SAE folder: ``cfg.json`` + ``sae_weights.safetensors`` (SAELens reads both), ``train.json``,
  ``metrics.jsonl``, ``checkpoint.pt`` (while training), ``eval.json``; after analysis
  ``features.h5`` and ``labels.json``; a fetched one ``source.json``;
- a group folder: ``group.json`` {model, hooks: {hook: SAE folder}} + one SAE folder per hook, and
  ``circuits/NAME.json``.

Other releases' layouts (``LAYOUTS``) are named here so a reader can say what a folder holds;
``saelab.formats`` converts them. Each reader returns parsed content or raises a one-line
``SaelabError`` naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import pathlib

from saelab.config import ARCHS, TRANSCODERS, HarvestConfig, SAEConfig, TrainConfig
from saelab.errors import SaelabError
from saelab.fs import read_text
from saelab.schema import NUMBER, PLAIN_NAME, POSITIVE, TEXT, WHOLE, check, nullable, obj, read_json

# a store and a harvest run
MANIFEST = "manifest.json"
RUN_FILE = "harvest.json"
# an SAE folder (saelab train, SAELens)
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
TRAIN_FILE = "train.json"  # the training settings and the store's absolute path
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
EVAL_FILE = "eval.json"
FEATURES_FILE = "features.h5"
LABELS_FILE = "labels.json"
SOURCE_FILE = "source.json"  # a fetched SAE's origin: {repo_id, subfolder, revision, commit | path, format, fetched}
# a group folder (one SAE per hook)
GROUP_FILE = "group.json"  # {"model": name, "hooks": {hook: SAE folder}}
CIRCUITS_DIR = "circuits"
# an MFR group (``saelab train --mfr N``): N SAE folders of one hook, trained together
MFR_FILE = "mfr.json"  # {"model", "hook", "arch", "members": [SAE folder], "coeff", "mmcs": {"i/j": MMCS}}
#: a group's attribution graphs (``saelab attribute``)
GRAPHS_DIR = "graphs"
# an SAE on the Hugging Face hub: hf://ORG/REPO/SUBFOLDER
HUB_PREFIX = "hf://"

# other releases' SAE folders
GEMMA_SCOPE_FILE = "params.npz"
SPARSIFY_WEIGHTS = "sae.safetensors"
SPARSIFY_RUN_CFG = "config.json"  # sparsify's run config, one folder above the hookpoint folders
DICTIONARY_LEARNING_FILE = "ae.pt"  # dictionary_learning's / SAEBench's state dict (read with weights_only)
DICTIONARY_LEARNING_CFG = "config.json"  # its trainer's config beside it, when there is one
#: layout name → the files of one SAE folder in it (the first is the one to report when none is there)
LAYOUTS = {
    "saelens": (CFG_FILE, WEIGHTS_FILE),
    "sparsify": (CFG_FILE, SPARSIFY_WEIGHTS),
    "gemma-scope": (GEMMA_SCOPE_FILE,),
    "dictionary-learning": (DICTIONARY_LEARNING_FILE,),
}
LAYOUT_HELP = (f"{CFG_FILE} + {WEIGHTS_FILE} for SAELens and saelab, {GEMMA_SCOPE_FILE} for Gemma Scope, "
               f"{CFG_FILE} + {SPARSIFY_WEIGHTS} for EleutherAI sparsify, or {DICTIONARY_LEARNING_FILE} for "
               "dictionary_learning and SAEBench")


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.h5"


def layout_of(names) -> str | None:
    """The layout whose files are all among ``names`` (file names of one folder), or None."""
    names = set(names)
    return next((lay for lay, files in LAYOUTS.items() if set(files) <= names), None)


def folder_layout(folder: pathlib.Path) -> str | None:
    """The layout of the SAE in the local folder ``folder`` (``layout_of`` its files), or None."""
    return layout_of(p.name for p in pathlib.Path(folder).iterdir() if p.is_file())


def is_sae_folder(p: str | os.PathLike) -> bool:
    """Whether ``p`` holds an SAE in saelab's (and SAELens's) layout (its files are checked as they are read: one
    that is not a regular file is an error naming it)."""
    p = pathlib.Path(p)
    return (p / CFG_FILE).exists() and (p / WEIGHTS_FILE).exists()


# ------------------------------------------------------------------------ schemas (saelab.schema checks them)
#: cfg.json: what every reader needs of an SAE's config (SAELens writes many more fields; saelab's own go in "saelab")
CFG_SCHEMA = obj({
    "d_in": POSITIVE, "d_sae": POSITIVE, "hook_name": TEXT, "model_name": TEXT,
    "saelab": {"allOf": [SAEConfig.json_schema(), obj({"arch": {"enum": ARCHS + TRANSCODERS}, "d_sae": POSITIVE})]},
    "metadata": nullable(obj({"hook_name": nullable(TEXT), "model_name": nullable(TEXT)})),
}, required=("d_in",))
#: a store by content (``saelab.resume.store_identity``)
_IDENTITY = obj({"model": TEXT, "hook": TEXT, "d_in": POSITIVE, "n_tokens": WHOLE, "shards_sha256": TEXT})
#: train.json: the run's settings (each a config's fields), its store (path and identity), steps, ranks, scale; a
#: transcoder's also its target store and the targets' scale
TRAIN_SCHEMA = obj({
    "train": TrainConfig.json_schema(), "sae": SAEConfig.json_schema(), "store": TEXT,
    "store_identity": _IDENTITY, "target": TEXT, "target_identity": _IDENTITY,
    "n_steps": WHOLE, "world_size": POSITIVE, "scale": {"type": "number", "exclusiveMinimum": 0},
    "scale_out": {"type": "number", "exclusiveMinimum": 0},
    "done": {"type": "boolean"}, "epochs": {"type": "number", "minimum": 0},
    "mfr_member": {"type": "integer", "minimum": 0}, "init_seed": {"type": "integer", "minimum": 0},
}, required=("train", "sae"))
FRACTION = {"type": "number", "minimum": 0, "maximum": 1}
SIGNED_FRACTION = {"type": "number", "minimum": -1, "maximum": 1}
#: eval.json: the metrics of one evaluation (saelab.evaluate); every number finite, an undefined one null
EVAL_SCHEMA = obj({
    "split": {"enum": ["train", "holdout"]}, "rows": WHOLE, "fvu": NUMBER, "explained_variance": NUMBER,
    "l0": {"type": "number", "minimum": 0}, "dead_frac": FRACTION, "dense_frac": FRACTION,
    "epochs": {"type": "number", "minimum": 0}, "steps": WHOLE, "tokens": WHOLE,
    "ce_clean": NUMBER, "ce_sae": NUMBER, "ce_zero_ablation": NUMBER, "ce_loss_recovered": nullable(NUMBER),
    "kl": NUMBER, "eval_tokens": WHOLE, "ce_contexts": WHOLE, "ce_contexts_asked": WHOLE,
    "ce_split": {"enum": ["train", "holdout"]},
    "truth": obj({"mcc": FRACTION, "mmcs": FRACTION, "uniqueness": FRACTION, "precision": FRACTION,
                  "recall": FRACTION, "f1": FRACTION, "accuracy": FRACTION, "dead_latents": WHOLE,
                  "true_l0": {"type": "number", "minimum": 0}, "sae_l0": {"type": "number", "minimum": 0},
                  "rows": WHOLE, "mean_absorption_fraction_score": FRACTION, "mean_full_absorption_score": FRACTION},
                 required=("mcc", "mmcs", "uniqueness", "precision", "recall", "f1")),
    "absorption": obj({"mean_absorption_fraction_score": nullable(FRACTION),
                       "mean_full_absorption_score": nullable(FRACTION),
                       "mean_num_split_features": nullable({"type": "number", "minimum": 0}),
                       "n_letters": WHOLE, "n_words": WHOLE, "min_probe_f1": FRACTION,
                       "letters": {"type": "object", "additionalProperties": obj({
                           "mean_absorption_fraction": FRACTION, "full_absorption_rate": FRACTION,
                           "num_split_features": WHOLE, "f1_probe": FRACTION,
                           "split_feats": {"type": "array", "items": WHOLE}},
                           required=("mean_absorption_fraction", "full_absorption_rate"))},
                       "skipped": {"type": "object", "additionalProperties": TEXT}},
                      required=("mean_absorption_fraction_score", "mean_full_absorption_score", "letters"),
                      patterns={"^std_dev_": nullable({"type": "number", "minimum": 0})}),
    "probing": obj({"llm_test_accuracy": FRACTION, "sae_test_accuracy": FRACTION,
                    "k_values": {"type": "array", "items": POSITIVE},
                    "tasks": {"type": "object", "additionalProperties": obj({
                        "llm_test_accuracy": FRACTION, "sae_test_accuracy": FRACTION, "n_train": POSITIVE,
                        "n_test": POSITIVE, "top_latents": {"type": "array", "items": WHOLE}},
                        required=("llm_test_accuracy", "sae_test_accuracy"))}},
                   required=("llm_test_accuracy", "sae_test_accuracy", "tasks"),
                   patterns={"^(llm|sae)_top_[0-9]+_test_accuracy$": FRACTION}),
    "autointerp": obj({"explainer": TEXT, "n_latents": POSITIVE, "windows": POSITIVE,
                       "split": {"enum": ["train", "holdout"]}, "detection": FRACTION,
                       "detection_control": FRACTION, "fuzzing": nullable(FRACTION),
                       "latents": {"type": "array", "items": WHOLE}},
                      required=("explainer", "n_latents", "detection", "detection_control")),
    "stability": obj({"mean_cos": SIGNED_FRACTION, "min_cos": SIGNED_FRACTION, "max_cos": SIGNED_FRACTION,
                      "frac_above": FRACTION, "threshold": NUMBER, "n_saes": POSITIVE, "n_pairs": POSITIVE},
                     required=("mean_cos", "min_cos", "max_cos", "frac_above")),
})
# the core metrics come together, and so do the CE metrics of one run (eval_line prints them together)
_CORE, _CE = ("fvu", "l0", "dead_frac", "dense_frac"), ("ce_clean", "ce_sae", "ce_zero_ablation", "ce_loss_recovered",
                                                         "kl")
EVAL_SCHEMA["dependentRequired"] = {**{k: list(_CORE) for k in (*_CORE, *_CE)}, **{k: list(_CE) for k in _CE}}
#: labels.json: {"latent id": "label"}
LABELS_SCHEMA = {"type": "object", "propertyNames": {"pattern": "^(0|[1-9][0-9]{0,17})$", "description": "a latent id"},
                 "additionalProperties": {"type": "string"}}
#: source.json: where a fetched SAE came from
SOURCE_SCHEMA = obj({
    "repo_id": TEXT, "subfolder": TEXT, "revision": nullable(TEXT), "commit": nullable(TEXT), "path": TEXT,
    "format": TEXT, "fetched": TEXT, "weights": TEXT,
    "target": nullable(obj({"model": nullable(TEXT), "hook": nullable(TEXT)})),
})
#: group.json: {"model": name, "hooks": {hook: SAE folder, a name inside the group folder}}
GROUP_SCHEMA = obj({"model": nullable(TEXT), "hooks": {"type": "object", "additionalProperties": PLAIN_NAME,
                                                       "propertyNames": {"description": "hook"}}},
                   required=("hooks",))
#: mfr.json: an MFR group's members (SAE folders inside it, in seed order) and the MMCS of each pair at the end
MFR_SCHEMA = obj({"model": nullable(TEXT), "hook": TEXT, "arch": TEXT,
                  "members": {"type": "array", "items": PLAIN_NAME}, "coeff": NUMBER, "mmcs": {"type": "object", "additionalProperties": NUMBER}},
                 required=("members",))
#: one transcoder pair: the hook read (``input``) and the hook reconstructed (``target``), each the name of a store
#: folder of the same RUN folder
PAIR_SCHEMA = obj({"input": PLAIN_NAME, "target": PLAIN_NAME}, required=("input", "target"))
#: harvest.json: a harvest run's settings (for --resume) and its transcoder pairs
RUN_SCHEMA = obj({"config": HarvestConfig.json_schema(), "hooks": {"type": "array", "items": TEXT},
                  "pairs": {"type": "array", "items": PAIR_SCHEMA},
                  "n_contexts": WHOLE, "world_size": POSITIVE}, required=("config",))


# ------------------------------------------------------------------------ hub specs
def hub_spec(path) -> str | None:
    """``hf://ORG/REPO/SUBFOLDER`` when ``path`` names an SAE on the hub (also as a pathlib.Path, which folds
    the double slash), else None."""
    text = str(path)
    if not text.startswith(("hf://", "hf:/")):
        return None
    return HUB_PREFIX + text.split(":", 1)[1].lstrip("/")


def check_local_sae(path) -> None:
    """A one-line error for a hub spec (``hf://ORG/REPO/SUBFOLDER``) where a folder is needed: commands write
    next to the SAE (features.h5, eval.json), so ``saelab fetch`` must make a folder of it first."""
    spec = hub_spec(path)
    if spec:
        raise SaelabError(f"{spec} is a hub SAE; this needs a folder: saelab fetch {spec} --out runs/NAME, then pass "
                          "runs/NAME (saelab.load_sae reads hf:// directly)")


# ------------------------------------------------------------------------ readers
def read_json_object(path: str | os.PathLike | None) -> dict | None:
    """The JSON object in the file ``path``, or None when there is none (no path, a missing or unreadable file,
    not JSON, not an object): for optional files whose absence is no error."""
    if path is None:
        return None
    try:
        raw = json.loads(read_text(pathlib.Path(path).expanduser()))
    except (OSError, ValueError, SaelabError):
        return None
    return raw if isinstance(raw, dict) else None


def group_json(model: str, hooks) -> str:
    """The text of a group.json for SAE folders named after their hooks (``read_group`` reads it back)."""
    return json.dumps({"model": model, "hooks": {h: h for h in hooks}}, indent=2) + "\n"


def read_group(path: str | os.PathLike) -> tuple[str | None, dict[str, pathlib.Path]] | None:
    """A group folder's (model name or None, {hook: SAE folder}) from its group.json; None when
    ``path`` holds no group.json. A malformed group file is a one-line error."""
    check_local_sae(path)
    path = pathlib.Path(path).expanduser()
    f = path / GROUP_FILE
    if not f.exists():  # a FIFO or folder in its place is read, and refused, as not a regular file
        return None
    meta = read_json(f, GROUP_SCHEMA, "group file", "re-run saelab train on the RUN folder")
    return meta.get("model") or None, {h: path / sub for h, sub in meta["hooks"].items()}


def read_mfr(path: str | os.PathLike) -> dict:
    """An MFR group folder's mfr.json (its members, coefficient and final MMCS), checked; a damaged one is a one-line
    error."""
    return read_json(pathlib.Path(path).expanduser() / MFR_FILE, MFR_SCHEMA, "MFR group file",
                     "train the group again into a new --out")


def refuse_mfr_group(path: pathlib.Path) -> None:
    """A one-line error when ``path`` is an MFR group's folder, where one SAE is wanted: it names a member."""
    if (path / MFR_FILE).is_file() and not (path / CFG_FILE).is_file():
        members = read_mfr(path)["members"]
        raise SaelabError(f"{path} is an MFR group of {len(members)} SAEs of one hook: pass one of its members, e.g. "
                          f"{path / members[0]}")


def group_or_folder(path: str | os.PathLike, fix: str) -> tuple[pathlib.Path, str | None, dict | None]:
    """(the resolved path, the group's model or None, {hook: SAE folder} of a group folder, or None for one SAE
    folder) of a local ``path``; neither a group nor an SAE folder is a one-line error ending in ``fix``."""
    check_local_sae(path)
    path = pathlib.Path(path).expanduser().resolve()
    group = read_group(path)
    if group is not None:
        return path, group[0], group[1]
    if (path / CFG_FILE).is_file():
        return path, None, None
    refuse_mfr_group(path)
    raise SaelabError(f"{path} is neither an SAE group (group.json) nor an SAE folder (cfg.json): {fix}")


def read_train_info(folder: str | os.PathLike, fix: str) -> dict:
    """A run folder's train.json as a dict ({} when it has none); a damaged one (unreadable, not JSON, off
    ``TRAIN_SCHEMA``) is a one-line error naming the field and ending in ``fix``."""
    try:
        return read_json(pathlib.Path(folder).expanduser() / TRAIN_FILE, TRAIN_SCHEMA, "run record",
                         f"restore it, or {fix}")
    except FileNotFoundError:
        return {}


def read_eval(folder: str | os.PathLike) -> dict | None:
    """An SAE folder's eval.json (the metrics ``saelab train`` / ``saelab eval`` wrote), or None when it has none;
    a damaged one is a one-line error (``saelab eval`` writes it again)."""
    folder = pathlib.Path(folder).expanduser()
    try:
        return read_json(folder / EVAL_FILE, EVAL_SCHEMA, "evaluation", f"rerun saelab eval --sae {folder}")
    except FileNotFoundError:
        return None


def check_eval(metrics: dict, path) -> dict:
    """The metrics about to be written to ``path`` (an eval.json), held to the schema its readers hold it to: no
    NaN or inf is written, nor a field of the wrong type."""
    return check(metrics, EVAL_SCHEMA, path, "evaluation", "this is a bug in saelab: please report it")


def read_source(folder: str | os.PathLike) -> dict | None:
    """A fetched SAE folder's source.json ({repo_id, subfolder, revision, commit, format, fetched}, or {path,
    format, fetched} for one fetched from a local folder; see ``saelab fetch``), or None when it has none; a
    damaged one is a one-line error."""
    folder = pathlib.Path(folder).expanduser()
    try:
        return read_json(folder / SOURCE_FILE, SOURCE_SCHEMA, "source record",
                         f"delete it and fetch the SAE again into {folder}")
    except FileNotFoundError:
        return None


def read_sae_cfg(path: str | os.PathLike) -> dict:
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
    if not is_sae_folder(path):
        refuse_mfr_group(path)
        layout = folder_layout(path)
        if layout:  # another release's layout (Gemma Scope, sparsify, dictionary_learning): fetch converts it
            raise SaelabError(f"{path} holds an SAE in {layout}'s layout, not saelab's: convert it once with "
                              f"`saelab fetch {path} --out runs/NAME` and pass runs/NAME")
        raise SaelabError(f"{path} is not an SAE folder (needs {CFG_FILE} and {WEIGHTS_FILE}): "
                          "pass a folder written by saelab train or SAELens, or a group folder")
    return read_json(path / CFG_FILE, CFG_SCHEMA, "SAE config", "re-save the SAE")


def sae_identity(raw: dict, folder: pathlib.Path) -> dict:
    """{"hook", "model"} an SAE's cfg.json (as ``read_sae_cfg`` returns it) records, SAELens's metadata block
    included; the folder's name stands in for a hook it does not record, the bundled model for a model."""
    meta = raw.get("metadata") or {}
    return {"hook": raw.get("hook_name") or meta.get("hook_name") or pathlib.Path(folder).name,
            "model": raw.get("model_name") or meta.get("model_name") or "tiny"}
