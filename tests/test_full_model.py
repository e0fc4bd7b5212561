"""The full FMGS-Avatar model (trainer/models/full.py) and the coordinated training
strategy (trainer/losses/coordinated.py, paper Sec. 4.5) on real ZJU-MoCap 377 / SMPL data.

The gradient-isolation proofs render the real posed avatar (a 64x64 crop of the real
512x512 camera, so that surfels cover several pixels and the ray-plane intersection
depth depends on the surfel orientation), evaluate the real losses of
trainer/losses/terms.py, and check model-parameter gradients: with the strategy on, the
blocked paths give EXACTLY zero; with it off, the same quantities are non-zero.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from fmgs.config import load_config
from fmgs.trainer.losses import terms as L
from fmgs.trainer.losses.coordinated import BLOCKED, coordinated_backward
from fmgs.trainer.render.dispatch import render_posed
from fmgs.trainer.models.full import (
    FMGSAvatar, FullModelConfig, canonical_pose_joints, pose_frame,
)

CROP = 64


def _cfg(zju377, smpl_path, subdivisions: int, image_size: int):
    from fmgs.config import load_config

    return load_config(None, [
        f"data.root={zju377}", f"data.smpl_path={smpl_path}",
        f"data.parts_path={smpl_path.parent / 'smplh_parts_segm.pkl'}",
        f"data.image_size={image_size}", "data.test_range=[455,570]", "data.test_step=38",
        f"surfels.subdivisions={subdivisions}",
    ])


@pytest.fixture(scope="module")
def real(zju377, smpl_path):
    """Real 55k-surfel setup (one SMPL subdivision) and a test frame at 64 px."""
    from fmgs.trainer.engine.run import build_setup, open_sequence

    cfg = _cfg(zju377, smpl_path, subdivisions=1, image_size=64)
    seq = open_sequence(cfg, "test")
    setup = build_setup(cfg, seq)
    return cfg, seq, setup


def _frame_inputs(setup, fr, model):
    J = torch.as_tensor(canonical_pose_joints(setup.surfels))
    c = torch.as_tensor(fr.camera.center, dtype=torch.float32)
    return J, c


def test_pose_frame_equals_frame_bone_transforms_and_is_differentiable(real):
    """Torch posing (float64, zero correction) equals the NumPy frame_bone_transforms;
    the correction of frame k receives a gradient, the other frames' do not."""
    from fmgs.trainer.models.fields import PoseCorrection
    from fmgs.trainer.models.base import frame_bone_transforms

    _, seq, setup = real
    fr = seq[1]
    pc = PoseCorrection(5).double()
    rot, B = pose_frame(fr.poses, 3, pc, setup.rest_joints, setup.canonical_G, fr.world_from_body,
                        dtype=torch.float64)
    ref = frame_bone_transforms(setup.smpl, setup.rest_joints, setup.canonical_G, fr.poses, fr.world_from_body)
    assert B.shape == (24, 4, 4) and rot.shape == (24, 3, 3)
    np.testing.assert_allclose(B.detach().numpy(), ref, atol=1e-12, rtol=0)
    R = rot.detach()
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(24, 3, 3))
    B.sum().backward()
    g = pc.delta.grad
    assert g[3].abs().sum() > 0
    assert torch.count_nonzero(g[[0, 1, 2, 4]]) == 0
    # no correction (test frames): same transforms
    _, B0 = pose_frame(fr.poses, None, None, setup.rest_joints, setup.canonical_G, fr.world_from_body,
                       dtype=torch.float64)
    np.testing.assert_allclose(B0.numpy(), ref, atol=1e-12, rtol=0)


def test_full_model_shapes_and_invariants(real):
    """All fields on, 55,104 real surfels: shapes, proper rotations, weights on the simplex."""
    _, seq, setup = real
    torch.manual_seed(0)
    model = FMGSAvatar(setup.surfels, FullModelConfig(num_frames=3))
    S = model.num_surfels
    assert S == 55104
    fr = seq[0]
    J, c = _frame_inputs(setup, fr, model)
    with torch.no_grad():
        rot, B = pose_frame(fr.poses, 0, model.pose_correction, setup.rest_joints, setup.canonical_G,
                            fr.world_from_body)
        p = model(rot, B, c, J, training=True, generator=torch.Generator().manual_seed(0))
    assert p.means.shape == (S, 3) and p.rotations.shape == (S, 3, 3) and p.scales.shape == (S, 2)
    assert p.opacities.shape == (S,) and p.colors.shape == (S, 3)
    assert p.semantic_logits.shape == (S, 28) and p.semantic_features.shape == (S, 32)
    assert p.skin_weights.shape == (S, 24) and p.canonical_centers.shape == (S, 3)
    assert p.pose_code.shape == (1, 16) and p.residual.z_g.shape == (S, 16)
    assert set(p.render_inputs()) == {"means", "rotations", "scales", "opacities", "colors", "extras"}
    torch.testing.assert_close(p.skin_weights.sum(-1), torch.ones(S), atol=1e-5, rtol=0)
    assert torch.all(p.skin_weights >= 0)
    R = p.rotations.double()
    torch.testing.assert_close(R.transpose(1, 2) @ R, torch.eye(3, dtype=torch.float64).expand_as(R),
                               atol=1e-5, rtol=0)
    assert torch.all(torch.linalg.det(R) > 0.999)
    assert torch.all((p.colors > 0) & (p.colors < 1))
    # a field switched off: no semantic outputs, no semantic grid
    m2 = FMGSAvatar(setup.surfels, FullModelConfig(use_semantic_field=False, use_pose_correction=False))
    with torch.no_grad():
        p2 = m2(rot, B, c, J)
    assert p2.semantic_logits is None and "extras" not in p2.render_inputs() and m2.semantic_grid is None
    # semantic=False (loss.semantic_every): the same posed surfels without the semantic branch
    with torch.no_grad():
        p3 = model(rot, B, c, J, training=True, generator=torch.Generator().manual_seed(0), semantic=False)
    assert p3.semantic_logits is None and p3.semantic_features is None and "extras" not in p3.render_inputs()
    for a, b in ((p.means, p3.means), (p.rotations, p3.rotations), (p.scales, p3.scales), (p.colors, p3.colors)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_zero_residual_without_skinning_field_equals_foundation(real):
    """Zero-initialised geometry residual + SMPL skinning weights: posed centres, frames and
    scales equal the foundation SurfelAvatar's for the same frame."""
    from fmgs.trainer.models.base import frame_bone_transforms
    from fmgs.trainer.engine.run import build_model

    cfg, seq, setup = real
    torch.manual_seed(0)
    found = build_model(cfg, setup)
    full = FMGSAvatar(setup.surfels, FullModelConfig(use_skinning_field=False, num_frames=2))
    fr = seq[2]
    J, c = _frame_inputs(setup, fr, full)
    B = torch.as_tensor(frame_bone_transforms(setup.smpl, setup.rest_joints, setup.canonical_G, fr.poses,
                                              fr.world_from_body), dtype=torch.float32)
    with torch.no_grad():
        ref = found(B, c)
        rot, Bt = pose_frame(fr.poses, 1, full.pose_correction, setup.rest_joints, setup.canonical_G,
                             fr.world_from_body)
        a = full(rot, B, c, J)
        b = full(rot, Bt, c, J)  # torch posing (float32) with the zero-initialised correction
    assert torch.count_nonzero(a.residual.delta_d) == 0
    torch.testing.assert_close(a.means, ref.means, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.rotations, ref.rotations, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.scales, ref.scales, atol=0, rtol=1e-6)
    torch.testing.assert_close(a.opacities, ref.opacities)
    torch.testing.assert_close(b.means, ref.means, atol=2e-5, rtol=0)


def test_static_offsets_match_the_foundation_static_geometry(real):
    """``static_offsets``: with the same per-surfel displacement and log-scale delta (random,
    a few mm / +-0.3), the zero-residual full model with SMPL skinning poses exactly the
    surfels of the foundation model (its static eq. 4-5); they get gradients; without the
    switch the model has no such parameters."""
    from fmgs.trainer.models.base import frame_bone_transforms
    from fmgs.trainer.engine.run import build_model

    cfg, seq, setup = real
    torch.manual_seed(1)
    found = build_model(cfg, setup)
    full = FMGSAvatar(setup.surfels, FullModelConfig(use_skinning_field=False, use_pose_correction=False,
                                                     static_offsets=True))
    assert FMGSAvatar(setup.surfels, FullModelConfig(use_skinning_field=False, use_pose_correction=False,
                                                     static_offsets=False)).displacement is None
    S = full.num_surfels
    d = (torch.rand(S) - 0.5) * 0.01
    ls = (torch.rand(S, 2) - 0.5) * 0.6
    with torch.no_grad():
        full.displacement.copy_(d)
        full.log_scale_delta.copy_(ls)
        found.displacement.copy_(d)
        found.log_scale_delta.copy_(ls)
    names = {g["name"] for g in full.param_groups(load_config().train.lr)}
    assert {"scale", "displacement"} <= names
    fr = seq[1]
    J, c = _frame_inputs(setup, fr, full)
    B = torch.as_tensor(frame_bone_transforms(setup.smpl, setup.rest_joints, setup.canonical_G, fr.poses,
                                              fr.world_from_body), dtype=torch.float32)
    rot, _ = pose_frame(fr.poses, None, None, setup.rest_joints, setup.canonical_G, fr.world_from_body)
    a = full(rot, B, c, J)
    with torch.no_grad():
        ref = found(B, c)
    torch.testing.assert_close(a.means.detach(), ref.means, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.scales.detach(), ref.scales, atol=0, rtol=1e-5)
    (a.means.sum() + a.scales.sum()).backward()
    assert torch.count_nonzero(full.displacement.grad) > 0.9 * S
    assert torch.count_nonzero(full.log_scale_delta.grad) > 0.9 * S


def test_shared_lookup_fused_gather_equals_per_grid_encoding(real):
    """One precomputed lookup serves the three grids; the fused gather equals per-grid
    on-the-fly encodings, in value and in table gradients."""
    from fmgs.trainer.models.hashgrid import normalize_to_bbox

    _, _, setup = real
    torch.manual_seed(0)
    m = FMGSAvatar(setup.surfels, FullModelConfig(use_skinning_field=False, use_pose_correction=False))
    with torch.no_grad():
        for g in m._grids():
            g.table.uniform_(-1, 1)
    fused = m.canonical_features()
    x = normalize_to_bbox(m.centers, m.bbox_min, m.bbox_max, padding=m.cfg.grid_padding)
    ref = [g(x) for g in m._grids()]
    assert len(fused) == 3
    for a, b in zip(fused, ref):
        assert a.shape == (m.num_surfels, 32)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    w = torch.randn(m.num_surfels, 32, generator=torch.Generator().manual_seed(0))
    g_fused = torch.autograd.grad(sum((f * w).sum() * (k + 1) for k, f in enumerate(fused)),
                                  [g.table for g in m._grids()])
    g_ref = torch.autograd.grad(sum((f * w).sum() * (k + 1) for k, f in enumerate(ref)),
                                [g.table for g in m._grids()])
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_canonical_skinning_query_subset_and_cache(real):
    """Canonical skinning query (precomputed lookup) equals eq. 9 evaluated on the fly at
    the canonical centres; in training only a random subset of rows is recomputed (with
    gradient, written to the cache) and the others come from the cache (no gradient)."""
    _, _, setup = real
    torch.manual_seed(0)
    m = FMGSAvatar(setup.surfels, FullModelConfig(use_pose_correction=False, skinning_subset=0.1))
    sf = m.skinning_field
    with torch.no_grad():   # a non-trivial field (the zero output layer would give the prior)
        sf.grid.table.uniform_(-0.5, 0.5)
        for q in sf.mlp.parameters():
            q.normal_(0.0, 0.2)
    ref = sf(m.centers, prior_weights=m.skin_weights)                    # on-the-fly encoding
    full = m.skinning_weights(training=False)
    torch.testing.assert_close(full, ref, atol=1e-6, rtol=1e-5)
    assert not bool(m.skin_cache_valid)                                  # eval leaves the cache alone

    m.skinning_weights(training=True)                                    # first training call: all rows
    assert bool(m.skin_cache_valid)
    torch.testing.assert_close(m.skin_cache, ref.detach(), atol=1e-6, rtol=1e-5)
    with torch.no_grad():   # change the field: fresh rows now differ from the cache
        sf.mlp[-1].bias.add_(torch.linspace(-1, 1, 24))
    new = sf(m.centers, prior_weights=m.skin_weights).detach()
    old_cache = m.skin_cache.clone()
    W = m.skinning_weights(training=True, generator=torch.Generator().manual_seed(3))
    n = m.num_surfels
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(3))[: int(np.ceil(0.1 * n))]
    fresh = torch.zeros(n, dtype=torch.bool)
    fresh[rows] = True
    assert float((new - old_cache).abs().amax(1)[fresh].median()) > 1e-3   # the change is visible
    torch.testing.assert_close(W.detach()[fresh], new[fresh], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(W.detach()[~fresh], old_cache[~fresh], atol=0, rtol=0)
    torch.testing.assert_close(m.skin_cache[fresh], new[fresh], atol=1e-6, rtol=1e-5)   # cache refreshed there
    torch.testing.assert_close(m.skin_cache[~fresh], old_cache[~fresh], atol=0, rtol=0)
    r = torch.randn(n, 24, generator=torch.Generator().manual_seed(4))
    (g_W,) = torch.autograd.grad((W * r).sum(), [sf.mlp[-1].bias])
    W_ref = sf(m.centers[rows], prior_weights=m.skin_weights[rows])
    (g_ref,) = torch.autograd.grad((W_ref * r[rows]).sum(), [sf.mlp[-1].bias])
    torch.testing.assert_close(g_W, g_ref, atol=1e-5, rtol=1e-4)          # gradient from the subset only


def test_corrected_skinning_query_is_eq9_at_corrected_centres(real):
    """``skinning_query='corrected'``: W = F_w(mu') at the corrected centres it is given."""
    _, _, setup = real
    torch.manual_seed(0)
    m = FMGSAvatar(setup.surfels, FullModelConfig(use_pose_correction=False, skinning_query="corrected"))
    with torch.no_grad():
        m.skinning_field.grid.table.uniform_(-0.5, 0.5)
        m.skinning_field.mlp[-1].weight.normal_(0.0, 0.2)
    mu = m.centers + 0.01 * m.frames[:, :, 2]
    torch.testing.assert_close(m.skinning_weights(mu), m.skinning_field(mu, prior_weights=m.skin_weights))
    with pytest.raises(ValueError, match="mu_c"):
        m.skinning_weights(None)
    with pytest.raises(ValueError, match="skinning_query"):
        FMGSAvatar(setup.surfels, FullModelConfig(use_pose_correction=False, skinning_query="nearest"))


# --------------------------------------------------------------------------- Sec. 4.5 proofs
@pytest.fixture(scope="module")
def crop_scene(real):
    """The avatar (all fields on, skinning queried with mu'.detach()) and a 64x64 crop of
    the real 512x512 camera around the torso."""
    _, seq, setup = real
    fr = seq[1]
    K = np.asarray(fr.camera.K, np.float64) * np.array([[8.0], [8.0], [1.0]])  # 64 px -> 512 px intrinsics
    V = np.asarray(fr.camera.viewmat, np.float64)
    torch.manual_seed(0)
    model = FMGSAvatar(setup.surfels, FullModelConfig(num_frames=4, detach_skinning_query=True))
    J, c = _frame_inputs(setup, fr, model)
    with torch.no_grad():
        rot, B = pose_frame(fr.poses, None, None, setup.rest_joints, setup.canonical_G, fr.world_from_body)
        mu = model(rot, B, c, J).means.double().mean(0).numpy()
    xc = V[:3, :3] @ mu + V[:3, 3]
    uv = (K @ xc)[:2] / xc[2]
    K[0, 2] -= round(uv[0]) - CROP // 2
    K[1, 2] -= round(uv[1]) - CROP // 2 - 40  # a little above the centroid: the chest
    cam = types.SimpleNamespace(K=K, viewmat=V, width=CROP, height=CROP)
    # one render (pose correction of frame 1 in the graph) shared by all the proofs
    rot, B = pose_frame(fr.poses, 1, model.pose_correction, setup.rest_joints, setup.canonical_G,
                        fr.world_from_body)
    p = model(rot, B, c, J)
    out = render_posed(p, cam, backend="cpu")
    assert 0.3 < float((out.alpha > 0.5).float().mean()) < 0.95  # the crop sees the body and its edges
    losses = {g: _group_loss(g, out, K) for g in ("photometric", "depth", "normal", "semantic")}
    # the same semantic loss on logits composited with constant weights (semantic_weights_only)
    out_w = render_posed(p, cam, backend="cpu", extras_weights_only=True)
    losses["semantic_field"] = _group_loss("semantic", out_w, K)
    return {"model": model, "posed": p, "losses": losses, "extras": (out.extras, out_w.extras)}


def _group_loss(name, out, K):
    H, W = out.alpha.shape
    mask = out.alpha.detach() > 0.5
    if name == "depth":      # eq. 15-16 against a prior that reverses the rendered order
        return L.depth_ranking_loss(out.depth, -out.depth.detach(), mask, 2000,
                                    generator=torch.Generator().manual_seed(1))
    if name == "normal":     # eq. 17-18
        nd = L.normal_from_depth(out.depth, torch.as_tensor(K, dtype=out.depth.dtype))
        prior = torch.tensor([0.3, 0.0, -1.0]).expand(H, W, 3)
        return (L.normal_consistency_loss(out.normal, nd, mask) + L.normal_prior_loss(out.normal, prior, mask)
                + L.normal_tv_loss(out.normal, mask))
    if name == "semantic":   # eq. 19
        lab = torch.randint(0, 28, (H, W), generator=torch.Generator().manual_seed(2))
        return L.semantic_ce_loss(out.extras, lab, mask)
    target = torch.rand(H, W, 3, generator=torch.Generator().manual_seed(3))  # eq. 13-14
    return L.photometric_loss(out.rgb, target) + 0.1 * L.mask_bce_loss(out.alpha, mask.float())


def _grads(scene, groups, enabled, mode="fast"):
    """Coordinated backward of the shared render's ``groups`` (graph retained); returns the
    gradients of the geometry field's output rows (delta_d: 0, delta_s: 1-2, delta_r: 3-5),
    of the pose correction, opacities and the fields' output layers, and of all parameters."""
    model, p, losses = scene["model"], scene["posed"], scene["losses"]
    model.zero_grad(set_to_none=True)
    coordinated_backward(p.render_inputs(), {g: losses[g] for g in groups}, enabled=enabled, mode=mode,
                         retain_graph=True)

    def g(t):
        return torch.zeros(()) if t.grad is None else t.grad.detach().clone()

    w = g(model.geometry_field.mlp[-1].weight)
    return {"delta_d": w[0:1], "delta_s": w[1:3], "delta_r": w[3:6], "pose": g(model.pose_correction.delta),
            "opacity": g(model.opacity_logit), "color": g(model.appearance_field.mlp[-1].weight),
            "semantic": g(model.semantic_field.mlp[-1].weight),
            "skinning": g(model.skinning_field.mlp[-1].weight),
            "all": [g(q) for q in model.parameters()]}


def _nz(t):
    return bool(torch.count_nonzero(t) > 0)


@pytest.mark.parametrize("group,blocked_params,kept_params", [
    ("depth", ["delta_r"], ["delta_d", "delta_s", "pose", "skinning", "opacity"]),
    ("normal", ["delta_d"], ["delta_r", "delta_s", "pose", "skinning", "opacity"]),
    ("semantic", ["delta_d", "delta_r", "pose", "skinning"], ["delta_s", "opacity", "semantic"]),
])
def test_gradient_isolation_per_loss_group(crop_scene, group, blocked_params, kept_params):
    """Sec. 4.5 on a real render: depth -> rotations (delta_r), normal -> positions
    (delta_d), semantic -> both (and so the pose correction and skinning field, which act
    only through them) get exactly zero with the strategy on and non-zero with it off;
    the allowed parameters keep non-zero gradients either way."""
    on = _grads(crop_scene, [group], enabled=True)
    off = _grads(crop_scene, [group], enabled=False)
    for k in blocked_params:
        assert torch.count_nonzero(on[k]) == 0, f"{group} loss reached {k} with the strategy on"
        assert _nz(off[k]), f"{group} loss should reach {k} without the strategy"
    for k in kept_params:
        assert _nz(on[k]), f"{group} loss lost its gradient to {k}"


def test_semantic_weights_only_reaches_the_semantic_field_only(crop_scene):
    """``semantic_weights_only``: the rendered logits are the same numbers, the semantic
    loss's gradient w.r.t. the semantic field is the same as with the paper's rule, and
    nothing else of the model (geometry field, scales, opacities, pose, skinning, colour)
    receives any gradient -- with or without the coordinated backward."""
    a, b = crop_scene["extras"]
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    model = crop_scene["model"]
    ref = _grads(crop_scene, ["semantic"], enabled=True)
    for enabled in (True, False):
        got = _grads(crop_scene, ["semantic_field"], enabled=enabled)
        assert _nz(got["semantic"])
        torch.testing.assert_close(got["semantic"], ref["semantic"], atol=1e-7, rtol=1e-5)
        for k in ("delta_d", "delta_s", "delta_r", "pose", "skinning", "opacity", "color"):
            assert torch.count_nonzero(got[k]) == 0, k
        sem = {id(q) for q in [*model.semantic_field.parameters(), model.semantic_grid.table]}
        for q, gq in zip(model.parameters(), got["all"]):
            if id(q) not in sem:
                assert torch.count_nonzero(gq) == 0


def test_photometric_reaches_everything_and_strategy_variants_agree(crop_scene):
    """The photometric group is unrestricted (it reaches positions, rotations, scales,
    opacities, colours, pose correction and skinning); with all four groups the fast
    variant equals the per-group reference variant, and the strategy changes the summed
    gradient of the positions (delta_d) and rotations (delta_r) but not the colours'."""
    photo = _grads(crop_scene, ["photometric"], enabled=True)
    for k in ("delta_d", "delta_r", "delta_s", "pose", "opacity", "color", "skinning"):
        assert _nz(photo[k]), k
    groups = ["photometric", "depth", "normal", "semantic"]
    fast = _grads(crop_scene, groups, enabled=True, mode="fast")
    ref = _grads(crop_scene, groups, enabled=True, mode="reference")
    plain = _grads(crop_scene, groups, enabled=False)
    for a, b in zip(fast["all"], ref["all"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(fast["delta_d"], plain["delta_d"], atol=0, rtol=1e-3)
    assert not torch.allclose(fast["delta_r"], plain["delta_r"], atol=0, rtol=1e-3)
    torch.testing.assert_close(fast["color"], plain["color"], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(fast["semantic"], plain["semantic"], atol=1e-7, rtol=1e-5)


def test_coordinated_backward_on_a_toy_graph():
    """Exact bookkeeping on an analytic graph: blocked inputs receive nothing from their
    groups, unrestricted groups keep direct (non-render-input) paths, bad names raise."""
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    means, rotations, colors = a * 2, a * 3, a * 5      # three "render inputs" of one parameter
    depth = (means * rotations).sum()                   # d/da = 2*3*a*2 = 12a; via means 6a, rotations 6a
    sem = (colors * means).sum()                        # via colors 10a, via means 10a
    reg = (a ** 2).sum()                                # direct path, 2a
    inputs = {"means": means, "rotations": rotations, "colors": colors}
    coordinated_backward(inputs, {"depth": depth, "semantic": sem, "regularisers": reg})
    torch.testing.assert_close(a.grad, 6 * a.detach() + 10 * a.detach() + 2 * a.detach())
    a.grad = None
    means, rotations, colors = a * 2, a * 3, a * 5
    coordinated_backward({"means": means, "rotations": rotations, "colors": colors},
                         {"depth": (means * rotations).sum(), "semantic": (colors * means).sum(),
                          "regularisers": (a ** 2).sum()}, enabled=False)
    torch.testing.assert_close(a.grad, 12 * a.detach() + 20 * a.detach() + 2 * a.detach())
    assert BLOCKED["normal"] == {"means"}
    with pytest.raises(KeyError):
        coordinated_backward(inputs, {"dpeth": depth})


def test_knotted_pose_correction_from_the_run_config(real, zju377, smpl_path):
    """``model.full.pose_correction_every=8`` over 20 training frames: 4 knots, the model
    describes 20 frames and spacing 8 (what load_run rebuilds it from), and posing a
    training frame between knots uses the interpolated correction."""
    cfg, seq, setup = real
    from omegaconf import OmegaConf

    c2 = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["model.full.pose_correction_every=8"]))
    model = FMGSAvatar(setup.surfels, FullModelConfig.from_run_config(c2, num_frames=20))
    pc = model.pose_correction
    assert pc.delta.shape == (4, 24, 3)
    assert model.describe() == {"kind": "full", "num_frames": 20, "pose_correction_every": 8}
    with torch.no_grad():
        pc.delta[1, 5] = torch.tensor([0.2, 0.0, 0.0])
    fr = seq[0]
    rot, _ = pose_frame(fr.poses, 6, pc, setup.rest_joints, setup.canonical_G, fr.world_from_body,
                        dtype=torch.float64)
    expect = np.asarray(fr.poses, np.float64).reshape(24, 3)[5] + [0.2 * 6 / 8, 0.0, 0.0]  # knot 1 sits at frame 8
    from scipy.spatial.transform import Rotation

    np.testing.assert_allclose(rot[5].detach().numpy(), Rotation.from_rotvec(expect).as_matrix(), atol=1e-6)


def test_skinning_pose_noise_poses_a_training_frame_at_its_noised_pose(real):
    """``skinning_pose_noise_deg``: in training, :meth:`FMGSAvatar.pose` poses the frame at
    ``theta + N(0, sigma^2) + delta`` (the draw reproduced from the seed, posed independently
    through :func:`pose_frame`); held-out posing and ``sigma = 0`` stay at the fitted pose."""
    import dataclasses

    cfg, seq, setup = real
    base = FullModelConfig(use_skinning_field=False, num_frames=2, pose_noise_std=0.0)
    torch.manual_seed(0)
    noisy = FMGSAvatar(setup.surfels, dataclasses.replace(base, skinning_pose_noise_deg=2.0))
    clean = FMGSAvatar(setup.surfels, base)
    clean.load_state_dict(noisy.state_dict())
    with torch.no_grad():
        noisy.pose_correction.delta[1, 4] = torch.tensor([0.0, 0.1, 0.0])
        clean.pose_correction.delta.copy_(noisy.pose_correction.delta)
    fr = seq[1]
    J, c = _frame_inputs(setup, fr, noisy)
    with torch.no_grad():
        torch.manual_seed(7)
        a = noisy.pose(fr, setup, frame_id=1, training=True, semantic=False)
        torch.manual_seed(7)
        draw = torch.randn(72, dtype=torch.float64) * np.deg2rad(2.0)
        theta = torch.as_tensor(np.asarray(fr.poses, np.float64)) + draw
        rot, B = pose_frame(theta, 1, noisy.pose_correction, setup.rest_joints, setup.canonical_G,
                            fr.world_from_body)
        ref = noisy(rot, B, c, J, training=False, semantic=False)
        held = noisy.pose(fr, setup, frame_id=1, training=False, semantic=False)
        off = clean.pose(fr, setup, frame_id=1, training=True, semantic=False)
    torch.testing.assert_close(a.means, ref.means, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.rotations, ref.rotations, atol=1e-6, rtol=0)
    torch.testing.assert_close(off.means, held.means, atol=0, rtol=0)
    # a 2-degree draw moves the surfels by millimetres to centimetres, not nothing
    moved = (a.means - held.means).norm(dim=-1)
    assert 1e-3 < float(moved.mean()) < 0.1
