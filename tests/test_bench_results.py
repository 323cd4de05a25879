"""benchmarks/results.py: the result files the benchmark scripts write and the docs render.

One cheap script (bench_train at a tiny shape) runs end to end as a subprocess, writing into tmp_path, and
its file is checked against the schema; the module's own behaviour (cells, notes, the atomic write) is
tested directly."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import results  # noqa: E402

TOP = {"name": str, "title": str, "description": str, "command": str, "env": dict, "tables": list}
ENV = {"date": str, "git_sha": (str, type(None)), "git_dirty": (bool, type(None)), "cpu": str, "cores": int,
       "load_before": list, "load_after": list, "python": str, "torch": str, "triton": (str, type(None)),
       "threads": int, "device": str}
TABLE = {"title": str, "columns": list, "rows": list, "note": (str, type(None))}


def check_schema(doc: dict, name: str) -> None:
    """Every key of the schema with its type; each row one cell per column; every number finite."""
    for keys, obj in ((TOP, doc), (ENV, doc["env"])):
        assert set(obj) == set(keys), set(obj) ^ set(keys)
        for k, typ in keys.items():
            assert isinstance(obj[k], typ), (k, obj[k])
    assert doc["name"] == name
    env = doc["env"]
    assert env["cores"] >= 1 and env["threads"] >= 1
    assert env["device"] == "cpu" or env["device"].startswith("cuda: ")
    for k in ("load_before", "load_after"):
        assert len(env[k]) == 3 and all(isinstance(v, (int, float)) and v >= 0 for v in env[k])
    assert doc["tables"]
    for t in doc["tables"]:
        assert set(t) == set(TABLE)
        for k, typ in TABLE.items():
            assert isinstance(t[k], typ), (k, t[k])
        assert t["columns"] and all(isinstance(c, str) for c in t["columns"])
        assert t["rows"]
        for row in t["rows"]:
            assert len(row) == len(t["columns"]), row
            for v in row:
                assert v is None or isinstance(v, str) or (isinstance(v, (int, float)) and math.isfinite(v)), v


def test_bench_train_writes_its_result(tmp_path):
    """bench_train, run as the docs say, prints its table and writes a file matching the schema, with the
    exact command line and the run's torch threads."""
    args = ["--d-in", "8,16", "--steps", "1", "--batch", "32", "--archs", "topk,relu"]
    env = {**os.environ, results.RESULTS_ENV: str(tmp_path), "PYTHONPATH": str(BENCH.parent)}
    out = subprocess.run([sys.executable, str(BENCH / "bench_train.py"), *args], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "bench_train.json").read_text())
    check_schema(doc, "bench_train")
    assert doc["command"] == "python benchmarks/bench_train.py " + " ".join(args)
    (t,) = doc["tables"]
    assert t["columns"] == ["d_in", "arch", "L0", "tokens/s", "GEMM-limit tokens/s", "fraction of limit"]
    assert [r[:2] for r in t["rows"]] == [[8, "topk"], [8, "relu"], [16, "topk"], [16, "relu"]]
    for d, arch, l0, rate, gemm, frac in t["rows"]:
        assert rate > 0 and gemm > 0 and frac == pytest.approx(rate / gemm, rel=1e-4)
        assert 0 < l0 <= 16 * d  # the timed step's own L0 (relu's set near k by calibrate)
    printed = [line for line in out.stdout.splitlines() if line.startswith("| 16 | relu |")]
    assert len(printed) == 1  # each row is printed as it is measured
    assert not list(tmp_path.glob(".*.tmp"))


def test_result_module(tmp_path, monkeypatch, capsys):
    """Cells keep numbers as numbers (NaN/inf as null, tensors and numpy scalars unwrapped); a row of the
    wrong length is refused; notes print under their table; the file lands whole in the folder asked."""
    import numpy as np
    import torch

    monkeypatch.setattr(sys, "argv", [str(BENCH / "bench_x.py"), "--n", "a b"])
    res = results.Result("bench_x", "X", "what and how")
    assert res.command == "python benchmarks/bench_x.py --n 'a b'"
    t = res.table("first", ["name", "n", "ratio", "note"], fmt={"ratio": ".1f"})
    t.row("a", np.int64(3), torch.tensor(0.25), None)
    t.row("b", 12345, float("nan"), "text")
    t.row("c", True, np.float32(math.inf), "x")
    with pytest.raises(ValueError):
        t.row("too", "few")
    with pytest.raises(TypeError):
        t.row("obj", 1, object(), None)
    with pytest.raises(ValueError):
        res.table("bad", ["a"], fmt={"b": ".1f"})
    t.note = "measured: **3**"
    t2 = res.table("second", ["k", "v"])
    t2.row("k", 1 / 3)
    path = res.write(tmp_path / "out")
    assert path == tmp_path / "out" / "bench_x.json"
    printed = capsys.readouterr().out
    assert "| a | 3 | 0.2 |  |" in printed and "| b | 12,345 |  | text |" in printed
    assert printed.index("measured: **3**") < printed.index("### second")
    doc = json.loads(path.read_text())
    check_schema(doc, "bench_x")
    assert doc["tables"][0]["rows"] == [["a", 3, 0.25, None], ["b", 12345, None, "text"], ["c", True, None, "x"]]
    assert doc["tables"][0]["note"] == "measured: **3**" and doc["tables"][1]["note"] is None
    assert doc["tables"][1]["rows"] == [["k", pytest.approx(1 / 3, rel=1e-5)]]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["bench_x.json"]  # no temporary left

    monkeypatch.setenv(results.RESULTS_ENV, str(tmp_path / "env"))
    monkeypatch.setattr(results.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        res.write()
    assert not (tmp_path / "env" / "bench_x.json").exists() and not list((tmp_path / "env").iterdir())
