"""Tasks for circuit discovery: shapes, construction rules, the metric, accuracy, JSONL errors."""

import json

import pytest
import torch

from saelab.analysis.tasks import accuracy, induction_task, ioi_names, logit_diff, make_task
from saelab.errors import SaelabError


def test_induction_structure(tiny):
    t = make_task("induction", tiny, n=16, seed=3)
    L, M = 16, 8
    assert t.clean.shape == t.corrupted.shape == (16, 1 + L + M) and t.clean.dtype == torch.long
    bos = tiny.tokenizer.bos_token_id
    assert (t.clean[:, 0] == bos).all() and (t.corrupted[:, 0] == bos).all()
    r = t.clean[:, 1:1 + L]
    assert torch.equal(t.clean[:, 1 + L:], r[:, :M])            # the second half repeats the first
    assert torch.equal(t.answer, r[:, M])                       # the answer is the next repeated token
    assert torch.equal(t.corrupted[:, 1 + L:], t.clean[:, 1 + L:])  # only the earlier copy differs
    for i in range(16):
        s = t.corrupted[i, 1:1 + L]
        assert not set(s.tolist()) & set(r[i].tolist())          # replaced by other tokens
        assert t.wrong[i] == s[M] and t.wrong[i] != t.answer[i]
        assert len(set(r[i].tolist())) == L                      # no token repeats inside a copy
    again = make_task("induction", tiny, n=16, seed=3)
    assert torch.equal(again.clean, t.clean) and not torch.equal(make_task("induction", tiny, n=16, seed=4).clean,
                                                                  t.clean)
    both = induction_task(tiny, n=4, seed=0, corrupt="both")
    s = both.corrupted[:, 1:1 + L]
    assert torch.equal(both.corrupted[:, 1 + L:], s[:, :M]) and torch.equal(both.wrong, s[:, M])


def test_ioi_structure(tiny):
    tok = tiny.tokenizer
    names = ioi_names(tok)
    assert len(names) >= 6 and "Mia" in names and "Tom" in names
    t = make_task("ioi", tiny, n=32, seed=0)
    assert t.clean.shape == t.corrupted.shape and t.clean.shape[0] == 32
    name_ids = {tok.encode(" " + nm, add_special_tokens=False)[0] for nm in names}
    for i in range(32):
        c, k = t.clean[i].tolist(), t.corrupted[i].tolist()
        ans, wr = int(t.answer[i]), int(t.wrong[i])
        assert c.count(ans) == 1 and c.count(wr) == 2                # IO once, subject twice
        diff = [j for j in range(len(c)) if c[j] != k[j]]
        assert len(diff) == 1 and c[diff[0]] == wr and k[diff[0]] in name_ids - {ans, wr}
        assert t.prompts[i].split()[-1] == "to" or t.prompts[i].endswith(" to")


def test_names_task(tiny):
    t = make_task("names", tiny, n=32, seed=0)
    assert t.clean.shape == t.corrupted.shape and t.clean.shape[0] == 32
    for i in range(32):
        c, k = t.clean[i].tolist(), t.corrupted[i].tolist()
        diff = [j for j in range(len(c)) if c[j] != k[j]]
        assert len(diff) == 1 and c[diff[0]] == t.answer[i] and k[diff[0]] == t.wrong[i]
        assert c.count(int(t.answer[i])) == 2  # named twice: "When A and B …" and "… to A."
    assert accuracy(tiny, t) >= 0.9           # the tiny model solves it (measured 98%)


def test_logit_diff_and_accuracy(tiny):
    t = make_task("induction", tiny, n=32, seed=0)
    with torch.no_grad():
        logits = tiny(t.clean)
    ld = logit_diff(logits, t)
    last = logits[:, -1]
    ref = torch.tensor([last[i, t.answer[i]] - last[i, t.wrong[i]] for i in range(32)])
    assert torch.allclose(ld, ref, atol=1e-5)
    acc = accuracy(tiny, t)
    assert acc == pytest.approx(float((ref > 0).float().mean()))
    assert acc >= 0.9                                               # the tiny model has induction heads
    # the corrupted prompts remove the information: far lower logit difference
    with torch.no_grad():
        corrupted = logit_diff(tiny(t.corrupted), t)
    assert float(corrupted.mean()) < float(ld.mean()) - 3


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_task(tiny, tmp_path):
    rows = [{"clean": "When Mia and Tom went to the park, Tom gave the ball to",
             "corrupted": "When Mia and Tom went to the park, Sam gave the ball to", "answer": " Mia", "wrong": " Tom"},
            {"clean": "When Ben and Sue went to the park, Sue gave the ball to",
             "corrupted": "When Ben and Sue went to the park, Max gave the ball to", "answer": " Ben", "wrong": " Sue"}]
    t = make_task(str(_write(tmp_path / "t.jsonl", rows)), tiny, n=64)
    tok = tiny.tokenizer
    assert len(t) == 2 and t.name == "t" and t.answer.tolist() == [tok.encode(" Mia", add_special_tokens=False)[0], tok.encode(" Ben", add_special_tokens=False)[0]]
    assert t.clean[0, 0] == tok.bos_token_id and t.clean[0, 1:].tolist() == tok.encode(rows[0]["clean"], add_special_tokens=False)
    assert len(make_task(str(tmp_path / "t.jsonl"), tiny, n=1)) == 1


@pytest.mark.parametrize("rows,match", [
    ([], "no examples"),
    ([{"clean": "a b", "corrupted": "a c", "answer": " elephantine", "wrong": " Tom"}], r":1: answer .* not one"),
    ([{"clean": "Tom went", "corrupted": "Tom went home now", "answer": " Mia", "wrong": " Tom"}], "same length"),
    (["{not json"], "not valid JSON"),
    ([{"clean": "Tom went", "answer": " Mia", "wrong": " Tom"}], "corrupted"),
    ([{"clean": " ", "corrupted": " ", "answer": " Mia", "wrong": " Tom"}], "the clean prompt is empty"),
    ([{"clean": " Tom" * 300, "corrupted": " Mia" * 300, "answer": " Mia", "wrong": " Tom"}],
     r"tokenizes to 301 tokens \(BOS included\), more than the model's 256 positions"),
    (b"\xff\xfe\x00garbage", ":1 is not UTF-8 text"),
    # answer == wrong: a logit difference of 0 everywhere, which circuit and heads took (0 nodes, null faithfulness)
    ([{"clean": "a b", "corrupted": "a c", "answer": " c", "wrong": " b"},
      {"clean": "a b", "corrupted": "a c", "answer": " c", "wrong": " c"}],
     r"bad\.jsonl:2: answer ' c' and wrong ' c' are the same token"),
])
def test_jsonl_errors(tiny, tmp_path, rows, match):
    if isinstance(rows, bytes):  # not text at all
        (tmp_path / "bad.jsonl").write_bytes(rows)
        path = tmp_path / "bad.jsonl"
    else:
        path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SaelabError, match=match):
        make_task(str(path), tiny)


def test_unknown_task(tiny, tmp_path):
    with pytest.raises(SaelabError, match="unknown task"):
        make_task("nosuchtask", tiny)
    with pytest.raises(SaelabError, match="does not exist"):
        make_task(str(tmp_path / "missing.jsonl"), tiny)


def test_task_helpers_take_notebook_spellings(tiny):
    """accuracy(model, "induction") builds the task (was AttributeError 'str' … 'subset'); make_task
    takes n=4.0 (was a TypeError); task.subset past its end is a one-line error (was an IndexError)."""
    from saelab.analysis.tasks import accuracy, make_task
    from saelab.errors import SaelabError

    task = make_task("induction", tiny, n=4.0)
    assert len(task) == 4
    assert accuracy(tiny, "induction") == accuracy(tiny, make_task("induction", tiny))
    with pytest.raises(SaelabError, match="has 4 examples .*pass indices below 4"):
        task.subset(range(10))
    with pytest.raises(SaelabError, match="whole number"):
        make_task("induction", tiny, n=2.5)
    assert len(task.subset([-1])) == 1


def test_make_task_takes_rows_built_in_python(tiny, tmp_path):
    """make_task(rows, model) with a list of {"clean", "corrupted", "answer", "wrong"} dicts equals the
    same rows written as .jsonl (a list was str()-ed into a path: OSError "File name too long"); bad rows get
    the .jsonl checks, located as rows[i]; lines past n are still not parsed."""
    from saelab.analysis.tasks import make_task
    from saelab.errors import SaelabError

    rows = [{"clean": "When Mary and John went to the store, John gave a drink to",
             "corrupted": "When Mary and John went to the store, Mary gave a drink to", "answer": " Mary",
             "wrong": " John"}] * 3
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    a, b = make_task(rows, tiny), make_task(str(path), tiny, n=3)
    assert a.name == "custom" and torch.equal(a.clean, b.clean) and torch.equal(a.answer, b.answer)
    with pytest.raises(SaelabError, match=r"rows\[1\] is not a valid task example: wrong: None is not text"):
        make_task([rows[0], {**rows[0], "wrong": None}], tiny)
    with pytest.raises(SaelabError, match="the rows has no examples|has no examples"):
        make_task([], tiny)
