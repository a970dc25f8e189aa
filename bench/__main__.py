"""`python -m bench`: runs the benchmark (bench/run.py) and writes bench/results/RESULTS.md and plots."""
import sys

from bench.run import main

sys.exit(main())
