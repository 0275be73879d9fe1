"""image_dataset_from_directory: Keras's rules for a folder of class folders, as arrays.

    x, y, class_names = image_dataset_from_directory("flowers/", image_size=(150, 150))
    x (N, 3, 150, 150) uint8, y (N,) int64, class_names ["daisy", "roses", ...]

As keras.utils.image_dataset_from_directory: the class folders directly under directory, in
sorted order, give the labels; every image below a class folder counts, in subfolders too;
files that are not images (by extension: jpeg, jpg, png, bmp, gif) are not read; a file with
such an extension that cannot be decoded, or is not a regular file (a dangling link, a link
loop, a fifo), is skipped with one warning. Images of every mode and bit depth become 8-bit
RGB as loading.decode_image says (16-bit keeps its high byte; alpha is dropped, as Keras's
load_img does). Names may hold any bytes the filesystem allows; class_names are the folder
names as they are, as Keras gives them (os.fsdecode'd: a byte that is not UTF-8 is a
surrogate escape; loading.printable shows one). validation_split with
subset ("training", "validation" or "both") and a seed splits the shuffled files, the last
validation_split of them for validation. Unlike Keras it returns arrays, not a tf.data
pipeline: batch them with model.fit(x, y, batch_size=...).
"""
import os
import warnings
from pathlib import Path

import numpy as np

from minicnn.datasets.loading import class_folders, decode_image, display_name, files_below
from minicnn.errors import DataError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif")


def _image_files(class_dir):
    """-> (paths, skipped): every image file below class_dir, in sorted order (subfolders
    included; hidden ones and links to folders not followed, as Keras's follow_links=False),
    and the entries with an image extension that are not regular files (dangling links, link
    loops, fifos), which are skipped. The walk is the training tool's (loading.files_below)."""
    files, unread = files_below(class_dir)
    paths = [os.path.join(class_dir, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return paths, [p for p in unread if p.lower().endswith(IMAGE_EXTENSIONS)]


def _listing(directory):
    """-> (paths, labels, class names, skipped paths) of every image below directory's class
    folders."""
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"{display_name(root)} is not a directory of class folders.")
    class_names, _ = class_folders(root)
    if not class_names:
        raise DataError(f"{display_name(root)} has no class folders; put images in "
                        f"{display_name(root)}/<class>/.")
    paths, labels, skipped = [], [], []
    for label, name in enumerate(class_names):
        files, unread = _image_files(os.path.join(root, name))
        paths += files
        labels += [label] * len(files)
        skipped += unread
    if not paths:
        raise DataError(f"{display_name(root)}'s class folders hold no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}).")
    return paths, np.array(labels, dtype=np.int64), class_names, skipped


def _subset_indices(n, validation_split, subset, seed):
    """{"training": indices, "validation": indices} of n shuffled files, or all of them."""
    if validation_split is None:
        if subset is not None:
            raise ValueError("subset needs validation_split: give both, or neither.")
        return {"all": np.arange(n)}
    if not 0 < validation_split < 1:
        raise ValueError(f"validation_split must be between 0 and 1, got {validation_split}.")
    if subset not in ("training", "validation", "both") or seed is None:
        raise ValueError("validation_split needs subset='training', 'validation' or 'both', "
                         "and a seed (the same one for both subsets, so they do not overlap).")
    order = np.random.default_rng(seed).permutation(n)
    cut = n - int(validation_split * n)
    return {"training": np.sort(order[:cut]), "validation": np.sort(order[cut:])}


def _decode(paths, labels, image_size, directory, skipped=()):
    """uint8 (N, 3, H, W) and labels of the files that decode; one warning for the rest and for
    the skipped entries of the listing."""
    images = np.empty((len(paths), 3) + tuple(image_size), dtype=np.uint8)
    kept, failed = [], list(skipped)
    for i, path in enumerate(paths):
        try:
            images[len(kept)] = decode_image(path, image_size)
            kept.append(i)
        except DataError:
            failed.append(path)
    if failed:
        warnings.warn(f"Skipped {len(failed)} unreadable image files under "
                      f"{display_name(directory)} (the first is {display_name(failed[0])}).")
    return images[:len(kept)], labels[kept]


def image_dataset_from_directory(directory, image_size=(256, 256), validation_split=None,
                                 subset=None, seed=None):
    """-> (x, y, class_names); with subset="both", ((x_train, y_train), (x_val, y_val),
    class_names). image_size (H, W): every image is converted to RGB and resized to it
    (bilinear), as Keras does."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    paths, labels, class_names, skipped = _listing(directory)
    parts = _subset_indices(len(paths), validation_split, subset, seed)
    wanted = [name for name in parts if subset in (None, "both", name)]
    decoded = {name: _decode([paths[i] for i in parts[name]], labels[parts[name]],
                             (height, width), directory, skipped if name == wanted[0] else ())
               for name in wanted}
    if subset == "both":
        return decoded["training"], decoded["validation"], class_names
    x, y = decoded[subset or "all"]
    return x, y, class_names
