"""Analysis over trained SAEs: the feature database (``features``), steering, circuits."""
