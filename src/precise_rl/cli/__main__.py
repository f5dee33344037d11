"""``python -m precise_rl.cli ARGS``: the same as ``precise-rl ARGS`` (used by ``accelerate launch -m``)."""

import sys

from . import main

sys.exit(main())
