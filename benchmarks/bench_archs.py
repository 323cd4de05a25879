"""Every architecture at equal L0 on the tiny model: reconstruction and spliced CE, one table.

    python benchmarks/bench_archs.py [--tokens 2000000] [--k 16] [--expansion 16]

Harvests blocks.1.hook_resid_post of the bundled model on the whole bundled corpus, with
gradients (the g-SAE needs them), trains each architecture with the same budget, k (the target
L0 for relu/jumprelu) and width, and evaluates each on the held-out rows and spliced into the
model on 64 held-out contexts. Prints a markdown table (the README's).
"""

import argparse
import json
import pathlib
import tempfile
import time

from saelab.config import HarvestConfig, SAEConfig, TrainConfig
from saelab.evaluate import evaluate
from saelab.harvest import harvest
from saelab.models import load_model
from saelab.train import train

ARCHS = ["topk", "batchtopk", "abstopk", "matryoshka", "gradient", "jumprelu", "relu"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--archs", default=",".join(ARCHS))
    a = p.parse_args()
    hook = "blocks.1.hook_resid_post"
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model("tiny", "cpu")
        store = harvest(HarvestConfig(hooks=[hook], out=f"{tmp}/acts", with_grads=True), progress=False,
                        model=model)[hook]
        print("| arch | FVU | L0 | dead | CE-loss recovered | KL | CE with SAE | train tokens/s |")
        print("|---|---|---|---|---|---|---|---|")
        clean = None
        for arch in a.archs.split(","):
            out = pathlib.Path(tmp) / arch
            t0 = time.perf_counter()
            train(TrainConfig(activations=str(store), out=str(out), tokens=a.tokens, batch_size=4096),
                  SAEConfig(arch=arch, k=a.k, expansion=a.expansion), progress=False)
            dt = time.perf_counter() - t0
            ev = evaluate(out, str(store), "tiny", progress=False)
            rate = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["tokens_per_s"]
            clean = ev["ce_clean"]
            print(f"| {arch} | {ev['fvu']:.3f} | {ev['l0']:.1f} | {100 * ev['dead_frac']:.1f}% | "
                  f"{ev['ce_loss_recovered']:.3f} | {ev['kl']:.3f} | {ev['ce_sae']:.3f} | {rate:,.0f} |", flush=True)
        print(f"\nclean CE {clean:.3f}; {a.tokens:,} tokens, k={a.k}, {a.expansion}× width, batch 4096, "
              f"default LR; held-out rows and 64 held-out contexts")


if __name__ == "__main__":
    main()
