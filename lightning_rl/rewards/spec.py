"""Moved to :mod:`lightning_rl.hparams` (hyperparameter serialization); re-exported for existing imports."""

from lightning_rl.hparams import import_object, portable, resolve_callable

__all__ = ["import_object", "portable", "resolve_callable"]
