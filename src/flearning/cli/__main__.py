"""``python -m flearning.cli``: the ``flearn`` command, for launchers (torchrun, accelerate launch)."""

import sys

from flearning.cli import main

sys.exit(main())
