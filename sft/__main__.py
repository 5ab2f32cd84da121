"""``python -m sft ...``: see ``sft/cli/`` or ``python -m sft --help``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
