"""The full FMGS-Avatar model (paper Sec. 4.1-4.3, eq. 2-12) assembled from the fields of
:mod:`fmgs.trainer.models.fields`.

This module is additive: the foundation model (:class:`fmgs.trainer.models.foundation.SurfelAvatar`)
and its training path (:mod:`fmgs.trainer.engine.train`) are untouched. Per frame,
:meth:`FMGSAvatar.forward` computes

1. ``Z_p = E(R_1..R_23, J_hat)`` (:class:`~fmgs.trainer.models.fields.HierarchicalPoseEncoder`,
   16-d; in training the rotations get :func:`~fmgs.trainer.models.fields.add_pose_noise`);
2. ``f_g, f_c, f_s`` (32-d each) from three hash grids (16 levels x 2 features) at the
   *fixed* canonical surfel centres ``mu`` (eq. 2). The three grids have the same
   configuration and the same input points, so the corner indices / trilinear weights
   are computed ONCE (:meth:`HashGrid.precompute`) and shared; by default the three
   tables are also gathered in one fused ``embedding_bag`` (``fused_grid_gather``);
3. geometry residual (eq. 3-6): ``(delta_d, delta_s, delta_r, z_g) = F_g(f_g, Z_p)``,
   ``mu' = mu + n delta_d``, ``s' = s exp(delta_s)``, ``R' = R exp([delta_r]_x)``;
4. skinning weights ``W = softmax(F_w(H(x)))`` (eq. 9) with ``x = mu'`` (the paper,
   ``skinning_query="corrected"``) or, by default, ``x = mu`` (canonical centres:
   precomputed lookup, a random subset of rows recomputed per iteration; see
   :class:`FullModelConfig` and :meth:`FMGSAvatar.skinning_weights`), or the SMPL
   weights carried to the surfels when the skinning field is off;
5. forward LBS (eq. 10-12, :func:`~fmgs.trainer.models.fields.blend_lbs`):
   ``T = sum_b w_b B_b``, ``mu_o = T mu'``, ``R_o = T_{1:3,1:3} R'`` (re-orthonormalised);
6. colour (eq. 7): ``c = F_c(f_c, z_g, Z_p, gamma(d_hat))`` with
   ``d_hat = T_{1:3,1:3}^{-1} d`` (:func:`~fmgs.trainer.models.fields.canonicalize_view_dirs`),
   ``d`` the unit camera->surfel direction; ``d`` and ``T`` are detached there, as in the
   foundation model, so the colour loss never moves geometry through the view direction;
7. semantic logits (eq. 8): ``l_s = F_s(f_s)`` (28 Sapiens classes).

:func:`pose_frame` turns a frame's SMPL pose (+ learnable per-frame correction
``theta_p``, :class:`~fmgs.trainer.models.fields.PoseCorrection`) into the encoder rotations and
the world-from-canonical bone transforms ``B_b = world_from_body @ G_pose_b @
inv(G_canonical_b)`` in torch, so ``theta_p`` receives gradients.

The coordinated training strategy (Sec. 4.5) lives in :mod:`fmgs.trainer.losses.coordinated`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmgs.config import FullSettings, HashGridSettings
from fmgs.surfels import CanonicalSurfels
from fmgs.trainer.losses.coordinated import coordinated_backward
from fmgs.trainer.losses.objectives import full_loss_groups
from fmgs.trainer.models.base import AvatarModel, AvatarSetup, bone_transforms_torch, inverse_sigmoid
from fmgs.trainer.losses.terms import offset_laplacian_loss
from fmgs.trainer.models.densify import gather_rows
from fmgs.body_model import NUM_JOINTS
from fmgs.priors import NUM_SAPIENS_CLASSES
from fmgs.trainer.models.fields import (
    SMPL_PARENTS,
    AppearanceField,
    GeometryResidual,
    GeometryResidualField,
    HierarchicalPoseEncoder,
    PoseCorrection,
    SemanticField,
    SkinningField,
    add_pose_noise,
    apply_geometry_residual,
    blend_lbs,
    canonicalize_view_dirs,
    normalize_canonical_joints,
)
from fmgs.trainer.models.hashgrid import HashGrid, HashGridConfig, HashLookup, _WeightedGather, normalize_to_bbox

__all__ = ["FullModelConfig", "FullPosed", "FMGSAvatar", "pose_frame", "canonical_pose_joints"]


# =========================================================================== config
@dataclass
class FullModelConfig:
    """Hyper-parameters and switches of :class:`FMGSAvatar` (defaults = the paper's).

    Attributes:
        hash_grid: configuration shared by the geometry, appearance and semantic grids:
            16 levels x 2 features = 32-d (Sec. 4.1.2), 2^16 entries per level,
            resolutions 16 -> 2048 (3DGS-Avatar). One config for all three lets the
            three grids share one precomputed lookup.
        grid_padding: padding (fraction of the extent on each side) of the canonical
            bounding box that maps the centres to [0, 1]^3 (0.05, as the foundation).
        fused_grid_gather: gather the three tables with ONE ``embedding_bag`` over the
            concatenated ``(T, 6)`` table (same values as three separate gathers; see
            :meth:`FMGSAvatar.canonical_features`). False = three ``HashGrid.forward``.
        pose_dim: size of the pose code ``Z_p`` (16).
        geometry_latent_dim: size of ``z_g`` (16).
        geometry_width, geometry_hidden: geometry MLP (32 wide, 2 hidden layers;
            zero-initialised output = identity correction). The paper only says
            "lightweight"; it runs on all 55k surfels every frame in training and at
            playback (128 wide costs ~2.3x of 64: 0.10 vs 0.043 s forward+backward at 55k
            surfels on 2 CPU cores). 32 against 64 on three validation splits: no loss,
            inference -25 to -40% (``FullSettings``, docs/benchmarks.md, sixth round).
        appearance_width, appearance_hidden: colour MLP (one 64-wide hidden layer).
        sh_degree: degree of the SH encoding ``gamma`` of the canonical view direction (3;
            -1 = no view dependence).
        semantic_width, semantic_hidden: semantic decoder (one 64-wide hidden layer).
        num_classes: semantic classes (28 Sapiens classes).
        skinning_padding: bounding-box padding of the skinning field (0.1).
        skinning_grid: hash encoding of the skinning field (None = the field's default,
            8 levels x 2 features, 8 -> 256).
        skinning_query: where eq. 9 is evaluated. ``"corrected"`` = the paper's
            ``W(mu')`` at the corrected centres, hash grid encoded on the fly every
            iteration; ``"canonical"`` (default) = ``W(mu)`` at the fixed canonical centres,
            whose grid lookup is precomputed like the property volumes. ``delta_d`` is a
            few millimetres, so the two differ little (``fmgs-export`` measures it); the
            canonical query is ~0.3 s/iteration cheaper at 55k surfels, makes the baked
            weights of the export exact, and makes the coordinated strategy's "normal
            losses do not move positions" exact (no ``delta_d -> W -> R_o`` path).
        skinning_subset: with the canonical query, the fraction of surfels whose
            weights are recomputed (with gradient) per training forward; the others reuse
            their last computed weights (``skin_cache`` buffer, no gradient). 1.0 = all
            every iteration (exact eq. 9). Weights at the canonical centres do not depend
            on the pose, so a stale row is at most a few optimiser steps old; evaluation
            (``training=False``) always recomputes all rows. Cuts the 4x128 MLP's cost.
        detach_skinning_query: feed ``mu'.detach()`` to the skinning field. Off by
            default (the paper gives no stop-gradient there); on, the normal losses under
            the coordinated strategy cannot reach ``delta_d`` through
            ``delta_d -> mu' -> W -> T -> R_o`` (see :mod:`fmgs.trainer.losses.coordinated`).
        pose_input, pose_input_scale: what the pose encoder reads of each joint rotation
            (:class:`~fmgs.trainer.models.fields.HierarchicalPoseEncoder`: ``"relative"`` =
            ``(R - I) / pose_input_scale``, ``"rotation"`` = raw entries).
        pose_noise_std, pose_noise_p: training-time pose augmentation
            (:func:`add_pose_noise`: N(0, 0.1^2) on the rotation entries, half of the time).
        skinning_pose_noise_deg: training-time noise on the skinning pose itself (degrees,
            i.i.d. per axis-angle component of all 24 joints, every training iteration, before
            the frame's pose correction; :meth:`FMGSAvatar.pose`); 0 = off.
        init_opacity: initial surfel opacity (0.9, as the foundation).
        max_displacement: soft bound (metres) of the field's normal displacement,
            ``delta_d -> d_max tanh(delta_d / d_max)`` (0 = unbounded, the paper's eq. 4, and the
            default: a bound the field runs into saturates, ``tanh' ~ 0``, and the displacement
            can no longer follow the pose).
        static_offsets: learnable per-surfel, pose-free offsets under the geometry field:
            ``mu_b = mu + n * d`` and ``s_b = s * exp(delta_s)`` (the foundation model's
            static part of eq. 4-5; 3DGS-Avatar keeps per-Gaussian scales/positions as free
            parameters under its pose-dependent residual). The field's residual (eq. 4-6)
            then acts on ``(mu_b, R, s_b)``.
        free_offsets: learnable per-surfel canonical 3-vectors ``o`` (metres) added to
            ``mu_b`` (``model.offsets``: no bound; the Laplacian smoothness and the
            silhouette keep them honest).
        offset_lr: Adam rate of ``o``.

    The defaults of the settings a user can change come from :class:`fmgs.config.FullSettings`
    (the one place defaults live); :meth:`from_run_config` maps a run config onto this.
        use_geometry_field: eq. 3-6 on (off: ``mu' = mu``, ``R' = R``, ``s' = s``, ``z_g = 0``).
        use_skinning_field: eq. 9 on (off: SMPL weights carried to the surfels).
        skinning_prior: offset the skinning field's logits by ``log`` of the surfels' SMPL
            weights and zero-initialise its output layer, so skinning starts at SMPL's
            (:meth:`SkinningField.forward`); False = eq. 9 from a random field.
        use_semantic_field: eq. 8 on (off: ``semantic_logits`` is None).
        use_pose_correction: hold a :class:`PoseCorrection` over ``num_frames`` frames.
        num_frames: number of training frames (for the pose correction).
    """

    hash_grid: HashGridConfig = field(default_factory=lambda: HashGridConfig(**{
        k: getattr(HashGridSettings, k) for k in HashGridSettings.__dataclass_fields__}))
    grid_padding: float = 0.05
    fused_grid_gather: bool = True
    pose_dim: int = 16
    geometry_latent_dim: int = 16
    geometry_width: int = FullSettings.geometry_width
    geometry_hidden: int = FullSettings.geometry_hidden
    appearance_width: int = 64
    appearance_hidden: int = FullSettings.appearance_hidden
    sh_degree: int = 3
    semantic_width: int = 64
    semantic_hidden: int = 1
    num_classes: int = NUM_SAPIENS_CLASSES
    skinning_padding: float = 0.1
    skinning_grid: HashGridConfig | None = None
    skinning_query: str = FullSettings.skinning_query
    skinning_subset: float = FullSettings.skinning_subset
    detach_skinning_query: bool = False
    pose_input: str = FullSettings.pose_input
    pose_input_scale: float = FullSettings.pose_input_scale
    pose_noise_std: float = FullSettings.pose_noise_std
    pose_noise_p: float = FullSettings.pose_noise_p
    skinning_pose_noise_deg: float = FullSettings.skinning_pose_noise_deg
    init_opacity: float = 0.9
    static_offsets: bool = FullSettings.static_offsets
    max_displacement: float = FullSettings.max_displacement
    free_offsets: bool = False
    offset_lr: float = 5.0e-4
    use_geometry_field: bool = True
    use_skinning_field: bool = True
    skinning_prior: bool = True
    use_semantic_field: bool = True
    use_pose_correction: bool = True
    num_frames: int = 1
    pose_correction_every: int = 1

    @classmethod
    def from_run_config(cls, cfg, num_frames: int) -> "FullModelConfig":
        """The full model's configuration from a run config: ``model.full``, the shared
        ``model.hash_grid`` / ``model.view_dependent`` / ``model.sh_degree`` and
        ``surfels.init_opacity``; ``num_frames`` training frames get a pose correction."""
        m, f = cfg.model, cfg.model.full
        hg = m.hash_grid
        return cls(
            hash_grid=HashGridConfig(n_levels=int(hg.n_levels), n_features_per_level=int(hg.n_features_per_level),
                                     log2_hashmap_size=int(hg.log2_hashmap_size),
                                     base_resolution=int(hg.base_resolution), max_resolution=int(hg.max_resolution)),
            sh_degree=int(m.sh_degree) if bool(m.view_dependent) else -1,
            use_geometry_field=bool(f.geometry_field), use_skinning_field=bool(f.skinning_field),
            use_semantic_field=bool(f.semantic_field), geometry_width=int(f.geometry_width),
            geometry_hidden=int(f.geometry_hidden), appearance_hidden=int(f.appearance_hidden), skinning_query=str(f.skinning_query),
            skinning_subset=float(f.skinning_subset),
            use_pose_correction=bool(f.pose_correction) and num_frames > 0, num_frames=int(num_frames),
            pose_correction_every=int(f.pose_correction_every),
            static_offsets=bool(f.static_offsets), max_displacement=float(f.max_displacement),
            pose_input=str(f.pose_input), pose_input_scale=float(f.pose_input_scale),
            pose_noise_std=float(f.pose_noise_std), pose_noise_p=float(f.pose_noise_p),
            skinning_pose_noise_deg=float(f.skinning_pose_noise_deg),
            init_opacity=float(cfg.surfels.init_opacity),
            free_offsets=bool(m.offsets.enabled), offset_lr=float(m.offsets.lr))


# =========================================================================== outputs
class FullPosed(NamedTuple):
    """Output of :meth:`FMGSAvatar.forward`: world-space surfels plus what the losses need.

    Attributes:
        means: ``(S, 3)`` world centres ``mu_o`` (eq. 11), metres. Rasteriser input.
        rotations: ``(S, 3, 3)`` world frames ``R_o`` (eq. 12), columns ``[t_u, t_v, n]``,
            orthonormal. Rasteriser input.
        scales: ``(S, 2)`` ``s'`` (eq. 5), metres. Rasteriser input.
        opacities: ``(S,)`` in (0, 1). Rasteriser input.
        colors: ``(S, 3)`` in (0, 1) (eq. 7). Rasteriser input.
        semantic_logits: ``(S, 28)`` unnormalised logits (eq. 8), or None when the semantic
            field is off. Rasteriser ``extras`` input.
        skin_weights: ``(S, 24)`` the skinning weights used (field output or SMPL's), rows
            sum to 1.
        canonical_centers: ``(S, 3)`` corrected canonical centres ``mu'`` (eq. 4), metres
            (for :func:`~fmgs.trainer.losses.terms.isometry_loss`).
        canonical_rotations: ``(S, 3, 3)`` corrected canonical frames ``R'`` (eq. 6).
        semantic_features: ``(S, 32)`` ``f_s`` (for eq. 20), or None with the field off.
        residual: the :class:`~fmgs.trainer.models.fields.GeometryResidual` (``delta_d (S,1)``,
            ``delta_s (S,2)``, ``delta_r (S,3)``, ``z_g (S,16)``), or None with the field off.
        pose_code: ``(1, 16)`` ``Z_p``.
        transforms: ``(S, 4, 4)`` blended LBS transforms ``T`` (eq. 10).
    """

    means: torch.Tensor
    rotations: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor
    semantic_logits: torch.Tensor | None
    skin_weights: torch.Tensor
    canonical_centers: torch.Tensor
    canonical_rotations: torch.Tensor
    semantic_features: torch.Tensor | None
    residual: GeometryResidual | None
    pose_code: torch.Tensor
    transforms: torch.Tensor

    def render_inputs(self) -> dict[str, torch.Tensor]:
        """The rasteriser-input tensors by name (``means, rotations, scales, opacities,
        colors`` and ``extras`` = semantic logits when present), as
        :func:`fmgs.trainer.losses.coordinated.coordinated_backward` expects them."""
        d = {"means": self.means, "rotations": self.rotations, "scales": self.scales,
             "opacities": self.opacities, "colors": self.colors}
        if self.semantic_logits is not None:
            d["extras"] = self.semantic_logits
        return d


# =========================================================================== posing helpers
def canonical_pose_joints(surfels: CanonicalSurfels) -> np.ndarray:
    """``(24, 3)`` float64 joints of the canonical (star / T) pose, metres, body frame:
    the joints the surfels were built around (``CanonicalSurfels.joints``); feed them to
    :meth:`FMGSAvatar.forward` as ``canonical_joints`` (normalised there)."""
    return np.asarray(surfels.joints, np.float64)


def pose_frame(
    poses,
    frame_id: int | None,
    pose_correction: PoseCorrection | None,
    rest_joints,
    canonical_G,
    world_from_body,
    parents=SMPL_PARENTS,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable per-frame posing: corrected local rotations and bone transforms.

    ``theta_p = theta + delta[frame_id]`` (:class:`PoseCorrection`; no correction when
    ``pose_correction`` or ``frame_id`` is None, e.g. test frames), ``R_b =
    exp([theta_p,b]_x)`` (:func:`~fmgs.trainer.models.fields.so3_exp`), ``G_pose =`` FK of ``R`` on
    the rest joints (:func:`forward_kinematics_torch`) and
    ``B_b = world_from_body @ G_pose_b @ inv(G_canonical_b)`` -- the same definition as
    :func:`fmgs.trainer.models.foundation.frame_bone_transforms`, but in torch so that ``delta``
    receives gradients (``inv(G_canonical)`` and ``world_from_body`` are constants).

    Args:
        poses: ``(72,)`` SMPL axis-angle of the frame, radians (array or tensor).
        frame_id: training-frame index into the correction table, or None.
        pose_correction: the learnable correction, or None.
        rest_joints: ``(24, 3)`` shaped rest-pose joints, metres (``AvatarSetup.rest_joints``).
        canonical_G: ``(24, 4, 4)`` relative bone transforms of the canonical pose.
        world_from_body: ``(4, 4)`` rigid body -> world transform (``Frame.world_from_body``).
        parents: kinematic tree.
        dtype: output dtype (float32 for training, float64 for checks).

    Returns:
        ``(rot_mats (24, 3, 3), bone_transforms (24, 4, 4))``: the corrected local joint
        rotations (input of the pose encoder; joint 0 is replaced by the identity there)
        and the world-from-canonical bone transforms ``B_b`` (metres).
    """
    dev = pose_correction.delta.device if pose_correction is not None else None
    theta = torch.as_tensor(np.asarray(poses, np.float64) if not torch.is_tensor(poses) else poses)
    theta = theta.to(device=dev, dtype=dtype).reshape(1, NUM_JOINTS * 3)
    if pose_correction is not None and frame_id is not None:
        theta = pose_correction(torch.tensor([int(frame_id)], device=theta.device), theta)
    return bone_transforms_torch(theta.reshape(-1), rest_joints, canonical_G, world_from_body, parents)


# =========================================================================== the model
class FMGSAvatar(AvatarModel):
    """Full FMGS-Avatar (eq. 2-12): pose-dependent geometry residual, neural skinning,
    pose/view-conditioned appearance and semantic fields on mesh-bound canonical surfels.

    Args:
        surfels: canonical surfels (fixed centres ``mu`` (S,3), frames ``R`` (S,3,3),
            scales ``s`` (S,2), SMPL skinning weights (S,24)).
        cfg: :class:`FullModelConfig` (defaults: the paper's sizes, all fields on).

    Buffers: ``centers``, ``frames``, ``scales0``, ``skin_weights``, ``bbox_min/max``.
    The precomputed grid lookup is a plain attribute (not saved), shared by the three grids;
    it follows the model's ``.to()`` moves (:class:`~fmgs.trainer.models.base.AvatarModel`).
    Parameters: the three grid tables, pose encoder, geometry / appearance / semantic /
    skinning fields (those switched on), opacity logits ``(S,)`` and, with
    ``use_pose_correction``, ``pose_correction.delta (num_frames, 24, 3)``.
    """

    kind = "full"
    needs_priors = True

    def __init__(self, surfels: CanonicalSurfels, cfg: FullModelConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or FullModelConfig()
        f32 = torch.float32
        centers = torch.as_tensor(np.asarray(surfels.centers), dtype=f32)
        self.register_buffer("centers", centers)
        self.register_buffer("frames", torch.as_tensor(np.asarray(surfels.rotations), dtype=f32))
        self.register_buffer("scales0", torch.as_tensor(np.asarray(surfels.scales), dtype=f32))
        self.register_buffer("skin_weights", torch.as_tensor(np.asarray(surfels.skin_weights), dtype=f32))
        bmin, bmax = centers.min(0).values, centers.max(0).values
        self.register_buffer("bbox_min", bmin)
        self.register_buffer("bbox_max", bmax)
        # Canonical upsampled mesh (skinning-regulariser samples) and surfel adjacency
        # (isometry pairs); derived from the surfels, so not saved in checkpoints.
        self.register_buffer("mesh_verts", torch.as_tensor(np.asarray(surfels.verts), dtype=f32), persistent=False)
        self.register_buffer("mesh_faces", torch.as_tensor(np.asarray(surfels.faces), dtype=torch.long),
                             persistent=False)
        self.register_buffer("mesh_skin_weights", torch.as_tensor(np.asarray(surfels.mesh_skin_weights), dtype=f32),
                             persistent=False)
        self.register_buffer("neighbour_pairs", torch.as_tensor(np.asarray(surfels.face_adjacency), dtype=torch.long),
                             persistent=False)
        n = centers.shape[0]

        # Three property volumes (Sec. 4.1.2) with one configuration and one lookup.
        self.geometry_grid = HashGrid(cfg.hash_grid)
        self.appearance_grid = HashGrid(cfg.hash_grid)
        self.semantic_grid = HashGrid(cfg.hash_grid) if cfg.use_semantic_field else None
        self._lookup: HashLookup = self.geometry_grid.precompute(
            normalize_to_bbox(centers, bmin, bmax, padding=cfg.grid_padding))
        fdim = self.geometry_grid.output_dim

        self.pose_encoder = HierarchicalPoseEncoder(code_dim=cfg.pose_dim, input_mode=cfg.pose_input,
                                                    input_scale=cfg.pose_input_scale)
        self.geometry_field = (GeometryResidualField(fdim, cfg.pose_dim, cfg.geometry_latent_dim,
                                                     cfg.geometry_width, cfg.geometry_hidden)
                               if cfg.use_geometry_field else None)
        self.appearance_field = AppearanceField(fdim, cfg.geometry_latent_dim, cfg.pose_dim, cfg.sh_degree,
                                                cfg.appearance_width, cfg.appearance_hidden)
        self.semantic_field = (SemanticField(fdim, cfg.num_classes, cfg.semantic_width, cfg.semantic_hidden)
                               if cfg.use_semantic_field else None)
        self.skinning_field = (SkinningField(bmin, bmax, padding=cfg.skinning_padding, grid_cfg=cfg.skinning_grid,
                                             prior_init=cfg.skinning_prior)
                               if cfg.use_skinning_field else None)
        if cfg.skinning_query not in ("corrected", "canonical"):
            raise ValueError(f"skinning_query must be 'corrected' or 'canonical', got {cfg.skinning_query!r}")
        if not 0.0 < float(cfg.skinning_subset) <= 1.0:
            raise ValueError(f"skinning_subset must be in (0, 1], got {cfg.skinning_subset!r}")
        self._skin_lookup: HashLookup | None = None
        if self.skinning_field is not None and cfg.skinning_query == "canonical":
            sf = self.skinning_field
            self._skin_lookup = sf.grid.precompute(
                normalize_to_bbox(centers, sf.bbox_min, sf.bbox_max, padding=sf.padding))
        # Last computed skinning weights per surfel (canonical query, subset updates);
        # saved in checkpoints so that a resumed run continues exactly.
        self.register_buffer("skin_cache", torch.zeros(n, self.skin_weights.shape[1], dtype=f32))
        self.register_buffer("skin_cache_valid", torch.zeros((), dtype=torch.bool))
        self.pose_correction = (PoseCorrection(int(cfg.num_frames), every=int(cfg.pose_correction_every))
                                if cfg.use_pose_correction else None)
        self.opacity_logit = nn.Parameter(torch.full((n,), inverse_sigmoid(cfg.init_opacity), dtype=f32))
        if cfg.static_offsets:
            self.displacement = nn.Parameter(torch.zeros(n, dtype=f32))            # metres, along n
            self.log_scale_delta = nn.Parameter(torch.zeros(n, 2, dtype=f32))
        else:
            self.displacement = self.log_scale_delta = None
        self.offset = nn.Parameter(torch.zeros(n, 3, dtype=f32)) if cfg.free_offsets else None
        self.template_surfels = self.current_surfels = surfels
        self.densify_steps: list[np.ndarray] = []

    @classmethod
    def from_config(cls, cfg, setup: AvatarSetup, num_frames: int = 0) -> "FMGSAvatar":
        """From a run config (:meth:`FullModelConfig.from_run_config`)."""
        return cls(setup.surfels, FullModelConfig.from_run_config(cfg, num_frames))

    # ------------------------------------------------------------------ helpers
    @property
    def semantic_classes(self) -> int:
        """28 Sapiens classes with the semantic field, else 0."""
        return int(self.cfg.num_classes) if self.semantic_field is not None else 0

    def bundle_info(self) -> dict:
        """The trained skinning query, which fields are on, and the SH degree of the colour."""
        return {"skinning_query_trained": str(self.cfg.skinning_query),
                "skinning_field": self.skinning_field is not None, "geometry_field": self.geometry_field is not None,
                "semantic_field": self.semantic_field is not None, "sh_degree": int(self.appearance_field.sh_degree)}

    def describe(self) -> dict:
        """``kind``, ``num_frames`` (training frames of the pose correction; 0 without one) and
        the correction's knot spacing ``pose_correction_every``."""
        pc = self.pose_correction
        return {"kind": self.kind, "num_frames": 0 if pc is None else int(pc.num_frames),
                "pose_correction_every": 1 if pc is None else int(pc.every)}

    def _grids(self) -> list[HashGrid]:
        return [g for g in (self.geometry_grid, self.appearance_grid, self.semantic_grid) if g is not None]

    def _lookup_on(self, device: torch.device) -> HashLookup:
        if self._lookup.indices.device != device:
            self._lookup = self._lookup.to(device)
        return self._lookup

    def canonical_features(self, semantic: bool = True) -> list[torch.Tensor]:
        """Property features at the fixed canonical centres (Sec. 4.1.2).

        ``f = sum_{corners k} w_k table[idx_k]`` per level, with ONE precomputed lookup
        (indices and trilinear weights) for all grids. With ``fused_grid_gather`` the
        tables (each ``(sum_l T_l, 2)``) are concatenated along the feature axis into a
        ``(sum_l T_l, 2G)`` table and gathered by one ``embedding_bag``; its backward is
        one sparse product with the lookup's cached CSR matrix (columns split back per
        grid by ``torch.cat``'s backward). Identical values to separate gathers.

        Args:
            semantic: also gather ``f_s`` (when the semantic field is on).

        Returns:
            ``[f_g, f_c]`` (+ ``f_s`` when the semantic field is on and ``semantic``), each
            ``(S, 32)``.
        """
        grids = self._grids()
        if not semantic and self.semantic_grid is not None:
            grids = grids[:2]
        lookup = self._lookup_on(self.geometry_grid.table.device)
        if not self.cfg.fused_grid_gather:
            return [g(lookup=lookup) for g in grids]
        L, Fd = self.cfg.hash_grid.n_levels, self.cfg.hash_grid.n_features_per_level
        table = torch.cat([g.table for g in grids], dim=1)                     # (T, G*F)
        w = lookup.flat_weights.to(table.dtype)
        out = _WeightedGather.apply(table, lookup.flat_indices, w, lookup)     # (S*L, G*F)
        # one copy into grid-major order, then contiguous views per grid (per-grid selects would
        # cost a full-size zero gradient each in the backward)
        out = out.view(self.num_surfels, L, len(grids), Fd).permute(2, 0, 1, 3)
        return list(out.reshape(len(grids), self.num_surfels, L * Fd).unbind(0))

    def skinning_weights(self, mu_c: torch.Tensor | None = None, training: bool = False,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Skinning weights ``W (S, 24)`` of the surfels (eq. 9), rows sum to 1.

        * skinning field off: the SMPL weights carried to the surfels (constant);
        * ``skinning_query="corrected"``: ``F_w(mu')`` at ``mu_c`` (required), grid
          encoded on the fly (``mu_c.detach()`` with ``detach_skinning_query``);
        * ``skinning_query="canonical"``: ``F_w(mu)`` at the canonical centres through the
          precomputed lookup. In training with ``skinning_subset < 1`` a random subset of
          ``ceil(subset * S)`` rows (``torch.randperm`` with ``generator``) is recomputed
          with gradient and written to ``skin_cache``; the other rows come from the cache
          (no gradient). Otherwise all rows are recomputed (the cache is refreshed only
          in training); outside training they depend on the parameters only and are computed
          once per :meth:`~fmgs.trainer.models.base.AvatarModel.frozen` context.

        Args:
            mu_c: ``(S, 3)`` corrected canonical centres (metres); only for the corrected query.
            training: training forward (subset updates).
            generator: CPU generator for the subset.
        """
        cfg = self.cfg
        sf = self.skinning_field
        if sf is None:
            return self.skin_weights
        prior = self.skin_weights if cfg.skinning_prior else None
        if cfg.skinning_query == "corrected":
            if mu_c is None:
                raise ValueError("skinning_query='corrected' needs the corrected centres mu_c")
            return sf(mu_c.detach() if cfg.detach_skinning_query else mu_c, prior_weights=prior)
        lookup = self._skin_lookup
        if lookup.indices.device != self.centers.device:
            lookup = self._skin_lookup = lookup.to(self.centers.device)
        if not training:    # pose-independent: computed once inside ``frozen()`` (AvatarModel._pose_independent)
            return self._pose_independent("skinning", lambda: sf.weights_from_features(sf.grid(lookup=lookup), prior))
        n = self.num_surfels
        m = int(math.ceil(float(cfg.skinning_subset) * n))
        if m >= n or not bool(self.skin_cache_valid):
            W = sf.weights_from_features(sf.grid(lookup=lookup), prior)                  # (S, 24)
            with torch.no_grad():
                self.skin_cache.copy_(W.detach())
                self.skin_cache_valid.fill_(True)
            return W
        rows = torch.randperm(n, generator=generator)[:m].to(self.centers.device)
        W_rows = sf.weights_from_features(sf.grid(lookup=lookup, rows=rows),           # only the subset's features
                                          None if prior is None else prior.index_select(0, rows))
        W = self.skin_cache.index_put((rows,), W_rows)          # out of place: differentiable in W_rows
        with torch.no_grad():
            self.skin_cache.index_copy_(0, rows, W_rows.detach())
        return W

    def geometry_residual(self, f_g: torch.Tensor, z_p: torch.Tensor):
        """The geometry field's residual (eq. 3), with ``delta_d`` softly bounded to
        ``max_displacement * tanh(delta_d / max_displacement)`` when ``max_displacement > 0``.
        Requires the geometry field (``use_geometry_field``)."""
        res = self.geometry_field(f_g, z_p)
        md = float(self.cfg.max_displacement)
        if md > 0:
            res = res._replace(delta_d=md * torch.tanh(res.delta_d / md))
        return res

    def base_surfels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Canonical surfels under the geometry field: ``(mu_b (S,3) m, R (S,3,3), s_b (S,2) m)``,
        with the static per-surfel offsets applied when ``static_offsets`` is on (else the
        template surfels of eq. 2)."""
        mu, s = self.centers, self.scales0
        if self.displacement is not None:
            mu = mu + self.frames[:, :, 2] * self.displacement[:, None]
            s = s * torch.exp(self.log_scale_delta)
        if self.offset is not None:
            mu = mu + self.offset
        return mu, self.frames, s

    def per_surfel_parameters(self) -> list[str]:
        """Names of the parameters with one row per surfel (carried by densification)."""
        return ["opacity_logit", "log_scale_delta", "displacement", "offset"]

    @torch.no_grad()
    def resize_surfels(self, surfels: CanonicalSurfels, source: torch.Tensor) -> None:
        """Replace the template buffers by those of ``surfels`` (densified; ``source (S_new,)``
        maps each new surfel to its old one; the per-surfel parameters are carried by
        :func:`~fmgs.trainer.models.densify.densify_model`). Bounding boxes are kept, so the
        fields are sampled at the children's centres in unchanged coordinates; the
        skinning cache is carried and marked stale (recomputed at the next training forward)."""
        f32, dev = torch.float32, self.centers.device   # the new buffers stay on the model's device
        self.centers = torch.as_tensor(np.asarray(surfels.centers), dtype=f32, device=dev)
        self.frames = torch.as_tensor(np.asarray(surfels.rotations), dtype=f32, device=dev)
        self.scales0 = torch.as_tensor(np.asarray(surfels.scales), dtype=f32, device=dev)
        self.skin_weights = torch.as_tensor(np.asarray(surfels.skin_weights), dtype=f32, device=dev)
        self.mesh_verts = torch.as_tensor(np.asarray(surfels.verts), dtype=f32, device=dev)
        self.mesh_faces = torch.as_tensor(np.asarray(surfels.faces), dtype=torch.long, device=dev)
        self.mesh_skin_weights = torch.as_tensor(np.asarray(surfels.mesh_skin_weights), dtype=f32, device=dev)
        self.neighbour_pairs = torch.as_tensor(np.asarray(surfels.face_adjacency), dtype=torch.long, device=dev)
        self._lookup = self.geometry_grid.precompute(
            normalize_to_bbox(self.centers, self.bbox_min, self.bbox_max, padding=self.cfg.grid_padding))
        if self._skin_lookup is not None:
            sf = self.skinning_field
            self._skin_lookup = sf.grid.precompute(
                normalize_to_bbox(self.centers, sf.bbox_min, sf.bbox_max, padding=sf.padding))
        self.skin_cache = gather_rows(self.skin_cache, source)
        self.skin_cache_valid.fill_(False)
        self.current_surfels = surfels

    def param_groups(self, lr) -> list[dict]:
        """Adam parameter groups (hash tables / MLPs / opacities / pose correction / static
        offsets), with the rates of ``lr`` (the ``train.lr`` section: ``hash_grid``, ``mlp``,
        ``opacity``, ``pose``, ``scale``, ``displacement``)."""
        lr_grid, lr_mlp, lr_opacity, lr_pose = lr.hash_grid, lr.mlp, lr.opacity, lr.pose
        lr_scale, lr_displacement = lr.scale, lr.displacement
        grids = [p for g in self._grids() for p in g.parameters()]
        if self.skinning_field is not None:
            grids += list(self.skinning_field.grid.parameters())
        mlps = list(self.pose_encoder.parameters()) + list(self.appearance_field.parameters())
        for m in (self.geometry_field, self.semantic_field):
            if m is not None:
                mlps += list(m.parameters())
        if self.skinning_field is not None:
            mlps += list(self.skinning_field.mlp.parameters())
        groups = [{"params": grids, "lr": lr_grid, "name": "hash_grid"},
                  {"params": mlps, "lr": lr_mlp, "name": "mlp"},
                  {"params": [self.opacity_logit], "lr": lr_opacity, "name": "opacity"}]
        if self.pose_correction is not None:
            groups.append({"params": list(self.pose_correction.parameters()), "lr": lr_pose, "name": "pose"})
        if self.displacement is not None:
            groups += [{"params": [self.log_scale_delta], "lr": lr_scale, "name": "scale"},
                       {"params": [self.displacement], "lr": lr_displacement, "name": "displacement"}]
        if self.offset is not None:
            groups.append({"params": [self.offset], "lr": float(self.cfg.offset_lr), "name": "offset"})
        return groups

    # ------------------------------------------------------------------ forward
    def forward(self, rot_mats: torch.Tensor, bone_transforms: torch.Tensor, camera_center: torch.Tensor,
                canonical_joints: torch.Tensor, training: bool = False,
                generator: torch.Generator | None = None, semantic: bool = True) -> FullPosed:
        """Pose the avatar for one frame (eq. 3-12).

        Args:
            rot_mats: ``(24, 3, 3)`` local joint rotations of the frame (already
                pose-corrected, :func:`pose_frame`); joint 0 is ignored by the encoder.
            bone_transforms: ``(24, 4, 4)`` world-from-canonical ``B_b`` (:func:`pose_frame`
                or :func:`fmgs.trainer.models.foundation.frame_bone_transforms`), metres.
            camera_center: ``(3,)`` camera position, world, metres.
            canonical_joints: ``(24, 3)`` canonical-pose joints (metres, or already
                normalised: :func:`normalize_canonical_joints` is idempotent).
            training: add the pose-encoder noise (:func:`add_pose_noise`).
            generator: optional CPU generator for that noise.
            semantic: evaluate the semantic field (eq. 8); False leaves ``semantic_logits``
                and ``semantic_features`` None for this call (``loss.semantic_every``: the
                semantic branch is independent of the rest, see :mod:`fmgs.trainer.losses.coordinated`).

        Returns:
            :class:`FullPosed`.
        """
        cfg = self.cfg
        dt, dev = self.centers.dtype, self.centers.device
        # inputs may come from the CPU (pose_frame without a correction, export checks)
        rot_in = rot_mats.to(device=dev, dtype=dt)
        bone_transforms = bone_transforms.to(device=dev, dtype=dt)
        camera_center = camera_center.to(device=dev, dtype=dt)
        if training:
            rot_in = add_pose_noise(rot_in, cfg.pose_noise_std, cfg.pose_noise_p, generator=generator)
        joints = normalize_canonical_joints(torch.as_tensor(canonical_joints, dtype=dt, device=dev))
        z_p = self.pose_encoder(rot_in, joints)                                           # (1, 16)

        use_sem = self.semantic_field is not None and semantic
        # pose-independent: computed once inside ``frozen()`` (AvatarModel._pose_independent)
        feats = self._pose_independent(("features", use_sem), lambda: self.canonical_features(semantic=use_sem))
        f_g, f_c = feats[0], feats[1]
        f_s = feats[2] if use_sem else None

        mu_b, R_b, s_b = self._pose_independent("base_surfels", self.base_surfels)
        if self.geometry_field is not None:
            res = self.geometry_residual(f_g, z_p)                                         # eq. 3
            corr = apply_geometry_residual(mu_b, R_b, s_b, None, res)                      # eq. 4-6
            mu_c, R_c, s_c, z_g = corr.centers, corr.rotations, corr.scales, res.z_g
        else:
            res = None
            mu_c, R_c, s_c = mu_b, R_b, s_b
            z_g = torch.zeros(self.num_surfels, cfg.geometry_latent_dim, dtype=dt, device=self.centers.device)

        W = self.skinning_weights(mu_c, training=training, generator=generator)          # eq. 9
        lbs = blend_lbs(W, bone_transforms, mu_c, R_c)                              # eq. 10-12

        d_hat = None
        if self.appearance_field.sh_degree >= 0:
            d = F.normalize(lbs.means.detach() - camera_center[None], dim=-1)
            d_hat = canonicalize_view_dirs(d, lbs.transforms.detach())
        colors = self.appearance_field(f_c, z_g, z_p, d_hat)                               # eq. 7
        logits = self.semantic_field(f_s) if use_sem else None                             # eq. 8
        return FullPosed(
            means=lbs.means, rotations=lbs.rotations, scales=s_c, opacities=torch.sigmoid(self.opacity_logit),
            colors=colors, semantic_logits=logits, skin_weights=W, canonical_centers=mu_c,
            canonical_rotations=R_c, semantic_features=f_s, residual=res, pose_code=z_p,
            transforms=lbs.transforms,
        )

    def pose(self, frame, setup: AvatarSetup, *, frame_id: int | None = None, training: bool = False,
             semantic: bool = True) -> FullPosed:
        """Pose for ``frame``: its SMPL pose plus the learnt correction of training frame
        ``frame_id`` (none for held-out frames, ``frame_id=None``) through :func:`pose_frame`,
        then :meth:`forward` (pose noise when ``training``: ``model.full.skinning_pose_noise_deg``
        on the pose before the correction, and the encoder's :func:`add_pose_noise`)."""
        pc = self.pose_correction if frame_id is not None else None
        poses = frame.poses
        sigma = float(self.cfg.skinning_pose_noise_deg)
        if training and sigma > 0:
            # theta + N(0, sigma^2) per axis-angle component (global RNG: seeded by train.seed)
            poses = torch.as_tensor(np.asarray(poses, np.float64)).reshape(-1)
            poses = poses + torch.randn(poses.shape, dtype=poses.dtype) * np.deg2rad(sigma)
        rot, B = pose_frame(poses, frame_id if pc is not None else None, pc, setup.rest_joints,
                            setup.canonical_G, frame.world_from_body)
        return self(rot, B, torch.as_tensor(frame.camera.center, dtype=torch.float32),
                    torch.as_tensor(canonical_pose_joints(setup.surfels), dtype=torch.float32), training=training,
                    semantic=semantic)

    def pose_at(self, frame, setup: AvatarSetup, theta: torch.Tensor, world_from_body: torch.Tensor) -> FullPosed:
        """:meth:`forward` at an explicit pose (no per-frame correction, no semantic outputs);
        gradients reach ``theta (72,)`` and ``world_from_body (4, 4)``."""
        rot, B = bone_transforms_torch(theta, setup.rest_joints, setup.canonical_G, world_from_body)
        return self(rot, B, torch.as_tensor(frame.camera.center, dtype=theta.dtype, device=theta.device),
                    torch.as_tensor(canonical_pose_joints(setup.surfels), dtype=theta.dtype, device=theta.device),
                    training=False,
                    semantic=False)

    def loss_groups(self, cfg, out, posed, frame, prior, iteration, generator=None) -> dict[str, torch.Tensor]:
        """Eq. 13-21 grouped for coordinated training (:func:`fmgs.trainer.losses.objectives.full_loss_groups`);
        with offsets, ``model.offsets.lambda_laplacian`` x
        :func:`~fmgs.trainer.losses.terms.offset_laplacian_loss` joins the unrestricted ``regularisers``."""
        groups = full_loss_groups(cfg, out, posed, self, frame, prior, iteration, generator=generator)
        lam = float(cfg.model.offsets.lambda_laplacian)
        if self.offset is not None and lam > 0:
            reg = lam * offset_laplacian_loss(self.offset, self.neighbour_pairs)
            groups["regularisers"] = groups["regularisers"] + reg if "regularisers" in groups else reg
        return groups

    def backward(self, posed: FullPosed, groups: dict[str, torch.Tensor], cfg) -> None:
        """Coordinated training (Sec. 4.5, :func:`fmgs.trainer.losses.coordinated.coordinated_backward`),
        or a plain backward of the sum with ``train.coordinated=false``."""
        coordinated_backward(posed.render_inputs(), groups, enabled=bool(cfg.train.coordinated))
