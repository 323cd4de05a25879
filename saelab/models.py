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

import logging
import os
import pathlib
import warnings

import torch

from saelab.device import pick_device
from saelab.errors import SaelabError, first_line

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
    device = str(pick_device(device))
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


def same_model(a: str, b: str) -> bool:
    """Whether two recorded model names load the same model: equal, the same hub id (``gpt2-small`` is ``gpt2``),
    or the same local folder name (a folder recorded by its absolute path on another machine)."""
    if a == b or hub_name(a) == hub_name(b):
        return True
    return pathlib.Path(str(a)).name == pathlib.Path(str(b)).name


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
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
