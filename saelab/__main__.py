"""``python -m saelab`` (also what ``torchrun -m saelab`` runs)."""

from saelab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
