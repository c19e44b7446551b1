"""`python -m loramerge.server ...` is the `loramerge` command."""

import sys

from .cli import main

if __name__ == "__main__":  # vLLM's engine core is spawned: importing must not run the CLI
    sys.exit(main())
