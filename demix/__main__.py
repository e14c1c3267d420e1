"""`python -m demix`: the `demix` command."""
import sys

from demix.cli.main import main

sys.exit(main())
