"""Checks of arguments shared by every module (NumPy only, no Keras): one wording for every
error about an integer argument."""

from __future__ import annotations

import numpy as np


def is_int(value) -> bool:
    """An int (a NumPy integer too), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, low: int = 1, high: int | None = None,
              allow_none: bool = False, none: str = "", why: str = "",
              also: tuple = ()) -> int | None:
    """``value`` as an int in ``low..high`` (or one of ``also``), or None where
    ``allow_none`` (``none`` says what None means); otherwise a clear error naming ``name``,
    the valid values and ``why``."""
    if value is None and allow_none:
        return None
    if not is_int(value) or (value not in also and (
            value < low or (high is not None and value > high))):
        valid = f"an int >= {low}" if high is None else f"an int between {low} and {high}"
        valid += "".join(f", or {a}" for a in also)
        if allow_none:
            valid = f"None ({none}) or {valid}" if none else f"None or {valid}"
        raise ValueError(f"{name} must be {valid}{why}, got {value!r}")
    return int(value)
