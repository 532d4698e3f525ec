"""`python -m uad_jax.data.demo --out DIR`: generates the demo cohort (see `cohort.py`)."""

import sys

from uad_jax.data.demo.cohort import main

if __name__ == "__main__":
  sys.exit(main())
