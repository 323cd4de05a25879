"""Tasks for circuit discovery: clean / corrupted prompt pairs with a correct and a wrong answer token.

A ``Task`` holds ``n`` prompts of one token length ``T`` (BOS first). The metric is the logit
difference ``logit(answer) − logit(wrong)`` at the last position: positive when the model prefers
the correct answer.

Built-in tasks (``make_task(spec, model, n, seed)``):

* ``"induction"`` — repeated random tokens. Each example draws 2·L distinct random token ids
  (L = ``INDUCTION_LEN`` = 16; never BOS/EOS/special ids): ``r`` (L tokens) and ``s`` (L tokens).

  - clean     = BOS, r[0..L-1], r[0..M-1]          (the sequence, then its first M = 8 tokens again)
  - answer    = r[M]                               (the next token of the repeat: induction predicts it)
  - corrupted = BOS, s[0..L-1], r[0..M-1]          (the earlier copy replaced by other random tokens:
                                                    the second half no longer repeats anything, so
                                                    r[M] is not predictable)
  - wrong     = s[M]                               (the token at the answer's slot of the replaced copy:
                                                    a random token, distinct from every token of r)

  T = 1 + L + M = 25. Only the first half differs between clean and corrupted, so the effects
  found by patching are those of the earlier copy (where the induction head looks), not of the
  current token. ``induction_task(..., corrupt="both")`` also replaces the second half
  (corrupted = BOS, s, s[0..M-1]; then the corrupted prompt itself suggests ``wrong`` = s[M]).

* ``"ioi"`` — indirect-object identification from ``IOI_TEMPLATES`` over names that are single
  tokens (with a leading space) and occur in the bundled corpus (``ioi_names``): "When Mia and Tom
  went to the park, Tom gave the ball to" → answer " Mia", wrong " Tom" (the repeated subject).
  Both name orders (ABB and BAB) occur. corrupted = the repeated subject replaced by a third name
  ("…, Sam gave the ball to"): no name is repeated, so neither is singled out. Only templates whose
  prompts tokenize to the most common length are used (so every prompt has the same T).

* ``"names"`` — induction in natural language over the same names: "When Jane and Bob went to the
  park, Bob gave the ball to Jane. Then Bob gave a toy to" → answer " Jane" (named once before after
  "to"); corrupted = that earlier mention replaced by a third name (" Tom"), which is ``wrong``
  (the name the corrupted prompt suggests). A task the tiny model solves with the IOI
  vocabulary, and whose tokens recur across prompts (unlike random-token induction).

* a path to a ``.jsonl`` file, one object per line: ``{"clean": str, "corrupted": str, "answer": str,
  "wrong": str}``. BOS is prepended; answer and wrong must each be exactly one token (include the
  leading space: " Mia"); clean and corrupted must tokenize to the same length, and every line to the
  same length as the first. The first ``n`` lines are used. Errors name the line and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import pathlib
import re

import torch

from saelab.device import device_of
from saelab.errors import SaelabError
from saelab.fs import check_regular
from saelab.models import tokenizer_bos
from saelab.schema import TEXT, check, obj

INDUCTION_LEN = 16   # L: random tokens in the first copy
INDUCTION_REPEAT = 8  # M: tokens of the second copy before the one to predict

IOI_TEMPLATES = [
    "When {A} and {B} went to the park, {B} gave the ball to",
    "When {A} and {B} went to the store, {B} gave a toy to",
    "When {A} and {B} were at the house, {B} gave a book to",
    "Then, {A} and {B} had a lot of fun. {B} said hello to",
    "{A} and {B} were playing. {B} gave the apple to",
]
IOI_CANDIDATE_NAMES = ["Lily", "Tom", "Tim", "Max", "Ben", "Jack", "Sam", "Lucy", "Mom", "Sue", "Anna", "Sarah",
                       "Jane", "Bob", "Billy", "Mia", "Sally", "Kate", "Joe", "Amy", "Molly", "Mary", "Peter",
                       "Emma", "Jill", "John"]
MIN_NAME_COUNT = 10  # a name must occur at least this often in the bundled corpus


@dataclasses.dataclass
class Task:
    name: str
    clean: torch.Tensor       # [n, T] int64 token ids, BOS first; every prompt in a task has the same length T
    corrupted: torch.Tensor   # [n, T] same shape; differs from clean where the task's information is removed
    answer: torch.Tensor      # [n] the correct next token id after the last position of clean
    wrong: torch.Tensor       # [n] the competing token id
    prompts: list[str] | None = None   # the clean texts, for display

    def __len__(self) -> int:
        return self.clean.shape[0]

    def subset(self, idx) -> "Task":
        idx = torch.as_tensor(idx, dtype=torch.long)
        if idx.numel() and not (-len(self) <= int(idx.min()) and int(idx.max()) < len(self)):
            raise SaelabError(f"task '{self.name}' has {len(self)} examples (0..{len(self) - 1}); "
                              f"the subset asks for {int(idx.min())}..{int(idx.max())}: pass indices below {len(self)}")
        prompts = [self.prompts[i] for i in idx.tolist()] if self.prompts is not None else None
        return Task(self.name, self.clean[idx], self.corrupted[idx], self.answer[idx], self.wrong[idx], prompts)


def make_task(spec: str, model, n: int = 64, seed: int = 0) -> Task:
    """``spec``: "induction", "ioi", "names", a path to a .jsonl file (see the module docstring), or
    a list of the same ``{"clean", "corrupted", "answer", "wrong"}`` dicts (task name "custom")."""
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if not isinstance(n, numbers.Integral):
        raise SaelabError(f"n must be a whole number of examples, not {type(n).__name__} {n!r}")
    if n < 1:
        raise SaelabError(f"a task needs at least one example (got n={n}): pass --n 1 or more")
    if isinstance(spec, (list, tuple)):  # rows built in Python: {"clean", "corrupted", "answer", "wrong"} dicts
        return rows_task(spec, model, n)
    spec = str(spec)
    if spec == "induction":
        return induction_task(model, n, seed)
    if spec == "ioi":
        return ioi_task(model, n, seed)
    if spec == "names":
        return names_task(model, n, seed)
    path = pathlib.Path(spec).expanduser()
    if path.suffix == ".jsonl" or path.exists():
        return jsonl_task(path, model, n)
    raise SaelabError(f"unknown task {spec!r}: pass induction, ioi, names, or a .jsonl file of "
                      '{"clean", "corrupted", "answer", "wrong"} lines')


# ----------------------------------------------------------------------------- metric
def logit_diff(logits: torch.Tensor, task: Task) -> torch.Tensor:
    """logit(answer) − logit(wrong) at the last position: [n, T, vocab] → [n]."""
    last = logits[:, -1, :]
    return last.gather(-1, task.answer.to(last.device)[:, None])[:, 0] - \
        last.gather(-1, task.wrong.to(last.device)[:, None])[:, 0]


def as_task(task, model, n: int = 64) -> Task:
    """``task`` as a Task: a Task as it is; a built-in task name, a .jsonl path or a list of row dicts
    built with ``make_task(task, model, n)`` (seed 0, as the CLI builds it); anything else a one-line error."""
    if isinstance(task, (str, pathlib.Path, list)):
        task = make_task(task, model, n=n)
    if not isinstance(task, Task):
        raise SaelabError(f"task must be a Task (saelab.analysis.tasks.make_task), a built-in task name or a "
                          f".jsonl path, not {type(task).__name__}")
    return task


@torch.no_grad()
def accuracy(model, task: Task, batch_size: int = 64) -> float:
    """Fraction of clean prompts with logit(answer) > logit(wrong); ``task`` a Task, or a task name /
    .jsonl path built with ``make_task(task, model)``."""
    task = as_task(task, model)
    dev = device_of(model)
    hits = 0
    for a in range(0, len(task), batch_size):
        part = task.subset(range(a, min(a + batch_size, len(task))))
        hits += int((logit_diff(model(part.clean.to(dev)), part) > 0).sum())
    return hits / len(task)


# ----------------------------------------------------------------------------- induction
def _special_ids(tok) -> set[int]:
    ids = set(int(i) for i in (tok.all_special_ids or []))
    for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):
        if t is not None:
            ids.add(int(t))
    return ids


def induction_task(model, n: int = 64, seed: int = 0, length: int = INDUCTION_LEN, repeat: int = INDUCTION_REPEAT,
                   corrupt: str = "first") -> Task:
    """Repeated random tokens (see the module docstring). ``corrupt``: "first" (replace the earlier
    copy only) or "both" (a fresh random sequence repeated the same way)."""
    if corrupt not in ("first", "both"):
        raise SaelabError(f"corrupt={corrupt!r}: choose 'first' or 'both'")
    if not 0 < repeat < length:
        raise SaelabError(f"induction repeat {repeat} must be between 1 and length-1 ({length - 1})")
    tok = model.tokenizer
    bos = tokenizer_bos(tok)
    vocab = int(model.cfg.d_vocab)
    special = _special_ids(tok)
    allowed = torch.tensor([i for i in range(vocab) if i not in special and i < len(tok)], dtype=torch.long)
    if len(allowed) < 2 * length:
        raise SaelabError(f"the vocabulary has only {len(allowed)} ordinary tokens; the induction task needs {2 * length}")
    g = torch.Generator().manual_seed(seed)
    draws = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[: 2 * length]] for _ in range(n)])
    r, s = draws[:, :length], draws[:, length:]
    b = torch.full((n, 1), bos, dtype=torch.long)
    clean = torch.cat([b, r, r[:, :repeat]], 1)
    second = s[:, :repeat] if corrupt == "both" else r[:, :repeat]
    corrupted = torch.cat([b, s, second], 1)
    prompts = [tok.decode(row[1:].tolist()) for row in clean]
    return Task("induction", clean, corrupted, r[:, repeat].clone(), s[:, repeat].clone(), prompts)


# ----------------------------------------------------------------------------- IOI
@functools.lru_cache(maxsize=1)
def _corpus_words() -> frozenset:
    from saelab.models import TINY_DIR

    counts: dict[str, int] = {}
    for f in sorted((TINY_DIR / "corpus").rglob("*.txt")):
        for w in re.findall(r"\b[A-Z][a-z]+\b", f.read_text(encoding="utf-8", errors="replace")):
            counts[w] = counts.get(w, 0) + 1
    return frozenset(w for w, c in counts.items() if c >= MIN_NAME_COUNT)


def ioi_names(tokenizer) -> list[str]:
    """Candidate names that are one token with a leading space and occur in the bundled corpus."""
    words = _corpus_words()
    return [nm for nm in IOI_CANDIDATE_NAMES
            if nm in words and len(tokenizer.encode(" " + nm, add_special_tokens=False)) == 1]


def _names_setup(model, task: str):
    """(tokenizer, enc: text -> BOS + ids, names) for the name tasks; at least 3 names or an error."""
    tok = model.tokenizer
    bos = tokenizer_bos(tok)
    names = ioi_names(tok)
    if len(names) < 3:
        raise SaelabError(f"fewer than 3 single-token corpus names for this tokenizer: the {task} task needs 3; "
                          "use a .jsonl task instead")

    def enc(text):
        return [bos] + tok.encode(text, add_special_tokens=False)

    return tok, enc, names


def ioi_task(model, n: int = 64, seed: int = 0) -> Task:
    tok, enc, names = _names_setup(model, "IOI")

    lengths = [len(enc(t.format(A=names[0], B=names[1]))) for t in IOI_TEMPLATES]
    T = max(set(lengths), key=lambda x: (lengths.count(x), -lengths.index(x)))
    templates = [t for t, ln in zip(IOI_TEMPLATES, lengths) if ln == T]
    name_id = {nm: tok.encode(" " + nm, add_special_tokens=False)[0] for nm in names}
    g = torch.Generator().manual_seed(seed)
    clean, corrupted, answer, wrong, prompts = [], [], [], [], []
    for i in range(n):
        t = templates[int(torch.randint(len(templates), (1,), generator=g))]
        a, b, c = (names[j] for j in torch.randperm(len(names), generator=g)[:3].tolist())
        first, second = (a, b) if i % 2 == 0 else (b, a)  # ABB and BAB orders alternate
        # slots in order: {A}, {B}, then the second {B} = the repeated subject (b in both orders)
        text = t.replace("{A}", first, 1).replace("{B}", second, 1).replace("{B}", b, 1)
        text_c = t.replace("{A}", first, 1).replace("{B}", second, 1).replace("{B}", c, 1)
        ids, ids_c = enc(text), enc(text_c)
        if len(ids) != T or len(ids_c) != T:  # names are single tokens, so this cannot happen
            raise SaelabError(f"IOI prompt {text!r} tokenizes to {len(ids)} tokens, expected {T}")
        clean.append(ids)
        corrupted.append(ids_c)
        answer.append(name_id[a])
        wrong.append(name_id[b])
        prompts.append(text)
    return Task("ioi", torch.tensor(clean), torch.tensor(corrupted), torch.tensor(answer), torch.tensor(wrong),
                prompts)


NAMES_TEMPLATES = [
    "When {A} and {B} went to the park, {B} gave the ball to {X}. Then {B} gave a toy to",
    "When {A} and {B} went to the store, {B} gave a book to {X}. Then {B} gave a hat to",
]


def names_task(model, n: int = 64, seed: int = 0) -> Task:
    tok, enc, names = _names_setup(model, "names")

    lengths = [len(enc(t.format(A=names[0], B=names[1], X=names[0]))) for t in NAMES_TEMPLATES]
    templates = [t for t, ln in zip(NAMES_TEMPLATES, lengths) if ln == lengths[0]]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        t = templates[int(torch.randint(len(templates), (1,), generator=g))]
        a, b, c = (names[j] for j in torch.randperm(len(names), generator=g)[:3].tolist())
        rows.append((t.format(A=a, B=b, X=a), t.format(A=a, B=b, X=c), a, c))
    ids = lambda nm: tok.encode(" " + nm, add_special_tokens=False)[0]  # noqa: E731
    return Task("names", torch.tensor([enc(r[0]) for r in rows]), torch.tensor([enc(r[1]) for r in rows]),
                torch.tensor([ids(r[2]) for r in rows]), torch.tensor([ids(r[3]) for r in rows]), [r[0] for r in rows])


# ----------------------------------------------------------------------------- JSONL
def jsonl_task(path, model, n: int = 64) -> Task:
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise SaelabError(f"task file {path} does not exist: pass induction, ioi, names, or an existing .jsonl file")
    check_regular(path)

    def lines():
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise SaelabError(f"{where} is not UTF-8 text: a task file is JSON lines") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SaelabError(f"{where} is not valid JSON ({e.msg}): one object per line") from None
                yield where, obj

    return _rows_task(path.stem, lines(), model, n, f"task file {path}")


#: one example of a task file (a line of JSON) or of ``rows_task``'s rows
TASK_LINE_SCHEMA = obj({k: TEXT for k in ("clean", "corrupted", "answer", "wrong")},
                       required=("clean", "corrupted", "answer", "wrong"))


def rows_task(rows, model, n: int = 64, name: str = "custom") -> Task:
    """A task from a list of ``{"clean", "corrupted", "answer", "wrong"}`` dicts, checked as a .jsonl
    file's lines are (``make_task(rows, model)`` calls this)."""
    return _rows_task(name, ((f"rows[{i}]", obj) for i, obj in enumerate(rows)), model, n, "the rows")


def _rows_task(name: str, items, model, n: int, source: str) -> Task:
    tok = model.tokenizer
    bos = tokenizer_bos(tok)
    clean, corrupted, answer, wrong, prompts = [], [], [], [], []
    T = None
    items = iter(items)
    while len(clean) < n:  # lines past the n-th are not read (nor parsed)
        item = next(items, None)
        if item is None:
            break
        where, obj = item
        check(obj, TASK_LINE_SCHEMA, where, "task example", 'each line needs {"clean", "corrupted", "answer", '
              '"wrong"} strings')
        ids = [bos] + tok.encode(obj["clean"], add_special_tokens=False)
        ids_c = [bos] + tok.encode(obj["corrupted"], add_special_tokens=False)
        if len(ids) != len(ids_c):
            raise SaelabError(f"{where}: clean tokenizes to {len(ids)} tokens and corrupted to {len(ids_c)}; "
                              "make them the same length (swap words of equal token length)")
        if len(obj["clean"].strip()) == 0:
            raise SaelabError(f"{where}: the clean prompt is empty; give the text whose next token is the answer")
        n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
        if n_ctx and len(ids) > n_ctx:
            raise SaelabError(f"{where}: the prompt tokenizes to {len(ids)} tokens (BOS included), more than the "
                              f"model's {n_ctx} positions; shorten it")
        if T is None:
            T = len(ids)
        elif len(ids) != T:
            raise SaelabError(f"{where}: the prompt tokenizes to {len(ids)} tokens, the first line's to {T}; "
                              "every prompt in a task must have the same token length")
        pair = []
        for key in ("answer", "wrong"):
            t = tok.encode(obj[key], add_special_tokens=False)
            if len(t) != 1:
                pieces = [tok.decode([i]) for i in t]
                raise SaelabError(f"{where}: {key} {obj[key]!r} is {len(t)} tokens {pieces}, not one; "
                                  "pick a word that is a single token (usually with its leading space)")
            pair.append(t[0])
        if pair[0] == pair[1]:  # the logit difference is 0 on every input: no effect, node or faithfulness to find
            raise SaelabError(f"{where}: answer {obj['answer']!r} and wrong {obj['wrong']!r} are the same token; "
                              "make wrong the token the corrupted prompt predicts instead")
        clean.append(ids)
        corrupted.append(ids_c)
        answer.append(pair[0])
        wrong.append(pair[1])
        prompts.append(obj["clean"])
    if not clean:
        raise SaelabError(f"{source} has no examples: add lines of "
                          '{"clean", "corrupted", "answer", "wrong"}')
    return Task(name, torch.tensor(clean), torch.tensor(corrupted), torch.tensor(answer), torch.tensor(wrong),
                prompts)
