"""Re-export of :class:`m3vit.hw.errors.M3VitError` for host code."""

from m3vit.hw.errors import M3VitError

__all__ = ["M3VitError"]
