"""Every latent's direct logit effects (``analyze``'s top/bottom tokens): ``features.logit_effects`` (chunks of
latents, each [rows, vocab], no [d_in, vocab] matrix) vs the materialised path it replaced (form the centred
W_U, for ``attn.hook_z`` also W_O @ W_U, then multiply chunks of 1024 decoder rows by it), as ratios measured
in one run. Each variant runs in a fresh subprocess (medians of --reps, the two alternated); memory is the peak
RSS growth over the call (VmHWM after minus RSS before, the model's weights already in memory).

    python benchmarks/bench_logit_effects.py [--reps 3] [--threads 2]

Shapes: GPT-2 small (residual SAE, d_model 768, vocab 50,257, LayerNorm centring, 8,192 latents) and a Gemma-2
2B attention SAE (hook_z of 8 heads × 256 = 2,048 into d_model 2,304, vocab 256,000, 1,024 latents).
Both paths give the same top token per latent (checked here, ≥ 99% allowing float near-ties; and by tests/test_analyze.py on random weights).
Writes ``benchmarks/results/bench_logit_effects.json`` (``results.py``).
"""

import argparse

from procmem import alternate, ratio_table
from results import Result

CHILD = r"""
import json, os, sys, time
from procmem import peak_rss_bytes, rss_bytes
from types import SimpleNamespace
import torch
from saelab.analysis.features import logit_effects, N_LOGITS
from saelab.sae.base import SAE

how, hook, d_model, vocab, d_sae, n_heads, d_head, threads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:9])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
W_O = torch.randn(n_heads, d_head, d_model, generator=g) / d_model ** 0.5
attn = SimpleNamespace(attn=SimpleNamespace(W_O=W_O))
model = SimpleNamespace(blocks=[attn] * 2, W_U=torch.randn(d_model, vocab, generator=g),
                        ln_final=SimpleNamespace(w=torch.ones(d_model)), cfg=SimpleNamespace(normalization_type="LN"))
d_in = n_heads * d_head if hook.endswith("hook_z") else d_model
torch.manual_seed(0)
sae = SAE.create("topk", d_in=d_in, d_sae=d_sae, k=8, hook_name=hook)
before = rss_bytes()
t = time.perf_counter()
if how == "chunked":
    top_ids = logit_effects(sae=sae, model=model)[0]
else:  # the materialised path: the centred W_U (and W_O @ it), then chunks of 1024 decoder rows
    with torch.no_grad():
        W_U = model.W_U - model.W_U.mean(0, keepdim=True)
        if hook.endswith("hook_z"):
            W_U = W_O.reshape(-1, d_model) @ W_U
        W_dec, tops = sae.W_dec.detach(), []
        for c in range(0, d_sae, 1024):
            L = W_dec[c:c + 1024] @ W_U
            tops.append(L.topk(N_LOGITS, dim=1)[1])
            L.topk(N_LOGITS, dim=1, largest=False)
        top_ids = torch.cat(tops)
s = time.perf_counter() - t
print(json.dumps({"s": s, "peak": peak_rss_bytes() - before, "top1": top_ids[:, 0].tolist()}))
"""

SHAPES = {  # name: (hook, d_model, vocab, d_sae, n_heads, d_head)
    "GPT-2 small resid, 8k latents": ("blocks.8.hook_resid_post", 768, 50257, 8192, 12, 64),
    "Gemma-2 2B hook_z, 1k latents": ("blocks.1.attn.hook_z", 2304, 256000, 1024, 8, 256),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    res = Result("bench_logit_effects", "Direct logit effects: chunked vs materialised",
                 "Every latent's direct logit effects (`analyze`'s top/bottom tokens): `features.logit_effects` "
                 "(chunks of latents, each [rows, vocab], no [d_in, vocab] matrix) against the materialised path "
                 "(form the centred W_U, for `attn.hook_z` also W_O @ W_U, then multiply chunks of 1,024 decoder rows "
                 "by it), on random weights of two real models' shapes. Each variant runs in a fresh subprocess, the "
                 "two alternated, medians; memory is the peak RSS growth over the call (the model's weights already "
                 "in memory). Both paths' top token per latent is checked to agree (≥ 99%, allowing float near-ties).",
                 threads=a.threads)
    for name, shape in SHAPES.items():
        runs = alternate({how: ["-c", CHILD, how, *map(str, shape), str(a.threads)]
                          for how in ("materialised", "chunked")}, a.reps)
        a1, b1 = runs["chunked"][0]["top1"], runs["materialised"][0]["top1"]
        agree = sum(x == y for x, y in zip(a1, b1)) / len(a1)
        assert agree >= 0.99, f"the two paths' top tokens agree for only {agree:.1%} of latents"
        ratio_table(res, name, runs, "materialised",
                    note=f"{a.threads} threads, medians of {a.reps}; same top token for {agree:.0%} of latents")
    res.write()

if __name__ == "__main__":
    main()
