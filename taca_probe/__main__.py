"""``python -m taca_probe`` is the ``taca-probe`` command (also what torchrun/accelerate launch)."""

import sys

from .cli import main

sys.exit(main())
