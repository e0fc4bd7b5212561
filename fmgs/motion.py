"""Motion-capture readers: AMASS, AIST++, HumanNeRF / ZJU-MoCap, plain SMPL, BVH and ASF/AMC files to one SMPL pose stream.

Every reader returns a :class:`Motion`: per-frame SMPL axis-angle poses
``(T, 24, 3)``, a root translation ``(T, 3)`` in metres, a frame rate, and the
rigid transform from the file's world to the player's Y-up world. Per frame the
avatar is posed as SMPL / ``smplx`` do (root rotation about the root joint, see
:func:`fmgs.body_model.forward_kinematics`), then placed with
``world_from_body = world_from_motion @ translate(trans[t])``
(:meth:`Motion.world_from_body`).

Formats (details, sources and axis conventions in ``docs/motion.md``):

* **AMASS** ``.npz`` (SMPL+H): ``poses (T,156)`` = root 3 + 21 body joints x 3
  + 2 x 15 finger joints x 3, ``trans (T,3)`` metres, ``mocap_framerate`` (or
  ``mocap_frame_rate``), ``betas``; or the split keys ``root_orient``,
  ``pose_body`` of newer releases. SMPL's pose is ``poses[:, :66]`` followed
  by zero rotations for SMPL joints 22/23 (left/right hand). AMASS is Z-up.
* **AIST++** ``.pkl`` (or an ``.npz`` with the same keys): ``smpl_poses
  (T,72)`` or ``(T,24,3)``, ``smpl_trans (T,3)``, ``smpl_scaling (1,)``;
  60 fps. The AIST++ API poses SMPL as ``scaling * SMPL(pose) + smpl_trans``,
  so at the SMPL body's own size the translation is ``smpl_trans /
  smpl_scaling`` (metres).
* **HumanNeRF / ZJU-MoCap** ``mesh_infos.pkl`` (or the sequence folder holding
  it): per frame ``poses (72,)``, ``Rh``, ``Th``, ``tpose_joints``; world point
  ``rodrigues(Rh) @ x_body + Th`` is re-expressed in the SMPL ``transl``
  convention (root rotation ``Rh`` composed with the stored root,
  ``trans = rodrigues(Rh) @ J_0 + Th - J_0``).
* **Plain SMPL** ``.npy`` / ``.npz``: ``(T,72)`` or ``(T,24,3)`` (``.npz``
  key ``poses``, or ``global_orient`` + ``body_pose``), optional ``trans`` /
  ``transl`` (metres, zeros when absent) and ``fps``. A ``(T,156)`` array is
  read as SMPL+H like AMASS.
* **BVH** / **ASF+AMC** skeleton motion: read by :mod:`fmgs.skeleton` (BVH parsed by
  ``bvhio``) and retargeted to SMPL's 24 joints (joint map presets or a user map, rest-pose
  alignment of bone directions, leg-length scale); the result is Y-up.

The file's up axis is the format's convention for AMASS (+Z) and otherwise
detected from the data (the mean direction of the body's own +Y axis, i.e. the
root orientation applied to SMPL's rest "up", snapped to the nearest signed
coordinate axis); ``up=`` overrides it. SMPL-X files (165 pose values, or
``surface_model_type`` = ``smplx``), wrong shapes, empty or all-NaN files raise
:class:`fmgs.errors.FmgsInputError` naming the file and the problem; frames
holding NaN/inf are dropped with a warning; complex values, frame rates outside
:data:`SOURCE_FPS_RANGE` and absurd translations / angles raise.
:func:`resample_motion` resamples to a display rate with SciPy ``Slerp`` per joint and
linear translation.

Torch-free (NumPy only); see ``tests/test_no_torch.py``.
"""
from __future__ import annotations

import argparse
import math
import os
import warnings
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from fmgs.body_model import NUM_JOINTS, axis_angle_to_matrix, matrix_to_axis_angle
from fmgs.errors import FmgsInputError
from fmgs.pickle_io import load_pickle, to_numpy_tree

__all__ = [
    "Motion",
    "MOTION_KINDS",
    "DEFAULT_FPS",
    "AISTPP_FPS",
    "UP_AXES",
    "load_motion",
    "resample_motion",
    "smplh_to_smpl",
    "detect_up_axis",
    "world_from_up",
    "axis_angle_to_quat",
    "quat_to_axis_angle",
    "quat_slerp",
]

#: The ``Motion.kind`` values the readers produce.
MOTION_KINDS = ("amass", "aistpp", "humannerf", "smpl", "bvh", "asf_amc")

#: Frame rate assumed (with a warning) for files that do not store one.
DEFAULT_FPS = 30.0

#: AIST++ motions are sampled at 60 fps (AIST++ API, ``demos/run_vis.py``: ``fps=60``).
AISTPP_FPS = 60.0

#: Frame rates accepted from a file or ``source_fps`` (frames per second): mocap runs from
#: a few Hz (keyframed clips) to a few kHz (IMU suits); anything outside is a corrupt value.
SOURCE_FPS_RANGE = (0.1, 10000.0)

#: Display rates accepted by :func:`resample_motion` (frames per second).
DISPLAY_FPS_RANGE = (0.1, 1000.0)

#: Largest accepted root translation (metres) and axis-angle magnitude (radians): larger
#: values are corrupt data (they would put the body out of any view or lose all precision).
MAX_TRANSLATION_M = 1.0e4
MAX_ANGLE_RAD = 1.0e3

#: Assumed frame rate of AMC files (which store none): the CMU database is captured at 120 Hz.
AMC_FPS = 120.0

#: Signed coordinate axes accepted by ``up=``.
UP_AXES = ("+x", "-x", "+y", "-y", "+z", "-z")

_SMPL_DIMS = NUM_JOINTS * 3  # 72
_SMPLH_DIMS = 52 * 3  # 156: 22 body joints + 2 x 15 finger joints
_SMPLX_DIMS = 55 * 3  # 165: 22 body + jaw + 2 eyes + 2 x 15 fingers
_SMPLH_BODY_DIMS = 22 * 3  # 66: root + 21 body joints, shared with SMPL joints 0..21
_FPS_KEYS = ("fps", "mocap_framerate", "mocap_frame_rate", "frame_rate", "framerate")
_EPS_T = 1e-9  # tolerance (in source frames) for "this output time is a source frame"


# --------------------------------------------------------------------------- data
@dataclass
class Motion:
    """One SMPL pose stream, whatever file it came from.

    Attributes:
        poses: (T, 24, 3) float64 SMPL axis-angle, radians, SMPL joint order
            (:data:`fmgs.body_model.JOINT_NAMES`); joint 0 is the global
            orientation in the file's world (rotation about the root joint).
        trans: (T, 3) float64 root translation, metres, in the file's world
            (SMPL / ``smplx`` ``transl`` convention: added after posing).
        fps: frame rate of ``poses`` / ``trans``, frames per second (> 0).
        world_from_motion: (4, 4) float64 rigid transform from the file's world
            to the player's Y-up world (e.g. AMASS Z-up -> Y-up); identity for
            Y-up files.
        betas: (B,) float64 shape coefficients stored in the file, or None
            (informational: an avatar keeps its own shape).
        source: the file the motion was read from.
        kind: one of :data:`MOTION_KINDS`.
        notes: lines to show the user (for retargeted skeleton files: the joint map, the
            detected axes, units and scale).

    Raises:
        ValueError: (construction) inconsistent shapes or a non-positive fps.
    """

    poses: np.ndarray
    trans: np.ndarray
    fps: float
    world_from_motion: np.ndarray
    betas: np.ndarray | None
    source: str
    kind: str
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.poses = np.asarray(self.poses, dtype=np.float64)
        self.trans = np.asarray(self.trans, dtype=np.float64)
        self.world_from_motion = np.asarray(self.world_from_motion, dtype=np.float64)
        t = self.poses.shape[0] if self.poses.ndim == 3 else -1
        if self.poses.shape != (t, NUM_JOINTS, 3) or t < 1:
            raise ValueError(f"Motion.poses must be (T>=1, 24, 3), got {self.poses.shape}")
        if self.trans.shape != (t, 3):
            raise ValueError(f"Motion.trans must be ({t}, 3), got {self.trans.shape}")
        if self.world_from_motion.shape != (4, 4):
            raise ValueError(f"Motion.world_from_motion must be (4, 4), got {self.world_from_motion.shape}")
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"Motion.fps must be a positive number, got {self.fps}")
        self.fps = float(self.fps)

    @property
    def num_frames(self) -> int:
        """Number of frames T."""
        return int(self.poses.shape[0])

    @property
    def duration(self) -> float:
        """Time from the first to the last frame, seconds: ``(T - 1) / fps``."""
        return (self.num_frames - 1) / self.fps

    def world_from_body(self, t: int) -> np.ndarray:
        """Placement of the posed SMPL body of frame ``t`` in the player's world.

        ``world_from_motion @ translate(trans[t])``: apply it to the output of
        SMPL forward kinematics / LBS of ``poses[t]`` (body frame, metres).

        Args:
            t: frame index in ``[0, T)`` (negative indices count from the end).

        Returns:
            (4, 4) float64 rigid transform, metres.
        """
        m = np.eye(4)
        m[:3, 3] = self.trans[t]
        return self.world_from_motion @ m


# --------------------------------------------------------------------------- quaternions
def axis_angle_to_quat(aa: np.ndarray) -> np.ndarray:
    """Axis-angle vectors to unit quaternions ``(w, x, y, z)``.

    ``q = (cos(t/2), sin(t/2) a / t)`` with ``t = |a|``, computed by SciPy
    (``Rotation.from_rotvec(...).as_quat()``, reordered scalar first).

    Args:
        aa: (..., 3) axis-angle, radians.

    Returns:
        (..., 4) float64 unit quaternions, scalar first.
    """
    aa = np.asarray(aa, dtype=np.float64)
    q = Rotation.from_rotvec(aa.reshape(-1, 3)).as_quat()
    return q[:, [3, 0, 1, 2]].reshape(aa.shape[:-1] + (4,))


def quat_to_axis_angle(q: np.ndarray) -> np.ndarray:
    """Unit quaternions ``(w, x, y, z)`` to axis-angle vectors (angle in [0, pi]).

    ``q`` and ``-q`` give the same result; computed by SciPy
    (``Rotation.from_quat(...).as_rotvec()``, which normalises ``q``).

    Args:
        q: (..., 4) quaternions, scalar first (non-zero norm).

    Returns:
        (..., 3) float64 axis-angle, radians.
    """
    q = np.asarray(q, dtype=np.float64)
    r = Rotation.from_quat(q.reshape(-1, 4)[:, [1, 2, 3, 0]])
    return r.as_rotvec().reshape(q.shape[:-1] + (3,))


def quat_slerp(q0: np.ndarray, q1: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Spherical linear interpolation along the shorter arc (Shoemake 1985).

    ``slerp(a) = R0 exp(a log(R0^-1 R1))`` with SciPy ``Rotation`` (``as_rotvec`` returns
    the angle in [0, pi], i.e. the shorter arc), element-wise over broadcast inputs: the
    same rotations as :class:`scipy.spatial.transform.Slerp` between two key rotations.

    Args:
        q0: (..., 4) unit quaternions at ``alpha = 0``, scalar first.
        q1: (..., 4) unit quaternions at ``alpha = 1``.
        alpha: interpolation weights broadcastable to ``q0.shape[:-1]``, in [0, 1].

    Returns:
        (..., 4) float64 unit quaternions (scalar first, ``w >= 0``).
    """
    q0 = np.asarray(q0, dtype=np.float64)
    q1 = np.asarray(q1, dtype=np.float64)
    shape = np.broadcast_shapes(q0.shape[:-1], q1.shape[:-1], np.shape(alpha))
    q0 = np.broadcast_to(q0, shape + (4,)).reshape(-1, 4)
    q1 = np.broadcast_to(q1, shape + (4,)).reshape(-1, 4)
    a = np.broadcast_to(np.asarray(alpha, dtype=np.float64), shape).reshape(-1)
    r0 = Rotation.from_quat(q0[:, [1, 2, 3, 0]])
    r1 = Rotation.from_quat(q1[:, [1, 2, 3, 0]])
    rel = (r0.inv() * r1).as_rotvec()
    out = (r0 * Rotation.from_rotvec(rel * a[:, None])).as_quat()[:, [3, 0, 1, 2]]
    out = np.where(out[:, :1] < 0, -out, out)
    return out.reshape(shape + (4,))


# --------------------------------------------------------------------------- axes
_UP_ROT = {
    "+y": np.eye(3),
    "-y": np.diag([1.0, -1.0, -1.0]),  # 180 deg about x (OpenCV camera-like, y down)
    "+z": np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]),  # -90 deg about x: z -> y
    "-z": np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]),  # +90 deg about x: -z -> y
    "+x": np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]),  # +90 deg about z: x -> y
    "-x": np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]]),  # -90 deg about z: -x -> y
}


def world_from_up(up: str) -> np.ndarray:
    """Rigid rotation taking a file's up axis to the player's +Y.

    ``+y`` is the identity; ``-y`` is 180 deg about x; ``+z`` / ``-z`` are
    -90 / +90 deg about x (AMASS, Z-up: ``(x, y, z) -> (x, z, -y)``); ``+x`` /
    ``-x`` are +90 / -90 deg about z. The rotation axis is chosen so that x is
    kept whenever possible.

    Args:
        up: one of :data:`UP_AXES`.

    Returns:
        (4, 4) float64 rotation (det +1) with ``R @ up_vector = (0, 1, 0)``.

    Raises:
        FmgsInputError: ``up`` is not one of :data:`UP_AXES`.
    """
    key = str(up).strip().lower()
    if key in ("x", "y", "z"):
        key = "+" + key
    if key not in _UP_ROT:
        raise FmgsInputError(f"unknown up axis {up!r}: expected one of {', '.join(UP_AXES)} or 'auto'")
    m = np.eye(4)
    m[:3, :3] = _UP_ROT[key]
    return m


def detect_up_axis(poses: np.ndarray, min_cos: float = 0.5) -> str | None:
    """Guess a motion file's up axis from its root orientations.

    SMPL's rest body stands along its own +Y, so for upright motion (standing,
    walking, dancing) the file's up direction is close to ``R_root(t) @ e_y``.
    Its mean over all frames is snapped to the nearest signed coordinate axis.

    Args:
        poses: (T, 24, 3) or (T, 72) axis-angle, radians (only joint 0 is read).
        min_cos: the mean direction must make an angle with cosine >= this with
            the chosen axis (and have norm >= this), else the motion is not
            upright enough to tell and None is returned.

    Returns:
        One of :data:`UP_AXES`, or None when undecidable (e.g. lying down,
        rolling on the floor).
    """
    p = np.asarray(poses, dtype=np.float64).reshape(len(poses), -1)[:, :3]
    body_up = axis_angle_to_matrix(p)[:, :, 1]  # (T,3): R @ e_y
    mean = body_up.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if not np.isfinite(norm) or norm < min_cos:
        return None
    k = int(np.argmax(np.abs(mean)))
    if abs(mean[k]) / norm < min_cos:
        return None
    return ("+" if mean[k] > 0 else "-") + "xyz"[k]


# --------------------------------------------------------------------------- body models
def smplh_to_smpl(poses: np.ndarray) -> np.ndarray:
    """SMPL+H (52-joint) poses to SMPL (24-joint) poses.

    SMPL+H joints 0..21 (root + 21 body joints) are SMPL joints 0..21 (same
    kinematic tree and rest skeleton topology; AMASS ``poses[:, :66]``). SMPL's
    hand joints 22/23 (``left_hand``, ``right_hand``) have no SMPL+H
    counterpart -- SMPL+H replaces them by 2 x 15 finger joints -- and get zero
    rotation, as AMASS / ``human_body_prior`` do when they pose SMPL from SMPL+H
    (fingers are dropped; see ``docs/motion.md`` for why not a finger joint).

    Args:
        poses: (T, 156) or (T, 52, 3) SMPL+H axis-angle, radians.

    Returns:
        (T, 24, 3) float64 SMPL axis-angle, radians.

    Raises:
        ValueError: the input is not 156 values per frame.
    """
    p = np.asarray(poses, dtype=np.float64)
    if p.ndim < 2 or p[0].size != _SMPLH_DIMS:
        raise ValueError(f"smplh_to_smpl expects (T,156) or (T,52,3), got {p.shape}")
    p = p.reshape(len(p), _SMPLH_DIMS)
    out = np.zeros((len(p), NUM_JOINTS, 3))
    out[:, :22] = p[:, :_SMPLH_BODY_DIMS].reshape(-1, 22, 3)
    return out


def _num(arr: Any, path: str, what: str) -> np.ndarray:
    """A real numeric array as float64; complex, text, object or structured data raise
    (converting complex values would silently drop their imaginary part)."""
    a = np.asarray(arr) if not isinstance(arr, np.ndarray) else arr
    if a.dtype.kind == "c":
        raise FmgsInputError(f"{what} holds complex numbers ({a.dtype}); motion values must be real", path)
    if a.dtype.kind not in "fiub":
        raise FmgsInputError(f"{what} is not a numeric array (dtype {a.dtype})", path)
    try:
        return np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FmgsInputError(f"{what} is not a numeric array ({exc})", path) from exc


def _poses_to_smpl(arr: Any, path: str, what: str, model: str | None = None) -> np.ndarray:
    """Validate a pose array and map it to (T,24,3) SMPL; errors name the body model."""
    try:
        p = _num(arr, path, what)
    except FmgsInputError:
        raise
    if p.ndim == 1 and p.size in (_SMPL_DIMS, _SMPLH_DIMS, _SMPLX_DIMS):
        p = p[None]
    if p.ndim == 3 and p.shape[2] == 3:
        p = p.reshape(p.shape[0], -1)
    if p.ndim != 2:
        raise FmgsInputError(
            f"{what} has shape {p.shape}; expected (T,72) or (T,24,3) SMPL axis-angle "
            "(or (T,156) SMPL+H)", path)
    if p.shape[0] == 0:
        raise FmgsInputError(f"{what} is empty (0 frames)", path)
    d = p.shape[1]
    if d == _SMPLX_DIMS or model == "smplx":
        raise FmgsInputError(
            f"{what} is an SMPL-X motion ({d} pose values per frame: 55 joints x 3), body model "
            "'smplx'; fmgs-avatar drives SMPL (24 joints). Export the clip as SMPL (72) or "
            "SMPL+H (156, e.g. AMASS 'SMPL+H G').", path)
    if d == _SMPL_DIMS:
        return p.reshape(-1, NUM_JOINTS, 3)
    if d == _SMPLH_DIMS:
        return smplh_to_smpl(p)
    raise FmgsInputError(
        f"{what} has shape {p.shape}: {d} values per frame match no supported body model "
        "(SMPL: 72 = 24 joints x 3; SMPL+H: 156 = 52 x 3; SMPL-X: 165 = 55 x 3, not supported)", path)


def _as_str(v: Any) -> str:
    a = np.asarray(v)
    if a.dtype.kind == "S":
        return bytes(a.reshape(-1)[0]).decode("latin1") if a.size else ""
    if a.dtype.kind in ("U", "O"):
        x = a.reshape(-1)[0] if a.size else ""
        return x.decode("latin1") if isinstance(x, bytes) else str(x)
    return ""


def _scalar(v: Any, path: str, what: str) -> float:
    a = _num(v, path, what).reshape(-1)
    if a.size != 1:
        raise FmgsInputError(f"{what} must be a single number, got shape {np.shape(v)}", path)
    return float(a[0])


def _trans(arr: Any, t: int, path: str, what: str, scale: float = 1.0) -> np.ndarray:
    if arr is None:
        return np.zeros((t, 3))
    tr = _num(arr, path, what)
    if tr.ndim == 1 and tr.size == 3 and t == 1:
        tr = tr[None]
    if tr.shape != (t, 3):
        raise FmgsInputError(f"{what} has shape {tr.shape}; expected ({t}, 3) to match the {t} pose frames", path)
    return tr / scale


# --------------------------------------------------------------------------- readers
@dataclass
class _Raw:
    poses: np.ndarray  # (T,24,3)
    trans: np.ndarray  # (T,3) metres
    fps: float | None
    betas: np.ndarray | None
    kind: str
    up: str  # default up convention: an axis or "auto"
    default_fps: float = DEFAULT_FPS  # assumed (with a warning) when fps is None
    notes: list[str] = field(default_factory=list)


def _read_npz_dict(d: dict[str, Any], path: str) -> _Raw:
    keys = set(d)
    model = _as_str(d["surface_model_type"]).lower() if "surface_model_type" in keys else ""
    if model == "smplx" or {"pose_jaw", "pose_eye"} & keys or "expression" in keys:
        shape = np.shape(d["poses"]) if "poses" in keys else "n/a"
        raise FmgsInputError(
            f"SMPL-X motion (surface_model_type {model or 'smplx'!r}, poses {shape}), body model 'smplx': "
            "fmgs-avatar drives SMPL (24 joints); use the SMPL+H release of the clip (AMASS 'SMPL+H G') "
            "or convert it to SMPL", path)
    betas = None
    if "betas" in keys:
        b = _num(d["betas"], path, "'betas'").reshape(-1)
        betas = b if b.size else None
    fps = None
    for k in _FPS_KEYS:
        if k in keys:
            fps = _scalar(d[k], path, f"'{k}'")
            break
    # AIST++ keys in an npz
    if "smpl_poses" in keys:
        return _read_aistpp_dict(d, path)
    is_amass = model in ("smplh", "smpl") or "mocap_framerate" in keys or "mocap_frame_rate" in keys
    if "poses" in keys:
        poses = _poses_to_smpl(d["poses"], path, "'poses'", model or None)
    elif "root_orient" in keys and "pose_body" in keys:
        ro = _num(d["root_orient"], path, "'root_orient'")
        pb = _num(d["pose_body"], path, "'pose_body'")
        if ro.ndim != 2 or ro.shape[1] != 3 or pb.shape != (len(ro), 63):
            raise FmgsInputError(
                f"'root_orient' {ro.shape} / 'pose_body' {pb.shape}: expected (T,3) and (T,63) "
                "(AMASS SMPL+H body: 21 joints x 3)", path)
        poses = _poses_to_smpl(np.concatenate([ro, pb, np.zeros((len(ro), 6))], 1), path, "'root_orient'+'pose_body'")
    elif "global_orient" in keys and "body_pose" in keys:
        go = _num(d["global_orient"], path, "'global_orient'")
        bp = _num(d["body_pose"], path, "'body_pose'")
        go = go.reshape(len(go), -1) if go.ndim >= 2 else go.reshape(1, -1)
        bp = bp.reshape(len(bp), -1) if bp.ndim >= 2 else bp.reshape(1, -1)
        if go.shape[1] != 3 or len(go) != len(bp):
            raise FmgsInputError(f"'global_orient' {go.shape} / 'body_pose' {bp.shape} do not match", path)
        if bp.shape[1] == 63:  # SMPL+H / SMPL-X style body without hand joints
            bp = np.concatenate([bp, np.zeros((len(bp), 6))], 1)
        poses = _poses_to_smpl(np.concatenate([go, bp], 1), path, "'global_orient'+'body_pose'")
    elif len(keys) == 1:  # np.savez(file, array): a bare pose array
        poses = _poses_to_smpl(d[next(iter(keys))], path, f"array '{next(iter(keys))}'")
    else:
        raise FmgsInputError(
            f"no pose array found (keys: {', '.join(sorted(keys)) or 'none'}); expected 'poses' "
            "(AMASS / SMPL), 'smpl_poses' (AIST++), 'root_orient'+'pose_body' or 'global_orient'+'body_pose'",
            path)
    t = len(poses)
    tr_key = "trans" if "trans" in keys else ("transl" if "transl" in keys else None)
    trans = _trans(d[tr_key] if tr_key else None, t, path, f"'{tr_key}'")
    if is_amass:
        return _Raw(poses, trans, fps, betas, "amass", "+z")
    return _Raw(poses, trans, fps, betas, "smpl", "auto")


def _read_aistpp_dict(d: dict[str, Any], path: str) -> _Raw:
    poses = _poses_to_smpl(d["smpl_poses"], path, "'smpl_poses'")
    scale = 1.0
    if "smpl_scaling" in d:
        scale = _scalar(d["smpl_scaling"], path, "'smpl_scaling'")
        if not (math.isfinite(scale) and scale > 0):
            raise FmgsInputError(f"'smpl_scaling' must be a positive number, got {scale}", path)
    if "smpl_trans" not in d:
        raise FmgsInputError("AIST++ motion without 'smpl_trans'", path)
    trans = _trans(d["smpl_trans"], len(poses), path, "'smpl_trans'", scale=scale)
    fps = None
    for k in _FPS_KEYS:
        if k in d:
            fps = _scalar(d[k], path, f"'{k}'")
            break
    return _Raw(poses, trans, AISTPP_FPS if fps is None else fps, None, "aistpp", "auto")


def _read_humannerf(d: dict[str, Any], path: str) -> _Raw:
    names = sorted(d)
    poses, trans = [], []
    for name in names:
        fr = d[name]
        if not isinstance(fr, dict) or not {"poses", "Rh", "Th"} <= set(fr):
            raise FmgsInputError(
                f"frame {name!r} lacks 'poses'/'Rh'/'Th' (HumanNeRF mesh_infos.pkl layout)", path)
        if "tpose_joints" not in fr:
            raise FmgsInputError(
                f"frame {name!r} lacks 'tpose_joints': the root joint is needed to express Rh/Th as SMPL "
                "root rotation + translation", path)
        p = _poses_to_smpl(fr["poses"], path, f"{name!r} 'poses'")[0]
        rh = _num(fr["Rh"], path, f"frame {name!r} 'Rh'").reshape(-1)
        th = _num(fr["Th"], path, f"frame {name!r} 'Th'").reshape(-1)
        j0 = _num(fr["tpose_joints"], path, f"frame {name!r} 'tpose_joints'").reshape(-1)
        if j0.size < 3 or j0.size % 3:
            raise FmgsInputError(f"frame {name!r}: 'tpose_joints' {np.shape(fr['tpose_joints'])} is not (J, 3)", path)
        j0 = j0[:3]
        if rh.size != 3 or th.size != 3:
            raise FmgsInputError(f"frame {name!r}: Rh {rh.shape} / Th {th.shape}, expected 3 values each", path)
        r_h = axis_angle_to_matrix(rh)
        # world = R_h (R_0 (x - J0) + J0) + Th = (R_h R_0)(x - J0) + J0 + (R_h J0 + Th - J0)
        p = p.copy()
        p[0] = matrix_to_axis_angle(r_h @ axis_angle_to_matrix(p[0]))
        poses.append(p)
        trans.append(r_h @ j0 + th - j0)
    if not poses:
        raise FmgsInputError("HumanNeRF mesh_infos.pkl holds no frames", path)
    return _Raw(np.stack(poses), np.stack(trans), None, None, "humannerf", "auto")


def _read_pickle(path: str) -> _Raw:
    obj = to_numpy_tree(load_pickle(path))
    if not isinstance(obj, dict):
        raise FmgsInputError(f"motion pickle holds a {type(obj).__name__}, expected a dict", path)
    if "smpl_poses" in obj:
        return _read_aistpp_dict(obj, path)
    if obj and all(isinstance(v, dict) for v in obj.values()):
        return _read_humannerf(obj, path)
    if "poses" in obj or "global_orient" in obj or "root_orient" in obj:
        return _read_npz_dict(obj, path)
    raise FmgsInputError(
        f"unrecognised motion pickle (keys: {', '.join(map(str, sorted(obj, key=str))) or 'none'}); expected "
        "AIST++ ('smpl_poses', 'smpl_trans', 'smpl_scaling') or HumanNeRF mesh_infos (frame -> poses/Rh/Th)",
        path)


_SKELETON_SUFFIXES = (".bvh", ".amc")


def _neutral_rest_joints(path: str) -> np.ndarray:
    """SMPL neutral rest joints from the data root (for retargeting without a subject)."""
    from fmgs.body_model import load_smpl
    from fmgs.paths import smpl_neutral_path

    p = smpl_neutral_path()
    if not p.is_file():
        raise FmgsInputError(
            f"retargeting a skeleton to SMPL needs the subject's SMPL rest joints: pass rest_joints= "
            f"(fmgs-play uses the bundle's) or provide the neutral SMPL model at {p}", path)
    return load_smpl(p).shape()[1]


def _read_skeleton(path: str, suffix: str, opts: dict[str, Any]) -> _Raw:
    from fmgs import skeleton as sk

    if suffix == ".bvh":
        sm = sk.read_bvh(path)
    else:
        sm = sk.read_asf_amc(path, opts.get("asf"))
    if sm.num_frames < 1:
        raise FmgsInputError("skeleton motion holds no frames", path)
    if not (np.isfinite(sm.local_pos).all() and np.abs(sm.local_pos).max() < 1e12):
        raise FmgsInputError("skeleton offsets or root positions are not finite or absurdly large", path)
    rest = opts.get("rest_joints")
    rest = _neutral_rest_joints(path) if rest is None else np.asarray(rest, np.float64).reshape(NUM_JOINTS, 3)
    jm = opts.get("joint_map")
    preset = None
    if isinstance(jm, str) and jm in sk.JOINT_MAP_PRESETS:
        preset, jm = jm, sk.JOINT_MAP_PRESETS[jm]
    elif jm is not None and not isinstance(jm, dict):
        jm = sk.load_joint_map(jm)
    elif isinstance(jm, dict):
        preset = "user"
    up = opts.get("up")
    res = sk.retarget_to_smpl(sm, rest, jm, up=up, preset_name=preset, units=opts.get("units"))
    kind = "bvh" if suffix == ".bvh" else "asf_amc"
    return _Raw(res.poses, res.trans, sm.fps, None, kind, "+y",
                default_fps=AMC_FPS if kind == "asf_amc" else DEFAULT_FPS, notes=res.notes)


def _read_file(path: str, opts: dict[str, Any] | None = None) -> _Raw:
    p = Path(path)
    if p.is_dir():
        mi = p / "mesh_infos.pkl"
        if mi.is_file():
            return _read_pickle(str(mi))
        raise FmgsInputError("is a folder without mesh_infos.pkl; give a motion file", path)
    if not p.is_file():
        raise FmgsInputError("motion file not found", path)
    if p.stat().st_size == 0:
        raise FmgsInputError("motion file is empty (0 bytes)", path)
    suffix = p.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        return _read_pickle(path)
    if suffix in _SKELETON_SUFFIXES:
        return _read_skeleton(path, suffix, opts or {})
    if suffix == ".asf":
        raise FmgsInputError("an .asf file is a skeleton without motion; give its .amc motion (the .asf is "
                             "found next to it)", path)
    if suffix in (".fbx", ".c3d"):
        raise FmgsInputError(
            f"'{suffix}' is not supported; export the take as BVH (skeleton) or SMPL / SMPL+H", path)
    if suffix not in (".npz", ".npy"):
        raise FmgsInputError(
            f"unsupported motion file type '{suffix}': expected .npz (AMASS, SMPL, AIST++ keys), .npy (SMPL), "
            ".pkl (AIST++, HumanNeRF mesh_infos), .bvh or .amc (+ .asf) skeleton motion", path)
    try:
        if suffix == ".npy":
            poses = _poses_to_smpl(np.load(path, allow_pickle=False), path, "array")
            return _Raw(poses, np.zeros((len(poses), 3)), None, None, "smpl", "auto")
        with np.load(path, allow_pickle=False) as z:
            d = {}
            for k in z.files:
                try:
                    d[k] = z[k]
                except ValueError:  # object arrays (not needed for motion) are skipped safely
                    continue
    except FmgsInputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise FmgsInputError(f"cannot read {suffix} file (corrupt or not a NumPy file): {exc}", path) from exc
    except Exception as exc:  # numpy / zipfile / zlib decoding untrusted bytes: anything is corrupt input
        raise FmgsInputError(f"cannot read {suffix} file (corrupt or not a NumPy file): "
                             f"{type(exc).__name__}: {exc}", path) from exc
    return _read_npz_dict(d, path)


# --------------------------------------------------------------------------- public API
def load_motion(
    path: str | os.PathLike,
    fps: float | None = None,
    *,
    source_fps: float | None = None,
    up: str | None = None,
    rest_joints: np.ndarray | None = None,
    joint_map: str | os.PathLike | dict[str, str] | None = None,
    asf: str | os.PathLike | None = None,
    units: str | float | None = None,
) -> Motion:
    """Read a motion file (format detected from its suffix and keys) as an SMPL pose stream.

    Frames whose pose or translation holds NaN/inf are dropped with a
    :func:`warnings.warn` naming how many (the clip gets shorter; playback
    jumps over the gap). Files without a frame rate get
    :data:`DEFAULT_FPS` with a warning, unless ``source_fps`` is given.

    Skeleton files (BVH, ASF/AMC) are retargeted to SMPL by
    :func:`fmgs.skeleton.retarget_to_smpl` (their ``up`` goes to the retargeting, the
    result is Y-up: ``world_from_motion`` is the identity); the joint map and what was
    guessed are in ``Motion.notes``.

    Args:
        path: AMASS ``.npz``; AIST++ ``.pkl`` / ``.npz``; HumanNeRF
            ``mesh_infos.pkl`` or its sequence folder; plain SMPL ``.npy`` /
            ``.npz``; BVH ``.bvh``; Acclaim ``.amc`` (its ``.asf`` next to it).
            See the module docstring and ``docs/motion.md``.
        fps: resample to this display rate (frames per second) with
            :func:`resample_motion`; None keeps the file's frames.
        source_fps: the file's frame rate when it stores none (or to override
            a wrong stored one), frames per second.
        up: the file's up axis, one of :data:`UP_AXES` or ``"auto"`` (detect
            with :func:`detect_up_axis`); None uses the format's convention
            (AMASS: ``+z``; others: ``"auto"``). ``auto`` falls back to ``+y``
            with a warning when the motion is not upright enough to tell.
        rest_joints: (24, 3) SMPL rest joints of the subject (metres) that skeleton motion
            is retargeted to; default the neutral SMPL of the data root.
        joint_map: skeleton files: a preset name (:data:`fmgs.skeleton.JOINT_MAP_PRESETS`),
            a YAML/JSON file or a dict {SMPL joint: source joint}; default: the best preset.
        asf: AMC files: the ASF skeleton (default :func:`fmgs.skeleton.find_asf`).
        units: skeleton files: the length unit (``m``, ``cm``, ``mm``, ``in``, ``cmu`` or
            file units per metre); default guessed from the leg length and printed.

    Returns:
        A :class:`Motion` (float64; ``world_from_motion`` maps the file's up
        axis to +Y).

    Raises:
        FmgsInputError: missing / empty / corrupt file; unsupported format;
            wrong pose or translation shapes; SMPL-X (or another body model's)
            poses; complex values; every frame non-finite; a frame rate outside
            :data:`SOURCE_FPS_RANGE`; translations beyond :data:`MAX_TRANSLATION_M` or
            angles beyond :data:`MAX_ANGLE_RAD`; bad ``fps`` / ``source_fps`` / ``up``;
            skeleton files that cannot be retargeted. The message names the file.
    """
    spath = os.fspath(path)
    raw = _read_file(spath, {"rest_joints": rest_joints, "joint_map": joint_map, "asf": asf, "up": up,
                             "units": units})
    src = spath if not Path(spath).is_dir() else os.path.join(spath, "mesh_infos.pkl")

    # frame rate
    rate = raw.fps
    lo, hi = SOURCE_FPS_RANGE
    if source_fps is not None:
        try:
            rate = float(source_fps)
        except (TypeError, ValueError) as exc:
            raise FmgsInputError(f"source_fps must be a number, got {source_fps!r}", src) from exc
        if not (math.isfinite(rate) and lo <= rate <= hi):
            raise FmgsInputError(f"source_fps must be a positive number in [{lo:g}, {hi:g}], got {source_fps}", src)
    elif rate is None:
        warnings.warn(f"{src}: the file stores no frame rate; assuming {raw.default_fps:g} fps "
                      "(pass source_fps= to set it)", stacklevel=2)
        rate = raw.default_fps
    if not (math.isfinite(rate) and rate > 0):
        raise FmgsInputError(f"frame rate {rate} in the file is not a positive number", src)
    if not lo <= rate <= hi:
        raise FmgsInputError(f"frame rate {rate:g} fps in the file is outside the sane range [{lo:g}, {hi:g}] "
                             "(pass source_fps= if the file is right)", src)
    if abs(rate - round(rate)) < 1e-3:  # e.g. AMASS 120.00004577636719 (float32 artefact)
        rate = float(round(rate))

    # non-finite frames
    ok = np.isfinite(raw.poses).all(axis=(1, 2)) & np.isfinite(raw.trans).all(axis=1)
    n_bad = int((~ok).sum())
    if n_bad == len(ok):
        raise FmgsInputError(f"all {len(ok)} frames contain NaN or inf values", src)
    if n_bad:
        warnings.warn(f"{src}: dropped {n_bad} of {len(ok)} frames containing NaN or inf values", stacklevel=2)
    poses, trans = raw.poses[ok], raw.trans[ok]
    big_t = float(np.abs(trans).max())
    if big_t > MAX_TRANSLATION_M:
        raise FmgsInputError(f"root translation reaches {big_t:.3g} m (more than {MAX_TRANSLATION_M:g} m): "
                             "corrupt values or not metres", src)
    big_p = float(np.abs(poses).max())
    if big_p > MAX_ANGLE_RAD:
        raise FmgsInputError(f"pose values reach {big_p:.3g} rad (more than {MAX_ANGLE_RAD:g}): corrupt values or "
                             "not axis-angle radians", src)
    betas = raw.betas
    if betas is not None and not np.isfinite(betas).all():
        warnings.warn(f"{src}: ignoring non-finite betas", stacklevel=2)
        betas = None

    # up axis
    up_key = raw.up if (up is None or raw.kind in ("bvh", "asf_amc")) else str(up).strip().lower()
    if up_key == "auto":
        found = detect_up_axis(poses)
        if found is None:
            warnings.warn(f"{src}: cannot tell the up axis from the root orientations (not upright); "
                          "assuming +y (pass up= to set it)", stacklevel=2)
            found = "+y"
        up_key = found
    world = world_from_up(up_key)

    m = Motion(poses=poses, trans=trans, fps=rate, world_from_motion=world, betas=betas,
               source=src, kind=raw.kind, notes=list(raw.notes))
    return resample_motion(m, fps) if fps is not None else m


def resample_motion(m: Motion, fps: float) -> Motion:
    """Resample a motion to another frame rate.

    Output frame ``k`` is at time ``k / fps`` seconds, for every such time
    within ``[0, (T - 1) / m.fps]`` (so the first frame is kept and the clip
    never extrapolates). Rotations of every joint (root included) are
    interpolated by SciPy's ``Slerp`` (quaternion slerp along the shorter arc
    between consecutive frames), translation linearly. Output times that fall on a
    source frame (within 1e-9 frames) copy that frame bit for bit.

    Args:
        m: the motion.
        fps: target frame rate, frames per second (> 0).

    Returns:
        A new :class:`Motion` at ``fps`` (other fields copied).

    Raises:
        FmgsInputError: ``fps`` is not a finite number in :data:`DISPLAY_FPS_RANGE`.
    """
    try:
        target = float(fps)
    except (TypeError, ValueError) as exc:
        raise FmgsInputError(f"display fps must be a number, got {fps!r}", m.source) from exc
    lo, hi = DISPLAY_FPS_RANGE
    if not (math.isfinite(target) and lo <= target <= hi):
        raise FmgsInputError(f"display fps must be a positive number in [{lo:g}, {hi:g}], got {fps}", m.source)
    t_src = m.num_frames
    if t_src == 1:
        return replace(m, poses=m.poses.copy(), trans=m.trans.copy(), fps=target)
    n_out = int(math.floor((t_src - 1) * target / m.fps + _EPS_T)) + 1
    u = (np.arange(n_out, dtype=np.float64) * m.fps) / target  # position in source frames
    i0 = np.clip(np.floor(u + _EPS_T).astype(np.int64), 0, t_src - 1)
    alpha = u - i0
    alpha[np.abs(alpha) < _EPS_T] = 0.0
    i1 = np.minimum(i0 + 1, t_src - 1)
    exact = alpha == 0.0

    poses = m.poses[i0].copy()
    trans = m.trans[i0].copy()
    blend = ~exact
    if blend.any():
        a = alpha[blend]
        u_b = u[blend]
        keys = np.arange(t_src, dtype=np.float64)
        for j in range(NUM_JOINTS):
            rots = Rotation.from_rotvec(m.poses[:, j])
            poses[blend, j] = Slerp(keys, rots)(np.clip(u_b, 0.0, t_src - 1.0)).as_rotvec()
        trans[blend] = (1.0 - a)[:, None] * m.trans[i0[blend]] + a[:, None] * m.trans[i1[blend]]
    return replace(m, poses=poses, trans=trans, fps=target)


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m fmgs.motion FILE [--fps F]``: print what a motion file holds.

    Prints kind, frames, frame rate, duration, up axis mapping and the
    translation range (metres, player world). Returns 0, or 2 on bad input
    (the message names the file).
    """
    ap = argparse.ArgumentParser(prog="python -m fmgs.motion", description=main.__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--fps", type=float, default=None, help="resample to this rate")
    ap.add_argument("--source-fps", type=float, default=None, help="the file's rate when it stores none")
    ap.add_argument("--up", default=None, help="file up axis: +x -x +y -y +z -z or auto")
    ap.add_argument("--joint-map", default=None, help="skeleton files: preset name or YAML/JSON {smpl: source} map")
    ap.add_argument("--units", default=None, help="skeleton files: length unit (m, cm, mm, in, cmu, or units per metre)")
    args = ap.parse_args(argv)
    try:
        m = load_motion(args.file, args.fps, source_fps=args.source_fps, up=args.up, joint_map=args.joint_map,
                        units=args.units)
    except FmgsInputError as exc:
        print(f"error: {exc}")
        return 2
    world_t = (m.world_from_motion[:3, :3] @ m.trans.T).T + m.world_from_motion[:3, 3]
    up_file = m.world_from_motion[:3, :3].T @ np.array([0.0, 1.0, 0.0])
    k = int(np.argmax(np.abs(up_file)))
    print(f"{m.source}: kind {m.kind}, {m.num_frames} frames at {m.fps:g} fps ({m.duration:.2f} s), "
          f"file up axis {'+' if up_file[k] > 0 else '-'}{'xyz'[k]}, "
          f"betas {'none' if m.betas is None else m.betas.shape[0]}")
    print(f"  root translation (player world, m): min {np.round(world_t.min(0), 3)} max {np.round(world_t.max(0), 3)}")
    for line in m.notes:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
