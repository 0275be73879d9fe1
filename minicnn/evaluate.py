"""python -m minicnn.evaluate: the command; its code is minicnn/training/evaluate.py."""
import sys

from minicnn.training.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
