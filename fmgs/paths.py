"""Where the shared research data lives.

The data (SMPL model, ZJU-MoCap, motion clips) is research-only and never ships
with the package. Everything that needs it reads it through :func:`data_root`:
the ``FMGS_DATA`` environment variable when set, else ``../shared/data``
relative to the current working directory (the project's default layout).
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_ROOT = Path("..") / "shared" / "data"


def data_root() -> Path:
    """Return the data root: ``$FMGS_DATA`` or ``./../shared/data``.

    The path is returned as given (it may not exist); callers check existence
    and raise :class:`fmgs.errors.FmgsInputError` naming the missing file.
    """
    env = os.environ.get("FMGS_DATA")
    return Path(env) if env else DEFAULT_DATA_ROOT


def smpl_neutral_path(root: Path | None = None) -> Path:
    """Path of the neutral SMPL model under the data root."""
    return (root or data_root()) / "body_models" / "smpl" / "SMPL_NEUTRAL.pkl"


def zju_subject_path(subject: str = "377", root: Path | None = None) -> Path:
    """Path of a HumanNeRF-format ZJU-MoCap subject folder under the data root."""
    return (root or data_root()) / "zju_mocap" / subject
