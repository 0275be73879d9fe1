"""Data: datasets.py reads CIFAR-10 and image folders (download, checks, cache), splits,
normalises and augments them, and iterates over batches."""
