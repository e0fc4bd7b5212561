"""``fmgs-play``: headless rendering to MP4 / PNG frames, bad input, the no-display fallback,
and a real GLFW window under Xvfb whose framebuffer shows the avatar where the camera puts it."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("moderngl")

from fmgs.runtime.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def bundle(smpl_path, tmp_path_factory):
    from runtime_avatar import build_small_avatar, export_small_bundle

    model, surfels = build_small_avatar(smpl_path, seed=1)
    return export_small_bundle(model, surfels, tmp_path_factory.mktemp("app") / "bundle")


@pytest.fixture(scope="module")
def motion_file(tmp_path_factory):
    """A short SMPL (T, 72) sequence: arm and knee swings, body turning."""
    T = 12
    poses = np.zeros((T, 72))
    ph = np.linspace(0, np.pi, T)
    poses[:, 0 * 3 + 1] = 0.4 * ph                  # root yaw
    poses[:, 16 * 3 + 2] = -0.9 * np.sin(ph)        # left shoulder
    poses[:, 17 * 3 + 2] = 0.9 * np.sin(ph)         # right shoulder
    poses[:, 4 * 3 + 0] = 0.6 * np.sin(ph)          # left knee
    path = tmp_path_factory.mktemp("motion") / "swing.npy"
    np.save(path, poses)
    return path


def _no_display(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)


def test_headless_mp4_and_frames(bundle, motion_file, tmp_path, monkeypatch, capsys):
    import imageio.v3 as iio

    _no_display(monkeypatch)
    out = tmp_path / "clip.mp4"
    rc = main([str(bundle), str(motion_file), "--headless", "--out", str(out), "--size", "96", "--frames", "6",
               "--source-fps", "30"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "p95" in text and "inference" in text and "CPUExecutionProvider" in text
    video = iio.imread(out)
    assert video.shape == (6, 96, 96, 3)
    body = (video.astype(int).sum(-1) < 700)       # white background; the avatar is darker
    assert 0.03 < body[0].mean() < 0.8
    frames = tmp_path / "frames"
    rc = main([str(bundle), str(motion_file), "--headless", "--out", f"{frames}/", "--size", "64", "48",
               "--frames", "3", "--mode", "semantic", "--source-fps", "30"])
    assert rc == 0
    pngs = sorted(frames.glob("frame_*.png"))
    assert len(pngs) == 3
    img = iio.imread(pngs[0])
    assert img.shape == (48, 64, 3)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 3      # several classes + background


def test_every_mode_renders(bundle, motion_file, tmp_path, monkeypatch):
    import imageio.v3 as iio

    _no_display(monkeypatch)
    imgs = {}
    for mode in ("rgb", "normal", "depth", "semantic"):
        out = tmp_path / mode
        assert main([str(bundle), str(motion_file), "--headless", "--out", f"{out}/", "--size", "64",
                     "--frames", "1", "--mode", mode, "--source-fps", "30"]) == 0
        imgs[mode] = iio.imread(out / "frame_000000.png").astype(int)
    mask = imgs["rgb"].sum(-1) < 740
    for mode in ("normal", "depth", "semantic"):
        assert np.abs(imgs[mode] - imgs["rgb"]).sum(-1)[mask].mean() > 10, mode   # different colouring
        other = imgs[mode].sum(-1) < 740
        assert (mask == other).mean() > 0.97, mode                                # same silhouette


@pytest.mark.parametrize("renderer", ["gl", "cpu"])
def test_overlapped_frames_equal_the_synchronous_ones(bundle, motion_file, renderer):
    """Player.render_pipelined (CPU work of frame i while frame i - 1 is shaded) returns the
    same images as Player.render, one call later; both GL primitives, the CPU renderer and
    the fast preset run, and the two renderers give the same frames."""
    from fmgs.motion import load_motion
    from fmgs.runtime.app import Player
    from fmgs.runtime.gl_renderer import create_headless_context
    from fmgs.runtime.pipeline import AvatarPipeline

    if renderer == "cpu":
        pytest.importorskip("numba")
    ctx = create_headless_context()
    pipe = AvatarPipeline(bundle, array_backend="numpy", providers="cpu")
    motion = load_motion(motion_file, fps=30.0, source_fps=30.0)
    sync = Player(pipe, motion, ctx, 80, 64, renderer=renderer)
    assert sync.renderer.kind == renderer
    want = [sync.render(i) for i in range(4)]
    over = Player(pipe, motion, ctx, 80, 64, renderer=renderer)
    got = [over.render_pipelined(i) for i in range(4)] + [over.flush()]
    assert got[0] is None and over.flush() is None
    for a, b in zip(want, got[1:]):
        np.testing.assert_array_equal(a, b)
    assert len(over.stats) == 4 and all(t.draw > 0 for t in over.stats)
    assert np.abs(want[0].astype(int) - want[3].astype(int)).max() > 30      # the body moves
    if renderer == "gl":
        quads = Player(pipe, motion, ctx, 80, 64, primitive="quads", renderer="gl")
        np.testing.assert_allclose(quads.render(2).astype(int), want[2].astype(int), atol=1)
        assert quads.renderer.last_primitive == "quads" and sync.renderer.last_primitive == "points"
    else:
        gl = Player(pipe, motion, ctx, 80, 64, renderer="gl").render(2).astype(int)
        err = np.abs(gl - want[2].astype(int))          # 8-bit images; the GL renderer has no early stop
        assert err.max() <= 3 and (err > 1).mean() < 1e-3
    fast = Player(pipe, motion, ctx, 80, 64, fast=True, renderer=renderer)
    img = fast.render(2)
    assert fast.cull_backfaces is not None and img.shape == want[2].shape
    body = want[2].sum(-1) < 740
    assert ((img.sum(-1) < 740) == body).mean() > 0.95                      # same silhouette


def test_bad_motion_and_bundle_exit_with_message(bundle, tmp_path, monkeypatch, capsys):
    _no_display(monkeypatch)
    smplx = tmp_path / "smplx_clip.npz"
    np.savez(smplx, poses=np.zeros((5, 165)), trans=np.zeros((5, 3)), mocap_framerate=30.0,
             surface_model_type="smplx")
    assert main([str(bundle), str(smplx), "--headless", "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "smplx_clip.npz" in err and "SMPL" in err
    assert not (tmp_path / "x.mp4").exists()
    assert main([str(tmp_path / "nope"), str(smplx), "--headless"]) == 2
    assert "bundle folder not found" in capsys.readouterr().err


def test_no_display_falls_back_to_headless(bundle, motion_file, tmp_path, monkeypatch, capsys):
    _no_display(monkeypatch)
    out = tmp_path / "fallback.mp4"
    rc = main([str(bundle), str(motion_file), "--out", str(out), "--size", "64", "--frames", "2",
               "--source-fps", "30"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "no display" in cap.err and "headless" in cap.err
    assert out.is_file() and out.stat().st_size > 0


@pytest.fixture
def xdisplay(monkeypatch):
    """$DISPLAY, starting ``Xvfb :99`` when none is set (skips when Xvfb is missing)."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    if shutil.which("Xvfb") is None:
        pytest.skip("no $DISPLAY and no Xvfb (Debian: apt-get install xvfb)")
    disp = ":99"
    proc = subprocess.Popen(["Xvfb", disp, "-screen", "0", "320x240x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if os.path.exists("/tmp/.X11-unix/X99") or proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("Xvfb :99 did not start (display in use?)")
    monkeypatch.setenv("DISPLAY", disp)
    try:
        yield disp
    finally:
        proc.terminate()
        proc.wait(timeout=10)


_WINDOW_SCRIPT = """
import sys, numpy as np
from fmgs.motion import load_motion
from fmgs.runtime.app import NO_DISPLAY, run_window
from fmgs.runtime.gl_renderer import ROWS
from fmgs.runtime.pipeline import AvatarPipeline
bundle, motion_file, shot, out, renderer = sys.argv[1:6]
pipe = AvatarPipeline(bundle, array_backend="numpy", providers="cpu")
motion = load_motion(motion_file, fps=30.0, source_fps=30.0)
res = run_window(dict(pipeline=pipe, motion=motion, width=160, height=120, background=(1.0, 1.0, 1.0),
                      renderer=renderer), max_frames=3, screenshot=shot)
if res == NO_DISPLAY:
    sys.exit(5)
np.savez(out, img=res["screenshot_image"], K=res["camera"]["K"], V=res["camera"]["viewmat"],
         means=res["table"][ROWS["means"]].T)
"""


@pytest.mark.parametrize("renderer", ["gl", "cpu"])
def test_glfw_window_under_xvfb_shows_the_avatar_where_the_camera_projects_it(bundle, motion_file, xdisplay,
                                                                              tmp_path, renderer):
    # a fresh interpreter: a GLX window and the EGL contexts of the other tests do not share a process
    import sys

    if renderer == "cpu":
        pytest.importorskip("numba")
    shot, out = tmp_path / "window.png", tmp_path / "window.npz"
    proc = subprocess.run([sys.executable, "-c", _WINDOW_SCRIPT, str(bundle), str(motion_file), str(shot), str(out),
                           renderer],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode != 5, "GLFW could not open a window on the X display: " + proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "window 160x120" in proc.stdout and "p95" in proc.stdout
    res = np.load(out)
    img = res["img"]
    assert img.shape == (120, 160, 3) and shot.is_file()
    sil = img.astype(int).sum(-1) < 740                           # non-white pixels
    K, V = res["K"], res["V"]
    means = res["means"].astype(np.float64)
    pc = means @ V[:3, :3].T + V[:3, 3]
    uv = pc[:, :2] / pc[:, 2:3] @ K[:2, :2].T + K[:2, 2]
    ij = np.floor(uv).astype(int)
    inside = (ij[:, 0] >= 0) & (ij[:, 0] < 160) & (ij[:, 1] >= 0) & (ij[:, 1] < 120)
    assert inside.mean() > 0.99                                   # the camera frames the body
    hit = sil[ij[inside, 1], ij[inside, 0]]
    assert hit.mean() > 0.97                                      # centres project onto the silhouette
    proj = np.zeros_like(sil)
    proj[ij[inside, 1], ij[inside, 0]] = True
    ys, xs = np.nonzero(sil)
    py, px = np.nonzero(proj)
    assert abs(ys.min() - py.min()) <= 3 and abs(ys.max() - py.max()) <= 3
    assert abs(xs.min() - px.min()) <= 3 and abs(xs.max() - px.max()) <= 3
