"""The one error the app's logic raises for a visitor: the page shows its message, and keeps serving."""

from __future__ import annotations

from .text import hide_paths


class VisitorError(ValueError):
    """A request that cannot be served, said for the visitor (server paths cut to file names)."""

    def __init__(self, message: str):
        super().__init__(hide_paths(str(message)))
