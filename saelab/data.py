"""Text → fixed-size token contexts, deterministic given a seed.

A dataset is ``tiny`` (the bundled corpus, splits ``train`` and ``heldout``), a local
``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file or folder of them, or a
Hugging Face ``datasets`` hub name (streamed). Plain text files are split into documents
at blank lines. Documents are shuffled with the seed, tokenized without special tokens,
joined into one stream with EOS before each document, and cut into contexts of
``context_size`` tokens: BOS first, then ``context_size - 1`` stream tokens.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import numpy as np

from saelab.errors import SaelabError, first_line

CORPUS_DIR = pathlib.Path(__file__).resolve().parent / "tiny" / "corpus"
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _local_files(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _BUILDERS)
    if not files:
        raise SaelabError(f"no .txt/.jsonl/.json/.parquet/.csv files in {path}: point --dataset at text files")
    kinds = {_BUILDERS.get(p.suffix) for p in files}
    if None in kinds:
        raise SaelabError(f"{path} is not a .txt/.jsonl/.json/.parquet/.csv file: convert it or pass a folder of them")
    if len(kinds) > 1:
        raise SaelabError(f"{path} mixes file types ({', '.join(sorted(kinds))}); put one type per --dataset")
    return files


def load_documents(name: str = "tiny", split: str = "train", text_column: str = "text", seed: int = 0):
    """The dataset's documents, shuffled by ``seed``: a ``datasets.Dataset`` (local) or
    ``IterableDataset`` (hub, streamed). Its text is in column ``text_column``."""
    import datasets

    datasets.disable_progress_bars()
    if name == "tiny":
        if split not in ("train", "heldout"):
            raise SaelabError(f"the bundled corpus has splits 'train' and 'heldout', not '{split}'")
        name, split = str(CORPUS_DIR / split), "train"
    path = pathlib.Path(name).expanduser()
    if path.exists():
        files = _local_files(path)
        builder = _BUILDERS[files[0].suffix]
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
        except Exception as e:  # malformed json/csv/parquet raise many types (often chained)
            cause = e.__cause__ or e
            why = first_line(cause, 160)
            raise SaelabError(f"could not read {path} as {builder} ({why}): fix the file or pass another --dataset") \
                from None
        if builder == "text":
            ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
            text_column = "text"
        streaming = False
    else:
        if "/" not in name and not name.replace("-", "").replace("_", "").isalnum():
            raise SaelabError(f"--dataset {name}: no such file or folder, and not a hub dataset name")
        try:
            ds = datasets.load_dataset(name, split=split, streaming=True)
        except Exception as e:  # hub misses and offline mode raise many types
            why = first_line(e, 160)
            raise SaelabError(
                f"could not load dataset '{name}' (split '{split}'): not a local path and the hub did not give it "
                f"({why}); pass --dataset tiny or a local text/jsonl/parquet file"
            ) from None
        streaming = True
    cols = ds.column_names
    if cols is not None and text_column not in cols:
        raise SaelabError(f"dataset '{name}' has no column '{text_column}': pass --text-column, one of {', '.join(cols)}")
    ds = ds.shuffle(seed=seed, buffer_size=10_000) if streaming else ds.shuffle(seed=seed)
    return ds, text_column


def iter_contexts(
    docs, tokenizer, context_size: int, bos: int, text_column: str = "text", batch_docs: int = 512
) -> Iterator[np.ndarray]:
    """Yield int32 arrays [context_size]: BOS, then the next context_size-1 tokens of the stream."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    body = context_size - 1
    pending: list[np.ndarray] = []
    n_pending = 0
    for batch in _batches(docs, text_column, batch_docs):
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for seq in ids:
            pending.append(np.asarray([eos] + list(seq), dtype=np.int32))
            n_pending += len(seq) + 1
        if n_pending < body:
            continue
        stream = np.concatenate(pending)
        n_full = len(stream) // body
        for i in range(n_full):
            out = np.empty(context_size, dtype=np.int32)
            out[0] = bos
            out[1:] = stream[i * body : (i + 1) * body]
            yield out
        rest = stream[n_full * body :]
        pending, n_pending = [rest], len(rest)


def _texts(batch: list, text_column: str) -> list[str]:
    bad = next((t for t in batch if not isinstance(t, str)), "")
    if not isinstance(bad, str):
        raise SaelabError(f"column '{text_column}' holds a non-text value ({type(bad).__name__} {str(bad)[:40]!r}): "
                          "fix those rows or pass the --text-column that holds the text")
    return batch


def _batches(docs, text_column: str, n: int) -> Iterator[list[str]]:
    if hasattr(docs, "iter") and not hasattr(docs, "_ex_iterable"):  # map-style Dataset
        for b in docs.iter(batch_size=n):
            yield _texts(b[text_column], text_column)
        return
    buf: list[str] = []
    for row in docs:
        buf.append(row[text_column])
        if len(buf) == n:
            yield _texts(buf, text_column)
            buf = []
    if buf:
        yield _texts(buf, text_column)


def count_contexts(docs, tokenizer, context_size: int, bos: int, text_column: str = "text",
                   limit: int | None = None) -> int:
    """Whole contexts a (local, finite) dataset gives, counting no further than ``limit``.

    Tokenizes the dataset once (or only as far as ``limit`` contexts need)."""
    n_tokens = 0
    for batch in _batches(docs, text_column, 256):
        n_tokens += sum(len(s) + 1 for s in tokenizer(batch, add_special_tokens=False)["input_ids"])
        if limit is not None and n_tokens // (context_size - 1) >= limit:
            return limit
    return n_tokens // (context_size - 1)


def is_streaming(docs) -> bool:
    return hasattr(docs, "_ex_iterable")
