"""Checks of setting values, shared by every config dataclass (StepConfig, SpeculationConfig,
PairConfig, the trainers'): each raises SettingError naming the key. A leaf module."""

from __future__ import annotations

import math


class SettingError(ValueError):
    """A setting out of its range. `key` names it (dotted below a nested group, e.g.
    "keywords.policy"); `dreamr_jax.config` prefixes the path of the group it was read into."""

    def __init__(self, key: str, requirement: str, value):
        self.key, self.requirement, self.value = key, requirement, value
        super().__init__(f"{key} {requirement}, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_range(key: str, value, low=None, high=None, *, above=None, below=None, integer: bool = False,
                optional: bool = False) -> None:
    """`value` must be a finite number (an int when `integer`) with low <= value <= high,
    above < value and value < below (bounds given as None are not checked); None passes when
    `optional`. Raises SettingError naming `key`."""
    if value is None and optional:
        return
    if integer and not (isinstance(value, int) and not isinstance(value, bool)):
        raise SettingError(key, "must be an integer", value)
    if not _is_number(value) or not math.isfinite(value):
        raise SettingError(key, "must be a finite number", value)
    parts = []
    if low is not None or above is not None:
        parts.append(f">= {low}" if low is not None else f"> {above}")
    if high is not None or below is not None:
        parts.append(f"<= {high}" if high is not None else f"< {below}")
    ok = ((low is None or value >= low) and (high is None or value <= high) and (above is None or value > above)
          and (below is None or value < below))
    if not ok:
        if len(parts) == 2:
            lo = f"[{low}" if low is not None else f"({above}"
            hi = f"{high}]" if high is not None else f"{below})"
            raise SettingError(key, f"must be in {lo}, {hi}", value)
        raise SettingError(key, f"must be {parts[0]}", value)


def check_choice(key: str, value, choices) -> None:
    """`value` must be one of `choices` (raises SettingError naming `key`)."""
    if isinstance(value, bool) or value not in choices:
        names = [str(c) for c in choices]
        listed = f"{names[0]} or {names[1]}" if len(names) == 2 else "one of " + ", ".join(names)
        raise SettingError(key, f"must be {listed}", value)


def check_text(key: str, value, *, empty: bool = False, optional: bool = False) -> None:
    """`value` must be a string (non-empty unless `empty`; None passes when `optional`)."""
    if value is None and optional:
        return
    if not isinstance(value, str) or (not empty and not value):
        raise SettingError(key, "must be a non-empty string" if not empty else "must be a string", value)


def check_flag(key: str, value) -> None:
    """`value` must be True or False."""
    if not isinstance(value, bool):
        raise SettingError(key, "must be true or false", value)


