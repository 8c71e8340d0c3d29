"""Exceptions that say what went wrong and what to do about it."""


class PneumoscanError(Exception):
    """Base class for every error this package raises on purpose."""


class DataError(PneumoscanError, ValueError):
    """A data folder is missing, empty, or laid out in a way we cannot use."""


class ImageError(PneumoscanError, ValueError):
    """One image cannot be read or decoded."""


class CheckpointError(PneumoscanError, ValueError):
    """A checkpoint file is missing, unreadable, or not a pneumoscan checkpoint."""


class OutOfScopeError(ImageError):
    """The input decodes but is not a frontal chest radiograph, so no prediction is made."""


class InferenceError(PneumoscanError, RuntimeError):
    """No answer for one input for a reason that is not the input's: the model gave a non-finite output, or
    preparing it failed unexpectedly (out of memory, a bug). The input may be sent again; report it if it stays."""


class OutputPathError(PneumoscanError, ValueError):
    """An output path that cannot be written, or that would replace a file that must stay."""


class TrainingError(PneumoscanError, FloatingPointError):
    """Training diverged or left a model that cannot be used (a loss that is not finite, collapsed features)."""
