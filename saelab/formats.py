"""Pretrained SAEs stored in other releases' layouts, read into saelab SAEs.

saelab and SAELens folders hold ``cfg.json`` + ``sae_weights.safetensors``. Two widely used releases
store their SAEs otherwise; ``saelab fetch`` reads them through this module and writes an ordinary
SAE folder (which SAELens then reads too):

* **Gemma Scope** (``google/gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att}``): one
  ``layer_L/width_W/average_l0_N/params.npz`` per SAE with ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
  ``b_enc``, ``b_dec`` and ``threshold``. JumpReLU, ``f = ReLU(z)·[z > θ]`` with ``z = x W_enc + b_enc``:
  b_dec is *not* subtracted from the input. The file records neither model nor hook; they come from the repo
  name (size, pt/it; res → ``blocks.L.hook_resid_post``, mlp → ``blocks.L.hook_mlp_out``, att →
  ``blocks.L.attn.hook_z`` with the heads flattened) and the folder's ``layer_L``.
* **EleutherAI sparsify** (e.g. ``EleutherAI/sae-pythia-70m-32k``): one ``<hookpoint>/`` folder per SAE with
  ``cfg.json`` (``d_in``, ``num_latents`` or ``expansion_factor``, ``k``, …) and ``sae.safetensors``
  (``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec [d_sae, d_in]``, ``b_dec``). TopK,
  ``f = TopK(ReLU((x − b_dec) encoder.weightᵀ + encoder.bias))``. The hookpoint is a Hugging Face module name:
  ``layers.L`` (the block's output, ``blocks.L.hook_resid_post``) or ``layers.L.mlp`` (``blocks.L.hook_mlp_out``);
  the model is the ``model`` of the run's ``config.json`` beside the hookpoint folders, when there is one.
* **dictionary_learning** (and the SAEs SAEBench trains and publishes with it): ``ae.pt``, a torch state dict, with
  the trainer's ``config.json`` beside it when it was saved. The state dict's keys tell the class (the config's
  ``trainer.dict_class`` where they do not):

  ========================  ==========================================================  ===========
  class                     keys                                                        saelab
  ========================  ==========================================================  ===========
  ``AutoEncoder``           ``bias``, ``encoder.weight`` / ``.bias``, ``decoder.weight``  ``relu``
  ``AutoEncoderNew``        ``encoder.weight`` / ``.bias``, ``decoder.weight`` / ``.bias``  ``relu``, no b_dec on the input
  ``AutoEncoderTopK``       ``encoder.*``, ``decoder.weight``, ``b_dec``, ``k``            ``topk``
  ``BatchTopKSAE``          as TopK, with the inference ``threshold`` (dict_class)        ``batchtopk``
  ``JumpReluAutoEncoder``   ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``threshold``      ``jumprelu``, no b_dec on the input
  ``GatedAutoEncoder``      ``decoder_bias``, ``encoder.weight``, ``r_mag``, ``gate_bias``, ``mag_bias``, ``decoder.weight``  ``gated``
  ========================  ==========================================================  ===========

  ``decoder.weight`` is nn.Linear's [d_in, d_sae]. The gated and JumpReLU classes scale their codes by the decoder
  norms in ``encode`` and divide them out in ``decode``: the reconstruction is the weights' as saelab computes it,
  the codes saelab reports are the unscaled ones. The model is the config's ``trainer.lm_name``; the hook comes
  from ``trainer.submodule_name`` or the folder's path (``resid_post_layer_L`` → ``blocks.L.hook_resid_post``,
  ``mlp_out_layer_L`` → ``blocks.L.hook_mlp_out``, ``attn_out_layer_L`` → ``blocks.L.hook_attn_out``), else
  --hook.

Only arrays are read (numpy's npz with ``allow_pickle=False``, safetensors, ``torch.load(weights_only=True)``): no
pickle.
"""

from __future__ import annotations

import json
import pathlib
import re

import torch

from saelab.errors import SaelabError, first_line
from saelab.layout import CFG_FILE, DICTIONARY_LEARNING_FILE, GEMMA_SCOPE_FILE, SPARSIFY_WEIGHTS


def convert(layout: str, files: dict[str, pathlib.Path], repo: str, sub: str, run_cfg: dict | None = None,
            target: dict | None = None):
    """The saelab SAE (on the CPU) of one downloaded SAE in ``layout`` ("gemma-scope", "sparsify" or
    "dictionary-learning"); ``files``: file name → its path; ``run_cfg``: sparsify's run config.json, or
    dictionary_learning's trainer config.json, when there is one; ``target``:
    {"model", "hook"} given by the user (fetch --model / --hook; None where not given), used as they are."""
    model, hook = (target or {}).get("model"), (target or {}).get("hook")
    if layout == "gemma-scope":
        return gemma_scope_sae(files[GEMMA_SCOPE_FILE], repo, sub, model, hook)
    if layout == "sparsify":
        return sparsify_sae(files[CFG_FILE], files[SPARSIFY_WEIGHTS], repo, sub,
                            model or (run_cfg or {}).get("model") or "", hook)
    if layout == "dictionary-learning":
        return dictionary_learning_sae(files[DICTIONARY_LEARNING_FILE], repo, sub, run_cfg, model, hook)
    raise ValueError(f"no converter for layout {layout!r}")


def _build(where: str, arch: str, w: dict[str, torch.Tensor], *, k: int, hook: str, model: str,
           apply_b_dec: bool):
    """An SAE of ``arch`` holding the weights ``w`` (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec,
    optionally threshold), its shape taken from W_enc and every other tensor checked against it."""
    from saelab.config import SAEConfig
    from saelab.sae.base import SAE

    d_in, d_sae = (int(n) for n in w["W_enc"].shape)
    if "threshold" in w and tuple(w["threshold"].shape) != (d_sae,):
        raise SaelabError(f"{where}: threshold has shape {tuple(w['threshold'].shape)} but d_sae {d_sae} needs "
                          f"{(d_sae,)}; the files do not belong together")
    cfg = SAEConfig(arch=arch, d_in=d_in, width=d_sae, k=min(max(k, 1), d_sae - 1), hook_name=hook, model_name=model)
    return SAE.from_weights(cfg, w, where, apply_b_dec_to_input=apply_b_dec)


# ---------------------------------------------------------------------------------------------- Gemma Scope
_GEMMA_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)\b", re.I)
_GEMMA_HOOK = {"res": "blocks.{L}.hook_resid_post", "mlp": "blocks.{L}.hook_mlp_out", "att": "blocks.{L}.attn.hook_z"}


def gemma_scope_target(repo: str, sub: str) -> tuple[str, str]:
    """(model, hook) of the Gemma Scope SAE ``repo``/``sub``, from the repo name and the folder's layer_L. A local
    folder passes repo "" and its path as ``sub``: the repo name is looked for in the path (the Hugging Face cache's
    ``models--google--gemma-scope-2b-pt-res/…`` has it)."""
    where = "/".join(x for x in (repo, sub) if x)
    m = _GEMMA_REPO.search(where)
    if not m:
        whose = f"{repo} is not a Gemma Scope repo saelab knows" if repo else "its path names no Gemma Scope repo"
        raise SaelabError(f"{where} holds {GEMMA_SCOPE_FILE} but {whose} "
                          "(google/gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att}): the model and hook cannot be told; "
                          "pass them, --model and --hook")
    size, kind, site = (g.lower() for g in m.groups())
    if site == "transcoders":
        raise SaelabError(f"{repo or where} holds transcoders (they read the MLP's input and write its output), not "
                          "SAEs of one hook: saelab does not convert Gemma Scope's transcoders; fetch from a -res, -mlp or -att repo")
    layer = re.search(r"(?:^|/)layer_(\d+)(?:/|$)", sub)
    if not layer:
        raise SaelabError(f"{where}: no layer_L folder in the path, so the hook cannot be told"
                          + ("; the embedding SAEs are not supported" if "embedding" in sub else "")
                          + ": fetch a layer_L/width_W/average_l0_N folder, or pass --hook")
    model = f"google/gemma-2-{size}" + ("-it" if kind == "it" else "")
    return model, _GEMMA_HOOK[site].format(L=int(layer.group(1)))


def gemma_scope_sae(npz: pathlib.Path, repo: str, sub: str, model: str | None = None, hook: str | None = None):
    """A Gemma Scope ``params.npz`` as a saelab JumpReLU SAE (b_dec not subtracted from the input). ``model`` and
    ``hook``, when both given, are taken as they are (else told from the repo name and folder)."""
    import numpy as np

    if not (model and hook):
        model_told, hook_told = gemma_scope_target(repo, sub)
        model, hook = model or model_told, hook or hook_told
    where = "/".join(x for x in (repo, sub, GEMMA_SCOPE_FILE) if x)
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError) as err:
        raise SaelabError(f"{where} is not a readable npz file ({first_line(err)}): fetch it again") from None
    w = {}
    for name, a in arrays.items():
        key = "W_" + name[2:] if name.startswith("w_") else name  # some files spell w_enc, w_dec
        if key in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            w[key] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold") if n not in w]
    if missing:
        raise SaelabError(f"{where} lacks {', '.join(missing)}: not a Gemma Scope SAE file")
    l0 = re.search(r"average_l0_(\d+)", sub)
    return _build(where, "jumprelu", w, k=int(l0.group(1)) if l0 else 1, hook=hook, model=model, apply_b_dec=False)


# ---------------------------------------------------------------------------------------------- sparsify
def sparsify_hook(sub: str) -> str:
    """The TransformerLens hook of a sparsify hookpoint folder (its last path part, a Hugging Face module name)."""
    name = sub.rstrip("/").rpartition("/")[2]
    m = re.fullmatch(r"(?:layers|h)[._](\d+)(\.mlp)?", name)
    if not m:
        raise SaelabError(f"sparsify hookpoint {name!r} maps to no TransformerLens hook saelab knows (it reads "
                          "layers.L → blocks.L.hook_resid_post and layers.L.mlp → blocks.L.hook_mlp_out): pass --hook")
    return f"blocks.{int(m.group(1))}." + ("hook_mlp_out" if m.group(2) else "hook_resid_post")


def sparsify_sae(cfg_path: pathlib.Path, weights: pathlib.Path, repo: str, sub: str, model: str = "",
                 hook: str | None = None):
    """An EleutherAI sparsify ``cfg.json`` + ``sae.safetensors`` (of hookpoint folder ``sub`` in hub repo ``repo``)
    as a saelab TopK SAE; ``hook``: this one instead of the hookpoint's."""
    from safetensors.torch import load_file

    hook = hook or sparsify_hook(sub)
    where = "/".join(x for x in (repo, sub) if x)
    try:
        cfg = json.loads(pathlib.Path(cfg_path).read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as err:
        raise SaelabError(f"{where}/{CFG_FILE} is not a sparsify config ({err}): fetch it again") from None
    if cfg.get("transcode"):
        raise SaelabError(f"{where} is a sparsify transcoder (it predicts one hook from another): saelab loads SAEs "
                          "of one hook only")
    if cfg.get("activation", "topk") != "topk" or cfg.get("signed"):
        raise SaelabError(f"{where}: sparsify activation {cfg.get('activation')!r}"
                          f"{' (signed)' if cfg.get('signed') else ''} is not supported (supported: topk)")
    if "k" not in cfg:  # the config is checked whole before the weights are read
        raise SaelabError(f"{where}/{CFG_FILE} gives no k: not a sparsify TopK config")
    try:
        raw = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise SaelabError(f"{where}/{SPARSIFY_WEIGHTS} is not a readable safetensors file "
                          f"({first_line(err)}): fetch it again") from None
    extra = sorted(set(raw) & {"W_skip", "in_norm", "out_norm"})
    if cfg.get("skip_connection") or extra:
        raise SaelabError(f"{where}: a sparsify SAE with {', '.join(extra) or 'a skip connection'} is not supported: "
                          "saelab's SAEs reconstruct from the latents alone")
    missing = [n for n in ("encoder.weight", "W_dec", "b_dec") if n not in raw]
    if missing:
        raise SaelabError(f"{where}/{SPARSIFY_WEIGHTS} lacks {', '.join(missing)}: not a sparsify SAE file")
    enc = raw["encoder.weight"]  # [d_sae, d_in] (nn.Linear)
    d_sae, d_in = enc.shape
    w_dec = raw["W_dec"]
    if tuple(w_dec.shape) == (d_in, d_sae) and d_in != d_sae:  # stored the other way round
        w_dec = w_dec.t()
    w = {"W_enc": enc.t(), "b_enc": raw.get("encoder.bias", torch.zeros(d_sae)), "W_dec": w_dec, "b_dec": raw["b_dec"]}
    return _build(f"{where}/{SPARSIFY_WEIGHTS}", "topk", w, k=int(cfg["k"]), hook=hook, model=model, apply_b_dec=True)


# ---------------------------------------------------------------------------------------------- dictionary_learning
_DL_HOOK = re.compile(r"(resid_post|mlp_out|attn_out)_layer_(\d+)")
_DL_HOOKS = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "hook_attn_out"}


def dictionary_learning_hook(trainer: dict, sub: str) -> str:
    """The TransformerLens hook of a dictionary_learning SAE, from its trainer's submodule name or its folder's path
    (``resid_post_layer_L`` …); "" when neither names one."""
    for text in (str(trainer.get("submodule_name") or ""), sub):
        m = _DL_HOOK.search(text)
        if m:
            return f"blocks.{int(m.group(2))}.{_DL_HOOKS[m.group(1)]}"
    return ""


def dictionary_learning_sae(path: pathlib.Path, repo: str, sub: str, run_cfg: dict | None = None,
                            model: str | None = None, hook: str | None = None):
    """A dictionary_learning / SAEBench ``ae.pt`` (and its trainer's config.json, ``run_cfg``) as a saelab SAE."""
    import pickle

    where = "/".join(x for x in (repo, sub, DICTIONARY_LEARNING_FILE) if x)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise SaelabError(f"{where} holds more than tensors, which saelab does not unpickle ({first_line(err, 100)}): "
                          "save the SAE's state_dict() instead of the module") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise SaelabError(f"{where} is not a readable torch file ({first_line(err, 100)}): fetch it again") from None
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise SaelabError(f"{where} is not a state dict of tensors: save the SAE's state_dict()")
    trainer = (run_cfg or {}).get("trainer") if isinstance((run_cfg or {}).get("trainer"), dict) else {}
    cls = str(trainer.get("dict_class") or "")
    model = model or str(trainer.get("lm_name") or "")
    hook = hook or dictionary_learning_hook(trainer, sub)
    r = {k: v.float() for k, v in raw.items()}
    if any(r.get(k) is not None and r[k].numel() > 1 for k in ("act_mean", "act_cov_inv_sqrt")):
        raise SaelabError(f"{where} whitens its inputs (act_mean, act_cov_inv_sqrt): saelab's SAEs read raw "
                          "activations; such an SAE is not supported")

    def need(*keys):
        missing = [k for k in keys if k not in r]
        if missing:
            raise SaelabError(f"{where} lacks {', '.join(missing)}: not a {cls or 'dictionary_learning'} state dict")

    def lin(k):  # nn.Linear's weight [out, in] → saelab's [in, out]
        return r[k].t()

    k = int(trainer.get("k") or (r["k"].item() if "k" in r else 0) or 1)
    if "gate_bias" in r or cls.startswith("Gated"):
        need("encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias")
        w = {"W_enc": lin("encoder.weight"), "b_enc": r["gate_bias"], "W_dec": lin("decoder.weight"),
             "b_dec": r["decoder_bias"], "r_mag": r["r_mag"], "b_mag": r["mag_bias"]}
        return _build(where, "gated", w, k=k, hook=hook, model=model, apply_b_dec=True)
    if "W_enc" in r:  # JumpReluAutoEncoder (b_dec is not subtracted from the input)
        need("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
        w = {n: r[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        return _build(where, "jumprelu", w, k=k, hook=hook, model=model, apply_b_dec=False)
    need("encoder.weight", "encoder.bias", "decoder.weight")
    w = {"W_enc": lin("encoder.weight"), "b_enc": r["encoder.bias"], "W_dec": lin("decoder.weight")}
    if "k" in r or "TopK" in cls:
        need("b_dec")
        w["b_dec"] = r["b_dec"]
        if "BatchTopK" in cls:  # its inference rule: the threshold, the same for every latent
            need("threshold")
            w["threshold"] = r["threshold"].reshape(-1)[:1].expand(w["W_enc"].shape[1]).clone()
            return _build(where, "batchtopk", w, k=k, hook=hook, model=model, apply_b_dec=True)
        return _build(where, "topk", w, k=k, hook=hook, model=model, apply_b_dec=True)
    if "bias" in r:  # AutoEncoder: the input bias is subtracted first, and added back
        w["b_dec"] = r["bias"]
        return _build(where, "relu", w, k=k, hook=hook, model=model, apply_b_dec=True)
    need("decoder.bias")  # AutoEncoderNew
    w["b_dec"] = r["decoder.bias"]
    return _build(where, "relu", w, k=k, hook=hook, model=model, apply_b_dec=False)
