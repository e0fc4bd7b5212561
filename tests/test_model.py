"""The foundation avatar model: SH basis, forward LBS against a float64 NumPy reference,
and real-data agreement of the untrained avatar's silhouette with ZJU-MoCap 377 masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fmgs.trainer.models.foundation import sh_basis


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], -1)


def test_sh_basis_is_orthonormal_on_the_sphere():
    """Real SH of degree <= 3 are orthonormal: (4 pi / n) sum_k Y_i Y_j ~ delta_ij (quadrature)."""
    d = torch.as_tensor(_fibonacci_sphere(200_000), dtype=torch.float64)
    Y = sh_basis(d, 3)
    gram = (4 * np.pi / d.shape[0]) * Y.T @ Y
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=2e-4, rtol=0)
    assert sh_basis(d[:5], 1).shape == (5, 4)
    with pytest.raises(ValueError):
        sh_basis(d[:5], 4)


@pytest.fixture(scope="module")
def avatar(zju377, smpl_path):
    from fmgs.config import load_config
    from fmgs.trainer.engine.run import build_model, build_setup, open_sequence

    cfg = load_config(None, ["data.image_size=256", "data.test_range=[455,570]", "data.test_step=38"])
    seq = open_sequence(cfg, "test")
    setup = build_setup(cfg, seq)
    torch.manual_seed(0)
    model = build_model(cfg, setup)
    return cfg, seq, setup, model


def test_forward_lbs_matches_float64_reference(avatar):
    """Posed centres and frames equal an independent per-surfel float64 evaluation of eq. 10-12."""
    from fmgs.body_model import axis_angle_to_matrix, forward_kinematics
    from fmgs.trainer.models.base import frame_bone_transforms

    cfg, seq, setup, model = avatar
    with torch.no_grad():
        model.displacement.copy_(torch.linspace(-0.01, 0.01, model.num_surfels))  # exercise eq. 4
    fr = seq[1]
    B = frame_bone_transforms(setup.smpl, setup.rest_joints, setup.canonical_G, fr.poses, fr.world_from_body)
    with torch.no_grad():
        posed = model(torch.as_tensor(B, dtype=torch.float32), torch.as_tensor(fr.camera.center, dtype=torch.float32))

    # Reference: recompute the bone transforms from scratch and skin a random subset one by one.
    G_p, _ = forward_kinematics(axis_angle_to_matrix(fr.poses.reshape(24, 3)), setup.rest_joints, setup.smpl.parents)
    A = fr.world_from_body[None] @ G_p @ np.linalg.inv(setup.canonical_G)
    s = setup.surfels
    rng = np.random.default_rng(0)
    disp = model.displacement.detach().numpy().astype(np.float64)
    for k in rng.choice(model.num_surfels, 200, replace=False):
        T = np.tensordot(s.skin_weights[k].astype(np.float64), A, axes=1)
        R0 = s.rotations[k].astype(np.float64)
        mu = s.centers[k].astype(np.float64) + R0[:, 2] * disp[k]
        np.testing.assert_allclose(posed.means[k].numpy(), T[:3, :3] @ mu + T[:3, 3], atol=2e-5)
        n_ref = np.cross(T[:3, :3] @ R0[:, 0], T[:3, :3] @ R0[:, 1])
        np.testing.assert_allclose(posed.rotations[k, :, 2].numpy(), n_ref / np.linalg.norm(n_ref), atol=1e-4)
        tu = T[:3, :3] @ R0[:, 0]
        np.testing.assert_allclose(posed.rotations[k, :, 0].numpy(), tu / np.linalg.norm(tu), atol=1e-4)
    R = posed.rotations.double()
    torch.testing.assert_close(R.transpose(1, 2) @ R, torch.eye(3, dtype=torch.float64).expand_as(R), atol=1e-5, rtol=0)
    assert torch.all(torch.linalg.det(R) > 0.999)
    assert torch.all((posed.opacities > 0) & (posed.opacities < 1))
    assert torch.all((posed.colors > 0) & (posed.colors < 1))


def test_untrained_silhouette_matches_real_masks(avatar):
    """The SMPL-bound surfels, posed by the fitted SMPL and seen by the real camera, cover the
    subject's mask (IoU > 0.75, > 95 % of the mask covered): a real-data check of the body,
    camera and pixel conventions. (The untrained surfels spill about a pixel past the
    silhouette: the 2DGS low-pass filter and the initial overlap of neighbouring surfels.)"""
    from fmgs.trainer.engine.run import render_frame

    cfg, seq, setup, model = avatar
    for i in range(len(seq)):
        fr = seq[i]
        with torch.no_grad():
            out = render_frame(model, setup, fr, cfg)
        pred = out.alpha.numpy() > 0.5
        gt = fr.mask > 0.5
        iou = (pred & gt).sum() / (pred | gt).sum()
        assert iou > 0.75, (fr.name, iou)
        assert (pred & gt).sum() > 0.95 * gt.sum(), fr.name
