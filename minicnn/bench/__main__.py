"""python -m minicnn.bench [kernels|sass] ...: see minicnn/bench/models.py, kernels.py, sass.py."""
import sys

if sys.argv[1:2] == ["sass"]:                     # the kernels' machine code, no GPU needed
    from minicnn.bench.sass import main
    sys.exit(main(sys.argv[2:]))

from minicnn.bench.models import main

sys.exit(main())
