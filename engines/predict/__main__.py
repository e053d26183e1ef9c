"""`python -m engines.predict`: see `engines.predict.cli`."""

from engines.predict.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
