"""Cross-layer transcoder against per-layer transcoders on the bundled model, at equal total L0: one harvest of
both MLPs' pairs (--pairs mlp), then per-layer TopK transcoders, per-layer TopK skip transcoders and one TopK CLT,
each with k active latents per layer (total L0 2k) and the same width per layer and token budget, and ReLU and
JumpReLU CLTs whose L0 controller aims at k per layer (their total L0 is measured, not set); every MLP
replaced at once (``evaluate_replacement``) on the same held-out contexts: CE-loss recovered (against both MLPs
zero-ablated) and KL; each layer's FVU of its MLP output; the training time.

    python benchmarks/bench_clt.py [--tokens 400000] [--k 16] [--expansion 8] [--batch-size 1024] [--threads 2]

Writes ``benchmarks/results/bench_clt.json`` (``results.py``).
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

from results import Result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--harvest-tokens", type=int, default=400_000)
    ap.add_argument("--tokens", type=int, default=400_000, help="training tokens of each model")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=1024,
                    help="every model's; small enough that the relu/jumprelu L0 controller gets steps to settle")
    ap.add_argument("--contexts", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from saelab.evaluate import evaluate_replacement
    from saelab.layout import read_eval
    from saelab.models import load_model
    from saelab.sae import SAE
    from saelab.store import ActivationStore

    res = Result("bench_clt", "Cross-layer vs per-layer transcoders on the bundled model",
                 "One harvest of both MLPs' input/output pairs of the bundled model; per-layer TopK transcoders, "
                 "per-layer TopK skip transcoders and one TopK cross-layer transcoder, each with k latents active per "
                 "layer (equal total L0), the same width per layer and the same training tokens, and ReLU and JumpReLU "
                 "cross-layer transcoders whose sparsity coefficient is adapted towards k per layer (their total L0 "
                 "as measured, in its column); then both MLPs "
                 "replaced at once on the same held-out contexts: CE-loss recovered against both MLPs zero-ablated, "
                 "KL(clean ‖ replacement), and each layer's FVU of its MLP output.", threads=a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        run = root / "mlp"

        def saelab(*argv):
            subprocess.run([sys.executable, "-m", "saelab", *map(str, argv), "--quiet"], check=True)

        saelab("harvest", "--pairs", "mlp", "--out", run, "--tokens", a.harvest_tokens, "--context-size", "64")
        model = load_model("tiny", "cpu")
        toks = ActivationStore(run / "blocks.0.ln2.hook_normalized").tokens("holdout")[: a.contexts]
        t = res.table(f"k {a.k} per layer, {a.expansion}× width, {a.tokens:,} training tokens in batches of "
                      f"{a.batch_size:,} ({a.tokens // a.batch_size} steps)",
                      ["model", "total L0", "FVU layer 0", "FVU layer 1", "CE recovered", "KL", "train seconds"],
                      note=f"{len(toks)} held-out contexts of 64 tokens; {a.threads} threads. The relu and jumprelu "
                           "CLTs' L0 is where their sparsity coefficient got to in these steps, adapted towards k per "
                           "layer: compare them with the TopK rows at the total L0 they show, not at equal L0",
                      fmt={"total L0": ".1f", "FVU layer 0": ".3f", "FVU layer 1": ".3f", "CE recovered": ".3f",
                           "KL": ".3f", "train seconds": ".1f"})
        for arch, act, name in (("transcoder", "topk", "per-layer transcoders"),
                                ("skip-transcoder", "topk", "per-layer skip transcoders"),
                                ("clt", "topk", "cross-layer transcoder"),
                                ("clt", "relu", "cross-layer transcoder, relu"),
                                ("clt", "jumprelu", "cross-layer transcoder, jumprelu")):
            out = root / f"{arch}-{act}"
            start = time.perf_counter()
            saelab("train", "--arch", arch, "--act-fn", act, "--activations", run, "--out", out, "--k", a.k,
                   "--expansion", a.expansion, "--tokens", a.tokens, "--batch-size", a.batch_size)
            seconds = time.perf_counter() - start
            if arch == "clt":
                coders = SAE.load(out)
                ev = read_eval(out)
                fvus, l0 = ev["fvu_layers"], ev["l0_total"]
            else:
                folders = {L: out / f"blocks.{L}.ln2.hook_normalized" for L in range(2)}
                coders = {L: SAE.load(f) for L, f in folders.items()}
                evs = [read_eval(f) for f in folders.values()]
                fvus, l0 = [e["fvu"] for e in evs], sum(e["l0"] for e in evs)
            ce = evaluate_replacement(coders, model, toks)
            t.row(name, l0, fvus[0], fvus[1], ce["ce_loss_recovered"], ce["kl"], seconds)
            print(json.dumps({"model": name, **ce}))
    res.write()


if __name__ == "__main__":
    main()
