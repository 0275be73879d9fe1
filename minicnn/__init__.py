"""minicnn: a convolutional-neural-network engine written from scratch.

Every layer has a hand-written forward and backward pass (no autograd) on NumPy or CuPy arrays.

    import minicnn
    from minicnn.layers import Conv2D, MaxPool2D, Flatten, Dense, ReLU
    model = minicnn.Sequential([Conv2D(3, 32, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(32*15*15, 10)])
"""
from minicnn import layers, losses, optim
from minicnn.errors import BackendError, CheckpointError, DataError, MinicnnError
from minicnn.gradcheck import gradcheck
from minicnn.model import Sequential, load

__version__ = "0.1.0"
__all__ = ["Sequential", "load", "gradcheck", "layers", "losses", "optim",
           "MinicnnError", "DataError", "CheckpointError", "BackendError", "__version__"]
