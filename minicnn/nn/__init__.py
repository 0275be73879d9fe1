"""The model API: layers (thin classes over the maths), containers, losses, optimisers,
gradcheck, saving and loading, and the preset models.

    layers.py       Conv2D, MaxPool2D, AvgPool2D, GlobalAveragePooling2D, Dense, Flatten, ReLU,
                    Softmax, Dropout, BatchNorm2D, BatchNorm1D: each owns params, grads and its
                    cache
    containers.py   Sequential, Residual, walk
    losses.py       SoftmaxCrossEntropy
    optim.py        SGD, Adam, AdamW and the learning-rate schedules
    gradcheck.py    gradcheck: every backward against centred differences in float64
    model.py        layer_config / layer_from_config, save_model, load
    serialization.py  the file format: a JSON header and arrays in one .npz, written atomically
    zoo.py          the preset models (keras-tutorial, resnet-small, keras-dropout, resnet18)
    state_dicts.py  state_dict / load_state_dict under PyTorch's names
    transfer.py     freeze, unfreeze, replace_head: transfer learning and fine-tuning
"""
from minicnn.nn.layers import (AvgPool2D, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout,
                               Flatten, GlobalAveragePooling2D, Layer, MaxPool2D, ReLU, Softmax,
                               walk)
from minicnn.nn.containers import Container, Residual, Sequential
from minicnn.nn.model import layer_config, layer_from_config, load, model_from_archive, save_model
from minicnn.nn.losses import SoftmaxCrossEntropy
from minicnn.nn.gradcheck import gradcheck
from minicnn.nn.transfer import freeze, replace_head, unfreeze

__all__ = ["AvgPool2D", "BatchNorm1D", "BatchNorm2D", "Conv2D", "Dense", "Dropout", "Flatten",
           "GlobalAveragePooling2D", "Layer", "MaxPool2D", "ReLU", "Softmax", "Container",
           "Residual", "Sequential", "walk",
           "layer_config", "layer_from_config", "load", "model_from_archive", "save_model",
           "SoftmaxCrossEntropy", "gradcheck", "freeze", "unfreeze", "replace_head"]
