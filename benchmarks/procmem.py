"""Process memory for the benchmarks that run each variant in a fresh process and report its peak RSS growth:
readings of this process (Linux /proc; ``ru_maxrss`` where there is none) and the runner of such a child.

A child imports this module by name (``from procmem import ...``): ``run_child`` puts this folder on its path."""

import json
import os
import pathlib
import resource
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def rss_bytes() -> int:
    """Resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The peak resident set size (VmHWM) since the start or the last ``reset_peak_rss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Linux: reset the peak RSS (VmHWM) to the current RSS (echo 5 > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_child(args: list[str]) -> dict:
    """Run ``python *args`` (a script and its flags, or ``-c CODE ...``) with this folder importable; its last
    line of output, JSON, is the result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # the child's own error, not just its exit status
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"a measured child process failed (exit {proc.returncode}); its error is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternate(variants: dict[str, list[str]], reps: int) -> dict[str, list[dict]]:
    """Each variant's child (``run_child``'s args) ``reps`` times, the variants in turn, so that a busy machine
    slows them alike; {variant: [results]}."""
    runs = {name: [] for name in variants}
    for _ in range(reps):
        for name, args in variants.items():
            runs[name].append(run_child(args))
    return runs


def ratio_table(res, title: str, runs: dict[str, list[dict]], base: str, seconds: str = "seconds",
                note: str | None = None):
    """A table of ``res`` (a ``results.Result``): each variant's median seconds (result key "s") and peak RSS
    growth ("peak", bytes), and both over those of ``base``. ``seconds``: the time column's heading."""
    import statistics

    med = {name: (statistics.median(r["s"] for r in rs), statistics.median(r["peak"] for r in rs) / 1e6)
           for name, rs in runs.items()}
    b = med[base]
    t = res.table(title, ["path", seconds, "peak RSS growth (MB)", f"time / {base}", f"memory / {base}"], note=note,
                  fmt={seconds: ".2f", "peak RSS growth (MB)": ",.0f", f"time / {base}": ".2f",
                       f"memory / {base}": ".2f"})
    for name, (s, m) in med.items():
        t.row(name, s, m, s / b[0], m / b[1])
    return t
