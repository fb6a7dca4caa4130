"""`python -m neoxlab ...` is the same as the `neoxlab` command."""

import sys

from neoxlab.cli import main

sys.exit(main())
