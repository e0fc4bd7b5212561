"""What the exporter does differently for each model kind, in one table.

Each :class:`ExportAdapter` holds the functions of one ``model.kind``: baking the
pose-independent constants (:mod:`fmgs.export.bake`), exporting the per-frame graphs to ONNX
(:mod:`fmgs.export.onnx_export`), comparing ONNX Runtime with torch on one pose and measuring
the skinning bake (:mod:`fmgs.export.checks`). :func:`fmgs.export.api.export_run` looks the
adapter up by the model's :attr:`~fmgs.trainer.models.base.AvatarModel.kind` and never
branches on it; a new model kind adds one row here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fmgs.errors import FmgsInputError
from fmgs.export.bake import bake_foundation, bake_full
from fmgs.export.checks import foundation_parity_frame, full_parity_frame, skinning_bake_check
from fmgs.export.onnx_export import export_foundation_models, export_full_models


def _smpl_skinning(run, baked, frames: int = 32) -> dict:
    """The skinning check of models that skin with SMPL's weights: the bake is exact."""
    return {"applicable": False, "frames": 0, "exact": True,
            "note": "skinning weights are SMPL's (no skinning field): the bake is exact"}


@dataclass(frozen=True)
class ExportAdapter:
    """The export functions of one model kind.

    Attributes:
        bake: ``(run, fold) -> Baked``.
        export_models: ``(run, baked, out_dir, skinning, layout) -> {name: manifest entry}``.
        parity_frame: ``(run, baked, sessions, entries, pose, upd, e2e) -> None`` (one pose of
            :func:`fmgs.export.checks.parity_check`).
        skinning_check: ``(run, baked, frames) -> dict`` (the skinning-bake report).
    """

    bake: Callable
    export_models: Callable
    parity_frame: Callable
    skinning_check: Callable


#: ``model.kind`` -> its adapter.
ADAPTERS: dict[str, ExportAdapter] = {
    "foundation": ExportAdapter(bake_foundation, export_foundation_models, foundation_parity_frame, _smpl_skinning),
    "full": ExportAdapter(bake_full, export_full_models, full_parity_frame, skinning_bake_check),
}


def adapter_for(model) -> ExportAdapter:
    """The adapter of ``model.kind``.

    Raises:
        FmgsInputError: a model kind that cannot be exported this way (e.g. ``preview``, whose
            bundle ``fmgs-train --preview`` writes).
    """
    try:
        return ADAPTERS[model.kind]
    except KeyError:
        raise FmgsInputError(f"a {model.kind!r} avatar cannot be exported with fmgs-export "
                             f"(exportable: {', '.join(ADAPTERS)})") from None
