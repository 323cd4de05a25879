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
"""

import argparse
import pathlib
import shutil
import tempfile

import torch

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
    tiny = load_model("tiny", "cpu")
    print(f"torch threads: {threads or torch.get_num_threads()} for both methods (SAE training always runs on one)")
    print(f"\n## tiny model (2 layers x 4 heads), induction, n = {n} positive + {n} negative examples\n")
    print("| seed | codes top 4 | ablation (all positions) top 3 | its top head's rank by codes | "
          "ablation (last position) top 3 | its top head's rank | P@3 / R@3 | P@4 / R@4 | identify s | sweep s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
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
        print(f"| {seed} | {fmt(ident.heads(4))} | {fmt(abl.heads(3))} | {r_all} | {fmt(last.heads(3))} | {r_last} | "
              f"{c3['precision']:.2f} / {c3['recall']:.2f} | {c4['precision']:.2f} / {c4['recall']:.2f} | "
              f"{t_id:.3f} | {t_ab:.3f} | {t_id / t_ab:.3f} |")
    print(f"\ntop ablation head within the code top 3: {hits_all}/{a.seeds} (all positions), "
          f"{hits_last}/{a.seeds} (last position)")

    print("\n## scaling: time only (identification / sweep on the same examples)\n")
    print("| model | heads | n | identify s (forward + SAEs) | sweep s | per head: identify / sweep ms | ratio | "
          "forward alone / sweep |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [("tiny", tiny, n), ("tiny", tiny, 64)]
    with tempfile.TemporaryDirectory() as tmp:
        for shape in [s for s in a.shapes.split(",") if s]:
            layers, heads = map(int, shape.split("x"))
            rows.append((f"random {shape}", random_model(layers, heads, pathlib.Path(tmp) / shape), n))
        for name, model, nn in rows:
            task = make_task("induction", model, n=nn, seed=0)
            ident, abl, t_id, t_ab = timed(model, task, nn, a.repeats, threads)
            g = model.cfg.n_layers * model.cfg.n_heads
            print(f"| {name} | {g} | {nn} | {t_id:.3f} ({ident.info['forward_s']:.3f} + {ident.info['train_s']:.3f}) "
                  f"| {t_ab:.3f} | {t_id / g * 1000:.1f} / {abl.info['per_head_s'] * 1000:.1f} | {t_id / t_ab:.3f} | "
                  f"{ident.info['forward_s'] / t_ab:.3f} |")


if __name__ == "__main__":
    main()
