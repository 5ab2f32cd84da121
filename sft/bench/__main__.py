"""``python -m sft.bench``: see ``sft.bench``."""
import sys

from . import main

sys.exit(main())
