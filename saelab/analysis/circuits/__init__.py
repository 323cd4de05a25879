"""Sparse feature circuits (Marks et al., "Sparse Feature Circuits"): attribution over SAE latents
and SAE error terms at every hooked layer of a group, edges between consecutive hooked layers, and
faithfulness of the circuit under mean ablation — of its nodes and of its edges.

The model, with every SAE of the group spliced in at its hook::

    x  →  f = encode(x),  e = x − decode(f),  x' = decode(f) + e   (= x: the splice changes nothing)

Nodes are every latent ``f_i`` and the error term ``e`` at every hook (the error is one node per
hook). The metric ``m`` is the task's logit difference (``tasks.logit_diff``), averaged over the
task's examples. Every effect is summed over positions and averaged over examples.

* **Node effects.** Attribution patching (``method="attrib"``): ``IE(a) ≈ ∇ₐm · (a_clean − a_patch)``,
  the gradient taken on the clean prompts, ``a_patch`` the node's value on the corrupted prompts.
  For a latent, ∇_f m = ∇ₓm · W_decᵀ. Integrated gradients (``method="ig"``): for each hook
  separately, its nodes are moved together along the straight line from patch to clean in
  ``ig_steps`` steps (midpoint rule, the other hooks computed from there as usual), and the mean
  gradient times the difference is the effect; the effects at a hook then sum to the exact
  change of m as the steps grow (tested).
* **Edges** (u at hook j → d at hook j+1, both in the circuit): ``Σ ∇_d m · ∂d/∂u · (u_clean − u_patch)``
  — one vector-Jacobian product per downstream node, through the model from hook j to hook j+1 and
  the downstream SAE's encoder (for an error node: ``x − decode(encode(x))``).
* **Circuit**: nodes with ``|effect| > node_threshold``; edges among them with ``|weight| ≥ edge_threshold``
  (so threshold 0 keeps every edge, zero-weight ones included).
* **Faithfulness** ``(m(C) − m(∅)) / (m(M) − m(∅))``: M is the model, ∅ mean-ablates every node at
  every hook, C keeps the circuit's nodes and mean-ablates the rest. Hooks are processed in order
  and each SAE encodes the (already ablated) activation that reaches it. The means are per
  position over the task's clean prompts (the task's prompts are position-aligned), so a position
  whose content never changes (BOS) is never changed by ablation.
* **Edge faithfulness**: the node circuit, but each circuit node at hook j+1 is computed from an
  activation at hook j in which only its kept parents have their circuit values — every other
  node at hook j (pruned parents and non-circuit nodes) is at its mean — so a pruned edge carries
  its mean-ablated contribution. Nodes at the first hook are computed from the prompt. With every
  edge among circuit nodes kept it equals the node faithfulness (tested).

Works for any hooks; the path "from hook j to hook j+1" is the model's forward with the hooks up
to j fixed, which for residual-stream hooks (the demo group) is exactly the next block(s).

The modules:

- ``group``: ``SAEGroup``, ``load_group``, the group's model (``load_group_model``, ``check_model``);
- ``nodes``: the splice (latents and error term of an activation), node values, ids and selection;
- ``attribution``: metric gradients, attribution patching, integrated gradients, edge weights;
- ``faithfulness``: mean ablation of nodes and of edges;
- ``file``: the circuit file format (``KIND``, ``FORMAT_VERSION``, ``write_circuit``, ``load_circuit``);
- ``find``: ``find_circuit``, the whole pipeline.
"""

from saelab.analysis.circuits.attribution import attribution_effects, edge_weights, ig_effects, metric_grads
from saelab.analysis.circuits.faithfulness import Means, ablated_metric, edge_ablated_metric, faithfulness, task_means
from saelab.analysis.circuits.file import FORMAT_VERSION, KIND, load_circuit, write_circuit
from saelab.analysis.circuits.find import EDGE_SWEEP, NODE_SWEEP, find_circuit
from saelab.analysis.circuits.group import SAEGroup, check_model, load_group, load_group_model
from saelab.analysis.circuits.nodes import Acts, count_nodes, node_id, node_values, select_nodes

__all__ = ["Acts", "EDGE_SWEEP", "FORMAT_VERSION", "KIND", "Means", "NODE_SWEEP", "SAEGroup", "ablated_metric",
           "attribution_effects", "check_model", "count_nodes", "edge_ablated_metric", "edge_weights", "faithfulness",
           "find_circuit", "ig_effects", "load_circuit", "load_group", "load_group_model", "metric_grads", "node_id",
           "node_values", "select_nodes", "task_means", "write_circuit"]
