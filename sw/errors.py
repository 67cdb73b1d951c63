"""Re-export of :class:`m3vit.hw.errors.M3VitError` for host code, and the one helper
that error messages about a user's value share."""

from typing import Any

from m3vit.hw.errors import M3VitError

__all__ = ["M3VitError", "short_repr"]


def short_repr(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters (``...`` at the end) for a one-line
    message about a value read from a damaged file."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
