"""The options of the commands that read SAEs rather than train them: one field each, documented once.

The CLI builds each command's flags from these dataclasses (``saelab.cli.common.add_arguments``: the help
text, the default, choices), and the library functions behind the commands take their defaults from the same
fields (``find_circuit(..., ig_steps=CircuitOptions.ig_steps)``), so a default is written in one place. The
run commands (harvest, train, synthetic) have theirs in ``saelab.config``.
"""

from __future__ import annotations

from dataclasses import dataclass

from saelab.config import JSONConfig, _f

_NEVER = "(a file of saelab's own layout, or one the command reads, is never replaced)"
#: the most torch threads a command takes: more than any machine's cores buys nothing, and torch's thread pool
#: crashes (a segfault, no message) when asked for 100000
MAX_THREADS = 256
TASK_HELP = 'induction, ioi, names, or a .jsonl file of {"clean", "corrupted", "answer", "wrong"} lines'


@dataclass
class DistributedOptions(JSONConfig):
    """The flags of the commands that run as several processes (harvest, train)."""

    nproc: int | None = _f(None, "run as N processes: execs `python -m torch.distributed.run --standalone "
                                 "--nproc_per_node N -m saelab ...` (or launch with torchrun yourself)", min=1)
    dist_timeout: float | None = _f(None, "under torchrun: seconds a collective may wait for the other ranks before "
                                          "the run stops (default: $SAELAB_DIST_TIMEOUT, else 300)", min=1)


@dataclass
class EvalOptions(JSONConfig):
    """`saelab eval`: reconstruction metrics on the store; CE-loss recovered and KL with a model."""

    sae: str = _f("", "an SAE folder (saelab or SAELens) or a group folder (group.json)", required=True)
    activations: str | None = _f(None, "store or RUN folder (default: the one it was trained on)")
    model: str | None = _f(None, "splice the SAE into this model for CE metrics (e.g. tiny)")
    contexts: int = _f(64, "held-out contexts for the CE metrics")
    suite: str = _f("core", "evaluation suites, comma-separated: core (reconstruction, L0, dead/dense latents; CE "
                            "metrics with --model), truth (recovery of a synthetic store's planted features), "
                            "absorption (first-letter feature absorption over the vocabulary; needs --model), "
                            "probing (k-sparse probes on labelled text; needs --model), autointerp (latents "
                            "explained and the explanations scored; needs --model), stability (agreement with the "
                            "--against SAEs)")
    against: list[str] = _f([], "for --suite stability: an SAE trained with the same settings and another seed "
                                "(repeat the flag; with a group as --sae, a group: its SAEs are paired by hook)")
    absorption_words: int = _f(4000, "for --suite absorption: vocabulary words read at most (a seeded sample of the "
                                     "tokens made of letters; the probes train on four fifths, the rest are scored)",
                               min=50)
    absorption_min_f1: float = _f(0.6, "for --suite absorption: a letter is scored where its probe on the raw "
                                       "activations reaches this test F1 (SAEBench's 0.6: the model represents it)",
                                  min=0.0, max=1.0)
    probe_dataset: list[str] = _f([], "for --suite probing: a labelled dataset beside the bundled tasks, a local "
                                      ".jsonl/.csv/.parquet file or a Hugging Face name, one task per label value "
                                      "(repeat the flag)")
    probe_text_column: str = _f("text", "for --probe-dataset: its text column")
    probe_label_column: str = _f("label", "for --probe-dataset: its label column")
    explainer: str = _f("tokens", "for --suite autointerp: who explains and scores latents: tokens (deterministic, "
                                  "offline: a latent's top tokens) or openai (an OpenAI-compatible endpoint)",
                        choices=["tokens", "openai"])
    autointerp_latents: int = _f(50, "for --suite autointerp: latents explained and scored (a seeded sample of the "
                                     "live, non-dense ones; each scored against another's explanation)", min=2)
    openai_url: str | None = _f(None, "for --explainer openai: the endpoint's base URL, e.g. http://localhost:8000/v1 "
                                      "(default: $OPENAI_BASE_URL, else OpenAI's)")
    openai_model: str | None = _f(None, "for --explainer openai: the chat model (default: $SAELAB_OPENAI_MODEL)")
    openai_key: str | None = _f(None, "for --explainer openai: the API key (default: $OPENAI_API_KEY; local "
                                      "servers take any)")
    openai_timeout: float = _f(60.0, "for --explainer openai: seconds to wait for one answer (each prompt is "
                                     "retried with backoff after a timeout, a 429 or a 5xx)", min=0.001)


@dataclass
class AnalyzeOptions(JSONConfig):
    """`saelab analyze`: the feature database of an SAE (each SAE of a group)."""

    sae: str = _f("", "an SAE folder (saelab or SAELens) or a group folder (group.json)", required=True)
    activations: str | None = _f(None, "store or RUN folder (default: the store each SAE was trained on, from its "
                                       "train.json)")
    tokens: int | None = _f(None, "analyse only the first N rows (default: the whole store)")
    top: int = _f(20, "top-activating examples kept per latent")


@dataclass
class ExportOptions(JSONConfig):
    """`saelab export`: latent cards as one self-contained HTML file."""

    sae: str = _f("", "an analysed SAE folder, or a group folder (every SAE in it)", required=True)
    out: str = _f("", "the HTML file to write, e.g. cards.html", required=True)
    latents: str | None = _f(None, "latent ids and ranges, e.g. 3,17,100-120 (default: --sample)")
    sample: int = _f(50, "without --latents: this many random latents that fired, per SAE")
    seed: int = _f(0, "seed of the sample")
    max_cards: int = _f(2000, "refuse to write more cards than this in all (each is tens of KiB of HTML)")
    force: bool = _f(False, f"replace an existing --out file that saelab export did not write {_NEVER}")


@dataclass
class CompareOptions(JSONConfig):
    """`saelab compare`: the latents two SAEs share."""

    sae: str = _f("", "SAE A: an SAE folder, a group folder (with --hook), or hf://ORG/REPO/SUBFOLDER", required=True)
    other: str = _f("", "SAE B, as --sae (a group with --other-hook)", required=True)
    hook: str | None = _f(None, "with a group folder as --sae: the hook whose SAE is A")
    other_hook: str | None = _f(None, "with a group folder as --other: the hook whose SAE is B")
    json: str | None = _f(None, "also write the summary and every latent's match to this file")
    force: bool = _f(False, f"replace an existing --json file that saelab compare did not write {_NEVER}")
    device: str = _f("auto", "where the cosines (and with --universality the codes and correlations) are computed: "
                             "cpu, cuda or auto")
    universality: bool = _f(False, "also pair the latents by activation correlation on the same tokens and score the "
                                   "paired decoder rows by SVCCA against random pairings (Lan et al. 2024; SAEs of "
                                   "two models or layers); needs --activations")
    activations: str | None = _f(None, "with --universality: the store SAE A reads, or the RUN folder holding it")
    other_activations: str | None = _f(None, "with --universality: the store (or RUN folder) SAE B reads, row-aligned "
                                             "with --activations (default: B's hook's store in the RUN folder of "
                                             "--activations, i.e. one harvest run)")
    rows: int = _f(32768, "with --universality: at most this many rows (tokens), the held-out split's where the "
                          "store has one, BOS positions left out", min=2)
    quiet: bool = _f(False, "no progress bar (with --universality)")


@dataclass
class SteerOptions(JSONConfig):
    """`saelab steer`: the model steered with SAE latents, clean and steered side by side."""

    sae: str = _f("", "an SAE folder, a group folder with --hook, or a hub SAE hf://ORG/REPO/SUBFOLDER",
                  required=True)
    prompt: str = _f("", "the text to continue", required=True)
    steer: list[str] = _f([], "e.g. 401:add:5, 401:clamp:2.5, 401:ablate; repeat for several latents",
                          metavar="LATENT:MODE[:VALUE]")
    sweep: str | None = _f(None, "one --steer LATENT:add (or :clamp) at each of these values, e.g. 0,2,5,10,20",
                           metavar="C1,C2,...")
    hook: str | None = _f(None, "which SAE of a group folder")
    model: str | None = _f(None, "the model to steer (default: the one the SAE names)")
    tokens: int = _f(30, "new tokens to generate")
    temperature: float | None = _f(None, "sampling temperature, 0 = greedy (default: 1.0; 0 with --sweep)")
    seed: int = _f(0, "sampling seed, the same for both runs")
    json: str | None = _f(None, "also write the result as JSON to this file")
    force: bool = _f(False, f"replace an existing --json file that saelab steer did not write {_NEVER}")


@dataclass
class CircuitOptions(JSONConfig):
    """`saelab circuit`: a sparse feature circuit of a task over an SAE group."""

    task: str = _f("", TASK_HELP, required=True)
    saes: str = _f("", "an SAE group folder (runs/GROUP with group.json) or one SAE folder", required=True,
                   aliases=["--sae"])
    out: str | None = _f(None, "circuit file (default: <saes>/circuits/<task>.json); an existing file is replaced "
                               "(atomically), and the output says so")
    force: bool = _f(False, f"replace an existing --out file that saelab circuit did not write {_NEVER}")
    method: str = _f("attrib", "attribution patching (one backward pass) or integrated gradients",
                     choices=["attrib", "ig"])
    ig_steps: int = _f(10, "integrated-gradient steps")
    node_threshold: float = _f(0.1, "keep nodes with |effect| above this, in logit-difference units")
    edge_threshold: float = _f(0.01, "keep edges with |weight| at least this")
    n: int = _f(64, "task examples")
    seed: int = _f(0, "task sampling seed")


@dataclass
class AttributeOptions(JSONConfig):
    """`saelab attribute`: the attribution graph of a prompt over a group of MLP transcoders."""

    sae: str = _f("", "a group folder of MLP transcoders (saelab train --arch transcoder on a RUN harvested with "
                      "--pairs mlp), or one transcoder folder", required=True, aliases=["--saes"])
    prompt: str = _f("", "the text to attribute (BOS first; at most the model's context)", required=True)
    out: str | None = _f(None, "graph file (default: <sae>/graphs/<the prompt's first words>.json); an existing "
                               "graph file is replaced (atomically), and the output says so")
    force: bool = _f(False, f"replace an existing --out file that saelab attribute did not write {_NEVER}")
    node_threshold: float = _f(0.8, "keep the most influential nodes holding this fraction of the influence on the "
                                    "output", min=0, max=1)
    edge_threshold: float = _f(0.98, "keep the most influential edges holding this fraction of it", min=0, max=1)
    max_logits: int = _f(10, "at most this many logit nodes (the most likely next tokens)", min=1)
    logit_prob: float = _f(0.95, "fewest logit nodes whose probabilities sum to this", min=0, max=1)
    max_features: int | None = _f(None, "keep only the features of the largest activations (the others join their "
                                        "error nodes); default: every active feature", min=1)
    batch_size: int = _f(64, "targets per backward pass (memory: batch × prompt × vocabulary logits)", min=1)


@dataclass
class HeadsOptions(JSONConfig):
    """`saelab heads`: attention heads ranked by the discrete SAE codes unique to a task's positive examples."""

    task: str = _f("", TASK_HELP, required=True)
    model: str = _f("tiny", "tiny (bundled), a local Hugging Face folder or a hub name")
    n: int = _f(8, "positive examples (as many negatives)")
    top: int = _f(3, "heads to print and to score precision/recall at")
    position: str = _f("last", "which hook_z the codes read: the last position or the mean over positions",
                       choices=["last", "mean"])
    compare_ablation: bool = _f(False, "also mean-ablate each head and report precision/recall@top and both run "
                                       "times")
    ablation_positions: str = _f("all", "ablate each head at every position or only at the last one",
                                 choices=["all", "last"])
    repeats: int = _f(5, "with --compare-ablation: run both methods this many times, alternated, and report the "
                         "median times")
    threads: int = _f(1, "torch threads (with --compare-ablation: for both methods alike); 0 keeps torch's default "
                         "(1 is faster for these small forwards on a shared CPU)", min=0, max=MAX_THREADS)
    seed: int = _f(0, "task and SAE seed")
    out: str | None = _f(None, "write the rankings, timings and comparison to this JSON file (an existing file is "
                               "replaced, atomically, and the output says so)")
    force: bool = _f(False, f"replace an existing --out file that saelab heads did not write {_NEVER}")


@dataclass
class DemoOptions(JSONConfig):
    """`saelab demo`: the pipeline on the bundled tiny model and corpus."""

    dir: str | None = _f(None, "where activations/demo and runs/demo go (default: $SAELAB_DEMO_DIR, else the saelab "
                               "checkout the current folder is in, else the current folder)")
    tokens: int | None = _f(None, "tokens to harvest (default: the whole corpus)")
    train_tokens: int = _f(2_000_000, "SAE training tokens per hook")
    no_app: bool = _f(False, "never open the browser (also implied by CI or no terminal)")


@dataclass
class AppOptions(JSONConfig):
    """`saelab app`: the Streamlit app on an SAE folder or a group folder."""

    sae: str = _f("", "an SAE folder or a group folder (runs/NAME_OR_GROUP)", required=True)
    port: int = _f(8501, "port to serve on", min=1, max=65535)
    host: str = _f("127.0.0.1", "address to serve on (127.0.0.1: this machine only)")
