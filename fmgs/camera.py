"""Pinhole cameras (NumPy, torch-free).

Conventions
-----------
* **Extrinsics** are world -> camera in the OpenCV convention: ``x_cam = R @ x_world + t``,
  camera looks along +z, +x is image right, +y is image down. Units are metres.
* **Pixel coordinates** are continuous, with pixel ``(row i, column j)`` covering
  ``[j, j+1) x [i, i+1)`` so that its *centre* is at ``(u, v) = (j + 0.5, i + 0.5)``.
  This is the convention of the 3DGS / gsplat rasterisers (which evaluate the splats at
  ``pixel + 0.5`` and use ``K`` as given), and the one under which a resolution change
  by ``factor`` is the exact linear map ``u' = factor * u`` (so :meth:`Camera.scaled`
  simply multiplies the first two rows of ``K``).
  OpenCV calibration puts pixel centres at integer coordinates instead; the difference
  is a constant half-pixel shift of the principal point. Datasets such as ZJU-MoCap in
  HumanNeRF format store an OpenCV-calibrated ``K`` that was rescaled by plain
  multiplication; like 3DGS-Avatar and HumanNeRF we use it as is.
* **Distortion** ``dist`` is OpenCV's ``(k1, k2, p1, p2, k3)``. :meth:`Camera.project` is
  the ideal pinhole projection and ignores ``dist`` (images are undistorted at load time,
  see :mod:`fmgs.trainer.data.humannerf`); :meth:`Camera.project_distorted` applies it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fmgs.errors import FmgsInputError

__all__ = ["Camera"]


def _as_matrix(name: str, value, shape: tuple[int, ...], source) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FmgsInputError(f"camera {name} is not numeric ({exc})", source) from None
    if arr.shape != shape:
        raise FmgsInputError(
            f"camera {name} must have shape {shape}, got {arr.shape}", source)
    if not np.all(np.isfinite(arr)):
        raise FmgsInputError(f"camera {name} contains NaN or inf", source)
    return arr


@dataclass
class Camera:
    """A pinhole camera with optional OpenCV lens distortion.

    Attributes:
        K: (3, 3) float64 intrinsics in pixels (``fx, fy, cx, cy``; zero skew expected but
            not required). Pixel centres at ``+0.5`` (see module docstring).
        R: (3, 3) float64 world -> camera rotation (OpenCV axes), orthonormal, det +1.
        t: (3,) float64 world -> camera translation in metres.
        width, height: image size in pixels (int > 0).
        dist: (5,) float64 OpenCV distortion ``k1 k2 p1 p2 k3``, or None for no distortion.
        source: optional file the camera was read from; used in error messages only.

    Raises:
        FmgsInputError: on wrong shapes, non-finite values, a non-orthonormal ``R``,
            non-positive focal lengths or image size. The message names ``source``.
    """

    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    width: int
    height: int
    dist: np.ndarray | None = None
    source: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        src = self.source
        self.K = _as_matrix("K (intrinsics)", self.K, (3, 3), src)
        self.R = _as_matrix("R (rotation)", self.R, (3, 3), src)
        t = np.asarray(self.t)
        self.t = _as_matrix("t (translation)", t.reshape(-1) if t.size == 3 else t, (3,), src)
        if self.dist is not None:
            d = np.asarray(self.dist, dtype=np.float64).reshape(-1)
            if d.shape != (5,):
                raise FmgsInputError(
                    f"camera distortion must have 5 coefficients (k1 k2 p1 p2 k3), got {d.shape}",
                    src)
            if not np.all(np.isfinite(d)):
                raise FmgsInputError("camera distortion contains NaN or inf", src)
            self.dist = d
        if self.K[0, 0] <= 0 or self.K[1, 1] <= 0:
            raise FmgsInputError(
                f"camera focal lengths must be positive, got fx={self.K[0, 0]}, fy={self.K[1, 1]}",
                src)
        if not np.allclose(self.K[2], [0.0, 0.0, 1.0]):
            raise FmgsInputError(f"camera K last row must be [0, 0, 1], got {self.K[2]}", src)
        err = np.abs(self.R @ self.R.T - np.eye(3)).max()
        if err > 1e-4 or np.linalg.det(self.R) <= 0:
            raise FmgsInputError(
                "camera R is not a proper rotation (R R^T != I or det <= 0)", src)
        try:
            w, h = int(self.width), int(self.height)
        except (TypeError, ValueError):
            raise FmgsInputError(
                f"camera width/height must be integers, got {self.width!r}, {self.height!r}",
                src) from None
        if w <= 0 or h <= 0 or w != self.width or h != self.height:
            raise FmgsInputError(
                f"camera width/height must be positive integers, got {self.width}, {self.height}",
                src)
        self.width, self.height = w, h

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_extrinsics(cls, K, extrinsics, width: int, height: int, dist=None,
                        source=None) -> "Camera":
        """Build from a (4, 4) world -> camera matrix ``[[R, t], [0, 1]]`` (OpenCV).

        Raises:
            FmgsInputError: if ``extrinsics`` is not (4, 4) with last row ``[0, 0, 0, 1]``,
                or any check of :class:`Camera` fails.
        """
        E = _as_matrix("extrinsics", extrinsics, (4, 4), source)
        if not np.allclose(E[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
            raise FmgsInputError(f"camera extrinsics last row must be [0, 0, 0, 1], got {E[3]}",
                                 source)
        return cls(K=K, R=E[:3, :3], t=E[:3, 3], width=width, height=height, dist=dist,
                   source=None if source is None else str(source))

    # ------------------------------------------------------------------ properties
    @property
    def viewmat(self) -> np.ndarray:
        """(4, 4) float64 world -> camera matrix ``[[R, t], [0, 1]]`` (gsplat ``viewmats``)."""
        V = np.eye(4)
        V[:3, :3] = self.R
        V[:3, 3] = self.t
        return V

    @property
    def center(self) -> np.ndarray:
        """(3,) float64 camera centre in world coordinates (metres): ``-R^T t``."""
        return -self.R.T @ self.t

    @property
    def fx(self) -> float:
        return float(self.K[0, 0])

    @property
    def fy(self) -> float:
        return float(self.K[1, 1])

    # ------------------------------------------------------------------ projection
    def world_to_camera(self, points) -> np.ndarray:
        """Map (N, 3) world points (m) to (N, 3) camera-frame points (m), float64."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return p @ self.R.T + self.t

    def project(self, points) -> tuple[np.ndarray, np.ndarray]:
        """Ideal pinhole projection (distortion ignored).

        Args:
            points: (N, 3) world points in metres.
        Returns:
            uv: (N, 2) float64 pixel coordinates (pixel ``(i, j)`` centre at ``(j+.5, i+.5)``).
            z: (N,) float64 camera-frame depth in metres (points behind the camera have
               ``z <= 0`` and meaningless ``uv``).
        Raises:
            FmgsInputError: if ``points`` cannot be reshaped to (N, 3).
        """
        p = np.asarray(points, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 3:
            raise FmgsInputError(f"points to project must have shape (N, 3), got {p.shape}")
        pc = self.world_to_camera(p)
        z = pc[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            xy = pc[:, :2] / z[:, None]
        uv = xy @ self.K[:2, :2].T + self.K[:2, 2]
        return uv, z

    def project_distorted(self, points) -> tuple[np.ndarray, np.ndarray]:
        """Projection through the OpenCV distortion model (as the raw, distorted image sees it).

        Same shapes/units as :meth:`project`; equals it when ``dist`` is None.
        """
        p = np.asarray(points, dtype=np.float64)
        pc = self.world_to_camera(p)
        z = pc[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            x = pc[:, 0] / z
            y = pc[:, 1] / z
        if self.dist is not None:
            k1, k2, p1, p2, k3 = self.dist
            r2 = x * x + y * y
            radial = 1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3
            xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
            yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
            x, y = xd, yd
        uv = np.stack([x, y], 1) @ self.K[:2, :2].T + self.K[:2, 2]
        return uv, z

    def in_image(self, uv) -> np.ndarray:
        """(N,) bool: whether continuous pixel coords ``uv`` (N, 2) fall inside the image."""
        uv = np.asarray(uv, dtype=np.float64)
        return ((uv[:, 0] >= 0) & (uv[:, 0] < self.width)
                & (uv[:, 1] >= 0) & (uv[:, 1] < self.height))

    # ------------------------------------------------------------------ resizing
    def scaled(self, factor: float, width: int | None = None,
               height: int | None = None) -> "Camera":
        """The same camera for an image resized by ``factor`` (e.g. 0.5 for half size).

        Under the pixel-centre-at-``+0.5`` convention the resize maps ``u' = factor * u``
        exactly, so ``fx, fy, cx, cy`` (and the skew) are multiplied by ``factor``.
        ``width``/``height`` default to ``round(factor * width)`` etc.; pass them when the
        resized image size was rounded differently. Distortion coefficients act on
        normalised coordinates and are unchanged.

        Raises:
            FmgsInputError: if ``factor`` is not a positive finite number.
        """
        f = float(factor)
        if not np.isfinite(f) or f <= 0:
            raise FmgsInputError(f"camera scale factor must be positive, got {factor!r}",
                                 self.source)
        K = self.K.copy()
        K[:2] *= f
        w = int(round(self.width * f)) if width is None else int(width)
        h = int(round(self.height * f)) if height is None else int(height)
        return Camera(K=K, R=self.R.copy(), t=self.t.copy(), width=w, height=h,
                      dist=None if self.dist is None else self.dist.copy(), source=self.source)

    def without_distortion(self) -> "Camera":
        """A copy with ``dist=None`` (the camera of an undistorted image with the same K)."""
        return Camera(K=self.K.copy(), R=self.R.copy(), t=self.t.copy(), width=self.width,
                      height=self.height, dist=None, source=self.source)
