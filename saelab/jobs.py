"""What ``saelab train`` trains: the (store, target store) jobs that ``--activations`` holds, the config each SAE
gets from its store (and a transcoder's from its target, a CLT's from every layer's pair), and the check that a
group's ``--resume`` continues this group's run. The trainer (``saelab.train``) runs the jobs."""

from __future__ import annotations

import pathlib

from saelab.config import TRANSCODERS, SAEConfig, TrainConfig
from saelab.errors import SaelabError
from saelab.layout import CIRCUITS_DIR, GRAPHS_DIR, GROUP_FILE, read_group
from saelab.sae import SAE
from saelab.store import ActivationStore


def training_pairs(tcfg: TrainConfig) -> list[tuple[pathlib.Path, pathlib.Path | None]]:
    """(store, target store) of each SAE to train: (store, None) for an SAE on each selected store; for a
    transcoder, each pair of stores that ``--activations`` holds (``--hook``: the pair whose input is that hook)."""
    from saelab.store.pairs import check_aligned, paired_stores

    pairs = paired_stores(tcfg.activations)
    if tcfg.hook is not None:
        picked = [(a, b) for a, b in pairs if ActivationStore(a).hook == tcfg.hook]
        if not picked:
            raise SaelabError(f"--hook {tcfg.hook}: no pair of stores in {tcfg.activations} reads it; its pairs read "
                              f"{', '.join(ActivationStore(a).hook for a, _ in pairs)}")
        pairs = picked
    for a, b in pairs:
        check_aligned(a, b)
    return pairs


def check_group_resume(out: pathlib.Path, by_hook: dict) -> None:
    """--resume of a group: ``out`` holds this group's run (its SAE folders, group.json, circuits), not another's:
    a group of other hooks or a folder of other files is refused, so a second RUN never replaces a group's SAEs."""
    if not (out.is_dir() and any(out.iterdir())):
        raise SaelabError(f"--resume: {out} holds no group run to resume; start without --resume")
    group = read_group(out)
    if group is not None and not set(group[1]) <= set(by_hook):
        other = sorted(set(group[1]) - set(by_hook))
        run = pathlib.Path(next(iter(by_hook.values()))[0]).parent
        raise SaelabError(f"--resume: {out} is a group of other hooks ({', '.join(other)} are not in {run}): resume "
                          "it with the RUN folder it was trained on, or train to a new --out")
    foreign = sorted(c.name for c in out.iterdir()
                     if c.name not in by_hook and c.name not in (GROUP_FILE, CIRCUITS_DIR, GRAPHS_DIR) and not c.name.startswith("."))
    if foreign:
        raise SaelabError(f"--resume: {out} holds {', '.join(foreign[:3])}, which no SAE of this group writes: it is "
                          "not this group's folder; train to a new --out")


def clt_config(inputs: list, targets: list, scfg: SAEConfig) -> SAEConfig:
    """A cross-layer transcoder's config over its layers' stores (one input width, one output width)."""
    widths = {(a.d_in, b.d_in) for a, b in zip(inputs, targets)}
    if len(widths) > 1:
        raise SaelabError(f"--arch clt needs one input width and one output width over its layers, but the pairs of "
                          f"{inputs[0].path.parent} have (d_in, d_out) {sorted(widths)}: pass pairs of one shape")
    (d_in, d_out), = widths
    cfg = SAEConfig.from_dict({**scfg.to_dict(), "d_in": d_in, "d_out": d_out, "hook_name": inputs[0].hook,
                               "hook_name_out": targets[0].hook, "model_name": inputs[0].manifest.get("model", ""),
                               "clt_pairs": [f"{a.hook}:{b.hook}" for a, b in zip(inputs, targets)]})
    return cfg.validate()


def sae_config_for(store: ActivationStore, scfg: SAEConfig, target: ActivationStore | None = None) -> SAEConfig:
    """The SAE's config on ``store`` (and, for a transcoder, the ``target`` store it reconstructs)."""
    m = store.manifest
    if scfg.d_in and scfg.d_in != store.d_in:
        raise SaelabError(f"the SAE's d_in {scfg.d_in} differs from the store's d_in {store.d_in} "
                          f"({store.path}): train on a store of that hook or drop d_in")
    if (target is None) != (scfg.arch not in TRANSCODERS):
        raise SaelabError(f"--arch {scfg.arch} trains on " + ("a pair of stores (input, target): harvest with --pairs "
                          "mlp or --pair IN_HOOK:OUT_HOOK" if target is None else "one store, not a pair"))
    coder = {"d_out": target.d_in, "hook_name_out": target.hook} if target is not None else {}
    cfg = SAEConfig.from_dict({**scfg.to_dict(), "d_in": store.d_in, "hook_name": store.hook,
                               "model_name": m.get("model", ""), **coder})
    cfg.validate()
    if SAE.registry[cfg.arch].needs_grads and not store.has_grads:
        raise SaelabError(f"--arch {cfg.arch} trains on gradients, but {store.path} has none: "
                          "harvest with --with-grads")
    return cfg
