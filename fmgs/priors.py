"""Per-frame 2D priors (mask, relative depth, normals, 28-class parsing): format, I/O, body-model producer.

FMGS-Avatar distils four per-pixel priors from the Sapiens foundation models. This module
fixes one on-disk format for them, reads and writes it with validation, and produces a
substitute set from the fitted SMPL mesh when no foundation model is available.
NumPy / OpenCV only (``fmgs/`` never imports torch).

On-disk format (one folder per sequence, by default ``<sequence>/priors/``)::

    meta.json                 format, version, producer, kind, resolution, conventions,
                              modalities, frames (see :func:`make_meta`)
    mask/<frame>.png          uint8 single channel, exactly 0 (background) or 255 (person)
    depth/<frame>.npy         (H, W) float32, relative depth, LARGER = FARTHER; NaN = no
                              value (e.g. background of a body-model render); +-inf invalid
    normal/<frame>.npy        (H, W, 3) float32 unit vectors in CAMERA space, OpenCV axes
                              (+x image right, +y image down, +z forward into the scene),
                              so camera-facing normals have a negative component along the
                              viewing ray; NaN (or all-zero) = no value
    parts/<frame>.png         uint8 single channel, Sapiens 28-class ids 0..27
                              (:data:`SAPIENS_CLASSES`, left/right = the subject's own sides)

``<frame>`` is the sequence's frame name (e.g. ``frame_000123``). All maps share the
resolution stored in ``meta.json`` and are pixel-aligned with the images the trainer sees:
the *undistorted* images of :class:`fmgs.trainer.data.humannerf.HumanNeRFSequence` at native size
(``meta.json`` ``geometry: "undistorted"``). Any modality may be missing (whole folder, or
single frames); :func:`load_priors` returns None for it and the matching losses switch off.

Left / right: SMPL joint 1 (``left_hip``) lies at +x in the SMPL body frame (the body's own
left; checked on the shared model: rest-pose joint 1 at x = +0.068 m), and Sapiens'
``Left_*`` classes are the subject's own left, so SMPL ``left_*`` joints map to Sapiens
``Left_*`` classes (:data:`SMPL_JOINT_TO_SAPIENS`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from fmgs.assets import ASSETS_DIR
from fmgs.atomic import atomic_path, write_json_atomic
from fmgs.errors import FmgsInputError

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "MODALITIES", "SAPIENS_CLASSES", "NUM_SAPIENS_CLASSES", "SAPIENS_PALETTE", "load_sapiens_palette", "colorize_labels",
    "SMPL_JOINT_TO_SAPIENS", "CONVENTIONS", "make_meta", "validate_mask", "validate_depth",
    "validate_normal", "validate_parts", "PriorSet", "load_priors", "smpl_face_joint_ids",
    "smpl_face_sapiens_labels", "rasterize_mesh", "vertex_normals", "render_body_priors",
    "BodyModelPriorProducer",
]

FORMAT_NAME = "fmgs-priors"
FORMAT_VERSION = 1
#: The four modalities, in their folder names.
MODALITIES = ("mask", "depth", "normal", "parts")

#: Sapiens 28-class body-part parsing ids (index = id). Left/right are the subject's sides.
SAPIENS_CLASSES: list[str] = [
    "Background", "Apparel", "Face_Neck", "Hair", "Left_Foot", "Left_Hand", "Left_Lower_Arm",
    "Left_Lower_Leg", "Left_Shoe", "Left_Sock", "Left_Upper_Arm", "Left_Upper_Leg",
    "Lower_Clothing", "Right_Foot", "Right_Hand", "Right_Lower_Arm", "Right_Lower_Leg",
    "Right_Shoe", "Right_Sock", "Right_Upper_Arm", "Right_Upper_Leg", "Torso",
    "Upper_Clothing", "Lower_Lip", "Upper_Lip", "Lower_Teeth", "Upper_Teeth", "Tongue",
]
NUM_SAPIENS_CLASSES = len(SAPIENS_CLASSES)  # 28

SAPIENS_PALETTE_PATH = ASSETS_DIR / "sapiens_palette.json"


def load_sapiens_palette(path=None) -> tuple[list[str], np.ndarray]:
    """Read the Sapiens class names and display colours.

    Args:
        path: JSON file (default :data:`SAPIENS_PALETTE_PATH`, ``assets/sapiens_palette.json``)
            with ``{"classes": [{"id": int, "name": str, "rgb": [r, g, b]}, ...]}``.

    Returns:
        ``(names, palette)``: 28 class names in id order and a ``(28, 3)`` uint8 RGB array.
    """
    with open(path or SAPIENS_PALETTE_PATH, encoding="utf-8") as f:
        doc = json.load(f)
    entries = sorted(doc["classes"], key=lambda e: int(e["id"]))
    if [int(e["id"]) for e in entries] != list(range(len(entries))):
        raise ValueError("palette class ids must be 0..K-1 without gaps")
    names = [str(e["name"]) for e in entries]
    palette = np.asarray([e["rgb"] for e in entries], dtype=np.int64)
    if palette.shape != (len(names), 3) or palette.min() < 0 or palette.max() > 255:
        raise ValueError("palette colours must be [r, g, b] in 0..255")
    return names, palette.astype(np.uint8)


_PALETTE_NAMES: list[str]
#: ``(28, 3)`` uint8 RGB display colour of each class (read from ``assets/sapiens_palette.json``).
SAPIENS_PALETTE: np.ndarray
_PALETTE_NAMES, SAPIENS_PALETTE = load_sapiens_palette()
if _PALETTE_NAMES != SAPIENS_CLASSES:
    raise RuntimeError(f"{SAPIENS_PALETTE_PATH}: class names differ from fmgs.priors.SAPIENS_CLASSES")


def colorize_labels(labels) -> np.ndarray:
    """Semantic class-id map -> RGB image with :data:`SAPIENS_PALETTE`.

    Args:
        labels: ``(...)`` integer class ids in [0, 28) (numpy array or tensor).

    Returns:
        ``(..., 3)`` uint8 RGB array.
    """
    if hasattr(labels, "detach"):  # a torch tensor (without importing torch here)
        labels = labels.detach().cpu().numpy()
    lab = np.asarray(labels)
    return SAPIENS_PALETTE[lab.astype(np.int64)]



_S = {n: i for i, n in enumerate(SAPIENS_CLASSES)}
#: (24,) int64: Sapiens class of the body segment driven by each SMPL joint. Per-face
#: labels of ``smplh_parts_segm.pkl`` name the joint whose bone the face belongs to
#: (e.g. id 1 ``left_hip`` = the left thigh, id 4 ``left_knee`` = the left shin).
#: head/neck (12, 15) -> Face_Neck; wrists + hands (20, 22 / 21, 23) -> Left/Right_Hand;
#: elbows (18 / 19) -> lower arms; shoulders (16 / 17) -> upper arms; hips (1 / 2) -> upper
#: legs; knees (4 / 5) -> lower legs; ankles + feet (7, 10 / 8, 11) -> feet; pelvis, spine
#: and collars (0, 3, 6, 9, 13, 14) -> Torso. The clothing, hair, shoe and mouth classes of
#: Sapiens have no counterpart on the naked body model and are never produced.
SMPL_JOINT_TO_SAPIENS = np.array([
    _S["Torso"],            # 0 pelvis
    _S["Left_Upper_Leg"],   # 1 left_hip
    _S["Right_Upper_Leg"],  # 2 right_hip
    _S["Torso"],            # 3 spine1
    _S["Left_Lower_Leg"],   # 4 left_knee
    _S["Right_Lower_Leg"],  # 5 right_knee
    _S["Torso"],            # 6 spine2
    _S["Left_Foot"],        # 7 left_ankle
    _S["Right_Foot"],       # 8 right_ankle
    _S["Torso"],            # 9 spine3
    _S["Left_Foot"],        # 10 left_foot
    _S["Right_Foot"],       # 11 right_foot
    _S["Face_Neck"],        # 12 neck
    _S["Torso"],            # 13 left_collar
    _S["Torso"],            # 14 right_collar
    _S["Face_Neck"],        # 15 head
    _S["Left_Upper_Arm"],   # 16 left_shoulder
    _S["Right_Upper_Arm"],  # 17 right_shoulder
    _S["Left_Lower_Arm"],   # 18 left_elbow
    _S["Right_Lower_Arm"],  # 19 right_elbow
    _S["Left_Hand"],        # 20 left_wrist
    _S["Right_Hand"],       # 21 right_wrist
    _S["Left_Hand"],        # 22 left_hand
    _S["Right_Hand"],       # 23 right_hand
], dtype=np.int64)

#: Conventions written to (and checked in) ``meta.json``.
CONVENTIONS = {
    "mask": "uint8 PNG, 0 = background, 255 = person",
    "depth": "float32 .npy (H, W), relative depth, larger = farther, NaN = no value",
    "normal": ("float32 .npy (H, W, 3), unit vectors, camera space, OpenCV axes "
               "(+x right, +y down, +z forward); camera-facing normals point at the camera; "
               "NaN or zero = no value"),
    "parts": "uint8 PNG, Sapiens 28-class ids 0..27 (left/right = subject's own sides)",
    "normal_axes": "opencv",
    "depth_order": "larger_is_farther",
    "part_classes": "sapiens28",
}

_UNIT_TOL = 1e-2  # |n| must be within 1 +- this where a normal is given


# =========================================================================== meta
def make_meta(producer: str, kind: str, width: int, height: int, frames: Sequence[str],
              modalities: Sequence[str], depth_units: str = "relative",
              geometry: str = "undistorted", extra: dict | None = None) -> dict:
    """Build a ``meta.json`` dictionary.

    Args:
        producer: free text naming what made the priors (e.g. ``"sapiens-lite"``,
            ``"fmgs body-model rasteriser (SMPL)"``).
        kind: ``"foundation-model"`` or ``"body-model"``.
        width, height: resolution of every map, pixels.
        frames: frame names present.
        modalities: subset of :data:`MODALITIES` present.
        depth_units: ``"relative"`` (unknown scale/shift) or ``"metres"`` (camera z).
        geometry: ``"undistorted"`` (aligned with the undistorted images).
        extra: more keys to store (e.g. the normal convention of the source).
    Returns:
        dict ready for :func:`fmgs.atomic.write_json_atomic`.
    Raises:
        FmgsInputError: unknown kind or modality, non-positive size.
    """
    if kind not in ("foundation-model", "body-model"):
        raise FmgsInputError(f"prior kind must be 'foundation-model' or 'body-model', got {kind!r}")
    bad = [m for m in modalities if m not in MODALITIES]
    if bad:
        raise FmgsInputError(f"unknown prior modalities {bad}; known: {list(MODALITIES)}")
    if int(width) <= 0 or int(height) <= 0:
        raise FmgsInputError(f"prior resolution must be positive, got {width}x{height}")
    meta = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "producer": str(producer),
        "kind": kind, "resolution": [int(width), int(height)], "geometry": geometry,
        "depth_units": depth_units, "conventions": dict(CONVENTIONS),
        "modalities": [m for m in MODALITIES if m in modalities],
        "frames": sorted(str(f) for f in frames),
    }
    if extra:
        meta.update(extra)
    return meta


# =========================================================================== validation
def _check_hw(arr: np.ndarray, what: str, hw, path) -> None:
    if hw is not None and tuple(arr.shape[:2]) != tuple(hw):
        raise FmgsInputError(
            f"{what} is {arr.shape[1]}x{arr.shape[0]} but the prior resolution is "
            f"{hw[1]}x{hw[0]} (meta.json)", path)


def validate_mask(mask, hw=None, path=None) -> np.ndarray:
    """Check a mask map and return it as (H, W) uint8 in {0, 255}.

    Args:
        mask: (H, W) array; bool, or uint8 with values exactly 0 / 255.
        hw: optional expected (H, W).
        path: file named in errors.
    Raises:
        FmgsInputError: wrong ndim/dtype/size, or values other than 0 and 255.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise FmgsInputError(f"mask must be a single-channel (H, W) image, got shape {m.shape}", path)
    if m.dtype == bool:
        m = m.astype(np.uint8) * 255
    if m.dtype != np.uint8:
        raise FmgsInputError(f"mask must be uint8 (0/255) or bool, got {m.dtype}", path)
    bad = (m != 0) & (m != 255)
    if bad.any():
        raise FmgsInputError(
            f"mask values must be 0 or 255, found {np.unique(m[bad])[:5].tolist()}", path)
    _check_hw(m, "mask", hw, path)
    return m


def _float_map(arr: np.ndarray, what: str, path) -> np.ndarray:
    """``arr`` as float32; FmgsInputError for a non-float dtype or +-inf (NaN = no value)."""
    if not np.issubdtype(arr.dtype, np.floating):
        raise FmgsInputError(f"{what} must be float32, got {arr.dtype}", path)
    arr = arr.astype(np.float32, copy=False)
    if np.isinf(arr).any():
        raise FmgsInputError(f"{what} contains +-inf (use NaN for 'no value')", path)
    return arr


def validate_depth(depth, hw=None, path=None) -> np.ndarray:
    """Check a depth map and return it as (H, W) float32 (NaN = no value).

    Raises:
        FmgsInputError: not 2-D, not a float array, contains +-inf, has no finite value,
            or wrong size. Relative depth has no known scale, so values are not range-checked.
    """
    d = np.asarray(depth)
    if d.ndim != 2:
        raise FmgsInputError(f"depth must be a (H, W) array, got shape {d.shape}", path)
    d = _float_map(d, "depth", path)
    if not np.isfinite(d).any():
        raise FmgsInputError("depth has no finite value", path)
    _check_hw(d, "depth", hw, path)
    return d


def validate_normal(normal, hw=None, path=None, mask=None) -> np.ndarray:
    """Check a normal map and return it as (H, W, 3) float32.

    Each pixel must hold a unit vector (``| |n| - 1 | <= 1e-2``), or NaN / all zeros for
    "no value". When ``mask`` is given, the camera-facing test of
    :func:`fmgs.sapiens.normal_convention_scores` is not repeated here; instead the
    cheap necessary condition is checked: inside the mask the majority of normals must
    point against the viewing direction's z (``n_z < 0`` in OpenCV axes), which catches
    a file written with the wrong z sign.

    Raises:
        FmgsInputError: wrong shape/dtype/size, +-inf, non-unit vectors, or (with
            ``mask``) normals that mostly point away from the camera.
    """
    n = np.asarray(normal)
    if n.ndim != 3 or n.shape[2] != 3:
        raise FmgsInputError(f"normal map must be (H, W, 3), got shape {n.shape}", path)
    n = _float_map(n, "normal map", path)
    valid = np.isfinite(n).all(2)
    norm = np.linalg.norm(np.where(valid[..., None], n, 0.0), axis=2)
    valid &= norm > 0
    if valid.any():
        err = np.abs(norm[valid] - 1.0)
        if err.max() > _UNIT_TOL:
            raise FmgsInputError(
                f"normal map must hold unit vectors; |n| deviates from 1 by up to "
                f"{err.max():.3g} ({int((err > _UNIT_TOL).sum())} pixels)", path)
    _check_hw(n, "normal map", hw, path)
    if mask is not None:
        sel = valid & (np.asarray(mask) > 0)
        if sel.sum() >= 20:
            frac = float((n[..., 2][sel] < 0).mean())
            if frac < 0.5:
                raise FmgsInputError(
                    f"only {100 * frac:.0f}% of the normals inside the mask point towards the "
                    "camera (n_z < 0 in OpenCV axes); the file's z axis looks flipped", path)
    return n


def validate_parts(parts, hw=None, path=None) -> np.ndarray:
    """Check a part-label map and return it as (H, W) uint8 with ids 0..27.

    Raises:
        FmgsInputError: not single-channel integer, ids outside 0..27, or wrong size.
    """
    p = np.asarray(parts)
    if p.ndim != 2:
        raise FmgsInputError(f"part labels must be a single-channel (H, W) image, got {p.shape}", path)
    if not np.issubdtype(p.dtype, np.integer):
        raise FmgsInputError(f"part labels must be integer class ids, got {p.dtype}", path)
    if p.size and (p.min() < 0 or p.max() >= NUM_SAPIENS_CLASSES):
        raise FmgsInputError(
            f"part labels must be Sapiens class ids 0..{NUM_SAPIENS_CLASSES - 1}, "
            f"found range {int(p.min())}..{int(p.max())}", path)
    _check_hw(p, "part labels", hw, path)
    return p.astype(np.uint8)


_VALIDATORS = {"mask": validate_mask, "depth": validate_depth, "normal": validate_normal,
               "parts": validate_parts}
_EXT = {"mask": ".png", "depth": ".npy", "normal": ".npy", "parts": ".png"}


# =========================================================================== PriorSet
class PriorSet:
    """Reader / writer of one ``priors/`` folder (see the module docstring for the format).

    Args:
        root: the priors folder (``<sequence>/priors`` by default).

    Reading validates ``meta.json`` (format name, version, conventions, resolution) on
    construction when it exists, and every map on :meth:`read`. Writing: call
    :meth:`write` per frame (atomic per file), then :meth:`write_meta`.

    Raises:
        FmgsInputError (naming the file): unreadable / malformed ``meta.json``, another
        format or version, unexpected conventions.
    """

    def __init__(self, root):
        self.root = Path(root)
        self.meta: dict | None = None
        mp = self.meta_path
        if mp.is_file():
            try:
                meta = json.loads(mp.read_text())
            except (OSError, ValueError) as exc:
                raise FmgsInputError(f"cannot parse meta.json ({exc})", mp) from None
            self.meta = self._check_meta(meta, mp)

    @property
    def meta_path(self) -> Path:
        """``<root>/meta.json``."""
        return self.root / "meta.json"

    @staticmethod
    def _check_meta(meta, path) -> dict:
        if not isinstance(meta, dict):
            raise FmgsInputError("meta.json must hold a JSON object", path)
        if meta.get("format") != FORMAT_NAME:
            raise FmgsInputError(
                f"not an fmgs priors folder: 'format' is {meta.get('format')!r}, "
                f"expected {FORMAT_NAME!r}", path)
        if meta.get("version") != FORMAT_VERSION:
            raise FmgsInputError(
                f"unsupported priors format version {meta.get('version')!r} "
                f"(this reader knows {FORMAT_VERSION})", path)
        res = meta.get("resolution")
        if (not isinstance(res, list) or len(res) != 2
                or not all(isinstance(v, int) and v > 0 for v in res)):
            raise FmgsInputError(f"'resolution' must be [width, height], got {res!r}", path)
        conv = meta.get("conventions", {})
        for key in ("normal_axes", "depth_order", "part_classes"):
            if conv.get(key) != CONVENTIONS[key]:
                raise FmgsInputError(
                    f"conventions.{key} is {conv.get(key)!r}; this reader requires "
                    f"{CONVENTIONS[key]!r} (convert the priors first)", path)
        if meta.get("kind") not in ("foundation-model", "body-model"):
            raise FmgsInputError(f"'kind' must be 'foundation-model' or 'body-model', "
                                 f"got {meta.get('kind')!r}", path)
        return meta

    @property
    def hw(self) -> tuple[int, int] | None:
        """(H, W) from ``meta.json``, or None before it is written."""
        if self.meta is None:
            return None
        w, h = self.meta["resolution"]
        return h, w

    def path(self, modality: str, frame: str) -> Path:
        """File of ``modality`` for ``frame`` (``<root>/<modality>/<frame>.<png|npy>``)."""
        if modality not in MODALITIES:
            raise FmgsInputError(f"unknown prior modality {modality!r}; known: {list(MODALITIES)}")
        return self.root / modality / f"{frame}{_EXT[modality]}"

    def modalities(self) -> list[str]:
        """Modalities that have a folder on disk."""
        return [m for m in MODALITIES if (self.root / m).is_dir()]

    def frames(self, modality: str) -> list[str]:
        """Sorted frame names with a file of ``modality``."""
        d = self.root / modality
        if not d.is_dir():
            return []
        return sorted(p.stem for p in d.glob(f"*{_EXT[modality]}") if not p.name.startswith("."))

    # ------------------------------------------------------------------ writing
    def write(self, frame: str, mask=None, depth=None, normal=None, parts=None) -> None:
        """Validate and write the given maps of one frame (each atomically).

        Args:
            frame: frame name (file stem).
            mask: (H, W) bool or uint8 0/255.
            depth: (H, W) float, larger = farther, NaN = no value.
            normal: (H, W, 3) float unit vectors, camera space, OpenCV axes.
            parts: (H, W) integer Sapiens ids 0..27.
        Raises:
            FmgsInputError: any map fails its validator, or the maps disagree in size
                (with each other or with an existing ``meta.json``).
        """
        maps = {"mask": mask, "depth": depth, "normal": normal, "parts": parts}
        hw = self.hw
        for mod, arr in maps.items():
            if arr is None:
                continue
            p = self.path(mod, frame)
            arr = _VALIDATORS[mod](arr, hw, p)
            hw = hw or arr.shape[:2]
            with atomic_path(p) as tmp:
                if _EXT[mod] == ".png":
                    # the temporary name ends with the target's name, so ".png" picks the codec
                    if not cv2.imwrite(str(tmp), arr):
                        raise FmgsInputError("cannot write PNG", p)
                else:
                    with open(tmp, "wb") as f:
                        np.save(f, arr.astype(np.float32))

    def write_meta(self, meta: dict) -> None:
        """Validate and write ``meta.json`` atomically (and adopt it for reading)."""
        self.meta = self._check_meta(meta, self.meta_path)
        write_json_atomic(self.meta_path, meta)

    # ------------------------------------------------------------------ reading
    def read(self, frame: str, modalities: Iterable[str] = MODALITIES) -> dict:
        """Read and validate the maps of one frame.

        Returns:
            dict modality -> array or None (file absent): ``mask`` (H, W) uint8 0/255,
            ``depth`` (H, W) float32, ``normal`` (H, W, 3) float32, ``parts`` (H, W) uint8.
        Raises:
            FmgsInputError (naming the file): no ``meta.json``, undecodable file, or a
            map failing its validator (size must match ``meta.json``).
        """
        if self.meta is None:
            raise FmgsInputError("priors folder has no meta.json", self.meta_path)
        out: dict = {}
        for mod in modalities:
            p = self.path(mod, frame)
            if not p.is_file():
                out[mod] = None
                continue
            if _EXT[mod] == ".png":
                arr = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
                if arr is None:
                    raise FmgsInputError(f"cannot decode {mod} PNG", p)
            else:
                try:
                    arr = np.load(p, allow_pickle=False)
                except (OSError, ValueError) as exc:
                    raise FmgsInputError(f"cannot read {mod} .npy ({exc})", p) from None
            if mod == "normal":
                arr = validate_normal(arr, self.hw, p, mask=out.get("mask"))
            else:
                arr = _VALIDATORS[mod](arr, self.hw, p)
            out[mod] = arr
        return out


def _resize(arr: np.ndarray, hw: tuple[int, int], nearest: bool) -> np.ndarray:
    if tuple(arr.shape[:2]) == tuple(hw):
        return arr
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(arr, (hw[1], hw[0]), interpolation=interp)


def load_priors(seq_root, frame_names: Sequence[str], image_size: int | None = None,
                priors_dir=None, verbose: bool = True) -> list[dict]:
    """Load the priors of ``frame_names`` for training, ready to compare with renders.

    Args:
        seq_root: sequence folder; priors are read from ``<seq_root>/priors`` unless
            ``priors_dir`` is given.
        frame_names: frame names, in the order wanted.
        image_size: None = the priors' own resolution; an int = target width in pixels
            (height scaled by the same factor, rounded), as ``HumanNeRFSequence``'s
            ``image_size``. All maps are resized with nearest-neighbour sampling (no
            blending of labels, of NaN "no value" depths, or of normals).
        priors_dir: explicit priors folder.
        verbose: print one note per missing modality.
    Returns:
        One dict per frame with keys ``mask`` ((H, W) float32 in {0, 1}), ``depth``
        ((H, W) float32, larger = farther, NaN = no value), ``normal`` ((H, W, 3) float32,
        camera space, OpenCV axes), ``parts`` ((H, W) int64 Sapiens ids) and ``kind``
        (``meta.json`` kind, or None); a modality is None for every frame when its folder
        is missing, and None for single frames whose file is missing. With no priors
        folder at all, every entry is None (and one note is printed).
    Raises:
        FmgsInputError: malformed ``meta.json`` or a malformed map (file named).
    """
    root = Path(priors_dir) if priors_dir is not None else Path(seq_root) / "priors"
    empty = [{m: None for m in MODALITIES} | {"kind": None} for _ in frame_names]
    if not (root / "meta.json").is_file():
        if verbose:
            print(f"note: no priors found at {root} (no meta.json); the mask/depth/normal/"
                  "semantic prior losses are off. Create them with 'fmgs-prep priors'.")
        return empty
    ps = PriorSet(root)
    present = ps.modalities()
    for mod in MODALITIES:
        if mod not in present and verbose:
            print(f"note: priors at {root} have no '{mod}' maps; the {mod} prior loss is off")
    h0, w0 = ps.hw
    hw = (h0, w0) if image_size is None else (max(1, int(round(h0 * image_size / w0))),
                                              int(image_size))
    out = []
    for name in frame_names:
        raw = ps.read(name, present)
        d: dict = {m: None for m in MODALITIES}
        d["kind"] = ps.meta["kind"]
        if raw.get("mask") is not None:
            d["mask"] = (_resize(raw["mask"], hw, True) > 127).astype(np.float32)
        if raw.get("depth") is not None:
            d["depth"] = _resize(raw["depth"], hw, True).astype(np.float32)
        if raw.get("normal") is not None:
            d["normal"] = _resize(raw["normal"], hw, True).astype(np.float32)
        if raw.get("parts") is not None:
            d["parts"] = _resize(raw["parts"], hw, True).astype(np.int64)
        out.append(d)
    missing = {m: sum(o[m] is None for o in out) for m in present}
    for m, k in missing.items():
        if 0 < k and verbose:
            print(f"note: {k} of {len(out)} frames have no '{m}' prior file; "
                  f"the {m} loss is off for them")
    return out


# =========================================================================== SMPL parts
def smpl_face_joint_ids(smpl, parts_path=None) -> tuple[np.ndarray, str]:
    """Per-face SMPL joint id (0..23) of the body segment each SMPL face belongs to.

    Args:
        smpl: :class:`fmgs.body_model.SMPLModel`.
        parts_path: ``smplh_parts_segm.pkl`` (per-face SMPL-H ids, folded to SMPL with
            :func:`fmgs.surfels.fold_smplh_parts`); None looks next to ``smpl.path``, and
            when absent there the argmax of the face's summed skinning weights is used.
    Returns:
        ((F,) int64 joint ids, source description string).
    Raises:
        FmgsInputError: a given ``parts_path`` is missing or malformed (named).
    """
    from fmgs.surfels import _load_part_labels

    nf = smpl.faces.shape[0]
    if parts_path is None and smpl.path:
        cand = Path(smpl.path).parent / "smplh_parts_segm.pkl"
        parts_path = cand if cand.is_file() else None
    if parts_path is not None:
        if not Path(parts_path).is_file():
            raise FmgsInputError("SMPL part segmentation file not found", parts_path)
        return _load_part_labels(parts_path, nf), f"segm of {Path(parts_path).name}"
    w = smpl.weights[smpl.faces].sum(1)  # (F, 24)
    return np.argmax(w, 1).astype(np.int64), "argmax skinning weight per face"


def smpl_face_sapiens_labels(face_joint_ids) -> np.ndarray:
    """Map per-face SMPL joint ids (0..23) to Sapiens class ids with :data:`SMPL_JOINT_TO_SAPIENS`.

    Args:
        face_joint_ids: (F,) int ids 0..23.
    Returns:
        (F,) uint8 Sapiens class ids (never 0 = background).
    Raises:
        FmgsInputError: ids outside 0..23.
    """
    j = np.asarray(face_joint_ids).astype(np.int64)
    if j.size and (j.min() < 0 or j.max() > 23):
        raise FmgsInputError(f"SMPL joint ids must be in 0..23, got {j.min()}..{j.max()}")
    return SMPL_JOINT_TO_SAPIENS[j].astype(np.uint8)


# =========================================================================== rasteriser
def vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (outward for SMPL's counter-clockwise faces).

    Args:
        verts: (V, 3) float positions. faces: (F, 3) int vertex indices.
    Returns:
        (V, 3) float64 unit normals (zero for unreferenced vertices).
    """
    v = np.asarray(verts, dtype=np.float64)
    tri = v[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 * area
    vn = np.zeros_like(v)
    for k in range(3):
        np.add.at(vn, faces[:, k], fn)
    nrm = np.linalg.norm(vn, axis=1, keepdims=True)
    return vn / np.where(nrm > 0, nrm, 1.0)


def rasterize_mesh(verts_cam: np.ndarray, faces: np.ndarray, K: np.ndarray, width: int,
                   height: int, near: float = 1e-3) -> dict:
    """Vectorised z-buffer rasterisation of a triangle mesh seen by a pinhole camera.

    A pixel ``(i, j)`` is sampled at its centre ``(u, v) = (j + 0.5, i + 0.5)`` (the
    convention of :class:`fmgs.camera.Camera`). Every triangle emits one fragment per pixel
    centre inside its projected bounding box (enumerated with ``np.repeat``, no per-pixel
    Python loop); fragments inside the triangle (edge functions >= 0 with a tiny tolerance,
    either winding, so there is no back-face culling) are kept and the nearest per pixel
    wins (``np.lexsort`` by pixel then depth). Depth is perspective-correct: ``1/z`` is
    interpolated linearly in screen space, and the returned barycentrics are the
    perspective-corrected (3D) ones. Triangles with a vertex closer than ``near`` are
    dropped (no clipping); projected triangles are clipped to the image by bounds only.

    Args:
        verts_cam: (V, 3) float vertex positions in camera space (OpenCV axes, metres).
        faces: (F, 3) int triangle vertex indices.
        K: (3, 3) intrinsics in pixels (pixel centres at ``+0.5``).
        width, height: image size in pixels.
        near: minimum vertex depth in metres.
    Returns:
        dict with ``depth`` (H, W) float64 camera z in metres (NaN where empty),
        ``face`` (H, W) int64 face index (-1 where empty), ``bary`` (H, W, 3) float64
        perspective-correct barycentric weights of the face's three vertices (0 where empty),
        ``mask`` (H, W) bool coverage.
    """
    V = np.asarray(verts_cam, dtype=np.float64)
    F = np.asarray(faces, dtype=np.int64)
    K = np.asarray(K, dtype=np.float64)
    H, W = int(height), int(width)
    z = V[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (V[:, :2] / z[:, None]) @ K[:2, :2].T + K[:2, 2]
    keep = (z[F] > near).all(1)
    fid = np.nonzero(keep)[0]
    t_uv = uv[F[fid]]  # (F', 3, 2)
    lo = np.floor(t_uv.min(1) - 0.5) + 1  # first pixel index whose centre is >= min
    hi = np.floor(t_uv.max(1) - 0.5)      # last pixel index whose centre is <= max
    lo = np.maximum(lo, 0)
    hi[:, 0] = np.minimum(hi[:, 0], W - 1)
    hi[:, 1] = np.minimum(hi[:, 1], H - 1)
    nx = (hi[:, 0] - lo[:, 0] + 1).astype(np.int64)
    ny = (hi[:, 1] - lo[:, 1] + 1).astype(np.int64)
    ok = (nx > 0) & (ny > 0)
    fid, t_uv, lo, nx, ny = fid[ok], t_uv[ok], lo[ok].astype(np.int64), nx[ok], ny[ok]
    cnt = nx * ny
    total = int(cnt.sum())
    depth = np.full((H, W), np.nan)
    face_img = np.full((H, W), -1, dtype=np.int64)
    bary_img = np.zeros((H, W, 3))
    if total == 0:
        return dict(depth=depth, face=face_img, bary=bary_img, mask=face_img >= 0)
    tri = np.repeat(np.arange(fid.size), cnt)
    start = np.cumsum(cnt) - cnt
    k = np.arange(total) - np.repeat(start, cnt)
    px = lo[tri, 0] + k % nx[tri]
    py = lo[tri, 1] + k // nx[tri]
    pu, pv = px + 0.5, py + 0.5
    a, b, c = t_uv[tri, 0], t_uv[tri, 1], t_uv[tri, 2]
    # edge functions (2x signed areas) -> screen-space barycentrics
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    w0 = (b[:, 0] - pu) * (c[:, 1] - pv) - (b[:, 1] - pv) * (c[:, 0] - pu)
    w1 = (c[:, 0] - pu) * (a[:, 1] - pv) - (c[:, 1] - pv) * (a[:, 0] - pu)
    with np.errstate(divide="ignore", invalid="ignore"):
        l0, l1 = w0 / area, w1 / area
    l2 = 1.0 - l0 - l1
    eps = -1e-9
    inside = (np.abs(area) > 1e-12) & (l0 >= eps) & (l1 >= eps) & (l2 >= eps)
    tri, px, py = tri[inside], px[inside], py[inside]
    L = np.stack([l0[inside], l1[inside], l2[inside]], 1)
    inv_z = 1.0 / z[F[fid[tri]]]  # (n, 3)
    s = (L * inv_z).sum(1)
    frag_z = 1.0 / s
    bary = L * inv_z / s[:, None]
    pix = py * W + px
    order = np.lexsort((frag_z, pix))
    pix_o = pix[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = pix_o[1:] != pix_o[:-1]
    win = order[first]
    flat = pix[win]
    depth.reshape(-1)[flat] = frag_z[win]
    face_img.reshape(-1)[flat] = fid[tri[win]]
    bary_img.reshape(-1, 3)[flat] = bary[win]
    return dict(depth=depth, face=face_img, bary=bary_img, mask=face_img >= 0)


def render_body_priors(verts_world: np.ndarray, faces: np.ndarray, face_labels: np.ndarray,
                       camera) -> dict:
    """Render the body-model priors of one frame: mask, depth, normal, parts.

    Args:
        verts_world: (V, 3) float posed mesh vertices in world coordinates (metres).
        faces: (F, 3) int faces (counter-clockwise seen from outside, as SMPL).
        face_labels: (F,) Sapiens class id per face (:func:`smpl_face_sapiens_labels`).
        camera: :class:`fmgs.camera.Camera` (distortion ignored: renders the undistorted
            image geometry).
    Returns:
        dict with ``mask`` (H, W) uint8 0/255, ``depth`` (H, W) float32 camera z in metres
        (NaN outside the body), ``normal`` (H, W, 3) float32 camera-space unit normals
        (OpenCV axes; perspective-correct interpolation of area-weighted vertex normals,
        flipped where needed so that ``n . ray < 0``, i.e. facing the camera; NaN outside),
        ``parts`` (H, W) uint8 Sapiens ids (0 outside), ``face`` (H, W) int64 face index.
    """
    Vc = camera.world_to_camera(verts_world)
    r = rasterize_mesh(Vc, faces, camera.K, camera.width, camera.height)
    H, W = camera.height, camera.width
    m = r["mask"]
    f = r["face"][m]
    vn = vertex_normals(Vc, faces)
    n = np.einsum("nk,nkc->nc", r["bary"][m], vn[faces[f]])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    # viewing rays through the pixel centres
    ii, jj = np.nonzero(m)
    Kinv = np.linalg.inv(camera.K)
    rays = np.stack([jj + 0.5, ii + 0.5, np.ones_like(ii, dtype=np.float64)], 1) @ Kinv.T
    flip = (n * rays).sum(1) > 0
    n[flip] *= -1
    normal = np.full((H, W, 3), np.nan, dtype=np.float32)
    normal[m] = n
    parts = np.zeros((H, W), dtype=np.uint8)
    parts[m] = np.asarray(face_labels)[f]
    return dict(mask=m.astype(np.uint8) * 255, depth=r["depth"].astype(np.float32),
                normal=normal, parts=parts, face=r["face"])


class BodyModelPriorProducer:
    """Body-model priors for a HumanNeRF-format sequence (SMPL posed per frame).

    Per frame: ``smpl.forward(seq.betas, poses)`` gives body-frame vertices,
    ``world_from_body(Rh, Th)`` places them in the world, and :func:`render_body_priors`
    renders them with the frame's (undistorted) camera.

    Args:
        seq: :class:`fmgs.trainer.data.humannerf.HumanNeRFSequence` (any split / frames; only
            cameras, poses and betas are used; no pixels are loaded).
        parts_path: ``smplh_parts_segm.pkl`` or None (see :func:`smpl_face_joint_ids`).
    """

    producer = "fmgs body-model rasteriser (posed SMPL mesh, z-buffer)"

    def __init__(self, seq, parts_path=None):
        self.seq = seq
        self.smpl = seq.smpl
        self.betas = seq.betas
        joint_ids, self.parts_source = smpl_face_joint_ids(self.smpl, parts_path)
        self.face_labels = smpl_face_sapiens_labels(joint_ids)

    def posed_world_vertices(self, name: str) -> np.ndarray:
        """(6890, 3) float64 posed SMPL vertices of frame ``name`` in world coordinates (m)."""
        from fmgs.body_model import world_from_body

        info = self.seq.smpl_params(name)
        v, _ = self.smpl.forward(self.betas, info["poses"])
        M = world_from_body(info["Rh"], info["Th"])
        return v @ M[:3, :3].T + M[:3, 3]

    def render(self, name: str) -> dict:
        """Priors of frame ``name`` (see :func:`render_body_priors`)."""
        return render_body_priors(self.posed_world_vertices(name), self.smpl.faces,
                                  self.face_labels, self.seq.camera(name))

    def meta(self, frames: Sequence[str], width: int, height: int) -> dict:
        """``meta.json`` for a body-model prior set."""
        return make_meta(
            self.producer, "body-model", width, height, frames, MODALITIES,
            depth_units="metres",
            extra={"notes": ("depth is camera-frame z in metres of the fitted SMPL mesh "
                             "(a valid 'relative, larger = farther' depth); mask, normals "
                             "and parts are of the naked body model, not the clothed person"),
                   "part_source": self.parts_source,
                   "smpl_model": os.path.basename(self.smpl.path) if self.smpl.path else ""})
