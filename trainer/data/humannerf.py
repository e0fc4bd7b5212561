"""HumanNeRF-format monocular sequences (ZJU-MoCap as prepared by HumanNeRF / 3DGS-Avatar).

Folder layout (``root``)::

    cameras.pkl          {frame_name: {'intrinsics' (3,3), 'extrinsics' (4,4) world->camera
                          (OpenCV, metres), 'distortions' (5,) k1 k2 p1 p2 k3 (optional)}}
    mesh_infos.pkl       {frame_name: {'poses' (72,) SMPL axis-angle, root zeroed,
                          'Rh' (3,), 'Th' (3,) world_from_body, 'joints' (24,3) posed joints
                          in the body frame, 'tpose_joints' (24,3), optional 'betas'}}
    canonical_joints.pkl {'joints': (24,3) T-pose joints, optional 'betas'}
    images/<frame_name>.png   RGB (distorted, as captured)
    masks/<frame_name>.png    single channel, 0 / 255

A world point is ``rodrigues(Rh) @ x_body + Th``; a body point is SMPL's output for
``poses`` (root rotation zero, no translation).

Loading is NumPy/OpenCV only (no torch): :class:`Frame` holds NumPy arrays. Images are
undistorted once at load time (bilinear for RGB, nearest for masks, with
``cv2.initUndistortRectifyMap(K, dist, None, K)`` i.e. the same K, like
``cv2.undistort``), optionally resized, and kept in memory as uint8; the background
colour is composited when a frame is fetched.

Monocular protocol (HumanNeRF / 3DGS-Avatar on ZJU-MoCap camera 1): with frames sorted by
name and numbered 0..N-1, *train* = frames 0-454 (every frame), *test* = frames 455-569,
every 5th (455, 460, ..., 565: 23 frames). See :class:`SplitConfig`.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from fmgs.body_model import world_from_body
from fmgs.camera import Camera
from fmgs.errors import FmgsInputError
from fmgs.pickle_io import load_pickle

__all__ = ["SplitConfig", "Frame", "HumanNeRFSequence", "undistort_image", "read_image",
           "read_mask"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitConfig:
    """Which frame numbers (positions in the name-sorted frame list) form each split.

    Ranges are half-open ``[start, stop)``; ``stop`` is clipped to the number of frames.
    Defaults are the HumanNeRF monocular protocol for ZJU-MoCap (train 0-454 every frame,
    test 455-569 every 5th).

    Validation (for choosing defaults without looking at test frames): with
    ``val_fraction = f > 0`` the last ``f`` of the training range, ``[cut, stop)`` with
    ``cut = start + floor((1 - f) (stop - start))``, leaves the training split; every
    ``val_step``-th frame of it is the ``val`` split. Like the test split, it is the end of
    the take (poses the training frames did not show).
    """

    train_range: tuple[int, int] = (0, 455)
    train_step: int = 1
    test_range: tuple[int, int] = (455, 570)
    test_step: int = 5
    val_fraction: float = 0.0
    val_step: int = 5

    @classmethod
    def from_any(cls, value) -> "SplitConfig":
        """Accept None (defaults), a SplitConfig, or a dict with any of its field names.

        Raises:
            FmgsInputError: unknown keys, or ranges/steps that are not non-negative ints
                with ``start <= stop`` and ``step >= 1``.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            cfg = value
        elif isinstance(value, dict):
            unknown = set(value) - {"train_range", "train_step", "test_range", "test_step", "val_fraction",
                                    "val_step"}
            if unknown:
                raise FmgsInputError(f"unknown split_config keys {sorted(unknown)}")
            kw = {k: (tuple(int(x) for x in v) if k.endswith("range") else
                      float(v) if k == "val_fraction" else int(v)) for k, v in value.items()}
            cfg = cls(**kw)
        else:
            raise FmgsInputError(f"split_config must be a dict or SplitConfig, got {type(value)}")
        for name in ("train", "test"):
            rng, step = getattr(cfg, f"{name}_range"), getattr(cfg, f"{name}_step")
            if len(rng) != 2 or rng[0] < 0 or rng[1] < rng[0] or step < 1:
                raise FmgsInputError(f"bad {name} split: range {rng}, step {step}")
        if not 0.0 <= cfg.val_fraction < 1.0 or cfg.val_step < 1:
            raise FmgsInputError(f"bad val split: fraction {cfg.val_fraction} (in [0, 1)), step {cfg.val_step}")
        return cfg

    def val_cut(self) -> int:
        """First frame number of the validation part of the training range (its stop when none)."""
        a, b = self.train_range
        return a + int(np.floor((1.0 - self.val_fraction) * (b - a))) if self.val_fraction > 0 else b

    def indices(self, split: str, num_frames: int) -> list[int]:
        """Frame numbers of ``split`` ('train', 'val', 'test' or 'all') for ``num_frames`` frames."""
        if split == "all":
            return list(range(num_frames))
        if split == "train":
            return list(range(self.train_range[0], min(self.val_cut(), num_frames), self.train_step))
        if split == "val":
            return list(range(self.val_cut(), min(self.train_range[1], num_frames), self.val_step))
        if split != "test":
            raise FmgsInputError(f"split must be 'train', 'val', 'test' or 'all', got {split!r}")
        return list(range(self.test_range[0], min(self.test_range[1], num_frames), self.test_step))


@dataclass
class Frame:
    """One frame of a sequence, ready for training.

    Attributes:
        index: frame number (position in the name-sorted list of all frames).
        name: frame name, e.g. ``'frame_000123'``.
        image: (H, W, 3) float32 RGB in [0, 1], undistorted, background composited
            (``image*mask + bg*(1-mask)``).
        mask: (H, W) float32 in {0, 1}, undistorted (nearest).
        camera: :class:`fmgs.camera.Camera` for ``image`` (``dist`` None when the image was
            undistorted, else the file's coefficients); K scaled with ``image_size``.
        poses: (72,) float32 SMPL axis-angle (radians), root (first 3) zero as in ZJU.
        Rh: (3,) float32 axis-angle body -> world rotation.
        Th: (3,) float32 body -> world translation (m).
        world_from_body: (4, 4) float64 ``[[rodrigues(Rh), Th], [0, 1]]``.
        joints: (24, 3) float64 posed SMPL joints in the body frame (m), from the file.
    """

    index: int
    name: str
    image: np.ndarray
    mask: np.ndarray
    camera: Camera
    poses: np.ndarray
    Rh: np.ndarray
    Th: np.ndarray
    world_from_body: np.ndarray
    joints: np.ndarray


# ----------------------------------------------------------------------------- image I/O
def _imread(path, what: str) -> np.ndarray:
    """cv2.imread with FmgsInputError for a missing or undecodable ``what`` ('image'/'mask')."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FmgsInputError(f"{what} file not found", path)
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise FmgsInputError(f"cannot decode {what} (corrupt or unsupported format)", path)
    return img


def read_image(path) -> np.ndarray:
    """Read an 8-bit image as (H, W, 3) uint8 RGB (grey is expanded, alpha dropped).

    Raises:
        FmgsInputError: missing or undecodable file (named).
    """
    img = _imread(path, "image")
    if img.dtype != np.uint8:
        raise FmgsInputError(f"image must be 8-bit, got {img.dtype}", os.fspath(path))
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, 2)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(img)


def read_mask(path) -> np.ndarray:
    """Read a mask as (H, W) uint8 in {0, 1} (pixel > 127 of the first channel = 1).

    Raises:
        FmgsInputError: missing or undecodable file (named).
    """
    m = _imread(path, "mask")
    if m.ndim == 3:
        m = m[:, :, 0]
    thr = 127 if m.dtype == np.uint8 else (np.iinfo(m.dtype).max // 2
                                           if np.issubdtype(m.dtype, np.integer) else 0.5)
    return (m > thr).astype(np.uint8)


_MAP_CACHE: dict = {}


def _undistort_maps(K: np.ndarray, dist: np.ndarray, width: int, height: int):
    key = (K.tobytes(), dist.tobytes(), width, height)
    maps = _MAP_CACHE.get(key)
    if maps is None:
        maps = cv2.initUndistortRectifyMap(K, dist, None, K, (width, height), cv2.CV_32FC1)
        if len(_MAP_CACHE) > 16:
            _MAP_CACHE.clear()
        _MAP_CACHE[key] = maps
    return maps


def undistort_image(image: np.ndarray, K, dist, nearest: bool = False) -> np.ndarray:
    """Undistort an image keeping the same intrinsics (``cv2.undistort(img, K, dist, newK=K)``).

    Output pixel ``p`` takes the input value at ``distort(p)`` (OpenCV's model with
    coefficients ``k1 k2 p1 p2 k3``); pixels whose source falls outside the image are 0.

    Args:
        image: (H, W) or (H, W, C) array (uint8 or float32).
        K: (3, 3) intrinsics in pixels of this image.
        dist: (5,) OpenCV distortion coefficients.
        nearest: nearest-neighbour sampling (masks / labels) instead of bilinear.
    Returns:
        Array of the same shape and dtype.
    """
    K = np.asarray(K, dtype=np.float64)
    d = np.asarray(dist, dtype=np.float64).reshape(-1)
    h, w = image.shape[:2]
    m1, m2 = _undistort_maps(K, d, w, h)
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.remap(image, m1, m2, interp, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


# ----------------------------------------------------------------------------- validation
def _arr(entry: dict, key: str, shape, path, frame: str, dtype=np.float64,
         required: bool = True):
    if key not in entry:
        if required:
            raise FmgsInputError(f"frame {frame!r} is missing key '{key}'", path)
        return None
    try:
        a = np.asarray(entry[key], dtype=dtype)
    except (TypeError, ValueError):
        raise FmgsInputError(f"frame {frame!r}: '{key}' is not numeric", path) from None
    if a.size == int(np.prod(shape)) and a.shape != tuple(shape):
        a = a.reshape(shape)
    if a.shape != tuple(shape):
        raise FmgsInputError(
            f"frame {frame!r}: '{key}' must have shape {tuple(shape)}, got {a.shape}", path)
    if not np.all(np.isfinite(a)):
        raise FmgsInputError(f"frame {frame!r}: '{key}' contains NaN or inf", path)
    return a


def _load_dict(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FmgsInputError(f"{what} not found", path)
    data = load_pickle(path)
    if not isinstance(data, dict):
        raise FmgsInputError(f"{what} must contain a dict, got {type(data).__name__}", path)
    return data


# ----------------------------------------------------------------------------- sequence
class HumanNeRFSequence:
    """A HumanNeRF-format monocular sequence (e.g. ZJU-MoCap 377).

    Args:
        root: sequence folder (see module docstring).
        split: 'train', 'test' or 'all' (ignored when ``frames`` is given).
        frames: optional explicit frame numbers (ints) or names (strs) to use.
        image_size: None = native size; an int = target width in pixels (height scaled by
            the same factor, rounded); images are resized with area averaging, masks with
            nearest, K via :meth:`Camera.scaled`.
        background: RGB in [0, 1] composited outside the mask (default black).
        undistort: undistort images and masks with the file's distortion coefficients.
        smpl_path: SMPL model pickle, needed only for :attr:`betas` recovery and
            :attr:`smpl`; default ``fmgs.paths.smpl_neutral_path()``.
        split_config: :class:`SplitConfig` or dict overriding the default split ranges.
        num_threads: threads used to decode / undistort images in :meth:`load`.

    Construction reads and validates the pickles and checks that every frame listed in
    ``cameras.pkl`` has an image and a mask file; pixels are read on first access (or an
    explicit :meth:`load`), all selected frames at once, in parallel threads.

    Raises:
        FmgsInputError (message names the file): missing root folder, missing or corrupt
        ``cameras.pkl``/``mesh_infos.pkl``, a camera/mesh entry with missing keys or bad
        shapes, a frame of ``cameras.pkl`` absent from ``mesh_infos.pkl``, a missing image
        or mask, undecodable images, image/mask size mismatch (on load), bad split/frames.
    """

    def __init__(self, root, split: str = "train", frames: Sequence | None = None,
                 image_size: int | None = None, background=(0.0, 0.0, 0.0),
                 undistort: bool = True, smpl_path=None, split_config=None,
                 num_threads: int = 8):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FmgsInputError("sequence folder not found", self.root)
        self.split = split
        self.undistort = bool(undistort)
        self.smpl_path = smpl_path
        self.num_threads = max(1, int(num_threads))
        bg = np.asarray(background, dtype=np.float32).reshape(-1)
        if bg.shape != (3,) or np.any(bg < 0) or np.any(bg > 1):
            raise FmgsInputError(f"background must be 3 values in [0, 1], got {background!r}")
        self.background = bg
        if image_size is not None and (int(image_size) <= 0 or int(image_size) != image_size):
            raise FmgsInputError(f"image_size must be a positive int or None, got {image_size!r}")
        self.image_size = None if image_size is None else int(image_size)
        self.split_config = SplitConfig.from_any(split_config)

        self.cameras_path = self.root / "cameras.pkl"
        self.mesh_infos_path = self.root / "mesh_infos.pkl"
        self.canonical_joints_path = self.root / "canonical_joints.pkl"
        cams = _load_dict(self.cameras_path, "cameras.pkl")
        infos = _load_dict(self.mesh_infos_path, "mesh_infos.pkl")
        if not cams:
            raise FmgsInputError("cameras.pkl lists no frames", self.cameras_path)

        self.all_names = sorted(str(k) for k in cams)
        self._cam_raw: dict[str, tuple] = {}
        self._info: dict[str, dict] = {}
        for name in self.all_names:
            entry = cams[name]
            if not isinstance(entry, dict):
                raise FmgsInputError(f"frame {name!r} entry must be a dict", self.cameras_path)
            K = _arr(entry, "intrinsics", (3, 3), self.cameras_path, name)
            E = _arr(entry, "extrinsics", (4, 4), self.cameras_path, name)
            D = _arr(entry, "distortions", (5,), self.cameras_path, name, required=False)
            if K[0, 0] <= 0 or K[1, 1] <= 0 or not np.allclose(K[2], [0, 0, 1]):
                raise FmgsInputError(f"frame {name!r}: 'intrinsics' is not a pinhole K",
                                     self.cameras_path)
            R = E[:3, :3]
            if (not np.allclose(E[3], [0, 0, 0, 1], atol=1e-6)
                    or np.abs(R @ R.T - np.eye(3)).max() > 1e-4 or np.linalg.det(R) <= 0):
                raise FmgsInputError(
                    f"frame {name!r}: 'extrinsics' is not a rigid [R t; 0 1] matrix",
                    self.cameras_path)
            self._cam_raw[name] = (K, E, D)
            if name not in infos:
                raise FmgsInputError(f"frame {name!r} (listed in cameras.pkl) is missing",
                                     self.mesh_infos_path)
            info = infos[name]
            if not isinstance(info, dict):
                raise FmgsInputError(f"frame {name!r} entry must be a dict", self.mesh_infos_path)
            p = self.mesh_infos_path
            self._info[name] = dict(
                poses=_arr(info, "poses", (72,), p, name, np.float32),
                Rh=_arr(info, "Rh", (3,), p, name, np.float32),
                Th=_arr(info, "Th", (3,), p, name, np.float32),
                joints=_arr(info, "joints", (24, 3), p, name),
                betas=_arr(info, "betas", (np.asarray(info["betas"]).size,), p, name)
                if "betas" in info else None,
            )
        for name in self.all_names:
            for kind in ("images", "masks"):
                f = self.root / kind / f"{name}.png"
                if not f.is_file():
                    raise FmgsInputError(
                        f"{kind[:-1]} of frame {name!r} (listed in cameras.pkl) not found", f)

        if frames is not None:
            sel = []
            for fr in frames:
                if isinstance(fr, str):
                    if fr not in self._cam_raw:
                        raise FmgsInputError(f"unknown frame name {fr!r}", self.cameras_path)
                    sel.append(self.all_names.index(fr))
                else:
                    i = int(fr)
                    if not 0 <= i < len(self.all_names):
                        raise FmgsInputError(
                            f"frame number {i} out of range 0..{len(self.all_names) - 1}",
                            self.cameras_path)
                    sel.append(i)
            self.indices = sel
        else:
            self.indices = self.split_config.indices(split, len(self.all_names))
        self.names = [self.all_names[i] for i in self.indices]

        self._canonical = None
        if self.canonical_joints_path.is_file():
            cj = _load_dict(self.canonical_joints_path, "canonical_joints.pkl")
            self._canonical = dict(
                joints=_arr(cj, "joints", (24, 3), self.canonical_joints_path, "canonical"),
                betas=_arr(cj, "betas", (np.asarray(cj["betas"]).size,),
                           self.canonical_joints_path, "canonical") if "betas" in cj else None)

        self._images: dict[str, np.ndarray] | None = None
        self._masks: dict[str, np.ndarray] | None = None
        self._cameras: dict[str, Camera] = {}
        self.load_seconds: float | None = None
        self._smpl = None
        self._betas = None
        self.betas_residual_rms: float | None = None

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    @property
    def canonical_joints(self) -> np.ndarray:
        """(24, 3) float64 T-pose joints from ``canonical_joints.pkl`` (m).

        Raises:
            FmgsInputError: the file is missing.
        """
        if self._canonical is None:
            raise FmgsInputError("canonical_joints.pkl not found", self.canonical_joints_path)
        return self._canonical["joints"]

    @property
    def smpl(self):
        """The :class:`fmgs.body_model.SMPLModel` loaded from ``smpl_path`` (cached)."""
        if self._smpl is None:
            from fmgs.body_model import load_smpl
            from fmgs.paths import smpl_neutral_path

            self._smpl = load_smpl(self.smpl_path or smpl_neutral_path())
        return self._smpl

    @property
    def betas(self) -> np.ndarray:
        """(B,) float64 subject shape coefficients.

        From ``mesh_infos.pkl`` (first frame's 'betas') or ``canonical_joints.pkl``
        ('betas') when present; otherwise recovered by linear least squares from the
        canonical T-pose joints with :func:`fmgs.body_model.fit_betas_from_joints`
        (``J = J_regressor @ (v_template + shapedirs @ betas)``), the RMS joint residual
        being logged and stored in :attr:`betas_residual_rms` (m).
        """
        if self._betas is None:
            b = self._info[self.all_names[0]]["betas"]
            if b is None and self._canonical is not None:
                b = self._canonical["betas"]
            if b is not None:
                self._betas = np.asarray(b, dtype=np.float64)
            else:
                from fmgs.body_model import fit_betas_from_joints

                betas, rms = fit_betas_from_joints(self.smpl, self.canonical_joints)
                self._betas = np.asarray(betas, dtype=np.float64)
                self.betas_residual_rms = float(rms)
                log.info("betas recovered from %s: joint residual RMS %.3f mm",
                         self.canonical_joints_path, 1e3 * float(rms))
        return self._betas

    def camera(self, name: str) -> Camera:
        """Camera of frame ``name`` as it applies to the returned images (see :class:`Frame`)."""
        cam = self._cameras.get(name)
        if cam is None:
            K, E, D = self._cam_raw[name]
            W, H = self._native_size(name)
            if not (0.0 < K[0, 2] < W and 0.0 < K[1, 2] < H):
                raise FmgsInputError(
                    f"frame {name!r}: principal point ({K[0, 2]:g}, {K[1, 2]:g}) lies outside its {W}x{H} "
                    "image: the intrinsics do not belong to this image size", self.cameras_path)
            # The file's K is an OpenCV calibration (pixel centres at integer coordinates);
            # our renderers put pixel (i, j)'s centre at (j + 0.5, i + 0.5) (3DGS/gsplat), so
            # the principal point moves by +0.5 px. Undistortion keeps using the raw K.
            K = np.array(K, dtype=np.float64, copy=True)
            K[0, 2] += 0.5
            K[1, 2] += 0.5
            cam = Camera.from_extrinsics(K, E, W, H, dist=D, source=str(self.cameras_path))
            if self.undistort and D is not None:
                cam = cam.without_distortion()
            if self.image_size is not None:
                f = self.image_size / W
                cam = cam.scaled(f, self.image_size, max(1, int(round(H * f))))
            self._cameras[name] = cam
        return cam

    def _native_size(self, name: str) -> tuple[int, int]:
        """(width, height) of the stored image of ``name`` (header only if not loaded)."""
        if self._native is not None and name in self._native:
            return self._native[name]
        from PIL import Image

        path = self.root / "images" / f"{name}.png"
        try:
            with Image.open(path) as im:
                return im.size
        except (OSError, ValueError) as exc:
            raise FmgsInputError(f"cannot read image header ({exc})", path) from None

    _native: dict | None = None

    # ------------------------------------------------------------------ loading
    def _load_one(self, name: str):
        ip = self.root / "images" / f"{name}.png"
        mp = self.root / "masks" / f"{name}.png"
        img = read_image(ip)
        msk = read_mask(mp)
        if img.shape[:2] != msk.shape:
            raise FmgsInputError(
                f"mask size {msk.shape[1]}x{msk.shape[0]} differs from image size "
                f"{img.shape[1]}x{img.shape[0]} ({ip})", mp)
        H, W = msk.shape
        K, _, D = self._cam_raw[name]
        if self.undistort and D is not None and np.any(D != 0):
            img = undistort_image(img, K, D)
            msk = undistort_image(msk, K, D, nearest=True)
        if self.image_size is not None and self.image_size != W:
            f = self.image_size / W
            size = (self.image_size, max(1, int(round(H * f))))
            interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
            img = cv2.resize(img, size, interpolation=interp)
            msk = cv2.resize(msk, size, interpolation=cv2.INTER_NEAREST)
        return name, img, msk, (W, H)

    def load(self) -> float:
        """Decode, undistort and cache all selected frames (parallel threads).

        Returns:
            Wall time in seconds (also stored in :attr:`load_seconds`). Idempotent.
        Raises:
            FmgsInputError: an undecodable image/mask or an image/mask size mismatch.
        """
        if self._images is not None:
            return self.load_seconds
        t0 = time.perf_counter()
        images, masks, native = {}, {}, {}
        with ThreadPoolExecutor(self.num_threads) as ex:
            for name, img, msk, wh in ex.map(self._load_one, self.names):
                images[name], masks[name], native[name] = img, msk, wh
        self._images, self._masks, self._native = images, masks, native
        self.load_seconds = time.perf_counter() - t0
        log.info("loaded %d frames from %s in %.2f s", len(self.names), self.root,
                 self.load_seconds)
        return self.load_seconds

    def image_uint8(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Cached (H, W, 3) uint8 RGB (undistorted, no background) and (H, W) uint8 {0,1} mask."""
        self.load()
        name = self.names[i]
        return self._images[name], self._masks[name]

    def smpl_params(self, name: str) -> dict[str, np.ndarray]:
        """Frame ``name``'s SMPL parameters from ``mesh_infos.pkl``, without decoding its image.

        Returns:
            copies: ``poses`` (72,) float32 axis-angle (radians, root zeroed as in ZJU),
            ``Rh`` (3,) float32 axis-angle and ``Th`` (3,) float32 metres (body -> world),
            ``joints`` (24, 3) posed joints (world, metres).
        Raises:
            KeyError: ``name`` is not a frame of the sequence.
        """
        info = self._info[name]
        return {k: info[k].copy() for k in ("poses", "Rh", "Th", "joints")}

    def __getitem__(self, i: int) -> Frame:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        self.load()
        name = self.names[i]
        img8, m8 = self._images[name], self._masks[name]
        m = m8.astype(np.float32)
        img = img8.astype(np.float32) * (1.0 / 255.0)
        img = img * m[:, :, None] + self.background * (1.0 - m[:, :, None])
        info = self._info[name]
        return Frame(
            index=self.indices[i], name=name, image=img.astype(np.float32), mask=m,
            camera=self.camera(name), poses=info["poses"].copy(), Rh=info["Rh"].copy(),
            Th=info["Th"].copy(),
            world_from_body=np.asarray(world_from_body(info["Rh"], info["Th"]),
                                       dtype=np.float64),
            joints=info["joints"].copy())
