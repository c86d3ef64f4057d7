"""Argument checks shared by the callbacks, so every one words the same mistake the same way.

Example::

    >>> percent_hint(90)
    ' HINT: a fraction, not a percentage (0.9, not 90).'
    >>> check_step("start_step", -1)
    Traceback (most recent call last):
    ...
    ValueError: start_step must be a non-negative integer (an optimizer step), got -1.
"""

from __future__ import annotations

import math
from typing import Any


def is_number(value: Any, low: float, high: float, low_open: bool = False) -> bool:
    """Whether ``value`` is a real number (not a bool, not NaN) in ``[low, high]`` (``(low, high]``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return False
    return (low < value if low_open else low <= value) and value <= high


def percent_hint(value: Any) -> str:
    """The hint for the predictable mistake of writing a fraction as a percentage (``90`` for ``0.9``)."""
    if not is_number(value, 1.0, 100.0, low_open=True):
        return ""
    return f" HINT: a fraction, not a percentage ({value / 100:g}, not {value:g})."


def check_step(argument: str, value: Any, *, optional: bool = False) -> int | None:
    """A non-negative integer optimizer step (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        accepted = "a non-negative integer (an optimizer step)" + (" or None" if optional else "")
        raise ValueError(f"{argument} must be {accepted}, got {value!r}.")
    return value
