"""How numbers read in printed lines: ``1 thread``, ``4 threads``."""

from __future__ import annotations

from typing import Optional


def counted(count: int, noun: str, plural: Optional[str] = None) -> str:
    """``count`` and the noun in the number it needs: ``counted(1, "thread")`` is ``1 thread``."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
