import sys

from .offload_bench import main

sys.exit(main())
