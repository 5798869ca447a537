"""``python -m fhirtwin`` runs the command line (as the ``fhirtwin`` script does)."""

import sys

from fhirtwin.cli import main

sys.exit(main())
