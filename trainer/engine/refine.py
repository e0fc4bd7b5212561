"""Test-time pose refinement: fit a held-out frame's SMPL pose to its image with the avatar frozen.

Monocular avatars are scored at poses that come from the same noisy per-frame fit as their
training poses. When the held-out poses come from a monocular fit (``fmgs-prep video``, or
any video without multi-view capture), part of the error a metric sees is the fit's
misalignment, not the avatar. The field's protocol for such data (Anim-NeRF, InstantAvatar,
3DGS-Avatar, GART on PeopleSnapshot) optimises each test frame's SMPL pose against its image
with the trained avatar frozen before scoring. ``fmgs-eval --refine-poses N`` does that:

    minimise over (d_theta (72,), d_T (3,)):
        photometric(render(theta + d_theta, T + d_T), image)          (eq. 13 of the paper)
        + lambda_mask * BCE(alpha, mask)                               (eq. 14)
        + reg * (|d_theta|^2 + |d_T / 0.1 m|^2)

with Adam for N iterations from the frame's own pose (``d = 0``), at the evaluation
resolution. ``d_theta`` covers all 24 joints (joint 0 rotates the body about the pelvis),
``d_T`` translates the body in world space. Only the pose moves: the avatar's parameters
are frozen, so the avatar is the same one that is scored without refinement. Numbers with
and without refinement are different protocols and are reported as such (``metrics.json``
records ``pose_refinement``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["RefineSettings", "refine_frame_pose"]


@dataclass(frozen=True)
class RefineSettings:
    """Test-time pose refinement settings. The learning rates and the suggested 40 steps were
    chosen on the validation split of ZJU-MoCap 377 prepared by ``fmgs-prep video``
    (docs/benchmarks.md: 28.96 dB without, 30.58 with 20 steps, 30.94 with 40).

    Attributes:
        iterations: Adam steps per frame (0 = off).
        lr_pose: learning rate of ``d_theta`` (radians).
        lr_translation: learning rate of ``d_T`` (metres).
        reg: weight of the pull of ``d_theta`` and ``d_T / 0.1 m`` towards zero.
    """

    iterations: int = 0
    lr_pose: float = 1e-2
    lr_translation: float = 3e-3
    reg: float = 1e-3


def refine_frame_pose(model, setup, frame, cfg, settings: RefineSettings):
    """Refine one held-out frame's pose against its image (module docstring).

    Args:
        model: a trained :class:`~fmgs.trainer.models.base.AvatarModel` (any kind with
            :meth:`~fmgs.trainer.models.base.AvatarModel.pose_at`); its parameters are not
            changed.
        setup: the subject.
        frame: the held-out :class:`~fmgs.trainer.data.humannerf.Frame` (``image``,
            ``mask``, ``poses (72,)``, ``world_from_body (4, 4)``, ``camera``).
        cfg: the run config (loss weights ``train.lambda_ssim``, ``train.lambda_mask``,
            background, back-end).
        settings: :class:`RefineSettings`.

    Returns:
        ``(frame', stats)``: a copy of ``frame`` whose ``poses``, ``Rh``, ``Th`` and
        ``world_from_body`` are the refined ones (float32 / float64 as the reader's), and
        ``{"loss_first", "loss_last", "rotation_deg", "translation_mm"}`` (largest joint
        rotation change in degrees, translation change in millimetres).
    """
    from fmgs.trainer.losses.terms import mask_bce_loss, photometric_loss

    n = int(settings.iterations)
    if n <= 0:
        return frame, {}
    dev = next(model.parameters()).device
    theta0 = torch.as_tensor(np.asarray(frame.poses, np.float64), dtype=torch.float32, device=dev).reshape(72)
    W0 = torch.as_tensor(np.asarray(frame.world_from_body, np.float64), dtype=torch.float32, device=dev)
    d_theta = torch.zeros(72, device=dev, requires_grad=True)
    d_T = torch.zeros(3, device=dev, requires_grad=True)
    opt = torch.optim.Adam([{"params": [d_theta], "lr": float(settings.lr_pose)},
                            {"params": [d_T], "lr": float(settings.lr_translation)}])
    gt = torch.from_numpy(np.ascontiguousarray(frame.image)).to(dev)
    mask = torch.from_numpy(np.ascontiguousarray(frame.mask)).to(dev)
    lam_ssim, lam_mask = float(cfg.train.lambda_ssim), float(cfg.train.lambda_mask)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses = []
    try:
        for _ in range(n):
            opt.zero_grad()
            W = W0.clone()
            W[:3, 3] = W0[:3, 3] + d_T
            out = model.render(model.pose_at(frame, setup, theta0 + d_theta, W), frame.camera, cfg)
            loss = photometric_loss(out.rgb, gt, lambda_ssim=lam_ssim) + lam_mask * mask_bce_loss(out.alpha, mask)
            losses.append(float(loss.detach()))
            loss = loss + float(settings.reg) * ((d_theta ** 2).sum() + ((d_T / 0.1) ** 2).sum())
            loss.backward()
            opt.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        poses = (theta0 + d_theta).cpu().numpy().astype(np.float32)
        T = (W0[:3, 3] + d_T).double().cpu().numpy()
    world_from_body = np.asarray(frame.world_from_body, np.float64).copy()
    world_from_body[:3, 3] = T
    # A refined joint-0 rotation stays in ``poses[:3]`` (it turns the body about the pelvis
    # joint, not about the body origin that ``Rh`` turns it about), so ``Rh`` is unchanged.
    refined = dataclasses.replace(frame, poses=poses, Th=T.astype(np.float32), world_from_body=world_from_body)
    dR = np.abs(poses.astype(np.float64) - np.asarray(frame.poses, np.float64)).reshape(24, 3)
    rot_deg = float(np.degrees(np.linalg.norm(dR, axis=1).max()))
    return refined, {"loss_first": losses[0], "loss_last": losses[-1], "rotation_deg": rot_deg,
                     "translation_mm": float(1e3 * np.linalg.norm(d_T.detach().cpu().numpy()))}
