"""Errors a user can cause. The CLI prints these as one line and exits with code 2."""


class SlmError(Exception):
    """Base class for every error that names a user's mistake or a bad input file."""


class ModelFileError(SlmError):
    """A checkpoint file is missing, truncated or corrupt."""


class UnsupportedError(SlmError):
    """An architecture, quantization type or tokenizer this version cannot handle."""


class ContextLengthError(SlmError):
    """A prompt (plus requested tokens) does not fit the model's context window."""
