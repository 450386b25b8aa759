"""`python -m evalprov.cli`."""

import sys

from evalprov.cli import main

sys.exit(main())
