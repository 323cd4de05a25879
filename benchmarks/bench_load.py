"""Loading a wide SAE: SAE.load (the file's tensors become the parameters, SAE.from_weights) vs the plain
path it replaced (build the SAE with its random init, then copy the file's tensors in), as ratios measured in
one run. Each load runs in a fresh subprocess (medians of --reps, the two alternated); memory is the peak RSS
growth over the load (VmHWM after minus RSS before), so the page cache of the file does not count.

    python benchmarks/bench_load.py [--d-in 2304] [--width 32768] [--arch jumprelu] [--reps 3]

The default shape is a Gemma Scope 2B 32k SAE (d_in 2304): 604 MB of float32 weights. Writes
``benchmarks/results/bench_load.json`` (``results.py``).
"""

import argparse
import tempfile

from procmem import alternate, ratio_table
from results import Result

CHILD = r"""
import json, pathlib, sys, time
from procmem import peak_rss_bytes, rss_bytes
import torch
from safetensors.torch import load_file
from saelab.sae.base import SAE, SAVED_PARAMS, read_sae_cfg
from saelab.config import SAEConfig

folder, how = sys.argv[1], sys.argv[2]
before = rss_bytes()
t = time.perf_counter()
if how == "SAE.load":
    sae = SAE.load(folder)
else:  # the plain path: random init, then copy the file's tensors in
    raw = read_sae_cfg(folder)
    cfg = SAEConfig.from_dict({k: v for k, v in raw["saelab"].items() if k != "d_sae"})
    sae = SAE.registry[cfg.arch](cfg)
    (weights,) = pathlib.Path(folder).glob("*.safetensors")  # the one weights file SAE.save wrote
    w = load_file(weights)
    with torch.no_grad():
        for n in SAVED_PARAMS:
            getattr(sae, n).copy_(w[n])
    sae.load_extra_weights(w)
    del w
sae.encode(torch.randn(8, sae.d_in))  # touch the encoder: the SAE is usable
print(json.dumps({"s": time.perf_counter() - t, "peak": peak_rss_bytes() - before}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-in", type=int, default=2304)
    ap.add_argument("--width", type=int, default=32768)
    ap.add_argument("--arch", default="jumprelu")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    res = Result("bench_load", "Loading a wide SAE: SAE.load vs init + copy",
                 "`SAE.load` (the file's tensors become the parameters, `SAE.from_weights`) against the plain path "
                 "(build the SAE with its random init, then copy the file's tensors in), each load followed by one "
                 "encode of 8 rows, in a fresh subprocess, the two alternated, medians. Memory is the peak RSS growth "
                 "over the load (VmHWM after minus RSS before), so the page cache of the file does not count.")
    from saelab.sae.base import SAE

    with tempfile.TemporaryDirectory() as d:
        SAE.create(a.arch, d_in=a.d_in, d_sae=a.width, k=64).save(d)
        mb = a.d_in * a.width * 2 * 4 / 1e6
        runs = alternate({how: ["-c", CHILD, d, how] for how in ("plain (init + copy)", "SAE.load")}, a.reps)
    ratio_table(res, f"Load of a {a.arch} SAE, d_in {a.d_in}, {a.width:,} latents", runs, "plain (init + copy)",
                "load + one encode (s)",
                note=f"{mb:,.0f} MB of W_enc + W_dec; medians of {a.reps} fresh processes")
    res.write()

if __name__ == "__main__":
    main()
