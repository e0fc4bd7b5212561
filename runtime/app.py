"""The playback application: a bundle driven by a motion clip, in a window or headless.

:class:`Player` ties the pieces together for one frame: motion frame -> :class:`AvatarPipeline`
(pose, inference, skinning) -> :meth:`SurfelRenderer.sort` -> :meth:`SurfelRenderer.draw` /
resolve, timing each stage (:class:`fmgs.runtime.pipeline.FrameTimings`).

* :func:`run_headless` renders every display frame offscreen (the CPU renderer, or OpenGL
  through EGL) into an MP4
  (imageio-ffmpeg, libx264) or a folder of PNGs, written atomically.
* :func:`run_window` opens a GLFW window (OpenGL 4.3 core) and plays in real time: left
  drag orbits, right drag pans, the wheel zooms, space pauses, ``1``-``4`` / ``M`` pick the
  mode (RGB, normal, depth, semantic), ``+``/``-`` change the speed, ``<-``/``->`` step
  when paused, ``F`` toggles following the body, ``R`` resets the camera, ``S`` saves a
  screenshot, ``Esc``/``Q`` quit; the title shows the FPS. Without a display it returns
  :data:`NO_DISPLAY` so the CLI can fall back to headless.

With OpenGL both overlap consecutive frames (:meth:`Player.render_pipelined`): the CPU
work of frame ``i`` (pose, inference, skinning, sort) runs while llvmpipe's rasteriser
threads still shade frame ``i - 1`` (the CPU renderer draws synchronously).
The surfel renderer is the numba CPU splatter (:mod:`fmgs.runtime.splat_cpu`) whenever
OpenGL would run on the CPU anyway, else OpenGL (:func:`choose_renderer`). Both print
frame-time statistics at exit (:func:`format_stats`): mean and p95 of the frame time and the mean split between pose, inference, skinning, sort and draw
(draw = the caller's time in submit + wait + resolve + read-back, so with the overlap it
shrinks by the shading that ran in the background).

``fast=True`` (``fmgs-play --fast``) is an approximate speed-up preset (back-face culling on
the CPU, :data:`FAST_CULL_COS`); the default is the exact 2DGS image.

Camera: :class:`OrbitCamera` in the player's Y-up world (metres), OpenCV axes, square
pixels, principal point at the image centre (pixel centres at +0.5).
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmgs.errors import FmgsInputError
from fmgs.runtime.gl_renderer import (
    ALPHA_MIN, MODES, ROWS, SurfelRenderer, create_headless_context, gl_flush, is_software_renderer,
)
from fmgs.runtime.pipeline import STAGES, AvatarPipeline, FrameTimings

__all__ = ["OrbitCamera", "Player", "RENDERERS", "choose_renderer", "FAST_CULL_COS", "FAST_ALPHA_MIN", "run_headless", "run_window", "format_stats", "summarize",
           "NO_DISPLAY", "is_frames_dir"]

#: Returned by :func:`run_window` when no window can be opened (no display / GLFW failure).
NO_DISPLAY = "no-display"

#: Surfel renderers: ``gl`` (OpenGL, :class:`SurfelRenderer`), ``cpu`` (numba,
#: :class:`fmgs.runtime.splat_cpu.CpuSurfelRenderer`), ``auto`` (:func:`choose_renderer`).
RENDERERS = ("auto", "gl", "cpu")


def choose_renderer(kind: str = "auto", ctx=None) -> str:
    """The renderer to use: ``'gl'`` or ``'cpu'``.

    ``auto`` picks the CPU renderer when OpenGL would run on the CPU anyway (no context given,
    i.e. headless, or a software context such as Mesa's llvmpipe: the numba splatter stops
    each pixel once it is opaque and needs about a third of llvmpipe's CPU time) and numba is
    installed; otherwise OpenGL (a GPU driver).

    Args:
        kind: ``'auto'``, ``'gl'`` or ``'cpu'``.
        ctx: the moderngl context that would be used (None: none yet).
    Raises:
        ValueError: unknown kind; RuntimeError: ``'cpu'`` without numba.
    """
    from fmgs.runtime import splat_cpu

    if kind not in RENDERERS:
        raise ValueError(f"renderer must be one of {RENDERERS}, got {kind!r}")
    if kind == "cpu" and not splat_cpu.available():
        raise RuntimeError("the CPU renderer needs numba (pip install numba)")
    if kind != "auto":
        return kind
    if not splat_cpu.available():
        return "gl"
    return "cpu" if ctx is None or is_software_renderer(ctx) else "gl"


@dataclass
class OrbitCamera:
    """A camera orbiting a target point in a Y-up world (metres, radians).

    The eye is ``target + distance * (cos(el) sin(az), sin(el), cos(el) cos(az))``; it looks
    at ``target`` with world +Y up. :meth:`viewmat` is world -> camera in OpenCV axes (x
    right, y down, z forward); :meth:`K` has focal ``f = (H / 2) / tan(fov_y / 2)`` pixels and
    principal point ``(W / 2, H / 2)`` (the image centre under the +0.5 pixel-centre
    convention).
    """

    target: np.ndarray
    distance: float = 3.0
    azimuth: float = 0.0
    elevation: float = 0.1
    fov_y: float = math.radians(40.0)
    width: int = 512
    height: int = 512

    @property
    def eye(self) -> np.ndarray:
        """(3,) camera centre, world, metres."""
        ce = math.cos(self.elevation)
        d = np.array([ce * math.sin(self.azimuth), math.sin(self.elevation), ce * math.cos(self.azimuth)])
        return np.asarray(self.target, np.float64) + self.distance * d

    def viewmat(self) -> np.ndarray:
        """(4, 4) float64 world -> camera (OpenCV)."""
        eye = self.eye
        fwd = np.asarray(self.target, np.float64) - eye
        fwd /= np.linalg.norm(fwd)
        right = np.cross(fwd, [0.0, 1.0, 0.0])
        if np.linalg.norm(right) < 1e-9:
            right = np.array([1.0, 0.0, 0.0])
        right /= np.linalg.norm(right)
        down = np.cross(fwd, right)
        V = np.eye(4)
        V[:3, :3] = np.stack([right, down, fwd])
        V[:3, 3] = -V[:3, :3] @ eye
        return V

    def K(self) -> np.ndarray:
        """(3, 3) float64 pixel intrinsics."""
        f = 0.5 * self.height / math.tan(0.5 * self.fov_y)
        return np.array([[f, 0.0, 0.5 * self.width], [0.0, f, 0.5 * self.height], [0.0, 0.0, 1.0]])

    def orbit(self, d_az: float, d_el: float) -> None:
        """Rotate about the target (radians); elevation clamped to +-89 degrees."""
        self.azimuth += d_az
        self.elevation = float(np.clip(self.elevation + d_el, -1.55, 1.55))

    def zoom(self, factor: float) -> None:
        """Multiply the distance by ``factor`` (clamped to [0.2, 50] m)."""
        self.distance = float(np.clip(self.distance * factor, 0.2, 50.0))


def summarize(stats: list[FrameTimings], wall: float | None = None) -> dict:
    """Frame-time statistics: ``frames``, ``mean_ms``, ``p95_ms``, ``fps`` (end to end when
    ``wall`` seconds are given, else 1000 / mean), and ``split_ms`` ``{stage: mean ms}``."""
    if not stats:
        return {"frames": 0}
    tot = np.array([s.total for s in stats]) * 1e3
    out = {"frames": len(stats), "mean_ms": float(tot.mean()), "p95_ms": float(np.percentile(tot, 95)),
           "split_ms": {k: float(np.mean([getattr(s, k) for s in stats]) * 1e3) for k in STAGES}}
    extra = sorted({k for s in stats for k in s.extra})
    for k in extra:
        out["split_ms"][k] = float(np.mean([s.extra.get(k, 0.0) for s in stats]) * 1e3)
    out["fps"] = float(len(stats) / wall) if wall else 1e3 / out["mean_ms"]
    return out


def format_stats(stats: list[FrameTimings], wall: float | None = None, label: str = "") -> str:
    """Human-readable :func:`summarize` (printed by ``fmgs-play`` at exit)."""
    s = summarize(stats, wall)
    if not s["frames"]:
        return "no frames rendered"
    split = " | ".join(f"{k} {v:.2f}" for k, v in s["split_ms"].items())
    head = f"{label}{s['frames']} frames, {s['fps']:.1f} FPS" + (" end to end" if wall else "")
    return (f"{head}\nframe time: mean {s['mean_ms']:.2f} ms, p95 {s['p95_ms']:.2f} ms\n"
            f"split (mean ms): {split}")


def _facing_azimuth(pipeline: AvatarPipeline, poses0, wfb0) -> float:
    """Azimuth that puts the camera in front of the body in frame 0 (SMPL faces +z)."""
    from fmgs.body_model import axis_angle_to_matrix

    R = np.asarray(wfb0)[:3, :3] @ axis_angle_to_matrix(np.asarray(poses0[0], np.float64))
    f = R @ np.array([0.0, 0.0, 1.0])
    if abs(f[0]) + abs(f[2]) < 1e-6:
        return 0.0
    return math.atan2(f[0], f[2])


#: ``--fast`` settings (:class:`Player` ``fast=True``): back-face culling threshold (cosine of the
#: angle between the outward normal and the view ray above which a surfel is left out) and the
#: alpha cut-off. Measured PSNR against the exact path: see docs/benchmarks.md / bench_play.py.
FAST_CULL_COS = 0.3
FAST_ALPHA_MIN = 1.0 / 255.0


class Player:
    """Plays a motion on a bundle's avatar into a :class:`SurfelRenderer`.

    Args:
        pipeline: the avatar (:class:`AvatarPipeline`).
        motion: a :class:`fmgs.motion.Motion` at the display rate.
        ctx: moderngl context (headless or window).
        width, height: render size, pixels.
        mode: initial mode (:data:`fmgs.runtime.gl_renderer.MODES`).
        background: RGB in [0, 1].
        precision: colour-target format of the renderer (``'f4'`` default: float32, exact and
            as fast as half floats on llvmpipe; ``'f2'``, ``'f1'``).
        follow: keep the orbit target on the body's centroid.
        camera: optional :class:`OrbitCamera` (default: framed on frame 0, in front).
        cull_backfaces: optional speed-up (None = off, exact): leave out surfels facing away
            with ``cos > cull_backfaces`` (:meth:`SurfelRenderer.sort`, on the CPU).
        fast: approximate speed-up preset (off by default): ``cull_backfaces =``
            :data:`FAST_CULL_COS` (unless given) and ``alpha_min =`` :data:`FAST_ALPHA_MIN`.
        primitive: GL renderer primitive (``'auto'``: points when they fit, else quads).
        renderer: ``'auto'`` (:func:`choose_renderer`), ``'gl'`` or ``'cpu'``; the CPU
            renderer needs no context (``ctx`` may be None) except to show frames in a window.
        threads: threads of the CPU renderer (default: all cores).
    """

    def __init__(self, pipeline: AvatarPipeline, motion, ctx, width: int = 512, height: int = 512,
                 mode: str = "rgb", background=(1.0, 1.0, 1.0), precision: str = "f4", follow: bool = True,
                 camera: OrbitCamera | None = None, cull_backfaces: float | None = None, fast: bool = False,
                 primitive: str = "auto", renderer: str = "auto", threads: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "semantic" and pipeline.semantic_logits is None:
            raise FmgsInputError("the bundle has no semantic_logits; semantic mode is unavailable",
                                 getattr(pipeline.bundle, "path", None))
        self.pipeline, self.motion, self.ctx = pipeline, motion, ctx
        self.mode = mode
        self.background = tuple(float(c) for c in background)
        self.follow = follow
        self.fast = bool(fast)
        self.cull_backfaces = FAST_CULL_COS if fast and cull_backfaces is None else cull_backfaces
        self.alpha_min = FAST_ALPHA_MIN if fast else ALPHA_MIN
        self.primitive = primitive
        if choose_renderer(renderer, ctx) == "cpu":
            from fmgs.runtime.splat_cpu import CpuSurfelRenderer

            # the splat runs on the calling thread: overlapping it with the next frame's models
            # (async_draw) was slower on 2 cores (23.5 vs 26.9 FPS, docs/benchmarks.md)
            self.renderer = CpuSurfelRenderer(width, height, pipeline.S, palette=pipeline.palette, ctx=ctx,
                                              threads=threads)
        else:
            if ctx is None:
                raise RuntimeError("the OpenGL renderer needs a moderngl context")
            self.renderer = SurfelRenderer(ctx, width, height, pipeline.S, precision=precision,
                                           palette=pipeline.palette)
        if pipeline.semantic_logits is not None:
            self.renderer.set_logits(pipeline.semantic_logits)
        pipeline.init_table(self.renderer.table)
        self.stats: list[FrameTimings] = []
        self.last_index = -1
        self._pending = None
        if camera is None:
            camera = self._frame_camera(width, height)
        self.camera = camera
        self._home = (camera.distance, camera.azimuth, camera.elevation)

    def _frame_camera(self, width: int, height: int) -> OrbitCamera:
        m = self.motion
        tab = self.pipeline.frame(m.poses[0], m.world_from_body(0), np.zeros(3), table=self.renderer.table)
        pts = np.asarray(tab[ROWS["means"]]).T
        center = 0.5 * (pts.min(0) + pts.max(0))
        radius = float(np.linalg.norm(pts - center, axis=1).max())
        cam = OrbitCamera(target=center, width=width, height=height)
        cam.distance = 1.15 * radius / math.sin(0.5 * cam.fov_y)
        cam.azimuth = _facing_azimuth(self.pipeline, m.poses[0], m.world_from_body(0))
        return cam

    def reset_camera(self) -> None:
        """Back to the initial distance / azimuth / elevation."""
        self.camera.distance, self.camera.azimuth, self.camera.elevation = self._home

    # ------------------------------------------------------------------ frame stages
    def _prepare(self, index: int) -> dict:
        """CPU part of a frame: pipeline (pose, inference, skinning), camera follow, sort."""
        m = self.motion
        i = int(index) % m.num_frames
        tm = FrameTimings()
        r = self.renderer
        self.pipeline.frame(m.poses[i], m.world_from_body(i), self.camera.eye, table=r.table, timings=tm)
        if self.follow:
            t0 = time.perf_counter()
            pts = r.table[ROWS["means"]]
            self.camera.target = 0.5 * (pts.min(1) + pts.max(1)).astype(np.float64)
            tm.extra["camera"] = time.perf_counter() - t0
        cam = self.camera
        V, K = cam.viewmat(), cam.K()
        t0 = time.perf_counter()
        order = r.sort(V, cull_backfaces=self.cull_backfaces)
        tm.sort = time.perf_counter() - t0
        return {"index": i, "tm": tm, "K": K, "V": V, "order": order, "mode": self.mode}

    def _submit(self, job: dict) -> None:
        """Issue the frame's draw (upload, vertex work, binning) and let the driver start."""
        t0 = time.perf_counter()
        r = self.renderer
        r.draw(job["K"], job["V"], mode=job["mode"], order=job["order"], background=self.background,
               primitive=self.primitive, alpha_min=self.alpha_min)
        job["depth_range"] = r.last_depth_range
        if r.kind == "gl":
            gl_flush()
        job["tm"].draw += time.perf_counter() - t0

    def _finish(self, job: dict, target=None, read: bool = True) -> np.ndarray | None:
        """Wait for the frame's draw, resolve it (into ``target`` or the internal image) and
        read it back; records the frame's timings."""
        t0 = time.perf_counter()
        r = self.renderer
        r.resolve(job["mode"], background=self.background, target=target, depth_range=job["depth_range"])
        img = None
        if target is None and read:
            img = r.read_display()
        elif self.ctx is not None:
            self.ctx.finish()
        tm = job["tm"]
        tm.draw += time.perf_counter() - t0
        self.stats.append(tm)
        self.last_index = job["index"]
        return img

    # ------------------------------------------------------------------ public
    def render(self, index: int, target=None, read: bool = True) -> np.ndarray | None:
        """Render motion frame ``index`` (wrapped) synchronously; returns the (H, W, 3) uint8
        image when ``read`` and no ``target`` (e.g. ``ctx.screen``) is given. Appends the
        frame's timings to :attr:`stats`. A frame still pending from
        :meth:`render_pipelined` is finished (and dropped) first."""
        self.flush(read=False)
        job = self._prepare(index)
        self._submit(job)
        return self._finish(job, target=target, read=read)

    def render_pipelined(self, index: int, target=None, read: bool = True) -> np.ndarray | None:
        """Render frame ``index`` overlapped with the previous one; returns the *previous*
        frame's image (None on the first call; :meth:`flush` returns the last one).

        The CPU part of frame ``index`` (pose, inference, skinning, sort) runs while the
        driver (llvmpipe's rasteriser threads) still shades the previous frame, which is only
        then resolved and read back; frame ``index`` is submitted and flushed before
        returning. The images are the same as :meth:`render`'s, one call later.
        """
        job = self._prepare(index)
        img = None
        if self._pending is not None:
            img = self._finish(self._pending, target=target, read=read)
        self._submit(job)
        self._pending = job
        return img

    def flush(self, target=None, read: bool = True) -> np.ndarray | None:
        """Finish the frame pending from :meth:`render_pipelined` (None when there is none)."""
        if self._pending is None:
            return None
        job, self._pending = self._pending, None
        return self._finish(job, target=target, read=read)


def is_frames_dir(out: str | os.PathLike) -> bool:
    """True when ``out`` names a folder of frames (trailing slash, existing folder or no suffix)."""
    s = str(out)
    return s.endswith(("/", os.sep)) or Path(s).is_dir() or Path(s).suffix == ""


class _Sink:
    """A video file (:class:`fmgs.media.VideoWriter`, published atomically) or a folder of PNGs
    (each written atomically)."""

    def __init__(self, out, fps: float):
        from fmgs.media import VideoWriter

        self.out = Path(out)
        self.frames_dir = is_frames_dir(out)
        self.count = 0
        self._video = None
        if self.frames_dir:
            self.out.mkdir(parents=True, exist_ok=True)
        else:
            self._video = VideoWriter(self.out, fps)

    def write(self, img: np.ndarray) -> None:
        if self.frames_dir:
            import imageio.v3 as iio

            from fmgs.atomic import atomic_path

            with atomic_path(self.out / f"frame_{self.count:06d}.png") as tmp:
                iio.imwrite(tmp, img)
        else:
            self._video.write(img)
        self.count += 1

    def close(self, ok: bool = True) -> None:
        if self._video is not None:
            video, self._video = self._video, None
            video.close(ok)


def run_headless(player_args: dict, out, frames: int | None = None, ctx=None, log=print) -> dict:
    """Render a motion offscreen into ``out`` (``.mp4`` or a frames folder): with the CPU
    renderer (no OpenGL needed) or OpenGL through EGL (``player_args['renderer']``,
    :func:`choose_renderer` with no context).

    Args:
        player_args: keyword arguments of :class:`Player` except ``ctx``.
        out: output path; a folder (trailing ``/``, existing, or no suffix) gets
            ``frame_%06d.png`` files.
        frames: number of display frames (default: the whole motion once).
        ctx: optional existing moderngl context.
        log: printer for the statistics.
    Returns:
        :func:`summarize` dict plus ``out`` and ``providers`` (the pipeline's description).
    Raises:
        FmgsInputError: bad output path, ``frames < 1`` or nothing rendered (no file is
            left at ``out``); RuntimeError: no OpenGL 4.3 context (GL renderer).
    """
    if frames is not None and int(frames) < 1:
        raise FmgsInputError(f"--frames must be at least 1, got {frames}")
    if ctx is None and choose_renderer(player_args.get("renderer", "auto"), None) == "gl":
        ctx = create_headless_context()
    player = Player(ctx=ctx, **player_args)
    m = player.motion
    n = int(frames) if frames is not None else m.num_frames
    if n < 1:
        raise FmgsInputError("the motion has no frames to render", getattr(m, "path", None))
    sink = _Sink(out, m.fps)
    ok = False
    t_start = time.perf_counter()
    try:
        # overlapped: frame i's CPU work runs while llvmpipe still shades frame i - 1
        for i in range(n + 1):
            img = player.render_pipelined(i) if i < n else player.flush()
            if img is None:
                continue
            t0 = time.perf_counter()
            sink.write(img)
            player.stats[-1].extra["output"] = time.perf_counter() - t0
        ok = True
    finally:
        sink.close(ok)
    wall = time.perf_counter() - t_start
    log(format_stats(player.stats, wall, label=f"headless {player.renderer.width}x{player.renderer.height} "
                                                f"{player.mode}: "))
    res = summarize(player.stats, wall)
    res.update(out=str(out), providers=player.pipeline.describe())
    return res


def run_window(player_args: dict, title: str = "fmgs-play", max_frames: int | None = None,
               screenshot: str | None = None, log=print):
    """Play in a GLFW window until closed (or ``max_frames`` frames, for tests).

    Args:
        player_args: keyword arguments of :class:`Player` except ``ctx``.
        title: window title prefix (the FPS, mode and speed are appended).
        max_frames: stop after this many frames (None: until the window closes).
        screenshot: save the last frame's framebuffer to this PNG before closing.
        log: printer.
    Returns:
        :data:`NO_DISPLAY` (str) when no window could be opened, else the :func:`summarize`
        dict (plus ``screenshot_image``: the last framebuffer, (H, W, 3) uint8, and ``camera``).
    """
    try:
        import glfw
    except Exception as exc:  # pragma: no cover - glfw is a dependency
        log(f"fmgs-play: cannot import glfw ({exc})")
        return NO_DISPLAY
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY") and sys.platform.startswith("linux"):
        log("fmgs-play: no display ($DISPLAY / $WAYLAND_DISPLAY unset)")
        return NO_DISPLAY
    if not glfw.init():
        log("fmgs-play: GLFW could not initialise a display")
        return NO_DISPLAY
    width = int(player_args.get("width", 512))
    height = int(player_args.get("height", 512))
    glfw.window_hint(glfw.CONTEXT_VERSION_MAJOR, 4)
    glfw.window_hint(glfw.CONTEXT_VERSION_MINOR, 3)
    glfw.window_hint(glfw.OPENGL_PROFILE, glfw.OPENGL_CORE_PROFILE)
    glfw.window_hint(glfw.OPENGL_FORWARD_COMPAT, True)
    glfw.window_hint(glfw.RESIZABLE, True)
    win = glfw.create_window(width, height, title, None, None)
    if not win:
        glfw.terminate()
        log("fmgs-play: GLFW could not open an OpenGL 4.3 window")
        return NO_DISPLAY
    import moderngl

    glfw.make_context_current(win)
    glfw.swap_interval(0)
    ctx = moderngl.create_context(require=430)
    fbw, fbh = glfw.get_framebuffer_size(win)
    player_args = dict(player_args, width=fbw, height=fbh)
    player = Player(ctx=ctx, **player_args)
    cam = player.camera
    state = {"paused": False, "speed": 1.0, "t": 0.0, "drag": None, "last": None, "quit": False,
             "shot": False}

    def on_key(w, key, sc, action, mods):
        if action not in (glfw.PRESS, glfw.REPEAT):
            return
        if key in (glfw.KEY_ESCAPE, glfw.KEY_Q):
            state["quit"] = True
        elif key == glfw.KEY_SPACE:
            state["paused"] = not state["paused"]
        elif key in (glfw.KEY_1, glfw.KEY_2, glfw.KEY_3, glfw.KEY_4):
            mode = MODES[key - glfw.KEY_1]
            if mode != "semantic" or player.pipeline.semantic_logits is not None:
                player.mode = mode
        elif key == glfw.KEY_M:
            k = (MODES.index(player.mode) + 1) % len(MODES)
            if MODES[k] == "semantic" and player.pipeline.semantic_logits is None:
                k = 0
            player.mode = MODES[k]
        elif key in (glfw.KEY_EQUAL, glfw.KEY_KP_ADD, glfw.KEY_UP):
            state["speed"] = min(state["speed"] * 1.25, 16.0)
        elif key in (glfw.KEY_MINUS, glfw.KEY_KP_SUBTRACT, glfw.KEY_DOWN):
            state["speed"] = max(state["speed"] / 1.25, 1.0 / 16.0)
        elif key == glfw.KEY_RIGHT:
            state["t"] += 1.0 / player.motion.fps
        elif key == glfw.KEY_LEFT:
            state["t"] -= 1.0 / player.motion.fps
        elif key == glfw.KEY_F:
            player.follow = not player.follow
        elif key == glfw.KEY_R:
            player.reset_camera()
        elif key == glfw.KEY_S:
            state["shot"] = True

    def on_button(w, button, action, mods):
        state["drag"] = button if action == glfw.PRESS else None
        state["last"] = glfw.get_cursor_pos(w)

    def on_cursor(w, x, y):
        if state["drag"] is None or state["last"] is None:
            return
        dx, dy = x - state["last"][0], y - state["last"][1]
        state["last"] = (x, y)
        if state["drag"] == glfw.MOUSE_BUTTON_LEFT:
            cam.orbit(-dx * 0.01, dy * 0.01)
        else:   # pan in the image plane
            V = cam.viewmat()
            s = cam.distance / cam.K()[0, 0]
            cam.target = np.asarray(cam.target) - s * (dx * V[0, :3] + dy * V[1, :3])

    def on_scroll(w, dx, dy):
        cam.zoom(0.9 ** dy)

    glfw.set_key_callback(win, on_key)
    glfw.set_mouse_button_callback(win, on_button)
    glfw.set_cursor_pos_callback(win, on_cursor)
    glfw.set_scroll_callback(win, on_scroll)
    t_prev = time.perf_counter()
    t_title = t_prev
    n_title = 0
    t_start = t_prev
    frames = 0
    shot = None
    try:
        while not glfw.window_should_close(win) and not state["quit"]:
            glfw.poll_events()
            fbw, fbh = glfw.get_framebuffer_size(win)
            if (fbw, fbh) != (player.renderer.width, player.renderer.height) and fbw > 0 and fbh > 0:
                player.flush(read=False)
                player.renderer.resize(fbw, fbh)
                cam.width, cam.height = fbw, fbh
            now = time.perf_counter()
            if not state["paused"]:
                state["t"] += (now - t_prev) * state["speed"]
            t_prev = now
            idx = int(math.floor(state["t"] * player.motion.fps))
            # overlapped: this frame's CPU work runs while the previous one is shaded, which is
            # then shown (the first frame, and the last one of a capped run, synchronously)
            last = max_frames is not None and frames + 1 >= max_frames
            if frames == 0 or last:
                player.render(idx, target=ctx.screen)
            else:
                player.render_pipelined(idx, target=ctx.screen)
            frames += 1
            if state["shot"] or (last and screenshot):
                raw = ctx.screen.read(components=3)
                shot = np.frombuffer(raw, np.uint8).reshape(fbh, fbw, 3)[::-1].copy()
                if state["shot"]:
                    import imageio.v3 as iio

                    from fmgs.atomic import atomic_path

                    path = Path(f"fmgs-play-{int(time.time())}.png")
                    with atomic_path(path) as tmp:
                        iio.imwrite(tmp, shot)
                    log(f"saved {path}")
                    state["shot"] = False
            glfw.swap_buffers(win)
            n_title += 1
            if now - t_title > 0.5:
                fps = n_title / (now - t_title)
                glfw.set_window_title(win, f"{title} - {fps:.1f} FPS - {player.mode} - "
                                           f"x{state['speed']:.2f}{' (paused)' if state['paused'] else ''}")
                t_title, n_title = now, 0
            if max_frames is not None and frames >= max_frames:
                break
    finally:
        player.flush(read=False)
        wall = time.perf_counter() - t_start
        log(format_stats(player.stats, wall, label=f"window {player.renderer.width}x{player.renderer.height}: "))
        res = summarize(player.stats, wall)
        if screenshot and shot is not None:
            import imageio.v3 as iio

            from fmgs.atomic import atomic_path

            with atomic_path(screenshot) as tmp:
                iio.imwrite(tmp, shot)
        res["screenshot_image"] = shot
        res["camera"] = {"K": cam.K(), "viewmat": cam.viewmat()}
        res["table"] = np.array(player.renderer.table)
        player.renderer.release()
        glfw.destroy_window(win)
        glfw.terminate()
    return res
