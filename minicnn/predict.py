"""python -m minicnn.predict: the command; its code is minicnn/training/predict.py."""
import sys

from minicnn.training.predict import main

if __name__ == "__main__":
    sys.exit(main())
