"""Instant avatar: fuse every training frame onto the mesh-bound surfels.

A training-free version of the Human Gaussian Graph's intra-/inter-node operations
(Human Gaussian Graph, Sec. 3.3; ``shared/papers/human-gaussian-graph.txt``): our
surfels are bound one-to-one to the faces of the upsampled SMPL mesh, so instead of
learned attention we

1. **observe** (intra-node, per frame, all surfels at once): pose every surfel with
   forward LBS (eq. 10-12), project its centre, and keep it when it is

   * in front of the camera and inside the image,
   * facing the camera: ``cos(theta) = n . (c - mu) / |c - mu| > min_cos``,
   * inside the mask: the bilinear mask value at the projection is ``>= mask_threshold``
     (so all four neighbouring pixels are foreground: a one-pixel erosion),
   * not occluded: its camera depth is at most ``min(depth map over the 4 bilinear
     neighbour pixels) + depth_tolerance`` (conservative near occlusion edges);

   its colour is the image bilinearly sampled at the projection (pixel centres at
   ``+0.5``), weighted by ``w = cos(theta) * a / (a + 1)`` with ``a`` the projected area
   of the surfel's 1-sigma ellipse in pixels, ``a = pi s_u s_v f_x f_y cos(theta) / z^2``
   (grazing and sub-pixel views count less);
2. **fuse** (intra-node, across frames): a robust weighted mean per surfel: start from
   the weighted per-channel median, reject observations farther than
   ``max(outlier_k * 1.4826 * MAD, min_sigma)`` (colour distance, MAD = weighted median
   absolute deviation from the median start), then the weighted mean of the inliers,
   with ``irls_iters`` rounds of re-rejection around the mean and re-averaging;
3. **fill** (inter-node): surfels no frame saw get the mean colour of their already
   coloured edge neighbours (``CanonicalSurfels.face_adjacency``), sweep after sweep, a
   breadth-first diffusion over the mesh graph (ring by ring).

Visibility uses the z-buffer of the posed upsampled mesh (:func:`fmgs.priors.rasterize_mesh`),
whose faces *are* the surfels, by default (``visibility: mesh``); ``visibility: surfels``
uses the median depth of the initial surfels rendered by our 2DGS rasteriser instead.
Both are the same surface at initialisation; the mesh z-buffer is exact, has no
holes and is ~20x faster on CPU (``benchmarks/bench_aggregate.py``, ``docs/aggregate.md``).

The fused colours then (a) make a **preview** avatar (fixed colours, SMPL skinning,
initial geometry) that is written as a ``"preview"`` bundle (``docs/bundle.md``) the
runtime plays, and (b) **warm-start** the foundation model: its appearance hash grid and
colour MLP are fitted to the fused colours (random view directions in the front
hemisphere, so the view-dependent part starts neutral) before photometric training.

Vectorised throughout: one pass per frame over all surfels (NumPy), grouped reductions
with ``np.bincount`` / ``np.lexsort``; no Python loop over surfels.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from fmgs.body_model import blend_transforms, lbs_points
from fmgs.config import InitConfig
from fmgs.errors import FmgsInputError
from fmgs.trainer.engine.metrics import psnr, ssim_metric
from fmgs.trainer.engine.run import build_setup, heldout_renders, open_sequence, quick_eval
from fmgs.trainer.models.base import AvatarModel, AvatarSetup, frame_bone_transforms
from fmgs.trainer.models.fields import blend_lbs
from fmgs.trainer.models.foundation import PosedSurfels

__all__ = [
    "FrameObservations", "AggregateResult", "aggregate_config",
    "pose_surfels", "mesh_depth_map", "surfel_depth_map", "bilinear_sample",
    "visible_surfels", "sample_observations", "observe_frame", "robust_fuse", "fill_from_neighbours",
    "aggregate_frames", "aggregate_sequence", "evaluate_preview", "PreviewAvatar",
    "apply_init", "preview_surfel_arrays", "write_preview_bundle", "run_preview",
]


# =========================================================================== config
def aggregate_config(cfg) -> InitConfig:
    """The aggregation settings (:class:`fmgs.config.InitConfig`) of a run config's ``init``
    section (validated when the config was loaded, :func:`fmgs.config.validate`)."""
    return InitConfig(**OmegaConf.to_container(cfg.init, resolve=True))


# =========================================================================== posing
def pose_surfels(bone_transforms: np.ndarray, skin_weights: np.ndarray, centers: np.ndarray,
                 rotations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward LBS of surfel centres and normals (NumPy twin of ``fields.blend_lbs``, eq. 10-12).

    Args:
        bone_transforms: (24, 4, 4) canonical -> world ``B_b`` (``frame_bone_transforms``).
        skin_weights: (S, 24) LBS weights.
        centers: (S, 3) canonical centres, metres.
        rotations: (S, 3, 3) canonical frames, columns ``[t_u, t_v, n]``.

    Returns:
        means (S, 3) float64 world centres (metres) and normals (S, 3) float64 unit world
        normals ``normalize(M t_u x M t_v)`` with ``M = (sum_b w_b B_b)[:3, :3]``.
    """
    T = blend_transforms(skin_weights, bone_transforms)
    M = T[:, :3, :3]
    R = np.asarray(rotations, np.float64)
    means = np.einsum("sij,sj->si", M, np.asarray(centers, np.float64)) + T[:, :3, 3]
    n = np.cross(np.einsum("sij,sj->si", M, R[:, :, 0]), np.einsum("sij,sj->si", M, R[:, :, 1]))
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    return means, n



# =========================================================================== depth maps
def mesh_depth_map(verts_world: np.ndarray, faces: np.ndarray, camera) -> np.ndarray:
    """Z-buffer depth of a posed mesh (:func:`fmgs.priors.rasterize_mesh`).

    Args:
        verts_world: (V, 3) world vertices, metres. faces: (F, 3) int.
        camera: :class:`fmgs.camera.Camera` (pinhole; distortion ignored).

    Returns:
        (H, W) float64 camera depth (metres) of the nearest face at each pixel centre,
        ``+inf`` where no face covers the pixel.
    """
    from fmgs.priors import rasterize_mesh

    vc = camera.world_to_camera(verts_world)
    d = rasterize_mesh(vc, faces, camera.K, int(camera.width), int(camera.height))["depth"]
    return np.where(np.isnan(d), np.inf, d)


def surfel_depth_map(means, rotations, scales, opacities, camera, backend: str = "cpu") -> np.ndarray:
    """Median depth of rendered surfels (2DGS: depth where transmittance falls below 0.5).

    Args:
        means (S, 3), rotations (S, 3, 3), scales (S, 2), opacities (S,): world-space
            surfels (arrays or tensors), metres.
        camera: :class:`fmgs.camera.Camera`.

    Returns:
        (H, W) float64 depth in metres, ``+inf`` where the transmittance never drops
        below 0.5.
    """
    from fmgs.trainer.render.dispatch import rasterize_surfels

    f32 = torch.float32
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=f32)  # noqa: E731
    with torch.no_grad():
        out = rasterize_surfels(t(means), t(rotations), t(scales), t(opacities), torch.zeros(len(means), 3),
                                t(camera.K), t(camera.viewmat), int(camera.width), int(camera.height),
                                backend=backend)
    d = out.depth_median.double().numpy()
    return np.where(d > 0, d, np.inf)


# =========================================================================== sampling
def bilinear_sample(img: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear sample of an image at pixel coordinates (pixel (i, j) centre at (j+.5, i+.5)).

    Args:
        img: (H, W) or (H, W, C) array.
        uv: (N, 2) pixel coordinates (x right, y down). Must lie in
            ``[0.5, W-0.5] x [0.5, H-0.5]`` (callers filter; values are clamped).

    Returns:
        values (N[, C]) float64 and corners (N, 4) int64 flat indices ``y*W + x`` of the
        four neighbouring pixels (top-left, top-right, bottom-left, bottom-right).
    """
    H, W = img.shape[:2]
    x = np.clip(uv[:, 0] - 0.5, 0, W - 1)
    y = np.clip(uv[:, 1] - 0.5, 0, H - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), W - 2 if W > 1 else 0)
    y0 = np.minimum(np.floor(y).astype(np.int64), H - 2 if H > 1 else 0)
    x1, y1 = np.minimum(x0 + 1, W - 1), np.minimum(y0 + 1, H - 1)
    fx, fy = x - x0, y - y0
    flat = img.reshape(H * W, -1).astype(np.float64, copy=False)
    idx = np.stack([y0 * W + x0, y0 * W + x1, y1 * W + x0, y1 * W + x1], 1)
    wts = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], 1)
    val = np.einsum("nk,nkc->nc", wts, flat[idx])
    return (val[:, 0] if img.ndim == 2 else val), idx


@dataclass
class FrameObservations:
    """What one frame sees of the surfels (only the visible ones).

    Attributes:
        index: (n,) int64 surfel ids.
        colors: (n, 3) float32 bilinear image colour at the projected centre, [0, 1].
        weights: (n,) float32 ``cos(theta) * a / (a + 1)`` (see module docstring).
        cos: (n,) float32 cosine of the viewing angle.
        depth: (n,) float32 camera depth of the surfel centre, metres.
    """

    index: np.ndarray
    colors: np.ndarray
    weights: np.ndarray
    cos: np.ndarray
    depth: np.ndarray


def visible_surfels(means: np.ndarray, normals: np.ndarray, mask: np.ndarray, camera, depth_map: np.ndarray,
                    cfg: InitConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The visibility test of one frame (vectorised over surfels; module docstring, step 1).

    A surfel is visible when its centre is in front of the camera and projects inside
    ``[0.5, W-0.5] x [0.5, H-0.5]``, it faces the camera (``cos > min_cos``), the bilinear
    mask value at the projection is ``>= mask_threshold`` and its camera depth is at most
    ``depth_tolerance`` behind the nearest of the four neighbouring depth-map pixels.

    Args:
        means: (S, 3) world centres, metres. normals: (S, 3) unit world normals (outward).
        mask: (H, W) float in [0, 1]. camera: :class:`fmgs.camera.Camera` (pinhole).
        depth_map: (H, W) depth in metres of the visible surface (``+inf`` = empty):
            :func:`mesh_depth_map` or :func:`surfel_depth_map`.
        cfg: thresholds.

    Returns:
        ``(index (n,) int64, uv (n, 2) float64 pixels, cos (n,) float64, z (n,) float64 metres)``
        of the visible surfels, in increasing surfel order.

    Raises:
        FmgsInputError: mask or depth map size disagrees with the camera.
    """
    H, W = int(camera.height), int(camera.width)
    if mask.shape != (H, W) or depth_map.shape != (H, W):
        raise FmgsInputError(f"mask {mask.shape} and depth map {depth_map.shape} must both be {H}x{W} "
                             "(the camera's size)")
    uv, z = camera.project(means)
    to_cam = camera.center[None] - means
    dist = np.linalg.norm(to_cam, axis=1)
    cos = np.einsum("sc,sc->s", normals, to_cam) / np.maximum(dist, 1e-12)
    ok = (z > 1e-3) & (cos > cfg.min_cos)
    ok &= (uv[:, 0] >= 0.5) & (uv[:, 0] <= W - 0.5) & (uv[:, 1] >= 0.5) & (uv[:, 1] <= H - 0.5)
    idx = np.nonzero(ok)[0]
    m, corners = bilinear_sample(mask, uv[idx])
    dmin = depth_map.reshape(-1)[corners].min(1)
    keep = (m >= cfg.mask_threshold) & (z[idx] <= dmin + cfg.depth_tolerance)
    idx = idx[keep]
    return idx.astype(np.int64), uv[idx], cos[idx], z[idx]


def sample_observations(index: np.ndarray, uv: np.ndarray, cos: np.ndarray, z: np.ndarray, scales: np.ndarray,
                        image: np.ndarray, camera) -> FrameObservations:
    """Colours and weights of the visible surfels of one frame (module docstring, step 1).

    Args:
        index, uv, cos, z: output of :func:`visible_surfels`.
        scales: (S, 2) ``(s_u, s_v)`` metres (all surfels). image: (H, W, 3) float RGB in [0, 1].
        camera: :class:`fmgs.camera.Camera` of the image.

    Returns:
        :class:`FrameObservations`: bilinear colour at ``uv``, weight
        ``cos * a / (a + 1)`` with ``a = pi s_u s_v f_x f_y cos / z^2`` pixels.

    Raises:
        FmgsInputError: image size disagrees with the camera.
    """
    H, W = int(camera.height), int(camera.width)
    if image.ndim != 3 or image.shape[:2] != (H, W):
        raise FmgsInputError(f"image {image.shape} must be {H}x{W}x3 (the camera's size)")
    col, _ = bilinear_sample(image, uv)
    s = np.asarray(scales, np.float64)[index]
    area = np.pi * s[:, 0] * s[:, 1] * camera.fx * camera.fy * cos / (z * z)
    w = cos * area / (area + 1.0)
    f = np.float32
    return FrameObservations(np.asarray(index, np.int64), col.astype(f), w.astype(f), cos.astype(f), z.astype(f))


def observe_frame(means: np.ndarray, normals: np.ndarray, scales: np.ndarray, image: np.ndarray,
                  mask: np.ndarray, camera, depth_map: np.ndarray, cfg: InitConfig) -> FrameObservations:
    """Visibility and colour of every surfel in one frame (vectorised over surfels):
    :func:`visible_surfels` then :func:`sample_observations`.

    Args:
        means: (S, 3) world centres, metres. normals: (S, 3) unit world normals (outward).
        scales: (S, 2) ``(s_u, s_v)`` metres.
        image: (H, W, 3) float RGB in [0, 1]. mask: (H, W) float in [0, 1].
        camera: :class:`fmgs.camera.Camera` of the image (pinhole).
        depth_map: (H, W) depth in metres of the visible surface (``+inf`` = empty):
            :func:`mesh_depth_map` or :func:`surfel_depth_map`.
        cfg: thresholds.

    Returns:
        :class:`FrameObservations` of the surfels passing every test.

    Raises:
        FmgsInputError: image, mask and depth map sizes disagree with the camera.
    """
    H, W = int(camera.height), int(camera.width)
    if image.shape[:2] != (H, W):
        raise FmgsInputError(f"image {image.shape} must be {H}x{W} (the camera's size)")
    idx, uv, cos, z = visible_surfels(means, normals, mask, camera, depth_map, cfg)
    return sample_observations(idx, uv, cos, z, scales, image, camera)


# =========================================================================== fusion
def _group_weighted_median(group: np.ndarray, values: np.ndarray, weights: np.ndarray, n_groups: int) -> np.ndarray:
    """Weighted lower median of ``values`` per group (groups without weight: 0).

    ``group`` (N,) int, ``values`` (N,), ``weights`` (N,) >= 0 -> (n_groups,) float64.
    """
    # One integer sort on (group, value quantised to 2^-20); ties keep their input order.
    q = np.clip(np.round(np.asarray(values, np.float64) * (1 << 20)), -(1 << 30), (1 << 30)).astype(np.int64)
    order = np.argsort(group.astype(np.int64) * (1 << 32) + (q + (1 << 31)), kind="stable")
    g, v, w = group[order], values[order], weights[order].astype(np.float64)
    total = np.bincount(g, w, minlength=n_groups)
    cum = np.cumsum(w)
    start = np.concatenate([[0.0], cum])[np.searchsorted(g, np.arange(n_groups))]  # cum before group
    within = cum - start[g]
    reached = within >= 0.5 * total[g] - 1e-12 * np.maximum(total[g], 1)
    reached &= w > 0
    cand = np.nonzero(reached)[0]
    out = np.zeros(n_groups)
    if cand.size:
        # first reaching observation of each group
        first = np.ones(cand.size, bool)
        first[1:] = g[cand[1:]] != g[cand[:-1]]
        sel = cand[first]
        out[g[sel]] = v[sel]
    return out


def robust_fuse(index: np.ndarray, colors: np.ndarray, weights: np.ndarray, num_surfels: int,
                cfg: InitConfig) -> dict:
    """Robust weighted mean colour per surfel over all its observations.

    Median start (per-channel weighted median), rejection of observations whose colour
    distance to the estimate exceeds ``thr = max(outlier_k * 1.4826 * MAD, min_sigma)``
    (MAD = weighted median of the distances to the median start; 1.4826 MAD estimates a
    Gaussian sigma), then weighted mean of the inliers, and ``irls_iters`` rounds of
    re-rejection (same ``thr``) around the current mean and re-averaging. Medians use
    values quantised to 2^-20. Float64 accumulation.

    Args:
        index: (N,) int surfel id of each observation.
        colors: (N, 3) observed colours in [0, 1].
        weights: (N,) >= 0 observation weights.
        num_surfels: S.
        cfg: ``outlier_k``, ``min_sigma``, ``irls_iters``.

    Returns:
        dict with ``colors`` (S, 3) float32 (0 for unseen), ``weight`` (S,) float64 summed
        inlier weight, ``count`` (S,) int64 observations, ``inliers`` (S,) int64 inlier
        observations, ``inlier_mask`` (N,) bool per observation, ``seen`` (S,) bool.
    """
    index = np.asarray(index, np.int64)
    c = np.asarray(colors, np.float64)
    w = np.asarray(weights, np.float64)
    S = int(num_surfels)
    count = np.bincount(index, minlength=S)
    est = np.stack([_group_weighted_median(index, c[:, k], w, S) for k in range(3)], 1)
    r = np.linalg.norm(c - est[index], axis=1)
    mad = _group_weighted_median(index, r, w, S)
    thr = np.maximum(cfg.outlier_k * 1.4826 * mad, cfg.min_sigma)
    inl = np.ones(index.shape[0], bool)
    for it in range(cfg.irls_iters + 1):
        if it:
            r = np.linalg.norm(c - est[index], axis=1)
        new = r <= thr[index]
        if it:
            # a surfel whose every observation would now be rejected keeps its previous inliers
            lost = np.bincount(index, w * new, minlength=S) <= 0
            new = np.where(lost[index], inl, new)
        inl = new
        wi = w * inl
        tot = np.bincount(index, wi, minlength=S)
        num = np.stack([np.bincount(index, wi * c[:, k], minlength=S) for k in range(3)], 1)
        est = np.where(tot[:, None] > 0, num / np.maximum(tot, 1e-30)[:, None], est)
    seen = tot > 0
    est[~seen] = 0.0
    return {"colors": est.astype(np.float32), "weight": tot, "count": count,
            "inliers": np.bincount(index, inl.astype(np.float64), minlength=S).astype(np.int64),
            "inlier_mask": inl, "seen": seen}


def fill_from_neighbours(colors: np.ndarray, known: np.ndarray, adjacency: np.ndarray,
                         max_sweeps: int = 200) -> tuple[np.ndarray, np.ndarray, int]:
    """Give unknown surfels the mean colour of their known mesh neighbours, ring by ring.

    Each sweep assigns every unknown surfel with at least one known edge neighbour the
    unweighted mean of those neighbours' colours (the inter-node message passing of the
    Human Gaussian Graph, Sec. 3.3, as a fixed average), then marks it known. Surfels
    still unknown after ``max_sweeps`` (disconnected from every seen surfel) get the
    mean of the known colours.

    Args:
        colors: (S, 3) colours (rows of unknown surfels ignored).
        known: (S,) bool.
        adjacency: (A, 2) int pairs of edge-adjacent surfels (``face_adjacency``).
        max_sweeps: maximum sweeps.

    Returns:
        ``(colors (S, 3) float32, filled (S,) bool: surfels that got a colour here, sweeps)``.
    """
    col = np.asarray(colors, np.float64).copy()
    known = np.asarray(known, bool).copy()
    S = col.shape[0]
    was = known.copy()
    adj = np.asarray(adjacency, np.int64).reshape(-1, 2)
    a = np.concatenate([adj[:, 0], adj[:, 1]])
    b = np.concatenate([adj[:, 1], adj[:, 0]])
    sweeps = 0
    while not known.all() and sweeps < max_sweeps:
        use = known[b] & ~known[a]
        if not use.any():
            break
        cnt = np.bincount(a[use], minlength=S)
        new = cnt > 0
        for k in range(3):
            s = np.bincount(a[use], col[b[use], k], minlength=S)
            col[new, k] = s[new] / cnt[new]
        known |= new
        sweeps += 1
    if not known.all():
        col[~known] = col[known].mean(0) if known.any() else 0.5
        known[:] = True
    return col.astype(np.float32), known & ~was, sweeps


# =========================================================================== driver
@dataclass
class AggregateResult:
    """Fused per-surfel colours and bookkeeping.

    Attributes:
        colors: (S, 3) float32 final colours in [0, 1] (seen: fused; unseen: filled).
        seen: (S,) bool surfels with at least one inlier observation.
        filled: (S,) bool surfels coloured from their neighbours.
        weight: (S,) float64 summed inlier weight. count: (S,) int64 observations.
        inliers: (S,) int64 inlier observations.
        frames: number of frames used.
        timings: seconds per stage: ``frame`` (cached image -> float frame), ``pose``
            (bone transforms + LBS), ``depth`` (depth
            maps), ``visibility`` (the tests), ``sample`` (colours, weights), ``fuse``,
            ``fill``, ``total`` (these together); ``load`` (image decoding, before
            ``total``) from :func:`aggregate_sequence`; :func:`aggregate_frames` reports
            ``observe`` (visibility + sample) instead.
        observations: the per-frame :class:`FrameObservations` (only with ``keep_observations``).
    """

    colors: np.ndarray
    seen: np.ndarray
    filled: np.ndarray
    weight: np.ndarray
    count: np.ndarray
    inliers: np.ndarray
    frames: int
    timings: dict = field(default_factory=dict)
    observations: list | None = None

    def summary(self) -> dict:
        """JSON-ready statistics."""
        return {"surfels": int(self.colors.shape[0]), "frames": int(self.frames),
                "seen": int(self.seen.sum()), "filled": int(self.filled.sum()),
                "observations": int(self.count.sum()), "inlier_observations": int(self.inliers.sum()),
                "timings_s": {k: round(float(v), 3) for k, v in self.timings.items()}}


def aggregate_frames(frames, num_surfels: int, adjacency: np.ndarray, cfg: InitConfig,
                     keep_observations: bool = False) -> AggregateResult:
    """Observe, fuse and fill over an iterable of already-posed frames.

    Args:
        frames: iterable of dicts with ``means`` (S, 3), ``normals`` (S, 3), ``scales``
            (S, 2), ``image`` (H, W, 3), ``mask`` (H, W), ``camera`` and ``depth_map``
            (H, W) (world space, metres; see :func:`observe_frame`).
        num_surfels: S. adjacency: (A, 2) surfel adjacency for the fill.
        cfg: settings. keep_observations: keep the per-frame observations in the result.

    Returns:
        :class:`AggregateResult`.
    """
    t0 = time.perf_counter()
    obs, n = [], 0
    for fr in frames:
        obs.append(observe_frame(fr["means"], fr["normals"], fr["scales"], fr["image"], fr["mask"],
                                 fr["camera"], fr["depth_map"], cfg))
        n += 1
    t1 = time.perf_counter()
    return _fuse_and_fill(obs, n, num_surfels, adjacency, cfg, keep_observations,
                          {"observe": t1 - t0}, t0)


def _fuse_and_fill(obs, n, S, adjacency, cfg, keep, timings, t0) -> AggregateResult:
    t1 = time.perf_counter()
    if obs:
        idx = np.concatenate([o.index for o in obs])
        col = np.concatenate([o.colors for o in obs])
        w = np.concatenate([o.weights for o in obs])
    else:
        idx, col, w = np.zeros(0, np.int64), np.zeros((0, 3), np.float32), np.zeros(0, np.float32)
    fused = robust_fuse(idx, col, w, S, cfg)
    t2 = time.perf_counter()
    colors, filled, _ = fill_from_neighbours(fused["colors"], fused["seen"], adjacency, cfg.max_fill_sweeps)
    t3 = time.perf_counter()
    timings.update(fuse=t2 - t1, fill=t3 - t2, total=t3 - t0)
    return AggregateResult(np.clip(colors, 0, 1), fused["seen"], filled, fused["weight"], fused["count"],
                           fused["inliers"], n, timings, obs if keep else None)


def aggregate_sequence(setup, seq, cfg: InitConfig, progress: bool = True) -> AggregateResult:
    """Aggregate a training sequence onto the canonical surfels of ``setup``.

    Args:
        setup: :class:`fmgs.trainer.engine.train.AvatarSetup` (SMPL, canonical surfels).
        seq: :class:`fmgs.trainer.data.humannerf.HumanNeRFSequence` (its frames are decoded here if
            they were not yet; that time is reported as ``timings['load']``).
        cfg: settings (``frame_step`` subsamples the frames).

    Returns:
        :class:`AggregateResult` (timings: see :attr:`AggregateResult.timings`).
    """
    from tqdm import tqdm

    
    sf = setup.surfels
    timings = {}
    if hasattr(seq, "load"):  # decode (and cache) the frames first; its time is reported apart
        a = time.perf_counter()
        seq.load()
        timings["load"] = time.perf_counter() - a
    t0 = time.perf_counter()
    tf = tp = td = tv = ts = 0.0
    frame_ids = range(0, len(seq), int(cfg.frame_step))
    scales = np.asarray(sf.scales, np.float64)
    opac = np.full(sf.num_surfels, 0.9)
    obs = []
    for i in tqdm(frame_ids, desc="aggregate", unit="frame", disable=None if progress else True):
        a0 = time.perf_counter()
        fr = seq[i]
        a = time.perf_counter()
        B = frame_bone_transforms(setup.smpl, setup.rest_joints, setup.canonical_G, fr.poses, fr.world_from_body)
        means, normals = pose_surfels(B, sf.skin_weights, sf.centers, sf.rotations)
        b = time.perf_counter()
        if cfg.visibility == "mesh":
            depth = mesh_depth_map(lbs_points(sf.verts, sf.mesh_skin_weights, B), sf.faces, fr.camera)
        else:
            from fmgs.trainer.models.fields import blend_lbs

            with torch.no_grad():
                lb = blend_lbs(torch.as_tensor(np.asarray(sf.skin_weights), dtype=torch.float32),
                               torch.as_tensor(B, dtype=torch.float32),
                               torch.as_tensor(np.asarray(sf.centers), dtype=torch.float32),
                               torch.as_tensor(np.asarray(sf.rotations), dtype=torch.float32))
            depth = surfel_depth_map(lb.means, lb.rotations, scales, opac, fr.camera)
        c = time.perf_counter()
        vis = visible_surfels(means, normals, fr.mask, fr.camera, depth, cfg)
        d = time.perf_counter()
        obs.append(sample_observations(*vis, scales, fr.image, fr.camera))
        e = time.perf_counter()
        tf, tp, td, tv, ts = tf + a - a0, tp + b - a, td + c - b, tv + d - c, ts + e - d
    timings.update(frame=tf, pose=tp, depth=td, visibility=tv, sample=ts)
    return _fuse_and_fill(obs, len(obs), sf.num_surfels, sf.face_adjacency, cfg, False, timings, t0)


# =========================================================================== preview avatar
class PreviewAvatar(AvatarModel):
    """Fixed-colour avatar: initial canonical surfels, SMPL skinning, per-surfel colours
    (an :class:`~fmgs.trainer.models.base.AvatarModel` without trainable parameters).

    Args:
        surfels: :class:`fmgs.surfels.CanonicalSurfels`.
        colors: (S, 3) colours in [0, 1] (e.g. :attr:`AggregateResult.colors`).
        opacity: opacity of every surfel, in (0, 1) (``surfels.init_opacity``).
    """

    kind = "preview"

    def __init__(self, surfels, colors: np.ndarray, opacity: float = 0.9):
        super().__init__()
        f32 = torch.float32
        S = surfels.num_surfels
        colors = np.asarray(colors, np.float32)
        if colors.shape != (S, 3):
            raise FmgsInputError(f"preview colours must have shape ({S}, 3), got {colors.shape}")
        self.register_buffer("centers", torch.as_tensor(np.asarray(surfels.centers), dtype=f32))
        self.register_buffer("frames", torch.as_tensor(np.asarray(surfels.rotations), dtype=f32))
        self.register_buffer("scales", torch.as_tensor(np.asarray(surfels.scales), dtype=f32))
        self.register_buffer("skin_weights", torch.as_tensor(np.asarray(surfels.skin_weights), dtype=f32))
        self.register_buffer("colors", torch.as_tensor(colors))
        self.register_buffer("opacities", torch.full((S,), float(opacity), dtype=f32))

    def forward(self, bone_transforms: torch.Tensor, camera_center: torch.Tensor | None = None) -> PosedSurfels:
        """Pose with ``(24, 4, 4)`` world-from-canonical bone transforms -> world-space
        :class:`~fmgs.trainer.models.foundation.PosedSurfels` (the colours do not depend on the view)."""
        p = blend_lbs(self.skin_weights, bone_transforms, self.centers, self.frames)
        return PosedSurfels(p.means, p.rotations, self.scales, self.opacities, self.colors)

    def pose(self, frame, setup: AvatarSetup, *, frame_id: int | None = None, training: bool = False,
             semantic: bool = True) -> PosedSurfels:
        """:meth:`forward` at the frame's SMPL pose (eq. 10-12 with SMPL weights)."""
        B = frame_bone_transforms(setup.smpl, setup.rest_joints, setup.canonical_G, frame.poses,
                                  frame.world_from_body)
        return self(torch.as_tensor(B, dtype=torch.float32))


# =========================================================================== warm start
def _save_colors(path: Path, res: AggregateResult) -> None:
    from safetensors.numpy import save_file

    from fmgs.atomic import atomic_path

    with atomic_path(path) as tmp:
        save_file({"colors": res.colors, "seen": res.seen.astype(np.uint8), "filled": res.filled.astype(np.uint8),
                   "weight": res.weight.astype(np.float32)}, str(tmp))


def apply_init(cfg, model, setup, train_seq, test_seq, run_dir: Path) -> float:
    """The ``init.kind`` hook of ``fmgs-train`` (called once, before iteration 0).

    ``none``: nothing. ``aggregate``: aggregate ``train_seq`` onto the surfels, write
    ``RUN_DIR/aggregate.safetensors`` and ``RUN_DIR/aggregate.json`` (statistics, timings),
    then warm-start the foundation model's appearance field (:meth:`~fmgs.trainer.models.base.AvatarModel.warm_start_appearance`);
    with ``train.eval_every`` it also appends the held-out PSNR after the warm start to
    ``progress.jsonl`` as iteration 0.

    Returns:
        Seconds spent, decoding of the training frames included (added to the run's
        training wall time; a cold run decodes them inside its first iteration, so the
        curves compare fairly). The iteration-0 evaluation is not counted.

    The warm start needs a model with a hash grid and a colour MLP (the foundation model);
    other models keep their initialisation, with a note.
    """
    if str(cfg.init.kind) == "none":
        return 0.0
    acfg = aggregate_config(cfg)
    t0 = time.perf_counter()
    res = aggregate_sequence(setup, train_seq, acfg)
    run_dir = Path(run_dir)
    _save_colors(run_dir / "aggregate.safetensors", res)
    info = {"aggregate": res.summary()}
    info["warmup"] = model.warm_start_appearance(res.colors, acfg.warmup_iters, acfg.warmup_lr_grid,
                                                 acfg.warmup_lr_mlp, seed=int(cfg.train.seed))
    if info["warmup"] is None:
        print("init.kind=aggregate: the warm-up fits the foundation model's appearance; "
              f"{type(model).__name__} keeps its initialisation (aggregate.safetensors is written)")
    # Decoding the training frames (cached, shared with training) counts here: a cold run
    # pays it inside its first iteration, so both curves include it once.
    spent = time.perf_counter() - t0
    info["init_seconds"] = spent
    from fmgs.atomic import write_json_atomic

    write_json_atomic(run_dir / "aggregate.json", info)
    w = info["warmup"]
    print(f"init aggregate: {res.frames} frames, {int(res.seen.sum())}/{res.colors.shape[0]} surfels seen, "
          f"{res.timings['total']:.1f} s" + (f"; warm-up {w['iterations']} it, colour RMSE "
                                               f"{w['rmse_start']:.3f} -> {w['rmse_end']:.3f}" if w else ""))
    if int(cfg.train.eval_every or 0):
        q = quick_eval(model, setup, test_seq, cfg, int(cfg.train.eval_frames))
        with open(run_dir / "progress.jsonl", "a") as f:
            f.write(json.dumps({"iteration": 0, "elapsed_s": round(spent, 2), **q}) + "\n")
    return spent


# =========================================================================== preview export
def preview_surfel_arrays(surfels, colors: np.ndarray, opacity: float) -> dict[str, np.ndarray]:
    """The surfel channels of a ``"preview"`` bundle (docs/bundle.md): initial canonical
    geometry, constant opacity, SMPL skinning weights, the fused colours."""
    S = surfels.num_surfels
    return {"centers": np.asarray(surfels.centers, np.float32),
            "rotations": np.asarray(surfels.rotations, np.float32),
            "scales": np.asarray(surfels.scales, np.float32),
            "opacities": np.full(S, float(opacity), np.float32),
            "skin_weights": np.asarray(surfels.skin_weights, np.float32),
            "colors": np.asarray(colors, np.float32)}


def write_preview_bundle(out_dir: Path, setup, colors: np.ndarray, opacity: float, producer: dict | None = None,
                         overwrite: bool = True) -> Path:
    """Write the preview avatar as a bundle of kind ``"preview"`` (:func:`fmgs.bundle.write_bundle`)."""
    from fmgs.bundle import make_body_model, write_bundle

    s = setup.surfels
    bm = make_body_model(np.asarray(setup.smpl.parents), setup.rest_joints, s.joints, s.bone_transforms,
                         setup.betas, canonical_pose=s.canonical_pose)
    return write_bundle(out_dir, preview_surfel_arrays(s, colors, opacity), kind="preview", body_model=bm,
                        producer=producer, overwrite=overwrite)


def evaluate_preview(model, setup, seq, cfg, max_frames: int | None = None) -> dict:
    """Held-out PSNR / SSIM of a :class:`PreviewAvatar` on ``seq`` (full images, configured
    background; the protocol of ``fmgs-eval``)."""
    n = len(seq) if max_frames is None else min(len(seq), int(max_frames))
    rec = []
    for fr, out in heldout_renders(model, setup, seq, cfg, range(n)):
        pred = out.rgb.clamp(0, 1).numpy()
        rec.append({"frame": fr.name, "psnr": psnr(pred, fr.image), "ssim": ssim_metric(pred, fr.image)})
    return {"num_frames": n, "psnr": float(np.mean([r["psnr"] for r in rec])),
            "ssim": float(np.mean([r["ssim"] for r in rec])), "frames": rec}


def run_preview(cfg, out_dir: Path, evaluate: bool = True) -> dict:
    """``fmgs-train --preview``: aggregate, write the preview bundle, optionally score it.

    Writes ``OUT/aggregate.safetensors``, ``OUT/preview/`` (bundle of kind ``"preview"``),
    ``OUT/preview_metrics.json`` (aggregation statistics and timings, held-out PSNR/SSIM).

    Returns:
        The metrics dictionary.
    """
    from fmgs.atomic import write_json_atomic
    from fmgs.config import absolute_paths, save_config

    out_dir = Path(out_dir)
    absolute_paths(cfg)
    acfg = aggregate_config(cfg)
    t0 = time.perf_counter()
    train_seq = open_sequence(cfg, "train")
    test_seq = open_sequence(cfg, "test") if evaluate else None
    setup = build_setup(cfg, train_seq)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    t_setup = time.perf_counter() - t0
    res = aggregate_sequence(setup, train_seq, acfg)
    _save_colors(out_dir / "aggregate.safetensors", res)
    bundle = write_preview_bundle(out_dir / "preview", setup, res.colors, float(cfg.surfels.init_opacity),
                                  producer={"run_dir": str(out_dir), "init": "aggregate"})
    metrics = {"aggregate": res.summary(), "setup_seconds": round(t_setup, 3), "bundle": str(bundle),
               "wall_seconds_to_bundle": round(time.perf_counter() - t0, 3)}
    print(f"preview: {res.frames} frames aggregated in {res.timings['total']:.1f} s "
          f"(+{res.timings.get('load', 0):.1f} s decoding), {int(res.seen.sum())}/{res.colors.shape[0]} surfels "
          f"seen, {int(res.filled.sum())} filled -> {bundle}")
    if evaluate:
        model = PreviewAvatar(setup.surfels, res.colors, float(cfg.surfels.init_opacity))
        metrics["heldout"] = evaluate_preview(model, setup, test_seq, cfg, cfg.eval.max_frames)
        print(f"preview held-out ({metrics['heldout']['num_frames']} frames): "
              f"PSNR {metrics['heldout']['psnr']:.2f} dB, SSIM {metrics['heldout']['ssim']:.4f}")
    write_json_atomic(out_dir / "preview_metrics.json", metrics)
    return metrics
