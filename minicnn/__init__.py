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
    weights.py   minicnn.load_weights / save_weights: PyTorch and safetensors weights in and out
    export.py    model.export_onnx(...) and python -m minicnn.export: a model as an ONNX file
    mixed_precision.py  set_global_policy("mixed_float16"), LossScaleOptimizer (Keras's API);
                 dtype_policy.py holds the policy and the casting it applies to the maths
    precision.py python -m minicnn.precision: one step in float64/32/16 and bfloat16, compared
    inspect.py   python -m minicnn.inspect: a trained net's filters, feature maps and saliency
    compare.py   python -m minicnn.compare: one step on several implementations, layer by layer
"""
from minicnn.implementation import use
from minicnn.errors import BackendError, CheckpointError, DataError, MinicnnError
from minicnn.nn import gradcheck, layers, losses, optim
from minicnn.nn.containers import Sequential
from minicnn.nn.model import load
from minicnn.weights import load_weights, save_weights

__version__ = "0.1.0"
__all__ = ["Sequential", "load", "load_weights", "save_weights", "gradcheck", "use", "layers",
           "losses", "optim", "MinicnnError", "DataError", "CheckpointError", "BackendError",
           "__version__"]
