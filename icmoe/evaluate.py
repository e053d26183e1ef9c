"""`python -m icmoe.evaluate`: score a checkpoint on a dataset split (`icmoe.evaluation`; docs/evaluation.md)."""

from icmoe.evaluation.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
