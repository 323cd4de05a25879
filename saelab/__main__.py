"""``python -m saelab`` (also what ``torchrun -m saelab`` runs)."""

from saelab.cli import main

if __name__ == "__main__":
    code = main()
    from saelab import distributed

    if distributed.launched():
        distributed.exit_rank(code)
    raise SystemExit(code)
