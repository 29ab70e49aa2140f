"""Errors a fine-tuning user can act on (one line each, printed by the CLI without a traceback)."""

from __future__ import annotations

from models.errors import BackbonesError


class DatasetError(BackbonesError):
    """The training or validation data cannot be used as given (too few classes, an empty class...)."""


class TrainingError(BackbonesError):
    """A training run cannot start or continue (bad options, a checkpoint that does not fit...)."""
