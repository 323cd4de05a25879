"""mkdocs hook: the bundled model's card, rendered from the files that ship with it.

``<!-- tiny-model-card -->`` becomes two tables: the architecture (``saelab/tiny/config.json``) and
the recipe and final measurements that ``train_tiny.py`` wrote into ``saelab/tiny/train_log.json``
when it trained these weights. Nothing on the page is typed by hand, so it cannot drift from the
weights.
"""

from __future__ import annotations

import json
import logging
import pathlib

log = logging.getLogger("mkdocs.hooks.tiny_model")

MARKER = "<!-- tiny-model-card -->"
_tiny: pathlib.Path | None = None


def on_config(config):
    global _tiny
    _tiny = pathlib.Path(config.config_file_path).resolve().parent / "saelab" / "tiny"
    return config


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render_card(_tiny or pathlib.Path("saelab/tiny")))


def render_card(tiny: pathlib.Path) -> str:
    try:
        cfg = json.loads((tiny / "config.json").read_text(encoding="utf-8"))
        run = json.loads((tiny / "train_log.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.warning("the tiny model's config.json / train_log.json cannot be read: %s", e)
        return "The model card cannot be rendered: `saelab/tiny/config.json` or `train_log.json` is missing."
    args, final = run.get("args", {}), run.get("final", {})

    def n(v, digits=3):
        if isinstance(v, bool) or v is None:
            return "—"
        if isinstance(v, int):
            return f"{v:,}"
        return f"{v:.{digits}f}"

    arch = [
        ("class", ", ".join(cfg.get("architectures", [])) or cfg.get("model_type", "")),
        ("layers", n(cfg.get("n_layer"))),
        ("d_model", n(cfg.get("n_embd"))),
        ("heads", n(cfg.get("n_head"))),
        ("d_mlp", n(cfg.get("n_inner") or 4 * cfg.get("n_embd", 0))),
        ("positions", n(cfg.get("n_positions"))),
        ("vocabulary", n(cfg.get("vocab_size"))),
        ("activation", f"`{cfg.get('activation_function', '')}`"),
        ("tied embeddings", "yes" if cfg.get("tie_word_embeddings") else "no"),
        ("parameters (train_tiny.py's count)", n(run.get("n_params"))),
    ]
    recipe = [
        ("steps × batch × context", f"{n(args.get('steps'))} × {n(args.get('batch'))} × {n(args.get('ctx'))}"),
        ("induction warm-up steps (synthetic repeated spans)", n(args.get("copy_steps"))),
        ("share of language contexts with a repeated span", n(args.get("induction_frac"), 2)),
        ("AdamW lr, warm-up steps, weight decay", f"{args.get('lr')}, {n(args.get('warmup'))}, {args.get('weight_decay')}"),
        ("dropout, init std", f"{args.get('dropout')}, {args.get('init_std')}"),
        ("seed", n(args.get("seed"))),
        ("train / held-out tokens", f"{n(run.get('train_tokens'))} / {n(run.get('heldout_tokens'))}"),
    ]
    measured = [
        ("unigram entropy of the corpus", f"{n(final.get('unigram_entropy'))} nats"),
        ("held-out loss (contexts of 128, BOS first)",
         f"{n(final.get('heldout_loss'))} nats = {n(final.get('heldout_over_unigram'))} × the unigram entropy"),
        ("induction: loss on the 1st / 2nd copy of 50 random tokens",
         f"{n(final.get('induction_first'))} / {n(final.get('induction_second'))} nats"),
        ("IOI-style template accuracy (indirect object over subject)",
         f"{100 * final['ioi_accuracy']:.1f}%" if isinstance(final.get("ioi_accuracy"), float) else "—"),
    ]

    def table(title, rows):
        return f"| {title} | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)

    return "\n\n".join([table("architecture", arch), table("recipe", recipe),
                        table("measured by `train_tiny.py` on these weights", measured)])
