"""`python -m icmoe.train`: train a model of any family (the trainer is `icmoe.training`; docs/training.md)."""

from icmoe.training.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
