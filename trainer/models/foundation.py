"""The foundation FMGS avatar: mesh-bound canonical surfels, an appearance hash grid
with a colour MLP, per-surfel opacity / scale / normal displacement, and forward LBS
with SMPL skinning weights.

Pipeline per frame (paper Sec. 4, foundation subset):

1. Canonical surfels (eq. 2): one surfel per face of the once-subdivided SMPL
   template in the canonical (star) pose; fixed count, no densification.
2. Static geometry correction (the pose-free part of eq. 4-5):
   ``mu' = mu + n * d`` with a learnable per-surfel displacement ``d`` along the
   canonical normal; ``s' = s * exp(delta_s)``.
3. Appearance (eq. 7, foundation subset): ``f_c`` sampled from the appearance
   hash grid at the *fixed* canonical centres (precomputed lookup), concatenated
   with the real SH basis (degree 3) of the view direction canonicalised by the
   inverse skinning rotation (3DGS-Avatar), fed to a small MLP with a sigmoid.
4. Forward LBS (eq. 10-12) with SMPL's skinning weights carried to the
   surfels: ``T = sum_b w_b B_b``, ``mu_o = T mu'``, frame ``R_o = T_3x3 R'``,
   re-orthonormalised (Gram-Schmidt on t_u, normal from the cross product) so the
   rasteriser receives a proper rotation.

``B_b`` are world-from-canonical bone transforms: ``world_from_body @ G_pose_b @
inv(G_canonical_b)`` (3DGS-Avatar's convention), computed in NumPy by
:func:`frame_bone_transforms`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fmgs.body_model import SMPLModel, bone_transforms
from fmgs.surfels import CanonicalSurfels
from fmgs.trainer.models.fields import blend_lbs, sh_basis
from fmgs.trainer.models.hashgrid import HashGrid, HashGridConfig, normalize_to_bbox

def frame_bone_transforms(
    smpl: SMPLModel,
    rest_joints: np.ndarray,
    canonical_G: np.ndarray,
    poses: np.ndarray,
    world_from_body: np.ndarray,
) -> np.ndarray:
    """World-from-canonical bone transforms for one frame (3DGS-Avatar convention).

    Args:
        smpl: the body model (joint tree).
        rest_joints: (24, 3) float64 shaped rest-pose joints (metres, body frame).
        canonical_G: (24, 4, 4) float64 relative bone transforms of the canonical pose.
        poses: (72,) SMPL axis-angle (radians) of the frame, root included (zero for ZJU).
        world_from_body: (4, 4) float64 rigid transform body -> world (ZJU ``Rh``, ``Th``).

    Returns:
        (24, 4, 4) float64 ``B_b = world_from_body @ G_pose_b @ inv(G_canonical_b)``,
        mapping canonical-space points to world space (metres).
    """
    return bone_transforms(np.asarray(poses, np.float64).reshape(24, 3), world_from_body, rest_joints,
                           smpl.parents, np.linalg.inv(canonical_G))[1]


@dataclass
class PosedSurfels:
    """Surfels in world space for one frame, ready for :func:`rasterize_surfels`.

    Attributes:
        means: (S, 3) world positions, metres.
        rotations: (S, 3, 3) world frames, columns [t_u, t_v, n], orthonormal.
        scales: (S, 2) metres.
        opacities: (S,) in (0, 1).
        colors: (S, 3) in (0, 1).
    """

    means: torch.Tensor
    rotations: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor


def _inverse_sigmoid(p: float) -> float:
    return math.log(p / (1.0 - p))


class SurfelAvatar(nn.Module):
    """Foundation FMGS avatar (see module docstring for the equations).

    Args:
        surfels: canonical surfels (fixed centres, frames, initial scales, SMPL skinning weights).
        cfg: the ``model`` section of the run config (hash grid sizes, colour MLP).
        init_opacity: initial opacity of every surfel, in (0, 1).

    Buffers (not trained): canonical centres (S,3), frames (S,3,3), initial log
    scales (S,2), skinning weights (S,24), the precomputed hash-grid lookup.
    Parameters: hash table, colour MLP, opacity logits (S,), log-scale deltas
    (S,2), normal displacements (S,) in metres.
    """

    def __init__(self, surfels: CanonicalSurfels, cfg, init_opacity: float = 0.9):
        super().__init__()
        f32 = torch.float32
        centers = torch.as_tensor(np.asarray(surfels.centers), dtype=f32)
        self.register_buffer("centers", centers)
        self.register_buffer("frames", torch.as_tensor(np.asarray(surfels.rotations), dtype=f32))
        self.register_buffer("log_scales0", torch.log(torch.as_tensor(np.asarray(surfels.scales), dtype=f32)))
        self.register_buffer("skin_weights", torch.as_tensor(np.asarray(surfels.skin_weights), dtype=f32))
        n = centers.shape[0]

        hg = cfg.hash_grid
        self.grid = HashGrid(HashGridConfig(
            n_levels=hg.n_levels, n_features_per_level=hg.n_features_per_level,
            log2_hashmap_size=hg.log2_hashmap_size, base_resolution=hg.base_resolution,
            max_resolution=hg.max_resolution,
        ))
        bmin = centers.min(0).values
        bmax = centers.max(0).values
        self.register_buffer("bbox_min", bmin)
        self.register_buffer("bbox_max", bmax)
        self._lookup = self.grid.precompute(normalize_to_bbox(centers, bmin, bmax, padding=0.05))

        self.view_dependent = bool(cfg.view_dependent)
        self.sh_degree = int(cfg.sh_degree) if self.view_dependent else -1
        n_sh = (self.sh_degree + 1) ** 2 if self.view_dependent else 0
        layers: list[nn.Module] = []
        width_in = self.grid.output_dim + n_sh
        for _ in range(int(cfg.color_mlp_layers)):
            layers += [nn.Linear(width_in, int(cfg.color_mlp_width)), nn.ReLU(inplace=True)]
            width_in = int(cfg.color_mlp_width)
        layers.append(nn.Linear(width_in, 3))
        self.color_mlp = nn.Sequential(*layers)

        self.opacity_logit = nn.Parameter(torch.full((n,), _inverse_sigmoid(init_opacity), dtype=f32))
        self.log_scale_delta = nn.Parameter(torch.zeros(n, 2, dtype=f32))
        self.learn_displacement = bool(cfg.learn_displacement)
        self.displacement = nn.Parameter(torch.zeros(n, dtype=f32), requires_grad=self.learn_displacement)

    @property
    def num_surfels(self) -> int:
        return int(self.centers.shape[0])

    def param_groups(self, lr) -> list[dict]:
        """Adam parameter groups with the learning rates of ``train.lr``."""
        groups = [
            {"params": list(self.grid.parameters()), "lr": lr.hash_grid, "name": "hash_grid"},
            {"params": list(self.color_mlp.parameters()), "lr": lr.mlp, "name": "mlp"},
            {"params": [self.opacity_logit], "lr": lr.opacity, "name": "opacity"},
            {"params": [self.log_scale_delta], "lr": lr.scale, "name": "scale"},
        ]
        if self.learn_displacement:
            groups.append({"params": [self.displacement], "lr": lr.displacement, "name": "displacement"})
        return groups

    def canonical_features(self) -> torch.Tensor:
        """(S, F) appearance features f_c at the fixed canonical centres (precomputed lookup)."""
        return self.grid(lookup=self._lookup)

    def forward(self, bone_transforms: torch.Tensor, camera_center: torch.Tensor) -> PosedSurfels:
        """Pose the avatar for one frame.

        Args:
            bone_transforms: (24, 4, 4) float32 world-from-canonical transforms B_b
                (:func:`frame_bone_transforms`).
            camera_center: (3,) camera position in world space, metres.

        Returns:
            :class:`PosedSurfels` in world space.
        """
        frames = self.frames
        normal_c = frames[:, :, 2]
        mu = self.centers + normal_c * self.displacement[:, None]                      # eq. 4 (static)
        posed = blend_lbs(self.skin_weights, bone_transforms, mu, frames)              # eq. 10-12
        means, rotations, M = posed.means, posed.rotations, posed.transforms[:, :3, :3]

        feats = self.canonical_features()
        if self.view_dependent:
            d = torch.nn.functional.normalize(means.detach() - camera_center[None], dim=-1)
            # Canonicalise with the inverse skinning rotation (M^T approximates M^-1 for blended rotations).
            d_c = torch.nn.functional.normalize(torch.einsum("sji,sj->si", M.detach(), d), dim=-1)
            feats = torch.cat([feats, sh_basis(d_c, self.sh_degree)], dim=-1)
        colors = torch.sigmoid(self.color_mlp(feats))
        scales = torch.exp(self.log_scales0 + self.log_scale_delta)                     # eq. 5 (static)
        opacities = torch.sigmoid(self.opacity_logit)
        return PosedSurfels(means, rotations, scales, opacities, colors)
