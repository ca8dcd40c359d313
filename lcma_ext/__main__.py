"""``python -m lcma_ext``: the ``lcma-ext`` command line."""

import sys

from lcma_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
