"""Per-frame pipeline of the runtime: SMPL pose -> bone transforms -> models -> LBS -> colours.

For one frame (pose ``theta`` (24, 3) axis-angle, body placement ``world_from_body``,
camera centre ``c``), :meth:`AvatarPipeline.frame` computes exactly what the trainer's
:meth:`fmgs.trainer.models.full.FMGSAvatar.forward` computes (the bundle contract of
``docs/bundle.md``):

1. **pose** -- ``R_b = rodrigues(theta_b)``, ``G_pose = forward_kinematics(R, rest_joints,
   parents)`` (:mod:`fmgs.body_model`), ``B_b = world_from_body @ G_pose_b @ inv(G_c_b)``
   (3DGS-Avatar convention; float64, 24 joints);
2. **inference** -- ``Z_p = pose_encoder(R)``; ``(mu', R', s', z_g) = geometry(f_g, Z_p, mu, R,
   s)`` (eq. 3-6); after skinning, ``colours = color(f_c, z_g, Z_p, d_hat)`` (eq. 7) --
   ONNX Runtime or TensorRT (:mod:`fmgs.runtime.inference`);
3. **skinning** -- eq. 10-12 as ``fmgs.trainer.models.fields.blend_lbs``: ``T = sum_b W_b B_b``,
   ``mu_o = T mu'``, ``t_u = M t_u'``, ``t_v = M t_v'``, ``n = normalize(t_u x t_v)``,
   ``t_u = normalize(t_u)``, ``t_v = n x t_u`` (``M = T[:3, :3]``); view directions
   ``d = normalize(mu_o - c)``, ``d_hat = normalize(inv(M) d)`` (``inverse``, full model,
   ``fields.canonicalize_view_dirs``) or ``normalize(M^T d)`` (``transpose``, foundation
   model) as the bundle's colour model declares.

Everything is float32 in planar (structure-of-arrays) layout, written straight into the
renderer's surfel table (:data:`fmgs.runtime.gl_renderer.ROWS`), with preallocated work
buffers and BLAS matmuls (``T^T = B^T W^T``: one (12, 24) x (24, S) product, on one BLAS thread:
:func:`limit_blas_threads`). The array code is
written once against the NumPy API and runs on CuPy when :mod:`fmgs.runtime.xp` picks it.

Graphs of the planar layout (manifest ``"layout": "planar"``, :mod:`fmgs.export.onnx_export`)
take and give per-surfel tensors as ``(C, S)`` rows under ``_planar`` names: the bundle's
row-major channels are transposed once at load (:data:`PLANAR_INPUTS`), the geometry outputs
are the LBS inputs as they are, the planar view directions are fed without a transpose and
the colours land in the table rows directly. Row-major graphs (bundles written before)
are fed and read as before.

Bundle kinds: ``full`` (three models), ``foundation`` (static geometry, colour model on
``f_c`` and the view direction), ``preview`` (static colours, no model).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmgs.body_model import bone_transforms  # noqa: F401  (re-exported: the per-frame posing)
from fmgs.errors import FmgsInputError
from fmgs.runtime.gl_renderer import ALPHA_MIN, NUM_ROWS, ROWS
from fmgs.runtime.inference import check_model_io, load_model
from fmgs.runtime.xp import copy_into, get_array_module, same_module, to_numpy

__all__ = ["STAGES", "FrameTimings", "AvatarPipeline", "bone_transforms", "blend_lbs_planar",
           "canonical_view_dirs_planar", "limit_blas_threads"]

#: Stages of the frame-time split, in pipeline order.
STAGES = ("pose", "inference", "skinning", "sort", "draw")

#: Table rows :meth:`AvatarPipeline.frame` writes: the geometry block (means, t_u, t_v,
#: scales: rows 0-10, contiguous), then the colours (with a colour model). Opacity is not
#: among them (:meth:`AvatarPipeline.init_table`).
_WRITTEN_ROWS = (slice(ROWS["means"].start, ROWS["scales"].stop), ROWS["colors"])

_OUT_ALIASES = {"centers": ("centers_out", "centers"), "rotations": ("rotations_out", "rotations"),
                "scales": ("scales_out", "scales")}

#: Planar model inputs the pipeline derives at load from the bundle's row-major channels:
#: ``{planar name: row-major channel}`` (surfel axis moved last, contiguous).
PLANAR_INPUTS = {"geometry_features_planar": "geometry_features", "appearance_features_planar": "appearance_features",
                 "centers_planar": "centers", "rotations_planar": "rotations", "scales_planar": "scales"}

#: Outputs of a planar geometry graph (all ``(C, S)``), in the order the LBS reads them.
_PLANAR_GEOMETRY_OUT = ("centers_planar_out", "t_u_planar_out", "t_v_planar_out", "scales_planar_out", "z_g_planar")


@dataclass
class FrameTimings:
    """Seconds spent per stage (:data:`STAGES`) in one frame (wall clock, ``perf_counter``)."""

    pose: float = 0.0
    inference: float = 0.0
    skinning: float = 0.0
    sort: float = 0.0
    draw: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        """Sum of the stages, seconds."""
        return self.pose + self.inference + self.skinning + self.sort + self.draw


_BLAS_SYMBOLS = ("openblas_set_num_threads", "openblas_set_num_threads64_", "scipy_openblas_set_num_threads64_",
                 "scipy_openblas_set_num_threads", "MKL_Set_Num_Threads", "bli_thread_set_num_threads")


def limit_blas_threads(n: int = 1) -> int:
    """Set the thread count of every BLAS library loaded in this process (OpenBLAS, MKL, BLIS).

    NumPy's OpenBLAS runs the skinning product (``(12, 24) x (24, S)``) on all cores, and its
    worker threads then busy-wait; on a 2-core machine they take the cores from ONNX Runtime
    and llvmpipe (measured at 55k surfels: pipeline CPU time 85 -> 47 ms per frame, skinning
    17 -> 3.5 ms). The runtime does only small BLAS products, so one thread is best. Finds
    the libraries through ``/proc/self/maps`` (Linux; elsewhere nothing happens), as
    ``threadpoolctl`` does.

    Args:
        n: threads (>= 1).
    Returns:
        How many libraries were set.
    """
    import ctypes

    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if line.rstrip().endswith(".so") or ".so." in line}
    except OSError:
        return 0
    done = 0
    for path in sorted(paths):
        low = Path(path).name.lower()
        if not any(k in low for k in ("openblas", "mkl_rt", "blis")):
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in _BLAS_SYMBOLS:
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(int(n)))
                done += 1
                break
    return done


def _cross(xp, a, b, out):
    """Planar cross product: a, b, out (3, S) (out may not alias a or b)."""
    xp.multiply(a[1], b[2], out=out[0]); out[0] -= a[2] * b[1]
    xp.multiply(a[2], b[0], out=out[1]); out[1] -= a[0] * b[2]
    xp.multiply(a[0], b[1], out=out[2]); out[2] -= a[1] * b[0]
    return out


def _normalize(xp, v, tmp):
    """In-place normalisation of planar (3, S) vectors (``F.normalize``: norm clamped at 1e-12)."""
    xp.multiply(v[0], v[0], out=tmp)
    tmp += v[1] * v[1]
    tmp += v[2] * v[2]
    xp.sqrt(tmp, out=tmp)
    xp.maximum(tmp, 1e-12, out=tmp)
    v /= tmp
    return v


def blend_lbs_planar(xp, Tt, centers, tu_c, tv_c, out_means, out_tu, out_tv, work):
    """Forward LBS of surfels in planar layout (eq. 10-12, ``fields.blend_lbs``).

    Args:
        xp: array module (numpy / cupy).
        Tt: (12, S) float32 blended transforms, row ``4 i + j`` = ``T[i, j]`` (i < 3).
        centers: (3, S) canonical centres ``mu'`` (any strides), metres.
        tu_c, tv_c: (3, S) canonical tangents ``t_u'``, ``t_v'``.
        out_means, out_tu, out_tv: (3, S) outputs (e.g. rows of the renderer table).
        work: dict of preallocated (3, S) / (S,) float32 buffers (``n``, ``tmp``).
    Returns:
        ``n`` (3, S) unit normals ``t_u x t_v`` (a work buffer).
    """
    for i in range(3):
        r = 4 * i
        xp.multiply(Tt[r], centers[0], out=out_means[i])
        out_means[i] += Tt[r + 1] * centers[1]
        out_means[i] += Tt[r + 2] * centers[2]
        out_means[i] += Tt[r + 3]
        for src, dst in ((tu_c, out_tu), (tv_c, out_tv)):
            xp.multiply(Tt[r], src[0], out=dst[i])
            dst[i] += Tt[r + 1] * src[1]
            dst[i] += Tt[r + 2] * src[2]
    n = _cross(xp, out_tu, out_tv, work["n"])
    _normalize(xp, n, work["tmp"])
    _normalize(xp, out_tu, work["tmp"])
    _cross(xp, n, out_tu, out_tv)
    return n


def canonical_view_dirs_planar(xp, Tt, means, cam_center, mode: str, out, work):
    """Canonicalised unit view directions (``fields.canonicalize_view_dirs``).

    ``d = normalize(mu_o - c)``; ``mode="inverse"``: ``d_hat = normalize(inv(M) d)`` via the
    adjugate (``inv(M) d = [(c1 x c2).d, (c2 x c0).d, (c0 x c1).d] / det`` with ``c_k`` the
    columns of ``M``, sign of ``det`` kept); ``mode="transpose"``: ``normalize(M^T d)``.

    Args:
        Tt: (12, S) blended transforms (see :func:`blend_lbs_planar`).
        means: (3, S) posed centres, metres.
        cam_center: (3,) camera centre, world, metres.
        mode: ``"inverse"`` or ``"transpose"``.
        out: (3, S) output (any strides).
        work: preallocated buffers ``d`` (3, S), ``c`` (3, S), ``tmp`` (S,).
    """
    d = work["d"]
    for i in range(3):
        xp.subtract(means[i], float(cam_center[i]), out=d[i])
    _normalize(xp, d, work["tmp"])
    col = [Tt[k::4][:3] for k in range(3)]          # columns c_k = (T[0,k], T[1,k], T[2,k])
    if mode == "transpose":
        for k in range(3):
            xp.multiply(col[k][0], d[0], out=out[k])
            out[k] += col[k][1] * d[1]
            out[k] += col[k][2] * d[2]
    elif mode == "inverse":
        c = work["c"]
        for k, (a, b) in enumerate(((1, 2), (2, 0), (0, 1))):
            _cross(xp, col[a], col[b], c)
            xp.multiply(c[0], d[0], out=out[k])
            out[k] += c[1] * d[1]
            out[k] += c[2] * d[2]
            if k == 0:
                # det = c0 . (c1 x c2): keep its sign (normalisation removes the magnitude)
                det = work["tmp"]
                xp.multiply(col[0][0], c[0], out=det)
                det += col[0][1] * c[1]
                det += col[0][2] * c[2]
                sign = xp.where(det < 0, -1.0, 1.0).astype(xp.float32)
        out *= sign
    else:
        raise ValueError(f"view-direction canonicalisation must be 'inverse' or 'transpose', got {mode!r}")
    _normalize(xp, out, work["tmp"])
    return out


class AvatarPipeline:
    """Poses a bundle's avatar frame by frame (see the module docstring).

    Args:
        bundle: a :class:`fmgs.bundle.Bundle` or a bundle folder path (read with
            :func:`fmgs.bundle.read_bundle`).
        array_backend: ``"auto"`` / ``"numpy"`` / ``"cupy"`` (:func:`fmgs.runtime.xp.get_array_module`).
        inference_backend: ``"auto"`` / ``"onnxruntime"`` / ``"tensorrt"`` (:func:`load_model`).
        providers: ONNX Runtime provider preference (``"auto"``, ``"cpu"``, ...).
        threads: ONNX Runtime intra-op threads (default all cores).
        view_dependent: feed real view directions to the colour model (False: the
            canonical ``-n`` direction -- colours then depend on the pose only).
        blas_threads: threads of the process's BLAS libraries (:func:`limit_blas_threads`;
            default 1; None leaves them alone).
        drop_invisible: leave out, at load time, the surfels whose (static) opacity is below
            the renderers' alpha cut-off :data:`fmgs.runtime.gl_renderer.ALPHA_MIN` (1/255):
            every fragment of theirs is discarded, so the image is exactly the same, while the
            models, skinning, sort and draw skip them (the 377 avatar: 9,133 of 55,104).
            False keeps every surfel (tests that compare per-surfel arrays with the trainer).

    Attributes:
        S: number of surfels posed and drawn (after ``drop_invisible``).
        kept: (S,) int64 indices of those surfels in the bundle.
        num_bundle_surfels: the bundle's surfel count.
        kind: bundle kind.
        models: ``{name: model}`` loaded models (``.providers`` says where they run).
        semantic_logits: (S, C) float32 or None; ``palette`` (C, 3) float in [0, 1].
        xp: the array module.

    Raises:
        FmgsInputError: unreadable bundle, or a bundle whose body model is not SMPL
            (24 joints) -- the message names the manifest.
    """

    def __init__(self, bundle, array_backend: str = "auto", inference_backend: str = "auto",
                 providers: str = "auto", threads: int | None = None, view_dependent: bool = True,
                 blas_threads: int | None = 1, drop_invisible: bool = True):
        from fmgs.bundle import MANIFEST_NAME, read_bundle

        if blas_threads is not None:
            limit_blas_threads(blas_threads)

        if not hasattr(bundle, "manifest"):
            bundle = read_bundle(bundle)
        self.bundle = bundle
        man = bundle.manifest
        mpath = Path(bundle.path) / MANIFEST_NAME
        bm_type = str(man["body_model"].get("type", "smpl")).lower()
        if bm_type != "smpl" or int(man["body_model"]["num_joints"]) != 24:
            raise FmgsInputError(f"the runtime drives SMPL avatars (24 joints); this bundle's body model is "
                                 f"{bm_type!r} with {man['body_model']['num_joints']} joints", mpath)
        self.kind = bundle.kind
        self.xp = xp = get_array_module(array_backend)
        bmod = bundle.body_model_arrays()
        self.parents = bmod["parents"]
        self.rest_joints = bmod["rest_joints"]
        self.canonical_G_inv = np.linalg.inv(bmod["canonical_bone_transforms"])
        f32 = np.float32
        sf = bundle.surfels
        self.num_bundle_surfels = int(sf["centers"].shape[0])
        if drop_invisible:
            self.kept = np.flatnonzero(np.asarray(sf["opacities"], f32) >= np.float32(ALPHA_MIN))
            if self.kept.size == 0:
                raise FmgsInputError("every surfel of the bundle has opacity < 1/255 (nothing to draw)", mpath)
        else:
            self.kept = np.arange(self.num_bundle_surfels)
        if self.kept.size < self.num_bundle_surfels:
            sf = {k: np.asarray(v)[self.kept] for k, v in sf.items()}
        self.S = S = int(self.kept.size)
        # inputs of the models (row-major, as the ONNX graphs take them)
        self._const = {
            "centers": xp.asarray(sf["centers"], dtype=f32),
            "rotations": xp.asarray(sf["rotations"], dtype=f32),
            "scales": xp.asarray(sf["scales"], dtype=f32),
        }
        for k in ("geometry_features", "appearance_features"):
            if k in sf:
                self._const[k] = xp.asarray(sf[k], dtype=f32)
        self._const["points"] = self._const["centers"]
        self._const["prior_weights"] = xp.asarray(sf["skin_weights"], dtype=f32)
        self.opacities = np.asarray(sf["opacities"], f32)
        self.static_colors = np.asarray(sf["colors"], f32) if "colors" in sf else None
        self.semantic_logits = np.asarray(sf["semantic_logits"], f32) if "semantic_logits" in sf else None
        sem = man.get("semantic") or {}
        self.palette = None
        if sem.get("palette") is not None:
            pal = np.asarray(sem["palette"], np.float64)
            self.palette = pal / 255.0 if pal.max() > 1.0 else pal
        self.classes = list(sem.get("classes") or [])
        self.Wt = xp.ascontiguousarray(xp.asarray(sf["skin_weights"], dtype=f32).T)      # (24, S)

        # models, in the manifest's pipeline order (the optional live skinning field is not run:
        # the baked weights are exact for the canonical skinning query)
        self.models = {}
        names = [n for n in (man.get("pipeline") or list(bundle.models)) if n in bundle.models]
        for name in names:
            if name == "skinning":
                continue
            self.models[name] = load_model(bundle.models[name], engines=bundle.engines.get(name),
                                           backend=inference_backend, prefer=providers, threads=threads,
                                           name=name)
        wanted = {n for m in self.models.values() for n in m.input_names}
        for name, src in PLANAR_INPUTS.items():
            if name in wanted and src in self._const:
                self._const[name] = xp.ascontiguousarray(xp.moveaxis(self._const[src], 0, -1))
        self._check_models(man.get("models", {}))
        col_entry = man.get("models", {}).get("color", {})
        self.view_mode = col_entry.get("view_dir_canonicalization") or "inverse"
        self.view_dependent = bool(view_dependent) and "color" in self.models and \
            bool({"view_dirs", "view_dirs_planar"} & set(self.models["color"].input_names))
        if "color" not in self.models and self.static_colors is None:
            raise FmgsInputError("bundle has neither a colour model nor per-surfel colours", mpath)

        # planar views of the static canonical geometry (used when no geometry model runs; the
        # normals are the view input of a planar colour graph when view dependence is off)
        self._static_planar = {
            "centers": xp.ascontiguousarray(self._const["centers"].T),
            "tu": xp.ascontiguousarray(self._const["rotations"][:, :, 0].T),
            "tv": xp.ascontiguousarray(self._const["rotations"][:, :, 1].T),
            "scales": xp.ascontiguousarray(self._const["scales"].T),
            "normals": xp.ascontiguousarray(self._const["rotations"][:, :, 2].T),
        }
        self._work = {"n": xp.empty((3, S), f32), "tmp": xp.empty(S, f32), "d": xp.empty((3, S), f32),
                      "c": xp.empty((3, S), f32), "Tt": xp.empty((12, S), f32), "mu": xp.empty((3, S), f32),
                      "tu_c": xp.empty((3, S), f32), "tv_c": xp.empty((3, S), f32), "vd": xp.empty((3, S), f32)}
        self._view_rows = xp.empty((S, 3), f32)       # row-major view dirs (colour model input)
        self._table = xp.zeros((NUM_ROWS, S), f32)
        self.last_pose_code = None

    def _check_models(self, entries: dict) -> None:
        """Reject, at load, models whose inputs/outputs do not fit what :meth:`frame` feeds
        and reads (:func:`fmgs.runtime.inference.check_model_io`)."""
        S = self.S
        feeds = {k: tuple(v.shape) for k, v in self._const.items()}
        feeds.update(rot_mats=(24, 3, 3), view_dirs=(S, 3), view_dirs_planar=(3, S))
        geo = self.models.get("geometry")
        planar_geo = geo is not None and "z_g_planar" in geo.output_names
        need = {"pose_encoder": ("pose_code",), "color": (("colors", "colors_planar"),),
                "geometry": _PLANAR_GEOMETRY_OUT if planar_geo else ("z_g", *_OUT_ALIASES.values())}
        for name in ("pose_encoder", "geometry", "color"):   # the order frame() runs them in
            m = self.models.get(name)
            if m is None:
                continue
            check_model_io(m, entries.get(name), feeds, need[name])
            for out in ("pose_code", "z_g", "z_g_planar"):
                shp = getattr(m, "output_shapes", {}).get(out)
                if shp is not None:
                    feeds[out] = tuple(S if d is None else d for d in shp)
                elif out in m.output_names:   # a TensorRT engine: name known, shape not
                    feeds.setdefault(out, None)

    # ------------------------------------------------------------------ info
    def describe(self) -> str:
        """One line: kind, surfels, array back-end, each model's back-end and providers."""
        parts = [f"{self.kind} bundle, {self.S} surfels, arrays: {self.xp.__name__}"]
        for n, m in self.models.items():
            parts.append(f"{n}: {m.backend} {','.join(m.providers)}")
        return "; ".join(parts)

    def init_table(self, table: np.ndarray) -> None:
        """Write the pose-independent rows (opacity; static colours) into a renderer table (16, S)."""
        table[ROWS["opacity"]] = self.opacities
        if "color" not in self.models:
            table[ROWS["colors"]] = self.static_colors.T

    # ------------------------------------------------------------------ per frame
    def frame(self, poses, world_from_body, camera_center, table=None,
              timings: FrameTimings | None = None) -> np.ndarray:
        """Pose the avatar for one frame and fill a surfel table.

        Args:
            poses: (24, 3) / (72,) SMPL axis-angle, radians.
            world_from_body: (4, 4) rigid body -> world placement (``Motion.world_from_body``),
                metres.
            camera_center: (3,) camera position, world, metres (view-dependent colour).
            table: (16, S) float32 renderer table to fill (rows :data:`ROWS`; opacity rows
                set by :meth:`init_table`); default an internal one. A table in other memory
                than :attr:`xp`'s (a NumPy renderer table with CuPy arrays) is filled by one
                copy of the written rows at the end (:func:`fmgs.runtime.xp.copy_into`).
            timings: optional :class:`FrameTimings` to add the pose / inference /
                skinning seconds to.
        Returns:
            The filled table (world centres, unit tangents, scales, colours).
        """
        xp = self.xp
        t0 = time.perf_counter()
        out_tab = self._table if table is None else table
        # xp's kernels write with out= into arrays of their own module only: work in the
        # internal table and copy the rows to a table that lives elsewhere
        tab = out_tab if same_module(out_tab, xp) else self._table
        rot, B = bone_transforms(poses, world_from_body, self.rest_joints, self.parents, self.canonical_G_inv)
        Bt = xp.asarray(np.ascontiguousarray(B[:, :3, :].reshape(24, 12).T, dtype=np.float32))   # (12, 24)
        rot32 = rot.astype(np.float32)
        t1 = time.perf_counter()
        feeds = dict(self._const)
        if "pose_encoder" in self.models:
            feeds["pose_code"] = self.models["pose_encoder"].run({"rot_mats": rot32})["pose_code"]
            self.last_pose_code = feeds["pose_code"]
        planar = False
        if "geometry" in self.models:
            g = self.models["geometry"].run(feeds)
            planar = "z_g_planar" in g
            if planar:
                feeds["z_g_planar"] = g["z_g_planar"]
            else:
                out = {k: next(g[a] for a in al if a in g) for k, al in _OUT_ALIASES.items()}
                feeds["z_g"] = g["z_g"]
        t2 = time.perf_counter()
        w = self._work
        if planar:
            # planar outputs are the LBS inputs as they are (contiguous (3, S) / (2, S) rows)
            mu, tu_c, tv_c, scales = (xp.asarray(g[n]) for n in _PLANAR_GEOMETRY_OUT[:4])
        elif "geometry" in self.models:
            # row-major model outputs -> contiguous planar buffers (the element-wise LBS below
            # runs ~2x faster on contiguous rows than on strided views)
            mu, tu_c, tv_c = w["mu"], w["tu_c"], w["tv_c"]
            Rc = xp.asarray(out["rotations"])
            xp.copyto(mu, xp.asarray(out["centers"]).T)
            xp.copyto(tu_c, Rc[:, :, 0].T)
            xp.copyto(tv_c, Rc[:, :, 1].T)
            scales = xp.asarray(out["scales"]).T
        else:
            st = self._static_planar
            mu, tu_c, tv_c, scales = st["centers"], st["tu"], st["tv"], st["scales"]
        Tt = w["Tt"]
        xp.matmul(Bt, self.Wt, out=Tt)
        means = tab[ROWS["means"]]
        blend_lbs_planar(xp, Tt, mu, tu_c, tv_c, means, tab[ROWS["t_u"]], tab[ROWS["t_v"]], w)
        tab[ROWS["scales"]] = scales
        if "color" in self.models:
            cin = self.models["color"].input_names
            if self.view_dependent:
                canonical_view_dirs_planar(xp, Tt, means, np.asarray(camera_center, np.float64),
                                           self.view_mode, w["vd"], w)
                if "view_dirs_planar" in cin:
                    feeds["view_dirs_planar"] = w["vd"]
                else:
                    xp.copyto(self._view_rows, w["vd"].T)
                    feeds["view_dirs"] = self._view_rows
            elif "view_dirs_planar" in cin:
                feeds["view_dirs_planar"] = -self._static_planar["normals"]
            elif "view_dirs" in cin:
                feeds["view_dirs"] = -self._const["rotations"][:, :, 2]
        t3 = time.perf_counter()
        if "color" in self.models:
            c = self.models["color"].run(feeds)
            tab[ROWS["colors"]] = xp.asarray(c["colors_planar"]) if "colors_planar" in c else xp.asarray(c["colors"]).T
        t4 = time.perf_counter()
        if tab is not out_tab:
            for rows in _WRITTEN_ROWS if "color" in self.models else _WRITTEN_ROWS[:1]:
                copy_into(out_tab[rows], tab[rows])
        t5 = time.perf_counter()
        if timings is not None:
            timings.pose += t1 - t0
            timings.inference += (t2 - t1) + (t4 - t3)
            timings.skinning += (t3 - t2) + (t5 - t4)    # the table copy is part of the skinning stage
            if tab is not out_tab:
                timings.extra["table_copy"] = timings.extra.get("table_copy", 0.0) + (t5 - t4)
        return out_tab

    def posed_surfels(self, poses, world_from_body, camera_center) -> dict[str, np.ndarray]:
        """Row-major NumPy arrays of one posed frame (tests, tools).

        Returns:
            dict ``means`` (S, 3), ``rotations`` (S, 3, 3) (columns ``[t_u, t_v, n]``),
            ``scales`` (S, 2), ``opacities`` (S,), ``colors`` (S, 3), float32.
        """
        tab = to_numpy(self.frame(poses, world_from_body, camera_center, table=None))
        tab = np.array(tab)
        tab[ROWS["opacity"]] = self.opacities
        if "color" not in self.models:
            tab[ROWS["colors"]] = self.static_colors.T
        tu = tab[ROWS["t_u"]].T
        tv = tab[ROWS["t_v"]].T
        n = np.cross(tu, tv)
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        return {"means": np.ascontiguousarray(tab[ROWS["means"]].T),
                "rotations": np.stack([tu, tv, n], -1).astype(np.float32),
                "scales": np.ascontiguousarray(tab[ROWS["scales"]].T),
                "opacities": tab[ROWS["opacity"]].copy(),
                "colors": np.ascontiguousarray(tab[ROWS["colors"]].T)}
