"""Argument checks shared by the callbacks, so every one words the same mistake the same way.

Each check names the argument, what was received and what is accepted, with a hint for the
predictable mistake (a percentage for a fraction, bytes for bits).

Example::

    >>> percent_hint(90)
    ' HINT: a fraction, not a percentage (0.9, not 90).'
    >>> check_step("start_step", -1)
    Traceback (most recent call last):
    ...
    ValueError: start_step must be a non-negative integer (an optimizer step), got -1.
    >>> check_range("alpha", 50, 0.0, 1.0)
    Traceback (most recent call last):
    ...
    ValueError: alpha must be a number in [0, 1], got 50. HINT: a fraction, not a percentage (0.5, not 50).
    >>> check_choice("scope", "model", ("global", "layer"))
    Traceback (most recent call last):
    ...
    ValueError: scope must be one of ['global', 'layer'], got 'model'.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def is_number(value: Any, low: float, high: float, low_open: bool = False) -> bool:
    """Whether ``value`` is a real number (not a bool, not NaN) in ``[low, high]`` (``(low, high]``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return False
    return (low < value if low_open else low <= value) and value <= high


def percent_hint(value: Any) -> str:
    """The hint for the predictable mistake of writing a fraction as a percentage (``90`` for ``0.9``)."""
    # From 5 up: 1.5 or 2 is more likely a slip past the bound than a percentage.
    if not is_number(value, 5.0, 100.0):
        return ""
    return f" HINT: a fraction, not a percentage ({value / 100:g}, not {value:g})."


def check_range(
    argument: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """A real number in the interval from ``low`` to ``high`` (open ends as flagged), as a float.

    A value in (1, 100] given for an interval within [0, 1] gets the percentage hint.
    """
    inside = is_number(value, low, high, low_open=low_open) and not (high_open and value == high)
    if not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        if high <= 1.0:
            hint = percent_hint(value) or hint
        raise ValueError(f"{argument} must be a number in {interval}, got {value!r}.{hint}")
    return float(value)


def check_int(argument: str, value: Any, minimum: int = 0) -> int:
    """An integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{argument} must be an integer >= {minimum}, got {value!r}.")
    return value


def check_step(argument: str, value: Any, *, optional: bool = False) -> int | None:
    """A non-negative integer optimizer step (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        accepted = "a non-negative integer (an optimizer step)" + (" or None" if optional else "")
        raise ValueError(f"{argument} must be {accepted}, got {value!r}.")
    return value


def check_choice(argument: str, value: T, choices: Iterable[Any], hint: str = "") -> T:
    """One of ``choices``, of the same type (``8.0`` is not the choice ``8``)."""
    choices = list(choices)
    if not any(type(value) is type(c) and value == c for c in choices):
        raise ValueError(f"{argument} must be one of {choices}, got {value!r}.{hint}")
    return value
