"""Analysis on trained SAEs: feature database, steering, tasks and circuits."""
