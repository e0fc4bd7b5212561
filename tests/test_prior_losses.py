"""Prior and regularisation losses (eq. 15-20, L_iso): hand-computed values, identities, gradients."""
from __future__ import annotations

import math

import pytest
import numpy as np
import torch
from scipy.spatial.transform import Rotation

from fmgs.trainer.losses.terms import (
    depth_ranking_loss,
    isometry_loss,
    knn_neighbour_pairs,
    normal_consistency_loss,
    normal_from_depth,
    normal_prior_loss,
    normal_tv_loss,
    semantic_ce_loss,
    semantic_feature_consistency,
)

f64 = torch.float64


# --------------------------------------------------------------------------- eq. 15-16
def test_depth_ranking_hand_computed_pairs():
    depth = torch.tensor([[1.0, 1.2], [0.9, 1.0]], dtype=f64)
    prior = torch.tensor([[5.0, 6.0], [4.0, 3.0]], dtype=f64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    pairs = torch.tensor([
        [0, 1],  # prior 5 < 6 -> I = -1; D diff -0.2 -> |tanh(-2) + 1| = 1 - tanh 2
        [1, 2],  # prior 6 > 4 -> I = +1; D diff +0.3 -> 1 - tanh 3
        [3, 0],  # prior 3 < 5 -> I = -1; D diff 0     -> |0 + 1| = 1 (wrong order costs)
        [0, 2],  # prior 5 > 4 -> I = +1; D diff +0.1 -> 1 - tanh 1
        [1, 1],  # same pixel: tie, skipped
    ])
    expected = ((1 - math.tanh(2)) + (1 - math.tanh(3)) + 1.0 + (1 - math.tanh(1))) / 4
    got = depth_ranking_loss(depth, prior, mask, 0, alpha=10.0, pairs=pairs)
    assert math.isclose(float(got), expected, rel_tol=1e-14)
    # scale / shift of the prior do not matter; a reversed depth costs more
    assert math.isclose(float(depth_ranking_loss(depth, 7 * prior + 3, mask, 0, pairs=pairs)), expected, rel_tol=1e-14)
    tie = torch.tensor([[2.0, 2.0], [2.0, 2.0]], dtype=f64)
    zero = depth_ranking_loss(depth.clone().requires_grad_(True), tie, mask, 0, pairs=pairs)
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_depth_ranking_random_pairs_stay_inside_the_mask():
    depth = torch.tensor([[1.0, 5.0, 1.0], [2.0, 9.0, 1.5]], dtype=f64)
    prior = torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 0.0]], dtype=f64)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    # the only valid pairs are (0, 2) and (2, 0): prior 1 < 3, depth 1.0 vs 1.0 -> loss exactly 1
    g = torch.Generator().manual_seed(0)
    assert float(depth_ranking_loss(depth, prior, mask, 64, generator=g)) == 1.0
    # ordered correctly and well separated: ~0
    d2 = depth.clone()
    d2[0, 2] = 3.0
    assert float(depth_ranking_loss(d2, prior, mask, 64, generator=g)) < 1e-15
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[1, 1] = True
    assert float(depth_ranking_loss(depth, prior, one, 64)) == 0.0


def test_depth_ranking_gradcheck():
    g = torch.Generator().manual_seed(1)
    depth = (torch.rand(4, 5, generator=g, dtype=f64) * 0.3 + 2.0).requires_grad_(True)
    prior = torch.rand(4, 5, generator=g, dtype=f64)
    pairs = torch.randint(0, 20, (30, 2), generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda d: depth_ranking_loss(d, prior, mask, 0, pairs=pairs), (depth,))


# --------------------------------------------------------------------------- normals
def intrinsics(fx=120.0, fy=110.0, cx=17.3, cy=14.1):
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=f64)


def plane_depth(n, x0, K, H, W, pixel_center=0.5):
    """z-depth of the plane n . (X - x0) = 0 seen through pixel centres."""
    v, u = torch.meshgrid(torch.arange(H, dtype=f64) + pixel_center, torch.arange(W, dtype=f64) + pixel_center, indexing="ij")
    rays = torch.stack([u, v, torch.ones_like(u)], -1) @ torch.linalg.inv(K).T  # r_z = 1
    return (n @ x0) / (rays @ n)


@pytest.mark.parametrize("pixel_center", [0.5, 0.0])
def test_normal_from_depth_of_a_tilted_plane(pixel_center):
    H, W = 30, 36
    K = intrinsics()
    n = torch.nn.functional.normalize(torch.tensor([0.3, -0.4, -1.0], dtype=f64), dim=0)  # faces the camera
    x0 = torch.tensor([0.05, -0.02, 2.0], dtype=f64)
    depth = plane_depth(n, x0, K, H, W, pixel_center)
    assert bool((depth > 0).all())
    N = normal_from_depth(depth, K, pixel_center=pixel_center)
    assert N.shape == (H, W, 3) and N.dtype == f64
    assert torch.allclose(N[1:-1, 1:-1], n.expand(H - 2, W - 2, 3), atol=1e-10)
    for border in (N[0], N[-1], N[:, 0], N[:, -1]):
        assert torch.equal(border, torch.zeros_like(border))
    # the same plane described with the opposite normal still gives the camera-facing one
    assert torch.allclose(normal_from_depth(plane_depth(-n, x0, K, H, W, pixel_center), K, pixel_center)[1:-1, 1:-1],
                          n.expand(H - 2, W - 2, 3), atol=1e-10)
    # a fronto-parallel plane: (0, 0, -1) everywhere inside
    Nf = normal_from_depth(torch.full((H, W), 3.0, dtype=f64), K, pixel_center)
    assert torch.allclose(Nf[1:-1, 1:-1], torch.tensor([0.0, 0.0, -1.0], dtype=f64).expand(H - 2, W - 2, 3), atol=1e-14)


def test_normal_from_depth_agrees_with_the_rasteriser():
    """Rendered depth of one large tilted surfel -> normal_from_depth == rendered normal
    (checks the pixel-centre and camera-facing conventions against trainer/render/dispatch.py)."""
    from fmgs.trainer.render.dispatch import rasterize_surfels

    H = W = 24
    K = torch.tensor([[30.0, 0.0, 12.0], [0.0, 30.0, 12.0], [0.0, 0.0, 1.0]], dtype=f64)
    R = torch.as_tensor(Rotation.from_euler("xy", [25.0, -35.0], degrees=True).as_matrix()).unsqueeze(0)
    out = rasterize_surfels(torch.tensor([[0.05, -0.03, 2.0]], dtype=f64), R, torch.tensor([[50.0, 50.0]], dtype=f64),
                            torch.ones(1, dtype=f64), torch.ones(1, 3, dtype=f64), K, torch.eye(4, dtype=f64), W, H,
                            backend="cpu")
    assert bool((out.alpha > 0.9).all())
    Nd = normal_from_depth(out.depth, K)[1:-1, 1:-1]
    Nr = torch.nn.functional.normalize(out.normal, dim=-1)[1:-1, 1:-1]
    assert torch.allclose(Nd, Nr, atol=1e-9)
    assert float(normal_consistency_loss(Nr, Nd)) < 1e-8


def test_normal_from_depth_gradcheck():
    g = torch.Generator().manual_seed(0)
    depth = (2.0 + 0.1 * torch.rand(5, 6, generator=g, dtype=f64)).requires_grad_(True)
    K = intrinsics(cx=3.0, cy=2.5)
    assert torch.autograd.gradcheck(lambda d: normal_from_depth(d, K), (depth,))


def test_normal_consistency_loss_hand_computed():
    # 4 x 4 image -> the 2 x 2 interior has depth normals, the border is excluded
    N = torch.zeros(4, 4, 3, dtype=f64)
    N[..., 2] = -1.0
    Nh = torch.zeros(4, 4, 3, dtype=f64)
    Nh[1:3, 1:3] = torch.tensor([0.0, 0.0, -1.0], dtype=f64)
    Nh[1, 1] = torch.tensor([0.0, 0.6, -0.8], dtype=f64)  # |N - Nh|_1 = 0.6 + 0.2 = 0.8
    Nh[2, 2] = torch.tensor([-1.0, 0.0, 0.0], dtype=f64)  # 1 + 1 = 2
    assert math.isclose(float(normal_consistency_loss(N, Nh)), (0.8 + 0 + 0 + 2.0) / 4, rel_tol=1e-14)
    w = torch.zeros(4, 4, dtype=f64)
    w[1, 1], w[2, 2], w[1, 2] = 0.5, 0.25, 1.0
    w[0, 0] = 1.0  # border: ignored (no depth normal)
    assert math.isclose(float(normal_consistency_loss(N, Nh, w)), (0.5 * 0.8 + 0.25 * 2.0) / 1.75, rel_tol=1e-14)
    Np = N.clone().requires_grad_(True)
    normal_consistency_loss(Np, Nh, w).backward()
    assert Np.grad[0, 0].abs().sum() == 0 and Np.grad[1, 1].abs().sum() > 0


def test_normal_prior_loss_is_one_minus_cosine():
    N = torch.tensor([[[0.0, 0.0, -2.0], [0.0, 0.0, -1.0], [0.0, 0.5, 0.0]]], dtype=f64)  # (1, 3, 3)
    P = torch.tensor([[[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]], dtype=f64)
    # cos: 1, 0, -1 -> losses 0, 1, 2
    assert math.isclose(float(normal_prior_loss(N, P)), 1.0, rel_tol=1e-14)
    m = torch.tensor([[True, False, True]])
    assert math.isclose(float(normal_prior_loss(N, P, m)), 1.0, rel_tol=1e-14)
    m2 = torch.tensor([[True, True, False]])
    assert math.isclose(float(normal_prior_loss(N, P, m2)), 0.5, rel_tol=1e-14)


def test_normal_tv_loss_known_pattern():
    a = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]], dtype=f64)
    img = a[..., None]
    # horizontal |1-0| + |3-1| + 0 + 0 = 3; vertical |2-0| + |2-1| + |2-3| = 4
    assert float(normal_tv_loss(img, reduction="sum")) == 7.0
    assert float(normal_tv_loss(img)) == 1.0  # 7 / (4 + 3) neighbour pairs
    two = torch.stack([a, 2 * a], -1)
    assert float(normal_tv_loss(two, reduction="sum")) == 21.0
    m = torch.tensor([[True, True, False], [True, True, True]])
    # horizontal: (0,0)-(0,1): 1; row 1: 0 + 0 -> 1 over 3 pairs; vertical cols 0, 1: 2 + 1 over 2 pairs
    assert float(normal_tv_loss(img, m, reduction="sum")) == 4.0
    assert math.isclose(float(normal_tv_loss(img, m)), 4.0 / 5.0, rel_tol=1e-15)
    assert float(normal_tv_loss(torch.ones(5, 4, 3))) == 0.0


# --------------------------------------------------------------------------- eq. 19
def test_semantic_ce_matches_manual_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 28, generator=g, dtype=f64) * 3
    labels = torch.randint(0, 28, (3, 4), generator=g)
    logp = logits - torch.logsumexp(logits, -1, keepdim=True)
    nll = -logp.gather(-1, labels[..., None])[..., 0]
    assert math.isclose(float(semantic_ce_loss(logits, labels)), float(nll.mean()), rel_tol=1e-13)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = True
    assert math.isclose(float(semantic_ce_loss(logits, labels, mask)), float(nll[mask].mean()), rel_tol=1e-13)
    lab2 = labels.clone()
    lab2[0, 1] = -100
    assert math.isclose(float(semantic_ce_loss(logits, lab2, mask)), float(nll[2, 3]), rel_tol=1e-13)
    # a one-pixel exact value: logits (0, log 3) with label 0 -> -log(1/4) = log 4
    one = torch.tensor([[[0.0, math.log(3.0)]]], dtype=f64)
    assert math.isclose(float(semantic_ce_loss(one, torch.tensor([[0]]))), math.log(4.0), rel_tol=1e-14)


# --------------------------------------------------------------------------- eq. 20
def brute_force_eq20(f, labels, normalization):
    terms = []
    for c in labels[labels >= 0].unique():
        G = f[labels == c]
        n = G.shape[0]
        pair_sum = ((G[:, None, :] - G[None, :, :]) ** 2).sum()  # ordered pairs i, j in G_c
        terms.append(pair_sum / (n if normalization == "paper" else n * n))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("normalization", ["paper", "pairs"])
def test_semantic_feature_consistency_vs_brute_force(normalization):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(60, 5, generator=g, dtype=f64) + 3.0
    labels = torch.randint(0, 4, (60,), generator=g)
    labels[7] = 9  # a singleton class (contributes 0 but counts in |C|)
    labels[:3] = -1  # ignored
    got = semantic_feature_consistency(f, labels, normalization=normalization)
    assert math.isclose(float(got), float(brute_force_eq20(f, labels, normalization)), rel_tol=1e-12)
    # tiny exact case: one class {0, 2} in 1-D: pairs (0,2),(2,0) -> 4 + 4 = 8; paper /2 = 4, pairs /4 = 2
    tiny = semantic_feature_consistency(torch.tensor([[0.0], [2.0]], dtype=f64), torch.tensor([0, 0]),
                                        normalization=normalization)
    assert float(tiny) == (4.0 if normalization == "paper" else 2.0)
    fp = f.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: semantic_feature_consistency(x, labels, normalization=normalization), (fp,))


def test_semantic_feature_consistency_subsampling():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(40, 3, generator=g, dtype=f64)
    labels = torch.randint(0, 3, (40,), generator=g)
    full = semantic_feature_consistency(f, labels)
    assert float(semantic_feature_consistency(f, labels, max_per_class=40)) == pytest.approx(float(full), rel=1e-14)
    assert float(semantic_feature_consistency(f, labels, max_per_class=1)) == 0.0
    fp = f.clone().requires_grad_(True)
    semantic_feature_consistency(fp, labels, max_per_class=2, generator=torch.Generator().manual_seed(3)).backward()
    used = fp.grad.abs().sum(-1) > 0
    for c in range(3):
        assert int(used[labels == c].sum()) == 2


# --------------------------------------------------------------------------- isometry
def test_isometry_zero_under_rigid_motion_positive_under_stretch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=g, dtype=f64)
    pairs = knn_neighbour_pairs(x, k=4)
    assert pairs.shape == (1200, 2) and bool((pairs[:, 0] != pairs[:, 1]).all())
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    assert torch.equal(pairs.view(300, 4, 2)[:, 0, 1], d.argmin(1))  # first neighbour is the nearest
    R = torch.as_tensor(Rotation.random(random_state=1).as_matrix())
    moved = x @ R.T + torch.tensor([0.3, -1.0, 2.0], dtype=f64)
    assert float(isometry_loss(x, moved, pairs)) < 1e-14
    stretched = moved * torch.tensor([1.1, 1.0, 1.0], dtype=f64)
    assert float(isometry_loss(x, stretched, pairs)) > 1e-3
    # hand value: points on a line 0, 1, 3; stretched x2 -> |2 - 1| and |4 - 2| -> mean 1.5
    line = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [3.0, 0, 0]], dtype=f64)
    p = torch.tensor([[0, 1], [1, 2]])
    assert float(isometry_loss(line, 2 * line, p)) == 1.5
    xp = stretched.clone().requires_grad_(True)
    isometry_loss(x, xp, pairs).backward()
    assert bool(torch.isfinite(xp.grad).all()) and xp.grad.abs().sum() > 0


def test_normal_group_on_the_foreground_crop_equals_full_image():
    """objectives.normal_group_loss(crop=True) evaluates L_sn + L_n + L_tv on the mask's
    bounding box (+2 px, principal point shifted): same value and gradients as the full
    image, float64, with NaN prior values and a mask touching nothing but the middle."""
    from fmgs.config import load_config
    from fmgs.trainer.losses.objectives import normal_group_loss

    cfg = load_config(None, ["loss.lambda_normal_consistency=0.05", "loss.lambda_normal_prior=0.05",
                             "loss.lambda_normal_tv=0.01"])
    g = torch.Generator().manual_seed(0)
    H, W = 40, 56
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    depth = (2.0 + 0.01 * xx + 0.02 * torch.sin(yy / 4) + 0.002 * torch.rand(H, W, generator=g,
                                                                        dtype=torch.float64)).requires_grad_(True)
    normal = torch.randn(H, W, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    inside = ((yy - 20) ** 2 / 100 + (xx - 30) ** 2 / 150) < 1
    prior = torch.nn.functional.normalize(torch.randn(H, W, 3, generator=g, dtype=torch.float64), dim=-1).numpy()
    prior[18:22, 25:28] = np.nan
    K = torch.tensor([[60.0, 0, 27.5], [0, 62.0, 19.0], [0, 0, 1]], dtype=torch.float64)
    vals, grads = [], []
    for crop in (False, True):
        v = normal_group_loss(cfg, depth, normal, K, inside, prior, 1.0, 0, crop=crop)
        vals.append(v.detach())
        grads.append(torch.autograd.grad(v, (depth, normal)))
    torch.testing.assert_close(vals[1], vals[0], atol=1e-13, rtol=0)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=0)
    assert float(vals[0]) > 0
