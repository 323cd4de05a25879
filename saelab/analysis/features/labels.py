"""Latent labels: the researcher's names for latents, kept in the SAE folder's labels.json."""

from __future__ import annotations

import json
import pathlib

from saelab.errors import SaelabError
from saelab.fs import atomic_write_text
from saelab.layout import CFG_FILE, LABELS_FILE, LABELS_SCHEMA, read_json_object
from saelab.schema import read_json


def load_labels(sae_dir) -> dict[int, str]:
    """{latent: label} from the SAE folder's labels.json ({} when there is none); a damaged one, or one naming a
    latent the SAE does not have, is a one-line error naming the file and the entry."""
    sae_dir = pathlib.Path(sae_dir)
    p = sae_dir / LABELS_FILE
    fix = "fix it or delete it"
    try:
        raw = read_json(p, LABELS_SCHEMA, "labels file", fix)
    except FileNotFoundError:
        return {}
    labels = {int(k): v for k, v in raw.items()}
    d_sae = _d_sae(sae_dir)
    off = [i for i in labels if d_sae and i >= d_sae]
    if off:
        raise SaelabError(f"{p} is not a valid labels file: \"{off[0]}\" is not a latent of this SAE (0..{d_sae - 1}); "
                          f"{fix}")
    return labels


def _d_sae(sae_dir: pathlib.Path) -> int | None:
    """The SAE's width from its cfg.json, or None where it does not say."""
    cfg = read_json_object(sae_dir / CFG_FILE) or {}
    d_sae = cfg.get("d_sae")
    return d_sae if isinstance(d_sae, int) and not isinstance(d_sae, bool) and d_sae > 0 else None


def save_label(sae_dir, latent: int, text: str) -> None:
    """Set (or, for empty text, delete) one latent's label; labels.json is rewritten atomically."""
    sae_dir = pathlib.Path(sae_dir)
    if not sae_dir.is_dir():
        raise SaelabError(f"{sae_dir}: no such SAE folder")
    d_sae = _d_sae(sae_dir)
    if d_sae and not 0 <= int(latent) < d_sae:
        raise SaelabError(f"latent {latent} is out of range: this SAE has latents 0..{d_sae - 1}")
    labels = load_labels(sae_dir)
    text = (text or "").strip()
    if text:
        labels[int(latent)] = text
    else:
        labels.pop(int(latent), None)
    atomic_write_text(sae_dir / LABELS_FILE,
                      json.dumps({str(k): v for k, v in sorted(labels.items())}, indent=1, ensure_ascii=False) + "\n")
