"""Head identification (discrete codes) against the per-head ablation sweep: agreement and run time.

    python benchmarks/bench_heads.py [--seeds 5] [--repeats 5] [--shapes 4x8,12x12] [--threads N]

Part 1, the tiny model on the induction task, one row per task seed: where the head whose
ablation hurts most lands in the code ranking (ablating every position, and only the last one),
precision/recall@3 and @4 against the heads whose ablation costs >= 25% of the largest drop, and
the two wall times on the same examples (methods alternated, medians of --repeats).

Part 2, scaling: the same timing on randomly initialised GPT-2-shaped models with more heads
(LxH: layers x heads per layer, d_head 32, the tiny tokenizer) and on more examples. Random
weights do not do induction, so only the times mean something there; they do not depend on the
weights. The sweep costs 1 + n_layers*n_heads forwards; identification one forward (stopped after
the deepest hook_z) plus the batched SAE training.

Writes ``benchmarks/results/bench_heads.json`` (``results.py``).
"""

import argparse
import pathlib
import shutil
import tempfile

import torch

from results import Result
from saelab.analysis import heads as H
from saelab.analysis.tasks import make_task
from saelab.models import TINY_DIR, load_model


def timed(model, task, n, repeats, threads):
    with torch.no_grad():
        model(task.clean[:1])  # warm-up
    ident, abl = H.timed_rankings(model, task, n, repeats, threads=threads)  # alternated; the median runs
    return ident, abl, ident.seconds, abl.seconds


def random_model(layers, heads, folder):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=4096, n_positions=256, n_embd=32 * heads, n_layer=layers, n_head=heads,
                     bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_DIR / f, folder / f)
    return load_model(str(folder), "cpu")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--shapes", default="4x8,12x12", help="random-weight models for the scaling rows")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both methods alike (0: torch's default; default: 1, as saelab heads)")
    a = p.parse_args()
    threads = a.threads or None
    n = a.n
    res = Result("bench_heads", "Head identification (discrete codes) vs the per-head ablation sweep",
                 DESCRIPTION, threads=threads or torch.get_num_threads())
    tiny = load_model("tiny", "cpu")
    t = res.table(f"Tiny model (2 layers x 4 heads), induction, n = {n} positive + {n} negative examples",
                  ["seed", "codes top 4", "ablation (all positions) top 3", "its top head's rank by codes",
                   "ablation (last position) top 3", "its top head's rank", "P@3", "R@3", "P@4", "R@4",
                   "identify s", "sweep s", "ratio"],
                  fmt={"P@3": ".2f", "R@3": ".2f", "P@4": ".2f", "R@4": ".2f", "identify s": ".3f", "sweep s": ".3f",
                       "ratio": ".3f"})
    hits_all = hits_last = 0
    for seed in range(a.seeds):
        task = make_task("induction", tiny, n=n, seed=seed)
        ident, abl, t_id, t_ab = timed(tiny, task, n, a.repeats, threads)
        last = H.ablation_ranking(tiny, task, n, positions="last")
        c3, c4 = H.compare(ident, abl, 3), H.compare(ident, abl, 4)
        r_all, r_last = ident.rank_of(*abl.heads(1)[0]), ident.rank_of(*last.heads(1)[0])
        hits_all += r_all <= 3
        hits_last += r_last <= 3
        fmt = lambda hs: " ".join(f"L{l}H{h}" for l, h in hs)  # noqa: E731
        t.row(seed, fmt(ident.heads(4)), fmt(abl.heads(3)), r_all, fmt(last.heads(3)), r_last, c3["precision"],
              c3["recall"], c4["precision"], c4["recall"], t_id, t_ab, t_id / t_ab)
    t.note = (f"top ablation head within the code top 3: {hits_all}/{a.seeds} (all positions), {hits_last}/{a.seeds} "
              f"(last position). Torch threads: {threads or torch.get_num_threads()} for both methods (SAE training "
              f"always runs on one); times are medians of {a.repeats} alternated runs. P/R@k: precision and recall of "
              f"the code top k against the heads whose ablation costs >= 25% of the largest drop.")

    t = res.table("Scaling: time only (identification / sweep on the same examples)",
                  ["model", "heads", "n", "identify s", "identify: forward s", "identify: SAEs s", "sweep s",
                   "per head: identify ms", "per head: sweep ms", "ratio", "forward alone / sweep"],
                  note=f"identification = one forward (stopped after the deepest hook_z) + the batched SAE training; "
                       f"the sweep = 1 + n_layers*n_heads forwards. Random-weight models: times only. Medians of "
                       f"{a.repeats} alternated runs.",
                  fmt={"identify s": ".3f", "identify: forward s": ".3f", "identify: SAEs s": ".3f", "sweep s": ".3f",
                       "per head: identify ms": ".1f", "per head: sweep ms": ".1f", "ratio": ".3f",
                       "forward alone / sweep": ".3f"})
    rows = [("tiny", tiny, n), ("tiny", tiny, 64)]
    with tempfile.TemporaryDirectory() as tmp:
        for shape in [s for s in a.shapes.split(",") if s]:
            layers, heads = map(int, shape.split("x"))
            rows.append((f"random {shape}", random_model(layers, heads, pathlib.Path(tmp) / shape), n))
        for name, model, nn in rows:
            task = make_task("induction", model, n=nn, seed=0)
            ident, abl, t_id, t_ab = timed(model, task, nn, a.repeats, threads)
            g = model.cfg.n_layers * model.cfg.n_heads
            t.row(name, g, nn, t_id, ident.info["forward_s"], ident.info["train_s"], t_ab, t_id / g * 1000,
                  abl.info["per_head_s"] * 1000, t_id / t_ab, ident.info["forward_s"] / t_ab)
    res.write()


DESCRIPTION = (
    "Head identification from discrete codes (`saelab.analysis.heads`) against the per-head ablation sweep: "
    "agreement and run time, both methods on the same examples, alternated, medians (`heads.timed_rankings`). "
    "First the bundled tiny model on the induction task, one row per task seed: where the head whose ablation hurts "
    "most lands in the code ranking (ablating every position, and only the last one), precision/recall@3 and @4 "
    "against the heads whose ablation costs ≥ 25% of the largest drop, and the two wall times. Then scaling: the "
    "same timing on randomly initialised GPT-2-shaped models with more heads (LxH: layers x heads per layer, d_head "
    "32, the tiny tokenizer) and on more examples; random weights do not do induction, so only the times mean "
    "something there.")

if __name__ == "__main__":
    main()
