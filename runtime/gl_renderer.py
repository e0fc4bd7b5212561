"""OpenGL (moderngl) renderer of 2D Gaussian surfels for the torch-free runtime.

One primitive per surfel; the fragment shader intersects every pixel ray with the surfel
plane and evaluates the exact 2DGS local coordinates (u, v) with the screen-space low-pass
filter (Huang et al., "2D Gaussian Splatting", SIGGRAPH 2024, eq. 9-12), exactly as the
trainer's reference rasteriser (:mod:`fmgs.trainer.render.cpu`):
``alpha = min(0.99, o exp(-min(rho3d, rho2d)/2))`` with ``rho2d = 2 |pix - proj(p)|^2``
(pixels), fragments below 1/255 discarded, fragment depth = ray-plane intersection depth
where the 3D term is used, else the centre depth, normals flipped to face the camera.
Fragments are premultiplied by alpha and blended back to front (surfels sorted by
camera-space centre depth, the reverse of the trainer's front-to-back order) with
``(ONE, ONE_MINUS_SRC_ALPHA)``, which gives the same ``sum_i w_i f_i`` with
``w_i = alpha_i prod_{j<i} (1 - alpha_j)``; the only difference is the trainer's early stop
once the transmittance drops below 1e-4 (<= 1e-4 per pixel).

Primitives (:meth:`SurfelRenderer.draw` ``primitive=``; all give the same image):

* ``points`` -- one GL point per surfel, a square around the pixel box of its support
  (the dual conic of the alpha >= 1/255 ellipse united with the filter disc, as
  ``raster_cpu._surfel_boxes``). One vertex per surfel makes it the cheapest on Mesa's
  llvmpipe, whose per-primitive work (vertex shading, setup, binning on the calling
  thread; per-command overhead in the rasteriser threads) dominates small splats.
* ``quads`` -- an instanced 4-vertex strip per surfel: the projected surfel-plane square
  ``p +- r s_u t_u +- r s_v t_v`` (tangent to the cut-off ellipse) grown by the filter
  radius, or the pixel box when that is smaller. For surfels too large for a point.
* ``auto`` (default) -- points when :meth:`SurfelRenderer.points_fit` proves every
  support fits the implementation's largest point (llvmpipe: 255 px), else quads.

Surfel data live in one planar float32 table ``(16, S)`` (:data:`ROWS`) uploaded as a
shader storage buffer each frame; the draw order is a separate ``uint32`` vertex/instance
buffer, so sorting never moves the surfel data. The per-surfel camera terms (ray-splat
matrix, support) are computed in the vertex shader and passed as four flat ``vec4``.

Render targets: RGBA colour (float32 by default; ``precision='f2'`` half or ``'f1'`` 8-bit
trade accuracy for nothing on llvmpipe, where blending costs the same), plus camera-space
normal and depth targets (float32) in the ``normal``/``depth`` modes and 10 float32 targets
of 3 semantic logits each (two passes of 5) in the ``semantic`` mode. A resolve pass (one
program per mode) turns them into an 8-bit image for the window or a video. Needs OpenGL
4.3 (storage buffers): Mesa llvmpipe (EGL or GLX), any desktop GPU. Creating a renderer
calls :func:`tune_allocator` (glibc heap settings that spare llvmpipe per-frame page faults).

Conventions: cameras are OpenCV (``K`` pixels, world-to-camera ``viewmat``, x right, y
down, z forward, metres); pixel (i, j) has its centre at (j + 0.5, i + 0.5); images come
back with row 0 at the top, like the trainer's.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fmgs.errors import FmgsInputError

__all__ = ["ROWS", "NUM_ROWS", "MODES", "ALPHA_MIN", "SHADER_DIR", "create_headless_context", "tune_allocator",
           "gl_flush", "SurfelTableMixin", "SurfelRenderer", "back_to_front_order", "is_software_renderer"]

#: Rows of the planar surfel table ``(NUM_ROWS, S)`` float32 the renderer uploads.
ROWS = {"means": slice(0, 3), "t_u": slice(3, 6), "t_v": slice(6, 9), "scales": slice(9, 11),
        "opacity": 11, "colors": slice(12, 15)}
#: Number of table rows (row 15 is padding).
NUM_ROWS = 16
#: Display modes.
MODES = ("rgb", "normal", "depth", "semantic")
#: The trainer's alpha cut-off: fragments with ``alpha < 1/255`` are discarded.
ALPHA_MIN = 1.0 / 255.0
_MODE_ID = {m: i for i, m in enumerate(MODES)}
_LOGITS_PER_PASS = 5           # colour attachments per semantic pass (3 logits each)
_MAX_LOGIT_TARGETS = 10        # 30 logits max (Sapiens: 28)

try:
    from fmgs.assets import ASSETS_DIR as _ASSETS
except Exception:  # pragma: no cover - the package always ships assets
    _ASSETS = Path(__file__).resolve().parents[1] / "assets"
#: Folder of the GLSL sources (package data ``fmgs.assets/shaders``).
SHADER_DIR = Path(_ASSETS) / "shaders"


_ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """Keep freed heap memory in the process instead of returning it to the OS (glibc only).

    Mesa's llvmpipe allocates its per-frame scene and vertex memory (several MB) afresh every
    frame; with glibc's defaults those blocks are ``mmap``-ed and ``munmap``-ed each time, so
    every frame pays for page faults on fresh pages (measured: the main thread of a 55k-surfel
    draw spent more time in the kernel than in llvmpipe). ``mallopt(M_MMAP_THRESHOLD, 32 MiB)``
    and ``mallopt(M_TRIM_THRESHOLD, 256 MiB)`` make the heap reuse them instead (draw CPU time
    -20 %, the submitting thread -50 % at 512^2). Process-wide and idempotent; a no-op where
    ``mallopt`` is unavailable (not glibc).

    Returns:
        True when the settings were applied (now or earlier).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3          # glibc <malloc.h>
    ok = bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))
    _ALLOCATOR_TUNED = ok
    return ok


_GL_FLUSH = None


def gl_flush() -> bool:
    """``glFlush()`` on the current OpenGL context (moderngl only exposes ``finish``).

    Lets the driver start executing the commands issued so far without waiting for them: on
    llvmpipe the rasteriser threads then shade the frame while the caller's thread prepares
    the next one (see :meth:`fmgs.runtime.app.Player.render_pipelined`). Resolved once through
    libglvnd's ``libOpenGL.so.0`` (or ``libGL.so.1``), which dispatches to the current EGL or
    GLX context.

    Returns:
        False when no ``glFlush`` symbol could be found (then nothing happens; results are
        still correct, only not overlapped).
    """
    global _GL_FLUSH
    if _GL_FLUSH is None:
        import ctypes

        _GL_FLUSH = False
        for name in ("libOpenGL.so.0", "libGL.so.1", "libGL.so", "opengl32"):
            try:
                _GL_FLUSH = ctypes.CDLL(name).glFlush
                _GL_FLUSH.restype = None
                _GL_FLUSH.argtypes = []
                break
            except (OSError, AttributeError):
                continue
    if _GL_FLUSH:
        _GL_FLUSH()
        return True
    return False


def create_headless_context(require: int = 430):
    """A standalone (offscreen) OpenGL context through EGL (Mesa llvmpipe without a GPU).

    Returns:
        ``moderngl.Context``.
    Raises:
        RuntimeError: no EGL / OpenGL >= ``require`` available (message says what failed).
    """
    import moderngl

    errors = []
    for backend in ("egl", None):
        try:
            kw = {"backend": backend} if backend else {}
            return moderngl.create_standalone_context(require=require, **kw)
        except Exception as exc:  # noqa: BLE001 - report every attempt
            errors.append(f"{backend or 'default'}: {exc}")
    raise RuntimeError("cannot create a headless OpenGL >= %d.%d context (%s); install Mesa's EGL "
                       "(Debian: libegl1 libegl-mesa0 libgl1-mesa-dri)"
                       % (require // 100, require % 100 // 10, "; ".join(errors)))


def is_software_renderer(ctx) -> bool:
    """True when a moderngl context renders on the CPU (Mesa llvmpipe / softpipe / swrast,
    SwiftShader, Microsoft's GDI renderer), from its ``GL_RENDERER`` string."""
    name = str(ctx.info.get("GL_RENDERER", "")).lower()
    return any(k in name for k in ("llvmpipe", "softpipe", "swrast", "swiftshader", "gdi generic", "software"))


def back_to_front_order(zc: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
    """Front-to-back order of surfels by centre depth, ties by index (draw it reversed).

    Exactly ``np.argsort(zc, kind="stable")`` -- the trainer's order, ties included (a
    55k-surfel avatar has ~900 exactly equal float32 depths per frame) -- computed with
    NumPy's introsort and a stable re-sort of the tied runs only: 0.8 ms instead of the 2.5 ms
    of a stable (radix/tim) sort at 55k surfels, also for the nearly sorted depths of an
    animation (the float jitter moves almost every element, so timsort gains nothing).

    Args:
        zc: (S,) float32/float64 camera-space centre depths (metres).
        previous: accepted for compatibility (last frame's order); not needed.
    Returns:
        (S,) int64 front-to-back order ``f`` (``zc[f]`` non-decreasing, equal depths by
        increasing index); draw ``f[::-1]``.
    """
    del previous
    zc = np.asarray(zc)
    order = np.argsort(zc)
    zs = zc[order]
    tie = zs[1:] == zs[:-1]
    if zs.size and np.isnan(zs[-1]):                 # NaNs sort last; keep them by index too
        nan = np.isnan(zs)
        tie |= nan[1:] & nan[:-1]
    if tie.any():
        runs = np.zeros(zc.shape[0], bool)
        runs[1:] |= tie
        runs[:-1] |= tie
        pos = np.flatnonzero(runs)
        sub = order[pos]
        order[pos] = sub[np.lexsort((sub, zs[pos]))]
    return order


def _shader(name: str) -> str:
    path = SHADER_DIR / name
    try:
        return path.read_text()
    except OSError as exc:
        raise FmgsInputError(f"shader source missing ({exc}); reinstall the package", path) from None


def _with_defines(src: str, defines: dict) -> str:
    lines = src.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("#version"):
            extra = [f"#define {k} {v}" for k, v in defines.items()]
            return "\n".join(lines[: i + 1] + extra + lines[i + 1:])
    raise ValueError("shader without #version")


def _set(prog, name: str, value) -> None:
    """Set a uniform if the compiler kept it (unused uniforms are optimised away)."""
    try:
        u = prog[name]
    except KeyError:
        return
    if isinstance(value, np.ndarray):
        u.write(np.ascontiguousarray(value).tobytes())
    else:
        u.value = value


class SurfelTableMixin:
    """What both surfel renderers (:class:`SurfelRenderer`, OpenGL, and
    :class:`fmgs.runtime.splat_cpu.CpuSurfelRenderer`, numba) share: the planar surfel table
    (:attr:`table`, :data:`ROWS`), the trainer's draw order, back-face culling on the CPU, the
    semantic palette and the one-shot :meth:`render_arrays`. Subclasses provide
    ``_alloc_surfels``, ``set_logits``, ``draw``, ``read_layers``, ``read_logits`` and
    ``_semantic_alpha``."""

    def _init_palette(self, palette) -> None:
        """(32, 3) float32 class colours in [0, 1] from ``palette`` ((C, 3), [0, 1] or 0-255;
        default the Sapiens palette, ``fmgs.priors.SAPIENS_PALETTE``)."""
        if palette is None:
            from fmgs.priors import SAPIENS_PALETTE
            palette = SAPIENS_PALETTE
        pal = np.asarray(palette, np.float64)
        if pal.max() > 1.0:
            pal = pal / 255.0
        self._palette = np.zeros((32, 3), np.float32)
        self._palette[: min(len(pal), 32)] = pal[:32]

    def sort(self, viewmat, coherent: bool = True, cull_backfaces: float | None = None) -> np.ndarray:
        """Back-to-front draw order of the current table for a camera.

        Args:
            viewmat: (4, 4) world -> camera (OpenCV).
            coherent: accepted for compatibility (the order never depends on the last frame).
            cull_backfaces: optional speed-up (None: off, exact): leave out surfels whose
                outward normal ``t_u x t_v`` points away from the camera with
                ``cos(normal, centre - camera) > cull_backfaces`` (:meth:`facing_mask`), so
                they cost nothing in :meth:`draw` (the shader-side ``draw(cull_backfaces=)``
                still runs the vertex shader for them).
        Returns:
            (S',) uint32 draw order (farthest centre first); S' = S without culling.
        """
        V = np.asarray(viewmat, np.float32)
        zc = V[2, :3] @ self.table[0:3] + V[2, 3]
        front = back_to_front_order(zc)
        self.last_depth_range = (float(zc.min()), float(zc.max())) if zc.size else (0.0, 1.0)
        order = front[::-1].astype(np.uint32)
        if cull_backfaces is not None:
            order = order[self.facing_mask(viewmat, cull_backfaces)[order]]
        return order

    def facing_mask(self, viewmat, cull_backfaces: float) -> np.ndarray:
        """Surfels kept by back-face culling: ``cos(t_u x t_v, mu - c) <= cull_backfaces``.

        Args:
            viewmat: (4, 4) world -> camera (OpenCV); ``c = -R^T t`` is the camera centre.
            cull_backfaces: cosine threshold in [-1, 1] (0: drop every surfel whose outward
                normal points away from the camera; larger keeps grazing ones).
        Returns:
            (S,) bool, True = drawn.
        """
        V = np.asarray(viewmat, np.float64)
        cam = (-V[:3, :3].T @ V[:3, 3]).astype(np.float32)
        t = self.table
        tu, tv = t[ROWS["t_u"]], t[ROWS["t_v"]]
        n0 = tu[1] * tv[2] - tu[2] * tv[1]
        n1 = tu[2] * tv[0] - tu[0] * tv[2]
        n2 = tu[0] * tv[1] - tu[1] * tv[0]
        d0, d1, d2 = t[0] - cam[0], t[1] - cam[1], t[2] - cam[2]
        nd = n0 * d0 + n1 * d1 + n2 * d2
        norm = np.sqrt((n0 * n0 + n1 * n1 + n2 * n2) * (d0 * d0 + d1 * d1 + d2 * d2))
        return nd <= np.float32(cull_backfaces) * norm

    def set_surfels(self, means, rotations, scales, opacities, colors=None) -> None:
        """Fill :attr:`table` from per-surfel arrays (re-allocating for a new count).

        Args:
            means: (S, 3) world centres (metres).
            rotations: (S, 3, 3) world frames, columns ``[t_u, t_v, n]`` (proper rotations;
                the shader uses ``n = t_u x t_v``).
            scales: (S, 2) ``(s_u, s_v)`` metres.
            opacities: (S,) in [0, 1].
            colors: optional (S, 3) colours (any range; composited linearly).
        Raises:
            ValueError: inconsistent shapes.
        """
        means = np.asarray(means, np.float32)
        S = means.shape[0]
        R = np.asarray(rotations, np.float32)
        sc = np.asarray(scales, np.float32)
        op = np.asarray(opacities, np.float32).reshape(-1)
        if means.shape != (S, 3) or R.shape != (S, 3, 3) or sc.shape != (S, 2) or op.shape != (S,):
            raise ValueError(f"surfel arrays disagree: means {means.shape}, rotations {R.shape}, "
                             f"scales {sc.shape}, opacities {op.shape}")
        self._alloc_surfels(S)
        t = self.table
        t[ROWS["means"]] = means.T
        t[ROWS["t_u"]] = R[:, :, 0].T
        t[ROWS["t_v"]] = R[:, :, 1].T
        t[ROWS["scales"]] = sc.T
        t[ROWS["opacity"]] = op
        if colors is not None:
            c = np.asarray(colors, np.float32)
            if c.shape != (S, 3):
                raise ValueError(f"colors must be (S, 3), got {c.shape}")
            t[ROWS["colors"]] = c.T

    def render_arrays(self, means, rotations, scales, opacities, colors, K, viewmat,
                      mode: str = "depth", logits=None, background=None, near: float = 0.01) -> dict:
        """One-shot render of explicit surfels (tests, tools): fill, sort, draw, read.

        Arguments as :meth:`set_surfels` and :meth:`draw`; ``logits`` (S, C) for the
        semantic mode. Returns :meth:`read_layers` (``mode != 'semantic'``) or
        ``{'logits': (H, W, C), 'alpha': (H, W)}``.
        """
        self.set_surfels(means, rotations, scales, opacities, colors)
        if logits is not None:
            self.set_logits(logits)
        self.draw(K, viewmat, mode=mode, order=self.sort(viewmat, coherent=False), near=near,
                  background=(0.0, 0.0, 0.0) if background is None else background)
        if mode == "semantic":
            return {"logits": self.read_logits(), "alpha": self._semantic_alpha()}
        return self.read_layers(background=background)


class SurfelRenderer(SurfelTableMixin):
    """2DGS surfel renderer, one point or quad per surfel (see the module docstring).

    Args:
        ctx: a ``moderngl.Context`` with OpenGL >= 4.3 (:func:`create_headless_context`,
            or ``moderngl.create_context()`` on a GLFW window).
        width, height: render size in pixels.
        num_surfels: S, number of surfels (the table capacity; :meth:`render_arrays`
            re-allocates for another count).
        precision: colour-target format, ``'f4'`` (float32, exact; default), ``'f2'``
            (half) or ``'f1'`` (8-bit unorm, moderngl's name; ~0.5/255 rounding per
            blend). Normal/depth/logit targets are always float32.
        palette: optional (C, 3) float RGB in [0, 1] of the semantic classes (C <= 30);
            default the Sapiens palette (``fmgs.priors.SAPIENS_PALETTE``).

    Attributes:
        table: ``(16, S)`` float32 planar surfel table (:data:`ROWS`); write world-space
            centres, unit tangents ``t_u``, ``t_v`` (a right-handed frame: the normal is
            ``t_u x t_v``), scales (metres), opacity in [0, 1] and colour, then call
            :meth:`draw`.
        max_point_size: largest point size of the context (pixels; llvmpipe 255).
        last_primitive: ``'points'`` or ``'quads'``, the primitive of the last draw.
        last_depth_range: (min, max) centre depth of the last :meth:`sort` (metres).
    Raises:
        ValueError: bad size, count or precision.
    """

    kind = "gl"

    def __init__(self, ctx, width: int, height: int, num_surfels: int, precision: str = "f4",
                 palette=None):
        import moderngl

        self._mgl = moderngl
        tune_allocator()
        if precision not in ("f4", "f2", "f1"):
            raise ValueError(f"precision must be 'f4', 'f2' or 'f1', got {precision!r}")
        self.ctx = ctx
        self.precision = precision
        self.width = self.height = 0
        self.num_surfels = 0
        self._num_logits = 0
        self._init_palette(palette)

        self._src = {"vs": _shader("surfel.vert"), "fs": _shader("surfel.frag"),
                     "rvs": _shader("resolve.vert"), "rfs": _shader("resolve.frag")}
        self._progs: dict = {}
        self._vaos: dict = {}
        self._resolve: dict = {}
        self._empty_vaos: dict = {}
        lo_hi = ctx.info.get("GL_POINT_SIZE_RANGE") or (1.0, 1.0)
        #: largest point size (pixels) the implementation rasterises (llvmpipe: 255)
        self.max_point_size = float(lo_hi[1])
        #: primitive of the last :meth:`draw` (``'points'`` or ``'quads'``)
        self.last_primitive = None
        self._program("rgb", "points")           # compile the default pass now (errors surface here)
        self._alloc_surfels(int(num_surfels))
        self.resize(width, height)

    # ------------------------------------------------------------------ programs
    def _program(self, kind: str, primitive: str):
        """The (lazily compiled) surfel program of a pass kind (``rgb``/``geo``/``logits``) and
        primitive (``points``/``quads``); vertex and fragment shader share the defines."""
        key = (kind, primitive)
        if key not in self._progs:
            defines = {"POINTS": 1} if primitive == "points" else {}
            if kind == "geo":
                defines["OUT_GEOMETRY"] = 1
            elif kind == "logits":
                defines["OUT_LOGITS"] = _LOGITS_PER_PASS
            self._progs[key] = self.ctx.program(vertex_shader=_with_defines(self._src["vs"], defines),
                                                fragment_shader=_with_defines(self._src["fs"], defines))
        return self._progs[key]

    def _vao(self, kind: str, primitive: str):
        key = (kind, primitive)
        if key not in self._vaos:
            fmt = "1u" if primitive == "points" else "1u /i"
            self._vaos[key] = self.ctx.vertex_array(self._program(kind, primitive),
                                                    [(self._idx_buf, fmt, "in_idx")])
        return self._vaos[key]

    def _resolve_program(self, mode: str):
        if mode not in self._resolve:
            prog = self.ctx.program(vertex_shader=self._src["rvs"],
                                    fragment_shader=_with_defines(self._src["rfs"], {"MODE": _MODE_ID[mode]}))
            self._resolve[mode] = prog
            self._empty_vaos[mode] = self.ctx.vertex_array(prog, [])
        return self._resolve[mode], self._empty_vaos[mode]

    # ------------------------------------------------------------------ allocation
    def _alloc_surfels(self, S: int) -> None:
        if S <= 0:
            raise ValueError(f"num_surfels must be positive, got {S}")
        if S == self.num_surfels:
            return
        for name in ("_table_buf", "_idx_buf", "_logit_buf"):
            if getattr(self, name, None) is not None:
                getattr(self, name).release()
        self.num_surfels = S
        self.table = np.zeros((NUM_ROWS, S), np.float32)
        self._table_buf = self.ctx.buffer(reserve=self.table.nbytes, dynamic=True)
        self._idx_buf = self.ctx.buffer(reserve=S * 4, dynamic=True)
        self._logit_buf = None
        self._num_logits = 0
        for vao in self._vaos.values():
            vao.release()
        self._vaos = {}

    def resize(self, width: int, height: int) -> None:
        """(Re)allocate the render targets for ``width`` x ``height`` pixels."""
        width, height = int(width), int(height)
        if width <= 0 or height <= 0:
            raise ValueError(f"render size must be positive, got {width}x{height}")
        if (width, height) == (self.width, self.height):
            return
        for name in ("_fbo_rgb", "_fbo_geo", "_fbo_display"):
            if getattr(self, name, None) is not None:
                getattr(self, name).release()
        for name in ("_tex_color", "_tex_normal", "_tex_depth", "_tex_display"):
            if getattr(self, name, None) is not None:
                getattr(self, name).release()
        for t in getattr(self, "_tex_logits", []):
            t.release()
        for f in getattr(self, "_fbo_logits", []):
            f.release()
        self.width, self.height = width, height
        ctx, size = self.ctx, (width, height)
        self._tex_color = ctx.texture(size, 4, dtype=self.precision)
        self._tex_normal = ctx.texture(size, 4, dtype="f4")
        self._tex_depth = ctx.texture(size, 4, dtype="f4")
        self._tex_display = ctx.texture(size, 4, dtype="f1")
        self._tex_logits = [ctx.texture(size, 4, dtype="f4") for _ in range(_MAX_LOGIT_TARGETS)]
        for t in [self._tex_color, self._tex_normal, self._tex_depth, self._tex_display, *self._tex_logits]:
            t.filter = (self._mgl.NEAREST, self._mgl.NEAREST)
        # 8-bit colour ('f1'): the RGB mode draws straight into the display target, cleared to
        # (background, 0): back-to-front "over" then yields sum w c + (1 - alpha) background, so
        # the resolve pass is skipped
        self._direct = self.precision == "f1"
        self._fbo_rgb = ctx.framebuffer(color_attachments=[self._tex_display if self._direct else self._tex_color])
        self._fbo_geo = ctx.framebuffer(color_attachments=[self._tex_color, self._tex_normal, self._tex_depth])
        self._fbo_logits = [ctx.framebuffer(color_attachments=self._tex_logits[k:k + _LOGITS_PER_PASS])
                            for k in range(0, _MAX_LOGIT_TARGETS, _LOGITS_PER_PASS)]
        self._fbo_display = ctx.framebuffer(color_attachments=[self._tex_display])
        self._last_mode = None

    # ------------------------------------------------------------------ static data
    def set_logits(self, logits) -> None:
        """Per-surfel semantic logits for the ``semantic`` mode.

        Args:
            logits: (S, C) float, C <= 30 (Sapiens: 28), unnormalised (eq. 8).
        Raises:
            ValueError: wrong shape.
        """
        lg = np.asarray(logits, np.float32)
        if lg.ndim != 2 or lg.shape[0] != self.num_surfels or not 0 < lg.shape[1] <= 3 * _MAX_LOGIT_TARGETS:
            raise ValueError(f"logits must be (S={self.num_surfels}, C<=30), got {lg.shape}")
        planar = np.ascontiguousarray(lg.T)
        if self._logit_buf is not None:
            self._logit_buf.release()
        self._logit_buf = self.ctx.buffer(planar.tobytes())
        self._num_logits = int(lg.shape[1])

    # ------------------------------------------------------------------ per frame
    def points_fit(self, K, viewmat, near: float = 0.01, alpha_min: float = ALPHA_MIN) -> bool:
        """Whether every drawn surfel's support fits a GL point (:meth:`draw`'s ``'auto'``).

        A point is a square of side ``<= max_point_size`` (llvmpipe: 255 px). The support of
        a surfel lies in the sphere of radius ``R = sqrt(2 ln(o / alpha_min)) max(s_u, s_v)``
        around its camera-space centre ``p``; its projection deviates from ``proj(p)`` by at
        most ``f R |(p_x|p_y, p_z)| / (p_z (p_z - R))`` pixels per axis, plus the low-pass
        filter radius ``sqrt(ln(o / alpha_min))``. Surfels behind ``near`` are ignored (culled
        by the shader). Always true when the viewport itself fits a point.

        Args:
            K: (3, 3) pixel intrinsics; viewmat: (4, 4) world -> camera (OpenCV).
            near: near culling distance (metres), as :meth:`draw`.
            alpha_min: alpha cut-off, as :meth:`draw`.
        Returns:
            True when the point primitive covers every surfel exactly.
        """
        limit = self.max_point_size - 2.0
        if max(self.width, self.height) + 1.0 <= limit:
            return True
        V = np.asarray(viewmat, np.float32)
        t = self.table
        pc = V[:3, :3] @ t[ROWS["means"]]
        pc += V[:3, 3:4]
        keep = pc[2] >= near
        if not keep.all():
            pc = pc[:, keep]
            t = t[:, keep]
        if pc.shape[1] == 0:
            return True
        o = t[ROWS["opacity"]]
        r2 = 2.0 * np.log(np.maximum(o, 1e-30) / np.float32(alpha_min))
        np.maximum(r2, 0.0, out=r2)
        R = np.sqrt(r2) * np.maximum(t[9], t[10]) * np.float32(1.001)
        z = pc[2]
        gap = z - R
        if gap.min() <= 1e-6 * max(float(z.max()), 1e-6):
            return False
        fx, fy = float(K[0][0]), float(K[1][1])
        zz = z * z
        base = R / (z * gap)
        hx = fx * base * np.sqrt(pc[0] * pc[0] + zz)
        hy = fy * base * np.sqrt(pc[1] * pc[1] + zz)
        rf = np.sqrt(0.5 * r2)
        half = float(np.max(np.maximum(np.maximum(hx, hy), rf)))
        return 2.0 * half * (1.0 + 1e-4) + 0.5 <= limit

    def draw(self, K, viewmat, mode: str = "rgb", order=None, near: float = 0.01,
             cull_backfaces: float | None = None, background=(0.0, 0.0, 0.0),
             primitive: str = "auto", alpha_min: float = ALPHA_MIN) -> None:
        """Upload the table and render the surfels into the mode's float targets.

        Args:
            K: (3, 3) pixel intrinsics (pixel centres at +0.5).
            viewmat: (4, 4) world -> camera extrinsics (OpenCV).
            mode: one of :data:`MODES`.
            order: optional (S,) uint32 draw order from :meth:`sort` (computed if None).
            near: surfels with centre depth < near (metres) are culled (as the trainer).
            cull_backfaces: optional speed-up, off (None) by default: skip surfels whose
                outward normal ``t_u x t_v`` points away from the camera with
                ``cos(normal, view ray) > cull_backfaces`` (e.g. 0.3). On a closed, opaque
                avatar they are hidden behind the front surface; the trainer draws them.
            background: RGB in [0, 1]; used here only by the direct 8-bit RGB path
                (``precision='f1'``), else by :meth:`resolve`.
            primitive: ``'points'`` (one GL point per surfel, the cheapest on llvmpipe),
                ``'quads'`` (tight instanced quads) or ``'auto'`` (points when
                :meth:`points_fit`, else quads). All three give the same image.
            alpha_min: alpha cut-off (default 1/255, the trainer's); larger values shrink
                the support (a speed-up that changes the image, see ``Player(fast=True)``).
        Raises:
            ValueError: unknown mode / primitive, bad ``alpha_min``, or ``semantic``
                without :meth:`set_logits`.
        """
        if mode not in _MODE_ID:
            raise ValueError(f"unknown render mode {mode!r}; expected one of {MODES}")
        if mode == "semantic" and self._logit_buf is None:
            raise ValueError("semantic mode needs per-surfel logits (set_logits)")
        if primitive not in ("auto", "points", "quads"):
            raise ValueError(f"primitive must be 'auto', 'points' or 'quads', got {primitive!r}")
        if not 0.0 < float(alpha_min) < 0.99:
            raise ValueError(f"alpha_min must be in (0, 0.99), got {alpha_min}")
        if order is None:
            order = self.sort(viewmat)
        K = np.asarray(K, np.float64)
        V = np.asarray(viewmat, np.float64)
        if primitive == "auto":
            primitive = "points" if self.points_fit(K, V, near, alpha_min) else "quads"
        self._table_buf.write(self.table)
        self._idx_buf.write(np.ascontiguousarray(order, dtype=np.uint32))
        self._table_buf.bind_to_storage_buffer(0)
        ctx = self.ctx
        mgl = self._mgl
        ctx.disable(mgl.DEPTH_TEST | mgl.CULL_FACE)
        ctx.enable(mgl.BLEND)
        if primitive == "points":
            ctx.enable(mgl.PROGRAM_POINT_SIZE)
        ctx.blend_func = mgl.ONE, mgl.ONE_MINUS_SRC_ALPHA
        ctx.blend_equation = mgl.FUNC_ADD
        if mode == "semantic":
            self._logit_buf.bind_to_storage_buffer(1)
            passes = [("logits", fbo, 3 * _LOGITS_PER_PASS * k)
                      for k, fbo in enumerate(self._fbo_logits) if 3 * _LOGITS_PER_PASS * k < self._num_logits]
        elif mode == "rgb":
            passes = [("rgb", self._fbo_rgb, 0)]
        else:
            passes = [("geo", self._fbo_geo, 0)]
        n = int(len(order))
        uni = {"uS": self.num_surfels,
               "uR": np.ascontiguousarray(V[:3, :3].T, np.float32),
               "uT": np.ascontiguousarray(V[:3, 3], np.float32),
               "uK": np.ascontiguousarray(K.T, np.float32),
               "uKinvT": np.ascontiguousarray(np.linalg.inv(K), np.float32),   # column-major transpose(inv K)
               "uSize": (float(self.width), float(self.height)),
               "uH": float(self.height),
               "uNear": float(near),
               "uCullCos": 2.0 if cull_backfaces is None else float(cull_backfaces),
               "uAlphaMin": float(alpha_min),
               "uMaxPoint": self.max_point_size,
               "uNumLogits": self._num_logits}
        for kind, fbo, base in passes:
            prog = self._program(kind, primitive)
            vao = self._vao(kind, primitive)
            for name, value in uni.items():
                _set(prog, name, value)
            _set(prog, "uLogitBase", base)
            fbo.use()
            ctx.viewport = (0, 0, self.width, self.height)
            if self._direct and mode == "rgb":
                fbo.clear(*(float(c) for c in background), 0.0)
            else:
                fbo.clear(0.0, 0.0, 0.0, 0.0)
            if n:
                if primitive == "points":
                    vao.render(mgl.POINTS, vertices=n)
                else:
                    vao.render(mgl.TRIANGLE_STRIP, vertices=4, instances=n)
        ctx.disable(mgl.BLEND)
        if primitive == "points":
            ctx.disable(mgl.PROGRAM_POINT_SIZE)
        self._last_mode = mode
        self.last_primitive = primitive

    def resolve(self, mode: str | None = None, background=(0.0, 0.0, 0.0), target=None,
                depth_range=None) -> None:
        """Turn the last :meth:`draw` into a displayable image (:data:`MODES` colouring).

        Args:
            mode: the mode drawn (default: the last one).
            background: RGB in [0, 1] composited as ``(1 - alpha) * background``.
            target: a moderngl framebuffer (e.g. ``ctx.screen``); default the internal
                8-bit target read by :meth:`read_display`.
            depth_range: (near, far) metres of the depth colour map; default the centre
                depth range of the last :meth:`sort`.
        """
        mode = mode or self._last_mode or "rgb"
        if self._direct and mode == "rgb" and target is None and self._last_mode == "rgb":
            return                          # already in the display target (see resize)
        ctx = self.ctx
        fbo = target if target is not None else self._fbo_display
        fbo.use()
        if target is not None:
            ctx.viewport = (0, 0, *target.size) if hasattr(target, "size") else (0, 0, self.width, self.height)
        else:
            ctx.viewport = (0, 0, self.width, self.height)
        ctx.disable(self._mgl.BLEND)
        p, vao = self._resolve_program(mode)
        if mode == "semantic":
            for k, t in enumerate(self._tex_logits):
                t.use(3 + k)
            try:
                p["tLogits"].value = list(range(3, 3 + _MAX_LOGIT_TARGETS))
            except KeyError:
                pass
        else:
            (self._tex_display if self._direct and mode == "rgb" else self._tex_color).use(0)
            _set(p, "tColor", 0)
            if mode == "normal":
                self._tex_normal.use(1)
                _set(p, "tNormal", 1)
            elif mode == "depth":
                self._tex_depth.use(2)
                _set(p, "tDepth", 2)
        dr = depth_range or getattr(self, "last_depth_range", (0.0, 1.0))
        direct_rgb = self._direct and mode == "rgb"      # background already composited by draw()
        _set(p, "uBackground", (0.0, 0.0, 0.0) if direct_rgb else tuple(float(c) for c in background))
        _set(p, "uDepthRange", (float(dr[0]), float(dr[1])))
        _set(p, "uNumLogits", self._num_logits)
        _set(p, "uPalette", self._palette)
        vao.render(self._mgl.TRIANGLES, vertices=3)

    # ------------------------------------------------------------------ read back
    def _read(self, fbo, attachment: int, dtype: str = "f4") -> np.ndarray:
        raw = fbo.read(components=4, dtype=dtype, attachment=attachment)
        img = np.frombuffer(raw, dtype=np.float32 if dtype == "f4" else np.uint8)
        return img.reshape(self.height, self.width, 4)[::-1]

    def read_display(self) -> np.ndarray:
        """(H, W, 3) uint8 image of the last :meth:`resolve` into the internal target, row 0 at the top."""
        return np.ascontiguousarray(self._read(self._fbo_display, 0, "f1")[..., :3])

    def read_layers(self, background=None) -> dict[str, np.ndarray]:
        """Float images of the last :meth:`draw` (row 0 at the top), the trainer's outputs.

        Returns a dict with ``rgb`` (H, W, 3) ``sum_i w_i c_i (+ (1 - alpha) background)``,
        ``alpha`` (H, W); after a ``normal``/``depth`` draw also ``normal`` (H, W, 3)
        ``sum_i w_i n_i`` (camera space, unnormalised), ``depth_acc`` (H, W) and ``depth``
        ``depth_acc / max(alpha, 1e-6)`` (metres) -- as
        :class:`fmgs.trainer.render.dispatch.RenderOutput`.
        """
        fbo = self._fbo_rgb if self._last_mode == "rgb" else self._fbo_geo
        c = self._read(fbo, 0).astype(np.float32) if self.precision != "f1" else \
            self._read(fbo, 0, "f1").astype(np.float32) / 255.0
        out = {"rgb": c[..., :3].copy(), "alpha": c[..., 3].copy()}
        if self._direct and self._last_mode == "rgb":
            background = None               # already composited over the draw's background
        if background is not None:
            out["rgb"] += (1.0 - out["alpha"])[..., None] * np.asarray(background, np.float32)
        if self._last_mode in ("normal", "depth"):
            n = self._read(self._fbo_geo, 1)
            d = self._read(self._fbo_geo, 2)
            out["normal"] = n[..., :3].copy()
            out["depth_acc"] = d[..., 0].copy()
            out["depth"] = out["depth_acc"] / np.maximum(out["alpha"], 1e-6)
        return out

    def read_logits(self) -> np.ndarray:
        """(H, W, C) float32 composited semantic logits ``sum_i w_i l_i`` of the last semantic draw."""
        if self._last_mode != "semantic":
            raise RuntimeError("read_logits() needs a preceding draw(mode='semantic')")
        chans = []
        for k in range(math.ceil(self._num_logits / 3)):
            fbo = self._fbo_logits[k // _LOGITS_PER_PASS]
            chans.append(self._read(fbo, k % _LOGITS_PER_PASS)[..., :3])
        return np.ascontiguousarray(np.concatenate(chans, -1)[..., : self._num_logits])

    # ------------------------------------------------------------------ convenience
    def _semantic_alpha(self) -> np.ndarray:
        return self._read(self._fbo_logits[0], 0)[..., 3].copy()

    def release(self) -> None:
        """Free the GL objects (the context stays)."""
        objs = [*self._vaos.values(), *self._empty_vaos.values(), *self._progs.values(), *self._resolve.values(),
                *getattr(self, "_fbo_logits", []), *getattr(self, "_tex_logits", [])]
        objs += [getattr(self, name) for name in list(vars(self))
                 if name.startswith(("_fbo", "_tex", "_table", "_idx", "_logit"))]
        for obj in objs:
            if hasattr(obj, "release"):
                try:
                    obj.release()
                except Exception:  # noqa: BLE001
                    pass
        self._vaos, self._empty_vaos, self._progs, self._resolve = {}, {}, {}, {}
