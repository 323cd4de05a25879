"""``python -m saelab`` (also what ``torchrun -m saelab`` runs)."""

from saelab.cli import entry

if __name__ == "__main__":
    entry()
