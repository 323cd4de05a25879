"""Training metrics: ``metrics.jsonl`` always, and TensorBoard or wandb when asked for (``--log``) and installed."""

from __future__ import annotations

import json
import pathlib

from saelab.errors import SaelabError, first_line
from saelab.layout import METRICS_FILE


class MetricsLogger:
    """metrics.jsonl (always) + TensorBoard or wandb when asked for and installed."""

    @staticmethod
    def check(kind: str):
        """The logging backend's module, imported; a one-line error naming the install when it is missing."""
        try:
            if kind == "tensorboard":
                from torch.utils import tensorboard

                return tensorboard
            if kind == "wandb":
                import wandb

                return wandb
        except ImportError:
            raise SaelabError(f"--log {kind} needs the {kind} package: pip install {kind}, or drop --log") from None
        return None

    def __init__(self, out: pathlib.Path, kind: str):
        self.tb = self.wb = None
        mod = self.check(kind)
        self.f = open(out / METRICS_FILE, "a")
        if kind == "tensorboard":
            self.tb = mod.SummaryWriter(str(out / "tensorboard"))
        elif kind == "wandb":
            try:
                self.wb = mod.init(project="saelab", name=out.name, dir=str(out))
            except Exception as e:  # no API key, no network, a bad entity: wandb's own error, on one line
                raise SaelabError(f"--log wandb could not start a run ({first_line(e)}): run `wandb login`, or set "
                                  "WANDB_MODE=offline, or drop --log") from None

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb:
            for k, v in rec.items():
                if k != "step":
                    self.tb.add_scalar(k, v, rec["step"])
        if self.wb:
            self.wb.log(rec, step=rec["step"])

    def close(self) -> None:
        self.f.close()
        if self.tb:
            self.tb.close()
        if self.wb:
            self.wb.finish()
