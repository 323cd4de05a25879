"""Paired stores for transcoders: harvest --pairs / --pair, the manifests' pairs, paired_stores, check_aligned,
synthetic --d-out."""

import json
import shutil

import h5py
import numpy as np
import pytest

from saelab.cli import main
from saelab.errors import SaelabError
from saelab.store import ActivationStore, check_aligned, paired_stores, read_manifest, resolve_stores
from tests.test_outputs import _fails

pytestmark = pytest.mark.tl3

IN0, OUT0 = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
IN1, OUT1 = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
SMALL = ["--tokens", "4096", "--context-size", "32", "--shard-rows", "1024", "--quiet"]
SYN = ["--d", "16", "--n-true", "40", "--rows", "2048", "--shard-rows", "512", "--hierarchy", "2",
       "--bidirectional", "3", "--quiet"]


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    """--pairs mlp on the 2-layer tiny model, with one pair hook also given by --hook (harvested once)."""
    out = tmp_path_factory.mktemp("pairs") / "run"
    assert main(["harvest", "--pairs", "mlp", "--hook", OUT0, "--out", str(out), *SMALL]) == 0
    return out


def test_pairs_mlp_writes_four_aligned_stores(mlp_run):
    assert sorted(s.name for s in resolve_stores(mlp_run)) == sorted([IN0, OUT0, IN1, OUT1])
    for hook, partner in ((IN0, OUT0), (OUT0, IN0), (IN1, OUT1), (OUT1, IN1)):
        m = read_manifest(mlp_run / hook)
        inp, tgt = (hook, partner) if "ln2" in hook else (partner, hook)
        assert m["pairs"] == [{"input": inp, "target": tgt}]
    run = json.loads((mlp_run / "harvest.json").read_text())
    assert run["pairs"] == [{"input": IN0, "target": OUT0}, {"input": IN1, "target": OUT1}]
    assert len(run["hooks"]) == 4
    pairs = paired_stores(mlp_run)
    assert pairs == [(mlp_run / IN0, mlp_run / OUT0), (mlp_run / IN1, mlp_run / OUT1)]
    for a, b in pairs:
        check_aligned(a, b)
        assert ActivationStore(a).n_rows("all") == ActivationStore(b).n_rows("all") == 4096
    assert paired_stores(mlp_run / IN1) == [(mlp_run / IN1, mlp_run / OUT1)]  # an input store: its one pair


def test_paired_stores_refusals(mlp_run, tmp_path, capsys):
    with pytest.raises(SaelabError, match="target of a pair, not an input: pass its input store"):
        paired_stores(mlp_run / OUT0)
    lonely = tmp_path / "lonely"
    shutil.copytree(mlp_run / IN0, lonely / IN0)  # its partner is not beside it
    with pytest.raises(SaelabError, match=f"paired with {OUT0}, but .* holds no store") as e:
        paired_stores(lonely)
    assert "\n" not in str(e.value)
    assert main(["synthetic", "--out", str(tmp_path / "plain" / "syn"), *SYN]) == 0
    for path in (tmp_path / "plain", tmp_path / "plain" / "syn"):
        with pytest.raises(SaelabError, match="holds no paired stores: harvest with --pairs mlp or --pair"):
            paired_stores(path)


def test_check_aligned_refuses_another_run_or_other_tokens(mlp_run, tmp_path, capsys):
    other = tmp_path / "seed1"
    assert main(["harvest", "--pair", f"{IN0}:{OUT0}", "--seed", "1", "--out", str(other), *SMALL]) == 0
    assert paired_stores(other) == [(other / IN0, other / OUT0)]
    check_aligned(other / IN0, other / OUT0)
    with pytest.raises(SaelabError, match=r"are not row-aligned: seed 0 vs 1; harvest both hooks in one run") as e:
        check_aligned(mlp_run / IN0, other / OUT0)
    assert str(mlp_run / IN0) in str(e.value) and str(other / OUT0) in str(e.value) and "\n" not in str(e.value)
    # the same manifests, other tokens in one shard
    twin = tmp_path / "twin"
    shutil.copytree(mlp_run / OUT0, twin)
    with h5py.File(twin / read_manifest(twin)["shards"][1]["file"], "r+") as f:
        f["tokens"][0, 1] += 1
    with pytest.raises(SaelabError, match=r"shard 1 \(shard_00001.h5 / shard_00001.h5\) holds other tokens"):
        check_aligned(mlp_run / IN0, twin)
    # a resume with the run's flags keeps the pairs; one with other pairs is refused by the settings check
    assert main(["harvest", "--pair", f"{IN0}:{OUT0}", "--seed", "1", "--out", str(other), "--resume", *SMALL]) == 0
    assert read_manifest(other / OUT0)["pairs"] == [{"input": IN0, "target": OUT0}]
    _fails(["harvest", "--pairs", "mlp", "--seed", "1", "--out", other, "--resume", *SMALL], capsys,
           "--resume with different settings")


@pytest.mark.parametrize("argv,needle", [
    ([], "pass --hook NAME (e.g. --hook blocks.0.hook_resid_post), or a transcoder pair with --pairs mlp or --pair"),
    (["--pair", IN0], "is not IN_HOOK:OUT_HOOK"),
    (["--pair", f"{IN0}:{OUT0}:x"], "is not IN_HOOK:OUT_HOOK"),
    (["--pair", f"{IN0}:{IN0}"], "reads and reconstructs the same hook: pass two different hooks"),
    (["--pair", f"{IN0}:{OUT0}", "--pair", f"{IN0}:{OUT0}"], "is given more than once: pass each pair once"),
    (["--pair", f"blocks.*.ln2.hook_normalized:{OUT0}"], "holds a glob: name both hooks"),
])
def test_bad_pair_flags_are_one_line(tmp_path, capsys, argv, needle):
    out = tmp_path / "o"
    _fails(["harvest", *argv, "--out", out, *SMALL], capsys, needle)
    assert not out.exists()


def test_unknown_preset_refused_by_the_config():
    from saelab.config import HarvestConfig

    with pytest.raises(SaelabError, match="--pairs 'attn': choose one of mlp"):
        HarvestConfig(pairs="attn", out="o").validate()


def test_pair_hooks_checked_against_the_model(tmp_path, capsys):
    out = tmp_path / "o"
    _fails(["harvest", "--pair", f"{IN0}:blocks.7.hook_mlp_out", "--out", out, *SMALL], capsys,
           f"--pair {IN0}:blocks.7.hook_mlp_out: unknown hook 'blocks.7.hook_mlp_out' for this model")
    _fails(["harvest", "--pairs", "mlp", "--pair", f"{IN1}:{OUT1}", "--out", out, *SMALL], capsys,
           f"--pair {IN1}:{OUT1} is one of --pairs mlp already: drop it")
    assert not out.exists()


def test_synthetic_pair(tmp_path, capsys):
    from saelab.synthetic import IN_HOOK, OUT_HOOK, load_truth, truth_codes

    run = tmp_path / "pair"
    assert main(["synthetic", "--out", str(run), "--d-out", "24", *SYN]) == 0
    assert "synthetic.in" in capsys.readouterr().out
    assert [s.name for s in resolve_stores(run)] == [IN_HOOK, OUT_HOOK]
    (a, b), = paired_stores(run)
    assert (a, b) == (run / IN_HOOK, run / OUT_HOOK)
    check_aligned(a, b)
    for s in (a, b):
        m = read_manifest(s)
        assert m["hook"] == s.name and m["pairs"] == [{"input": IN_HOOK, "target": OUT_HOOK}]
    A, _ = load_truth(a)
    B, info = load_truth(b)
    assert A.shape == (40, 16) and B.shape == (40, 24) and info["d"] == 24
    # A is the directions of the single store of the same seed
    assert main(["synthetic", "--out", str(tmp_path / "one"), *SYN]) == 0
    np.testing.assert_array_equal(A.numpy(), load_truth(tmp_path / "one")[0].numpy())
    rows = np.array([0, 5, 700, 1500, 2047])
    c_in, x = truth_codes(a, rows)
    c_out, y = truth_codes(b, rows)
    assert np.array_equal(c_in.numpy(), c_out.numpy()) and (c_in > 0).any()
    got_x, got_y = ActivationStore(a).rows(rows), ActivationStore(b).rows(rows)
    assert (got_y - c_in @ B).abs().max() <= 1e-5 and (got_x - c_in @ A).abs().max() <= 1e-5
    assert (got_y - y).abs().max() <= 1e-5 and (got_x - x).abs().max() <= 1e-5
    _fails(["synthetic", "--out", tmp_path / "bad", "--d-out", "-1", *SYN], capsys, "--d-out -1 is out of range")


def test_synthetic_without_d_out_is_unchanged(tmp_path):
    """--d-out 0 writes what a run without the flag writes, byte for byte (truth.json records its own --out)."""
    assert main(["synthetic", "--out", str(tmp_path / "absent"), *SYN]) == 0
    assert main(["synthetic", "--out", str(tmp_path / "zero"), "--d-out", "0", *SYN]) == 0
    names = sorted(p.name for p in (tmp_path / "absent").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "zero").iterdir()) and "pairs" not in read_manifest(
        tmp_path / "zero")
    for name in names:
        x, y = ((tmp_path / d / name).read_bytes() for d in ("absent", "zero"))
        if name == "truth.json":
            x, y = (json.loads(t) for t in (x, y))
            for t in (x, y):
                t["config"].pop("out")
        assert x == y, name
