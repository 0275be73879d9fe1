"""minicnn: a convolutional-neural-network engine written from scratch.

Every layer has a hand-written forward and backward pass (no autograd) on NumPy or CuPy arrays.

    import minicnn
    from minicnn.nn import Conv2D, MaxPool2D, Flatten, Dense, ReLU
    model = minicnn.Sequential([Conv2D(3, 32, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(32*15*15, 10)])

The rooms of the house:
    implementation.py  minicnn.use("reference" | "fast" | "raw"): which maths the layers call
    reference/   the maths, readable: forward/backward pairs in plain NCHW array code
    ops/         the maths, fast: the same pairs with workers, chunks and channels-last memory
    cuda/        the bridge to the hand-written CUDA kernels in the top-level kernels/
    nn/          the model API: layers, Sequential, losses, optimisers, gradcheck, save/load
    parallel/    the runtime: worker threads, worker processes, the data-parallel step
    datasets/    CIFAR-10 and image folders: Keras's load_data, image_dataset_from_directory
    training/    the training tool behind python -m minicnn.train / evaluate / predict
    bench/       python -m minicnn.bench: timings against PyTorch and the kernel ladder
"""
from minicnn.implementation import use
from minicnn.errors import BackendError, CheckpointError, DataError, MinicnnError
from minicnn.nn import gradcheck, layers, losses, optim
from minicnn.nn.containers import Sequential
from minicnn.nn.model import load

__version__ = "0.1.0"
__all__ = ["Sequential", "load", "gradcheck", "use", "layers", "losses", "optim",
           "MinicnnError", "DataError", "CheckpointError", "BackendError", "__version__"]
