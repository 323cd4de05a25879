"""The ``probing`` suite: k-sparse probing, SAEBench's ``sparse_probing`` protocol (Gurnee et al. 2023, "Finding
Neurons in a Haystack"; Karvonen et al. 2025, SAEBench).

For each binary task, the model runs on the task's texts and the activation at the SAE's hook is taken either as
the mean over each text's tokens (BOS and padding left out; a text-level task) or at single tokens (a token-level
task). The SAE's codes are pooled the same way: the mean of each token's codes. Positives and negatives are
balanced and split into train and test (by text, so no text is on both sides). Then, with a logistic regression
(inputs standardised on the train split, L2, C = 1):

- ``llm_test_accuracy``: the probe on every dimension of the raw activation;
- ``llm_top_{k}_test_accuracy``: on the k raw dimensions of largest |mean(positive) − mean(negative)| (train);
- ``sae_test_accuracy``: on every latent;
- ``sae_top_{k}_test_accuracy``: on the k latents of largest |mean(positive) − mean(negative)|, k in ``K_VALUES``.

The scores at the top level are the means over the tasks (SAEBench's field names); ``tasks`` holds each task's,
with the top-k latents' ids (``top_latents``: the latents that carry the property best, by that selection).

Tasks from the bundled corpus (any model: it is English text):

- ``register``: a TinyStories paragraph (positive) or a Tiny Shakespeare one (text level);
- ``capitalized``: the token starts (after its leading space) with a capital letter (token level, both registers);
- ``in_quotes``: the token lies inside a double-quoted span of a story, quote marks left out (token level: a
  property of the context, not of the token's identity).

A labelled dataset (``--probe-dataset``: a local .jsonl/.csv/.parquet file or a Hugging Face name, with a text and
a label column) adds one text-level task per label value: that value against the others (a binary dataset gives
one task), for up to ``MAX_CLASSES`` of its most frequent values.
"""

from __future__ import annotations

import collections
import pathlib
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from saelab.data import CORPUS_DIR, load_documents
from saelab.device import device_of
from saelab.errors import SaelabError
from saelab.hooks import activation_at
from saelab.models import tokenizer_bos

K_VALUES = (1, 2, 5, 20)
#: tokens of a text at most (BOS included), as SAEBench's context length
CONTEXT = 128
#: examples per task, each split balanced between positives and negatives
N_TRAIN, N_TEST = 1024, 256
#: a labelled dataset's classes probed (its most frequent label values)
MAX_CLASSES = 8
#: a labelled dataset's class with fewer texts is left out (its 20% test split would hold a handful)
MIN_CLASS = 40
#: a forward's padded tokens at most, and its dense codes' bytes
BATCH_TOKENS, CODES_BYTES = 8192, 1 << 28
QUOTE = '"'


@dataclass
class Task:
    """One binary probing task: its texts and, per text, its label (text level) or its tokens' labels (token level:
    1, 0, or -1 for a token that is no example)."""

    name: str
    texts: list[str]
    labels: list = field(default_factory=list)  # text level: one int per text; token level: a list per text
    token_level: bool = False


def _paragraphs(path: pathlib.Path) -> list[str]:
    return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 40]


def bundled_tasks(tokenizer, seed: int = 0) -> list[Task]:
    """The tasks built from the bundled corpus (its train split), for the model's ``tokenizer`` (a fast one: token
    tasks read each token's characters from its offsets)."""
    rng = random.Random(seed)
    stories = _paragraphs(CORPUS_DIR / "train" / "tinystories_sample.txt")
    plays = _paragraphs(CORPUS_DIR / "train" / "tinyshakespeare.txt")
    rng.shuffle(stories)
    rng.shuffle(plays)
    half = (N_TRAIN + N_TEST) // 2
    if min(len(stories), len(plays)) < half:
        raise SaelabError(f"the bundled corpus has {len(stories)} story and {len(plays)} play paragraphs, fewer "
                          f"than the {half} each the register task needs: reinstall saelab")
    register = Task("register", stories[:half] + plays[:half], [1] * half + [0] * half)
    n = (N_TRAIN + N_TEST) // 4  # texts of a token task: each gives tens of examples
    mixed = stories[half:half + n // 2] + plays[half:half + n // 2]
    quoted = [s for s in stories[half + n // 2:] if s.count(QUOTE) >= 2][:n]
    tasks = [register, Task("capitalized", mixed, token_level=True), Task("in_quotes", quoted, token_level=True)]
    for task in tasks[1:]:
        task.labels = [_token_labels(text, spans, task.name) for text, spans in zip(task.texts, _offsets(tokenizer,
                                                                                                         task.texts))]
    return tasks


def _offsets(tokenizer, texts: list[str]) -> list[list[tuple[int, int]]]:
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        raise SaelabError("the probing suite's token tasks read each token's characters, which needs a fast "
                          "(Rust) tokenizer; this model's tokenizer is a slow one") from None
    return [[tuple(o) for o in offs][: CONTEXT - 1] for offs in enc["offset_mapping"]]


def _token_labels(text: str, spans: list[tuple[int, int]], task: str) -> list[int]:
    """Each token's label (1, 0, or -1: no example) for a token task, from the characters it covers."""
    out = []
    for start, end in spans:
        piece = text[start:end]
        if task == "capitalized":
            word = piece.lstrip()
            out.append(-1 if not word or not word[0].isalpha() else int(word[0].isupper()))
        else:  # in_quotes: inside an open quotation (an odd number of quote marks before the token)
            out.append(-1 if QUOTE in piece or not piece.strip() else text.count(QUOTE, 0, start) % 2)
    return out


def dataset_tasks(name: str, text_column: str = "text", label_column: str = "label", seed: int = 0) -> list[Task]:
    """One task per label value of a labelled dataset (that value against the others; a binary one gives one)."""
    path = pathlib.Path(name).expanduser()
    if not path.exists() and (path.suffix in (".jsonl", ".json", ".csv", ".parquet", ".txt") or name.startswith(
            ("/", ".", "~"))):
        raise SaelabError(f"--probe-dataset {name}: no such file or folder; pass a labelled .jsonl/.csv/.parquet "
                          "file or a Hugging Face dataset name")
    try:
        docs, text_column = load_documents(name, "train", text_column, seed)
    except SaelabError as e:  # its messages name harvest's flags; here the user passed the probing ones
        raise SaelabError(str(e).replace("--dataset", "--probe-dataset").replace("--text-column",
                                                                                 "--probe-text-column")) from None
    cols = getattr(docs, "column_names", None)
    if cols is not None and label_column not in cols:
        raise SaelabError(f"--probe-dataset {name} has no column '{label_column}': pass --probe-label-column, one of "
                          f"{', '.join(cols)}")
    texts, labels = [], []
    for row in docs:
        if len(texts) >= 20 * (N_TRAIN + N_TEST):
            break
        text, label = row.get(text_column), row.get(label_column)
        if isinstance(text, str) and text.strip() and label is not None:
            texts.append(text)
            labels.append(str(label))
    counts = collections.Counter(labels)
    if len(counts) < 2:
        raise SaelabError(f"--probe-dataset {name}: its '{label_column}' column has {len(counts)} distinct value(s) "
                          "over its texts; a probe needs at least two classes")
    # a class with fewer texts than MIN_CLASS is no task of its own (its test split would hold a handful); its texts
    # stay among the others' negatives
    classes = [c for c, n in counts.most_common(MAX_CLASSES) if n >= MIN_CLASS]
    if not classes:
        raise SaelabError(f"--probe-dataset {name}: no label value has {MIN_CLASS} texts (the most has "
                          f"{counts.most_common(1)[0][1]}): pass a larger dataset")
    if len(counts) == 2:
        classes = classes[:1]
    stem = path.stem if path.exists() else name
    return [Task(f"{stem}:{c}", texts, [int(lab == c) for lab in labels]) for c in classes]


def _examples(task: Task, rng: np.random.Generator) -> tuple[list, list]:
    """(train, test) examples, each half positive: (text index, token position or -1 for the text's mean, label);
    the texts are split 80/20 first, so a text's examples are on one side."""
    order = rng.permutation(len(task.texts))
    cut = int(0.8 * len(order))
    out = []
    for texts, n in ((order[:cut], N_TRAIN), (order[cut:], N_TEST)):
        pools: dict[int, list] = {0: [], 1: []}
        for t in texts:
            if task.token_level:
                for pos, lab in enumerate(task.labels[t]):
                    if lab >= 0:
                        pools[lab].append((int(t), pos + 1, lab))  # +1: BOS is position 0
            else:
                pools[task.labels[t]].append((int(t), -1, task.labels[t]))
        m = min(len(pools[0]), len(pools[1]), n // 2)
        if m < 8:
            raise SaelabError(f"probing task {task.name}: {min(len(pools[0]), len(pools[1]))} examples of one class "
                              f"where 8 are needed; pass a larger labelled dataset")
        picked = [pools[c][i] for c in (0, 1) for i in sorted(rng.choice(len(pools[c]), m, replace=False))]
        out.append(picked)
    return out[0], out[1]


def _batches(lengths: list[int], d_sae: int, tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Indices of texts in batches of similar length (little padding): each batch ≤ ``tokens`` padded tokens, and
    its dense codes [batch, T, d_sae] ≤ ``CODES_BYTES``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, cur = [], []
    for i in order:  # ascending: the batch's last text is its longest
        T = lengths[i]
        if cur and ((len(cur) + 1) * T > tokens or (len(cur) + 1) * T * d_sae * 4 > CODES_BYTES):
            out.append(cur)
            cur = []
        cur.append(i)
    return out + [cur] if cur else out


@torch.no_grad()
def _features(model, sae, task: Task, examples: list) -> tuple[np.ndarray, np.ndarray]:
    """([N, d_in] activations at the SAE's hook, [N, d_sae] codes) of the examples: a text's mean over its tokens
    (BOS and padding left out), or one token's."""
    hook, device = sae.cfg.hook_name, device_of(model)
    bos = tokenizer_bos(model.tokenizer)
    by_text: dict[int, list] = collections.defaultdict(list)
    for j, (t, pos, _) in enumerate(examples):
        by_text[t].append((j, pos))
    texts = sorted(by_text)
    tok = model.tokenizer([task.texts[t] for t in texts], add_special_tokens=False)["input_ids"]
    tok = [[bos] + list(t)[: CONTEXT - 1] for t in tok]
    xs = torch.zeros(len(examples), sae.d_in)
    fs = torch.zeros(len(examples), sae.d_sae)
    for batch in _batches([len(t) for t in tok], sae.d_sae):
        rows, ids = [tok[i] for i in batch], [texts[i] for i in batch]
        T = max(map(len, rows))
        toks = torch.tensor([r + [bos] * (T - len(r)) for r in rows], device=device)  # padding after: causal
        x = activation_at(model, toks, hook, "pass the model this SAE was trained on").float().to(sae.W_enc.device)
        means, points = [], []  # (example, batch row); (example, batch row, position)
        for r, t in enumerate(ids):
            for j, pos in by_text[t]:
                (means.append((j, r)) if pos < 0 else points.append((j, r, pos)))
        if means:  # every token's codes, then each text's mean over its own tokens
            n = torch.tensor([len(r) for r in rows], device=x.device)
            ar = torch.arange(T, device=x.device)
            mask = ((ar >= 1) & (ar < n[:, None])).float()[..., None]  # [B, T, 1]
            f = sae.encode(x.reshape(-1, x.shape[-1])).float().reshape(len(rows), T, -1)
            mx, mf = (x * mask).sum(1) / mask.sum(1), (f * mask).sum(1) / mask.sum(1)
            j, r = map(list, zip(*means))
            xs[j], fs[j] = mx[r].cpu(), mf[r].cpu()
        if points:
            j, r, pos = map(list, zip(*points))
            sel = x[r, pos]
            xs[j], fs[j] = sel.cpu(), sae.encode(sel).float().cpu()
    return xs.numpy(), fs.numpy()


def top_by_mean_difference(X: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The k columns of largest |mean over positives − mean over negatives| (ties: the lower index first)."""
    diff = np.abs(X[y == 1].mean(0) - X[y == 0].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


def probe_accuracy(Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, yte: np.ndarray, seed: int = 0) -> float:
    """Test accuracy of a logistic regression (standardised inputs, L2, C = 1) trained on the train split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
    clf.fit(Xtr, ytr)
    return float(clf.score(Xte, yte))


def score_task(Xtr, ytr, Xte, yte, Ftr, Fte, ks=K_VALUES) -> dict:
    """One task's scores from its raw features (X) and SAE codes (F), train and test."""
    out = {"llm_test_accuracy": probe_accuracy(Xtr, ytr, Xte, yte), "sae_test_accuracy": probe_accuracy(Ftr, ytr, Fte,
                                                                                                       yte)}
    for k in ks:
        cols = top_by_mean_difference(Xtr, ytr, min(k, Xtr.shape[1]))
        out[f"llm_top_{k}_test_accuracy"] = probe_accuracy(Xtr[:, cols], ytr, Xte[:, cols], yte)
    for k in ks:
        lat = top_by_mean_difference(Ftr, ytr, min(k, Ftr.shape[1]))
        out[f"sae_top_{k}_test_accuracy"] = probe_accuracy(Ftr[:, lat], ytr, Fte[:, lat], yte)
    out["top_latents"] = [int(i) for i in top_by_mean_difference(Ftr, ytr, min(max(ks), Ftr.shape[1]))]
    out.update(n_train=len(ytr), n_test=len(yte))
    return out


def probing_scores(sae, model, datasets: list[tuple[str, str, str]] = (), seed: int = 0, progress: bool = False) -> dict:
    """The probing suite's scores of ``sae`` over ``model``: the bundled tasks and one per class of each labelled
    dataset in ``datasets`` [(name, text column, label column)]."""
    from tqdm.auto import tqdm

    sae = sae.one_layer("the probing suite").eval().to(device_of(model))
    if sae.cfg.hook_name not in model.hook_dict:
        raise SaelabError(f"the model has no hook {sae.cfg.hook_name!r}: pass the model this SAE was trained on "
                          "(--model)")
    tasks = bundled_tasks(model.tokenizer, seed)
    for name, text_col, label_col in datasets:
        tasks += dataset_tasks(name, text_col, label_col, seed)
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SaelabError(f"two probing tasks are named {twice[0]!r} (two --probe-dataset files of one name, or a "
                          "dataset named as a bundled task): rename one")
    rng = np.random.default_rng(seed)
    per = {}
    for task in tqdm(tasks, desc="probing", unit="task", disable=not progress):
        train, test = _examples(task, rng)
        Xtr, Ftr = _features(model, sae, task, train)
        Xte, Fte = _features(model, sae, task, test)
        ytr, yte = np.array([e[2] for e in train]), np.array([e[2] for e in test])
        per[task.name] = score_task(Xtr, ytr, Xte, yte, Ftr, Fte)
    keys = [k for k in next(iter(per.values())) if k.endswith("accuracy")]
    return {**{k: float(np.mean([s[k] for s in per.values()])) for k in keys}, "k_values": list(K_VALUES),
            "tasks": per}
