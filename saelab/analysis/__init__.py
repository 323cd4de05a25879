"""Analysis on trained SAEs: the feature database (``features``), steering, tasks and circuits."""

import contextlib

import torch


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
