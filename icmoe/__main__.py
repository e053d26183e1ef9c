"""`python -m icmoe COMMAND ...`: the same front as the `icmoe` console script (icmoe/commands.py)."""

import sys

from icmoe.commands import main

if __name__ == "__main__":
    sys.exit(main())
