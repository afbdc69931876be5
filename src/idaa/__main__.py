"""`python -m idaa` is the `idaa` command."""

import sys

from idaa.cli import main

sys.exit(main())
