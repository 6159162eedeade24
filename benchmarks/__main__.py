"""``python -m benchmarks`` runs the generate benchmark (same flags as ``python -m benchmarks.generate``)."""

import sys

from benchmarks.generate import main

if __name__ == "__main__":
    sys.exit(main())
