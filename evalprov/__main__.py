"""`python -m evalprov`."""

import sys

from evalprov.cli import main

sys.exit(main())
