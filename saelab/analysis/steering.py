"""Steering with SAE latents, and reading which latents a prompt lights up.

An intervention acts at the SAE's hook on every position of the sequence (the BOS position
excepted: the SAEs are trained without it), through a TransformerLens forward hook:

* ``add``    x ← x + α·d_i, with d_i = W_dec[i] (the decoder row in the hook's raw units, so
             α is on the scale of the latent's own activations);
* ``clamp``  f = SAE.encode(x); x ← x + (v − f_i)·d_i: the latent is set to v and only the
             change is decoded, so the SAE's reconstruction error and every other latent's
             contribution stay exactly as they were;
* ``ablate`` clamp to 0.

``steer`` runs the prompt and a generation with and without the interventions and measures
the effect on every run (``metrics``):

* ``kl``: KL(steered ‖ clean) of the next-token distributions, averaged over the prompt's
  positions (BOS excluded);
* ``logit_shift``: the mean change of the (per-position centred) logits of the tokens the
  steered latents promote — the top tokens of W_dec[i] through the direct path to the logits
  (centred W_U; for ``attn.hook_z`` first W_O) — averaged over the prompt (NaN for SAEs on hooks
  with no such path, e.g. ``attn.hook_q``);
* ``fluency``: the clean model's mean next-token loss on the steered continuation
  (``fluency_clean``: the same on the clean continuation, for reference). Steering that
  works raises ``logit_shift``; steering that breaks the model raises ``fluency``.

``sweep(latent, coefficients, ...)`` repeats this over coefficients and returns one row per
coefficient. ``prompt_latents(model, sae, text)`` gives the prompt's tokens and the SAE's codes
on each of them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Iterable, Sequence

import torch

from saelab.errors import SaelabError
from saelab.evaluate import kl_per_position
from saelab.hooks import flat_hook, relay
from saelab.options import SteerOptions

MODES = ("add", "clamp", "ablate")


@dataclasses.dataclass(frozen=True)
class Intervention:
    """One latent's intervention: ``value`` is α for ``add``, the target activation for
    ``clamp``, unused for ``ablate``."""

    latent: int
    mode: str = "add"
    value: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "latent", _latent_id(self.latent))  # numpy ints, 0-d tensors
        if isinstance(self.mode, str):
            object.__setattr__(self, "mode", self.mode.strip().lower())  # "Clamp", "ADD"
        if self.mode not in MODES:
            raise SaelabError(f"unknown steering mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if not math.isfinite(float(self.value)):
            raise SaelabError(f"steering value {self.value} of latent {self.latent} is not a finite number: pass one")
        object.__setattr__(self, "value", float(self.value))


@dataclasses.dataclass
class SteerResult:
    prompt_tokens: list[str]
    clean: str                      # the clean continuation (text after the prompt)
    steered: str                    # the steered continuation
    metrics: dict                   # kl, logit_shift, fluency, fluency_clean, promoted
    prob_change: list[dict]         # next-token after the prompt: {token, p_clean, p_steered, delta}
    clean_ids: list[int] = dataclasses.field(default_factory=list)    # the continuations' token ids
    steered_ids: list[int] = dataclasses.field(default_factory=list)


def _latent_id(x) -> int:
    """An int latent id from an int, a numpy integer or a one-element tensor."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.is_floating_point():
            raise SaelabError(f"a latent id must be one integer, got a tensor of shape {list(x.shape)} "
                              f"and dtype {x.dtype}: pass an int (or a list of ints)")
        return int(x.item())
    if isinstance(x, numbers.Integral):
        return int(x)
    raise SaelabError(f"a latent id must be an int, got {type(x).__name__} {x!r}: pass an int, "
                      "a list of ints or Intervention(latent, mode, value)")


def as_interventions(interventions, mode: str = "add", value: float = 0.0) -> list[Intervention]:
    """Accepts Intervention objects, latent ids (given ``mode``/``value``; ints, numpy ints or a
    tensor of ids), ``(latent, mode, value)`` tuples, or a mix."""
    if isinstance(interventions, (numbers.Integral, Intervention, tuple)) or (
            isinstance(interventions, torch.Tensor) and interventions.ndim == 0):
        interventions = [interventions]
    elif isinstance(interventions, torch.Tensor):
        interventions = interventions.reshape(-1)
    out = []
    for it in interventions:
        if isinstance(it, Intervention):
            out.append(it)
        elif isinstance(it, tuple):
            out.append(Intervention(_latent_id(it[0]), *it[1:]))
        else:
            out.append(Intervention(_latent_id(it), mode, value))
    return out


def _check(sae, model, interventions: Sequence[Intervention]) -> str:
    sae.one_layer("steering")
    hook = sae.cfg.hook_name
    if not hook:
        raise SaelabError("this SAE has no hook recorded (cfg.hook_name is empty): set sae.cfg.hook_name to the "
                          "hook it reads, e.g. 'blocks.1.hook_resid_post'")
    for h in dict.fromkeys((hook, sae.cfg.output_hook)):  # a transcoder reads one hook and writes another
        if h not in model.hook_dict:
            raise SaelabError(f"the SAE {'reads' if h == hook else 'writes'} hook {h!r}, which this model does not "
                              "have: load the model the SAE was trained on")
    for it in interventions:
        if not 0 <= it.latent < sae.d_sae:
            raise SaelabError(f"latent {it.latent} is out of range: this SAE has latents 0..{sae.d_sae - 1}")
    return hook


def _overflow(interventions: Sequence[Intervention], what: str) -> SaelabError:
    """The one-line refusal of steering whose result is not finite, naming the largest value (the one to lower)."""
    big = max((it for it in interventions if it.mode != "ablate"), key=lambda it: abs(it.value), default=None)
    lower = f": lower the value {big.value:g} of latent {big.latent} ({big.mode})" if big else ""
    return SaelabError(f"steering makes the model's {what} NaN or inf (no metric or continuation of it means "
                       f"anything){lower}")


def _check_finite(t: torch.Tensor, interventions: Sequence[Intervention], what: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise _overflow(interventions, what)
    return t


def _steered(sae, interventions: list, skip_bos: bool = True):
    """fn(x, flat) applying the interventions to ``flat`` [batch, pos, ...], the activation at the hook the SAE
    writes; the codes of clamp and ablate are read from ``x``, what the SAE reads (an SAE: ``flat`` itself; a
    transcoder: its input, earlier in the same forward)."""
    adds = [it for it in interventions if it.mode == "add"]
    sets = [it for it in interventions if it.mode in ("clamp", "ablate")]

    def fn(x, flat):  # [n, T, features]
        width = sae.cfg.output_dim
        if flat.shape[-1] != width:  # not a raw broadcasting error from the first add
            raise SaelabError(f"this SAE writes {width} values per position, but hook {sae.cfg.output_hook} gives "
                              f"{flat.shape[-1]}: load the model the SAE was trained on")
        first = 1 if (skip_bos and flat.shape[1] > 1) else 0
        part = flat[:, first:].float()
        delta = torch.zeros_like(part)
        W_dec = sae.W_dec.to(part.device)
        for it in adds:
            delta = delta + it.value * W_dec[it.latent]
        if sets:
            idx = torch.tensor([it.latent for it in sets], device=part.device)
            target = torch.tensor([0.0 if it.mode == "ablate" else it.value for it in sets], device=part.device)
            dev = sae.W_enc.device  # an SAE left on the CPU steers a model on the GPU too
            read = x[:, first:].float()
            f = sae.encode(read.reshape(-1, read.shape[-1]).to(dev))[:, idx.to(dev)].to(part.device)
            f = f.reshape(*part.shape[:2], len(sets))
            delta = delta + (target - f) @ W_dec[idx]
        new = flat.clone()
        new[:, first:] = (part + delta).to(flat.dtype)
        # a steered activation that overflows (float32 past 3.4e38, or the model's dtype) makes NaN logits next,
        # which generation would sample or argmax into garbage: refused here, on every call that steers
        return _check_finite(new, interventions, f"activations at {sae.cfg.output_hook}")

    return fn


def steering_hook(sae, interventions: Sequence[Intervention], skip_bos: bool = True):
    """A forward-hook function applying the interventions to an activation [batch, pos, ...] at an SAE's hook (a
    transcoder's steering reads one hook and writes another: ``_fwd_hooks`` relays them).

    Position 0 (BOS) is left alone when the call holds more than one position; a call with a
    single position (a KV-cached step) is steered."""
    fn = _steered(sae, list(interventions), skip_bos)
    return flat_hook(lambda flat: fn(flat, flat))


def _fwd_hooks(sae, model, interventions):
    interventions = list(interventions)
    if not interventions:
        return []
    return relay(_check(sae, model, interventions), sae.cfg.output_hook, _steered(sae, interventions))


def _tokens(model, prompt: str | torch.Tensor, new: int = 0, verb: str = "steer from") -> torch.Tensor:
    """[1, T] token ids (BOS first) of the prompt (a string, a list of one string, or token ids
    [T] / [1, T] as a tensor or a list of ints); SaelabError for a batch of several prompts, an
    empty prompt, or when T + ``new`` generated tokens exceed the model's context."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, numbers.Integral) for p in prompt):
        prompt = torch.tensor(prompt)
    if isinstance(prompt, (list, tuple)) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, torch.Tensor):
        if prompt.ndim > 2 or (prompt.ndim == 2 and prompt.shape[0] != 1):
            raise SaelabError(f"one prompt at a time: got token ids of shape {list(prompt.shape)}; pass [T] or "
                              "[1, T] (loop over a batch, or give generate_side_by_side a list of strings)")
        if prompt.is_floating_point():
            raise SaelabError(f"token ids must be integers, got a {prompt.dtype} tensor: pass model.to_tokens(text)")
        toks = prompt.reshape(1, -1).long()
    elif isinstance(prompt, (list, tuple)):
        raise SaelabError(f"one prompt at a time: got a {type(prompt).__name__} of {len(prompt)}; loop over the "
                          "prompts (generate_side_by_side takes a list of strings)")
    elif not isinstance(prompt, str):
        raise SaelabError(f"the prompt must be a string or token ids, got {type(prompt).__name__}")
    elif not prompt or not prompt.strip():
        raise SaelabError(f"the prompt is empty: type some text to {verb}")
    else:
        try:  # the whole prompt: one longer than the context is refused below, not silently cut to it
            toks = model.to_tokens(prompt, truncate=False)
        except TypeError:  # a model whose to_tokens takes no truncate flag
            toks = model.to_tokens(prompt)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and toks.shape[1] + max(new, 0) > n_ctx:
        if new <= 0:
            raise SaelabError(f"the prompt ({toks.shape[1]} tokens) exceeds the model's context of {n_ctx}: shorten it")
        raise SaelabError(f"the prompt ({toks.shape[1]} tokens) plus {max(new, 0)} new tokens exceeds the model's "
                          f"context of {n_ctx}: shorten the prompt or ask for fewer new tokens")
    return toks


def _generate(model, tokens: torch.Tensor, fwd_hooks, max_new_tokens: int, temperature: float, seed: int):
    """New token ids [n] after ``tokens`` [1, T]; same seed → same random draws."""
    if max_new_tokens <= 0:
        return tokens.new_zeros(0)
    torch.manual_seed(seed)
    # no KV cache: with TransformerLens 4.3's bridge, what a hook returns on the cached one-token
    # steps does not reach the logits (steered and clean greedy runs would match), so
    # every step reruns the whole sequence with the hooks on every position
    kw = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=max(temperature, 1e-6),
              stop_at_eos=False, verbose=False, return_type="tokens", use_past_kv_cache=False)
    with model.hooks(fwd_hooks=fwd_hooks), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(tokens, **kw)
    return out[0, tokens.shape[1]:]


def _decode(model, ids: torch.Tensor) -> str:
    return model.tokenizer.decode(ids.tolist()) if len(ids) else ""


@torch.no_grad()
def generate_side_by_side(model, sae, prompt, interventions, *, max_new_tokens: int = 30,
                          temperature: float = 1.0, seed: int = 0) -> tuple[str, str]:
    """(clean continuation, steered continuation) of the prompt, drawn with the same seed; for a
    list of several prompt strings, a list of such pairs (one per prompt, each run on its own)."""
    if isinstance(prompt, (list, tuple)) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        return [generate_side_by_side(model, sae, p, interventions, max_new_tokens=max_new_tokens,
                                      temperature=temperature, seed=seed) for p in prompt]
    interventions = as_interventions(interventions)
    toks = _tokens(model, prompt, max_new_tokens).to(next(model.parameters()).device)
    clean = _generate(model, toks, [], max_new_tokens, temperature, seed)
    steered = _generate(model, toks, _fwd_hooks(sae, model, interventions), max_new_tokens, temperature, seed)
    return _decode(model, clean), _decode(model, steered)


def promoted_tokens(model, sae, latents: Iterable[int], n: int = 10) -> torch.Tensor | None:
    """Token ids the latents' decoder rows promote most: top-n of (Σ_i W_dec[i] / ‖W_dec[i]‖) through the direct
    path from the SAE's hook to the logits (``logit_lens.direct_logits``: for ``attn.hook_z`` first W_O, then the final
    LayerNorm's centring, W_U). None when the hook has no such path (its rows do not reach W_U linearly)."""
    from saelab.analysis.logit_lens import direct_logits

    rows = sae.W_dec.detach()[list(latents)]
    d = (rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)).sum(0)
    logits = direct_logits(model, sae, d)
    return None if logits is None else logits.topk(n).indices


def _centred(logits: torch.Tensor) -> torch.Tensor:
    return logits - logits.mean(-1, keepdim=True)


def _loss_on(model, prefix: torch.Tensor, cont: torch.Tensor) -> float:
    """The clean model's mean next-token loss on ``cont`` after ``prefix`` [1, T]."""
    if len(cont) == 0:
        return float("nan")
    full = torch.cat([prefix[0], cont.to(prefix.device)]).unsqueeze(0)
    logp = model(full).float().log_softmax(-1)[0, prefix.shape[1] - 1 : -1]
    return float(-logp.gather(-1, cont.to(logp.device).unsqueeze(-1)).mean())


class _Clean:
    """The clean quantities a sweep shares across coefficients."""

    def __init__(self, model, toks, max_new_tokens, temperature, seed):
        self.logits = model(toks).float()[0]
        self.cont = _generate(model, toks, [], max_new_tokens, temperature, seed)
        self.fluency = _loss_on(model, toks, self.cont)


@torch.no_grad()
def _run(model, sae, toks, interventions, clean: _Clean, *, max_new_tokens, temperature, seed, top_n):
    hooks = _fwd_hooks(sae, model, interventions)
    with model.hooks(fwd_hooks=hooks):  # finite activations can still overflow later layers: the logits checked
        s_logits = _check_finite(model(toks).float()[0], interventions, "next-token logits")
    cont = _generate(model, toks, hooks, max_new_tokens, temperature, seed)
    first = 1 if toks.shape[1] > 1 else 0
    kl = float(kl_per_position(s_logits, clean.logits)[first:].mean())
    latents = [it.latent for it in interventions]
    prom = promoted_tokens(model, sae, latents) if latents else None
    if prom is not None:
        shift = float((_centred(s_logits) - _centred(clean.logits))[first:, prom.to(s_logits.device)].mean())
        promoted = [model.tokenizer.decode([int(t)]) for t in prom]
    else:  # nothing steered, or a hook with no direct path to the logits: no promoted tokens to follow
        shift, promoted = (0.0 if not latents else float("nan")), []
    p_c, p_s = clean.logits[-1].softmax(-1), s_logits[-1].softmax(-1)
    change = p_s - p_c
    ids = torch.cat([change.topk(top_n).indices, (-change).topk(top_n).indices]).unique()
    ids = ids[change[ids].argsort(descending=True)]
    prob = [{"token": model.tokenizer.decode([int(t)]), "p_clean": float(p_c[t]), "p_steered": float(p_s[t]),
             "delta": float(change[t])} for t in ids]
    metrics = {"kl": kl, "logit_shift": shift, "fluency": _loss_on(model, toks, cont),
               "fluency_clean": clean.fluency, "promoted": promoted}
    return cont, metrics, prob


@torch.no_grad()
def steer(model, sae, prompt, interventions, *, max_new_tokens: int = SteerOptions.tokens, temperature: float = 1.0,
          seed: int = SteerOptions.seed, top_n: int = 10) -> SteerResult:
    """Clean vs steered generation from ``prompt``, the next-token probability change after it
    (the ``top_n`` biggest rises and falls), and the steering metrics (module docstring)."""
    interventions = as_interventions(interventions)
    _check(sae, model, interventions)
    if max_new_tokens < 1 or not temperature >= 0:
        raise SaelabError(f"max_new_tokens must be at least 1 and temperature at least 0 (0: greedy); got "
                          f"{max_new_tokens} and {temperature}")
    toks = _tokens(model, prompt, max_new_tokens).to(next(model.parameters()).device)
    clean = _Clean(model, toks, max_new_tokens, temperature, seed)
    cont, metrics, prob = _run(model, sae, toks, interventions, clean, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed, top_n=top_n)
    return SteerResult(prompt_tokens=model.to_str_tokens(toks[0]), clean=_decode(model, clean.cont),
                       steered=_decode(model, cont), metrics=metrics, prob_change=prob,
                       clean_ids=clean.cont.tolist(), steered_ids=cont.tolist())


@torch.no_grad()
def sweep(latent: int, coefficients: Iterable[float], *, model, sae, prompt, mode: str = "add",
          max_new_tokens: int = 20, temperature: float = 0.0, seed: int = 0, progress: bool = False) -> list[dict]:
    """One row per coefficient: {coefficient, kl, logit_shift, fluency, fluency_clean, text}.

    ``mode`` "add" (coefficient = α) or "clamp" (coefficient = the value). The clean pass is
    computed once; greedy decoding by default so rows differ only by the coefficient."""
    from tqdm.auto import tqdm

    mode = mode.strip().lower() if isinstance(mode, str) else mode
    if mode not in ("add", "clamp"):
        raise SaelabError(f"sweep mode must be add or clamp, not {mode!r}")
    if isinstance(coefficients, (numbers.Real, torch.Tensor)) and not (
            isinstance(coefficients, torch.Tensor) and coefficients.ndim > 0):
        coefficients = [coefficients]  # one coefficient
    toks = _tokens(model, prompt, max_new_tokens).to(next(model.parameters()).device)
    _check(sae, model, [Intervention(latent)])
    clean = _Clean(model, toks, max_new_tokens, temperature, seed)
    rows = []
    for c in tqdm(list(coefficients), disable=not progress, desc="sweep", unit="coef"):
        cont, m, _ = _run(model, sae, toks, [Intervention(latent, mode, float(c))], clean,
                          max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, top_n=1)
        text = _decode(model, cont)
        rows.append({"coefficient": float(c), "kl": m["kl"], "logit_shift": m["logit_shift"],
                     "fluency": m["fluency"], "fluency_clean": m["fluency_clean"], "text": text})
    return rows


@torch.no_grad()
def prompt_latents(model, sae, text: str, skip_bos: bool = True) -> tuple[list[str], torch.Tensor]:
    """(token strings, SAE codes [T, d_sae]) of ``text`` at the SAE's hook (BOS dropped unless
    ``skip_bos=False``)."""
    hook = _check(sae, model, [])
    toks = _tokens(model, text).to(next(model.parameters()).device)
    _, cache = model.run_with_cache(toks, names_filter=[hook])
    act = cache[hook][0]
    x = act.reshape(act.shape[0], -1).float()
    acts = sae.encode(x.to(sae.W_enc.device))
    strs = model.to_str_tokens(toks[0])
    first = 1 if skip_bos else 0
    return list(strs[first:]), acts[first:]
