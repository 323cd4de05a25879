"""Multi-process runs with ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc_per_node N -m saelab train|harvest ...`` (or ``saelab train|harvest --nproc N``,
which execs exactly that) starts N copies of the command; each finds its rank in the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). ``session()`` joins
the process group (nccl on CUDA, gloo on CPU) with a short collective timeout, so a lost rank
stops the others within that timeout instead of gloo's 30-minute default, and turns the
failure into one line that names ``--resume``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys

import torch
import torch.distributed as dist

from saelab.errors import SaelabError, first_line

DEFAULT_TIMEOUT = 300  # seconds; --dist-timeout or SAELAB_DIST_TIMEOUT
TIMEOUT_ENV = "SAELAB_DIST_TIMEOUT"
# messages of collectives that failed because a peer died or hung (gloo, nccl, the c10d store)
_LOST = ("connection closed", "connection reset", "connection refused", "timed out", "broken pipe", "gloo", "nccl",
         "by peer", "processgroup", "unexpected end of file")


def launched() -> bool:
    """True inside a process started by torchrun (or another launcher that sets WORLD_SIZE > 1).

    One torchrun rank counts too: it joins a process group of one, so `torchrun --nproc_per_node 1`
    runs the same process-group code (nccl on a single GPU) as a larger launch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def rank() -> int:
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if active() else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    return rank() == 0


def device_for(name: str) -> str:
    """The device a rank uses for ``--device name``: under torchrun, CUDA ranks take cuda:LOCAL_RANK."""
    if launched() and torch.cuda.is_available() and name in ("auto", "cuda"):
        return f"cuda:{local_rank()}"
    return name


class RankStopped(Exception):
    """Raised in a rank that the launcher terminated (SIGTERM) because another rank failed."""


def _on_sigterm(signum, frame):
    raise RankStopped("the launcher stopped this rank (another rank failed)")


def timeout_seconds(value: float | None = None) -> float:
    if value is None:
        value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    if value <= 0:
        raise SaelabError(f"--dist-timeout must be positive seconds (got {value})")
    return value


def lost(e: BaseException) -> bool:
    """Does this exception mean a collective failed (a rank died, hung or was stopped)?"""
    if isinstance(e, RankStopped) or (hasattr(dist, "DistError") and isinstance(e, dist.DistError)):
        return True
    return isinstance(e, RuntimeError) and any(p in str(e).lower() for p in _LOST)


def lost_message(what: str, detail: str = "") -> str:
    return (f"rank {rank()} of {world_size()}: lost the other ranks during {what}"
            f"{' (' + detail + ')' if detail else ''}; rerun the same command with --resume to continue")


def short(e: BaseException) -> str:
    """The first line of an exception's message, without file:line prefixes of C++ sources."""
    line = first_line(e)
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    line = line.split(". ", 1)[0]  # the first sentence
    return line[:160]


@contextlib.contextmanager
def session(device: str = "auto", timeout: float | None = None, what: str = "the run"):
    """Join the process group for the duration of a command when launched by torchrun (else a no-op).

    Backend: nccl when this rank uses CUDA, gloo otherwise. A failed collective (or the launcher's
    SIGTERM after another rank died) becomes a SaelabError naming --resume."""
    if not launched() or active():
        yield
        return
    seconds = timeout_seconds(timeout)
    use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank())
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=seconds))
    except Exception as e:  # noqa: BLE001 - rendezvous failures come in several types
        signal.signal(signal.SIGTERM, old)
        raise SaelabError(f"could not join the torchrun process group ({short(e)}): check --master-addr/--master-port "
                          "and that every rank was started") from None
    try:
        yield
    except SaelabError:
        raise
    except BaseException as e:
        if lost(e):
            raise SaelabError(lost_message(what, short(e))) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def exit_rank(code: int) -> None:
    """End a process whose command has returned (its files written and closed, or its cleanup run after an
    interrupt; a torchrun rank's process group destroyed) without the interpreter's finalisation.

    ``destroy_process_group`` only drops Python's references: gloo's worker threads (``pt_gloo_runloop``,
    ``gloo_tcp_loop``) live on until the interpreter tears the process group down, with or without DDP. A
    worker that drops its last reference to a finished collective's tensor during finalisation must take the
    GIL, and that can end in ``terminate called without an active exception`` (SIGABRT), which torchrun
    reports as a failure of the whole run. An interrupted command is alike: a library stopped mid-call (h5py
    closing a file it was writing) can crash the teardown after the one-line message. Nothing is left to do at
    this point, so the process flushes its output and leaves with ``os._exit``: finalisation never runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


def barrier() -> None:
    if active():
        dist.barrier()


def no_buffer_sync() -> dict:
    """DDP's keyword for 'do not sync buffers in forward' (the SAE has none to sync): forward_sync_buffers in newer
    torch, broadcast_buffers in the releases that have only that one."""
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


class Reduce:
    """Combines per-rank training statistics so that every rank holds the global ones."""

    def __init__(self):
        self.world = world_size()

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        t = mask.to(torch.uint8)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.bool()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        t = x.detach().float().clone().reshape(-1)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / self.world).reshape(x.shape)

    def min(self, x: torch.Tensor) -> torch.Tensor:
        t = x.detach().clone().reshape(-1)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t.reshape(x.shape)


def exec_torchrun(nproc: int, argv: list[str]) -> None:
    """Replace this process by ``python -m torch.distributed.run --standalone --nproc_per_node N -m saelab argv``."""
    if nproc < 1:
        raise SaelabError(f"--nproc must be at least 1 (got {nproc})")
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # split the cores between the ranks (torchrun would use 1)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "saelab", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without its --nproc N / --nproc=N."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out
