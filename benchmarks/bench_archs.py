"""Every architecture at equal L0 on the tiny model: reconstruction and spliced CE, one table.

    python benchmarks/bench_archs.py [--tokens 2000000] [--k 16] [--expansion 16]

Harvests blocks.1.hook_resid_post of the bundled model on the whole bundled corpus, with
gradients (the g-SAE needs them), trains each architecture with the same budget, k (the target
L0 for relu/jumprelu) and width, and evaluates each on the held-out rows and spliced into the
model on 64 held-out contexts. Prints a markdown table (the README's) and writes
``benchmarks/results/bench_archs.json`` (``results.py``).
"""

import argparse
import json
import pathlib
import tempfile

from results import Result
from saelab.config import HarvestConfig, SAEConfig, TrainConfig
from saelab.evaluate import evaluate
from saelab.harvest import harvest
from saelab.models import load_model
from saelab.train import train

ARCHS = ["topk", "batchtopk", "mutualchoice", "featurechoice", "abstopk", "matryoshka", "gradient", "archetypal", "mp",
         "jumprelu", "relu", "gated", "panneal"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--archs", default=",".join(ARCHS))
    a = p.parse_args()
    res = Result("bench_archs", "Every architecture at equal L0 on the tiny model",
                 "Harvests `blocks.1.hook_resid_post` of the bundled tiny model on the whole bundled corpus, with "
                 "gradients (the g-SAE needs them), trains each architecture with the same token budget, k (the "
                 "target L0 for relu/jumprelu), width, batch 4096 and default LR, and evaluates each on the "
                 "held-out rows (FVU, L0, dead latents) and spliced into the model on 64 held-out contexts (CE-loss "
                 "recovered, KL, CE with the SAE). Train tokens/s is the trainer's own rate for that run.")
    hook = "blocks.1.hook_resid_post"
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model("tiny", "cpu")
        store = harvest(HarvestConfig(hooks=[hook], out=f"{tmp}/acts", with_grads=True), progress=False,
                        model=model)[hook]
        t = res.table("Reconstruction and spliced CE at equal L0",
                      ["arch", "FVU", "L0", "dead", "CE-loss recovered", "KL", "CE with SAE", "train tokens/s"],
                      fmt={"FVU": ".3f", "L0": ".1f", "dead": ".1%", "CE-loss recovered": ".3f", "KL": ".3f",
                           "CE with SAE": ".3f", "train tokens/s": ",.0f"})
        clean = None
        for arch in a.archs.split(","):
            out = pathlib.Path(tmp) / arch
            train(TrainConfig(activations=str(store), out=str(out), tokens=a.tokens, batch_size=4096),
                  SAEConfig(arch=arch, k=a.k, expansion=a.expansion), progress=False)
            ev = evaluate(out, str(store), "tiny", progress=False)
            rate = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["tokens_per_s"]
            clean = ev["ce_clean"]
            t.row(arch, ev["fvu"], ev["l0"], ev["dead_frac"], ev["ce_loss_recovered"], ev["kl"], ev["ce_sae"], rate)
        t.note = (f"clean CE {clean:.3f}; {a.tokens:,} tokens, k={a.k}, {a.expansion}× width, batch 4096, "
                  f"default LR; held-out rows and 64 held-out contexts")
    res.write()

if __name__ == "__main__":
    main()
