"""``python -m agrel_sim``: the ``agrel-sim`` command line."""

import sys

from agrel_sim.cli import main

sys.exit(main())
