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
:func:`fmgs.trainer.models.base.frame_bone_transforms`.

Losses (eq. 13-14): ``(1-l) L1 + l D-SSIM`` with ``l = train.lambda_ssim`` plus
``train.lambda_mask * BCE(alpha, mask)``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fmgs.surfels import CanonicalSurfels
from fmgs.trainer.losses.terms import mask_bce_loss, photometric_loss
from fmgs.trainer.models.base import (AvatarModel, AvatarSetup, bone_transforms_torch, frame_bone_transforms,
                                      inverse_sigmoid)
from fmgs.trainer.losses.terms import offset_laplacian_loss
from fmgs.trainer.models.fields import blend_lbs, sh_basis
from fmgs.trainer.models.hashgrid import HashGrid, HashGridConfig, normalize_to_bbox

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

    def render_inputs(self) -> dict[str, torch.Tensor]:
        """The rasteriser inputs by name (:func:`fmgs.trainer.render.dispatch.render_posed`)."""
        return {"means": self.means, "rotations": self.rotations, "scales": self.scales,
                "opacities": self.opacities, "colors": self.colors}


class SurfelAvatar(AvatarModel):
    """Foundation FMGS avatar (see module docstring for the equations).

    Args:
        surfels: canonical surfels (fixed centres, frames, initial scales, SMPL skinning weights).
        cfg: the ``model`` section of the run config (:class:`fmgs.config.ModelConfig`: hash grid,
            view dependence, ``foundation`` colour MLP and displacement switch).
        init_opacity: initial opacity of every surfel, in (0, 1).

    Buffers (not trained): canonical centres (S,3), frames (S,3,3), initial log
    scales (S,2), skinning weights (S,24); the precomputed hash-grid lookup (a plain
    attribute, not saved, moved with the model by :class:`~fmgs.trainer.models.base.AvatarModel`).
    Parameters: hash table, colour MLP, opacity logits (S,), log-scale deltas
    (S,2), normal displacements (S,) in metres and, with ``cfg.offsets.enabled``, free
    canonical offsets ``offset`` (S,3) in metres (``model.offsets``).

    The surfel count changes only through :func:`fmgs.trainer.models.densify.densify_model`
    (:meth:`resize_surfels`); ``densify_steps`` records it for checkpoints.
    """

    kind = "foundation"

    def __init__(self, surfels: CanonicalSurfels, cfg, init_opacity: float = 0.9):
        super().__init__()
        f32 = torch.float32
        centers = torch.as_tensor(np.asarray(surfels.centers), dtype=f32)
        self.register_buffer("centers", centers)
        self.register_buffer("frames", torch.as_tensor(np.asarray(surfels.rotations), dtype=f32))
        self.register_buffer("log_scales0", torch.log(torch.as_tensor(np.asarray(surfels.scales), dtype=f32)))
        self.register_buffer("skin_weights", torch.as_tensor(np.asarray(surfels.skin_weights), dtype=f32))
        self.register_buffer("neighbour_pairs", torch.as_tensor(np.asarray(surfels.face_adjacency), dtype=torch.long),
                             persistent=False)
        self.template_surfels = self.current_surfels = surfels
        self.densify_steps: list[np.ndarray] = []
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
        fc = cfg.foundation
        for _ in range(int(fc.color_mlp_layers)):
            layers += [nn.Linear(width_in, int(fc.color_mlp_width)), nn.ReLU(inplace=True)]
            width_in = int(fc.color_mlp_width)
        layers.append(nn.Linear(width_in, 3))
        self.color_mlp = nn.Sequential(*layers)

        self.opacity_logit = nn.Parameter(torch.full((n,), inverse_sigmoid(init_opacity), dtype=f32))
        self.log_scale_delta = nn.Parameter(torch.zeros(n, 2, dtype=f32))
        self.learn_displacement = bool(fc.learn_displacement)
        self.displacement = nn.Parameter(torch.zeros(n, dtype=f32), requires_grad=self.learn_displacement)
        oc = getattr(cfg, "offsets", None)
        self.offset = nn.Parameter(torch.zeros(n, 3, dtype=f32)) if oc is not None and bool(oc.enabled) else None
        self._offset_lr = float(oc.lr) if oc is not None else 0.0

    @classmethod
    def from_config(cls, cfg, setup: AvatarSetup, num_frames: int = 0) -> "SurfelAvatar":
        """From the run config's ``model`` and ``surfels.init_opacity`` (no per-frame parameters)."""
        return cls(setup.surfels, cfg.model, init_opacity=float(cfg.surfels.init_opacity))

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
        if self.offset is not None:
            groups.append({"params": [self.offset], "lr": self._offset_lr, "name": "offset"})
        return groups

    def per_surfel_parameters(self) -> list[str]:
        """Names of the parameters with one row per surfel (carried by densification)."""
        return ["opacity_logit", "log_scale_delta", "displacement", "offset"]

    def static_centers(self) -> torch.Tensor:
        """``(S, 3)`` canonical centres with the static corrections: ``mu + n d (+ o)``, metres."""
        mu = self.centers + self.frames[:, :, 2] * self.displacement[:, None]          # eq. 4 (static)
        return mu if self.offset is None else mu + self.offset

    @torch.no_grad()
    def resize_surfels(self, surfels: CanonicalSurfels, source: torch.Tensor) -> None:
        """Replace the template buffers by those of ``surfels`` (densified; ``source (S_new,)``
        maps each new surfel to its old one; the per-surfel parameters are carried by
        :func:`~fmgs.trainer.models.densify.densify_model`). The hash-grid
        bounding box is kept, so the appearance field is sampled at the children's centres
        in the same coordinates."""
        f32, dev = torch.float32, self.centers.device   # the new buffers stay on the model's device
        self.centers = torch.as_tensor(np.asarray(surfels.centers), dtype=f32, device=dev)
        self.frames = torch.as_tensor(np.asarray(surfels.rotations), dtype=f32, device=dev)
        self.log_scales0 = torch.log(torch.as_tensor(np.asarray(surfels.scales), dtype=f32, device=dev))
        self.skin_weights = torch.as_tensor(np.asarray(surfels.skin_weights), dtype=f32, device=dev)
        self.neighbour_pairs = torch.as_tensor(np.asarray(surfels.face_adjacency), dtype=torch.long, device=dev)
        self._lookup = self.grid.precompute(normalize_to_bbox(self.centers, self.bbox_min, self.bbox_max,
                                                              padding=0.05))
        self.current_surfels = surfels

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
        mu = self._pose_independent("static_centers", self.static_centers)             # eq. 4 (static)
        posed = blend_lbs(self.skin_weights, bone_transforms, mu, frames)              # eq. 10-12
        means, rotations, M = posed.means, posed.rotations, posed.transforms[:, :3, :3]

        feats = self._pose_independent("features", self.canonical_features)
        if self.view_dependent:
            d = torch.nn.functional.normalize(means.detach() - camera_center[None], dim=-1)
            # Canonicalise with the inverse skinning rotation (M^T approximates M^-1 for blended rotations).
            d_c = torch.nn.functional.normalize(torch.einsum("sji,sj->si", M.detach(), d), dim=-1)
            feats = torch.cat([feats, sh_basis(d_c, self.sh_degree)], dim=-1)
        colors = torch.sigmoid(self.color_mlp(feats))
        scales = torch.exp(self.log_scales0 + self.log_scale_delta)                     # eq. 5 (static)
        opacities = torch.sigmoid(self.opacity_logit)
        return PosedSurfels(means, rotations, scales, opacities, colors)

    def pose(self, frame, setup: AvatarSetup, *, frame_id: int | None = None, training: bool = False,
             semantic: bool = True) -> PosedSurfels:
        """:meth:`forward` at the frame's bone transforms and camera centre (no per-frame
        parameters, no training-time behaviour, no semantic outputs)."""
        B = frame_bone_transforms(setup.smpl, setup.rest_joints, setup.canonical_G, frame.poses,
                                  frame.world_from_body)
        dev = self.centers.device
        return self(torch.as_tensor(B, dtype=torch.float32, device=dev),
                    torch.as_tensor(frame.camera.center, dtype=torch.float32, device=dev))

    def pose_at(self, frame, setup: AvatarSetup, theta: torch.Tensor, world_from_body: torch.Tensor) -> PosedSurfels:
        """:meth:`forward` at an explicit pose; gradients reach ``theta (72,)`` and
        ``world_from_body (4, 4)`` (:func:`~fmgs.trainer.models.base.bone_transforms_torch`)."""
        _, B = bone_transforms_torch(theta, setup.rest_joints, setup.canonical_G, world_from_body)
        return self(B, torch.as_tensor(frame.camera.center, dtype=theta.dtype, device=theta.device))

    def bundle_info(self) -> dict:
        """SH degree and view dependence of the colour."""
        return {"sh_degree": int(self.sh_degree), "view_dependent": bool(self.view_dependent)}

    def loss_groups(self, cfg, out, posed, frame, prior, iteration, generator=None) -> dict[str, torch.Tensor]:
        """``photometric`` (eq. 13), ``mask_bce`` (eq. 14) and, with offsets, ``offset_smooth``
        (``model.offsets.lambda_laplacian`` x :func:`~fmgs.trainer.losses.terms.offset_laplacian_loss`),
        on the render's device."""
        gt = torch.from_numpy(frame.image).to(out.rgb.device)
        mask = torch.from_numpy(frame.mask).to(out.rgb.device)
        groups = {"photometric": photometric_loss(out.rgb, gt, lambda_ssim=float(cfg.train.lambda_ssim)),
                  "mask_bce": float(cfg.train.lambda_mask) * mask_bce_loss(out.alpha, mask)}
        lam = float(cfg.model.offsets.lambda_laplacian)
        if self.offset is not None and lam > 0:
            groups["offset_smooth"] = lam * offset_laplacian_loss(self.offset, self.neighbour_pairs)
        return groups

    def warm_start_appearance(self, colors: np.ndarray, iters: int, lr_grid: float = 1e-2, lr_mlp: float = 5e-3,
                              seed: int = 0, weights: np.ndarray | None = None) -> dict:
        """Fit the appearance (hash grid + colour MLP) to per-surfel colours.

        Minimises ``mean_s w_s |sigmoid(MLP(f_c(mu_s), SH(d_s))) - c_s|^2`` with Adam, where
        ``d_s`` is a random unit canonical view direction in the surfel's front hemisphere
        (``d . n_c < 0``, the camera looks at the surfel), redrawn every iteration so the
        view-dependent part starts neutral. Geometry (opacity, scales, displacement) is untouched.

        Args:
            colors: (S, 3) target colours in [0, 1].
            iters: Adam iterations (0: nothing).
            lr_grid, lr_mlp: learning rates of the hash table and the MLP.
            seed: RNG seed of the view directions.
            weights: optional (S,) per-surfel loss weights (default 1).

        Returns:
            dict with ``iterations``, ``seconds``, ``rmse_start``, ``rmse_end`` (colour units,
            head-on view ``d = -n_c``).
        """
        dev = self.centers.device
        tgt = torch.as_tensor(np.asarray(colors, np.float32), device=dev)
        S = tgt.shape[0]
        w = torch.ones(S, device=dev) if weights is None else torch.as_tensor(np.asarray(weights, np.float32),
                                                                              device=dev)
        w = w / w.mean().clamp_min(1e-12)
        normal_c = self.frames[:, :, 2]
        gen = torch.Generator().manual_seed(int(seed))

        def predict(d):
            feats = self.canonical_features()
            if self.view_dependent:
                feats = torch.cat([feats, sh_basis(d, self.sh_degree)], dim=-1)
            return torch.sigmoid(self.color_mlp(feats))

        def rmse():
            with torch.no_grad():
                return float(((predict(-normal_c) - tgt) ** 2).mean().sqrt())

        t0 = time.perf_counter()
        r0 = rmse()
        params = [{"params": list(self.grid.parameters()), "lr": lr_grid},
                  {"params": list(self.color_mlp.parameters()), "lr": lr_mlp}]
        opt = torch.optim.Adam(params, eps=1e-15)
        for _ in range(int(iters)):
            r = torch.randn(S, 3, generator=gen).to(dev)     # drawn on the CPU: the same on every device
            d = torch.nn.functional.normalize(-normal_c + 0.9 * torch.nn.functional.normalize(r, dim=-1), dim=-1)
            d = torch.where(((d * normal_c).sum(-1, keepdim=True) > 0), -d, d)
            opt.zero_grad(set_to_none=True)
            loss = (w[:, None] * (predict(d) - tgt) ** 2).mean()
            loss.backward()
            opt.step()
        return {"iterations": int(iters), "seconds": time.perf_counter() - t0, "rmse_start": r0, "rmse_end": rmse()}
