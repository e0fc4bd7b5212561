"""Tests of the surfel rasteriser (fmgs.trainer.render.dispatch and its back-ends).

References used here are independent of the implementation under test:
* a brute-force float64 NumPy renderer (all surfels x all pixels, explicit ray-plane
  intersection, explicit per-pixel front-to-back Python loop);
* finite differences (torch.autograd.gradcheck, float64);
* closed-form single-surfel values.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fmgs.trainer.render import cpu as raster_cpu
from fmgs.trainer.render.dispatch import RenderOutput, rasterize_surfels, resolve_backend

DT = torch.float64


# --------------------------------------------------------------------------- helpers
def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """(N, 4) wxyz (any norm) -> (N, 3, 3) rotation matrices (columns = rotated axes)."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(-1, 3, 3)


def random_scene(n, seed, *, depth=(1.5, 3.0), spread=0.6, scale=(0.04, 0.15),
                 opac=(0.2, 1.0), n_extra=2):
    g = torch.Generator().manual_seed(seed)
    z = depth[0] + (depth[1] - depth[0]) * torch.rand(n, generator=g, dtype=DT)
    xy = (torch.rand(n, 2, generator=g, dtype=DT) * 2 - 1) * spread * z[:, None] / 2
    means = torch.cat([xy, z[:, None]], 1)
    quats = torch.randn(n, 4, generator=g, dtype=DT)
    scales = scale[0] + (scale[1] - scale[0]) * torch.rand(n, 2, generator=g, dtype=DT)
    opacities = opac[0] + (opac[1] - opac[0]) * torch.rand(n, generator=g, dtype=DT)
    colors = torch.rand(n, 3, generator=g, dtype=DT)
    extras = torch.randn(n, n_extra, generator=g, dtype=DT) if n_extra else None
    return means, quats, scales, opacities, colors, extras


def camera(width, height, f, seed=None):
    K = torch.tensor([[f, 0.0, width / 2 + 0.3], [0.0, f * 1.05, height / 2 - 0.2],
                      [0.0, 0.0, 1.0]], dtype=DT)
    V = torch.eye(4, dtype=DT)
    if seed is not None:  # a mild world->camera rotation + translation
        g = torch.Generator().manual_seed(seed)
        a = 0.2 * torch.randn(3, generator=g, dtype=DT)
        Rq = quat_to_matrix(torch.cat([torch.ones(1, dtype=DT), a / 2])[None])[0]
        V[:3, :3] = Rq
        V[:3, 3] = 0.05 * torch.randn(3, generator=g, dtype=DT)
        # express the scene (built in camera coordinates) in world coordinates below
    return K, V


def to_world(means, R, V):
    """Scene built in camera coordinates -> world coordinates for extrinsics V."""
    Rc, t = V[:3, :3], V[:3, 3]
    return (means - t) @ Rc, Rc.T @ R


def brute_force(means, R, scales, opac, colors, extras, K, V, W, H, near=0.01, bg=None,
                max_fragments=None):
    """Independent float64 reference: explicit per-pixel front-to-back loop."""
    means, R, scales, opac, colors, K, V = (np.asarray(a.detach(), np.float64) for a in
                                            (means, R, scales, opac, colors, K, V))
    ex = None if extras is None else np.asarray(extras.detach(), np.float64)
    Rc, t = V[:3, :3], V[:3, 3]
    p = means @ Rc.T + t
    axes = np.einsum("ij,njk->nik", Rc, R)
    tu, tv, n = axes[:, :, 0], axes[:, :, 1], axes[:, :, 2]
    n = np.where(((n * p).sum(1) > 0)[:, None], -n, n)      # face the camera
    m2 = (p @ K.T)[:, :2] / p[:, 2:3]
    order = [i for i in np.argsort(p[:, 2], kind="stable") if p[i, 2] >= near]
    Kinv = np.linalg.inv(K)
    E = 0 if ex is None else ex.shape[1]
    out = {k: np.zeros((H, W) + s) for k, s in
           [("rgb", (3,)), ("alpha", ()), ("dacc", ()), ("median", ()), ("normal", (3,)),
            ("extras", (E,))]}
    n_stop = 0
    for i in range(H):
        for j in range(W):
            pix = np.array([j + 0.5, i + 0.5])
            d = Kinv @ np.array([pix[0], pix[1], 1.0])
            T = 1.0
            n_used = 0
            for s in order:
                nd = n[s] @ d
                rho3, zint = math.inf, None
                if nd < -1e-9:      # ray hits the plane in front of the camera
                    tt = (n[s] @ p[s]) / nd
                    X = tt * d
                    u = tu[s] @ (X - p[s]) / scales[s, 0]
                    v = tv[s] @ (X - p[s]) / scales[s, 1]
                    rho3, zint = u * u + v * v, X[2]
                rho2 = 2.0 * np.sum((pix - m2[s]) ** 2)
                if rho3 <= rho2:
                    rho, z = rho3, zint
                else:
                    rho, z = rho2, p[s, 2]
                a = min(0.99, opac[s] * math.exp(-0.5 * rho))
                if a < 1.0 / 255.0:
                    continue
                if max_fragments is not None and n_used >= max_fragments:
                    break
                n_used += 1
                if T * (1 - a) < 1e-4:
                    n_stop += 1
                    break
                w = a * T
                out["rgb"][i, j] += w * colors[s]
                out["normal"][i, j] += w * n[s]
                if E:
                    out["extras"][i, j] += w * ex[s]
                out["alpha"][i, j] += w
                out["dacc"][i, j] += w * z
                if T * (1 - a) < 0.5 and out["median"][i, j] == 0 and T >= 0.5:
                    out["median"][i, j] = z
                T *= 1 - a
    if bg is not None:
        out["rgb"] += (1 - out["alpha"])[..., None] * np.asarray(bg, np.float64)
    out["depth"] = out["dacc"] / np.maximum(out["alpha"], 1e-6)
    out["n_stop"] = n_stop
    return out


# --------------------------------------------------------------------------- tests
def test_matches_brute_force_reference():
    """~50 random surfels at 32x24, rotated camera, clamps + early stop exercised."""
    W, H = 32, 24
    means, quats, scales, opac, colors, extras = random_scene(50, seed=1, opac=(0.3, 1.0))
    K, V = camera(W, H, f=30.0, seed=3)
    R = quat_to_matrix(quats)
    R[0] = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=DT)  # nearly edge-on
    # a stack of four large near-opaque fronto-parallel surfels: clamp 0.99 + early stop
    for k, o in enumerate([1.0, 0.97, 0.95, 0.9]):
        i = 1 + k
        means[i] = torch.tensor([0.1 + 0.02 * k, -0.05, 1.6 + 0.1 * k], dtype=DT)
        R[i] = torch.eye(3, dtype=DT)
        scales[i] = torch.tensor([0.12, 0.09], dtype=DT)
        opac[i] = o
    mw, Rw = to_world(means, R, V)
    bg = torch.tensor([0.1, 0.2, 0.3], dtype=DT)
    out = rasterize_surfels(mw, Rw, scales, opac, colors, K, V, W, H, extras=extras,
                            background=bg, backend="cpu")
    ref = brute_force(mw, Rw, scales, opac, colors, extras, K, V, W, H, bg=bg)
    assert ref["n_stop"] > 0, "scene should exercise the 1e-4 early stop"
    assert (ref["alpha"] > 0).mean() > 0.5
    assert (ref["median"] > 0).sum() > 50
    for name, got, want in [("rgb", out.rgb, ref["rgb"]), ("alpha", out.alpha, ref["alpha"]),
                            ("depth", out.depth, ref["depth"]),
                            ("depth_acc", out.depth_acc, ref["dacc"]),
                            ("depth_median", out.depth_median, ref["median"]),
                            ("normal", out.normal, ref["normal"]),
                            ("extras", out.extras, ref["extras"])]:
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=0, atol=1e-6, err_msg=name)


def test_small_surfels_filter_and_max_fragments_match_reference():
    """Sub-pixel surfels (2D low-pass filter active) and the per-pixel fragment cap."""
    W, H = 20, 16
    means, quats, scales, opac, colors, _ = random_scene(60, seed=5, scale=(0.002, 0.03),
                                                         n_extra=0, spread=0.5)
    K, V = camera(W, H, f=22.0)
    R = quat_to_matrix(quats)
    for cap in (None, 2):
        out = rasterize_surfels(means, R, scales, opac, colors, K, V, W, H, backend="cpu",
                                max_fragments=cap)
        ref = brute_force(means, R, scales, opac, colors, None, K, V, W, H, max_fragments=cap)
        assert out.extras is None
        np.testing.assert_allclose(out.rgb.numpy(), ref["rgb"], atol=1e-6)
        np.testing.assert_allclose(out.alpha.numpy(), ref["alpha"], atol=1e-6)
        np.testing.assert_allclose(out.depth.numpy(), ref["depth"], atol=1e-6)
        np.testing.assert_allclose(out.depth_median.numpy(), ref["median"], atol=1e-6)
        np.testing.assert_allclose(out.normal.numpy(), ref["normal"], atol=1e-6)


def test_float32_close_to_float64():
    W, H = 32, 24
    means, quats, scales, opac, colors, extras = random_scene(50, seed=7)
    K, V = camera(W, H, f=30.0)
    R = quat_to_matrix(quats)
    o64 = rasterize_surfels(means, R, scales, opac, colors, K, V, W, H, extras=extras)
    f = lambda t: t.float()  # noqa: E731
    o32 = rasterize_surfels(f(means), f(R), f(scales), f(opac), f(colors), f(K), f(V), W, H,
                            extras=f(extras))
    assert o32.rgb.dtype == torch.float32
    np.testing.assert_allclose(o32.rgb.double().numpy(), o64.rgb.numpy(), atol=2e-4)
    np.testing.assert_allclose(o32.depth.double().numpy(), o64.depth.numpy(), atol=2e-3)


def test_single_frontoparallel_surfel_closed_form():
    """One surfel facing the camera: alpha = o exp(-rho/2) by hand, depth z, normal -z."""
    W, H, f, z, s, o = 32, 24, 40.0, 2.0, 0.05, 0.8
    K = torch.tensor([[f, 0, 16.0], [0, f, 12.0], [0, 0, 1]], dtype=DT)
    out = rasterize_surfels(torch.tensor([[0.0, 0.0, z]], dtype=DT), torch.eye(3, dtype=DT)[None],
                            torch.tensor([[s, s]], dtype=DT), torch.tensor([o], dtype=DT),
                            torch.tensor([[1.0, 0.5, 0.25]], dtype=DT), K,
                            torch.eye(4, dtype=DT), W, H)
    # pixel (12, 16) centre (16.5, 12.5) is 0.5 px from the projected centre in x and y:
    # u = v = 0.5 / f * z / s = 0.5  ->  rho3d = 0.5 ; rho2d = 2 * 0.5 = 1.0 -> rho = 0.5
    a = o * math.exp(-0.25)
    assert out.alpha[12, 16].item() == pytest.approx(a, abs=1e-12)
    assert out.rgb[12, 16].tolist() == pytest.approx([a, a * 0.5, a * 0.25], abs=1e-12)
    assert out.depth[12, 16].item() == pytest.approx(z, abs=1e-12)
    assert out.depth_median[12, 16].item() == pytest.approx(z, abs=1e-12)   # T = 1 - a < 0.5
    assert out.normal[12, 16].tolist() == pytest.approx([0, 0, -a], abs=1e-12)
    # a pixel 3 px right: u = 3.5/f*z/s = 3.5 -> rho3d = 3.5^2 + 0.5^2 = 12.5 ; rho2d = 25
    a2 = o * math.exp(-12.5 / 2)
    assert a2 < 1 / 255 and out.alpha[12, 19].item() == 0.0
    a1 = o * math.exp(-(2.5 ** 2 + 0.25) / 2)         # 2 px right: kept (>= 1/255)
    assert out.alpha[12, 18].item() == pytest.approx(a1, abs=1e-12)
    # rendered normal of a surfel whose input normal points at the camera is flipped too
    out2 = rasterize_surfels(torch.tensor([[0.0, 0.0, z]], dtype=DT),
                             torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=DT))[None],
                             torch.tensor([[s, s]], dtype=DT), torch.tensor([o], dtype=DT),
                             torch.ones(1, 3, dtype=DT), K, torch.eye(4, dtype=DT), W, H)
    assert out2.normal[12, 16].tolist() == pytest.approx([0, 0, -a], abs=1e-12)


@pytest.mark.parametrize("flip", [False, True])
def test_occlusion_order_independent_of_input_order(flip):
    K = torch.tensor([[40.0, 0, 16.0], [0, 40.0, 12.0], [0, 0, 1]], dtype=DT)
    means = torch.tensor([[0.0, 0.0, 2.0], [0.01, 0.0, 3.0]], dtype=DT)     # red in front
    colors = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=DT)
    scales = torch.tensor([[0.1, 0.1], [0.15, 0.15]], dtype=DT)
    opac = torch.tensor([0.98, 0.98], dtype=DT)
    R = torch.eye(3, dtype=DT).expand(2, 3, 3).clone()
    idx = [1, 0] if flip else [0, 1]
    out = rasterize_surfels(means[idx], R[idx], scales[idx], opac[idx], colors[idx], K,
                            torch.eye(4, dtype=DT), 32, 24)
    c = out.rgb[12, 16]
    # closed form at pixel centre (16.5, 12.5): front (red) weight a1, back (green) (1-a1) a2
    a1 = 0.98 * math.exp(-0.5 * 2 * (0.5 / 40 * 2.0 / 0.1) ** 2)
    u2, v2 = (0.5 / 40 * 3.0 - 0.01) / 0.15, 0.5 / 40 * 3.0 / 0.15
    a2 = 0.98 * math.exp(-0.5 * (u2 ** 2 + v2 ** 2))
    assert c.tolist() == pytest.approx([a1, (1 - a1) * a2, 0.0], abs=1e-12)
    assert c[0] > 10 * c[1]
    assert out.depth_median[12, 16].item() == pytest.approx(2.0, abs=1e-9)


def _gradcheck_scene(small: bool):
    W, H = 12, 10
    if small:   # sub-pixel surfels: the 2D low-pass filter term is active
        scene = random_scene(8, seed=11, scale=(0.01, 0.03), opac=(0.3, 0.8), depth=(2.0, 2.5),
                             spread=0.45)
    else:       # large surfels: 3D (ray-plane) term everywhere
        scene = random_scene(7, seed=12, scale=(0.15, 0.3), opac=(0.3, 0.8), depth=(2.0, 3.0),
                             spread=0.5)
    K, V = camera(W, H, f=14.0 if small else 10.0, seed=4)
    return scene, K, V, W, H


@pytest.mark.parametrize("small", [False, True])
def test_gradcheck_all_inputs(small):
    """Finite-difference check of the analytic backward (float64).

    Opacities < 0.8 (no 0.99 clamp) and few layers (transmittance never reaches 1e-4);
    random continuous inputs make it improbable that a sample sits on a kink of
    min(rho3d, rho2d), the 1/255 cut or the 0.5 median switch.
    """
    (means, quats, scales, opac, colors, extras), K, V, W, H = _gradcheck_scene(small)
    mw, _ = to_world(means, torch.eye(3, dtype=DT).expand(len(means), 3, 3), V)
    Rc = V[:3, :3]

    g = torch.Generator().manual_seed(0)
    proj = [torch.randn(k, generator=g, dtype=DT) for k in (3, 3, extras.shape[1])]

    def render(m, q, s, o, c, e):
        R = Rc.T @ quat_to_matrix(q)
        out = rasterize_surfels(m, R, s, o, c, K, V, W, H, extras=e, backend="cpu")
        # multi-channel images contracted with fixed random weights (fewer Jacobian rows,
        # every channel still checked)
        return (out.rgb @ proj[0], out.alpha, out.depth, out.depth_median,
                out.normal @ proj[1], out.extras @ proj[2])

    inputs = tuple(t.clone().requires_grad_(True) for t in (mw, quats, scales, opac, colors, extras))
    out = render(*inputs)
    assert out[1].gt(0).sum() > 40 and out[3].gt(0).sum() > 5
    if not small:
        assert float(out[1].detach().max()) < 0.99
        assert float(out[1].detach().max()) > 0.5
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("used", [("normal", "depth"), ("extras",), ("rgb", "extras")])
def test_gradcheck_subsets_of_outputs(used):
    """Losses that read only some feature chunks (the backward skips the others' columns,
    as the coordinated depth / normal / semantic groups do): finite differences of the
    used outputs alone, float64."""
    (means, quats, scales, opac, colors, extras), K, V, W, H = _gradcheck_scene(False)
    mw, _ = to_world(means, torch.eye(3, dtype=DT).expand(len(means), 3, 3), V)
    Rc = V[:3, :3]
    g = torch.Generator().manual_seed(1)
    proj = {"rgb": torch.randn(3, generator=g, dtype=DT), "normal": torch.randn(3, generator=g, dtype=DT),
            "extras": torch.randn(extras.shape[1], generator=g, dtype=DT)}

    def render(m, q, s, o, c, e):
        out = rasterize_surfels(m, Rc.T @ quat_to_matrix(q), s, o, c, K, V, W, H, extras=e, backend="cpu")
        return tuple(out.depth if k == "depth" else getattr(out, k) @ proj[k] for k in used)

    inputs = tuple(t.clone().requires_grad_(True) for t in (mw, quats, scales, opac, colors, extras))
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradients_flow_to_all_inputs_float32():
    W, H = 32, 24
    means, quats, scales, opac, colors, extras = (t.float() for t in random_scene(30, seed=2))
    K, V = (t.float() for t in camera(W, H, f=30.0))
    leaves = [t.clone().requires_grad_(True) for t in (means, quats, scales, opac, colors, extras)]
    out = rasterize_surfels(leaves[0], quat_to_matrix(leaves[1]), *leaves[2:5], K, V, W, H,
                            extras=leaves[5])
    loss = (out.rgb.sum() + out.depth.sum() + out.normal.sum() + out.extras.sum()
            + out.depth_median.sum())
    loss.backward()
    for t in leaves:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_culling_empty_and_validation():
    K = torch.tensor([[40.0, 0, 16.0], [0, 40.0, 12.0], [0, 0, 1]], dtype=DT)
    V = torch.eye(4, dtype=DT)
    one = dict(rotations=torch.eye(3, dtype=DT)[None], scales=torch.full((1, 2), 0.1, dtype=DT),
               opacities=torch.tensor([0.9], dtype=DT), colors=torch.ones(1, 3, dtype=DT))
    behind = rasterize_surfels(torch.tensor([[0, 0, -2.0]], dtype=DT), K=K, viewmat=V, width=32,
                               height=24, background=torch.ones(3, dtype=DT), **one)
    assert isinstance(behind, RenderOutput)
    assert behind.alpha.abs().sum() == 0 and torch.all(behind.rgb == 1)
    assert behind.depth_median.abs().sum() == 0
    with pytest.raises(ValueError, match="means"):
        rasterize_surfels(torch.zeros(1, 2, dtype=DT), K=K, viewmat=V, width=32, height=24, **one)
    with pytest.raises(ValueError, match="backend"):
        rasterize_surfels(torch.tensor([[0, 0, 2.0]], dtype=DT), K=K, viewmat=V, width=32,
                          height=24, backend="opengl", **one)
    with pytest.raises(ValueError, match="K must"):
        rasterize_surfels(torch.tensor([[0, 0, 2.0]], dtype=DT), K=K.T.contiguous(), viewmat=V,
                          width=32, height=24, **one)


def test_backend_choice():
    assert resolve_backend("cpu") == "cpu"
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_backend("gsplat")
        one = (torch.tensor([[0, 0, 2.0]]), torch.eye(3)[None], torch.full((1, 2), 0.1),
               torch.tensor([0.9]), torch.ones(1, 3),
               torch.tensor([[40.0, 0, 16.0], [0, 40.0, 12.0], [0, 0, 1]]), torch.eye(4))
        with pytest.raises(RuntimeError, match="CUDA"):
            rasterize_surfels(*one, 32, 24, backend="gsplat")


def test_box_bounds_are_conservative_and_tight():
    """Every fragment with alpha >= 1/255 lies inside its surfel's box (brute force)."""
    W, H = 40, 30
    means, quats, scales, opac, colors, _ = random_scene(40, seed=9, n_extra=0,
                                                         scale=(0.01, 0.2))
    K, V = camera(W, H, f=35.0)
    R = quat_to_matrix(quats)
    t = raster_cpu.surfel_camera_terms(means, R, scales, K, V)
    x0, y0, bw, bh = raster_cpu._surfel_boxes(t["p"], t["tu"], t["tv"], scales, t["mean2d"],
                                              opac, K, W, H)
    sid = torch.arange(40).repeat_interleave(W * H)
    pix = torch.arange(W * H).repeat(40)
    x = (pix % W).double() + 0.5
    y = (pix // W).double() + 0.5
    P = torch.cat([t["M"].reshape(-1, 9), t["b"][:, None], t["mean2d"], t["zc"][:, None],
                   opac[:, None]], 1).t().contiguous()
    *_, ar, _, _ = raster_cpu._eval_fragments(P, sid, x, y)
    hit = ar >= 1 / 255
    col, row = pix % W, pix // W
    inside = (col >= x0[sid]) & (col < x0[sid] + bw[sid]) & (row >= y0[sid]) & (row < y0[sid] + bh[sid])
    assert hit.sum() > 500
    assert bool((inside | ~hit).all())
    assert float(hit.sum()) / float(inside.sum()) > 0.5      # boxes are not wasteful


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gsplat_parity():
    """CPU vs gsplat on CUDA. Differences documented in fmgs.trainer.render.gsplat: gsplat's fragment
    depth is the centre depth (compare with loose depth tolerance), alpha clamp 0.999
    (opacities kept < 0.9 here), world-space normals (converted by the adapter)."""
    pytest.importorskip("gsplat")
    W, H = 64, 48
    means, quats, scales, opac, colors, extras = (t.float() for t in
                                                 random_scene(200, seed=21, opac=(0.2, 0.85),
                                                              scale=(0.02, 0.06)))
    K, V = (t.float() for t in camera(W, H, f=60.0, seed=2))
    R = quat_to_matrix(quats)
    cpu = rasterize_surfels(means, R, scales, opac, colors, K, V, W, H, extras=extras,
                            backend="cpu")
    cu = [t.cuda() for t in (means, R, scales, opac, colors, K, V, extras)]
    gs = rasterize_surfels(*cu[:7], W, H, extras=cu[7], backend="gsplat")
    for name in ("rgb", "alpha", "normal", "extras"):
        a, b = getattr(cpu, name), getattr(gs, name).cpu()
        assert (a - b).abs().mean() < 2e-3, name
        assert (a - b).abs().max() < 5e-2, name
    mask = (cpu.alpha > 0.5) & (gs.alpha.cpu() > 0.5)
    assert ((cpu.depth - gs.depth.cpu()).abs()[mask]).mean() < 0.02


def test_rotmat_to_quat_round_trip():
    """gsplat adapter's matrix -> wxyz quaternion conversion (runs without CUDA)."""
    from fmgs.trainer.render.gsplat import rotmat_to_quat_wxyz
    q = torch.randn(200, 4, dtype=DT, generator=torch.Generator().manual_seed(3))
    special = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1],
                            [0, 1, 1, 0], [1e-9, 0, 1, 1]], dtype=DT)   # incl. 180 degrees
    q = torch.cat([q, special])
    R = quat_to_matrix(q)
    q2 = rotmat_to_quat_wxyz(R)
    np.testing.assert_allclose(quat_to_matrix(q2).numpy(), R.numpy(), atol=1e-12)
    qn = q / q.norm(dim=1, keepdim=True)
    assert torch.allclose((q2 * qn).sum(1).abs(), torch.ones(len(q), dtype=DT), atol=1e-12)
