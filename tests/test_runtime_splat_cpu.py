"""The numba CPU surfel renderer (fmgs.runtime.splat_cpu) against the trainer's rasteriser.

The CPU renderer blends front to back with the trainer's 2DGS early stop, so it must match
the float64 reference (``rasterize_surfels(backend='cpu')``) to float32 rounding: colour,
alpha, expected depth, normals and semantic logits, on a synthetic scene with arbitrarily
oriented (also edge-on and off-screen) surfels, on large surfels crossing the camera plane,
and on real posed SMPL surfels of ZJU-MoCap 377 in its own camera.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")
torch = pytest.importorskip("torch")

from fmgs.runtime.splat_cpu import CpuSurfelRenderer  # noqa: E402
from test_runtime_renderer import (  # noqa: E402
    _psnr, _reference, _scene, check_real_posed_smpl_377, check_resolve_modes, large_close_surfels,
)


def _close(got, ref, atol, frac=1e-3):
    """|got - ref| <= atol except on a fraction ``frac`` of pixels, where a fragment exactly at
    the 1/255 cut-off or the 1e-4 early stop flips between float32 and float64 (<= 1e-2)."""
    err = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
    assert (err > atol).mean() <= frac and err.max() < 1.2e-2, (err.max(), (err > atol).mean())


def test_synthetic_scene_matches_the_float64_rasteriser():
    means, R, s, o, c, K, V = _scene(seed=0, n=400)
    means[:20, 0] += 0.6                      # some surfels straddle the right image border
    W, H = 96, 80
    bg = np.array([0.2, 0.3, 0.4])
    r = CpuSurfelRenderer(W, H, len(means))
    got = r.render_arrays(means, R, s, o, c, K, V, mode="depth", background=bg)
    ref = _reference(means, R, s, o, c, K, V, W, H, bg=bg)
    assert ref.alpha.numpy().max() > 0.9 and (ref.alpha.numpy() > 0.5).mean() > 0.1   # a real scene
    assert _psnr(got["rgb"], ref.rgb.numpy()) > 80.0
    _close(got["alpha"], ref.alpha.numpy(), 2e-5)
    _close(got["normal"], ref.normal.numpy(), 2e-5)
    _close(got["depth_acc"], ref.depth_acc.numpy(), 1e-4)
    m = ref.alpha.numpy() > 0.05
    np.testing.assert_allclose(got["depth"][m], ref.depth.numpy()[m], rtol=2e-4)
    # the rgb mode: the vectorised kernel (polynomial exp) and the scalar one
    for simd in (True, False):
        rgb = CpuSurfelRenderer(W, H, len(means), simd=simd).render_arrays(means, R, s, o, c, K, V, mode="rgb",
                                                                          background=bg)
        assert _psnr(rgb["rgb"], ref.rgb.numpy()) > 80.0, simd
        _close(rgb["alpha"], ref.alpha.numpy(), 2e-5)
    lg = np.random.default_rng(1).normal(size=(len(means), 28))
    out = r.render_arrays(means, R, s, o, c, K, V, mode="semantic", logits=lg)
    ref2 = _reference(means, R, s, o, c, K, V, W, H, extras=lg)
    _close(out["logits"], ref2.extras.numpy(), 1e-4)
    _close(out["alpha"], ref2.alpha.numpy(), 2e-5)


def test_large_surfels_crossing_the_camera_plane():
    """Unbounded supports (surfel planes through the camera) get the whole image as their box."""
    means, R, s, o, c = large_close_surfels()
    n = len(means)
    W = H = 120
    K = np.array([[104.0, 0, 60.0], [0, 100.0, 56.0], [0, 0, 1]])
    r = CpuSurfelRenderer(W, H, n)
    got = r.render_arrays(means, R, s, o, c, K, np.eye(4), mode="rgb")
    ref = _reference(means, R, s, o, c, K, np.eye(4), W, H)
    assert ref.alpha.numpy().mean() > 0.3
    assert _psnr(got["rgb"], ref.rgb.numpy()) > 70.0
    _close(got["alpha"], ref.alpha.numpy(), 2e-5)


def test_real_posed_smpl_surfels_377(smpl_path, zju377):
    check_real_posed_smpl_377(lambda W, H, n: CpuSurfelRenderer(W, H, n), smpl_path, zju377)


def test_resolve_modes_colour_the_float_layers():
    check_resolve_modes(lambda W, H, n: CpuSurfelRenderer(W, H, n), tol=0.5 / 255)
    means, R, s, o, c, K, V = _scene(seed=5, n=120)
    r = CpuSurfelRenderer(64, 48, len(means))
    r.render_arrays(means, R, s, o, c, K, V, mode="semantic", logits=np.ones((len(means), 28)))
    with pytest.raises(ValueError, match="needs a draw of that mode"):
        r.resolve("rgb")


def test_asynchronous_draw_and_thread_counts_give_the_same_image():
    means, R, s, o, c, K, V = _scene(seed=9, n=300)
    W, H = 72, 64
    want = CpuSurfelRenderer(W, H, len(means), threads=1).render_arrays(means, R, s, o, c, K, V, mode="rgb")
    r = CpuSurfelRenderer(W, H, len(means), async_draw=True, band_rows=5)
    r.set_surfels(means, R, s, o, c)
    order = r.sort(V)
    r.draw(K, V, mode="rgb", order=order)
    r.table[:] = 0.0                        # the next frame may be written while the splat runs
    got = r.read_layers()
    np.testing.assert_array_equal(got["rgb"], want["rgb"])
    np.testing.assert_array_equal(got["alpha"], want["alpha"])


def test_back_face_culling_draws_the_facing_surfels_only():
    means, R, s, o, c, K, V = _scene(seed=2, n=500)
    W, H = 64, 64
    r = CpuSurfelRenderer(W, H, len(means))
    r.set_surfels(means, R, s, o, c)
    keep = r.facing_mask(V, 0.3)
    r.draw(K, V, mode="rgb", order=r.sort(V, cull_backfaces=0.3))
    got = r.read_layers()
    ref = _reference(means[keep], R[keep], s[keep], o[keep], c[keep], K, V, W, H)
    assert _psnr(got["rgb"], ref.rgb.numpy()) > 80.0
    r.draw(K, V, mode="rgb", cull_backfaces=0.3)           # the same test inside the setup kernel
    assert _psnr(r.read_layers()["rgb"], ref.rgb.numpy()) > 80.0


def test_auto_renderer_choice(monkeypatch):
    """``auto``: the CPU renderer without a context (headless) or on a software OpenGL, the GL
    renderer on a GPU driver or when numba is missing."""
    from fmgs.runtime import splat_cpu
    from fmgs.runtime.app import choose_renderer

    class _Ctx:
        def __init__(self, name):
            self.info = {"GL_RENDERER": name}

    llvmpipe, gpu = _Ctx("llvmpipe (LLVM 15.0.6, 256 bits)"), _Ctx("NVIDIA H200/PCIe/SSE2")
    assert choose_renderer("auto", None) == "cpu"
    assert choose_renderer("auto", llvmpipe) == "cpu"
    assert choose_renderer("auto", gpu) == "gl"
    assert choose_renderer("gl", llvmpipe) == "gl" and choose_renderer("cpu", gpu) == "cpu"
    with pytest.raises(ValueError, match="renderer must be one of"):
        choose_renderer("vulkan")
    monkeypatch.setattr(splat_cpu, "available", lambda: False)
    assert choose_renderer("auto", None) == "gl"
    with pytest.raises(RuntimeError, match="needs numba"):
        choose_renderer("cpu", None)
