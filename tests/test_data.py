"""Text input: local jsonl with a chosen column, packing with BOS first, determinism, errors."""

import json

import numpy as np
import pytest

from saelab.data import count_contexts, iter_contexts, load_documents
from saelab.errors import SaelabError

pytestmark = pytest.mark.tl3


def test_jsonl_column_packing_and_seed(tiny, tmp_path):
    f = tmp_path / "docs.jsonl"
    docs = [f"Story {i}: Lily and Tom went to the park and played with a red ball." for i in range(40)]
    f.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)))
    tok, bos = tiny.tokenizer, tiny.tokenizer.bos_token_id
    ds, col = load_documents(str(f), text_column="body", seed=0)
    ctxs = np.stack(list(iter_contexts(ds, tok, 32, bos, col)))
    assert (ctxs[:, 0] == bos).all() and ctxs.shape[1] == 32
    assert len(ctxs) == count_contexts(ds, tok, 32, bos, col)
    stream = np.concatenate([c[1:] for c in ctxs])
    expected = np.concatenate([[tok.eos_token_id] + tok.encode(d, add_special_tokens=False) for d in ds["body"]])
    assert np.array_equal(stream, expected[: len(stream)])
    again = np.stack(list(iter_contexts(load_documents(str(f), text_column="body", seed=0)[0], tok, 32, bos, col)))
    other = np.stack(list(iter_contexts(load_documents(str(f), text_column="body", seed=1)[0], tok, 32, bos, col)))
    assert np.array_equal(ctxs, again) and not np.array_equal(ctxs, other)
    with pytest.raises(SaelabError, match="--text-column"):
        load_documents(str(f), text_column="text")


@pytest.mark.parametrize("lines,needle", [
    (['{"text": "a b c d e f g h"}', "not json"], "could not read"),
    (['{"text": "a b c d e f g h"}', '{"txt": "no text column on this row"}'], "non-text value"),
    (['{"text": "a b c d e f g h"}', '{"text": 5}'], "non-text value"),
])
def test_harvest_of_a_malformed_local_file_is_one_line(lines, needle, tmp_path, capsys):
    from saelab.cli import main

    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(lines) + "\n")
    rc = main(["harvest", "--hook", "blocks.0.hook_resid_post", "--dataset", str(f), "--context-size", "4",
               "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
