"""Shared pytest fixtures: the real data root, skipping cleanly when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("FMGS_DATA")
    return Path(env) if env else (REPO_ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared real-data root (``$FMGS_DATA`` or ``<repo>/../shared/data``)."""
    root = _data_root()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set FMGS_DATA to its location)")
    return root


@pytest.fixture(scope="session")
def smpl_path(data_root: Path) -> Path:
    """The shared neutral SMPL pickle."""
    p = data_root / "body_models" / "smpl" / "SMPL_NEUTRAL.pkl"
    if not p.is_file():
        pytest.skip(f"SMPL model not found at {p}")
    return p


@pytest.fixture(scope="session")
def zju377(data_root: Path) -> Path:
    """The shared ZJU-MoCap subject 377 folder (HumanNeRF format)."""
    p = data_root / "zju_mocap" / "377"
    if not (p / "cameras.pkl").is_file():
        pytest.skip(f"ZJU-MoCap 377 not found at {p}")
    return p


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
