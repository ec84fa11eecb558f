import sys

from hpcbatch.kernels.harness import main

sys.exit(main())
