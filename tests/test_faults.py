"""Faults survived by the commands that write into an SAE folder (analyze: features.h5, eval: eval.json, fetch: its
--out): one run at a time (saelab.fs.run_lock, whose lock is never held by two runs), a write limit mid-write, and
SIGKILL / SIGTERM at random points of analyze followed by a rerun, compared dataset by dataset."""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types

import h5py
import numpy as np
import pytest

from saelab.cli import main
from saelab.fs import LOCK_NAME, run_lock
from tests.test_outputs import _digest, _fails

HOOK = "blocks.0.hook_resid_post"
TOKENS = 1024  # the rows analyze reads: small, so a run is mostly its start (imports, the model) and its write
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
TMP = ".features.h5.tmp"


def _h5(path: pathlib.Path) -> dict:
    """Every dataset and attribute of an HDF5 file, as numpy values."""
    with h5py.File(path, "r") as f:
        return {"attrs": {k: f.attrs[k] for k in f.attrs}, "data": {k: f[k][()] for k in f}}


def _same(a: dict, b: dict) -> bool:
    """Whether two files read by ``_h5`` hold equal datasets and attributes (numpy array_equal, each one)."""
    return all(sorted(a[part]) == sorted(b[part]) and all(np.array_equal(a[part][k], b[part][k]) for k in a[part])
               for part in ("attrs", "data"))


@pytest.fixture
def sae_copy(demo_group, tmp_path) -> pathlib.Path:
    """A copy of the demo group's first SAE folder, with the features.h5 the demo wrote."""
    folder = tmp_path / "sae"
    shutil.copytree(demo_group.saes[HOOK], folder, ignore=shutil.ignore_patterns("labels.json", LOCK_NAME))
    assert (folder / "features.h5").is_file()
    return folder


@pytest.fixture(scope="module")
def baseline(demo_group, tiny, tmp_path_factory) -> dict:
    """What an uninterrupted `analyze --tokens TOKENS` writes for the demo SAE (``_h5``)."""
    from saelab.analysis.features.build import analyze

    folder = tmp_path_factory.mktemp("baseline") / "sae"
    shutil.copytree(demo_group.saes[HOOK], folder, ignore=shutil.ignore_patterns("labels.json", LOCK_NAME))
    return _h5(analyze(folder, tokens=TOKENS, model=tiny, progress=False))


def _start(folder: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "saelab", "analyze", "--sae", str(folder), "--tokens", str(TOKENS),
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for(p: subprocess.Popen, ready, timeout: float = 120) -> float:
    """Poll until ``ready()`` or the process ends; the seconds it took."""
    t0 = time.monotonic()
    while p.poll() is None and not ready():
        assert time.monotonic() - t0 < timeout, "the run never got there"
        time.sleep(0.001)
    return time.monotonic() - t0


def _unlocked(folder: pathlib.Path) -> dict:
    """``_digest`` of a folder but its lock file (a killed run leaves one; it holds nothing)."""
    return {k: v for k, v in _digest(folder).items() if k != LOCK_NAME}


def _holds(p: subprocess.Popen, folder: pathlib.Path):
    """Whether ``p`` holds ``folder``'s run lock (the lock file names its pid)."""
    def ready():
        try:
            return f"pid {p.pid}:" in (folder / LOCK_NAME).read_text()
        except OSError:
            return False
    return ready


# ----------------------------------------------------------------------------- one run at a time
RACE = textwrap.dedent("""
    import os, sys, time
    from saelab.errors import SaelabError
    from saelab.fs import run_lock
    folder, held, twice = sys.argv[1], 0, 0
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        try:
            with run_lock(folder):
                held += 1
                try:  # one holder at a time: the marker is this holder's alone
                    os.close(os.open(os.path.join(folder, "holder"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    twice += 1
                    continue
                time.sleep(0.0005)
                os.unlink(os.path.join(folder, "holder"))
        except SaelabError:
            pass
    print(held, twice)
""")


def test_the_run_lock_is_never_held_by_two_runs(tmp_path):
    """Three processes take and release one folder's lock as fast as they can for 2 s: never two at once. (A run
    that opened the lock file just before its holder removed it used to lock that unlinked file while a third run
    locked the new one: hundreds of double holds in 2 s.)"""
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), "2"], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    counts = [tuple(map(int, p.communicate(timeout=60)[0].split())) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(held for held, _ in counts) > 100, counts  # they did contend
    assert [twice for _, twice in counts] == [0, 0, 0], counts
    assert not any(tmp_path.iterdir())


def test_analyze_eval_and_fetch_refuse_a_held_folder(sae_copy, tmp_path, capsys):
    """While a run holds an SAE folder (train does while it trains there), analyze and eval of it and a fetch into
    it are one line naming the holder's pid; nothing in the folder changes; the API is held to it as the CLI is. Once
    free, a fetch into it goes through and removes the staging folder a killed fetch left."""
    from saelab.analysis.features.build import analyze
    from saelab.errors import SaelabError
    from saelab.evaluate import evaluate
    from saelab.hub import fetch_sae

    before = _digest(sae_copy)
    empty = tmp_path / "empty"
    empty.mkdir()
    needle = f"in use by another saelab run (pid {os.getpid()}"
    with run_lock(sae_copy), run_lock(empty):
        _fails(["analyze", "--sae", sae_copy, "--tokens", TOKENS, "--quiet"], capsys, needle)
        _fails(["eval", "--sae", sae_copy, "--quiet"], capsys, needle)
        _fails(["fetch", sae_copy, "--out", empty, "--quiet"], capsys, needle)
        for call in (lambda: analyze(sae_copy, progress=False), lambda: evaluate(sae_copy, progress=False),
                     lambda: fetch_sae(str(sae_copy), empty, progress=False)):
            with pytest.raises(SaelabError, match="in use by another saelab run"):
                call()
        assert [p.name for p in empty.iterdir()] == [LOCK_NAME]
    assert _digest(sae_copy) == before and not (sae_copy / LOCK_NAME).exists() and not any(empty.iterdir())
    stale = tmp_path / ".empty.fetching-99999"  # what a killed fetch into it left
    stale.mkdir()
    (stale / "cfg.json").write_text("{}")
    out, _, fetched = fetch_sae(str(sae_copy), empty, progress=False)  # free again: the fetch goes through
    assert fetched and sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors", "source.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "sae"]


def test_a_second_analyze_of_a_folder_being_analysed_is_one_line(sae_copy, capsys):
    """Two runs, one SAE folder: `saelab analyze` in a subprocess holds it; an analyze and an eval of it here are
    refused naming that process; the folder is as before; the lock goes when the first run is killed."""
    before = _unlocked(sae_copy)
    p = _start(sae_copy)
    try:
        _wait_for(p, _holds(p, sae_copy))
        assert p.poll() is None, p.communicate()
        for argv in (["analyze", "--sae", sae_copy, "--tokens", TOKENS], ["eval", "--sae", sae_copy]):
            _fails([*argv, "--quiet"], capsys, f"in use by another saelab run (pid {p.pid}: saelab analyze")
    finally:
        p.kill()
        p.communicate()
    assert _unlocked(sae_copy) == before
    with run_lock(sae_copy):  # the dead run's lock file is left, its lock is not
        pass


# ----------------------------------------------------------------------------- a write limit
LIMITED = textwrap.dedent("""
    import contextlib, io, json, resource, sys
    from saelab.cli import main
    folder, limits = sys.argv[1], json.loads(sys.argv[2])
    for limit in limits:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["analyze", "--sae", folder, "--tokens", sys.argv[3], "--quiet"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        print(json.dumps({"limit": limit, "rc": rc, "err": err.getvalue()}), flush=True)
""")


def test_features_h5_under_a_write_limit_is_one_line_and_keeps_the_previous_file(sae_copy):
    """analyze under a file-size limit (ulimit -f: a write fails with EFBIG, as on a full disk) at four sizes, from
    the file's first block to its last: each run is one line naming features.h5, no temp file is left, the previous
    features.h5 is byte for byte as it was. (h5py writing the file itself segfaulted at 64 KiB, left its temp file
    and at other sizes raised a RuntimeError traceback or a two-line error naming no file.) The runs share one
    process (the model loads once); a crash of any would end it."""
    before = _digest(sae_copy)
    size = (sae_copy / "features.h5").stat().st_size
    limits = [1 << 16, 1 << 20, size // 2, size - (1 << 16)]
    r = subprocess.run([sys.executable, "-c", LIMITED, str(sae_copy), json.dumps(limits), str(TOKENS)],
                       check=False, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [run["limit"] for run in runs] == limits, r.stdout
    for run in runs:
        err = run["err"].strip()
        assert run["rc"] == 2 and len(err.splitlines()) == 1, run
        assert f"{sae_copy / 'features.h5'} could not be written (File too large)" in err, run
    assert _digest(sae_copy) == before  # no temp file, and the previous features.h5 whole


def test_analyze_checks_free_space_before_the_pass(sae_copy, capsys, monkeypatch):
    """A disk with less room than features.h5 needs: one line naming both sizes before the store is read."""
    import saelab.fs

    before = _digest(sae_copy)
    monkeypatch.setattr(saelab.fs.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1 << 20))
    monkeypatch.setattr("saelab.analysis.features.build.store_for_sae",
                        lambda *a: pytest.fail("the store was opened before the space was checked"))
    _fails(["analyze", "--sae", sae_copy, "--quiet"], capsys, "needs about 0.01 GiB but")
    assert _digest(sae_copy) == before


# ----------------------------------------------------------------------------- killed, then run again
def _signalled(folder: pathlib.Path, sig, delay: float | None) -> tuple[int, str, str, float]:
    """Run `saelab analyze` on ``folder`` and send it ``sig``: ``delay`` seconds after it holds the folder, or (None)
    the moment its temp file appears (mid-write). Returns its exit status, stdout, stderr, and the seconds from
    holding the folder to the temp file (or to the signal)."""
    p = _start(folder)
    _wait_for(p, _holds(p, folder))
    if delay is None:
        took = _wait_for(p, (folder / TMP).exists)
    else:
        took = delay
        time.sleep(delay)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err, took


def _complete(folder: pathlib.Path, previous: bytes | None, baseline: dict) -> bool:
    """The folder's features.h5 is the previous one byte for byte, or none where there was none, or (the run got
    past its rename) the whole new one; never a part of one under the final name. True when it is the new one."""
    path = folder / "features.h5"
    if not path.exists():
        assert previous is None, "the previous features.h5 was lost"
        return False
    if previous is not None and path.read_bytes() == previous:
        return False
    assert _same(_h5(path), baseline), "features.h5 is neither the previous file nor a complete new one"
    return True


def test_analyze_killed_at_random_points_then_run_again(sae_copy, baseline, capsys):
    """SIGKILL mid-write and at two random points (seeded) after the run holds the folder, one of them with no
    features.h5 before; SIGTERM mid-write and at a random point. After each: the previous features.h5 (or none) or a
    complete new one, never a partial one; SIGKILL may leave its temp file and lock file, SIGTERM ends as Ctrl-C
    does (exit 130, no temp file, no lock file). Then analyze runs again over the leftovers and writes a file equal,
    dataset by dataset and attribute by attribute, to an uninterrupted run's (byte for byte too with h5py 3.16 and
    HDF5 2.0, which this does not rely on: another HDF5 may lay the same file out otherwise)."""
    rng = random.Random(23)
    others = {k: v for k, v in _digest(sae_copy).items() if k != "features.h5"}
    previous = (sae_copy / "features.h5").read_bytes()
    with h5py.File(sae_copy / "features.h5") as f:
        assert int(f.attrs["n_rows"]) != int(baseline["attrs"]["n_rows"])  # the new file is told from the old

    # SIGKILL the moment the temp file appears: it stays, features.h5 is the previous one
    rc, _, _, write_at = _signalled(sae_copy, signal.SIGKILL, None)
    assert rc == -signal.SIGKILL
    assert (sae_copy / TMP).exists() and (sae_copy / "features.h5").read_bytes() == previous
    for with_previous in (True, False):  # SIGKILL at a random point between holding the folder and the write
        if not with_previous:
            (sae_copy / "features.h5").unlink()
        prev = previous if with_previous else None
        _signalled(sae_copy, signal.SIGKILL, rng.uniform(0, write_at * 1.2))
        if _complete(sae_copy, prev, baseline):
            previous = (sae_copy / "features.h5").read_bytes()
        elif not with_previous:
            previous = None
    for delay in (None, rng.uniform(0, write_at * 1.2)):  # SIGTERM mid-write, then at a random point
        before = (sae_copy / "features.h5").read_bytes() if (sae_copy / "features.h5").exists() else None
        for leftover in (TMP, LOCK_NAME):
            (sae_copy / leftover).unlink(missing_ok=True)
        rc, out, err, _ = _signalled(sae_copy, signal.SIGTERM, delay)
        if "wrote " not in out:  # stopped before its report: as Ctrl-C stops it
            assert rc == 130 and err.strip() == "saelab: interrupted", (rc, err)
        assert not (sae_copy / TMP).exists() and not (sae_copy / LOCK_NAME).exists()
        _complete(sae_copy, before, baseline)
    (sae_copy / TMP).write_bytes(b"half a file a killed run left")
    capsys.readouterr()
    assert main(["analyze", "--sae", str(sae_copy), "--tokens", str(TOKENS), "--quiet"]) == 0
    assert _same(_h5(sae_copy / "features.h5"), baseline)
    assert {k: v for k, v in _digest(sae_copy).items() if k != "features.h5"} == others  # no temp file, no lock
