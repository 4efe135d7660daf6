"""``python -m optimum_statprune.cli``: the same as the ``optimum-statprune`` script."""

import sys

from . import main

sys.exit(main())
