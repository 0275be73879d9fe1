"""python -m minicnn.bench [kernels] ...: see minicnn/bench/models.py and kernels.py."""
import sys

from minicnn.bench.models import main

sys.exit(main())
