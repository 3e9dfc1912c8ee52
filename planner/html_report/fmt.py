"""Number formatting and axis ticks shared by the charts and the page."""

from __future__ import annotations

import math
from html import escape

GIB = 2**30


def esc(text) -> str:
    """Text for HTML element content or a quoted attribute."""
    return escape(str(text), quote=True)


def seconds(s: float | None) -> str:
    if s is None:
        return "-"
    a = abs(s)
    if a >= 1:
        return f"{s:.3g} s" if a < 100 else f"{s:,.0f} s"
    if a >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    if a == 0:
        return "0"
    return f"{s * 1e6:.3g} µs"


def size(b: float | None) -> str:
    if b is None:
        return "-"
    if b == 0:
        return "0"
    if abs(b) >= GIB / 10:
        return f"{b / GIB:.2f} GiB"
    return f"{b / 2**20:.1f} MiB"


def pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.1%}" if signed else f"{x:.1%}"


def number(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def ticks(top: float, n: int = 6) -> list[float]:
    """Round tick values from 0 to about `top`: steps of 1, 2, 2.5 or 5 times a power of ten."""
    if top <= 0:
        return [0.0]
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(k * mag for k in (1, 2, 2.5, 5, 10) if k * mag >= raw)
    return [i * step for i in range(int(top / step + 1e-9) + 1)]


def size_ticks(top: float, n: int = 5) -> list[float]:
    """Round byte ticks: steps of 1, 2, 2.5 or 5 times a power of ten in GiB (MiB below 0.1 GiB)."""
    unit = GIB if top >= GIB / 10 else 2**20
    return [t * unit for t in ticks(top / unit, n)]


def c(x: float) -> str:
    """A coordinate, one decimal, no trailing zeros."""
    return f"{x:.1f}".rstrip("0").rstrip(".")
