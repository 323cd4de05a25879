"""Analysis on trained SAEs: the feature database (``features``), steering, tasks and circuits."""
