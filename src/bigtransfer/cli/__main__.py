"""`python -m bigtransfer.cli VERB ...`, as before the CLI became a package."""

import sys

from . import main

sys.exit(main())
