"""The errors a user can cause: the CLI prints each on one line and exits 2 (never a traceback)."""
from __future__ import annotations


class DataError(ValueError):
    """Bad corpus or shard input."""


class ModelError(ValueError):
    """A missing or invalid model directory, preset or model file."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted, resumed here, or written."""


class LockError(ValueError):
    """The output directory belongs to a run that is still going."""
