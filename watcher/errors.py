"""Exception types of xray-watcher.

Per-file problems (``DecodeError``) are recorded in the file's row and the file goes to
``failed/``; systemic ones (``ConfigError``, ``ModelStoreError``, ``ReportError``) stop or
pause the service.
"""

from __future__ import annotations


class WatcherError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(WatcherError):
    """The configuration file is missing, malformed or names something that does not exist."""


class DecodeError(WatcherError):
    """A file could not be turned into a usable greyscale image."""


class ModelStoreError(WatcherError):
    """The model store has no usable version, or a version is incomplete."""


class ReportError(WatcherError):
    """results.csv cannot be written or is not a file this program wrote."""


class TrainingError(WatcherError):
    """The training data or options cannot produce a model."""


class EvaluationError(WatcherError):
    """A labelled folder cannot be evaluated (no NORMAL/PNEUMONIA subfolders, no readable image)."""
