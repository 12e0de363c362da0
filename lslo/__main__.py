"""``python -m lslo ...``: the CLI, also for ``accelerate launch -m lslo train ...`` and ``torchrun -m lslo ...``."""

import sys

from .cli import main

sys.exit(main())
