"""Train the bundled tiny model: a byte-level BPE tokenizer and a small GPT-2.

This script writes every file in ``saelab/tiny/`` (tokenizer, config, weights, the
``train_log.json`` whose numbers the docs' bundled-model page renders); with its defaults it
reproduces the shipped ones::

    python -m saelab.tiny.train_tiny --device cuda --out saelab/tiny

Recipe (every choice is a flag below; the defaults are the shipped model's):

* Corpus: ``corpus/train/*.txt`` (paragraphs separated by blank lines). The held-out
  ``corpus/heldout/*.txt`` (the last 5% of paragraphs of each source file) is never
  trained on; it gives the held-out loss. ``--split-from DIR`` re-creates the split from
  the shared source files.
* Tokenizer: byte-level BPE (``tokenizers``), ``--vocab`` entries, one special token
  ``<|endoftext|>`` used as BOS, EOS and pad (GPT-2 convention).
* Packing: paragraphs joined by ``<|endoftext|>``; each training context is a random
  window of the train stream with BOS prepended.
* Induction: small models on small corpora form induction heads late (with GPT-2's
  init std 0.02 at d=128, repeated spans mixed into language do not make them form within
  this budget). What makes them form: ``--init-std 0.08`` (about 1/sqrt(d_model), so attention
  scores are not vanishingly small at the start), a warm-up of ``--copy-steps`` on purely
  synthetic contexts (random tokens with one random span written twice, loss on the second
  copy only), then language with ``--induction-frac`` of contexts carrying such a span
  (the loss on the first, unpredictable copy masked), so the copying survives.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import random
import time

import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
SPECIAL = "<|endoftext|>"


# ----------------------------------------------------------------------------- corpus
def split_corpus(src: pathlib.Path, dst: pathlib.Path, holdout: float = 0.05) -> None:
    """Copy the shared source texts into dst/train and dst/heldout (last paragraphs held out)."""
    for name in ["tinystories_sample.txt", "tinyshakespeare.txt"]:
        paras = [p for p in (src / name).read_text(encoding="utf-8").split("\n\n") if p.strip()]
        n_hold = max(1, round(holdout * len(paras)))
        for split, part in [("train", paras[:-n_hold]), ("heldout", paras[-n_hold:])]:
            (dst / split).mkdir(parents=True, exist_ok=True)
            (dst / split / name).write_text("\n\n".join(part) + "\n", encoding="utf-8")


def read_paragraphs(folder: pathlib.Path) -> list[str]:
    paras: list[str] = []
    for f in sorted(folder.glob("*.txt")):
        paras += [p.strip() for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return paras


# -------------------------------------------------------------------------- tokenizer
def train_tokenizer(paragraphs: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(paragraphs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        unk_token=SPECIAL,
        pad_token=SPECIAL,
        model_max_length=None,
    )


def encode_stream(tokenizer, paragraphs: list[str]) -> torch.Tensor:
    """Paragraphs joined into one stream, each preceded by <|endoftext|>."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(paragraphs, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for seq in ids:
        out.append(eos)
        out.extend(seq)
    return torch.tensor(out, dtype=torch.long)


# ----------------------------------------------------------------------------- batches
def sample_batch(stream, batch, ctx, bos, gen, vocab, induction_frac, synthetic=False):
    """Random windows of the stream with BOS prepended; some get a repeated random span.

    Returns (input_ids [B, ctx], loss_mask [B, ctx-1]) where the mask is False on targets
    inside a first (unpredictable) random copy. Vectorised: no Python loop per row.
    """
    starts = torch.randint(0, len(stream) - ctx, (batch,), generator=gen)
    x = stream[starts[:, None] + torch.arange(ctx - 1)]
    x = torch.cat([torch.full((batch, 1), bos, dtype=torch.long), x], dim=1)
    ind = torch.rand(batch, generator=gen) < induction_frac
    span = torch.randint(4, (ctx - 2) // 2 + 1, (batch,), generator=gen)
    pos = 1 + (torch.rand(batch, generator=gen) * (ctx - 2 * span)).long()  # 1 .. ctx-2*span
    r = torch.randint(1, vocab, (batch, (ctx - 2) // 2), generator=gen)
    j = torch.arange(ctx)[None, :]
    off = j - pos[:, None]  # offset into the first copy
    first = ind[:, None] & (off >= 0) & (off < span[:, None])
    second = ind[:, None] & (off >= span[:, None]) & (off < 2 * span[:, None])
    src = torch.where(second, off - span[:, None], off).clamp(0, r.shape[1] - 1)
    x = torch.where(first | second, r.gather(1, src), x)
    # target t predicts x[t+1]: the first copy x[pos:pos+span] is targets pos-1 .. pos+span-2
    mask = ~first[:, 1:]
    if synthetic:  # copy warm-up: random tokens everywhere, loss only on the second copy
        x = torch.where(first | second, x, torch.randint(1, vocab, x.shape, generator=gen))
        x[:, 0] = bos
        mask = second[:, 1:]
    return x, mask


# ------------------------------------------------------------------------------- evals
@torch.no_grad()
def heldout_loss(model, stream, ctx, bos, batch=16):
    """Mean next-token loss over consecutive held-out windows (BOS first, as in harvest)."""
    model.eval()
    n = (len(stream) // (ctx - 1)) * (ctx - 1)
    windows = stream[:n].view(-1, ctx - 1)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        x = torch.cat([torch.full((len(w), 1), bos, dtype=torch.long), w], dim=1)
        x = x.to(model.device)
        logits = model(x).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


def unigram_entropy(stream, vocab) -> float:
    counts = torch.bincount(stream, minlength=vocab).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def induction_losses(model, vocab, bos, span=50, n=32, seed=123):
    """Mean loss on the first and second copy of random token sequences repeated twice."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(1, vocab, (n, span), generator=g)
    x = torch.cat([torch.full((n, 1), bos, dtype=torch.long), r, r], dim=1).to(model.device)
    logits = model(x).logits[:, :-1]
    losses = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    model.train()
    # targets 0..span-1 are the first copy (target 0 is r[0] after BOS), span.. the second
    return float(losses[:, 1:span].mean()), float(losses[:, span:].mean())


IOI_TEMPLATES = [
    "When {A} and {B} went to the park, {B} gave the ball to",
    "When {A} and {B} went to the store, {B} gave a toy to",
    "{A} and {B} were playing. {B} gave the apple to",
    "Then, {A} and {B} had a lot of fun. {B} said hello to",
]
IOI_NAMES = ["Lily", "Tom", "Ben", "Mia", "Sue", "Max", "Tim", "Anna", "Sam", "Lucy", "Jack", "Mom"]


@torch.no_grad()
def ioi_accuracy(model, tokenizer, bos):
    """Share of IOI prompts where the indirect object outscores the subject as next token."""
    model.eval()
    correct = total = 0
    for t in IOI_TEMPLATES:
        for a in IOI_NAMES:
            for b in IOI_NAMES:
                if a == b:
                    continue
                ids = [bos] + tokenizer.encode(t.format(A=a, B=b), add_special_tokens=False)
                ta = tokenizer.encode(" " + a, add_special_tokens=False)[0]
                tb = tokenizer.encode(" " + b, add_special_tokens=False)[0]
                logits = model(torch.tensor([ids], device=model.device)).logits[0, -1]
                correct += int(logits[ta] > logits[tb])
                total += 1
    model.train()
    return correct / total


# -------------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=pathlib.Path, default=HERE / "corpus")
    p.add_argument("--split-from", type=pathlib.Path, default=None, help="re-create corpus/ from these source texts")
    p.add_argument("--out", type=pathlib.Path, default=HERE)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--init-std", type=float, default=0.08, help="weight init std (GPT-2's 0.02 suits d=768; small widths learn induction faster with more)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--induction-frac", type=float, default=0.3)
    p.add_argument("--copy-steps", type=int, default=2500,
                   help="first N steps train only on repeated random spans (induction warm-up)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the committed model's device is in train_log.json)")
    args = p.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.split_from:
        split_corpus(args.split_from, args.corpus)
    train_paras = read_paragraphs(args.corpus / "train")
    held_paras = read_paragraphs(args.corpus / "heldout")

    t0 = time.time()
    tokenizer = train_tokenizer(train_paras, args.vocab)
    bos = tokenizer.bos_token_id
    train_stream = encode_stream(tokenizer, train_paras)
    held_stream = encode_stream(tokenizer, held_paras)
    h_uni = unigram_entropy(torch.cat([train_stream, held_stream]), len(tokenizer))
    print(f"tokenizer: {len(tokenizer)} tokens, train {len(train_stream):,} tokens, "
          f"held-out {len(held_stream):,}, unigram entropy {h_uni:.3f} nats ({time.time()-t0:.1f}s)", flush=True)

    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_positions=args.ctx, n_embd=args.d_model, n_layer=args.layers,
        n_head=args.heads, resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
        bos_token_id=bos, eos_token_id=bos, pad_token_id=bos, tie_word_embeddings=True,
        initializer_range=args.init_std,
    )
    model = GPT2LMHeadModel(cfg).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(args.seed)
    log = []
    t0 = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        warm = step < args.copy_steps
        x, mask = sample_batch(train_stream, args.batch, args.ctx, bos, gen, len(tokenizer),
                               1.0 if warm else args.induction_frac, synthetic=warm)
        x, mask = x.to(args.device), mask.to(args.device)
        logits = model(x).logits[:, :-1]
        losses = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        loss = (losses * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = step == args.steps - 1
        if (step + 1) % args.eval_every == 0 or last:
            held = heldout_loss(model, held_stream, min(args.ctx, 128), bos)
            ind1, ind2 = induction_losses(model, len(tokenizer), bos, span=min(50, (args.ctx - 1) // 2))
            entry = dict(step=step + 1, train_loss=round(loss.item(), 4), heldout_loss=round(held, 4),
                         induction_first=round(ind1, 3), induction_second=round(ind2, 3),
                         minutes=round((time.time() - t0) / 60, 2))
            log.append(entry)
            print(json.dumps(entry), flush=True)

    ioi = ioi_accuracy(model, tokenizer, bos)
    final = dict(log[-1], ioi_accuracy=round(ioi, 4), unigram_entropy=round(h_uni, 4),
                 heldout_over_unigram=round(log[-1]["heldout_loss"] / h_uni, 4))
    print("final:", json.dumps(final), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    run = dict(args={k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
               n_params=n_params, train_tokens=len(train_stream), heldout_tokens=len(held_stream),
               final=final, log=log)
    (args.out / "train_log.json").write_text(json.dumps(run, indent=1) + "\n")
    return final


if __name__ == "__main__":
    main()
