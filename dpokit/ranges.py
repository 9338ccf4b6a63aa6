"""Allowed ranges of numeric settings (config keys, loss parameters): plain Python, no torch, so the
command line can read the config schema before torch is imported."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Range:
    """Allowed finite values ``low (<|<=) value (<|<=) high``; either end may be open-ended (None)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_inclusive: bool = True
    high_inclusive: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):  # NaN and infinities are in no range: a setting is a finite number
            return False
        above = self.low is None or (value >= self.low if self.low_inclusive else value > self.low)
        below = self.high is None or (value <= self.high if self.high_inclusive else value < self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>=' if self.low_inclusive else '>'} {self.low:g}"
        left, right = "[" if self.low_inclusive else "(", "]" if self.high_inclusive else ")"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
ABOVE_0 = Range(0, low_inclusive=False)
UNIT = Range(0, 1)  # [0, 1)
