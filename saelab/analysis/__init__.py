"""Analysis on trained SAEs: the feature database (``features``), steering, tasks, circuits and heads."""
