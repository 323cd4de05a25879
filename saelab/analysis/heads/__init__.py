"""Discrete-code head identification, and the ablation sweep it is checked against.

The method of O'Neill & Bui, "Sparse Autoencoders Enable Scalable and Reliable Circuit
Identification in Language Models" (2024), at the head level:

1. One forward pass over ``n`` positive prompts (a task's clean prompts: the behaviour is
   there) and ``n`` negative ones (its corrupted prompts: the behaviour cannot happen) records
   every head's output ``blocks.L.attn.hook_z[:, pos, head]`` (d_head numbers). ``position``:
   ``"last"`` (the position whose next token the task scores; default) or ``"mean"`` (the mean
   over the non-BOS positions, what the paper's code stores for its datasets).
2. A small ReLU SAE per head (``d_sae`` latents, L1 penalty, unit-norm decoder rows) is trained
   full-batch with Adam on those 2n vectors. All heads train at once: a batched SAE whose
   weights carry a leading head dimension (``HeadSAEs``); its loss is the sum of the per-head
   losses, so every head's SAE gets exactly the gradients it would get alone.
3. Each example's SAE code is discretised to one integer: the index of its largest latent (the
   paper's argmax), or ``d_sae`` when no latent fires.
4. Per head, the codes seen on positives but never on negatives are counted; heads are ranked by
   that count, ties broken by the count divided by the number of distinct codes seen at all (the
   paper's two variants, ``normalise=False/True``). A head whose output takes states on the task
   that it never takes without it is flagged, with no ablation at all.

Where this follows the paper's code and where not: the paper trains one SAE shared by all heads on
their per-head residual contributions (``hook_z @ W_O``, d_model wide) averaged over positions, 200
latents, L1 0.02-0.05, 500 full-batch epochs on 10 examples, then codes all 500 examples. Here each
head has its own SAE on its ``hook_z`` (d_head wide), trained and scored on the same 2n examples; the
codes read the last position by default, because with the mean over positions every head of the tiny
model gets nearly the maximal count on the induction task (token identity dominates the mean), while
the last position separates the induction heads cleanly.

What the method cannot see: a head that is necessary but behaves the same on positives and negatives.
On the induction task the corrupted prompt replaces the earlier copy's tokens; layer 0's
previous-token head does the same thing on any tokens, so none of its codes is unique to positives,
although ablating it at every position hurts the task most (the induction heads' keys read it).

``ablation_ranking`` is the baseline: mean-ablate (or zero-ablate) one head's ``hook_z`` at every
position (or only the last) of the clean prompts and measure the drop of the mean logit difference;
one forward per head. ``compare`` gives precision/recall of the identification's top-N against the
heads the ablation marks as important. Both rankings carry their wall-clock time (``timed_rankings``
alternates the two and keeps the medians): the sweep costs 1 + n_layers·n_heads full forwards of n
prompts, identification one forward of 2n prompts stopped after the deepest ``hook_z`` plus the SAE
training and scoring, so the ratio of the two is bounded below by that one forward's share.

The modules:

- ``activations``: ``head_activations``, every head's ``hook_z`` from one early-stopped forward;
- ``saes``: ``HeadSAEs`` and their training, fused (``train_head_saes``) and reference;
- ``codes``: ``discretise`` and ``unique_positive_codes``;
- ``ranking``: ``HeadRanking``, the result of either method;
- ``identify``: ``identify_heads``, ``ablation_ranking`` and ``compare``;
- ``timing``: ``timed_rankings``, both methods alternated, median-of-repeats times.
"""

from saelab.analysis.heads.activations import HOOK, POSITIONS, head_activations
from saelab.analysis.heads.codes import discretise, unique_positive_codes
from saelab.analysis.heads.identify import ablation_ranking, compare, identify_heads
from saelab.analysis.heads.ranking import HeadRanking
from saelab.analysis.heads.saes import D_SAE, L1, LR, STEPS, HeadSAEs, train_head_saes, train_head_saes_reference
from saelab.analysis.heads.timing import timed_rankings

__all__ = ["D_SAE", "HOOK", "HeadRanking", "HeadSAEs", "L1", "LR", "POSITIONS", "STEPS", "ablation_ranking", "compare",
           "discretise", "head_activations", "identify_heads", "timed_rankings", "train_head_saes",
           "train_head_saes_reference", "unique_positive_codes"]
