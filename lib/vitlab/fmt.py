"""Numbers as a person reads them, one definition for the report, the docs and the end-of-run summary:
top-1 as `91.9% [88.2, 94.8]`, differences in points with their interval, times with their unit and
digits that mean something, sizes in MB."""
from __future__ import annotations

import math


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(x, lo=None, hi=None) -> str:
    """A share as a percentage, with its interval when given: `91.9% [88.2, 94.8]`."""
    if _missing(x):
        return "–"
    text = f"{100 * x:.1f}%"
    return text if _missing(lo) or _missing(hi) else f"{text} [{100 * lo:.1f}, {100 * hi:.1f}]"


def pt(d, lo=None, hi=None) -> str:
    """A difference of shares in percentage points, signed, with its interval: `-0.2 pt [-1.1, +0.6]`."""
    if _missing(d):
        return "–"
    text = f"{100 * d:+.1f} pt"
    return text if _missing(lo) or _missing(hi) else f"{text} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def ms(x) -> str:
    """A time in milliseconds with three significant digits (no decimals from 100 ms on)."""
    if _missing(x):
        return "–"
    digits = 0 if x >= 100 else 1 if x >= 10 else 2 if x >= 1 else 3
    return f"{x:,.{digits}f} ms"


def mb(x) -> str:
    """A size in MB: one decimal, or two significant digits below 1 MB (tiny models stay visible)."""
    if _missing(x):
        return "–"
    return f"{x:,.1f} MB" if x >= 1 else f"{x:.2g} MB"


def rate(x, unit: str = "img/s") -> str:
    return "–" if _missing(x) else f"{x:,.0f} {unit}"


def ratio(x) -> str:
    return "–" if _missing(x) else f"{x:.2f}x"


def formats(per_layer: list[str]) -> str:
    """Formats per layer in a few words: ['fp8', 'fp8', '16bit'] -> 'fp8 x2, 16bit x1'."""
    return ", ".join(f"{f} x{per_layer.count(f)}" for f in dict.fromkeys(per_layer))
