"""A training run's folder as the state ``--resume`` continues from: its settings file, its checkpoint, its metrics.

- ``train.json`` records the settings, the store (by path and by content) and the step count; ``--resume``
  refuses other settings than the free ones (``RESUME_FREE``) and another store's rows;
- ``checkpoint.pt`` holds the weights, the optimiser, the schedules' counters, the scale and the store
  iterator's state, written atomically (``torch.load(weights_only=True)`` reads it back), so a run killed at any
  point resumes to the batches and the step an uninterrupted run would have seen;
- ``metrics.jsonl`` is cut back to the checkpoint's step (those lines are written again).
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib

import torch

from saelab.config import SAEConfig, TrainConfig, check_resume_settings
from saelab.errors import SaelabError, first_line
from saelab.fs import atomic_write_bytes, atomic_write_text, out_folder, write_error
from saelab.layout import CHECKPOINT_FILE, TRAIN_FILE, read_train_info

#: flags that may differ on --resume: where things are, where it runs and how often it reports
RESUME_FREE = {"activations", "out", "hook", "device", "log", "log_every", "eval_every", "checkpoint_every", "kernel",
               "model"}  # a model folder may move between a run and its --resume, as a store may
_CHECKPOINT_KEYS = {"n_steps", "arch", "sae", "opt", "iterator", "step", "scale"}


def check_out(out: pathlib.Path, resume: bool) -> None:
    """--out before a run writes: empty (or missing) for a fresh run; a run with its settings file for --resume."""
    if resume:
        if not (out / CHECKPOINT_FILE).exists() and not (out / TRAIN_FILE).exists():
            raise SaelabError(f"--resume: {out} holds no checkpoint to resume; start without --resume")
        if not (out / TRAIN_FILE).exists():
            raise SaelabError(f"--resume: {out} has a checkpoint but no {TRAIN_FILE} (its settings and store), so it "
                              "cannot be resumed: train to a new --out")
        return
    out_folder(out)


def store_identity(store) -> dict:
    """What a run's store is, by content rather than by path (a store may move between a run and its
    ``--resume``): model, hook, width, rows, and one digest of every shard's rows and checksum in order."""
    m = store.manifest
    shards = [[s.get("rows"), s.get("sha256"), s.get("file") in m.get("holdout_shards", [])] for s in m["shards"]]
    digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()
    return {"model": m.get("model", ""), "hook": m.get("hook", ""), "d_in": m.get("d_in"),
            "n_tokens": m.get("n_tokens"), "shards_sha256": digest}


def check_resumable(out: pathlib.Path, tcfg: TrainConfig, cfg: SAEConfig, store, target=None) -> dict:
    """The run's train.json, once its settings and its store (and a transcoder's target store) are the ones this
    command gives (a one-line refusal otherwise; a train.json of an older saelab without a store identity: the
    store is not checked)."""
    saved = read_train_info(out, "train again into a new --out")
    recorded = {**saved.get("sae", {}), **saved.get("train", {})}
    check_resume_settings(recorded, {**cfg.to_dict(), **tcfg.to_dict()}, RESUME_FREE, out, "train to a new --out")
    for key, st in (("store_identity", store), ("target_identity", target)):
        was = saved.get(key)
        if not was or st is None:
            continue
        now = store_identity(st)
        diff = [f"{k} {was.get(k)!r} → {now[k]!r}" if k != "shards_sha256" else "its shards' checksums differ"
                for k in now if was.get(k) != now[k]]
        if diff:
            raise SaelabError(f"--resume on another store than the run in {out} was trained on ({st.path}: "
                              f"{'; '.join(diff)}): pass --activations of the run's store (it may have moved), "
                              "or train to a new --out")
    return saved


def write_run_info(out: pathlib.Path, tcfg: TrainConfig, cfg: SAEConfig, store, n_steps: int, world: int,
                   scale: float, target=None, scale_out: float | None = None, extra: dict | None = None) -> None:
    """train.json of a run that starts: its settings, its store (path and identity), steps, ranks and scale; a
    transcoder's also its target store and the targets' scale; ``extra`` keys (an MFR member's index and seed)."""
    info = {"train": tcfg.to_dict(), "sae": cfg.to_dict(), "store": str(pathlib.Path(store.path).resolve()),
            "store_identity": store_identity(store), "n_steps": n_steps, "world_size": world, "scale": scale,
            "done": False}
    if target is not None:
        info.update(target=str(pathlib.Path(target.path).resolve()), target_identity=store_identity(target),
                    scale_out=scale_out)
    info.update(extra or {})
    atomic_write_text(out / TRAIN_FILE, json.dumps(info, indent=2) + "\n")


def mark_done(out: pathlib.Path, epochs: float) -> None:
    """train.json says the run finished (``--resume`` of it returns at once), and the checkpoint goes."""
    info = read_train_info(out, "train again into a new --out")
    info.update(done=True, epochs=round(epochs, 4))
    atomic_write_text(out / TRAIN_FILE, json.dumps(info, indent=2) + "\n")
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)


def save_checkpoint(out: pathlib.Path, sae, opt, it, step: int, n_steps: int, scale: float, arch: str,
                    scale_out: float | None = None) -> None:
    """The checkpoint, serialised in memory and written by Python (a full disk is a one-line error, the previous
    checkpoint kept), atomically."""
    buf = io.BytesIO()
    torch.save({"sae": sae.state_dict(), "opt": opt.state_dict(), "iterator": json.dumps(it.state_dict()),
                "step": step, "n_steps": n_steps, "scale": scale, "arch": arch,
                "scale_out": scale if scale_out is None else scale_out}, buf)
    try:
        atomic_write_bytes(out / CHECKPOINT_FILE, buf.getbuffer())
    except OSError as e:
        raise write_error(out / CHECKPOINT_FILE, e) from None


def load_checkpoint(out: pathlib.Path, sae, opt, it, n_steps: int, arch: str, device) -> tuple[int, float, float]:
    """Restore the SAE, the optimiser and the iterator from the run's checkpoint; returns (step, scale, the targets'
    scale: a transcoder's, else the scale). A damaged
    or foreign file, or one of another run length or architecture, is a one-line error."""
    path = out / CHECKPOINT_FILE
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, empty or foreign bytes: torch's own error
        raise SaelabError(f"{path} is damaged ({first_line(e, 120)}): delete it and rerun with --resume "
                          "to start the run over, or train to a new --out") from None
    if not isinstance(ck, dict) or not _CHECKPOINT_KEYS <= set(ck):
        raise SaelabError(f"{path} is not a saelab checkpoint: delete it and rerun with --resume to "
                          "start the run over, or train to a new --out")
    if ck["n_steps"] != n_steps or ck["arch"] != arch:
        raise SaelabError(f"--resume with different settings than the run in {out}: pass the same flags")
    sae.load_state_dict(ck["sae"])
    opt.load_state_dict(ck["opt"])
    it.load_state_dict(json.loads(ck["iterator"]))
    return int(ck["step"]), float(ck["scale"]), float(ck.get("scale_out", ck["scale"]))


def truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Drop metrics lines written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            break  # a torn last line from the kill
    atomic_write_text(path, "".join(l + "\n" for l in keep))
