"""Loading models with TransformerLens hook names, offline or from the hub, one code path.

``load_model("tiny")`` boots the bundled folder ``saelab/tiny/``; any other name is a local
Hugging Face folder or a hub name (``gpt2``, ``EleutherAI/pythia-70m``…). With
TransformerLens 4 every model goes through ``TransformerBridge.boot_transformers`` followed
by ``enable_compatibility_mode()``, which gives the classic hook names
(``blocks.L.hook_resid_post``, ``blocks.L.attn.hook_z``…) and HookedTransformer numerics
(LayerNorm folded, writing weights centred). With TransformerLens 3.x installed (SAELens
pins it) the same call returns a ``HookedTransformer`` processed the same way.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import os
import pathlib
import re
import warnings

import torch

from saelab import SaelabError, first_line

TINY_DIR = pathlib.Path(__file__).resolve().parent / "tiny"


def tl_major() -> int:
    import transformer_lens

    version = getattr(transformer_lens, "__version__", None)
    if version is None:  # older releases lack __version__
        from importlib.metadata import version as _v

        version = _v("transformer-lens")
    return int(str(version).split(".")[0])


def resolve_model(name: str) -> tuple[str, bool]:
    """(path or hub id, is_local) for a model name; 'tiny' is the bundled folder."""
    if name == "tiny":
        return str(TINY_DIR), True
    p = pathlib.Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise SaelabError(f"model folder {p} has no config.json: pass a Hugging Face model folder or hub name")
        return str(p.resolve()), True
    return name, False


def pick_device(device: str | torch.device = "auto") -> str:
    """The device string for ``device`` ("auto": cuda when available, else cpu); a torch.device is
    taken as its string and an int N as "cuda:N" (as torch reads it); an unknown spelling (e.g. "gpu") is a
    one-line SaelabError."""
    if isinstance(device, torch.device):
        device = str(device)
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        device = f"cuda:{device}"
    if not isinstance(device, str):
        raise SaelabError(f"device must be a string such as 'cpu', 'cuda', 'cuda:0' or 'auto', "
                          f"not {type(device).__name__} {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SaelabError(f"--device {device} asked for, but CUDA is not available: use --device cpu")
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise SaelabError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    return device


def load_model(name: str = "tiny", device: str = "auto", dtype: torch.dtype | str = torch.float32):
    """A TransformerLens model (bridge in compatibility mode, or HookedTransformer on TL 3).

    Raises SaelabError with a one-line fix when the name is neither a local folder nor
    loadable from the hub (e.g. offline).
    """
    if isinstance(dtype, str):  # "bfloat16", "float16", "torch.float32", as TransformerLens accepts
        dt = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise SaelabError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16 (or a torch.dtype)")
        dtype = dt
    path, local = resolve_model(name)
    device = pick_device(device)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars would clutter one-line errors
    except ImportError:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if tl_major() >= 4:
                model = _boot_bridge(path if local else hub_name(path), device, dtype)
            else:
                model = _hooked_transformer(path, local, device, dtype)
    except SaelabError:
        raise
    except Exception as e:  # a hub miss surfaces as many exception types
        why = first_line(e, 200)
        if local:
            if pathlib.Path(path).resolve() == TINY_DIR.resolve():
                raise  # the bundled model failing to load is saelab's bug: keep the traceback
            raise SaelabError(f"could not load the model in the local folder {path} ({type(e).__name__}: {why}): pass "
                              "a complete Hugging Face model folder (config.json, weights, tokenizer), as "
                              "save_pretrained writes it") from None
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise SaelabError(
            f"could not load model '{name}': it is not a local folder and the hub did not give it"
            f"{' (HF_HUB_OFFLINE=1 is set)' if offline else ''} ({why}); "
            "pass --model tiny, a local Hugging Face model folder, or a hub name you can reach"
        ) from None
    model.eval()
    model.saelab_name = name
    return model


def hub_name(name: str) -> str:
    """The Hugging Face id of a TransformerLens model alias ("gpt2-small" → "gpt2", "pythia-70m" →
    "EleutherAI/pythia-70m"; the names SAELens configs record), as HookedTransformer.from_pretrained
    resolves them; any other name is returned as it is. TransformerLens 4's bridge loads by HF id only."""
    try:
        from transformer_lens.supported_models import get_official_model_name
    except ImportError:  # TransformerLens 3: HookedTransformer resolves aliases itself
        return name
    try:
        return get_official_model_name(name)
    except Exception:  # not an alias (a ValueError): a hub id as it is
        return name


def _boot_bridge(path: str, device: str, dtype: torch.dtype):
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(path, device=device, dtype=dtype)
    model.enable_compatibility_mode(disable_warnings=True)
    return model


def _hooked_transformer(path: str, local: bool, device: str, dtype: torch.dtype):
    """TransformerLens 3.x: HookedTransformer, with local GPT-2 folders converted by TL itself."""
    from transformer_lens import HookedTransformer

    if not local:
        return HookedTransformer.from_pretrained(path, device=device, dtype=dtype)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf_cfg = AutoConfig.from_pretrained(path)
    if hf_cfg.model_type != "gpt2":
        raise SaelabError(
            f"local folder {path} holds a '{hf_cfg.model_type}' model; with TransformerLens 3 saelab "
            "loads local GPT-2 folders only: install transformer-lens>=4 for other architectures"
        )
    cfg = HookedTransformerConfig(
        n_layers=hf_cfg.n_layer,
        d_model=hf_cfg.n_embd,
        d_head=hf_cfg.n_embd // hf_cfg.n_head,
        n_heads=hf_cfg.n_head,
        d_mlp=hf_cfg.n_inner or 4 * hf_cfg.n_embd,
        d_vocab=hf_cfg.vocab_size,
        n_ctx=hf_cfg.n_positions,
        act_fn=hf_cfg.activation_function,
        eps=hf_cfg.layer_norm_epsilon,
        normalization_type="LN",
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
        model_name=pathlib.Path(path).name,
        default_prepend_bos=True,
        device=device,
        dtype=dtype,
    )
    hf_model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    state = convert_gpt2_weights(hf_model, cfg)
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(path), move_to_device=False)
    model.load_and_process_state_dict(
        state, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
    )
    return model.to(device)


# ----------------------------------------------------------------------------- hooks
_LAYER = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(name: str) -> int | None:
    """The block index of a hook name (blocks.L.…), or None for embed / ln_final / unembed hooks."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


# hooks TransformerLens only runs when a config option is on (saelab loads models with them off): the option, and
# the hook that carries the same values
_GATED = {"hook_mlp_in": ("use_hook_mlp_in", "blocks.L.ln2.hook_normalized (the MLP's input)"),
          "hook_attn_in": ("use_attn_in", "blocks.L.ln1.hook_normalized (the attention's input)"),
          "hook_q_input": ("use_split_qkv_input", "blocks.L.ln1.hook_normalized (the attention's input)"),
          "hook_k_input": ("use_split_qkv_input", "blocks.L.ln1.hook_normalized (the attention's input)"),
          "hook_v_input": ("use_split_qkv_input", "blocks.L.ln1.hook_normalized (the attention's input)"),
          "attn.hook_result": ("use_attn_result", "blocks.L.attn.hook_z (each head's output before W_O)"),
          "hook_tokens": ("use_hook_tokens", "hook_embed")}


def switched_off(model, name: str) -> tuple[str, str] | None:
    """(option, alternative hook) when ``name`` is a hook this model never runs because a TransformerLens option is
    off, else None."""
    for suffix, (option, alt) in _GATED.items():
        if name.endswith(suffix) and getattr(model.cfg, option, True) is False:
            return option, alt
    return None


def expand_hooks(model, hooks: list[str]) -> list[str]:
    """Validate hook names against the model (globs allowed), keeping the user's order.

    An unknown name raises SaelabError listing the closest valid names; a hook the model does not run (an option of
    TransformerLens is off) one naming the hook with the same values. Globs leave those out.
    """
    valid = list(model.hook_dict.keys())
    out: list[str] = []
    for h in hooks:
        if h in model.hook_dict and (off := switched_off(model, h)):
            option, alt = off
            if hook_layer(h) is not None:
                alt = alt.replace("blocks.L.", f"blocks.{hook_layer(h)}.")
            raise SaelabError(f"hook '{h}' never runs in this model (TransformerLens's {option} is off): harvest "
                              f"{alt} instead")
        if any(c in h for c in "*?["):
            matches = [v for v in valid if fnmatch.fnmatchcase(v, h) and not switched_off(model, v)]
            matches.sort(key=lambda v: (hook_layer(v) if hook_layer(v) is not None else -1, v))
            if not matches:
                raise SaelabError(f"hook pattern '{h}' matches no hook of this model; e.g. {', '.join(valid[:4])}")
            out += [m for m in matches if m not in out]
        elif h in model.hook_dict:
            if h not in out:
                out.append(h)
        else:
            close = difflib.get_close_matches(h, valid, n=5, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"valid names look like {', '.join(valid[:3])}"
            raise SaelabError(f"unknown hook '{h}' for this model: {hint}")
    return out


def tokenizer_bos(tokenizer) -> int:
    """The id put first in every context: BOS, else EOS (GPT-2 style tokenizers share them)."""
    for tok_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    raise SaelabError("the model's tokenizer has neither a BOS nor an EOS token; saelab needs one to start contexts")


def model_info(model) -> dict:
    cfg = model.cfg
    return dict(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head,
                n_ctx=cfg.n_ctx, d_vocab=cfg.d_vocab)
