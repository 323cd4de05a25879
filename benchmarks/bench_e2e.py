"""End-to-end SAEs against the MSE-trained SAE at equal L0 on the bundled model (Braun et al. 2024's claim: the
e2e SAE increases the CE loss less when spliced in), from the Python API the CLI calls: one harvest of the bundled
tiny model's ``blocks.0.hook_resid_post`` on the bundled corpus, then TopK SAEs of the same k, width, budget, batch
and seed trained with ``objective`` mse, kl and kl+ds, each evaluated on held-out rows and spliced into the model on
held-out contexts.

    python benchmarks/bench_e2e.py [--tokens 1048576] [--k 16] [--expansion 8]

Writes ``benchmarks/results/bench_e2e.json`` (``results.py``).
"""

import argparse
import pathlib
import tempfile
import time

from results import Result
from saelab.config import HarvestConfig, SAEConfig, TrainConfig
from saelab.evaluate import evaluate
from saelab.harvest import harvest
from saelab.models import load_model
from saelab.train import train

HOOK = "blocks.0.hook_resid_post"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1_048_576)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--contexts", type=int, default=128)
    p.add_argument("--objectives", default="mse,kl,kl+ds")
    a = p.parse_args()
    res = Result("bench_e2e", "End-to-end SAEs against the MSE-trained SAE at equal L0",
                 f"Harvests `{HOOK}` of the bundled tiny model on the whole bundled corpus; trains TopK SAEs "
                 f"(k {a.k}, {a.expansion}× width, {a.tokens:,} tokens, batch {a.batch}, LR {a.lr}, seed 0) with "
                 "`--objective` mse (the activations), kl (end to end: the KL of the spliced model's next-token "
                 "distribution against the clean model's) and kl+ds (kl plus the later layer's residual stream); "
                 f"evaluates each on the held-out rows (FVU) and spliced into the model on {a.contexts} held-out "
                 "contexts: CE with the SAE, its increase over the clean CE, CE-loss recovered and KL.")
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model("tiny", "cpu")
        store = harvest(HarvestConfig(hooks=[HOOK], out=f"{tmp}/acts"), progress=False, model=model)[HOOK]
        t = res.table("Spliced CE at equal L0", ["objective", "L0", "FVU", "CE with SAE", "CE increase",
                                                 "CE-loss recovered", "KL", "train seconds"],
                      fmt={"L0": ".1f", "FVU": ".3f", "CE with SAE": ".3f", "CE increase": ".4f",
                           "CE-loss recovered": ".3f", "KL": ".4f", "train seconds": ".0f"})
        clean = None
        for objective in a.objectives.split(","):
            out = pathlib.Path(tmp) / objective.replace("+", "_")
            start = time.perf_counter()
            train(TrainConfig(activations=str(store), out=str(out), tokens=a.tokens, batch_size=a.batch, lr=a.lr,
                              objective=objective), SAEConfig(arch="topk", k=a.k, expansion=a.expansion),
                  progress=False)
            seconds = time.perf_counter() - start
            ev = evaluate(out, str(store), "tiny", n_contexts=a.contexts, progress=False)
            clean = ev["ce_clean"]
            t.row(objective, ev["l0"], ev["fvu"], ev["ce_sae"], ev["ce_sae"] - ev["ce_clean"],
                  ev["ce_loss_recovered"], ev["kl"], seconds)
        t.note = f"clean CE {clean:.3f}"
    res.write()


if __name__ == "__main__":
    main()
