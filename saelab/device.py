"""Where tensors live and how many threads work on them: one device helper for every command.

Everything runs on the CPU; CUDA is used when present and asked for (``auto``); no code path
assumes a GPU.
"""

from __future__ import annotations

import contextlib

import torch

from saelab.errors import SaelabError


def pick_device(device: str | int | torch.device = "auto") -> torch.device:
    """The torch.device for ``device`` ("auto": cuda when available, else cpu; a torch.device as it is; an int N
    as cuda:N, as torch reads it); CUDA asked for where it is missing, or an unknown spelling (e.g. "gpu"), is a
    one-line SaelabError."""
    if isinstance(device, torch.device):
        device = str(device)
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        device = f"cuda:{device}"
    if not isinstance(device, str):
        raise SaelabError(f"device must be a string such as 'cpu', 'cuda', 'cuda:0' or 'auto', "
                          f"not {type(device).__name__} {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SaelabError(f"--device {device} asked for, but CUDA is not available: use --device cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SaelabError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SaelabError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    mps = getattr(torch.backends, "mps", None)
    if dev.type not in ("cpu", "cuda") and not (dev.type == "mps" and mps is not None and mps.is_available()):
        raise SaelabError(f"--device {device}: saelab runs on cpu or cuda (and mps where torch has it), and this "
                          "torch build cannot use it: use cpu, cuda, cuda:N or auto")
    return dev


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of a model's (or an SAE's) parameters; the CPU for one that has none."""
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def one_thread(device: torch.device | None = None):
    """Run the block on one torch thread (on CPU; a no-op elsewhere). Many small ops (analyze's
    bookkeeping over ~B·k entries, head identification's tiny batched SAEs) gain nothing from intra-op
    threads, and on a busy CPU those threads wait on each other."""
    if device is not None and device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
