"""Error types shared by every part of fmgs-avatar."""
from __future__ import annotations

import os


class FmgsInputError(ValueError):
    """Bad user input: a missing, corrupt or inconsistent file or setting.

    The message always names the offending file (when there is one) and what is
    wrong with it, so that the CLI can print it as-is without a traceback.

    Args:
        message: what is wrong.
        path: the file or folder concerned, or None.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        full = message if self.path is None else f"{self.path}: {message}"
        super().__init__(full)
