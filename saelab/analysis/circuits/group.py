"""An SAE group as a circuit reads it: its SAEs in hook order, all of one model, and that model."""

from __future__ import annotations

import dataclasses
import pathlib

from saelab.errors import SaelabError


@dataclasses.dataclass
class SAEGroup:
    """The SAEs of a group, in hook order (shallowest first)."""

    model: str
    path: pathlib.Path
    hooks: list[str]
    saes: dict            # hook → SAE
    folders: dict         # hook → SAE folder

    @property
    def n_latents(self) -> int:
        return sum(s.d_sae for s in self.saes.values())


def load_group(path, device="cpu") -> SAEGroup:
    """A group folder (``group.json``) or one SAE folder. Every SAE must come from one model."""
    from saelab.hooks import hook_layer
    from saelab.layout import group_or_folder
    from saelab.sae import SAE

    path, model, folders = group_or_folder(path, "pass --saes runs/GROUP")
    if folders is None:
        sae = SAE.load(path, device)
        folders = {sae.cfg.hook_name: path}
        saes = {sae.cfg.hook_name: sae}
    else:
        saes = {h: SAE.load(f, device) for h, f in folders.items()}
    models = {}
    for h, sae in saes.items():
        if sae.cfg.hook_name_out:  # its splice replaces another hook than it reads: not the circuit's SAE splice
            raise SaelabError(f"{folders[h]} is a {sae.cfg.arch} (reads {h}, writes {sae.cfg.hook_name_out}): sparse "
                              "feature circuits run over SAEs; pass a group of SAEs")
        if sae.cfg.hook_name and sae.cfg.hook_name != h:
            raise SaelabError(f"{folders[h]} reads hook {sae.cfg.hook_name!r} but the group lists it under {h!r}: "
                              "fix group.json")
        models[h] = sae.cfg.model_name or model
    names = {m for m in models.values() if m}
    if model:
        names.add(model)
    if len(names) > 1:
        detail = ", ".join(f"{h}: {m}" for h, m in models.items())
        raise SaelabError(f"the SAEs come from different models ({detail}"
                          f"{'; group.json: ' + model if model else ''}): a circuit needs SAEs of one model")
    if not names:
        raise SaelabError(f"{path}: no model name in group.json or the SAEs' cfg.json: cannot tell which model to load")
    hooks = sorted(saes, key=lambda h: (hook_layer(h) if hook_layer(h) is not None else -1,
                                        "resid_pre" not in h, "resid_post" in h, h))
    for s in saes.values():
        s.eval().requires_grad_(False)
    return SAEGroup(names.pop(), path, hooks, saes, {h: pathlib.Path(folders[h]).resolve() for h in hooks})


def check_model(model, group: SAEGroup):
    """A one-line error unless ``model`` is the model the group's SAEs read and has their hooks."""
    from saelab.models import same_model

    name = getattr(model, "saelab_name", None)
    if name and not same_model(name, group.model):
        raise SaelabError(f"the SAEs were trained on model {group.model!r}, not {name!r}: load that model")
    for h, s in group.saes.items():
        if h not in model.hook_dict:
            raise SaelabError(f"the model has no hook {h!r} (SAE {group.folders[h]}): pass the model it was trained on")


def load_group_model(group: SAEGroup, device="auto"):
    """The model the group's SAEs were trained on, loaded on ``pick_device(device)`` and checked against them."""
    from saelab.device import pick_device
    from saelab.models import load_model

    if group.model == "synthetic":
        raise SaelabError(f"{group.path}: these SAEs were trained on a synthetic store, which no model computes: "
                          "pass SAEs trained on a model's activations")
    model = load_model(group.model, pick_device(device))
    check_model(model, group)
    return model
