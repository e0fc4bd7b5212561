"""CPU splatting renderer of 2D Gaussian surfels (numba), for machines without a GPU.

The same image as :class:`fmgs.runtime.gl_renderer.SurfelRenderer` (and as the trainer's
reference rasteriser, :mod:`fmgs.trainer.render.cpu`), computed by two numba kernels instead
of OpenGL. On a CPU-only machine OpenGL means Mesa's llvmpipe, which must shade every pixel of
every surfel's support back to front; here the surfels are blended **front to back** and a
pixel stops as soon as its transmittance would drop below 1e-4 (2DGS / the trainer's early
stop), and a band whose pixels are all finished stops early; the hidden back of the body
costs no fragment-shader run. On the 2-core development machine this draws the 55k-surfel ZJU-MoCap
377 avatar at 512x512 in about a third of llvmpipe's CPU time (24 vs 74 ms per frame;
docs/benchmarks.md).

Per frame (:meth:`CpuSurfelRenderer.draw`):

1. **Setup** (one parallel kernel over the drawn surfels, in front-to-back order): the
   per-surfel camera terms of :func:`fmgs.trainer.render.cpu.surfel_camera_terms` /
   ``surfel.vert`` -- the ray-splat matrix ``M`` premultiplied by ``K^-1`` (so that
   ``q = M (x, y, 1)`` for pixel centres), the projected centre, the cut-off
   ``r2 = 2 ln(o / alpha_min)``, the camera-facing normal, ``b = n . p`` and the centre depth
   -- and the pixel box of the support (dual conic of the cut-off ellipse united with the
   low-pass filter disc, as ``raster_cpu._surfel_boxes`` / the vertex shader), plus the
   surfel's feature row (colour; colour + normal; or semantic logits).
2. **Splat** (one parallel kernel over horizontal bands of 16 rows, bands dealt round-robin
   to the threads): each band walks the surfels front to back, and for every pixel centre of
   the surfel's box inside the band evaluates the exact 2DGS alpha
   ``min(0.99, o exp(-min(rho3d, rho2d) / 2))`` (Huang et al. 2024, eq. 9-12: ray /
   surfel-plane intersection (u, v), ``rho2d = 2 |pix - proj(p)|^2``), skips it below
   ``alpha_min`` (1/255), and blends ``w = alpha T`` into the feature, alpha and
   expected-depth accumulators while ``T (1 - alpha) >= 1e-4`` (else the pixel is finished:
   the 2DGS rule, the fragment that would cross is not blended). A band whose pixels are all
   finished stops. The ``rgb`` mode uses a branch-free variant that LLVM vectorises (every
   pixel of the box row evaluated, ``exp`` as a polynomial accurate to a few 1e-6; ~1.8x
   faster); the other modes the scalar kernel (libm ``exp``, finished pixels skipped).
3. **Resolve** (one kernel): the mode's colouring into an 8-bit image (``resolve.frag``).

Outputs are the trainer's: ``sum_i w_i f_i`` in the float layers; the only difference to the
GL renderer (back to front, no early stop) is that early stop, below 1e-4 per pixel.

numba is imported on first use (``numba`` is a dependency of the package; :func:`available`
says whether it imports). Kernels are compiled once and cached on disk (numba ``cache=True``;
the first run in a fresh install spends a few seconds compiling). Threads: numba's pool
(``threads=``, default all cores). Kernels release the GIL.

Conventions as the GL renderer: OpenCV camera, pixel (i, j) centre at (j + 0.5, i + 0.5),
images with row 0 at the top, the planar ``(16, S)`` float32 surfel table of
:data:`fmgs.runtime.gl_renderer.ROWS`.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from fmgs.runtime.gl_renderer import (
    _MODE_ID, ALPHA_MIN, MODES, NUM_ROWS, ROWS, SurfelTableMixin, _set, _shader, _with_defines,
)

__all__ = ["available", "CpuSurfelRenderer", "T_STOP", "BAND_ROWS"]

#: Transmittance below which a pixel is finished (2DGS, the trainer's ``T_STOP``).
T_STOP = 1e-4
#: Rows per band of the splat kernel (the unit of work of a thread).
BAND_ROWS = 16
#: Columns of the per-surfel setup rows: M (9, K^-1 folded in), centre px (2), opacity,
#: r2 (inflated, conservative early reject), b, centre depth.
_P_COLS = 15
_MAX_LOGITS = 30

_KERNELS = None


@contextlib.contextmanager
def _numba_threads(n: int | None):
    """Run the enclosed kernels on ``n`` numba threads (numba's setting is per calling thread);
    yields the count in effect."""
    import numba

    before = numba.get_num_threads()
    if n is not None:
        numba.set_num_threads(min(int(n), numba.config.NUMBA_NUM_THREADS))
    try:
        yield numba.get_num_threads()
    finally:
        numba.set_num_threads(before)


def available() -> bool:
    """True when numba imports (the CPU renderer can run)."""
    try:
        import numba  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def _kernels():
    """Compile (or load from numba's cache) the three kernels; returns a dict of them."""
    global _KERNELS
    if _KERNELS is None:
        from fmgs.runtime import _splat_kernels

        _KERNELS = {"setup": _splat_kernels.setup_surfels, "splat": _splat_kernels.splat_bands,
                    "splat_rgb": _splat_kernels.splat_rgb_simd, "resolve": _splat_kernels.resolve_image}
    return _KERNELS


class CpuSurfelRenderer(SurfelTableMixin):
    """2DGS surfel renderer on the CPU (numba), with the interface of
    :class:`fmgs.runtime.gl_renderer.SurfelRenderer` (see the module docstring).

    Args:
        width, height: render size in pixels.
        num_surfels: S, number of surfels (the table capacity; :meth:`render_arrays`
            re-allocates for another count).
        palette: optional (C, 3) float RGB in [0, 1] (or 0-255) of the semantic classes;
            default the Sapiens palette.
        ctx: optional moderngl context, only needed to show the image in a window
            (:meth:`resolve` with ``target=ctx.screen``).
        threads: numba threads for the kernels (default: numba's, i.e. all cores).
        band_rows: rows per band of the splat kernel.
        precision: accepted for interface compatibility with the GL renderer; the layers are
            always float32.
        simd: draw the ``rgb`` mode with the vectorised kernel
            (:func:`fmgs.runtime._splat_kernels.splat_rgb_simd`: a polynomial exp, every box pixel
            evaluated; ~1.8x faster); False: the scalar kernel of the other modes (libm exp,
            finished pixels skipped).
        async_draw: run the splat of :meth:`draw` on a background thread (the kernels release
            the GIL) so that the caller can pose the next frame meanwhile; every reader
            (:meth:`resolve`, :meth:`read_layers`, ...) waits for it (:meth:`wait`). Off in
            :class:`fmgs.runtime.app.Player`: slower on 2 cores (docs/benchmarks.md).

    Attributes:
        table: ``(16, S)`` float32 planar surfel table (:data:`fmgs.runtime.gl_renderer.ROWS`).
        last_primitive: ``'cpu'`` after a draw (for the statistics).
        last_depth_range: (min, max) centre depth of the last :meth:`sort` (metres).
    Raises:
        RuntimeError: numba is not installed.
        ValueError: bad size or count.
    """

    kind = "cpu"

    def __init__(self, width: int, height: int, num_surfels: int, palette=None, ctx=None,
                 threads: int | None = None, band_rows: int = BAND_ROWS, precision: str = "f4",
                 simd: bool = True, async_draw: bool = False):
        if not available():
            raise RuntimeError("the CPU renderer needs numba (pip install numba)")
        del precision               # accepted for interface compatibility: float32 throughout
        self.ctx = ctx
        self.threads = None if threads is None else max(1, int(threads))
        self.band_rows = max(1, int(band_rows))
        self.simd = bool(simd)
        self.async_draw = bool(async_draw)
        self._job = None
        self._error = None
        self.last_primitive = None
        self.width = self.height = 0
        self.num_surfels = 0
        self._init_palette(palette)
        self._logits = None
        self._last_mode = None
        self._display = None
        self._blit = None
        self._alloc_surfels(int(num_surfels))
        self.resize(width, height)

    # ------------------------------------------------------------------ allocation
    def _alloc_surfels(self, S: int) -> None:
        self.wait()
        if S <= 0:
            raise ValueError(f"num_surfels must be positive, got {S}")
        if S == self.num_surfels:
            return
        self.num_surfels = S
        self.table = np.zeros((NUM_ROWS, S), np.float32)
        self._P = np.empty((S, _P_COLS), np.float32)
        self._box = np.empty((S, 4), np.int32)
        self._logits = None
        self._num_logits = 0

    def resize(self, width: int, height: int) -> None:
        """(Re)allocate the float layers for ``width`` x ``height`` pixels."""
        self.wait()
        width, height = int(width), int(height)
        if width <= 0 or height <= 0:
            raise ValueError(f"render size must be positive, got {width}x{height}")
        if (width, height) == (self.width, self.height):
            return
        self.width, self.height = width, height
        self._alpha = np.zeros((height, width), np.float32)
        self._dacc = np.zeros((height, width), np.float32)
        self._feat = np.zeros((height, width, 6), np.float32)
        self._display = np.zeros((height, width, 3), np.uint8)
        self._last_mode = None

    def set_logits(self, logits) -> None:
        """Per-surfel semantic logits for the ``semantic`` mode: (S, C) float, C <= 30.

        Raises:
            ValueError: wrong shape.
        """
        lg = np.ascontiguousarray(logits, np.float32)
        if lg.ndim != 2 or lg.shape[0] != self.num_surfels or not 0 < lg.shape[1] <= _MAX_LOGITS:
            raise ValueError(f"logits must be (S={self.num_surfels}, C<=30), got {lg.shape}")
        self._logits = lg
        self._num_logits = int(lg.shape[1])

    # ------------------------------------------------------------------ per frame
    def draw(self, K, viewmat, mode: str = "rgb", order=None, near: float = 0.01,
             cull_backfaces: float | None = None, background=(0.0, 0.0, 0.0),
             primitive: str = "auto", alpha_min: float = ALPHA_MIN) -> None:
        """Render the table into the mode's float layers (arguments as
        :meth:`fmgs.runtime.gl_renderer.SurfelRenderer.draw`; ``primitive`` is ignored).

        Args:
            K: (3, 3) pixel intrinsics; viewmat: (4, 4) world -> camera (OpenCV).
            mode: one of :data:`fmgs.runtime.gl_renderer.MODES`.
            order: optional back-to-front draw order from :meth:`sort` (drawn reversed, front
                to back; surfels left out of it are not drawn); computed if None.
            near: surfels with centre depth < near (metres) are culled.
            cull_backfaces: optional cosine threshold (see the GL renderer), None = off.
            background: unused here (applied by :meth:`resolve` / :meth:`read_layers`).
            alpha_min: alpha cut-off (1/255, the trainer's).
        Raises:
            ValueError: unknown mode, bad ``alpha_min``, ``semantic`` without :meth:`set_logits`.
        """
        if mode not in MODES:
            raise ValueError(f"unknown render mode {mode!r}; expected one of {MODES}")
        if mode == "semantic" and self._logits is None:
            raise ValueError("semantic mode needs per-surfel logits (set_logits)")
        if not 0.0 < float(alpha_min) < 0.99:
            raise ValueError(f"alpha_min must be in (0, 0.99), got {alpha_min}")
        del background, primitive
        self.wait()                 # a pending splat still writes the layers
        if order is None:
            order = self.sort(viewmat)
        front = np.ascontiguousarray(np.asarray(order)[::-1], dtype=np.int32)
        K64 = np.asarray(K, np.float64)
        V = np.asarray(viewmat, np.float64)
        kind = {"rgb": 0, "normal": 1, "depth": 1, "semantic": 2}[mode]
        C = {0: 3, 1: 6, 2: self._num_logits}[kind]
        n = int(front.size)
        if self._feat.shape[2] != C:
            self._feat = np.zeros((self.height, self.width, C), np.float32)
        feats = np.empty((n, C), np.float32)
        logits = self._logits if kind == 2 else np.zeros((1, 1), np.float32)
        k = _kernels()
        with _numba_threads(self.threads):
            k["setup"](self.table, front, V[:3, :3].astype(np.float32), V[:3, 3].astype(np.float32),
                       K64.astype(np.float32), np.linalg.inv(K64).T.astype(np.float32),
                       self.width, self.height, np.float32(near), np.float32(alpha_min),
                       np.float32(2.0 if cull_backfaces is None else cull_backfaces), kind, logits,
                       self._P[:n], self._box[:n], feats)
        common = (self._P[:n], self._box[:n], feats, self.height, self.width, self.band_rows,
                  np.float32(alpha_min), np.float32(T_STOP))
        if kind == 0 and self.simd:
            job = ("splat_rgb", common, (self._feat, self._alpha))
        else:
            job = ("splat", common + (kind == 1,), (self._feat, self._alpha, self._dacc))
        self._last_mode = mode
        self.last_primitive = "cpu"
        if self.async_draw:
            # the table is no longer read: the caller may pose the next frame meanwhile
            self._job = threading.Thread(target=self._splat, args=job, name="fmgs-splat", daemon=True)
            self._job.start()
        else:
            self._splat(*job)

    def _splat(self, kernel: str, args: tuple, outputs: tuple) -> None:
        try:
            with _numba_threads(self.threads) as threads:
                _kernels()[kernel](*args, threads, *outputs)
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
            if threading.current_thread() is not self._job:
                raise
            self._error = exc

    def wait(self) -> None:
        """Wait for a splat started by an asynchronous :meth:`draw` (re-raising its error)."""
        job, self._job = self._job, None
        if job is not None:
            job.join()
        err, self._error = self._error, None
        if err is not None:
            raise err

    def resolve(self, mode: str | None = None, background=(0.0, 0.0, 0.0), target=None,
                depth_range=None) -> None:
        """Colour the last :meth:`draw` into the 8-bit display image (``resolve.frag``'s
        colourings: RGB over the background, ``(n + 1) / 2`` of the unit normal, the turbo map
        of the expected depth over ``depth_range`` (near = red), the palette colour of the
        argmax logit), and show it in ``target`` (a moderngl framebuffer, e.g. ``ctx.screen``;
        needs ``ctx``) when given.

        Raises:
            ValueError: no preceding draw; RuntimeError: ``target`` without a context.
        """
        self.wait()
        mode = mode or self._last_mode
        last = self._last_mode
        if mode is None or last is None:
            raise ValueError("resolve() needs a preceding draw()")
        ok = (mode == last or (mode == "rgb" and last in ("normal", "depth"))
              or {mode, last} == {"normal", "depth"})
        if not ok:
            raise ValueError(f"resolve({mode!r}) needs a draw of that mode (the last draw was {last!r})")
        dr = depth_range or getattr(self, "last_depth_range", (0.0, 1.0))
        _kernels()["resolve"](self._feat, self._alpha, self._dacc, _MODE_ID[mode],
                              np.asarray(background, np.float32), np.float32(dr[0]), np.float32(dr[1]),
                              self._palette, self._display)
        if target is not None:
            self._show(target)

    def _show(self, target) -> None:
        """Draw the display image into a GL framebuffer (a textured full-screen triangle)."""
        if self.ctx is None:
            raise RuntimeError("showing the CPU renderer's image in a framebuffer needs a moderngl context")
        import moderngl

        ctx = self.ctx
        if self._blit is None or self._blit[0].size != (self.width, self.height):
            if self._blit is not None:
                for obj in self._blit:
                    obj.release()
            tex = ctx.texture((self.width, self.height), 4, dtype="f1")
            tex.filter = (moderngl.NEAREST, moderngl.NEAREST)
            prog = ctx.program(vertex_shader=_shader("resolve.vert"),
                               fragment_shader=_with_defines(_shader("resolve.frag"), {"MODE": 0}))
            self._blit = (tex, prog, ctx.vertex_array(prog, []))
        tex, prog, vao = self._blit
        rgba = np.empty((self.height, self.width, 4), np.uint8)
        rgba[..., :3] = self._display[::-1]              # GL rows run bottom up
        rgba[..., 3] = 255
        tex.write(rgba.tobytes())
        target.use()
        ctx.viewport = (0, 0, *target.size) if hasattr(target, "size") else (0, 0, self.width, self.height)
        ctx.disable(moderngl.BLEND)
        tex.use(0)
        _set(prog, "tColor", 0)
        _set(prog, "uBackground", (0.0, 0.0, 0.0))
        vao.render(moderngl.TRIANGLES, vertices=3)

    # ------------------------------------------------------------------ read back
    def read_display(self) -> np.ndarray:
        """(H, W, 3) uint8 image of the last :meth:`resolve`, row 0 at the top."""
        self.wait()
        return self._display.copy()

    def read_layers(self, background=None) -> dict[str, np.ndarray]:
        """Float images of the last :meth:`draw` (row 0 at the top), as
        :meth:`fmgs.runtime.gl_renderer.SurfelRenderer.read_layers`: ``rgb`` (H, W, 3)
        ``sum_i w_i c_i (+ (1 - alpha) background)``, ``alpha`` (H, W); after a
        ``normal``/``depth`` draw also ``normal`` (H, W, 3), ``depth_acc`` and ``depth`` (H, W)."""
        self.wait()
        if self._last_mode not in ("rgb", "normal", "depth"):
            raise RuntimeError("read_layers() needs a preceding rgb / normal / depth draw()")
        out = {"rgb": self._feat[..., :3].copy(), "alpha": self._alpha.copy()}
        if background is not None:
            out["rgb"] += (1.0 - out["alpha"])[..., None] * np.asarray(background, np.float32)
        if self._last_mode in ("normal", "depth"):
            out["normal"] = self._feat[..., 3:6].copy()
            out["depth_acc"] = self._dacc.copy()
            out["depth"] = out["depth_acc"] / np.maximum(out["alpha"], 1e-6)
        return out

    def read_logits(self) -> np.ndarray:
        """(H, W, C) float32 composited semantic logits ``sum_i w_i l_i`` of the last semantic draw."""
        self.wait()
        if self._last_mode != "semantic":
            raise RuntimeError("read_logits() needs a preceding draw(mode='semantic')")
        return self._feat.copy()

    def _semantic_alpha(self) -> np.ndarray:
        self.wait()
        return self._alpha.copy()

    def release(self) -> None:
        """Wait for a pending splat and free the window blit objects (if any)."""
        self.wait()
        if self._blit is not None:
            for obj in self._blit:
                try:
                    obj.release()
                except Exception:  # noqa: BLE001
                    pass
            self._blit = None


# table rows the kernels read (kept in one place with the GL renderer's layout)
assert ROWS["means"] == slice(0, 3) and ROWS["t_u"] == slice(3, 6) and ROWS["t_v"] == slice(6, 9)
assert ROWS["scales"] == slice(9, 11) and ROWS["opacity"] == 11 and ROWS["colors"] == slice(12, 15)
