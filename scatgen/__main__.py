"""`python -m scatgen ...`: the `scatgen` command without its console script."""

import sys

from scatgen.cli import main

sys.exit(main())
