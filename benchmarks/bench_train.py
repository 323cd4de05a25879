"""Training step rate per architecture, as a fraction of the encoder-GEMM limit, in one run.

    python benchmarks/bench_train.py [--d-in 128,512] [--steps 5]

For each d_in (128 = the tiny model's, 512 = the synthetic store's width) and architecture: a
bare training step (sae.loss + backward + Adam + the decoder constraint, the trainer's inner
loop) at width 16×, batch 4096, on random data already in memory, against a bare
``x @ W_enc`` of the same shapes (the GEMM limit: one encoder product per step, the least any
SAE step must do). Prints tokens/s and the fraction of that limit, and writes
``benchmarks/results/bench_train.json`` (``results.py``).

An SAE whose L0 comes from its weights (relu, gated, panneal: b_enc; jumprelu: θ) is first set
to a trained SAE's sparsity, L0 ≈ k: each latent's cut at its (1 − k/d_sae) quantile of the
batch's pre-activations (``calibrate``). At its random init about half of a ReLU SAE's latents
fire, a state training leaves within its first steps; timing it there would time the dense
fallback, not the step a run spends its time in.
"""

import argparse
import time

import torch

from results import Result
from saelab.sae import SAE

ARCHS = ["relu", "jumprelu", "gated", "panneal", "topk", "batchtopk", "mutualchoice", "featurechoice", "abstopk",
         "matryoshka", "gradient", "archetypal", "mp"]


@torch.no_grad()
def calibrate(sae, x, k):
    """Set each latent's cut (b_enc, or JumpReLU's θ) at its (1 − k/d_sae) quantile of the pre-activations of x, so
    that L0 ≈ k; architectures whose L0 is k by construction are left as they are."""
    if not (hasattr(sae, "log_threshold") or sae.arch in ("relu", "gated", "panneal")):
        return
    z = sae.pre_acts(x)
    q = z.kthvalue(max(1, int(x.shape[0] * (1 - k / sae.d_sae))), dim=0).values
    if hasattr(sae, "log_threshold"):  # jumprelu: θ at the quantile (kept positive)
        sae.log_threshold.copy_(q.clamp_min(1e-3).log())
    elif sae.arch in ("relu", "gated", "panneal"):
        sae.b_enc -= q


def rate(fn, batch, steps):
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return batch * steps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--d-in", default="128,512")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--archs", default=",".join(ARCHS))
    a = p.parse_args()
    res = Result("bench_train", "Training step rate per architecture",
                 "A bare training step of each architecture (`sae.loss` + backward + Adam + the decoder "
                 "constraint: the trainer's inner loop) at width 16× and k 32, on random data already in memory, "
                 "against a bare `x @ W_enc` of the same shapes timed in the same run (the GEMM limit: one "
                 "encoder product per step, the least any SAE step must do). tokens/s over the timed steps "
                 "after one warm-up step.")
    t = res.table("Step rate and fraction of the GEMM limit",
                  ["d_in", "arch", "L0", "tokens/s", "GEMM-limit tokens/s", "fraction of limit"],
                  note=f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {a.batch}, width 16×, "
                       f"k 32, {a.steps} timed steps per measurement",
                  fmt={"L0": ".1f", "tokens/s": ",.0f", "GEMM-limit tokens/s": ",.0f", "fraction of limit": ".3f"})
    for d in map(int, a.d_in.split(",")):
        torch.manual_seed(0)
        x, g = torch.randn(a.batch, d), torch.randn(a.batch, d)
        W = torch.randn(d, 16 * d)
        gemm = rate(lambda: x @ W, a.batch, a.steps)
        for arch in a.archs.split(","):
            sae = SAE.create(arch, d_in=d, d_sae=16 * d, k=32)
            sae.total_steps = 1000
            if sae.rows_for_init(sae.cfg):  # archetypal: its hull's points, from the data
                sae.init_from_rows(x[:sae.rows_for_init(sae.cfg)])
            calibrate(sae, x, 32)
            seen = {}
            opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

            def step():
                out = sae.loss(x, step=500, grads=g)
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                sae.remove_parallel_grads()
                opt.step()
                sae.after_step(out, 500)
                seen["l0"] = float(sae.code_stats(out)[2])  # the training codes' L0

            r = rate(step, a.batch, a.steps)
            t.row(d, arch, seen["l0"], r, gemm, r / gemm)
    res.write()


if __name__ == "__main__":
    main()
