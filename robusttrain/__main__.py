"""``python -m robusttrain`` runs the ``robusttrain`` command."""

import sys

from robusttrain.commands.main import main

sys.argv[0] = "robusttrain"  # the program name in usage lines, as for the console script
sys.exit(main())
