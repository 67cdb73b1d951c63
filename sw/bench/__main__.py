"""``python -m m3vit.sw.bench [NAME ...]``: run benchmarks, update ``docs/benchmarks.md``."""

import sys

from .suite import main

sys.exit(main())
