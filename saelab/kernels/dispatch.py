"""Which TopK encode path runs where: ``resolve_kernel`` (an explicit kernel, else ``SAELAB_KERNEL``,
else the device's default) and auto's choice of the screened path over chunked (``auto_screen``).

The rules: auto is triton on CUDA tensors when triton imports, else chunked, and never triton on
CPU tensors; triton named on CPU tensors runs only under ``TRITON_INTERPRET=1``. Auto takes
screened instead of chunked only on a CPU that multiplies bf16 natively (``bf16_matmul_fast``),
for fp32 tensors outside autocast (``screenable``) with d_in·d_sae ≥ ``SCREEN_MIN_WEIGHTS``, while
torch runs ≤ ``SCREEN_MAX_THREADS`` threads; an explicit kernel or ``SAELAB_KERNEL`` always wins.
"""

from __future__ import annotations

import functools
import os

import torch

from saelab.errors import SaelabError

KERNELS = ("auto", "reference", "chunked", "screened", "triton")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_available() -> bool:
    """Whether ``import triton`` works (cached)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            _TRITON_OK = True
        except Exception:  # ImportError, or a broken install
            _TRITON_OK = False
    return _TRITON_OK


_TRITON_OK: bool | None = None


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The path for tensors on ``device``: an explicit kernel wins over ``SAELAB_KERNEL``, which
    wins over auto (triton on CUDA tensors when triton imports, else chunked; never triton on CPU)."""
    if kernel not in KERNELS:
        raise SaelabError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    device = torch.device(device)
    if kernel == "auto":
        env = os.environ.get("SAELAB_KERNEL", "").strip()
        if env and env != "auto":
            if env not in KERNELS:
                raise SaelabError(f"SAELAB_KERNEL={env!r} is not a kernel: choose one of {', '.join(KERNELS)}")
            return resolve_kernel(env, device)
        return "triton" if device.type == "cuda" and triton_available() else "chunked"
    if kernel == "triton":
        if device.type != "cuda" and not _interpreting():
            raise SaelabError(f"the Triton kernel needs CUDA tensors (these are on {device.type}): "
                              "use --kernel chunked, or set TRITON_INTERPRET=1 to run it in the interpreter")
        if not triton_available():
            raise SaelabError("triton is not installed: pip install triton, or use --kernel chunked")
    return kernel


#: auto picks screened over chunked from this many encoder weights (d_in·d_sae) up: below it the
#: screen's bookkeeping outweighs its cheaper GEMM (benchmarks/bench_encode.py times both) ...
SCREEN_MIN_WEIGHTS = 1 << 22
#: ... and only while torch runs at most this many threads: the screen is many small parallel ops
#: per chunk where chunked is one GEMM, so it gains less from more threads and loses to
#: descheduled ones; this is the largest thread count it is timed to win at.
SCREEN_MAX_THREADS = 2


@functools.lru_cache(maxsize=None)
def bf16_matmul_fast() -> bool:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or AMX, through oneDNN): only there
    is the screen's bf16 GEMM much cheaper than chunked's fp32 one."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: no probe, no screen by default
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def screenable(x, W_enc, b_enc) -> bool:
    """The screen's bound is derived for fp32 inputs on CPU without autocast; anything else
    (fp64 gradchecks, bf16 tensors, autocast, CUDA) takes the exact chunked path."""
    return (x.dtype == W_enc.dtype == b_enc.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu"))


def auto_screen(kernel: str, x, W_enc, b_enc) -> bool:
    """auto (no explicit kernel, no SAELAB_KERNEL) on a CPU with fast bf16, fp32, large enough,
    few enough threads (see SCREEN_MIN_WEIGHTS, SCREEN_MAX_THREADS)."""
    env = os.environ.get("SAELAB_KERNEL", "").strip()
    return (kernel == "auto" and env in ("", "auto") and screenable(x, W_enc, b_enc)
            and W_enc.numel() >= SCREEN_MIN_WEIGHTS and torch.get_num_threads() <= SCREEN_MAX_THREADS
            and bf16_matmul_fast())
