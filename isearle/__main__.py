"""`python -m isearle` = the `isearle` command."""

import sys

from isearle.cli import main

sys.exit(main())
