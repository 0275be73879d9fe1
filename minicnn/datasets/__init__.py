"""Data: CIFAR-10 and image folders as uint8 NCHW arrays and integer labels.

    cifar10.load_data()                         Keras's CIFAR-10 loader, NCHW
    image_dataset_from_directory(directory)     Keras's folder rules, as arrays (x, y, names)
    loading.py    downloads (md5, retries), CIFAR-10 parsing without pickle, image folders,
                  the decoded-array cache, stratified splits, normalisation, crop/flip/cutout,
                  BatchIterator: what python -m minicnn.train reads its data with
"""
from minicnn.datasets import cifar10
from minicnn.datasets.folders import image_dataset_from_directory

__all__ = ["cifar10", "image_dataset_from_directory"]
