"""python -m minicnn.train: the command; its code is minicnn/training/trainer.py."""
import sys

from minicnn.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
