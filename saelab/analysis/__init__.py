"""Analysis on trained SAEs: the feature database (``features``), steering, tasks and circuits."""

import contextlib

import torch

from saelab import SaelabError


@contextlib.contextmanager
def one_thread(device: torch.device | None = None):
    """Run the block on one torch thread (on CPU; a no-op elsewhere). Many small ops (analyze's
    bookkeeping over ~B·k entries, head identification's tiny batched SAEs) are several times
    faster single-threaded on a busy 2-core CPU, where intra-op threads wait on each other."""
    if device is not None and device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def pick_sae(path, hook: str | None, flag: str = "--hook"):
    """(the SAE's folder or hub spec, the SAE loaded on the CPU, the model it names) of a command's ``--sae``: an
    SAE folder, a group folder (with ``hook``, given as ``flag``, when it has several SAEs), or
    ``hf://ORG/REPO/SUBFOLDER`` (read from the hub or its cache: for commands that write nothing next to the SAE,
    so it needs no ``saelab fetch`` first). Errors are one line naming ``flag``."""
    from saelab.app import resolve_target
    from saelab.config import hub_spec
    from saelab.sae.base import SAE

    spec = hub_spec(path)
    if spec:
        if hook is not None:
            raise SaelabError(f"{flag} picks an SAE of a group folder, and {spec} is one SAE: drop {flag}")
        loaded = SAE.load(spec, device="cpu")
        return spec, loaded, loaded.cfg.model_name
    target = resolve_target(path)
    if hook is not None:
        if hook not in target.saes:
            raise SaelabError(f"{flag} {hook} is not in {target.path}: it has {', '.join(target.saes)}")
        folder = target.saes[hook]
    elif len(target.saes) > 1:
        raise SaelabError(f"{target.path} is a group of {len(target.saes)} SAEs: pass {flag}, one of "
                          f"{', '.join(target.saes)}")
    else:
        folder = next(iter(target.saes.values()))
    return folder, SAE.load(folder, device="cpu"), target.model
