"""Video / image-folder input and camera calibration files for ``fmgs-prep video``.

Torch-free. Frames are decoded with imageio's ffmpeg plugin (``imageio-ffmpeg``, a core
dependency) or read from an image folder (sorted by name).

Crop/resize policy (``size``): a non-square frame is centre-cropped to a square of its
shorter side (the trainer works on square frames; a person filming themselves is usually
near the centre, so the crop keeps the full height of a landscape frame and the middle of
a portrait one), then resized to ``size x size`` (area averaging when shrinking). The intrinsics follow exactly (principal
point shifted by the crop offset, everything scaled by ``size / side``). ``size=None``
keeps the square crop at its native side.

Calibration files (``--camera``): PeopleSnapshot ``camera.pkl`` (``camera_f``, ``camera_c``,
``camera_k``), a HumanNeRF ``cameras.pkl`` (``{frame: {'intrinsics', 'distortions'}}``,
the first frame's camera is used: static camera), or a JSON/YAML file
``{"K": [[fx,0,cx],[0,fy,cy],[0,0,1]], "dist": [k1,k2,p1,p2,k3], "width": W, "height": H}``
(``dist``, ``width``, ``height`` optional). Pixel coordinates follow OpenCV (pixel centres
at integers). Without a file, ``fx = fy = 0.5 W / tan(fov/2)`` (``fov`` horizontal, default
:data:`DEFAULT_FOV_DEG`) or ``--focal``, principal point at the image centre ``((W-1)/2,
(H-1)/2)``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from fmgs.errors import FmgsInputError

__all__ = ["Calibration", "load_calibration", "default_calibration", "FrameSource",
           "crop_resize_K", "DEFAULT_FOV_DEG", "IMAGE_EXTS"]

# A phone's main camera (26-28 mm equivalent) has about 65 deg horizontal field of view in
# landscape; a mid value between phones (~65) and the studio cameras of ZJU/PeopleSnapshot
# (~25-50) keeps the depth error of an unknown lens moderate either way.
DEFAULT_FOV_DEG = 50.0
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Calibration:
    """Pinhole intrinsics of the raw frames.

    Attributes:
        K: (3, 3) float64 intrinsics in pixels of the raw frames (OpenCV convention).
        dist: (5,) float64 OpenCV k1 k2 p1 p2 k3, or None (no distortion).
        source: where it came from (file path or ``'fov=50'``), for the report.
        size: (width, height) the calibration was made for, when the file says.
    """

    K: np.ndarray
    dist: np.ndarray | None
    source: str
    size: tuple[int, int] | None = None

    def for_frames(self, width: int, height: int) -> "Calibration":
        """This calibration for frames of ``width x height``: unchanged when the size matches
        or is unknown, scaled when only the resolution differs (same aspect ratio).

        Raises:
            FmgsInputError: another aspect ratio, or a principal point outside the frame
                (the file does not belong to this video).
        """
        K = self.K
        if self.size is not None and tuple(self.size) != (width, height):
            w0, h0 = self.size
            if abs(w0 * height - h0 * width) > max(w0, h0):
                raise FmgsInputError(f"calibration is for {w0}x{h0} frames, the video is "
                                     f"{width}x{height} (another aspect ratio)", self.source)
            s = width / w0
            K = K.copy()
            K[:2, :2] *= s
            K[:2, 2] = (K[:2, 2] + 0.5) * s - 0.5
        if not (0 <= K[0, 2] <= width and 0 <= K[1, 2] <= height):
            raise FmgsInputError(f"principal point ({K[0, 2]:.1f}, {K[1, 2]:.1f}) lies outside "
                                 f"the {width}x{height} frames: not this video's camera",
                                 self.source)
        return Calibration(K, self.dist, self.source, (width, height))


def _as_K(value, path) -> np.ndarray:
    try:
        K = np.asarray(value, dtype=np.float64).reshape(3, 3)
    except (TypeError, ValueError):
        raise FmgsInputError("intrinsics must be a 3x3 matrix", path) from None
    if not (np.all(np.isfinite(K)) and K[0, 0] > 0 and K[1, 1] > 0
            and np.allclose(K[2], [0, 0, 1])):
        raise FmgsInputError("intrinsics are not a pinhole K [[fx,0,cx],[0,fy,cy],[0,0,1]]", path)
    return K


def _as_dist(value, path) -> np.ndarray | None:
    if value is None:
        return None
    d = np.asarray(value, dtype=np.float64).reshape(-1)
    if d.size not in (4, 5, 8) or not np.all(np.isfinite(d)):
        raise FmgsInputError(f"distortion must have 4, 5 or 8 finite values, got {d.size}", path)
    return np.pad(d, (0, 5 - d.size))[:5] if d.size < 5 else d[:5]


def load_calibration(path) -> Calibration:
    """Read a calibration file (see the module docstring for the accepted kinds).

    Raises:
        FmgsInputError: missing file, undecodable file, or a file of another kind (the
            message names the file and lists the accepted kinds).
    """
    path = Path(path)
    if not path.is_file():
        raise FmgsInputError("camera file not found", path)
    kinds = ("expected a PeopleSnapshot camera.pkl (camera_f, camera_c, camera_k), a "
             "HumanNeRF cameras.pkl ({frame: {intrinsics, distortions}}) or a JSON/YAML "
             "file with K (and dist)")
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(path.read_text())
            else:
                from omegaconf import OmegaConf

                data = OmegaConf.to_container(OmegaConf.load(path))
        except Exception as exc:  # any parser error is a bad file
            raise FmgsInputError(f"cannot parse camera file ({exc.__class__.__name__}: {exc})",
                                 path) from None
        if not isinstance(data, dict) or "K" not in data:
            raise FmgsInputError(f"not a camera file: {kinds}", path)
        size = ((int(data["width"]), int(data["height"]))
                if "width" in data and "height" in data else None)
        return Calibration(_as_K(data["K"], path), _as_dist(data.get("dist"), path), str(path),
                           size)
    from fmgs.pickle_io import load_pickle, to_numpy_tree

    data = to_numpy_tree(load_pickle(path))
    if isinstance(data, dict) and "camera_f" in data and "camera_c" in data:
        f, c = np.asarray(data["camera_f"], float), np.asarray(data["camera_c"], float)
        K = _as_K([[f[0], 0, c[0]], [0, f[1], c[1]], [0, 0, 1]], path)
        rt = np.asarray(data.get("camera_rt", np.zeros(3)), float)
        if np.abs(rt).max() > 1e-9:
            raise FmgsInputError("camera_rt is not zero: only a camera at the world origin "
                                 "is supported", path)
        size = ((int(data["width"]), int(data["height"]))
                if "width" in data and "height" in data else None)
        return Calibration(K, _as_dist(data.get("camera_k"), path), str(path), size)
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        first = data[sorted(data)[0]]
        if "intrinsics" in first:
            return Calibration(_as_K(first["intrinsics"], path),
                               _as_dist(first.get("distortions"), path), str(path))
    raise FmgsInputError(f"not a camera file: {kinds}", path)


def default_calibration(width: int, height: int, fov_deg: float | None = None,
                        focal_px: float | None = None) -> Calibration:
    """Intrinsics of an uncalibrated camera (see the module docstring).

    Raises:
        FmgsInputError: fov outside (1, 179) degrees or a non-positive focal length.
    """
    if focal_px is not None:
        if not focal_px > 0:
            raise FmgsInputError(f"--focal must be positive, got {focal_px}")
        f, src = float(focal_px), f"focal={focal_px:g}px"
    else:
        fov = DEFAULT_FOV_DEG if fov_deg is None else float(fov_deg)
        if not 1 < fov < 179:
            raise FmgsInputError(f"--fov must be in (1, 179) degrees, got {fov}")
        f, src = 0.5 * width / np.tan(np.deg2rad(fov) / 2), f"fov={fov:g}deg"
    K = np.array([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]])
    return Calibration(K, None, src)


def crop_resize_K(K: np.ndarray, width: int, height: int, size: int | None):
    """Square centre crop (side = min(W, H)) then resize to ``size``.

    Returns:
        (K', (x0, y0, side), out_side): new intrinsics (3, 3) float64, crop window in raw
        pixels, output side in pixels.
    """
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    out = side if size is None else int(size)
    s = out / side
    K2 = np.array(K, dtype=np.float64, copy=True)
    K2[0, 2] -= x0
    K2[1, 2] -= y0
    # Scaling in the OpenCV convention: pixel centres move as (u + 0.5) * s - 0.5.
    K2[:2, :2] *= s
    K2[:2, 2] = (K2[:2, 2] + 0.5) * s - 0.5
    return K2, (x0, y0, side), out


class FrameSource:
    """Frames of a video file or of an image folder (one person), selected by
    ``start:stop:step`` (indices into the raw frame list, ``stop`` exclusive).

    Args:
        path: video file (anything ffmpeg decodes) or folder of images.
        start, stop, step: frame selection.

    Attributes:
        width, height: raw frame size in pixels; ``fps`` (video only, else None);
        ``count``: number of raw frames (None when the container does not say).

    Raises:
        FmgsInputError: missing input, a video ffmpeg cannot open, a folder without
            images, a bad selection.
    """

    def __init__(self, path, start: int = 0, stop: int | None = None, step: int = 1):
        self.path = Path(path)
        if step < 1 or start < 0 or (stop is not None and stop <= start):
            raise FmgsInputError(f"bad frame selection start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = int(start), stop, int(step)
        self.fps = None
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.iterdir()
                                if p.suffix.lower() in IMAGE_EXTS and p.is_file())
            if not self.files:
                raise FmgsInputError(f"no images ({', '.join(IMAGE_EXTS)}) in the folder",
                                     self.path)
            first = cv2.imread(os.fspath(self.files[0]), cv2.IMREAD_COLOR)
            if first is None:
                raise FmgsInputError("cannot decode image", self.files[0])
            self.height, self.width = first.shape[:2]
            self.count = len(self.files)
        elif self.path.is_file():
            self.files = None
            import imageio.v2 as iio

            try:
                rd = iio.get_reader(os.fspath(self.path), format="FFMPEG")
                meta = rd.get_meta_data()
                rd.close()
            except Exception as exc:  # ffmpeg raises many kinds
                raise FmgsInputError(f"cannot read the video ({exc.__class__.__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''})",
                                     self.path) from None
            self.width, self.height = (int(v) for v in meta["size"])
            self.fps = float(meta.get("fps") or 0) or None
            n = meta.get("nframes")
            self.count = int(n) if isinstance(n, (int, float)) and np.isfinite(n) else None
        else:
            raise FmgsInputError("input video or image folder not found", self.path)

    def indices(self) -> list[int] | None:
        """Selected raw frame indices (None for a video whose length is unknown)."""
        if self.count is None:
            return None
        stop = self.count if self.stop is None else min(self.stop, self.count)
        return list(range(self.start, stop, self.step))

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(raw_index, (H, W, 3) uint8 RGB)`` of the selected frames."""
        if self.files is not None:
            for i in self.indices():
                img = cv2.imread(os.fspath(self.files[i]), cv2.IMREAD_COLOR)
                if img is None:
                    raise FmgsInputError("cannot decode image", self.files[i])
                if img.shape[:2] != (self.height, self.width):
                    raise FmgsInputError(
                        f"image size {img.shape[1]}x{img.shape[0]} differs from the first "
                        f"image's {self.width}x{self.height}", self.files[i])
                yield i, cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
            return
        import imageio.v2 as iio

        rd = iio.get_reader(os.fspath(self.path), format="FFMPEG")
        try:
            for i, frame in enumerate(rd):
                if self.stop is not None and i >= self.stop:
                    break
                if i >= self.start and (i - self.start) % self.step == 0:
                    yield i, np.asarray(frame)[:, :, :3]
        except Exception as exc:
            raise FmgsInputError(f"video decoding failed at frame {i} "
                                 f"({exc.__class__.__name__})", self.path) from None
        finally:
            rd.close()
