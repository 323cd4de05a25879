"""Analysis on trained SAEs: the feature database (``features``), the logit lens (``logit_lens``), decoder
geometry (``geometry``), steering, comparison, tasks, circuits and heads."""
