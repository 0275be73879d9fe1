"""The errors minicnn raises on bad input: each carries one sentence a user can act on."""


class MinicnnError(Exception):
    """Base class of every error minicnn raises on purpose."""


class DataError(MinicnnError, ValueError):
    """A dataset path, archive or image that cannot be used."""


class CheckpointError(MinicnnError, ValueError):
    """A model or checkpoint file that is missing, truncated, corrupt or not minicnn's."""


class StateDictError(CheckpointError):
    """Weights (a {name: array} state dict, or a file of them) that do not fit a model:
    .missing, .unexpected and .mismatched list the keys (mismatched: (key, got, expected))."""

    def __init__(self, message, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = (list(missing), list(unexpected),
                                                          list(mismatched))


class BackendError(MinicnnError, RuntimeError):
    """A backend (CuPy, a GPU) that was asked for and is not available."""


class UsageError(MinicnnError, ValueError):
    """A setting or argument that cannot be used: an unknown model, a number out of range, an
    unreadable --augment or --image-size. A ValueError too, so `except ValueError` still works."""


class FolderInUseError(MinicnnError, RuntimeError):
    """An --out folder that another training run holds (its lock file names that process)."""
