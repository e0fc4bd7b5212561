"""Convert Sapiens "lite" outputs into the fmgs priors format, with a normal-convention check.

Sapiens (Khirodkar et al., ECCV 2024) "lite" demo scripts write, per input image ``<name>``:

* segmentation: ``<name>_seg.npy`` (H, W) int64 class ids 0..27 (the 28 classes of
  :data:`fmgs.priors.SAPIENS_CLASSES`) and ``<name>.npy`` (H, W) bool foreground mask;
* depth: ``<name>.npy`` (H, W) float32 relative depth, larger = farther, unmasked,
  unknown scale and shift;
* normal: ``<name>.npy`` (H, W, 3) float32 unit vectors in camera coordinates with x to the
  image right; the signs of y and z are not documented.

Because the seg mask and the depth map share a file name, the converter expects one
sub-folder per task: ``DIR/seg/``, ``DIR/depth/``, ``DIR/normal/`` (any may be missing).

Normal conventions (:data:`NORMAL_CONVENTIONS`) are sign flips that take the source axes
to OpenCV camera axes (+x right, +y down, +z forward). The check
(:func:`normal_convention_scores`, :func:`check_normal_convention`) uses two facts that hold
for any correct camera-space normal map of a person: normals of visible surfaces point at
the camera (``n . ray < 0`` for the pixel's viewing ray), and at the silhouette the normal
is perpendicular to the ray and points out of the mask in the image plane. The first fixes
the sign of z, the second the signs of x and y.

NumPy / OpenCV only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fmgs.errors import FmgsInputError
from fmgs.priors import NUM_SAPIENS_CLASSES

__all__ = ["NORMAL_CONVENTIONS", "normal_convention_scores", "detect_normal_convention",
           "check_normal_convention", "read_sapiens_frame", "SapiensConverter",
           "undistort_map"]

#: Source normal convention -> per-axis sign that maps it to OpenCV camera axes.
NORMAL_CONVENTIONS: dict[str, tuple[int, int, int]] = {
    "opencv": (1, 1, 1),            # x right, y down, z forward (into the scene)
    "opengl": (1, -1, -1),          # x right, y up,   z backward (towards the viewer)
    "y_up_z_forward": (1, -1, 1),
    "y_down_z_backward": (1, 1, -1),
}

#: thresholds of the check: fraction of camera-facing normals inside the (eroded) mask,
#: and the normalised agreement of n_x / n_y with the outward silhouette direction.
FACING_MIN = 0.7
OUTWARD_MIN = 0.2


def _rays(hw, K) -> np.ndarray:
    H, W = hw
    if K is None:
        return np.broadcast_to(np.array([0.0, 0.0, 1.0]), (H, W, 3))
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    pix = np.stack([jj, ii, np.ones_like(ii)], -1)
    return pix @ np.linalg.inv(np.asarray(K, dtype=np.float64)).T


def normal_convention_scores(normal, mask, K=None) -> dict:
    """Statistics that tell whether a normal map is in OpenCV camera axes.

    Args:
        normal: (H, W, 3) float normals (NaN / zero = no value).
        mask: (H, W) person mask (bool or 0/255).
        K: optional (3, 3) intrinsics (pixel centres at +0.5) for exact viewing rays;
            None uses the optical axis ``(0, 0, 1)`` for every pixel.
    Returns:
        dict: ``facing`` fraction (0..1) of valid normals inside the eroded mask with
        ``n . ray < 0``; ``outward_x`` and ``outward_y``: ``sum(n_a o_a) / sum(|o_a|)`` over
        the silhouette pixels, ``o`` the unit outward direction of the mask in image axes
        (x right, y down), about +1 for a correct map and -1 for a flipped axis; ``n_inner``
        and ``n_edge`` pixel counts.
    """
    n = np.asarray(normal, dtype=np.float64)
    m = (np.asarray(mask) > 0).astype(np.uint8)
    valid = np.isfinite(n).all(2) & (np.abs(np.nan_to_num(n)).sum(2) > 0)
    n = np.nan_to_num(n)
    k3 = np.ones((3, 3), np.uint8)
    inner = cv2.erode(m, k3, iterations=3).astype(bool) & valid
    edge = m.astype(bool) & ~cv2.erode(m, k3, iterations=2).astype(bool) & valid
    rays = _rays(m.shape, K)
    dots = (n * rays).sum(2)
    facing = float((dots[inner] < 0).mean()) if inner.any() else float("nan")
    blur = cv2.GaussianBlur(m.astype(np.float32), (0, 0), 2.0)
    gx = cv2.Sobel(blur, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(blur, cv2.CV_32F, 0, 1, ksize=3)
    g = np.stack([-gx, -gy], -1).astype(np.float64)  # outward = down the mask gradient
    gn = np.linalg.norm(g, axis=2)
    edge &= gn > 1e-6
    o = g[edge] / gn[edge][:, None]
    ne = n[edge]
    def score(a):
        den = np.abs(o[:, a]).sum()
        return float((ne[:, a] * o[:, a]).sum() / den) if den > 0 else float("nan")
    return dict(facing=facing, outward_x=score(0), outward_y=score(1),
                n_inner=int(inner.sum()), n_edge=int(edge.sum()))


def _apply(normal, signs) -> np.ndarray:
    return np.asarray(normal, dtype=np.float32) * np.asarray(signs, dtype=np.float32)


def detect_normal_convention(normal_raw, mask, K=None, path=None) -> str:
    """Guess the source convention of a raw normal map (a name of :data:`NORMAL_CONVENTIONS`).

    The z sign comes from the camera-facing test, the y sign from the silhouette test; x
    must already point right (as Sapiens documents).

    Raises:
        FmgsInputError (naming ``path``): too few mask pixels, or statistics too weak to
            decide (``max(facing, 1 - facing) < 0.7`` or ``|outward_y| < 0.2``), or x
            pointing left (``outward_x < 0.2``).
    """
    s = normal_convention_scores(normal_raw, mask, K)
    if s["n_inner"] < 50 or s["n_edge"] < 20:
        raise FmgsInputError(
            f"cannot detect the normal convention: mask too small ({s['n_inner']} inner, "
            f"{s['n_edge']} silhouette pixels with normals)", path)
    f, oy, ox = s["facing"], s["outward_y"], s["outward_x"]
    if max(f, 1 - f) < FACING_MIN or abs(oy) < OUTWARD_MIN or not ox >= OUTWARD_MIN:
        raise FmgsInputError(
            "cannot detect the normal convention (facing fraction "
            f"{f:.2f}, silhouette agreement x {ox:+.2f} y {oy:+.2f}); pass "
            "--normal-convention explicitly", path)
    sy = 1 if oy > 0 else -1
    sz = 1 if f >= 0.5 else -1
    for name, signs in NORMAL_CONVENTIONS.items():
        if signs == (1, sy, sz):
            return name
    raise AssertionError("unreachable")


def check_normal_convention(normal_cv, mask, K=None, path=None,
                            convention: str = "opencv") -> dict:
    """Fail loudly unless a converted normal map looks like OpenCV camera-space normals.

    Args:
        normal_cv: (H, W, 3) normals after conversion to OpenCV axes.
        mask: (H, W) person mask.
        K: optional (3, 3) intrinsics for exact viewing rays.
        path: file named in the error.
        convention: the source convention used (named in the error).
    Returns:
        the scores of :func:`normal_convention_scores` (when the check passes or the mask
        is too small to judge: fewer than 50 inner or 20 silhouette pixels).
    Raises:
        FmgsInputError: fewer than 70 % of the inner normals face the camera, or the
            silhouette normals do not point outwards (x or y agreement < 0.2). The message
            suggests the convention that the statistics point to.
    """
    s = normal_convention_scores(normal_cv, mask, K)
    if s["n_inner"] < 50 or s["n_edge"] < 20:
        return s
    problems = []
    if not s["facing"] >= FACING_MIN:
        problems.append(f"only {100 * s['facing']:.0f}% of the normals inside the mask face "
                        "the camera (z sign wrong?)")
    if not s["outward_y"] >= OUTWARD_MIN:
        problems.append(f"silhouette normals do not point outwards in y (agreement "
                        f"{s['outward_y']:+.2f}; y sign wrong?)")
    if not s["outward_x"] >= OUTWARD_MIN:
        problems.append(f"silhouette normals do not point outwards in x (agreement "
                        f"{s['outward_x']:+.2f}; x should point to the image right)")
    if problems:
        hint = ""
        try:
            signs = np.array(NORMAL_CONVENTIONS[convention])
            raw = _apply(normal_cv, signs)  # back to the source axes (signs are involutions)
            hint = f"; the data look like --normal-convention {detect_normal_convention(raw, mask, K)}"
        except (FmgsInputError, KeyError):
            pass
        raise FmgsInputError(
            f"normal map does not look like camera-space normals under convention "
            f"{convention!r}: " + "; ".join(problems) + hint, path)
    return s


# =========================================================================== reading
def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise FmgsInputError(f"cannot read .npy ({exc})", path) from None


def read_sapiens_frame(src_dir, name: str) -> dict:
    """Read the raw Sapiens lite outputs of one image (any subset may be missing).

    Args:
        src_dir: folder with ``seg/``, ``depth/``, ``normal/`` sub-folders.
        name: image stem.
    Returns:
        dict with ``seg`` (H, W) int64 ids, ``seg_mask`` (H, W) bool, ``depth`` (H, W)
        float32, ``normal`` (H, W, 3) float32 (source convention), each None when absent,
        and ``paths`` (modality -> file) for error messages.
    Raises:
        FmgsInputError (naming the file): undecodable file, wrong shape or dtype, class
            ids outside 0..27, non-finite depth/normal values.
    """
    src = Path(src_dir)
    out: dict = dict(seg=None, seg_mask=None, depth=None, normal=None, paths={})
    p = src / "seg" / f"{name}_seg.npy"
    if p.is_file():
        a = _load_npy(p)
        if a.ndim == 3 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
            raise FmgsInputError(f"Sapiens seg must be (H, W) integer class ids, got "
                                 f"{a.shape} {a.dtype}", p)
        if a.min() < 0 or a.max() >= NUM_SAPIENS_CLASSES:
            raise FmgsInputError(f"Sapiens seg ids must be 0..{NUM_SAPIENS_CLASSES - 1}, "
                                 f"found {a.min()}..{a.max()}", p)
        out["seg"], out["paths"]["seg"] = a.astype(np.int64), p
        pm = src / "seg" / f"{name}.npy"
        if pm.is_file():
            m = _load_npy(pm)
            if m.shape != a.shape:
                raise FmgsInputError(f"Sapiens seg mask shape {m.shape} differs from the "
                                     f"seg ids {a.shape}", pm)
            out["seg_mask"] = m.astype(bool)
    p = src / "depth" / f"{name}.npy"
    if p.is_file():
        a = _load_npy(p)
        if a.ndim == 3 and 1 in (a.shape[0], a.shape[2]):
            a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:2])
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
            raise FmgsInputError(f"Sapiens depth must be (H, W) float, got {a.shape} {a.dtype}", p)
        if np.isinf(a).any():
            raise FmgsInputError("Sapiens depth contains +-inf", p)
        out["depth"], out["paths"]["depth"] = a.astype(np.float32), p
    p = src / "normal" / f"{name}.npy"
    if p.is_file():
        a = _load_npy(p)
        if a.ndim != 3 or a.shape[2] != 3 or not np.issubdtype(a.dtype, np.floating):
            raise FmgsInputError(f"Sapiens normal must be (H, W, 3) float, got {a.shape} "
                                 f"{a.dtype}", p)
        if np.isinf(a).any():
            raise FmgsInputError("Sapiens normal contains +-inf", p)
        out["normal"], out["paths"]["normal"] = a.astype(np.float32), p
    return out


def undistort_map(K_raw, dist, width: int, height: int):
    """Remap tables that undistort an image keeping the same K (like ``cv2.undistort``).

    Args:
        K_raw: (3, 3) intrinsics as stored in ``cameras.pkl`` (OpenCV pixel-centre
            convention, the one OpenCV's distortion model expects).
        dist: (5,) ``k1 k2 p1 p2 k3``.
        width, height: image size in pixels.
    Returns:
        (map1, map2) float32 for ``cv2.remap``.
    """
    return cv2.initUndistortRectifyMap(np.asarray(K_raw, np.float64),
                                       np.asarray(dist, np.float64).reshape(-1), None,
                                       np.asarray(K_raw, np.float64), (width, height),
                                       cv2.CV_32FC1)


def _remap(a, maps, fill):
    return cv2.remap(a, maps[0], maps[1], cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                     borderValue=fill)


@dataclass
class SapiensConverter:
    """Turn raw Sapiens outputs into prior maps (mask / depth / normal / parts).

    Args:
        normal_convention: a key of :data:`NORMAL_CONVENTIONS`, or ``"auto"`` to detect it
            on the first frame that has normals and a mask (then fixed and checked on
            every later frame).
        check_normals: run :func:`check_normal_convention` on every frame.

    Attributes:
        resolved_convention: the convention in use (None until known in auto mode).
    """

    normal_convention: str = "auto"
    check_normals: bool = True
    resolved_convention: str | None = None

    def __post_init__(self):
        if self.normal_convention != "auto" and self.normal_convention not in NORMAL_CONVENTIONS:
            raise FmgsInputError(
                f"unknown normal convention {self.normal_convention!r}; choose 'auto' or one "
                f"of {sorted(NORMAL_CONVENTIONS)}")
        if self.normal_convention != "auto":
            self.resolved_convention = self.normal_convention

    def convert(self, raw: dict, hw: tuple[int, int], K=None, undistort_maps=None,
                fallback_mask=None) -> dict:
        """Convert one frame.

        Args:
            raw: output of :func:`read_sapiens_frame` (or the same keys from a model run).
            hw: (H, W) of the sequence image; maps of another size are resized (nearest
                for ids and masks, bilinear for depth and normals, normals renormalised).
            K: (3, 3) intrinsics of the (undistorted) image, pixel centres at +0.5, for the
                normal check's viewing rays.
            undistort_maps: remap tables of :func:`undistort_map` when the outputs were
                computed on the raw (distorted) images; None when already undistorted.
            fallback_mask: (H, W) mask used for the normal check when there is no seg
                (e.g. the sequence's own mask, already undistorted).
        Returns:
            dict ``mask`` (uint8 0/255) / ``depth`` (float32, NaN = no value) /
            ``normal`` (float32 OpenCV axes, NaN = no value) / ``parts`` (uint8), each
            None when absent.
        Raises:
            FmgsInputError: the normal check fails (message names the normal file), or
                ``"auto"`` cannot decide.
        """
        H, W = hw
        paths = raw.get("paths", {})
        out = dict(mask=None, depth=None, normal=None, parts=None)
        seg = raw.get("seg")
        if seg is not None:
            seg = seg.astype(np.uint8)
            m = raw.get("seg_mask")
            m = (seg > 0) if m is None else m
            if seg.shape != (H, W):
                seg = cv2.resize(seg, (W, H), interpolation=cv2.INTER_NEAREST)
                m = cv2.resize(m.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST) > 0
            m = m.astype(np.uint8) * 255
            if undistort_maps is not None:
                seg, m = _remap(seg, undistort_maps, 0), _remap(m, undistort_maps, 0)
            out["parts"], out["mask"] = seg, m
        inside = None
        if undistort_maps is not None:
            inside = _remap(np.ones((H, W), np.uint8), undistort_maps, 0) > 0
        d = raw.get("depth")
        if d is not None:
            if d.shape != (H, W):
                d = cv2.resize(d, (W, H), interpolation=cv2.INTER_LINEAR)
            if undistort_maps is not None:
                d = _remap(d, undistort_maps, 0.0)
                d[~inside] = np.nan
            out["depth"] = d.astype(np.float32)
        n = raw.get("normal")
        if n is not None:
            n = n.astype(np.float32)
            if n.shape[:2] != (H, W):
                n = cv2.resize(n, (W, H), interpolation=cv2.INTER_LINEAR)
            nn = np.linalg.norm(np.nan_to_num(n), axis=2, keepdims=True)
            n = np.where(nn > 1e-6, n / np.maximum(nn, 1e-6), np.nan).astype(np.float32)
            if undistort_maps is not None:
                n = _remap(n, undistort_maps, 0.0)
                n[~inside] = np.nan
            chk_mask = out["mask"] if out["mask"] is not None else fallback_mask
            if self.resolved_convention is None:
                if chk_mask is None:
                    raise FmgsInputError("normal convention 'auto' needs a mask (Sapiens seg or "
                                         "the sequence mask)", paths.get("normal"))
                self.resolved_convention = detect_normal_convention(n, chk_mask, K,
                                                                    paths.get("normal"))
            n = _apply(n, NORMAL_CONVENTIONS[self.resolved_convention])
            if self.check_normals and chk_mask is not None:
                check_normal_convention(n, chk_mask, K, paths.get("normal"),
                                        self.resolved_convention)
            out["normal"] = n
        return out
