"""python -m benchmarks [--quick] [--only NAME...] [--out DIR] [--repeats N]"""

import sys

from .suite import main

sys.exit(main())
