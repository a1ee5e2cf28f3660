"""`python -m conductord.sim`: see `conductord.sim.runner.main`."""

import sys

from conductord.sim.runner import main

sys.exit(main())
