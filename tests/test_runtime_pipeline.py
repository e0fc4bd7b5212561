"""The torch-free per-frame pipeline (fmgs.runtime.pipeline) against the trainer.

A small randomised full avatar (13,776 real canonical SMPL surfels, every field with
non-trivial weights) is baked and exported into a schema-1 bundle (tests/runtime_avatar.py);
the runtime's posed surfels must equal ``FMGSAvatar.forward`` to 1e-5, and the runtime's
OpenGL frame must match the trainer's render of the same avatar (>= 35 dB PSNR).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fmgs.errors import FmgsInputError  # noqa: E402
from fmgs.runtime.pipeline import AvatarPipeline, canonical_view_dirs_planar  # noqa: E402


@pytest.fixture(scope="module")
def avatar(smpl_path, tmp_path_factory):
    from runtime_avatar import build_small_avatar, export_small_bundle

    model, surfels = build_small_avatar(smpl_path)
    path = export_small_bundle(model, surfels, tmp_path_factory.mktemp("rt") / "bundle")
    return model, surfels, path


def _frame(zju377, k=100):
    from fmgs.body_model import world_from_body
    from fmgs.pickle_io import load_pickle

    mi = load_pickle(zju377 / "mesh_infos.pkl")
    fr = mi[sorted(mi)[k]]
    poses = np.asarray(fr["poses"], np.float64).reshape(24, 3).copy()
    poses[0] = [0.3, -0.2, 0.1]                 # a non-trivial global orientation too
    return poses, world_from_body(fr["Rh"], fr["Th"])


def test_pipeline_matches_trainer_forward(avatar, zju377):
    from runtime_avatar import trainer_posed

    model, surfels, path = avatar
    poses, wfb = _frame(zju377)
    cam = np.array([0.4, -0.3, 3.1])
    pipe = AvatarPipeline(path, array_backend="numpy", providers="cpu", drop_invisible=False)
    assert all("CPUExecutionProvider" in m.providers for m in pipe.models.values())
    got = pipe.posed_surfels(poses, wfb, cam)
    ref = trainer_posed(model, surfels, poses, wfb, cam)
    for k in ("means", "rotations", "scales", "colors", "opacities"):
        np.testing.assert_allclose(got[k], getattr(ref, k).numpy(), atol=1e-5, rtol=0, err_msg=k)
    # the avatar really moves: the geometry residual and the view matter
    assert np.abs(ref.canonical_centers.numpy() - model.centers.numpy()).max() > 1e-4
    got2 = pipe.posed_surfels(poses, wfb, -cam)
    assert np.abs(got2["colors"] - got["colors"]).max() > 1e-3


def test_view_dirs_match_trainer_canonicalisation():
    from fmgs.trainer.models.fields import canonicalize_view_dirs

    rng = np.random.default_rng(0)
    S = 500
    M = np.eye(3) + 0.3 * rng.normal(size=(S, 3, 3))
    M[:7] *= -1                                   # negative determinants keep their sign
    T = np.zeros((S, 4, 4))
    T[:, :3, :3] = M
    T[:, :3, 3] = rng.normal(size=(S, 3))
    means = rng.normal(size=(S, 3))
    c = np.array([0.1, 0.2, 3.0])
    Tt = np.ascontiguousarray(T[:, :3, :].reshape(S, 12).T.astype(np.float32))
    work = {"d": np.empty((3, S), np.float32), "c": np.empty((3, S), np.float32), "tmp": np.empty(S, np.float32)}
    out = np.empty((3, S), np.float32)
    canonical_view_dirs_planar(np, Tt, means.T.astype(np.float32), c, "inverse", out, work)
    d = torch.nn.functional.normalize(torch.as_tensor(means - c), dim=-1)
    ref = canonicalize_view_dirs(d, torch.as_tensor(T)).numpy()
    np.testing.assert_allclose(out.T, ref, atol=2e-4)
    canonical_view_dirs_planar(np, Tt, means.T.astype(np.float32), c, "transpose", out, work)
    ref_t = np.einsum("sji,sj->si", M, d.numpy())
    ref_t /= np.linalg.norm(ref_t, axis=1, keepdims=True)
    np.testing.assert_allclose(out.T, ref_t, atol=2e-5)


def _renderer(kind: str, W: int, H: int, S: int):
    if kind == "cpu":
        pytest.importorskip("numba")
        from fmgs.runtime.splat_cpu import CpuSurfelRenderer

        return CpuSurfelRenderer(W, H, S)
    from fmgs.runtime.gl_renderer import SurfelRenderer, create_headless_context

    try:
        ctx = create_headless_context()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    return SurfelRenderer(ctx, W, H, S, precision="f2")


@pytest.mark.parametrize("renderer", ["gl", "cpu"])
def test_runtime_frame_matches_trainer_render(avatar, zju377, renderer):
    from fmgs.camera import Camera
    from fmgs.pickle_io import load_pickle
    from fmgs.trainer.render.dispatch import render_posed
    from runtime_avatar import trainer_posed

    model, surfels, path = avatar
    poses, wfb = _frame(zju377, 60)
    poses[0] = 0.0
    cams = load_pickle(zju377 / "cameras.pkl")
    cm = cams[sorted(cams)[60]]
    cam = Camera.from_extrinsics(cm["intrinsics"], cm["extrinsics"], 512, 512).scaled(0.25)
    pipe = AvatarPipeline(path, array_backend="numpy", providers="cpu")
    r = _renderer(renderer, cam.width, cam.height, pipe.S)
    pipe.init_table(r.table)
    pipe.frame(poses, wfb, cam.center, table=r.table)
    r.draw(cam.K, cam.viewmat, mode="rgb")
    r.resolve("rgb", background=(1.0, 1.0, 1.0))
    img = r.read_display().astype(np.float64) / 255.0
    ref = render_posed(trainer_posed(model, surfels, poses, wfb, cam.center), cam,
                      background=(1.0, 1.0, 1.0), backend="cpu")
    ref_img = ref.rgb.detach().numpy().clip(0, 1)
    assert (ref.alpha.numpy() > 0.5).sum() > 300
    mse = np.mean((img - ref_img) ** 2)
    psnr = 10 * np.log10(1.0 / mse)
    assert psnr >= 35.0, psnr


def test_transparent_surfels_are_left_out_without_changing_the_image(avatar, zju377):
    """``drop_invisible``: surfels with opacity < 1/255 never pass the alpha cut-off, so
    leaving them out at load time gives the same frame (to float32 rounding: the models and
    the skinning product then run on fewer rows, which can change the BLAS blocking)."""
    pytest.importorskip("numba")
    from fmgs.bundle import read_bundle
    from fmgs.camera import Camera
    from fmgs.pickle_io import load_pickle
    from fmgs.runtime.gl_renderer import ALPHA_MIN
    from fmgs.runtime.splat_cpu import CpuSurfelRenderer

    _, _, path = avatar
    b = read_bundle(path)
    op = b.surfels["opacities"].copy()
    op[::5] = 0.5 * ALPHA_MIN                       # every fifth surfel fully transparent
    b.surfels["opacities"] = op
    poses, wfb = _frame(zju377, 60)
    cams = load_pickle(zju377 / "cameras.pkl")
    cm = cams[sorted(cams)[60]]
    cam = Camera.from_extrinsics(cm["intrinsics"], cm["extrinsics"], 512, 512).scaled(0.25)
    imgs = []
    for drop in (False, True):
        pipe = AvatarPipeline(b, array_backend="numpy", providers="cpu", drop_invisible=drop)
        assert pipe.S == (op.size if not drop else int((op >= ALPHA_MIN).sum()))
        np.testing.assert_array_equal(pipe.kept, np.arange(op.size) if not drop else np.flatnonzero(op >= ALPHA_MIN))
        r = CpuSurfelRenderer(cam.width, cam.height, pipe.S, palette=pipe.palette)
        pipe.init_table(r.table)
        r.set_logits(pipe.semantic_logits)
        pipe.frame(poses, wfb, cam.center, table=r.table)
        layers = {}
        for mode in ("depth", "semantic"):
            r.draw(cam.K, cam.viewmat, mode=mode)
            layers.update(r.read_layers() if mode == "depth" else {"logits": r.read_logits()})
        imgs.append(layers)
    assert (imgs[0]["alpha"] > 0.5).sum() > 300
    for k in imgs[0]:
        np.testing.assert_allclose(imgs[1][k], imgs[0][k], atol=1e-5, rtol=0, err_msg=k)
    op[:] = 0.0
    with pytest.raises(FmgsInputError, match="opacity < 1/255"):
        AvatarPipeline(b, array_backend="numpy", providers="cpu")


def test_bad_bundles_are_rejected_with_the_file_named(avatar, tmp_path):
    _, _, path = avatar
    bad = tmp_path / "v2"
    shutil.copytree(path, bad)
    man = json.loads((bad / "manifest.json").read_text())
    man["schema_version"] = 2
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(FmgsInputError, match="schema version") as ei:
        AvatarPipeline(bad)
    assert "manifest.json" in str(ei.value)
    man["schema_version"] = 1
    man["body_model"]["type"] = "smplx"
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(FmgsInputError, match="SMPL") as ei:
        AvatarPipeline(bad)
    assert "manifest.json" in str(ei.value)
    with pytest.raises(FmgsInputError, match="not found"):
        AvatarPipeline(tmp_path / "missing")


def test_blas_libraries_run_single_threaded_after_limit():
    """limit_blas_threads really sets NumPy's OpenBLAS (read back through its own API)."""
    import ctypes

    from fmgs.runtime.pipeline import limit_blas_threads

    with open("/proc/self/maps") as fh:
        libs = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and ".so" in ln})
    if not libs:
        pytest.skip("NumPy is not linked against a shared OpenBLAS here")
    assert limit_blas_threads(1) >= 1
    checked = 0
    for path in libs:
        lib = ctypes.CDLL(path)
        for sym in ("openblas_get_num_threads", "openblas_get_num_threads64_",
                    "scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads"):
            if hasattr(lib, sym):
                assert getattr(lib, sym)() == 1, path
                checked += 1
                break
    assert checked >= 1
    a = np.random.default_rng(0).normal(size=(12, 24)).astype(np.float32)
    b = np.random.default_rng(1).normal(size=(24, 5000)).astype(np.float32)
    np.testing.assert_allclose(a @ b, a.astype(np.float64) @ b.astype(np.float64), atol=1e-4)
