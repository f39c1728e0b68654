"""User-facing errors: one line that names the bad thing, no traceback in the CLI."""


class ArexportError(Exception):
    """Base class for errors caused by bad input or a bad file, shown to users as one line."""


class CheckpointError(ArexportError):
    """A checkpoint file is missing, unreadable, or does not match the model."""


class ManifestError(ArexportError):
    """An engine directory is incomplete, corrupt, or from an incompatible version."""


class BackendUnavailable(ArexportError):
    """A requested backend (TensorRT, CUDA) is not installed or has no device here."""
