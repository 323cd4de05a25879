"""Latent labels: the researcher's names for latents, kept in the SAE folder's labels.json."""

from __future__ import annotations

import json
import pathlib

from saelab.errors import SaelabError
from saelab.fs import atomic_write_text
from saelab.layout import CFG_FILE, LABELS_FILE, read_json_object


def load_labels(sae_dir) -> dict[int, str]:
    """{latent: label} from the SAE folder's labels.json ({} when there is none)."""
    p = pathlib.Path(sae_dir) / LABELS_FILE
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise SaelabError(f"{p} is not valid JSON ({e.msg}): fix it or delete it") from None
    if not isinstance(raw, dict):
        raise SaelabError(f"{p} must hold a JSON object {{\"latent id\": \"label\"}}: fix it or delete it")
    try:
        return {int(k): str(v) for k, v in raw.items()}
    except ValueError:
        raise SaelabError(f"{p} has a key that is not a latent id: fix it or delete it") from None


def save_label(sae_dir, latent: int, text: str) -> None:
    """Set (or, for empty text, delete) one latent's label; labels.json is rewritten atomically."""
    sae_dir = pathlib.Path(sae_dir)
    if not sae_dir.is_dir():
        raise SaelabError(f"{sae_dir}: no such SAE folder")
    cfg = read_json_object(sae_dir / CFG_FILE) or {}
    d_sae = cfg.get("d_sae")
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
