"""Discrete-code head identification (saelab heads) against the per-head ablation sweep."""

import json
import statistics
import subprocess
import sys

import pytest
import torch

from saelab.analysis import heads as H
from saelab.analysis.heads import saes as heads_saes
from saelab.analysis.tasks import make_task

N = 8  # positive examples (and as many negatives), as the paper's 5-10


@pytest.fixture(scope="module")
def induction(tiny):
    return make_task("induction", tiny, n=N, seed=0)


@pytest.fixture(scope="module")
def runs(tiny, induction):
    """Both methods on the same examples, alternated three times (timings: medians of the three), both on
    one torch thread (small forwards: one thread is faster on a busy CPU, for both alike)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            tiny(induction.clean[:1])  # warm-up forward, outside every timing
        ident, abl, abl_last = [], [], []
        for _ in range(3):
            ident.append(H.identify_heads(tiny, induction, N))
            abl.append(H.ablation_ranking(tiny, induction, N, positions="all"))
            abl_last.append(H.ablation_ranking(tiny, induction, N, positions="last"))
    finally:
        torch.set_num_threads(threads)
    return ident, abl, abl_last


def induction_scores(model, task) -> dict:
    """Attention from each second-copy token to the token after its first occurrence, per head."""
    L = (task.clean.shape[1] - 1) * 2 // 3  # T = 1 + L + L/2
    with torch.no_grad():
        _, cache = model.run_with_cache(task.clean, names_filter=lambda n: n.endswith("hook_pattern"))
    out = {}
    for layer in range(model.cfg.n_layers):
        p = cache[f"blocks.{layer}.attn.hook_pattern"].mean(0)  # [heads, q, k]
        for head in range(model.cfg.n_heads):
            out[(layer, head)] = float(torch.stack([p[head, L + 1 + j, j + 2] for j in range(L // 2 - 1)]).mean())
    return out


@pytest.mark.parametrize("fused_adam", [True, False])
def test_batched_saes_equal_separate_trainings(fused_adam, monkeypatch):
    """The batched per-head SAEs (one model, leading head dim) against a loop of one-head trainings; with torch's
    fused Adam kernel and with the fallback written in ops."""
    if not fused_adam:
        monkeypatch.setattr(heads_saes, "_FUSED_ADAM", None)
    elif heads_saes._FUSED_ADAM is None:
        pytest.skip("this torch has no fused Adam kernel")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 12, 16, generator=g) * torch.tensor([0.1, 1.0, 3.0, 10.0, 0.5])[:, None, None]
    batched = H.train_head_saes(x, d_sae=24, steps=60, seed=3)
    separate = H.train_head_saes_reference(x, d_sae=24, steps=60, seed=3)
    with torch.no_grad():
        fb = batched.encode(x)
        for gi, one in enumerate(separate):
            fs = one.encode(x[gi : gi + 1])[0]
            torch.testing.assert_close(fb[gi], fs, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(batched.W_dec[gi], one.W_dec[0], rtol=1e-4, atol=1e-4)
        # and the training did something: reconstruction well below the variance of the scaled inputs
        xs = x * batched.scale[:, None, None]
        fvu = (batched.decode(fb) - xs).pow(2).sum((1, 2)) / (xs - xs.mean(1, keepdim=True)).pow(2).sum((1, 2))
    assert float(fvu.max()) < 0.5, fvu
    assert torch.allclose(batched.W_dec.norm(dim=-1), torch.ones(5, 24), atol=1e-5)


def test_codes_and_unique_positive_counts():
    acts = torch.tensor([[[0.0, 0.0, 0.0], [0.1, 0.5, 0.0], [2.0, 0.5, 0.0], [0.0, 0.0, 0.3]]])
    assert H.discretise(acts).tolist() == [[3, 1, 0, 2]]  # silent row → d_sae
    codes = torch.tensor([[1, 2, 3, 1], [5, 5, 5, 5], [1, 2, 3, 4]])
    pos = torch.tensor([True, True, False, False])
    counts, frac = H.unique_positive_codes(codes, pos)
    assert counts.tolist() == [1, 0, 2]
    assert frac.tolist() == pytest.approx([1 / 3, 0.0, 2 / 4])


def test_identification_finds_the_induction_heads(tiny, induction, runs):
    """Acceptance: the head whose ablation (at the position the task scores) hurts most is in the top 3;
    the top heads are the induction heads (checked on their attention patterns, independently of both)."""
    ident, _, abl_last = runs
    first = ident[0]
    assert all(r.heads() == first.heads() for r in ident)  # deterministic for a seed
    lh = abl_last[0].heads(1)[0]
    print(f"\nbest head by last-position ablation: L{lh[0]}H{lh[1]}, rank by codes: {first.rank_of(*lh)}")
    assert first.rank_of(*lh) <= 3
    cmp = H.compare(first, abl_last[0], top=3)
    assert cmp["precision"] == 1.0
    ind = induction_scores(tiny, induction)
    top = first.heads(3)
    assert all(ind[h] > 0.5 for h in top), {h: round(ind[h], 2) for h in top}
    # heads the ablation at every position marks important (≥ 25% of the largest drop) include the top 3
    assert H.compare(first, runs[1][0], top=3)["precision"] == 1.0


@pytest.mark.xfail(strict=True, reason="the head whose ablation at every position hurts most is layer 0's "
                   "previous-token head; its output is the same on clean and corrupted prompts (only the earlier "
                   "copy's tokens differ), so no code of it is unique to positives (saelab.analysis.heads: what the "
                   "method cannot see)")
def test_identification_finds_the_top_head_of_the_all_position_ablation(runs):
    ident, abl, _ = runs
    lh = abl[0].heads(1)[0]
    assert ident[0].rank_of(*lh) <= 3


def test_identification_is_faster_than_the_ablation_sweep(runs):
    """On 8 heads the sweep is only 9 forwards, and the identification's one (stopped) forward of 2n prompts is
    a floor under the ratio of the two times, so the bound asserted is a regression guard with room for a shared
    CPU; the ratio is printed (the heads benchmark measures it)."""
    ident, abl, _ = runs
    t_id = statistics.median(r.seconds for r in ident)
    t_ab = statistics.median(r.seconds for r in abl)
    t_fw = statistics.median(r.info["forward_s"] for r in ident)
    t_sae = statistics.median(r.info["train_s"] for r in ident)
    per_head = statistics.median(r.info["per_head_s"] for r in abl)
    print(f"\nidentification {t_id * 1000:.1f} ms (forward {t_fw * 1000:.1f} ms, SAEs {t_sae * 1000:.1f} ms), ablation "
          f"sweep {t_ab * 1000:.1f} ms ({per_head * 1000:.1f} ms per head forward), ratio {t_id / t_ab:.3f}, forward "
          f"alone {t_fw / t_ab:.3f} (8 heads: the sweep is 9 forwards, identification 1 + SAE training)")
    assert t_id < 0.2 * t_ab


def test_cli_heads(tmp_path):
    out = tmp_path / "heads.json"
    r = subprocess.run([sys.executable, "-m", "saelab", "heads", "--task", "induction", "--n", "8", "--top", "3",
                        "--compare-ablation", "--out", str(out), "--quiet"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert "top heads by codes unique to positives: L1H" in r.stdout
    assert "precision@3" in r.stdout and "ratio" in r.stdout
    res = json.loads(out.read_text())
    assert len(res["identify"]["ranking"]) == 8 and len(res["ablation"]["ranking"]) == 8
    assert res["compare"]["precision"] == 1.0
    assert res["identify"]["seconds"] > 0 and res["ablation"]["seconds"] > 0


@pytest.mark.parametrize("case", ["empty", "multi_token", "same_token", "n0", "top0", "repeats0", "threads",
                                  "threads_huge", "position", "out_dir"])
def test_cli_errors(case, tmp_path, capsys):
    from saelab.cli import main

    f = tmp_path / "task.jsonl"
    args = ["heads", "--task", str(f), "--quiet"]
    if case == "empty":
        f.write_text("")
        want = "no examples"
    elif case == "multi_token":
        f.write_text(json.dumps({"clean": "Tom and Mia went home. Tom gave it to", "corrupted":
                                 "Tom and Mia went home. Sam gave it to", "answer": " Mia Mia Mia",
                                 "wrong": " Tom"}) + "\n")
        want = "not one"
    elif case == "same_token":  # a zero logit difference on every input: nothing to rank heads by
        f.write_text(json.dumps({"clean": "a b", "corrupted": "a c", "answer": " c", "wrong": " c"}) + "\n")
        want = "task.jsonl:1: answer ' c' and wrong ' c' are the same token"
    elif case == "n0":
        args = ["heads", "--task", "induction", "--n", "0"]
        want = "--n 0"
    elif case == "top0":
        args = ["heads", "--task", "induction", "--top", "0"]
        want = "--top 0"
    elif case == "repeats0":
        args = ["heads", "--task", "induction", "--compare-ablation", "--repeats", "0"]
        want = "--repeats 0"
    elif case == "out_dir":
        args = ["heads", "--task", "induction", "--out", str(tmp_path)]
        want = "is a folder"
    elif case == "threads":
        args = ["heads", "--task", "induction", "--threads", "-2"]
        want = "--threads -2"
    elif case == "threads_huge":  # torch's thread pool segfaulted on 100000
        args = ["heads", "--task", "induction", "--n", "2", "--threads", "100000"]
        want = "--threads 100000 is out of range: pass a whole number from 0 to 256"
    else:
        args = ["heads", "--task", "induction", "--position", "first"]
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        return
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saelab: error:") and "\n" not in err and want in err, err


def test_cli_heads_out_replaces_an_existing_file_and_says_so(tmp_path, capsys):
    from saelab.cli import main

    out = tmp_path / "heads.json"
    out.write_text("old")
    assert main(["heads", "--task", "induction", "--n", "4", "--out", str(out), "--quiet"]) == 2  # not saelab's
    assert "--force" in capsys.readouterr().err and out.read_text() == "old"
    assert main(["heads", "--task", "induction", "--n", "4", "--out", str(out), "--quiet", "--force"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out} (replaced the existing file)" in text and "note:" not in text, text
    assert json.loads(out.read_text())["task"] == "induction"
    assert main(["heads", "--task", "induction", "--n", "4", "--out", str(out), "--quiet"]) == 0  # its own report
    assert f"wrote {out} (replaced the existing file)" in capsys.readouterr().out
    # more examples than a head has codes: the counts lose meaning, and the report says so
    assert main(["heads", "--task", "induction", "--n", "40", "--quiet"]) == 0
    assert "note: 40 examples a side is more than a head's 33 possible codes" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["heads.json"]  # no temporary file left
    out.unlink()
    assert main(["heads", "--task", "induction", "--n", "4", "--out", str(out), "--quiet"]) == 0
    assert "replaced" not in capsys.readouterr().out and out.is_file()


def test_thread_counts_past_the_bound_are_one_line_from_the_library_too(tiny):
    """run_heads and timed_rankings refuse --threads above MAX_THREADS before any thread pool is resized."""
    from saelab.cli.heads import run_heads
    from saelab.errors import SaelabError
    from saelab.options import MAX_THREADS

    before = torch.get_num_threads()
    with pytest.raises(SaelabError, match=f"--threads {MAX_THREADS + 1}: pass 1 to {MAX_THREADS}"):
        run_heads("induction", n=2, threads=MAX_THREADS + 1, progress=False)
    with pytest.raises(SaelabError, match="--threads 100000: pass 1 to 256"):
        H.timed_rankings(tiny, make_task("induction", tiny, n=2), 2, 1, threads=100000)
    assert torch.get_num_threads() == before


def test_identify_heads_and_ablation_take_a_task_name(tiny):
    """identify_heads / ablation_ranking(model, "induction") build the task as `saelab heads` does
    (make_task(name, model, n=n_examples))."""
    from saelab.errors import SaelabError

    task = make_task("induction", tiny, n=4)
    ref = H.identify_heads(tiny, task, n_examples=4, steps=20)
    got = H.identify_heads(tiny, "induction", n_examples=4, steps=20)
    assert got.heads() == ref.heads() and (got.scores == ref.scores).all()
    assert H.ablation_ranking(tiny, "induction", n_examples=4).heads() == H.ablation_ranking(tiny, task, 4).heads()
    with pytest.raises(SaelabError, match="task must be a Task"):
        H.identify_heads(tiny, 3, n_examples=4)


def test_rank_of_a_head_the_model_lacks_is_one_line(tiny):
    """HeadRanking.rank_of / tied_with of a (layer, head) outside the model: SaelabError naming the
    ranges."""
    from saelab.errors import SaelabError

    r = H.ablation_ranking(tiny, make_task("induction", tiny, n=2), 2)
    assert r.rank_of(*r.heads(1)[0]) == 1
    with pytest.raises(SaelabError, match=r"no head \(9, 9\).*layers 0\.\.1 and heads 0\.\.3"):
        r.rank_of(9, 9)
    with pytest.raises(SaelabError, match=r"no head \(0, 7\)"):
        r.tied_with(0, 7)
