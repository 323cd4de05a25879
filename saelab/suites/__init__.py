"""The evaluation suites of ``saelab eval --suite``, beyond ``core`` (reconstruction, L0, dead/dense latents and,
with a model, CE-loss recovered and KL, in ``saelab.evaluate``): what the latents are, not only how well they
reconstruct.

- ``truth`` (``suites.truth``): recovery of the features planted in a synthetic store;
- ``absorption`` (``suites.absorption``): first-letter feature absorption over the model's vocabulary;
- ``probing`` (``suites.probing``): k-sparse probes on labelled text, against probes on the raw activations;
- ``autointerp`` (``suites.autointerp``, judges in ``suites.judges``): latents explained, then the explanations
  scored by detection and fuzzing on held-out windows;
- ``stability`` (``suites.stability``): agreement of SAEs that differ only by seed.

Each suite's scores go into eval.json under the suite's name.
"""

from __future__ import annotations

from saelab.errors import SaelabError

#: every suite ``saelab eval --suite`` runs, in the order it runs them
SUITES = ("core", "truth", "absorption", "probing", "autointerp", "stability")


def parse_suites(spec) -> tuple[str, ...]:
    """The suites named by ``spec`` ("core,truth" or a sequence of names), in ``SUITES`` order; an unknown or empty
    one is a one-line error naming the choices."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    bad = [s for s in names if s not in SUITES]
    if bad or not names:
        raise SaelabError(f"--suite {','.join(names)!s}: {'unknown suite ' + repr(bad[0]) if bad else 'no suite'}; "
                          f"choose from {', '.join(SUITES)} (comma-separated)")
    return tuple(s for s in SUITES if s in names)
