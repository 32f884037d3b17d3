"""`python -m mla_gen.bench`."""
import sys

from mla_gen.bench.runner import main

sys.exit(main())
