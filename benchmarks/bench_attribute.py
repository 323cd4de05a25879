"""Attribution graphs on the bundled model: ``saelab.analysis.graphs.attribute`` (the replacement model, every
target's direct effects by batched backward passes, pruning, scores) for prompts of 16, 32 and 64 tokens, against
one plain forward + backward of the model on the same prompt, as ratios measured in one run. Each measurement runs
in a fresh subprocess (medians of --reps, the variants alternated); memory is the peak RSS growth over the call
(the model and the transcoders already loaded). The goal (issue 26): a 32-token prompt in ≤ 10 s on 2 cores.

    python benchmarks/bench_attribute.py [--reps 3] [--threads 2] [--sae runs/tc]

Without --sae it first harvests the MLP pairs of the bundled model (--pairs mlp, 200k tokens) and trains one
TopK transcoder per layer (k 16, 8× expansion, 400k tokens) into a temporary folder.
Writes ``benchmarks/results/bench_attribute.json`` (``results.py``).
"""

import argparse
import pathlib
import subprocess
import sys
import tempfile

from procmem import alternate, ratio_table
from results import Result

CHILD = r"""
import json, sys, time
import torch
from procmem import peak_rss_bytes, rss_bytes
from saelab.models import load_model
from saelab.analysis.graphs import attribute, load_transcoders

how, sae, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
model = load_model("tiny", "cpu")
tc = load_transcoders(sae)
words = ("the king said to the queen that he would go to the castle and she was not there when his men came back "
         "with news of the war in the north and the king was glad").split()
toks = model.to_tokens(" ".join(words * 4))[0][:n]
before = rss_bytes()
t = time.perf_counter()
if how == "attribute":
    g, p, sc, data = attribute(model, tc, toks)
    extra = {"nodes": len(g.nodes), "kept": len(data["nodes"]), "edges": len(data["edges"])}
else:  # one forward and one backward of the model on the prompt
    emb = {}
    def keep(t, hook):
        t.requires_grad_(True)
        emb["x"] = t
        return t
    with torch.enable_grad():
        logits = model.run_with_hooks(toks[None], fwd_hooks=[("hook_embed", keep)])
        logits[0, -1].logsumexp(-1).backward()
    extra = {}
s = time.perf_counter() - t
print(json.dumps({"s": s, "peak": peak_rss_bytes() - before, **extra}))
"""


def _train_coders(root: pathlib.Path) -> pathlib.Path:
    run, group = root / "mlp", root / "tc"
    for argv in (["harvest", "--pairs", "mlp", "--out", str(run), "--tokens", "200000", "--context-size", "64",
                  "--quiet"],
                 ["train", "--arch", "transcoder", "--activations", str(run), "--out", str(group), "--k", "16",
                  "--expansion", "8", "--tokens", "400000", "--quiet"]):
        subprocess.run([sys.executable, "-m", "saelab", *argv], check=True)
    return group


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sae", default=None, help="a group of MLP transcoders of the bundled model (default: train one)")
    a = ap.parse_args()
    res = Result("bench_attribute", "Attribution graphs on the bundled model",
                 "`saelab.analysis.graphs.attribute` (the local replacement model, every target's direct effects by "
                 "batched backward passes, pruning and scores) over one TopK transcoder per layer of the bundled "
                 "model, against one plain forward + backward of the model on the same prompt. Each variant runs in "
                 "a fresh subprocess, the two alternated, medians; memory is the peak RSS growth over the call (the "
                 "model and the transcoders already in memory). Goal: a 32-token prompt in at most 10 s on 2 cores.",
                 threads=a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sae = a.sae or str(_train_coders(pathlib.Path(tmp)))
        for n in (16, 32, 64):
            runs = alternate({how: ["-c", CHILD, how, sae, str(n), str(a.threads)]
                              for how in ("forward + backward", "attribute")}, a.reps)
            info = runs["attribute"][0]
            ratio_table(res, f"{n}-token prompt", runs, "forward + backward",
                        note=f"{a.threads} threads, medians of {a.reps}; {info['nodes']:,} nodes, "
                             f"{info['kept']:,} kept with {info['edges']:,} edges")
    res.write()


if __name__ == "__main__":
    main()
