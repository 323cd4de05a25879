"""The ``autointerp`` suite: explain each latent from its top windows, then score the explanation on windows held
out from it (delphi's and SAEBench's detection and fuzzing protocols).

Windows are non-overlapping stretches of ``WINDOW`` tokens (BOS left out) of up to ``CONTEXTS`` contexts of the
store's held-out text, and a latent's activation of a window is its largest on a token there. Latents: a seeded
sample of ``n_latents`` among those that fire on at least ``2 · N_EXPLAIN`` windows and on at most 10% of tokens
(dense ones say nothing a window shows) and leave at least ``N_SCORE`` windows unfired. For each latent:

- the judge (``saelab.suites.judges``) explains it from its ``N_EXPLAIN`` top windows, the tokens it fires on
  marked;
- **detection**: the judge reads ``N_SCORE`` windows from the latent's top quantile (the top fifth of the windows
  it fires on, the explanation's windows left out) and ``N_SCORE`` random windows where it never fires, shuffled,
  and says which show the feature; the score is the balanced accuracy (mean of the two classes' accuracies);
- **fuzzing**: top-quantile windows with the tokens the latent fires on marked, and as many with the same number of
  tokens marked where it does not fire; the judge says which marks fit the explanation; balanced accuracy;
- **detection_control**: detection of the same windows with the next sampled latent's explanation: what an
  explanation that is not about this latent scores (near 0.5 for a judge that reads explanations).

Every explanation and score is written to ``autointerp.json`` in the SAE folder as it comes (per judge, bound to
the weights' sha256), so an interrupted run resumes where it stopped and asks the judge nothing twice.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch

from saelab.device import device_of
from saelab.errors import SaelabError
from saelab.fs import atomic_write_text, sha256_file
from saelab.hooks import activation_at
from saelab.layout import WEIGHTS_FILE
from saelab.suites.judges import Window

AUTOINTERP_FILE = "autointerp.json"
WINDOW = 16
CONTEXTS = 512
#: dense codes one batch of contexts may hold
CODES_BYTES = 1 << 28
N_EXPLAIN, N_SCORE = 10, 10
DENSE = 0.1
FORMAT = 1


def _token_strings(tokenizer):
    cache: dict[int, str] = {}

    def get(i: int) -> str:
        if i not in cache:
            cache[i] = tokenizer.decode([i])
        return cache[i]

    return get


@torch.no_grad()
def _window_acts(model, sae, contexts: np.ndarray, latents=None):
    """Without ``latents``: (windows each latent fires in [d_sae], tokens each fires on [d_sae]), counts only. With
    ``latents``: [n_windows, WINDOW, len(latents)], their activations per token (|activation| for a signed SAE: a
    window's strength is its largest magnitude, firing is a code ≠ 0). Batches hold at most CODES_BYTES of codes."""
    hook, device = sae.cfg.hook_name, device_of(model)
    n_win = (contexts.shape[1] - 1) // WINDOW
    span = n_win * WINDOW
    batch = max(1, min(64, CODES_BYTES // max(1, span * sae.d_sae * 4)))
    out, fired = [], torch.zeros(sae.d_sae, dtype=torch.long)
    win_fired = torch.zeros(sae.d_sae, dtype=torch.long)
    for b in range(0, len(contexts), batch):
        toks = torch.as_tensor(contexts[b:b + batch], dtype=torch.long, device=device)
        x = activation_at(model, toks, hook, "pass the model this SAE was trained on")
        x = x[:, 1:1 + span].float().to(sae.W_enc.device)
        f = sae.encode(x.reshape(-1, x.shape[-1])).float()
        if latents is None:
            on = f != 0
            fired += on.sum(0).cpu()
            win_fired += on.reshape(len(toks) * n_win, WINDOW, -1).any(1).sum(0).cpu()
        else:
            out.append(f[:, latents].abs().reshape(len(toks) * n_win, WINDOW, -1).cpu())
    return (win_fired, fired) if latents is None else torch.cat(out)


def _windows(contexts: np.ndarray) -> np.ndarray:
    """The token ids of every window, [n_windows, WINDOW], in _window_acts's order."""
    n_win = (contexts.shape[1] - 1) // WINDOW
    return contexts[:, 1:1 + n_win * WINDOW].reshape(-1, WINDOW)


def balanced_accuracy(said: list[bool], truth: list[bool]) -> float:
    """Mean of the accuracy on the true and on the false examples."""
    said, truth = np.asarray(said, bool), np.asarray(truth, bool)
    return float(((said[truth]).mean() + (~said[~truth]).mean()) / 2)


class Record:
    """``autointerp.json``: per judge, the setting its scores hold for (``setting``: the store, its split, a hash of
    the sampled contexts, the model, the seed, the window and sample sizes) and per latent its explanation and scores;
    rewritten atomically per change. A judge's record of another setting, or of other weights, starts over."""

    def __init__(self, sae_dir: pathlib.Path, judge_id: str, setting: dict | None = None,
                 sha: str | None = None):
        self.path = sae_dir / AUTOINTERP_FILE
        self.judge = judge_id
        self.sha = sha or sha256_file(sae_dir / WEIGHTS_FILE)
        data = None
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise SaelabError(f"{self.path} is not valid JSON: delete it and run the suite again") from None
        if not isinstance(data, dict) or data.get("sae_sha256") != self.sha or not isinstance(data.get("judges"),
                                                                                               dict):
            data = {"format": FORMAT, "sae_sha256": self.sha, "judges": {}}  # another SAE's, or none: start over
        mine = data["judges"].get(judge_id)
        if not isinstance(mine, dict) or not isinstance(mine.get("latents"), dict) or (
                setting is not None and mine.get("setting") != setting):
            mine = data["judges"][judge_id] = {"setting": setting, "latents": {}}
        self.data, self.latents = data, mine["latents"]

    def get(self, latent: int) -> dict:
        return self.latents.get(str(latent), {})

    def put(self, latent: int, **fields) -> None:
        self.latents[str(latent)] = {**self.get(latent), **fields}
        self.data["last"] = self.judge
        atomic_write_text(self.path, json.dumps(self.data, indent=1, ensure_ascii=False) + "\n")


def load_explanations(sae_dir, sha: str | None = None) -> dict[int, str]:
    """{latent: explanation} of the judge that ran last on this SAE folder ({} when none has, or the file is of other
    weights or damaged: explanations are a derived record, never an error for a reader such as the app). ``sha``:
    the weights' sha256 where the caller knows it (else it is computed)."""
    sae_dir = pathlib.Path(sae_dir)
    try:
        data = json.loads((sae_dir / AUTOINTERP_FILE).read_text(encoding="utf-8"))
        if data.get("sae_sha256") != (sha or sha256_file(sae_dir / WEIGHTS_FILE)):
            return {}
        return {int(k): v["explanation"] for k, v in data["judges"][data["last"]]["latents"].items()
                if isinstance(v, dict) and isinstance(v.get("explanation"), str)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SaelabError):
        return {}


def autointerp_scores(sae, sae_dir, model, store, judge, n_latents: int = 50, seed: int = 0,
                      progress: bool = False) -> dict:
    """The autointerp suite's scores of ``sae`` (its folder ``sae_dir``) over ``model`` and ``store``'s held-out
    text (its train split when it holds none out), with ``judge`` (``TokensJudge`` or ``OpenAIJudge``)."""
    import hashlib

    from tqdm.auto import tqdm

    sae = sae.one_layer("the autointerp suite").eval().to(device_of(model))
    if n_latents < 2:
        raise SaelabError(f"--autointerp-latents must be at least 2 (got {n_latents}): each latent's control is "
                          "another latent's explanation")
    if sae.cfg.hook_name not in model.hook_dict:
        raise SaelabError(f"the model has no hook {sae.cfg.hook_name!r}: pass the model this SAE was trained on "
                          "(--model)")
    split = "holdout" if store.split_shards("holdout") else "train"
    contexts = store.tokens(split)
    rng = np.random.default_rng(seed)
    if len(contexts) > CONTEXTS:
        contexts = contexts[np.sort(rng.choice(len(contexts), CONTEXTS, replace=False))]
    if contexts.shape[1] <= WINDOW:
        raise SaelabError(f"store {store.path}: contexts of {contexts.shape[1]} tokens are too short for windows of "
                          f"{WINDOW}: harvest with a longer --context-size")
    ids = _windows(contexts)
    n_windows = len(ids)
    n_fire, fired = _window_acts(model, sae, contexts)
    density = fired.double() / (n_windows * WINDOW)
    live = torch.nonzero((n_fire >= 2 * N_EXPLAIN) & (n_windows - n_fire >= N_SCORE) & (density <= DENSE)) \
        .squeeze(1).numpy()
    if len(live) < 2:
        raise SaelabError(f"only {len(live)} latents fire on at least {2 * N_EXPLAIN} of the {n_windows} windows of "
                          f"{len(contexts)} held-out contexts: the autointerp suite needs two; harvest more text")
    latents = [int(j) for j in np.sort(rng.choice(live, min(n_latents, len(live)), replace=False))]
    acts = _window_acts(model, sae, contexts, latents)  # [n_windows, WINDOW, n]
    tok = _token_strings(model.tokenizer)

    def window(w: int, col: int) -> Window:
        return Window([tok(int(t)) for t in ids[w]], [float(a) for a in acts[w, :, col]])

    setting = {"store": str(store.path), "split": split, "model": str(getattr(model.cfg, "model_name", "")),
               "contexts_sha256": hashlib.sha256(np.ascontiguousarray(contexts).tobytes()).hexdigest(),
               "seed": seed, "window": WINDOW, "n_explain": N_EXPLAIN, "n_score": N_SCORE}
    record = Record(pathlib.Path(sae_dir), judge.id, setting)
    sets = {}
    for col, j in enumerate(latents):
        top = acts[:, :, col].amax(1)
        order = torch.argsort(top, descending=True, stable=True).numpy()
        firing = order[: int((top > 0).sum())]
        explain = firing[:N_EXPLAIN]
        quantile = firing[N_EXPLAIN: max(N_EXPLAIN + N_SCORE, len(firing) // 5)]
        lrng = np.random.default_rng([seed, j])
        pos = lrng.choice(quantile, min(N_SCORE, len(quantile)), replace=False)
        neg = lrng.choice(np.nonzero((top == 0).numpy())[0], N_SCORE, replace=False)
        sets[j] = (col, explain, pos, neg, lrng)
    for j in tqdm(latents, desc="explain", unit="latent", disable=not progress):
        if "explanation" not in record.get(j):
            col, explain = sets[j][:2]
            record.put(j, explanation=judge.explain([window(int(w), col) for w in explain]))
    for i, j in enumerate(tqdm(latents, desc="score", unit="latent", disable=not progress)):
        col, _, pos, neg, lrng = sets[j]
        shown = lrng.permutation(np.concatenate([pos, neg]))
        truth = np.isin(shown, pos).tolist()
        texts = [window(int(w), col) for w in shown]
        partner = latents[(i + 1) % len(latents)]  # the control: the next sampled latent's explanation
        mine, other = record.get(j)["explanation"], record.get(partner)["explanation"]
        # fuzzing: half the top-quantile windows marked where the latent fires, half as many tokens where it does not
        fz = [window(int(w), col) for w in lrng.permutation(pos)]
        marks, right = [], []
        for k, w in enumerate(fz):
            on = [a > 0 for a in w.acts]
            if k % 2 == 0 or all(on):
                marks.append(on)
                right.append(True)
            else:
                off = np.nonzero(~np.asarray(on))[0]
                pick = set(lrng.choice(off, min(sum(on), len(off)), replace=False).tolist())
                marks.append([t in pick for t in range(len(on))])
                right.append(False)
        # each score is kept as it comes (the windows are drawn again alike): a rerun asks for none of them again
        if "detection" not in record.get(j):
            record.put(j, detection=balanced_accuracy(judge.detect(mine, texts), truth))
        if record.get(j).get("control_latent") != partner:  # another sample gives another partner: scored again
            record.put(j, detection_control=balanced_accuracy(judge.detect(other, texts), truth),
                       control_latent=partner)
        if "fuzzing" not in record.get(j):
            fuzzing = balanced_accuracy(judge.fuzz(mine, fz, marks), right) if 0 < sum(right) < len(right) else None
            record.put(j, fuzzing=fuzzing)
    scored = [record.get(j) for j in latents]
    fz_all = [s["fuzzing"] for s in scored if s.get("fuzzing") is not None]
    return {"explainer": judge.id, "n_latents": len(latents), "windows": n_windows, "split": split,
            "detection": float(np.mean([s["detection"] for s in scored])),
            "detection_control": float(np.mean([s["detection_control"] for s in scored])),
            "fuzzing": float(np.mean(fz_all)) if fz_all else None, "latents": latents}
