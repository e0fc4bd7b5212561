"""The OpenGL surfel renderer (fmgs.runtime.gl_renderer) against the trainer's CPU rasteriser.

Same surfels, same camera, float64 reference (``rasterize_surfels(backend='cpu')``): colour,
alpha, expected depth, normals and semantic logits must agree, on a synthetic scene with
arbitrarily oriented (also nearly edge-on) surfels and on real posed SMPL surfels of
ZJU-MoCap 377 in its own camera.
"""
from __future__ import annotations

import numpy as np
import pytest

moderngl = pytest.importorskip("moderngl")
torch = pytest.importorskip("torch")

from fmgs.runtime.gl_renderer import SurfelRenderer, back_to_front_order, create_headless_context  # noqa: E402


@pytest.fixture(scope="module")
def ctx():
    try:
        return create_headless_context()
    except RuntimeError as exc:
        pytest.skip(f"no headless OpenGL 4.3 context: {exc}")


def _rot(rng, n):
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1)], -2)


def _reference(means, R, s, o, c, K, V, W, H, bg=None, extras=None):
    from fmgs.trainer.render.dispatch import rasterize_surfels

    T = lambda a: torch.as_tensor(np.asarray(a, np.float64))  # noqa: E731
    return rasterize_surfels(T(means), T(R), T(s), T(o), T(c), T(K), T(V), W, H,
                             background=None if bg is None else T(bg),
                             extras=None if extras is None else T(extras), backend="cpu")


def _psnr(a, b):
    return 10 * np.log10(1.0 / max(float(np.mean((np.asarray(a) - np.asarray(b)) ** 2)), 1e-20))


def _scene(seed=0, n=300):
    rng = np.random.default_rng(seed)
    means = rng.uniform([-0.5, -0.5, 2.0], [0.5, 0.5, 3.0], (n, 3))
    R = _rot(rng, n)
    R[:10, :, 2] = [1.0, 0.0, 0.0]     # ten surfels nearly edge-on (plane contains the z axis)
    R[:10, :, 0] = [0.0, 0.0, 1.0]
    R[:10, :, 1] = np.cross(R[:10, :, 2], R[:10, :, 0])
    scales = rng.uniform(0.005, 0.08, (n, 2))
    op = rng.uniform(0.05, 1.0, n)
    col = rng.uniform(0, 1, (n, 3))
    K = np.array([[110.0, 0, 47.3], [0, 118.0, 50.1], [0, 0, 1]])
    V = np.eye(4)
    a, b = 0.15, -0.2
    V[:3, :3] = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]]) @ \
        np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    V[:3, 3] = [0.05, -0.1, 0.2]
    return means, R, scales, op, col, K, V


def test_synthetic_scene_matches_cpu_rasteriser(ctx):
    means, R, s, o, c, K, V = _scene()
    W, H = 96, 80
    bg = np.array([0.2, 0.3, 0.4])
    r = SurfelRenderer(ctx, W, H, len(means), precision="f4")
    got = r.render_arrays(means, R, s, o, c, K, V, mode="depth", background=bg)
    ref = _reference(means, R, s, o, c, K, V, W, H, bg=bg)
    assert ref.alpha.numpy().max() > 0.9 and (ref.alpha.numpy() > 0.5).mean() > 0.1   # a real scene
    assert _psnr(got["rgb"], ref.rgb.numpy()) > 60.0
    np.testing.assert_allclose(got["alpha"], ref.alpha.numpy(), atol=2e-4)
    np.testing.assert_allclose(got["normal"], ref.normal.numpy(), atol=2e-4)
    np.testing.assert_allclose(got["depth_acc"], ref.depth_acc.numpy(), atol=1e-3)
    m = ref.alpha.numpy() > 0.05
    np.testing.assert_allclose(got["depth"][m], ref.depth.numpy()[m], rtol=1e-3)
    # the semantic pass composites per-surfel logits with the same weights
    lg = np.random.default_rng(1).normal(size=(len(means), 28))
    out = r.render_arrays(means, R, s, o, c, K, V, mode="semantic", logits=lg)
    ref2 = _reference(means, R, s, o, c, K, V, W, H, extras=lg)
    np.testing.assert_allclose(out["logits"], ref2.extras.numpy(), atol=5e-4)
    np.testing.assert_allclose(out["alpha"], ref2.alpha.numpy(), atol=2e-4)


def test_half_and_byte_targets_stay_above_35db(ctx):
    means, R, s, o, c, K, V = _scene(seed=3)
    ref = _reference(means, R, s, o, c, K, V, 64, 64).rgb.numpy()
    for prec, floor in (("f2", 45.0), ("f1", 35.0)):
        r = SurfelRenderer(ctx, 64, 64, len(means), precision=prec)
        got = r.render_arrays(means, R, s, o, c, K, V, mode="rgb")
        assert _psnr(got["rgb"], ref) > floor, prec


def test_resolve_modes_colour_the_float_targets(ctx):
    check_resolve_modes(lambda W, H, n: SurfelRenderer(ctx, W, H, n), tol=1.5 / 255)


def check_resolve_modes(make_renderer, tol: float):
    """The 8-bit display image of every mode is the mode's colouring of the float layers
    (RGB over the background, (n + 1) / 2, turbo depth with near = red, palette of the argmax
    logit), within ``tol`` (8-bit rounding; the GL resolve samples textures)."""
    from fmgs.priors import SAPIENS_PALETTE

    means, R, s, o, c, K, V = _scene(seed=5, n=120)
    r = make_renderer(64, 48, len(means))
    layers = r.render_arrays(means, R, s, o, c, K, V, mode="normal")
    r.resolve("rgb", background=(1.0, 1.0, 1.0))
    img = r.read_display().astype(np.float64) / 255
    want = np.clip(layers["rgb"] + (1 - layers["alpha"])[..., None], 0, 1)
    assert np.abs(img - want).max() <= tol + 1e-6
    r.resolve("normal", background=(0.0, 0.0, 0.0))
    img = r.read_display().astype(np.float64) / 255
    n = layers["normal"]
    nn = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    want = (0.5 * nn + 0.5) * layers["alpha"][..., None]
    m = layers["alpha"] > 0.02
    assert np.abs(img[m] - want[m]).max() <= tol + 1e-6
    r.draw(K, V, mode="depth")
    r.resolve("depth", background=(0.0, 0.0, 0.0), depth_range=(2.0, 3.0))
    img = r.read_display().astype(np.float64) / 255
    t = np.clip(1.0 - (layers["depth"] - 2.0), 0, 1)           # near = red end of turbo
    assert (img[..., 0] > img[..., 2])[m & (t > 0.9)].mean() > 0.9
    lg = np.random.default_rng(2).normal(size=(len(means), 28))
    out = r.render_arrays(means, R, s, o, c, K, V, mode="semantic", logits=lg)
    r.resolve("semantic", background=(0.0, 0.0, 0.0))
    img = r.read_display()
    labels = out["logits"].argmax(-1)
    want = SAPIENS_PALETTE[labels] / (255.0 if SAPIENS_PALETTE.max() > 1 else 1.0) * out["alpha"][..., None]
    m = out["alpha"] > 0.5
    assert np.abs(img[m] / 255.0 - want[m]).max() <= tol + 1e-6


def test_back_to_front_order_reuses_last_frame():
    rng = np.random.default_rng(0)
    z = rng.normal(size=5000).astype(np.float32)
    first = back_to_front_order(z)
    np.testing.assert_array_equal(first, np.argsort(z, kind="stable"))
    z2 = z + rng.normal(scale=1e-3, size=z.shape).astype(np.float32)
    again = back_to_front_order(z2, previous=first)
    assert np.all(np.diff(z2[again]) >= 0)
    assert sorted(again.tolist()) == list(range(z.size))


def test_real_posed_smpl_surfels_377(ctx, smpl_path, zju377):
    check_real_posed_smpl_377(lambda W, H, n: SurfelRenderer(ctx, W, H, n, precision="f4"), smpl_path, zju377)


def check_real_posed_smpl_377(make_renderer, smpl_path, zju377):
    """Real SMPL surfels posed by a ZJU-MoCap 377 fit, drawn by ``make_renderer(W, H, n)`` in
    the frame's own camera (quarter size), against the float64 rasteriser."""
    from fmgs.body_model import axis_angle_to_matrix, forward_kinematics, load_smpl, world_from_body
    from fmgs.camera import Camera
    from fmgs.pickle_io import load_pickle
    from fmgs.surfels import build_canonical_surfels

    smpl = load_smpl(smpl_path)
    sf = build_canonical_surfels(smpl, subdivisions=1)
    mi = load_pickle(zju377 / "mesh_infos.pkl")
    cams = load_pickle(zju377 / "cameras.pkl")
    name = sorted(mi)[120]
    fr, cm = mi[name], cams[name]
    rot = axis_angle_to_matrix(np.asarray(fr["poses"], np.float64).reshape(24, 3))
    G, _ = forward_kinematics(rot, sf.rest_joints, smpl.parents)
    B = world_from_body(fr["Rh"], fr["Th"])[None] @ G @ np.linalg.inv(sf.bone_transforms.astype(np.float64))
    T = np.einsum("sb,bij->sij", sf.skin_weights.astype(np.float64), B)
    means = np.einsum("sij,sj->si", T[:, :3, :3], sf.centers) + T[:, :3, 3]
    tu = np.einsum("sij,sj->si", T[:, :3, :3], sf.rotations[:, :, 0])
    tv = np.einsum("sij,sj->si", T[:, :3, :3], sf.rotations[:, :, 1])
    n = np.cross(tu, tv)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    tu /= np.linalg.norm(tu, axis=1, keepdims=True)
    R = np.stack([tu, np.cross(n, tu), n], -1)
    cam = Camera.from_extrinsics(cm["intrinsics"], cm["extrinsics"], 512, 512).scaled(0.25)
    col = 0.5 + 0.5 * np.sin(np.asarray(sf.centers, np.float64) * [7.0, 11.0, 5.0])
    op = np.full(len(means), 0.85)
    W = H = 128
    r = make_renderer(W, H, len(means))
    got = r.render_arrays(means, R, sf.scales, op, col, cam.K, cam.viewmat, mode="depth")
    ref = _reference(means, R, sf.scales, op, col, cam.K, cam.viewmat, W, H)
    a_ref = ref.alpha.numpy()
    assert (a_ref > 0.5).sum() > 500            # the body covers the image centre
    assert _psnr(got["rgb"], ref.rgb.numpy()) > 50.0
    np.testing.assert_allclose(got["alpha"], a_ref, atol=1e-3)
    m = a_ref > 0.5
    np.testing.assert_allclose(got["depth"][m], ref.depth.numpy()[m], rtol=1e-3)
    cos = (got["normal"][m] * ref.normal.numpy()[m]).sum(-1) / (
        np.linalg.norm(got["normal"][m], axis=-1) * np.linalg.norm(ref.normal.numpy()[m], axis=-1))
    assert cos.min() > 0.999


def test_points_and_quads_give_the_same_exact_image(ctx):
    """Both primitives (GL points; tight instanced quads / pixel boxes) cover the whole
    alpha >= 1/255 support: each matches the float64 CPU rasteriser, also for nearly edge-on
    surfels and surfels partly outside the image."""
    means, R, s, o, c, K, V = _scene(seed=7, n=400)
    means[:20, 0] += 0.6                          # some surfels straddle the right image border
    W, H = 96, 80
    ref = _reference(means, R, s, o, c, K, V, W, H)
    r = SurfelRenderer(ctx, W, H, len(means), precision="f4")
    r.set_surfels(means, R, s, o, c)
    assert r.points_fit(K, V)
    for prim in ("points", "quads"):
        r.draw(K, V, mode="depth", order=r.sort(V, coherent=False), primitive=prim)
        assert r.last_primitive == prim
        got = r.read_layers()
        assert _psnr(got["rgb"], ref.rgb.numpy()) > 60.0, prim
        # a fragment exactly at the 1/255 cut-off may flip between float32 and float64 (this
        # scene has one: alpha * 255 = 1.0000002), which moves a pixel by at most 1/255
        err = np.abs(got["alpha"] - ref.alpha.numpy())
        assert (err > 2e-4).mean() < 1e-3 and err.max() < 1.0 / 255, prim
        err = np.abs(got["depth_acc"] - ref.depth_acc.numpy())
        assert (err > 1e-3).mean() < 1e-3, prim


def large_close_surfels(seed: int = 11, n: int = 40):
    """``n`` large surfels (5-30 cm) 0.4-1.2 m in front of an identity camera, some of whose
    planes cross the camera plane: ``(means, R, scales, opacities, colours)``."""
    rng = np.random.default_rng(seed)
    means = rng.uniform([-0.3, -0.3, 0.4], [0.3, 0.3, 1.2], (n, 3))
    R = _rot(rng, n)
    s = rng.uniform(0.05, 0.3, (n, 2))
    o = rng.uniform(0.2, 1.0, n)
    c = rng.uniform(0, 1, (n, 3))
    return means, R, s, o, c


def test_large_close_surfels_fall_back_to_quads(ctx):
    """Surfels wider than the largest GL point (llvmpipe: 255 px), some crossing the camera
    plane: 'auto' picks quads, and the image still matches the CPU rasteriser."""
    means, R, s, o, c = large_close_surfels()
    n = len(means)
    W = H = 300
    K = np.array([[260.0, 0, 150.0], [0, 250.0, 140.0], [0, 0, 1]])
    V = np.eye(4)
    r = SurfelRenderer(ctx, W, H, n, precision="f4")
    r.set_surfels(means, R, s, o, c)
    if r.max_point_size >= W + 4:
        pytest.skip("this OpenGL rasterises points larger than the viewport")
    assert not r.points_fit(K, V)
    got = r.render_arrays(means, R, s, o, c, K, V, mode="rgb")
    assert r.last_primitive == "quads"
    ref = _reference(means, R, s, o, c, K, V, W, H)
    assert ref.alpha.numpy().mean() > 0.3
    assert _psnr(got["rgb"], ref.rgb.numpy()) > 60.0
    np.testing.assert_allclose(got["alpha"], ref.alpha.numpy(), atol=2e-4)


def test_back_face_culling_on_the_cpu_keeps_the_facing_surfels_in_order(ctx):
    means, R, s, o, c, K, V = _scene(seed=2, n=500)
    r = SurfelRenderer(ctx, 32, 32, len(means))
    r.set_surfels(means, R, s, o, c)
    cam = -V[:3, :3].T @ V[:3, 3]
    n = np.cross(R[:, :, 0], R[:, :, 1])
    d = means - cam
    cos = (n * d).sum(1) / (np.linalg.norm(n, axis=1) * np.linalg.norm(d, axis=1))
    for thr in (0.0, 0.3, -0.2):
        want = cos <= thr
        got = r.facing_mask(V, thr)
        near = np.abs(cos - thr) < 1e-5                  # float32 vs float64 at the threshold
        assert np.array_equal(got[~near], want[~near]) and 0.2 < want.mean() < 0.9
        full = r.sort(V, coherent=False)
        culled = r.sort(V, coherent=False, cull_backfaces=thr)
        np.testing.assert_array_equal(culled, full[got[full]])   # same back-to-front order, a subset


def test_back_to_front_order_breaks_depth_ties_by_index_like_the_trainer():
    rng = np.random.default_rng(4)
    z = np.round(rng.normal(size=20000), 2).astype(np.float32)      # thousands of exact ties
    z[:50] = np.nan                                                   # degenerate input stays a permutation
    got = back_to_front_order(z)
    np.testing.assert_array_equal(got, np.argsort(z, kind="stable"))
    z2 = rng.normal(size=20000).astype(np.float32)
    np.testing.assert_array_equal(back_to_front_order(z2, previous=got), np.argsort(z2, kind="stable"))
