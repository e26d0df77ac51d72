"""`python -m atlas_fast ...`: the same command line as the `atlas-fast` script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
