"""Checkpoints: atomic save, resume, and the run-folder layout.

A run folder holds::

    RUN_DIR/config.yaml            resolved configuration (what --resume reuses)
    RUN_DIR/checkpoints/last.pt    latest checkpoint (model, optimiser, iteration, RNG)
    RUN_DIR/tb/                    TensorBoard logs
    RUN_DIR/progress.jsonl         one JSON line per held-out evaluation during training
    RUN_DIR/eval/                  fmgs-eval output (metrics.json, images/, video.mp4)

Checkpoints are written with :func:`fmgs.atomic.atomic_path`, so an interrupted
save never corrupts ``last.pt``.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from fmgs.atomic import atomic_path
from fmgs.errors import FmgsInputError

CHECKPOINT_VERSION = 1


def checkpoint_path(run_dir: Path) -> Path:
    """``RUN_DIR/checkpoints/last.pt``."""
    return Path(run_dir) / "checkpoints" / "last.pt"


def model_info(model: torch.nn.Module) -> dict:
    """What is saved with the weights to rebuild the model: its
    :meth:`~fmgs.trainer.models.base.AvatarModel.describe`, the surfel count ``num_surfels``
    and the recorded densification steps ``densify`` (per step ``{"split": [face ids],
    "remove": [face ids]}``, replayed by :func:`fmgs.trainer.models.densify.replay_on_model`
    before loading)."""
    info = dict(model.describe())
    info["num_surfels"] = int(model.num_surfels)
    info["densify"] = [{"split": np.asarray(ids, np.int64).tolist(), "remove": np.asarray(rem, np.int64).tolist()}
                       for ids, rem in getattr(model, "densify_steps", [])]
    return info


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    iteration: int, elapsed_s: float, extra: dict | None = None) -> Path:
    """Atomically write the training state after ``iteration`` completed iterations.

    Args:
        run_dir: run folder.
        model: the avatar (:class:`fmgs.trainer.models.base.AvatarModel`); its
            :meth:`~fmgs.trainer.models.base.AvatarModel.describe` is saved with the weights.
        optimizer: its optimiser (None for inference-only checkpoints).
        iteration: number of completed iterations.
        elapsed_s: training wall time so far, seconds (excluding evaluation).
        extra: further training state saved under ``state['extra']`` (tensors, numbers,
            strings, lists and dicts of them), e.g. the densification statistics.

    Returns:
        The checkpoint path.
    """
    state = {
        "version": CHECKPOINT_VERSION,
        "iteration": int(iteration),
        "elapsed_s": float(elapsed_s),
        "model": model.state_dict(),
        "model_info": model_info(model),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_tensors(np.random.get_state()),
            "python": random.getstate(),
        },
    }
    if extra:
        state["extra"] = extra
    path = checkpoint_path(run_dir)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def _numpy_state_to_tensors(st: tuple) -> tuple:
    """NumPy's legacy RNG state with its key array as a tensor (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = st
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def load_checkpoint(run_dir: Path) -> dict:
    """Read ``RUN_DIR/checkpoints/last.pt``.

    Raises:
        FmgsInputError: missing, unreadable or of another checkpoint version (names the file).
    """
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise FmgsInputError("no checkpoint here: train first (fmgs-train) or check the run folder", path)
    try:
        # weights_only: a checkpoint is data, never code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FmgsInputError(f"checkpoint is unreadable or corrupt ({exc.__class__.__name__}: {exc})", path) from exc
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise FmgsInputError(
            f"checkpoint version {state.get('version') if isinstance(state, dict) else '?'} "
            f"is not the supported version {CHECKPOINT_VERSION}", path)
    return state


def restore_rng(state: dict) -> None:
    """Restore the torch / NumPy / Python RNG states saved by :func:`save_checkpoint`."""
    rng = state.get("rng") or {}
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "numpy" in rng:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "python" in rng:
        random.setstate(rng["python"])
