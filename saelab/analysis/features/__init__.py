"""The feature database of an SAE: ``analyze`` streams a store once through the SAE and writes ``features.h5``
into the SAE folder; ``FeatureDB`` reads it one latent card at a time; labels live beside it.

One module a concept:

* ``records``: the file's format (layout, sizes), the SAE identity it is bound to, the card records;
* ``codes``: a batch of the pass as sparse codes, with its token windows;
* ``accumulate``: the streaming accumulators (density, top and quantile examples, histograms);
* ``build``: ``analyze``, the pass and the atomic write of ``features.h5``;
* ``db``: ``FeatureDB``, the reader;
* ``labels``: ``load_labels`` and ``save_label`` (labels.json).

The logit lens (``saelab.analysis.logit_lens``) and decoder geometry (``saelab.analysis.geometry``) that a card
shows are modules of their own; their names are re-exported here for ``from saelab.analysis.features import …``.
"""

from saelab.analysis.features.build import BATCH_ROWS, MAX_TOP, analyze, analyze_all, nesting_groups
from saelab.analysis.features.codes import sparse_codes
from saelab.analysis.features.db import FeatureDB
from saelab.analysis.features.labels import load_labels, save_label
from saelab.analysis.features.records import (
                                              AFTER,
                                              BEFORE,
                                              EAGER,
                                              FORMAT_VERSION,
                                              N_BANDS,
                                              N_BINS,
                                              PER_BAND,
                                              PER_LATENT,
                                              RESERVOIR,
                                              WINDOW,
                                              Example,
                                              LatentCard,
                                              weights_identity,
)
from saelab.analysis.geometry import (
                                              N_NEIGHBOURS,
                                              best_matches,
                                              decoder_matches,
                                              either_signed,
                                              head_shares,
                                              neighbours,
                                              unit_rows,
)
from saelab.analysis.logit_lens import N_LOGITS, RESIDUAL_HOOKS, direct_logits, logit_effects
from saelab.layout import FEATURES_FILE, LABELS_FILE

__all__ = ["AFTER", "BATCH_ROWS", "BEFORE", "EAGER", "FEATURES_FILE", "FORMAT_VERSION", "Example", "FeatureDB",
           "LABELS_FILE", "LatentCard", "MAX_TOP", "N_BANDS", "N_BINS", "N_LOGITS", "N_NEIGHBOURS", "PER_BAND",
           "PER_LATENT", "RESERVOIR", "RESIDUAL_HOOKS", "WINDOW", "analyze", "analyze_all", "best_matches",
           "decoder_matches", "direct_logits", "either_signed", "head_shares", "logit_effects", "load_labels",
           "nesting_groups", "neighbours", "save_label", "sparse_codes", "unit_rows", "weights_identity"]
