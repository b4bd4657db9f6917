"""`python -m bigtransfer VERB ...` (also what `torchrun -m bigtransfer` runs)."""

import sys

from .cli import main

sys.exit(main())
