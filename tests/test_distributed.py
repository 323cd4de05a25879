"""torchrun-launched training and harvest (gloo on CPU, 2 ranks), driven through the CLI.

* DDP training ends with the weights of a single-process run over the same global batches
  (topk on the fused path with the aux-k loss over dead latents; relu with its L0 controller).
* kill -9 of one rank: the survivor prints one line naming --resume, well within the collective
  timeout; ``--resume`` then finishes with the weights of an uninterrupted run.
* A 2-rank harvest (through the ``--nproc 2`` shortcut) writes the same shards, rows and
  manifest as a single-process one.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from saelab.sae import SAE
from saelab.store import ActivationStore

TIMEOUT = 60  # collective timeout of the ranks (seconds; the issue allows <= 60; at 30 a rank aborted once while
#              the machine also ran a benchmark — not proven to be the timeout)
BATCH = 512
# relu's updates are sensitive to rounding (pre-activations at 0 flip), so its comparison is shorter
STEPS = {"topk": 200, "relu": 60}
# 2 ranks sum the gradient in another order than one process (all-reduce of two halves): ~1e-7 per step,
# which Adam's 1/sqrt(v) scaling can grow over 200 steps on weights with tiny gradients (measured on a clean
# clone with the 0.3 encoder init: 2 of 32,768 W_enc entries 4.7e-5 apart); the relative norm below stays < 1e-4
TOL = {"topk": dict(rtol=1e-4, atol=1e-4), "relu": dict(rtol=1e-3, atol=2e-3)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    # PYTHONFAULTHANDLER: a rank that dies on a signal prints every thread's Python stack
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SAELAB_DIST_TIMEOUT": str(TIMEOUT),
            "PYTHONFAULTHANDLER": "1"}


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "saelab", *args]


def _saelab(*args):
    return [sys.executable, "-m", "saelab", *args]


def _run(cmd, timeout=300):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _train_args(store, out, arch):
    return ["train", "--activations", str(store), "--out", str(out), "--arch", arch, "--k", "8", "--width", "512",
            "--batch-size", str(BATCH), "--tokens", str(BATCH * STEPS[arch]), "--lr", "3e-3", "--dead-tokens", "512",
            "--checkpoint-every", "10", "--log-every", "20", "--quiet"]


@pytest.fixture(scope="module")
def runs(planted_store, tmp_path_factory):
    """{arch: (single-process folder, 2-rank folder)}: the same flags, seed and global batches."""
    root = tmp_path_factory.mktemp("ddp")
    res = {}
    for arch in ["topk", "relu"]:
        single, ddp = root / f"{arch}-1", root / f"{arch}-2"
        _run(_saelab(*_train_args(planted_store, single, arch)))
        _run(_torchrun(*_train_args(planted_store, ddp, arch)))
        res[arch] = single, ddp
    return res


def _weights(folder):
    sae = SAE.load(folder)
    return {n: getattr(sae, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_two_ranks_equal_one_process(runs, arch):
    single, ddp = runs[arch]
    a, b = _weights(single), _weights(ddp)
    moved = (a["W_enc"] - SAE.create(arch, d_in=64, d_sae=512, k=8).W_enc).abs().max()
    assert moved > 0.01  # the runs trained
    for n in a:
        torch.testing.assert_close(b[n], a[n], **TOL[arch], msg=lambda m: f"{arch} {n}: {m}")
        assert float((b[n] - a[n]).norm() / a[n].norm()) < 1e-4, (arch, n)
    # rank 0 alone wrote the metrics: one line per logged step, no checkpoint left
    m1, m2 = ([json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()] for f in (single, ddp))
    assert [r["step"] for r in m2] == list(range(20, STEPS[arch] + 1, 20))
    assert not (ddp / "checkpoint.pt").exists()
    if arch == "topk":  # latents died and aux-k ran: the dead-latent statistics were exercised
        assert any("aux" in r for r in m1) and [("aux" in r) for r in m1] == [("aux" in r) for r in m2]
    else:  # the L0 controller saw the global L0 on both ranks
        assert abs(m1[-1]["sparsity_coeff"] - m2[-1]["sparsity_coeff"]) < 1e-5 * m1[-1]["sparsity_coeff"]


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    for task in pathlib.Path(f"/proc/{launcher_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                env = pathlib.Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(child)
    return None


def test_kill9_one_rank_then_resume(runs, planted_store, tmp_path):
    out = tmp_path / "killed"
    args = _train_args(planted_store, out, "topk")
    p = subprocess.Popen(_torchrun(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim = _rank_pid(p.pid, 1)
    assert victim is not None and p.poll() is None, "the run ended before a rank could be killed"
    t0 = time.time()
    os.kill(victim, signal.SIGKILL)
    _, err = p.communicate(timeout=TIMEOUT + 60)
    elapsed = time.time() - t0
    assert p.returncode != 0
    assert elapsed < TIMEOUT, elapsed  # the survivor did not wait out the collective timeout
    lines = [line for line in err.splitlines() if line.startswith("saelab: error:")]
    assert len(lines) == 1, err[-3000:]
    assert "rank 0 of 2" in lines[0] and "--resume" in lines[0], lines[0]
    assert (out / "checkpoint.pt").exists() and not (out / "sae_weights.safetensors").exists()

    _run(_torchrun(*args, "--resume"))
    a, b = _weights(runs["topk"][1]), _weights(out)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-6, msg=n)


def test_two_rank_harvest_equals_single(tmp_path):
    args = ["harvest", "--hook", "blocks.1.hook_resid_post", "--tokens", str(128 * 40), "--shard-rows", str(128 * 8),
            "--holdout", "0.1", "--batch-size", "8", "--quiet"]
    _run(_saelab(*args, "--out", str(tmp_path / "one")))
    r = _run(_saelab(*args, "--out", str(tmp_path / "two"), "--nproc", "2"))  # the shortcut: execs torchrun
    assert r.stdout.count("wrote 1 store") == 1  # rank 0 reports
    one = ActivationStore(tmp_path / "one" / "blocks.1.hook_resid_post")
    two = ActivationStore(tmp_path / "two" / "blocks.1.hook_resid_post")
    assert [s["first_row"] for s in two.shards] == [s["first_row"] for s in one.shards]
    assert two.manifest["holdout_shards"] == one.manifest["holdout_shards"] and two.manifest["complete"]
    n = one.n_rows("all")
    assert two.n_rows("all") == n == 128 * 40
    a, b = one.rows(np.arange(n)).numpy(), two.rows(np.arange(n)).numpy()
    # the same rows as a set (and, since shards keep global order, row for row)
    assert {r.tobytes() for r in a} == {r.tobytes() for r in b}
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(one.tokens(), two.tokens())
    assert not any(p.name.startswith(".rank") for p in two.path.iterdir())  # per-rank stores merged away


def test_kill9_one_harvest_rank_then_resume(tmp_path):
    """kill -9 of rank 1 mid-harvest: the run fails with one line naming --resume; ``--resume`` with
    2 ranks then completes a store equal, row for row, to a single-process harvest."""
    hook = "blocks.1.hook_resid_post"
    args = ["harvest", "--hook", hook, "--tokens", str(128 * 80), "--shard-rows", str(128 * 4), "--holdout", "0.1",
            "--batch-size", "1", "--quiet"]
    _run(_saelab(*args, "--out", str(tmp_path / "one")))  # the reference
    out = tmp_path / "killed"
    p = subprocess.Popen(_torchrun(*args, "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=_env())
    rank1 = out / hook / ".rank1"
    deadline = time.time() + 120
    while not list(rank1.glob("shard_*.h5")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim = _rank_pid(p.pid, 1)
    assert victim is not None and p.poll() is None, "the harvest ended before a rank could be killed"
    os.kill(victim, signal.SIGKILL)
    _, err = p.communicate(timeout=TIMEOUT + 60)
    assert p.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("saelab: error:")]
    assert len(lines) == 1 and "--resume" in lines[0], err[-3000:]
    assert not (out / hook / "manifest.json").exists()  # nothing merged yet

    _run(_torchrun(*args, "--out", str(out), "--resume"))
    one, two = ActivationStore(tmp_path / "one" / hook), ActivationStore(out / hook)
    n = one.n_rows("all")
    assert two.n_rows("all") == n == 128 * 80 and two.manifest["complete"]
    a, b = one.rows(np.arange(n)).numpy(), two.rows(np.arange(n)).numpy()
    assert {r.tobytes() for r in a} == {r.tobytes() for r in b}
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(one.tokens(), two.tokens())


def test_one_torchrun_rank_joins_a_group(tmp_path):
    """A single torchrun rank (`--nproc_per_node 1`, as on a one-GPU machine) joins a process group of one,
    so it runs the same process-group code as a larger launch; outside torchrun nothing is joined."""
    script = tmp_path / "join.py"
    script.write_text("from saelab import distributed\nwith distributed.session('cpu'):\n"
                      "    print('joined', distributed.active(), distributed.world_size())\n"
                      "print('after', distributed.active())\n")
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "joined True 1" in r.stdout and "after False" in r.stdout, r.stdout
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "joined False 1" in r.stdout, r.stdout + r.stderr[-2000:]
