"""Test-time pose refinement (trainer/engine/refine.py) on real ZJU-MoCap 377 / SMPL data.

The torch posing path is checked against the float64 NumPy bone transforms and finite
differences; the refinement is checked on an exactly known target: the avatar rendered at a
frame's true pose is the image, the frame's pose is perturbed by known amounts, and the
refinement must move most of the way back.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fmgs.body_model import axis_angle_to_matrix


def _cfg(zju377, smpl_path, image_size: int):
    from fmgs.config import load_config

    return load_config(None, [
        f"data.root={zju377}", f"data.smpl_path={smpl_path}",
        f"data.parts_path={smpl_path.parent / 'smplh_parts_segm.pkl'}",
        f"data.image_size={image_size}", "data.test_range=[455,570]", "data.test_step=57",
        "surfels.subdivisions=0", "train.lambda_ssim=0.0",
    ])


@pytest.fixture(scope="module")
def real(zju377, smpl_path):
    from fmgs.trainer.engine.run import build_model, build_setup, open_sequence

    cfg = _cfg(zju377, smpl_path, image_size=96)
    seq = open_sequence(cfg, "test")
    setup = build_setup(cfg, seq)
    torch.manual_seed(0)
    model = build_model(cfg, setup)
    # An exactly known, textured avatar: colours that vary smoothly over the body (the
    # canonical position mapped to RGB), fitted into the appearance field.
    c = np.asarray(setup.surfels.centers, np.float64)
    colors = (c - c.min(0)) / (c.max(0) - c.min(0))
    model.warm_start_appearance(colors.astype(np.float32), iters=150, seed=0)
    model.eval()
    return cfg, seq, setup, model


def test_bone_transforms_torch_matches_numpy_and_finite_differences(real):
    """float64 torch transforms == frame_bone_transforms (NumPy) for a real frame with a
    non-zero root pose; d(sum B * M)/d theta and /d T match central differences."""
    from fmgs.trainer.models.base import bone_transforms_torch, frame_bone_transforms

    cfg, seq, setup, _ = real
    fr = seq[0]
    poses = np.asarray(fr.poses, np.float64).copy()
    poses[:3] = [0.1, -0.2, 0.05]
    ref = frame_bone_transforms(setup.smpl, setup.rest_joints, setup.canonical_G, poses, fr.world_from_body)
    theta = torch.tensor(poses, requires_grad=True)
    W = torch.tensor(np.asarray(fr.world_from_body, np.float64), requires_grad=True)
    _, B = bone_transforms_torch(theta, setup.rest_joints, setup.canonical_G, W)
    np.testing.assert_allclose(B.detach().numpy(), ref, atol=1e-12)
    M = torch.as_tensor(np.random.default_rng(0).normal(size=B.shape))
    (B * M).sum().backward()

    def f(p, Wm):
        return float((frame_bone_transforms(setup.smpl, setup.rest_joints, setup.canonical_G, p, Wm)
                      * M.numpy()).sum())

    h = 1e-6
    for k in (0, 5, 19 * 3 + 1):  # root, a hip, an elbow
        e = np.zeros(72)
        e[k] = h
        fd = (f(poses + e, fr.world_from_body) - f(poses - e, fr.world_from_body)) / (2 * h)
        assert abs(theta.grad[k].item() - fd) < 1e-5 * max(1.0, abs(fd))
    Wp, Wm_ = np.array(fr.world_from_body, np.float64), np.array(fr.world_from_body, np.float64)
    Wp[1, 3] += h
    Wm_[1, 3] -= h
    assert abs(W.grad[1, 3].item() - (f(poses, Wp) - f(poses, Wm_)) / (2 * h)) < 1e-6


def test_refinement_recovers_a_known_pose_perturbation(real):
    """Target = the avatar rendered at the frame's true pose; the frame's pose is perturbed
    (right elbow 0.25 rad, left knee 0.2 rad, root 0.08 rad, body shifted 3 cm);
    100 steps must bring the posed joints (mean and worst) and the elbow rotation back to
    under 30% of their errors and halve the image loss; the avatar is unchanged. (Joint
    positions, not each joint's rotation: a root lean and the spine's rotations can trade
    off with the same image.)"""
    from fmgs.trainer.engine.refine import RefineSettings, refine_frame_pose
    from fmgs.trainer.models.base import frame_bone_transforms
    from fmgs.trainer.models.full import canonical_pose_joints

    cfg, seq, setup, model = real
    fr = seq[1]
    with torch.no_grad():
        out = model.render(model.pose(fr, setup), fr.camera, cfg)
    target = dataclasses.replace(fr, image=out.rgb.numpy().copy(), mask=(out.alpha.numpy() > 0.5).astype(np.float32))
    bad = np.asarray(fr.poses, np.float64).copy()
    bad[19 * 3 + 1] += 0.25     # right elbow (SMPL joint 19), about y
    bad[4 * 3 + 0] += 0.2       # left knee (joint 4), about x
    bad[0 * 3 + 2] += 0.08      # root about z
    W = np.array(fr.world_from_body, np.float64)
    W[:3, 3] += [0.03, 0.0, 0.0]
    start = dataclasses.replace(target, poses=bad.astype(np.float32), world_from_body=W)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]

    refined, st = refine_frame_pose(model, setup, start, cfg,
                                    RefineSettings(iterations=100, lr_pose=0.02, lr_translation=0.003, reg=0.0))

    def joints(frame):  # posed SMPL joints in world space (m): B_b applied to the canonical joints
        B = frame_bone_transforms(setup.smpl, setup.rest_joints, setup.canonical_G, frame.poses,
                                  frame.world_from_body)
        Jc = np.asarray(canonical_pose_joints(setup.surfels), np.float64)
        return np.einsum("jab,jb->ja", B[:, :3, :3], Jc) + B[:, :3, 3]

    e0 = np.linalg.norm(joints(start) - joints(fr), axis=1)
    e1 = np.linalg.norm(joints(refined) - joints(fr), axis=1)
    print(f"joint error mean {1e3 * e0.mean():.1f} -> {1e3 * e1.mean():.1f} mm, max {1e3 * e0.max():.1f} -> "
          f"{1e3 * e1.max():.1f} mm; elbow {abs(bad[58] - fr.poses[58]):.3f} -> "
          f"{abs(refined.poses[58] - fr.poses[58]):.3f} rad")
    assert e1.mean() < 0.3 * e0.mean() and e1.max() < 0.3 * e0.max()
    # the elbow's own rotation (observable: it moves the forearm) comes back too
    assert abs(refined.poses[58] - fr.poses[58]) < 0.3 * abs(bad[58] - fr.poses[58])
    assert st["loss_last"] < 0.5 * st["loss_first"]
    np.testing.assert_allclose(refined.Th, refined.world_from_body[:3, 3], atol=1e-6)
    np.testing.assert_allclose(refined.world_from_body[:3, :3], axis_angle_to_matrix(np.asarray(fr.Rh, np.float64)),
                               atol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in model.parameters()] == flags


def test_zero_iterations_is_the_identity(real):
    from fmgs.trainer.engine.refine import RefineSettings, refine_frame_pose

    cfg, seq, setup, model = real
    fr = seq[0]
    same, st = refine_frame_pose(model, setup, fr, cfg, RefineSettings(iterations=0))
    assert same is fr and st == {}


def test_silhouette_refinement_uses_only_the_mask(real):
    """``photometric=0`` fits the avatar's silhouette to the frame's mask alone: the same
    start with two unrelated images gives the same pose to float precision, and the pose
    perturbed by a known 3 cm shift and a 0.25 rad elbow bend in the image plane (one the
    silhouette sees) comes back most of the way
    (posed joints' mean error under 40 % of its start; the silhouette constrains the pose
    less than the image, so the bound is looser than the photometric test's 30 %)."""
    from fmgs.trainer.engine.refine import RefineSettings, refine_frame_pose
    from fmgs.trainer.models.base import frame_bone_transforms
    from fmgs.trainer.models.full import canonical_pose_joints

    cfg, seq, setup, model = real
    fr = seq[1]
    # 3x the fixture's resolution (288²): at 96² a 3 cm shift is about one pixel of silhouette
    K = np.asarray(fr.camera.K, np.float64) * np.array([[3.0], [3.0], [1.0]])
    cam = dataclasses.replace(fr.camera, K=K, width=3 * fr.camera.width, height=3 * fr.camera.height)
    fr = dataclasses.replace(fr, camera=cam, image=np.zeros((cam.height, cam.width, 3), np.float32))
    with torch.no_grad():
        out = model.render(model.pose(fr, setup), fr.camera, cfg)
    mask = (out.alpha.numpy() > 0.5).astype(np.float32)
    bad = np.asarray(fr.poses, np.float64).copy()
    bad[19 * 3 + 2] += 0.25     # right elbow about z: the forearm swings in the image plane
    W = np.array(fr.world_from_body, np.float64)
    W[:3, 3] += [0.03, 0.0, 0.0]
    rng = np.random.default_rng(1)
    settings = RefineSettings(iterations=60, lr_pose=0.01, lr_translation=0.003, photometric=0.0)
    results = []
    for image in (np.zeros_like(fr.image), rng.random(fr.image.shape).astype(np.float32)):
        start = dataclasses.replace(fr, image=image, mask=mask, poses=bad.astype(np.float32), world_from_body=W)
        results.append(refine_frame_pose(model, setup, start, cfg, settings)[0])
    np.testing.assert_allclose(results[0].poses, results[1].poses, atol=1e-6)
    np.testing.assert_allclose(results[0].Th, results[1].Th, atol=1e-7)

    def joints(frame):
        B = frame_bone_transforms(setup.smpl, setup.rest_joints, setup.canonical_G, frame.poses,
                                  frame.world_from_body)
        Jc = np.asarray(canonical_pose_joints(setup.surfels), np.float64)
        return np.einsum("jab,jb->ja", B[:, :3, :3], Jc) + B[:, :3, 3]

    start = dataclasses.replace(fr, poses=bad.astype(np.float32), world_from_body=W)
    e0 = np.linalg.norm(joints(start) - joints(fr), axis=1).mean()
    e1 = np.linalg.norm(joints(results[0]) - joints(fr), axis=1).mean()
    print(f"joint error mean {1e3 * e0:.1f} -> {1e3 * e1:.1f} mm")
    assert e1 < 0.4 * e0


@pytest.mark.parametrize("kind", ["foundation", "full"])
def test_frozen_caches_only_what_the_pose_cannot_change(real, zju377, smpl_path, kind):
    """``AvatarModel.frozen()`` (what the refinement and the held-out renders run inside):
    render, alpha and d(render)/d(pose) at a real frame's pose are bit-for-bit the uncached
    forward's, at the first and at a cached second call; the grid features are gathered once
    however often the avatar is posed; parameters frozen inside (a nested call keeps them
    frozen), the earlier ``requires_grad`` flags restored on exit; and a parameter change after
    exit is seen (the cache is dropped)."""
    from fmgs.trainer.engine.run import build_model

    cfg = real[0]
    if kind == "full":
        from omegaconf import OmegaConf

        cfg = OmegaConf.merge(cfg, {"model": {"kind": "full"}})
    seq, setup = real[1], real[2]
    torch.manual_seed(0)
    model = build_model(cfg, setup).eval()
    # a non-trivial avatar: random grid tables (the initial ones are near zero)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "table" in name:
                p.normal_(0.0, 0.5)
    fr = seq[1]

    def render_and_grad():
        theta = torch.tensor(np.asarray(fr.poses, np.float32), requires_grad=True)
        W = torch.tensor(np.asarray(fr.world_from_body, np.float32))
        out = model.render(model.pose_at(fr, setup, theta, W), fr.camera, cfg)
        (out.rgb.sum() + 3.0 * out.alpha.sum()).backward()
        return out.rgb.detach().clone(), out.alpha.detach().clone(), theta.grad.clone()

    first_param = next(model.parameters())
    first_param.requires_grad_(False)           # a flag that was off stays off
    flags = [p.requires_grad for p in model.parameters()]
    ref = render_and_grad()
    gathers = []
    real_features = model.canonical_features
    model.canonical_features = lambda *a, **k: gathers.append(1) or real_features(*a, **k)
    try:
        with model.frozen():
            assert not any(p.requires_grad for p in model.parameters())
            cached = [render_and_grad(), render_and_grad()]
            with model.frozen():
                cached.append(render_and_grad())
            assert not any(p.requires_grad for p in model.parameters())   # still the outer one's
    finally:
        del model.canonical_features
    assert len(gathers) == 1
    assert [p.requires_grad for p in model.parameters()] == flags
    assert ref[2].abs().max() > 0
    for got in cached:
        for a, b in zip(ref, got):
            assert torch.equal(a, b)
    with torch.no_grad():                       # change what was cached: it must be seen now
        for name, p in model.named_parameters():
            if "table" in name:
                p.mul_(-1.0)
    changed = render_and_grad()
    assert not torch.equal(changed[0], ref[0])
    with model.frozen():
        again = render_and_grad()
    for a, b in zip(changed, again):
        assert torch.equal(a, b)
