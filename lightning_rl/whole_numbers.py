"""Whether a setting is a whole number at or above a minimum (NumPy integers count; ``True`` and ``2.0`` do not)."""

from __future__ import annotations

import numbers
from typing import Any


def is_whole_number(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an integer (any ``numbers.Integral`` but ``bool``) of at least ``minimum``."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= minimum


__all__ = ["is_whole_number"]
