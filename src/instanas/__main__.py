"""`python -m instanas`: the same as the `instanas` command."""

import sys

from .cli import main

sys.exit(main())
