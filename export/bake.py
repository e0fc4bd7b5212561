"""Load a training run and bake its pose-independent parts into per-surfel constants.

The trained avatar is rebuilt by :func:`fmgs.trainer.engine.run.load_run`, as ``fmgs-eval``
does. Each model kind's ``bake`` (:mod:`fmgs.export.adapters`) evaluates everything that does not depend on the pose or the view at
the fixed canonical centres (paper Sec. 4.1.2: the surfels never move in canonical space
before the residual, so the hash-grid lookups are constants):

* full model: ``f_g``, ``f_c`` (hash grids), ``F_s(f_s)`` semantic logits (eq. 8),
  ``sigmoid(opacity)``, skinning weights ``W(mu)`` at the canonical centres (eq. 9; the
  error of this choice against ``W(mu')`` is measured by :mod:`fmgs.export.checks`);
* foundation model: the static normal displacement and scale deltas applied
  (``mu + n d``, ``s exp(delta_s)``), ``f_c``, SMPL skinning weights, opacities.

With ``fold=True`` (the default) the ``geometry_features`` / ``appearance_features`` channels
hold the per-surfel part of the first layer of the MLP that consumes them, ``W_1[:, :F] f``
(:func:`fmgs.export.modules.fold_first_layer`; ``(S, H)`` with ``H`` the hidden width), so the
per-frame graphs skip that product (``docs/bundle.md``, "Folded first layers"); with
``fold=False`` they hold the raw features ``f_g``, ``f_c``.

Both also get a neutral ``colors`` channel: the colour seen head-on (``d_hat = -n``) in the
canonical pose (bone transforms = identity; full model: pose code and geometry residual of
the canonical pose), used by the ``.ply`` and as a fallback colour.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fmgs.body_model import axis_angle_to_matrix, world_from_body
from fmgs.bundle import make_body_model
from fmgs.trainer.engine.run import LoadedRun


@dataclass
class Baked:
    """Per-surfel constants plus the canonical-pose geometry for the ``.ply``.

    Attributes:
        surfels: channel name -> float32 array (``fmgs.bundle.CHANNELS``).
        body_model: the manifest's ``body_model`` entry.
        ply: ``centers (S,3)``, ``rotations (S,3,3)``, ``scales (S,2)``, ``opacities (S,)``,
            ``colors (S,3)`` of the avatar in its canonical pose (full model: after the
            geometry residual of that pose).
        torch_inputs: tensors the exporters and checks reuse (raw features ``f_g``/``f_c``,
            baked weights, ...).
        folded: the feature channels hold folded first layers (module docstring).
    """

    surfels: dict[str, np.ndarray]
    body_model: dict
    ply: dict[str, np.ndarray]
    torch_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    folded: bool = False


def training_poses(run: LoadedRun, count: int) -> list[dict]:
    """``count`` evenly spaced frames of the training split (``count <= 0``: all of them).

    Returns:
        list of dicts: ``frame_id`` (index into the training split, selects the learnt pose
        correction), ``name``, ``poses (72,)`` axis-angle radians, ``world_from_body (4,4)``
        float64, ``camera_center (3,)`` world metres.
    """
    seq = run.seq
    n = len(seq)
    idx = range(n) if count <= 0 or count >= n else np.unique(np.linspace(0, n - 1, count).round().astype(int))
    out = []
    for i in idx:
        name = seq.names[int(i)]
        info = seq._info[name]  # metadata only: indexing the sequence would decode every image
        out.append({"frame_id": int(i), "name": name, "poses": np.asarray(info["poses"], np.float64),
                    "world_from_body": np.asarray(world_from_body(info["Rh"], info["Th"]), np.float64),
                    "camera_center": np.asarray(seq.camera(name).center, np.float64)})
    return out


def body_model_entry(run: LoadedRun) -> dict:
    """The manifest's ``body_model`` for this run (SMPL tree, rest and canonical joints, ``G_c``)."""
    s = run.setup.surfels
    return make_body_model(np.asarray(run.setup.smpl.parents), run.setup.rest_joints, s.joints,
                           run.setup.canonical_G, run.setup.betas, canonical_pose=s.canonical_pose)


def canonical_rot_mats(run: LoadedRun) -> torch.Tensor:
    """``(24, 3, 3)`` float32 local joint rotations of the canonical (star) pose."""
    rot = axis_angle_to_matrix(np.asarray(run.setup.surfels.canonical_pose, np.float64).reshape(24, 3))
    return torch.as_tensor(rot, dtype=torch.float32)


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))


@torch.no_grad()
def bake_full(run: LoadedRun, fold: bool) -> Baked:
    """Constants of the full model (module docstring)."""
    from fmgs.export.modules import fold_first_layer, geometry_foldable
    from fmgs.trainer.models.fields import normalize_canonical_joints

    m = run.model
    feats = m.canonical_features()
    f_g, f_c = feats[0], feats[1]
    f_s = feats[2] if m.semantic_field is not None else None
    W = m.skinning_weights(m.centers, training=False)                       # eq. 9 at mu (canonical)
    opac = torch.sigmoid(m.opacity_logit)
    J_hat = normalize_canonical_joints(torch.as_tensor(np.asarray(run.setup.surfels.joints), dtype=torch.float32))

    # Neutral colour: canonical pose (B = I), head-on view d_hat = -n'.
    z_p = m.pose_encoder(canonical_rot_mats(run), J_hat)
    from fmgs.export.modules import GeometryModule

    mu_b, R_b, s_b = m.base_surfels()            # template surfels (+ static offsets when trained with them)
    mu_c, R_c, s_c, z_g = GeometryModule(m.geometry_field, m.cfg.geometry_latent_dim,
                                    max_displacement=m.cfg.max_displacement)(f_g, z_p, mu_b, R_b, s_b)
    d_hat = -R_c[:, :, 2] if m.appearance_field.sh_degree >= 0 else None
    colors = m.appearance_field(f_c, z_g, z_p, d_hat)
    surfels = {"centers": _np(mu_b), "rotations": _np(R_b), "scales": _np(s_b),
               "opacities": _np(opac), "skin_weights": _np(W), "colors": _np(colors),
               "geometry_features": _np(f_g), "appearance_features": _np(f_c)}
    if fold:
        if geometry_foldable(m.geometry_field):
            surfels["geometry_features"] = _np(fold_first_layer(f_g, m.geometry_field.mlp[0],
                                                                slice(0, int(f_g.shape[1]))))
        surfels["appearance_features"] = _np(fold_first_layer(f_c, m.appearance_field.mlp[0],
                                                              slice(0, int(f_c.shape[1]))))
    if f_s is not None:
        surfels["semantic_logits"] = _np(m.semantic_field(f_s))
    ply = {"centers": _np(mu_c), "rotations": _np(R_c), "scales": _np(s_c), "opacities": _np(opac),
           "colors": _np(colors)}
    return Baked(surfels, body_model_entry(run), ply,
                 {"f_g": f_g, "f_c": f_c, "W": W, "J_hat": J_hat, "z_p_canonical": z_p},
                 folded=bool(fold))


@torch.no_grad()
def bake_foundation(run: LoadedRun, fold: bool) -> Baked:
    """Constants of the foundation model (module docstring)."""
    from fmgs.export.modules import fold_first_layer
    from fmgs.trainer.models.fields import sh_basis

    m = run.model
    n = m.frames[:, :, 2]
    mu = m.static_centers()                                                     # static eq. 4 (+ offsets)
    scales = torch.exp(m.log_scales0 + m.log_scale_delta)                      # static eq. 5
    opac = torch.sigmoid(m.opacity_logit)
    f_c = m.canonical_features()
    x = f_c
    if m.view_dependent:
        x = torch.cat([f_c, sh_basis(-n, m.sh_degree)], dim=-1)
    colors = torch.sigmoid(m.color_mlp(x))
    surfels = {"centers": _np(mu), "rotations": _np(m.frames), "scales": _np(scales), "opacities": _np(opac),
               "skin_weights": _np(m.skin_weights), "colors": _np(colors), "appearance_features": _np(f_c)}
    if fold:
        surfels["appearance_features"] = _np(fold_first_layer(f_c, m.color_mlp[0], slice(0, int(f_c.shape[1]))))
    ply = {"centers": surfels["centers"], "rotations": surfels["rotations"], "scales": surfels["scales"],
           "opacities": surfels["opacities"], "colors": surfels["colors"]}
    return Baked(surfels, body_model_entry(run), ply, {"f_c": f_c, "W": m.skin_weights, "mu": mu},
                 folded=bool(fold))
