"""saelab against SAELens, side by side, on the same activations (run by `make bench`).

    python benchmarks/bench_vs_saelens.py --saelens-python .venv-bench/bin/python \
        [--store activations/bench512] [--archs topk,relu,jumprelu] [--reps 3] [--steps 4] \
        [--budget 1000000] [--budget-archs topk]

SAELens pins transformer-lens < 4, so it lives in its own environment (`.venv-bench`, made by
`make bench-venv`); each measurement is a separate process of the matching interpreter, and
the two libraries alternate (saelab, SAELens, saelab, ...) so that a machine shared with other
work slows both alike; the tables report medians.

1. The store: `saelab synthetic` at d_in 512 (made once, reused). Both sides read the same
   batches from it with `saelab.store.ActivationStore.batches` (same seed), scaled by the same
   factor (mean ‖x‖ = √d_in).
2. Step rate: a bare training-step loop over batches already in memory — SAELens:
   `TrainingSAE.training_forward_pass(TrainStepInput(...))` + backward + grad clip + Adam +
   its trainer's firing statistics; saelab: `sae.loss` + backward + the decoder-gradient
   projection + grad clip + Adam + `sae.after_step` (the trainer's inner loop). Width 16×
   (d_sae 8192), k 32, batch 4096, the same LR. Against the step rate the encoder GEMM alone
   allows (`x @ W_enc`, measured in the same process): the least work any SAE step does.
3. Quality: each trains for the same token budget (default 1M) on the same batch stream,
   then FVU and L0 are measured on the same 16,384 held-out rows.

Each library keeps its own defaults for everything not listed (SAELens: decoder init norm
0.1, W_enc = W_decᵀ, activations rescaled by decoder norms, aux-k coefficient 1; saelab: unit-norm
decoder with W_enc = 0.3·W_decᵀ for TopK, aux-k 1/32), b_dec at zero on both (SAELens 6.54's
trainer has no b_dec init; saelab's trainer would start it at the geometric median, which this
bare loop leaves out on both sides). Within 1M tokens neither side's dead-latent window
(saelab 10M tokens, SAELens 1000 steps) is reached, so neither aux-k loss is active.
relu/jumprelu/gated use a fixed sparsity coefficient on both sides (SAELens's
l1_coefficient / l0_coefficient; saelab's --l1-coeff / --l0-coeff), not saelab's L0 controller.
Before the step-rate timing, each side's relu, gated and jumprelu SAE is set to a trained SAE's
sparsity, L0 ≈ k (``calibrate``: each latent's encoder bias, gate bias or threshold at its
(1 − k/d_sae) quantile of the first batch's pre-activations): at their random init about half of
the latents fire, a state training leaves within its first steps. The table's L0 columns are the
last timed step's. mp is SAELens's matching pursuit with k fixed steps on both sides
(max_iterations k, no residual or duplicate-support stop).

Writes ``benchmarks/results/bench_vs_saelens.json`` (``results.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DESCRIPTION = (
    "saelab against SAELens on the same activations: a `saelab synthetic` store at d_in 512, both sides reading "
    "the same batches (`ActivationStore.batches`, same seed, same scale: mean ‖x‖ = √d_in). SAELens lives in its "
    "own environment (`make bench-venv`); each measurement is a separate process and the two libraries alternate, "
    "medians reported. Step rate: a bare training-step loop over batches already in memory (SAELens: "
    "`training_forward_pass` + backward + grad clip + Adam + its trainer's firing statistics; saelab: `sae.loss` + "
    "backward + the decoder-gradient projection + grad clip + Adam + `sae.after_step`), width 16× (d_sae 8192), "
    "k 32, batch 4096, the same LR, against the step rate the encoder GEMM alone allows, measured in the same "
    "processes. Quality: each trains for the same token budget on the same batch stream, then FVU and L0 on the "
    "same 16,384 held-out rows. Each library keeps its own defaults otherwise (see the script's docstring).")
D_IN, EXPANSION, K, BATCH = 512, 16, 32, 4096
HOLDOUT_ROWS = 16384
COEFF = {"relu": 5.0, "jumprelu": 5.0, "gated": 5.0}  # l1 / l0 coefficients (both libraries)


def calibrate(sae, x):
    """Set the SAE (either library's) to L0 ≈ K on x: each latent's cut (b_gate, JumpReLU's threshold, or b_enc) at
    its (1 − K/d_sae) quantile of the pre-activations (x − b_dec) W_enc + bias. TopK-like SAEs are left as they
    are (their L0 is K by construction)."""
    import torch

    with torch.no_grad():
        gate = getattr(sae, "b_gate", None)
        bias = gate if gate is not None else getattr(sae, "b_enc", None)
        name = type(sae).__name__.lower()
        if bias is None or not any(t in name for t in ("relu", "standard", "gated")):
            return
        z = (x - sae.b_dec) @ sae.W_enc + bias
        q = z.kthvalue(int(x.shape[0] * (1 - K / z.shape[1])), dim=0).values
        if "jumprelu" in name:  # the threshold at the quantile (saelab: log θ; SAELens: θ itself)
            if hasattr(sae, "log_threshold"):
                sae.log_threshold.copy_(q.clamp_min(1e-3).log())
            else:
                sae.threshold.copy_(q.clamp_min(1e-3))
        else:
            bias -= q


# ------------------------------------------------------------------------ the worker side
def _batches(store_path, scale, n_tokens, seed=0, split="train", shuffle=True):
    from saelab.store import ActivationStore

    store = ActivationStore(store_path, verify=False)
    for x in store.batches(BATCH, split=split, tokens=n_tokens, seed=seed, shuffle=shuffle):
        yield x * scale


def _gemm_rate(steps=4):
    import torch

    x, W = torch.randn(BATCH, D_IN), torch.randn(D_IN, D_IN * EXPANSION)
    x @ W
    t0 = time.perf_counter()
    for _ in range(steps):
        x @ W
    return BATCH * steps / (time.perf_counter() - t0)


class SaelabSide:
    def __init__(self, arch, lr, total_steps):
        import torch

        from saelab.sae import SAE

        kw = ({"l1_coeff": COEFF[arch]} if arch in ("relu", "gated") else
              {"l0_coeff": COEFF["jumprelu"]} if arch == "jumprelu" else {})
        self.sae = SAE.create(arch, d_in=D_IN, d_sae=D_IN * EXPANSION, k=K, **kw)
        self.l0 = None
        self.sae.total_steps = total_steps
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)
        self.step_no = 0

    def step(self, x):
        import torch

        sae = self.sae
        out = sae.loss(x, step=self.step_no)
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        sae.remove_parallel_grads()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        self.opt.step()
        sae.after_step(out, self.step_no)
        self.l0 = float(sae.code_stats(out)[2])
        self.step_no += 1

    def reconstruct(self, x):
        f = self.sae.encode(x)
        return self.sae.decode(f), f


class SaelensSide:
    def __init__(self, arch, lr, total_steps):
        import torch
        from sae_lens.saes.sae import TrainStepInput  # noqa: F401 - checked here, used in step

        d_sae = D_IN * EXPANSION
        if arch == "topk":
            from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

            self.sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=d_sae, k=K, device="cpu"))
            self.coeffs = {}
        elif arch == "relu":
            from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig

            self.sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=d_sae, device="cpu",
                                                                     l1_coefficient=COEFF["relu"]))
            self.coeffs = {"l1": COEFF["relu"]}
        elif arch == "gated":
            from sae_lens import GatedTrainingSAE, GatedTrainingSAEConfig

            self.sae = GatedTrainingSAE(GatedTrainingSAEConfig(d_in=D_IN, d_sae=d_sae, device="cpu",
                                                               l1_coefficient=COEFF["gated"]))
            self.coeffs = {"l1": COEFF["gated"]}
        elif arch == "batchtopk":
            from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

            self.sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=d_sae, k=K, device="cpu"))
            self.coeffs = {}
        elif arch == "mp":
            from sae_lens import MatchingPursuitTrainingSAE, MatchingPursuitTrainingSAEConfig

            self.sae = MatchingPursuitTrainingSAE(MatchingPursuitTrainingSAEConfig(
                d_in=D_IN, d_sae=d_sae, device="cpu", max_iterations=K, residual_threshold=0.0,
                stop_on_duplicate_support=False))
            self.coeffs = {}
        else:
            from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

            self.sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=d_sae, device="cpu",
                                                                     l0_coefficient=COEFF["jumprelu"]))
            self.coeffs = {"l0": COEFF["jumprelu"]}
        self.sae.train()
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)
        # SAELens's trainer: a latent is dead after dead_feature_window (1000) steps without firing
        self.since_fired = torch.zeros(d_sae, dtype=torch.long)
        self.dead_window = 1000
        self.total_steps = total_steps
        self.step_no = 0
        self.l0 = None

    def step(self, x):
        import torch
        from sae_lens.saes.sae import TrainStepInput

        out = self.sae.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients=self.coeffs, dead_neuron_mask=self.since_fired > self.dead_window,
            n_training_steps=self.step_no, is_logging_step=False))
        with torch.no_grad():  # as SAELens's SAETrainer._train_step
            fired = out.feature_acts.bool().float().sum(-2).bool()
            if fired.is_sparse:
                fired = fired.to_dense()
            self.since_fired += 1
            self.since_fired[fired] = 0
        self.l0 = float((out.feature_acts != 0).sum(-1).float().mean())
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        self.step_no += 1

    def reconstruct(self, x):
        f = self.sae.encode(x)
        if f.is_sparse:
            f = f.to_dense()
        return self.sae.decode(f), f


def worker(a) -> dict:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    side_cls = SaelabSide if a.worker == "saelab" else SaelensSide
    if a.phase == "speed":
        xs = list(_batches(a.store, a.scale, BATCH * (a.steps + 1)))
        side = side_cls(a.arch, a.lr, total_steps=10 * a.steps)
        calibrate(side.sae, xs[0])
        side.step(xs[0])  # warm-up
        t0 = time.perf_counter()
        for x in xs[1:]:
            side.step(x)
        rate = BATCH * a.steps / (time.perf_counter() - t0)
        return {"tokens_per_s": rate, "gemm_tokens_per_s": _gemm_rate(), "l0": side.l0}
    steps = a.budget // BATCH
    side = side_cls(a.arch, a.lr, total_steps=steps)
    t0 = time.perf_counter()
    for i, x in enumerate(_batches(a.store, a.scale, steps * BATCH)):
        side.step(x)
        if (i + 1) % 20 == 0:
            print(f"    {a.worker} {a.arch}: step {i + 1}/{steps}, {(i + 1) * BATCH / (time.perf_counter() - t0):,.0f} tok/s",
                  file=sys.stderr, flush=True)
    rate = steps * BATCH / (time.perf_counter() - t0)
    with torch.no_grad():
        if hasattr(side.sae, "eval"):
            side.sae.eval()
        x = torch.cat(list(_batches(a.store, a.scale, HOLDOUT_ROWS, split="holdout", shuffle=False)))
        err = tot = l0 = 0.0
        for xb in x.split(BATCH):
            x_hat, f = side.reconstruct(xb)
            err += float((xb - x_hat).double().pow(2).sum())
            l0 += float((f != 0).sum())
        tot = float((x - x.mean(0)).double().pow(2).sum())
    return {"tokens_per_s": rate, "fvu": err / tot, "l0": l0 / len(x), "steps": steps}


# ------------------------------------------------------------------------ the parent side
def ensure_store(path: pathlib.Path) -> float:
    """Make the d_in 512 store (once) and return the input scale (mean ‖s·x‖ = √d_in)."""
    import torch

    from saelab.store import ActivationStore

    if not (path / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "saelab", "synthetic", "--out", str(path), "--d", str(D_IN),
                        "--n-true", "4096", "--active", "16", "--rows", str(131072), "--holdout", "0.125",
                        "--seed", "0"], check=True)
    store = ActivationStore(path)
    x = next(iter(store.batches(8192, seed=7919)))
    return math.sqrt(D_IN) / float(torch.as_tensor(x).norm(dim=1).mean())


def run_worker(python, impl, phase, arch, a, scale) -> dict:
    cmd = [python, str(pathlib.Path(__file__).resolve()), "--worker", impl, "--phase", phase, "--arch", arch,
           "--store", str(a.store), "--scale", repr(scale), "--lr", repr(a.lr), "--steps", str(a.steps),
           "--budget", str(a.budget), "--threads", str(a.threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def result(proc, what) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (see its error above)")
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--saelens-python", default=str(ROOT / ".venv-bench/bin/python"))
    p.add_argument("--store", type=pathlib.Path, default=ROOT / "activations/bench512")
    p.add_argument("--archs", default="topk,relu,jumprelu,gated,batchtopk,mp")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions of each step-rate measurement")
    p.add_argument("--steps", type=int, default=4, help="timed steps per step-rate measurement")
    p.add_argument("--budget", type=int, default=1_000_000, help="training tokens of the quality comparison")
    p.add_argument("--budget-archs", default="topk", help="architectures of the quality comparison")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--skip-speed", action="store_true", help="only the quality comparison")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (default: torch's choice)")
    p.add_argument("--parallel-budget", action="store_true",
                   help="run the two budget trainings at the same time (quicker; their tokens/s then share the CPU)")
    # worker mode
    p.add_argument("--worker", choices=["saelab", "saelens"])
    p.add_argument("--phase", choices=["speed", "budget"])
    p.add_argument("--arch", default="topk")
    p.add_argument("--scale", type=float, default=1.0)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return

    import torch

    from results import Result

    res = Result("bench_vs_saelens", "saelab vs SAELens, side by side", DESCRIPTION,
                 threads=a.threads or torch.get_num_threads())
    if not pathlib.Path(a.saelens_python).exists():
        raise SystemExit(f"{a.saelens_python} not found: run `make bench-venv` (SAELens in .venv-bench)")
    scale = ensure_store(a.store)
    sl_version = subprocess.run([a.saelens_python, "-c", "import sae_lens; print(sae_lens.__version__)"],
                                capture_output=True, text=True).stdout.strip()
    setting = (f"saelab vs SAELens {sl_version}; torch {torch.__version__}, {os.cpu_count()} CPUs; d_in {D_IN}, "
               f"d_sae {D_IN * EXPANSION}, k {K}, batch {BATCH}, lr {a.lr}, "
               f"{a.threads or torch.get_num_threads()} thread(s) per process")
    print(setting + f"; medians of {a.reps} alternating runs", flush=True)
    pythons = {"saelab": sys.executable, "saelens": a.saelens_python}
    times = lambda v: f"{v:.2f}×"  # noqa: E731
    t = None
    for arch in ([] if a.skip_speed else a.archs.split(",")):
        res_arch = {"saelab": [], "saelens": []}
        for _ in range(a.reps):
            for impl in ("saelab", "saelens"):
                res_arch[impl].append(result(run_worker(pythons[impl], impl, "speed", arch, a, scale),
                                             f"{impl} {arch}"))
                print(f"  {arch} {impl}: {res_arch[impl][-1]['tokens_per_s']:,.0f} tok/s", file=sys.stderr, flush=True)
        if t is None:
            t = res.table("Step rate (bare loop: loss + backward + Adam, batches in memory)",
                          ["arch", "saelab tokens/s", "SAELens tokens/s", "saelab / SAELens", "GEMM limit tokens/s",
                           "saelab, fraction of limit", "SAELens, fraction of limit", "saelab L0", "SAELens L0"],
                          note=f"{setting}; {a.steps} timed steps per process, medians of {a.reps} alternating runs",
                          fmt={"saelab tokens/s": ",.0f", "SAELens tokens/s": ",.0f", "saelab / SAELens": times,
                               "GEMM limit tokens/s": ",.0f", "saelab, fraction of limit": ".2f",
                               "SAELens, fraction of limit": ".2f", "saelab L0": ".1f", "SAELens L0": ".1f"})
        med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in res_arch.items()}
        gemm = statistics.median(r["gemm_tokens_per_s"] for v in res_arch.values() for r in v)
        l0 = {k: statistics.median(r["l0"] for r in v) for k, v in res_arch.items()}
        t.row(arch, med["saelab"], med["saelens"], med["saelab"] / med["saelens"], gemm, med["saelab"] / gemm,
              med["saelens"] / gemm, l0["saelab"], l0["saelens"])
    archs = [x for x in a.budget_archs.split(",") if x]
    t = None
    for arch in archs:
        if a.parallel_budget:
            procs = {impl: run_worker(pythons[impl], impl, "budget", arch, a, scale) for impl in ("saelab", "saelens")}
            r = {impl: result(pr, f"{impl} {arch} budget") for impl, pr in procs.items()}
        else:
            r = {impl: result(run_worker(pythons[impl], impl, "budget", arch, a, scale), f"{impl} {arch}")
                 for impl in ("saelab", "saelens")}
        if t is None:
            t = res.table(f"Same budget ({a.budget // BATCH * BATCH:,} tokens from the store, I/O included"
                          f"{'; both trainings ran at the same time' if a.parallel_budget else ''}), "
                          f"held-out FVU and L0 on {HOLDOUT_ROWS:,} rows",
                          ["arch", "saelab tokens/s", "SAELens tokens/s", "ratio", "saelab FVU", "SAELens FVU",
                           "saelab L0", "SAELens L0"],
                          note=setting,
                          fmt={"saelab tokens/s": ",.0f", "SAELens tokens/s": ",.0f", "ratio": times,
                               "saelab FVU": ".3f", "SAELens FVU": ".3f", "saelab L0": ".1f", "SAELens L0": ".1f"})
        s_, l_ = r["saelab"], r["saelens"]
        t.row(arch, s_["tokens_per_s"], l_["tokens_per_s"], s_["tokens_per_s"] / l_["tokens_per_s"], s_["fvu"],
              l_["fvu"], s_["l0"], l_["l0"])
    res.write()

if __name__ == "__main__":
    main()
