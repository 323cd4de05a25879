"""The evaluation suites on the demo group: ``saelab eval --suite S --model tiny`` over both SAEs of the demo
group (the bundled model's two residual streams, TopK, 16×), each suite in a fresh process, then all of them in one
command; wall seconds and the child's peak RSS for each, and the scores each SAE got. The goal (issue 25): every
suite except the openai judge on the demo group in ≤ 5 min on 2 cores, in bounded memory.

    python benchmarks/bench_suites.py [--group runs/demo] [--threads 2]

Without --group it builds the demo group first (``saelab.demo.ensure_group``) in a temporary folder.
Writes ``benchmarks/results/bench_suites.json`` (``results.py``).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from results import Result

SUITES = ("core", "absorption", "probing", "autointerp")
#: the bundled model's first-letter probes stay under SAEBench's F1 0.6, where absorption refuses: every letter is
#: scored instead, so the benchmark times the whole protocol
ABSORPTION = ["--absorption-min-f1", "0"]


def _eval(group: pathlib.Path, suite: str, threads: int) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one ``saelab eval`` in a fresh process, from scratch: the autointerp records of
    an earlier run are removed first (a rerun would resume from them and ask the judge nothing)."""
    for record in group.glob("*/autointerp.json"):
        record.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:]).returncode; s = time.perf_counter() - t; "
            "print(s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r)")
    out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "saelab", "eval", "--sae", str(group),
                          "--suite", suite, "--model", "tiny", "--quiet", *ABSORPTION], env=env, check=True, capture_output=True,
                         text=True)
    seconds, kib = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(kib) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--group", default=None, help="an SAE group of the bundled model (default: build the demo's)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    res = Result("bench_suites", "Evaluation suites on the demo group",
                 "`saelab eval --suite S --model tiny` over both SAEs of the demo group (TopK, 16×, on the bundled "
                 "model's two residual streams): each suite in a fresh process, then all of them in one command. "
                 "Seconds are wall time of the whole command (the model and the SAEs loaded, every SAE scored); "
                 "memory is the command's peak RSS. Goal: every suite but the openai judge in at most 5 minutes on 2 "
                 "cores.", threads=a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if a.group:
            group = pathlib.Path(a.group)
        else:
            from saelab.demo import ensure_group

            group = ensure_group(pathlib.Path(tmp), progress=False, analyze=False).group
        t = res.table("Time and memory", ["suites", "seconds", "peak RSS MiB"],
                      note=f"{a.threads} threads; core's CE metrics on 64 held-out contexts",
                      fmt={"seconds": ".1f", "peak RSS MiB": ",.0f"})
        for suite in (*SUITES, ",".join(SUITES)):
            start = time.perf_counter()
            seconds, mib = _eval(group, suite, a.threads)
            t.row(suite, seconds, mib)
            print(f"# {suite}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        s = res.table("Scores", ["SAE", "FVU", "CE recovered", "probe raw", "probe sae", "probe sae top 1",
                                 "probe sae top 5", "detection", "detection control", "fuzzing", "absorption",
                                 "full absorption"],
                      note="probing: the means over its tasks (register, capitalized, in_quotes); autointerp: the "
                           "tokens judge on 50 sampled latents; absorption: first letters over 4,000 words, every "
                           "letter scored (--absorption-min-f1 0: the bundled model's probes stay under SAEBench's "
                           "0.6, so these are not SAEBench-comparable scores)",
                      fmt={c: ".3f" for c in ("FVU", "CE recovered", "probe raw", "probe sae", "probe sae top 1",
                                              "probe sae top 5", "detection", "detection control", "fuzzing",
                                              "absorption", "full absorption")})
        for folder in sorted(p for p in group.iterdir() if (p / "eval.json").is_file()):
            ev = json.loads((folder / "eval.json").read_text())
            pr, ai, ab = ev["probing"], ev["autointerp"], ev["absorption"]
            s.row(folder.name, ev["fvu"], ev["ce_loss_recovered"], pr["llm_test_accuracy"], pr["sae_test_accuracy"],
                  pr["sae_top_1_test_accuracy"], pr["sae_top_5_test_accuracy"], ai["detection"],
                  ai["detection_control"], ai["fuzzing"], ab["mean_absorption_fraction_score"],
                  ab["mean_full_absorption_score"])
    res.write()


if __name__ == "__main__":
    main()
