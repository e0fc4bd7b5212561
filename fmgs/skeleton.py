"""Skeleton motion capture (BVH, Acclaim ASF/AMC) and its retargeting to SMPL's 24 joints.

Readers return a :class:`SkeletonMotion`: a joint tree (names, parents), per-frame local
rotations and local translations, so that forward kinematics is

    ``G_j = G_parent(j) @ R_j(t)``,  ``P_j = P_parent(j) + G_parent(j) @ o_j(t)``

(``G`` world rotation, ``P`` world position, ``o_j`` the joint's offset from its parent in
the parent's frame; root: ``G_0 = R_0``, ``P_0 = o_0``). At rest (all ``R = I``) every joint
frame is aligned with the file's world axes, for both formats:

* **BVH** (Biovision): parsed with the ``bvhio`` library (``bvhio.readAsBvh``: ``OFFSET``,
  ``CHANNELS`` in any order, Euler channels composed intrinsically in the listed order, e.g.
  ``Zrotation Yrotation Xrotation`` is ``Rz @ Ry @ Rx``; position channels replace the
  offset). ``End Site`` offsets become extra leaf joints named ``<joint>_end``.
* **ASF/AMC** (Acclaim, CMU mocap database; spec: "Acclaim ASF/AMC", CMU graphics lab
  ``asf-amc`` notes, as implemented e.g. by ``amc_parser``): bone ``b`` has a rest
  ``direction * length`` and an ``axis`` frame ``C_b`` (Euler angles in the given order);
  its AMC ``dof`` angles ``D_b(t)`` give the local rotation ``C_b D_b C_b^-1`` and the
  world rotation ``M_b = M_parent M_b^local`` (``= I`` at rest). A bone becomes a joint at
  its start (its parent's end); leaf bones get an ``<bone>_end`` joint. Units: ``:units
  length`` (CMU: 0.45, i.e. one file unit is 1/0.45 inch); ``angle deg|rad``.

:func:`retarget_to_smpl` maps a :class:`SkeletonMotion` onto SMPL's 24 joints through a
joint map (presets :data:`JOINT_MAP_PRESETS`, or a user YAML/JSON map), aligning the
source's rest pose (T or A) with SMPL's so that bone **directions** agree, and scaling the
root translation by the ratio of the SMPL and source leg lengths. :func:`write_smpl_bvh`
writes an SMPL pose stream as a BVH of the SMPL skeleton.

Torch-free (NumPy, SciPy ``Rotation``; ``bvhio`` for BVH parsing).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from fmgs.errors import FmgsInputError

__all__ = [
    "SMPL_JOINT_NAMES",
    "SMPL_PARENTS",
    "JOINT_MAP_PRESETS",
    "SkeletonMotion",
    "read_bvh",
    "read_asf_amc",
    "find_asf",
    "forward_kinematics",
    "load_joint_map",
    "choose_joint_map",
    "retarget_to_smpl",
    "RetargetResult",
    "write_smpl_bvh",
    "smpl_fk_positions",
    "bone_direction_errors",
    "SMPL_BONES",
    "LIMBS",
]

SMPL_JOINT_NAMES: list[str] = [
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee",
    "spine2", "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot",
    "neck", "left_collar", "right_collar", "head", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hand", "right_hand",
]

#: SMPL's kinematic tree (``kintree_table[0]`` of every SMPL model file).
SMPL_PARENTS = np.array([-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21])

#: Shipped joint maps, SMPL joint -> source joint. Unlisted SMPL joints stay at rest.
#: ``cmu_bvh``: the CMU mocap BVH naming (CMU / fairmotion conversions of the ASF/AMC files);
#: ``cmu_asf``: CMU ASF bone names (a bone drives the joint at its start);
#: ``mixamo``: Mixamo / Rokoko / MotionBuilder-style ``Hips/Spine/LeftArm/...`` (any
#: ``namespace:`` prefix, e.g. ``mixamorig:``, is ignored); ``smpl``: SMPL's own names
#: (BVH files written by :func:`write_smpl_bvh`). CMU hand joints are left unmapped: the
#: CMU wrist/hand bones are a few centimetres long and carry little signal.
JOINT_MAP_PRESETS: dict[str, dict[str, str]] = {
    "cmu_bvh": {
        "pelvis": "Hips", "left_hip": "LeftUpLeg", "right_hip": "RightUpLeg", "spine1": "LowerBack",
        "left_knee": "LeftLeg", "right_knee": "RightLeg", "spine2": "Spine", "left_ankle": "LeftFoot",
        "right_ankle": "RightFoot", "spine3": "Spine1", "left_foot": "LeftToeBase",
        "right_foot": "RightToeBase", "neck": "Neck", "left_collar": "LeftShoulder",
        "right_collar": "RightShoulder", "head": "Head", "left_shoulder": "LeftArm",
        "right_shoulder": "RightArm", "left_elbow": "LeftForeArm", "right_elbow": "RightForeArm",
        "left_wrist": "LeftHand", "right_wrist": "RightHand",
    },
    "cmu_asf": {
        "pelvis": "root", "left_hip": "lfemur", "right_hip": "rfemur", "spine1": "lowerback",
        "left_knee": "ltibia", "right_knee": "rtibia", "spine2": "upperback", "left_ankle": "lfoot",
        "right_ankle": "rfoot", "spine3": "thorax", "left_foot": "ltoes", "right_foot": "rtoes",
        "neck": "lowerneck", "left_collar": "lclavicle", "right_collar": "rclavicle", "head": "head",
        "left_shoulder": "lhumerus", "right_shoulder": "rhumerus", "left_elbow": "lradius",
        "right_elbow": "rradius", "left_wrist": "lwrist", "right_wrist": "rwrist",
    },
    "mixamo": {
        "pelvis": "Hips", "left_hip": "LeftUpLeg", "right_hip": "RightUpLeg", "spine1": "Spine",
        "left_knee": "LeftLeg", "right_knee": "RightLeg", "spine2": "Spine1", "left_ankle": "LeftFoot",
        "right_ankle": "RightFoot", "spine3": "Spine2", "left_foot": "LeftToeBase",
        "right_foot": "RightToeBase", "neck": "Neck", "left_collar": "LeftShoulder",
        "right_collar": "RightShoulder", "head": "Head", "left_shoulder": "LeftArm",
        "right_shoulder": "RightArm", "left_elbow": "LeftForeArm", "right_elbow": "RightForeArm",
        "left_wrist": "LeftHand", "right_wrist": "RightHand",
    },
    "smpl": {n: n for n in SMPL_JOINT_NAMES},
}

#: SMPL bones (joint, child) whose directions the fidelity check compares, grouped by limb.
LIMBS: dict[str, list[tuple[int, int]]] = {
    "left_leg": [(1, 4), (4, 7), (7, 10)],
    "right_leg": [(2, 5), (5, 8), (8, 11)],
    "spine_head": [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15)],
    "left_arm": [(13, 16), (16, 18), (18, 20)],
    "right_arm": [(14, 17), (17, 19), (19, 21)],
    "hips_shoulders": [(0, 1), (0, 2), (9, 13), (9, 14)],
}
SMPL_BONES: list[tuple[int, int]] = [b for v in LIMBS.values() for b in v]

# sanity bounds for a skeleton file
_MAX_JOINTS = 1000
_MAX_FRAMES = 10_000_000


# --------------------------------------------------------------------------- data
@dataclass
class SkeletonMotion:
    """A skeleton and its motion, as read from a BVH or ASF/AMC file.

    Attributes:
        names: (J,) joint names (file spelling), parents before children.
        parents: (J,) int64 parent index, -1 for the root.
        local_rot: (T, J, 3, 3) float64 local rotation of each joint (parent frame).
        local_pos: (T, J, 3) float64 joint offset from its parent in the parent's frame,
            file units (root: world position).
        fps: frames per second, or None when the file stores none (AMC).
        source: the file(s) read.
        kind: ``"bvh"`` or ``"asf_amc"``.
        units_note: what the file says about its length unit ("" if nothing).
    """

    names: list[str]
    parents: np.ndarray
    local_rot: np.ndarray
    local_pos: np.ndarray
    fps: float | None
    source: str
    kind: str
    units_note: str = ""

    @property
    def num_frames(self) -> int:
        return int(self.local_rot.shape[0])

    @property
    def rest_offsets(self) -> np.ndarray:
        """(J, 3) rest offsets from the parent, file units (first frame's, root: 0)."""
        o = self.local_pos[0].copy()
        o[0] = 0.0
        return o


def forward_kinematics(sm: SkeletonMotion, frames: np.ndarray | slice | None = None) -> tuple[np.ndarray, np.ndarray]:
    """World rotations and positions of every joint.

    Args:
        sm: the skeleton motion.
        frames: which frames (default all).

    Returns:
        G: (T', J, 3, 3) float64 world rotations (identity at rest).
        P: (T', J, 3) float64 world positions, file units and axes.
    """
    sel = slice(None) if frames is None else frames
    R = sm.local_rot[sel]
    O = sm.local_pos[sel]
    t, j = R.shape[:2]
    G = np.empty((t, j, 3, 3))
    P = np.empty((t, j, 3))
    for k, p in enumerate(sm.parents):
        if p < 0:
            G[:, k] = R[:, k]
            P[:, k] = O[:, k]
        else:
            G[:, k] = G[:, p] @ R[:, k]
            P[:, k] = P[:, p] + np.einsum("tij,tj->ti", G[:, p], O[:, k])
    return G, P


def rest_positions(sm: SkeletonMotion) -> np.ndarray:
    """(J, 3) joint positions of the rest pose (all rotations identity, root at the origin)."""
    P = np.zeros((len(sm.names), 3))
    off = sm.rest_offsets
    for k, p in enumerate(sm.parents):
        if p >= 0:
            P[k] = P[p] + off[k]
    return P


# --------------------------------------------------------------------------- BVH
def _bvh_precheck(path: str) -> None:
    """Reject files that would make the BVH parser read past the end (it loops forever
    on a truncated MOTION section) or that are not BVH at all, with a clear message."""
    try:
        # the same text decoding and line splitting (\n, \r, \r\n) as bvhio's readline()
        with open(path, "r") as f:
            lines = list(f)
    except UnicodeDecodeError as exc:
        raise FmgsInputError(f"not a text BVH file ({exc.reason} at byte {exc.start})", path) from exc
    except OSError as exc:
        raise FmgsInputError(f"cannot read BVH file: {exc}", path) from exc
    toks = [ln.split() for ln in lines]
    toks = [t for t in toks if t]
    if not toks or toks[0] != ["HIERARCHY"]:
        raise FmgsInputError("not a BVH file: the first line must be 'HIERARCHY'", path)
    try:
        m = next(i for i, t in enumerate(toks) if t == ["MOTION"])
    except StopIteration:
        raise FmgsInputError("BVH file has no MOTION section", path) from None
    if m + 2 >= len(toks) or toks[m + 1][0] != "Frames:" or len(toks[m + 1]) != 2 or toks[m + 2][:2] != ["Frame", "Time:"]:
        raise FmgsInputError("BVH MOTION section must start with 'Frames: N' and 'Frame Time: DT'", path)
    try:
        n = int(toks[m + 1][1])
    except ValueError:
        raise FmgsInputError(f"BVH 'Frames:' is not an integer ({toks[m + 1][1]!r})", path) from None
    if n < 1:
        raise FmgsInputError(f"BVH file holds {n} frames", path)
    if n > _MAX_FRAMES:
        raise FmgsInputError(f"BVH 'Frames: {n}' exceeds {_MAX_FRAMES}", path)
    have = len(toks) - (m + 3)
    if have < n:
        raise FmgsInputError(f"BVH file is truncated: 'Frames: {n}' but {have} frame lines", path)
    n_joint = sum(1 for t in toks[:m] if t[0] in ("ROOT", "JOINT"))
    if n_joint > _MAX_JOINTS:
        raise FmgsInputError(f"BVH hierarchy has {n_joint} joints (more than {_MAX_JOINTS})", path)
    n_ch = 0
    for t in toks[:m]:
        if t[0] == "CHANNELS" and len(t) >= 2:
            try:
                n_ch += int(t[1])
            except ValueError:
                raise FmgsInputError(f"BVH CHANNELS count {t[1]!r} is not an integer", path) from None
    bad = next((i for i in range(m + 3, m + 3 + n) if len(toks[i]) != n_ch), None)
    if bad is not None:
        raise FmgsInputError(f"BVH frame {bad - m - 3} has {len(toks[bad])} values; the hierarchy declares "
                             f"{n_ch} channels", path)


def read_bvh(path: str | os.PathLike) -> SkeletonMotion:
    """Read a BVH file (any joint names, channel order, units and up axis).

    Parsing and Euler -> quaternion conversion by ``bvhio.readAsBvh`` (channels composed
    intrinsically in the file's order). The frame rate is ``1 / Frame Time``.

    Args:
        path: the ``.bvh`` file.

    Returns:
        A :class:`SkeletonMotion` (``kind = "bvh"``, file units and axes).

    Raises:
        FmgsInputError: not a BVH file, truncated, inconsistent channel counts,
            non-finite values or frame time; the message names the file.
    """
    spath = os.fspath(path)
    _bvh_precheck(spath)
    import warnings

    with warnings.catch_warnings():  # PyGLM (under bvhio) warns about its own import path
        warnings.simplefilter("ignore")
        import bvhio

    try:
        bvh = bvhio.readAsBvh(spath)
        layout = bvh.Root.layout()
    except FmgsInputError:
        raise
    except Exception as exc:  # a third-party parser on untrusted input: any failure is bad input
        raise FmgsInputError(f"cannot parse BVH file: {type(exc).__name__}: {exc}", spath) from exc
    frame_time = float(bvh.FrameTime)
    if not (math.isfinite(frame_time) and frame_time > 0):
        raise FmgsInputError(f"BVH 'Frame Time: {bvh.FrameTime}' is not a positive number", spath)
    names, parents, quats, pos = [], [], [], []
    index = {}
    for k, (joint, _, _) in enumerate(layout):
        index[id(joint)] = k
    parent_of = {}
    for joint, _, _ in layout:
        for c in joint.Children:
            parent_of[id(c)] = index[id(joint)]
    t = int(bvh.FrameCount)
    for joint, _, _ in layout:
        names.append(str(joint.Name))
        parents.append(parent_of.get(id(joint), -1))
        keys = joint.Keyframes
        if len(keys) != t:
            raise FmgsInputError(f"BVH joint {joint.Name!r} has {len(keys)} keyframes, expected {t}", spath)
        quats.append([(k.Rotation.x, k.Rotation.y, k.Rotation.z, k.Rotation.w) for k in keys])
        pos.append([(k.Position.x, k.Position.y, k.Position.z) for k in keys])
    q = np.asarray(quats, dtype=np.float64).transpose(1, 0, 2)  # (T, J, 4) xyzw
    p = np.asarray(pos, dtype=np.float64).transpose(1, 0, 2)
    # leaf joints: add their End Site as a joint so every bone has a direction
    ends = []
    for joint, _, _ in layout:
        if not joint.Children:
            ends.append((index[id(joint)], str(joint.Name) + "_end",
                         (joint.EndSite.x, joint.EndSite.y, joint.EndSite.z)))
    for parent, name, off in ends:
        names.append(name)
        parents.append(parent)
    if ends:
        q = np.concatenate([q, np.tile([0.0, 0.0, 0.0, 1.0], (t, len(ends), 1))], axis=1)
        p = np.concatenate([p, np.broadcast_to(np.array([e[2] for e in ends], np.float64), (t, len(ends), 3))], axis=1)
    if not (np.isfinite(q).all() and np.isfinite(p).all()):
        raise FmgsInputError("BVH file holds non-finite (NaN/inf) values", spath)
    nq = np.linalg.norm(q, axis=-1, keepdims=True)
    rot = Rotation.from_quat((q / nq).reshape(-1, 4)).as_matrix().reshape(t, len(names), 3, 3)
    return SkeletonMotion(names=names, parents=np.asarray(parents, np.int64), local_rot=rot,
                          local_pos=np.ascontiguousarray(p), fps=1.0 / frame_time, source=spath, kind="bvh")


# --------------------------------------------------------------------------- ASF / AMC
def find_asf(amc_path: str | os.PathLike) -> Path:
    """The ASF skeleton of an AMC file: ``<stem>.asf``, else ``<subject>.asf`` for CMU
    names ``<subject>_<trial>.amc``, else the only ``.asf`` in the folder.

    Raises:
        FmgsInputError: none (or several candidates) found.
    """
    p = Path(amc_path)
    cands = [p.with_suffix(".asf"), p.with_suffix(".ASF")]
    if "_" in p.stem:
        sub = p.stem.split("_")[0]
        cands += [p.with_name(sub + ".asf"), p.with_name(sub + ".ASF")]
    for c in cands:
        if c.is_file():
            return c
    others = sorted(x for x in p.parent.glob("*") if x.suffix.lower() == ".asf")
    if len(others) == 1:
        return others[0]
    raise FmgsInputError(
        f"no ASF skeleton found for this AMC motion (looked for {', '.join(c.name for c in cands[::2])}"
        f"{'; several .asf files in the folder' if others else ''})", p)


def _euler(order: str, angles: np.ndarray, degrees: bool) -> np.ndarray:
    """Acclaim Euler rotation: axes applied in the listed order about fixed axes, i.e.
    ``XYZ`` is ``Rz @ Ry @ Rx`` (SciPy extrinsic ``'xyz'``). angles (..., n) -> (..., 3, 3)."""
    a = np.asarray(angles, dtype=np.float64)
    if not order:
        return np.broadcast_to(np.eye(3), a.shape[:-1] + (3, 3)).copy()
    shp = a.shape[:-1]
    return Rotation.from_euler(order.lower(), a.reshape(-1, len(order)), degrees=degrees).as_matrix().reshape(shp + (3, 3))


def _read_text(path: str, what: str) -> list[list[str]]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise FmgsInputError(f"cannot read {what} file: {exc}", path) from exc
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = data.decode("latin1")
    out = []
    for ln in text.splitlines():
        ln = ln.split("#", 1)[0].strip()
        if ln:
            out.append(ln.split())
    return out


def _floats(tok: list[str], path: str, what: str) -> np.ndarray:
    try:
        v = np.array([float(x) for x in tok], dtype=np.float64)
    except ValueError:
        raise FmgsInputError(f"{what}: expected numbers, got {' '.join(tok)!r}", path) from None
    if not np.isfinite(v).all():
        raise FmgsInputError(f"{what}: non-finite value in {' '.join(tok)!r}", path)
    return v


def _parse_asf(path: str) -> dict[str, Any]:
    lines = _read_text(path, "ASF")
    if not lines:
        raise FmgsInputError("ASF file is empty", path)
    length_unit, degrees = 1.0, True
    root = {"order": ["TX", "TY", "TZ", "RX", "RY", "RZ"], "axis": "XYZ", "position": np.zeros(3),
            "orientation": np.zeros(3)}
    bones: dict[str, dict[str, Any]] = {}
    children: dict[str, list[str]] = {}
    section = None
    cur: dict[str, Any] | None = None
    i = 0
    while i < len(lines):
        t = lines[i]
        i += 1
        if t[0].startswith(":"):
            section = t[0][1:].lower()
            continue
        if section == "units" and len(t) >= 2:
            if t[0] == "length":
                length_unit = float(_floats(t[1:2], path, "':units length'")[0])
            elif t[0] == "angle":
                degrees = t[1].lower().startswith("deg")
        elif section == "root":
            key = t[0].lower()
            if key == "order":
                root["order"] = [x.upper() for x in t[1:]]
            elif key == "axis" and len(t) >= 2:
                root["axis"] = t[1].upper()
            elif key in ("position", "orientation"):
                v = _floats(t[1:4], path, f"':root {key}'")
                if v.size != 3:
                    raise FmgsInputError(f"':root {key}' needs 3 numbers", path)
                root[key] = v
        elif section == "bonedata":
            if t[0] == "begin":
                cur = {"dof": [], "axis": np.zeros(3), "axis_order": "XYZ", "direction": None, "length": None}
            elif t[0] == "end":
                if cur is None or "name" not in cur:
                    raise FmgsInputError("ASF bone without a name", path)
                if cur["direction"] is None or cur["length"] is None:
                    raise FmgsInputError(f"ASF bone {cur['name']!r} lacks direction or length", path)
                bones[cur["name"]] = cur
                cur = None
            elif cur is not None:
                key = t[0].lower()
                if key == "name" and len(t) >= 2:
                    cur["name"] = t[1]
                elif key == "direction":
                    v = _floats(t[1:4], path, f"ASF bone {cur.get('name')!r} direction")
                    if v.size != 3:
                        raise FmgsInputError(f"ASF bone {cur.get('name')!r}: direction needs 3 numbers", path)
                    cur["direction"] = v
                elif key == "length":
                    cur["length"] = float(_floats(t[1:2], path, f"ASF bone {cur.get('name')!r} length")[0])
                elif key == "axis":
                    cur["axis"] = _floats(t[1:4], path, f"ASF bone {cur.get('name')!r} axis")
                    cur["axis_order"] = t[4].upper() if len(t) > 4 else "XYZ"
                    if cur["axis"].size != 3:
                        raise FmgsInputError(f"ASF bone {cur.get('name')!r}: axis needs 3 angles", path)
                elif key == "dof":
                    cur["dof"] = [x.lower() for x in t[1:]]
        elif section == "hierarchy":
            if t[0] in ("begin", "end"):
                continue
            children.setdefault(t[0], []).extend(t[1:])
    if not bones:
        raise FmgsInputError("ASF file defines no bones (:bonedata)", path)
    for o in (root["axis"],):
        if len(o) != 3 or set(o) != {"X", "Y", "Z"}:
            raise FmgsInputError(f"ASF root axis {o!r} is not a permutation of XYZ", path)
    for b in bones.values():
        if len(b["axis_order"]) != 3 or set(b["axis_order"]) != {"X", "Y", "Z"}:
            raise FmgsInputError(f"ASF bone {b['name']!r}: axis order {b['axis_order']!r} is not a permutation "
                                 "of XYZ", path)
        bad = [d for d in b["dof"] if d not in ("rx", "ry", "rz", "tx", "ty", "tz", "l")]
        if bad:
            raise FmgsInputError(f"ASF bone {b['name']!r}: unknown dof {bad[0]!r}", path)
    return {"unit": length_unit, "degrees": degrees, "root": root, "bones": bones, "children": children}


def _parse_amc(path: str, channels: dict[str, int]) -> tuple[dict[str, np.ndarray], int]:
    """AMC frames: ``{bone: (T, n_values)}``; bones missing in a frame keep 0."""
    lines = _read_text(path, "AMC")
    frames: list[dict[str, list[str]]] = []
    for t in lines:
        if t[0].startswith(":"):
            continue
        if len(t) == 1 and t[0].isdigit():
            frames.append({})
            continue
        if not frames:
            raise FmgsInputError(f"AMC data before the first frame number: {' '.join(t)[:60]!r}", path)
        if t[0] not in channels:
            raise FmgsInputError(f"AMC frame {len(frames)}: bone {t[0]!r} is not in the ASF skeleton", path)
        frames[-1][t[0]] = t[1:]
        if len(frames) > _MAX_FRAMES:
            raise FmgsInputError(f"AMC file has more than {_MAX_FRAMES} frames", path)
    if not frames:
        raise FmgsInputError("AMC file holds no frames", path)
    out = {b: np.zeros((len(frames), n)) for b, n in channels.items()}
    for f, fr in enumerate(frames):
        for b, tok in fr.items():
            if len(tok) != channels[b]:
                raise FmgsInputError(f"AMC frame {f + 1}: bone {b!r} has {len(tok)} values, the ASF declares "
                                     f"{channels[b]}", path)
            out[b][f] = _floats(tok, path, f"AMC frame {f + 1} bone {b!r}")
    return out, len(frames)


def read_asf_amc(amc_path: str | os.PathLike, asf_path: str | os.PathLike | None = None) -> SkeletonMotion:
    """Read an Acclaim ASF skeleton and AMC motion (CMU mocap database format).

    Args:
        amc_path: the ``.amc`` motion.
        asf_path: its ``.asf`` skeleton (default :func:`find_asf`).

    Returns:
        A :class:`SkeletonMotion` (``kind = "asf_amc"``, ``fps`` None: AMC stores none;
        ASF length units and axes).

    Raises:
        FmgsInputError: missing skeleton, malformed ASF/AMC, bones or value counts that do
            not match, non-finite values; the message names the file.
    """
    amc = os.fspath(amc_path)
    asf = os.fspath(asf_path) if asf_path is not None else str(find_asf(amc))
    sk = _parse_asf(asf)
    bones, children, root = sk["bones"], sk["children"], sk["root"]
    deg = sk["degrees"]
    # order: breadth-first from root over the hierarchy
    order, parent_of = ["root"], {"root": None}
    queue = ["root"]
    while queue:
        b = queue.pop(0)
        for c in children.get(b, []):
            if c not in bones:
                raise FmgsInputError(f"ASF hierarchy names an unknown bone {c!r}", asf)
            if c in parent_of:
                raise FmgsInputError(f"ASF hierarchy lists bone {c!r} twice (a cycle or two parents)", asf)
            parent_of[c] = b
            order.append(c)
            queue.append(c)
    channels = {"root": len(root["order"])}
    channels.update({b: len(bones[b]["dof"]) for b in order[1:]})
    for b in bones:
        channels.setdefault(b, len(bones[b]["dof"]))
    data, t = _parse_amc(amc, channels)

    names, parents = list(order), []
    idx = {b: k for k, b in enumerate(order)}
    j = len(order)
    rot = np.zeros((t, j, 3, 3))
    pos = np.zeros((t, j, 3))
    # root: translation and rotation channels in the declared order, about the root axis frame
    rv = data["root"]
    tr = np.zeros((t, 3))
    r_ord, r_ang = "", []
    for k, ch in enumerate(root["order"]):
        if ch in ("TX", "TY", "TZ"):
            tr[:, "XYZ".index(ch[1])] = rv[:, k]
        elif ch in ("RX", "RY", "RZ"):
            r_ord += ch[1]
            r_ang.append(rv[:, k])
        else:
            raise FmgsInputError(f"ASF root order has an unknown channel {ch!r}", asf)
    c_root = _euler(root["axis"], root["orientation"][None], deg)[0]
    d_root = _euler(r_ord, np.stack(r_ang, -1) if r_ang else np.zeros((t, 0)), deg)
    rot[:, 0] = c_root @ d_root @ c_root.T
    pos[:, 0] = root["position"] + tr
    parents.append(-1)
    for b in order[1:]:
        info = bones[b]
        p = parent_of[b]
        parents.append(idx[p])
        c = _euler(info["axis_order"], info["axis"][None], deg)[0]
        dof = info["dof"]
        vals = data[b]
        r_ord = "".join(d[1].upper() for d in dof if d in ("rx", "ry", "rz"))
        ang = np.stack([vals[:, k] for k, d in enumerate(dof) if d in ("rx", "ry", "rz")], -1) if r_ord else \
            np.zeros((t, 0))
        rot[:, idx[b]] = c @ _euler(r_ord, ang, deg) @ c.T
        # the bone starts where its parent ends
        if p != "root":
            pv = bones[p]["direction"] / max(np.linalg.norm(bones[p]["direction"]), 1e-12) * bones[p]["length"]
            pos[:, idx[b]] = pv
    # leaf bones: an end joint
    extra_rot, extra_pos = [], []
    for b in order[1:]:
        if not children.get(b):
            names.append(b + "_end")
            parents.append(idx[b])
            v = bones[b]["direction"] / max(np.linalg.norm(bones[b]["direction"]), 1e-12) * bones[b]["length"]
            extra_rot.append(np.broadcast_to(np.eye(3), (t, 3, 3)))
            extra_pos.append(np.broadcast_to(v, (t, 3)))
    if extra_rot:
        rot = np.concatenate([rot, np.stack(extra_rot, 1)], 1)
        pos = np.concatenate([pos, np.stack(extra_pos, 1)], 1)
    note = f"ASF ':units length {sk['unit']:g}'" + (" (CMU: 1 unit = 1/0.45 inch)" if abs(sk["unit"] - 0.45) < 1e-9 else "")
    return SkeletonMotion(names=names, parents=np.asarray(parents, np.int64), local_rot=rot, local_pos=pos,
                          fps=None, source=amc, kind="asf_amc", units_note=note)


# --------------------------------------------------------------------------- joint maps
def _norm_name(n: str) -> str:
    return n.rsplit(":", 1)[-1].strip().lower()


def load_joint_map(path: str | os.PathLike) -> dict[str, str]:
    """Read a user joint map: YAML or JSON ``{smpl_joint: source_joint}``.

    Keys are SMPL joint names (:data:`SMPL_JOINT_NAMES`); values the source's joint names.

    Raises:
        FmgsInputError: unreadable file, not a mapping of strings, unknown SMPL joint.
    """
    p = os.fspath(path)
    try:
        text = Path(p).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise FmgsInputError(f"cannot read joint map: {exc}", p) from exc
    try:
        if p.lower().endswith(".json"):
            obj = json.loads(text)
        else:
            import yaml

            obj = yaml.safe_load(text)
    except Exception as exc:  # yaml / json syntax errors of various types
        raise FmgsInputError(f"joint map is not valid {'JSON' if p.lower().endswith('.json') else 'YAML'}: {exc}",
                             p) from exc
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
        raise FmgsInputError("joint map must be a mapping {smpl_joint_name: source_joint_name} of strings", p)
    bad = sorted(set(obj) - set(SMPL_JOINT_NAMES))
    if bad:
        raise FmgsInputError(f"joint map has unknown SMPL joints {bad}; SMPL joints are {', '.join(SMPL_JOINT_NAMES)}", p)
    return dict(obj)


def choose_joint_map(names: list[str]) -> tuple[str, dict[str, str]]:
    """The preset of :data:`JOINT_MAP_PRESETS` that matches most of ``names``
    (case-insensitive, ``namespace:`` prefixes ignored). Returns (preset name, map)."""
    have = {_norm_name(n) for n in names}
    best = max(JOINT_MAP_PRESETS, key=lambda k: sum(_norm_name(v) in have for v in JOINT_MAP_PRESETS[k].values()))
    return best, JOINT_MAP_PRESETS[best]


# --------------------------------------------------------------------------- retargeting
def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(n > 0, n, 1.0)


def _rot_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest rotation taking unit vectors a to b: (..., 3) x (..., 3) -> (..., 3, 3).
    Antiparallel pairs turn by pi about an axis perpendicular to a."""
    a, b = np.broadcast_arrays(_unit(a), _unit(b))
    cr = np.cross(a, b)
    s = np.linalg.norm(cr, axis=-1)
    c = np.sum(a * b, axis=-1)
    ang = np.arctan2(s, c)
    axis = cr / np.where(s > 1e-12, s, 1.0)[..., None]
    anti = (s <= 1e-12) & (c < 0)
    if anti.any():
        alt = np.cross(a[anti], np.array([1.0, 0.0, 0.0]))
        weak = np.linalg.norm(alt, axis=-1) < 1e-6
        alt[weak] = np.cross(a[anti][weak], np.array([0.0, 1.0, 0.0]))
        axis[anti] = _unit(alt)
    rv = axis * ang[..., None]
    return Rotation.from_rotvec(rv.reshape(-1, 3)).as_matrix().reshape(a.shape[:-1] + (3, 3))


def _snap(v: np.ndarray) -> np.ndarray:
    k = int(np.argmax(np.abs(v)))
    out = np.zeros(3)
    out[k] = np.sign(v[k])
    return out


_AXIS_NAMES = {(1, 0, 0): "+x", (-1, 0, 0): "-x", (0, 1, 0): "+y", (0, -1, 0): "-y", (0, 0, 1): "+z", (0, 0, -1): "-z"}


def _axis_name(v: np.ndarray) -> str:
    return _AXIS_NAMES[tuple(int(x) for x in v)]


def _axis_vec(name: str, path: str | None = None) -> np.ndarray:
    key = name.strip().lower()
    key = "+" + key if key in ("x", "y", "z") else key
    for k, n in _AXIS_NAMES.items():
        if n == key:
            return np.array(k, dtype=np.float64)
    raise FmgsInputError(f"unknown up axis {name!r}: expected one of +x -x +y -y +z -z or auto", path)


_UNITS = (("m", 1.0), ("cm", 100.0), ("mm", 1000.0), ("inch", 39.3701), ("CMU ASF unit (1/0.45 inch)", 39.3701 * 0.45),
          ("dm", 10.0))
#: Length units accepted by ``units=``: file units per metre.
UNITS_PER_M = {"m": 1.0, "cm": 100.0, "mm": 1000.0, "in": 39.3701, "inch": 39.3701, "cmu": 39.3701 * 0.45}


def _units_per_m(units: str | float, path: str | None) -> float:
    if isinstance(units, (int, float)):
        v = float(units)
    else:
        key = str(units).strip().lower()
        if key in UNITS_PER_M:
            v = UNITS_PER_M[key]
        else:
            try:
                v = float(key)
            except ValueError:
                raise FmgsInputError(f"unknown length unit {units!r}: expected one of {', '.join(UNITS_PER_M)} or "
                                     "a number of file units per metre", path) from None
    if not (math.isfinite(v) and v > 0):
        raise FmgsInputError(f"length unit must be a positive number of file units per metre, got {units!r}", path)
    return v


@dataclass
class RetargetResult:
    """What :func:`retarget_to_smpl` produced and guessed.

    Attributes:
        poses: (T, 24, 3) float64 SMPL axis-angle (SMPL's Y-up body axes: the source's
            world turned so that its up is +Y and its rest pose faces +Z).
        trans: (T, 3) float64 SMPL ``transl``, metres (pelvis at ``rest_joints[0] + trans``).
        joint_map: {smpl joint: source joint} used.
        preset: preset name, or ``"user"``.
        up: the source's up axis, forward axis (``"+z"`` etc.).
        axes_from_source: (3, 3) rotation from the source's world to SMPL's axes.
        scale: metres of SMPL per source unit (leg-length ratio).
        units: the guessed source length unit.
        notes: human-readable lines (map, guesses) to print.
    """

    poses: np.ndarray
    trans: np.ndarray
    joint_map: dict[str, str]
    preset: str
    up: str
    forward: str
    axes_from_source: np.ndarray
    scale: float
    units: str
    notes: list[str] = field(default_factory=list)


def _leg_length(P: np.ndarray, idx: dict[int, int], hip: int, knee: int, ankle: int) -> float | None:
    if not all(k in idx for k in (hip, knee, ankle)):
        return None
    a, b, c = P[idx[hip]], P[idx[knee]], P[idx[ankle]]
    return float(np.linalg.norm(b - a) + np.linalg.norm(c - b))


def retarget_to_smpl(sm: SkeletonMotion, rest_joints: np.ndarray, joint_map: dict[str, str] | None = None,
                     up: str | None = None, preset_name: str | None = None,
                     units: str | float | None = None) -> RetargetResult:
    """Retarget a skeleton motion to SMPL's 24 joints.

    Steps (source = the file's skeleton, in file units and axes):

    1. **Axes.** The source's up is the snapped direction pelvis -> head (or neck / spine) of
       its rest pose, its left the snapped right -> left hip (or shoulder) direction, forward
       = left x up; the rotation ``A`` with rows (left, up, forward) takes the source world
       to SMPL's body axes (x left, y up, z forward). ``up=`` overrides the up axis.
    2. **Rest alignment.** For an SMPL joint ``k`` mapped to source joint ``j`` whose bone
       leads to one mapped child ``c`` (followed down the chain until the source bone has
       length), the constant ``B_k`` is the smallest rotation taking SMPL's rest bone
       direction ``J_c - J_k`` to the source's rest direction ``P_map(c) - P_j``; so at the
       source's rest pose (T or A) the SMPL bones point where the source's do. Joints with
       several children (pelvis, spine3) or none keep the source joint's frame (``B = I``).
    3. **Per frame** ``G_k = S(t) A G_j(t) A^T B_k``, where ``G_j`` is the source joint's
       world rotation and ``S(t)`` the smallest rotation taking the resulting SMPL bone
       direction onto the source's current bone direction (identity when the source bone
       is the single segment ``j -> map(c)``; it corrects chains with intermediate
       joints). Unmapped SMPL joints keep their parent's frame (local rotation zero).
       SMPL local rotations ``R_k = G_parent^T G_k``, as axis-angle.
    4. **Translation.** ``s`` = SMPL leg length (hip -> knee -> ankle of ``rest_joints``)
       over the source's, averaged over both legs; ``trans = s A P_pelvis(t) - J_0``. The
       file's length unit is guessed from the leg length (an adult's is ~0.8 m) and
       reported; ``units=`` gives it instead. The leg ratio sets the scale whenever both
       legs are mapped (the feet then stay on the source's floor whatever the subject's
       size); without legs, ``s`` is ``1 / units`` (given) or assumes a 1.7 m tall source.

    Args:
        sm: the source motion.
        rest_joints: (24, 3) SMPL rest joints of the subject, metres.
        joint_map: {SMPL joint name: source joint name}; None picks the best preset
            (:func:`choose_joint_map`).
        up: the source's up axis (``+y``, ``-z``...), None/``auto`` to detect.
        preset_name: label of ``joint_map`` for the notes.
        units: the file's length unit (``m``, ``cm``, ``mm``, ``in``, ``cmu`` or file units
            per metre); None to guess.

    Returns:
        :class:`RetargetResult`.

    Raises:
        FmgsInputError: the map misses the pelvis or both legs, names joints the file
            lacks, or the axes cannot be told apart.
    """
    J = np.asarray(rest_joints, dtype=np.float64).reshape(24, 3)
    notes: list[str] = []
    if joint_map is None:
        preset_name, joint_map = choose_joint_map(sm.names)
    preset = preset_name or "user"
    lookup = {}
    for k, n in enumerate(sm.names):
        lookup.setdefault(n, k)
        lookup.setdefault(_norm_name(n), k)
    idx: dict[int, int] = {}
    missing = []
    for smpl_name, src in joint_map.items():
        if smpl_name not in SMPL_JOINT_NAMES:
            raise FmgsInputError(f"joint map: {smpl_name!r} is not an SMPL joint", sm.source)
        k = lookup.get(src, lookup.get(_norm_name(src)))
        if k is None:
            missing.append(src)
        else:
            idx[SMPL_JOINT_NAMES.index(smpl_name)] = k
    if 0 not in idx:
        raise FmgsInputError(f"joint map ({preset}) finds no pelvis joint {joint_map.get('pelvis')!r} in the "
                             f"skeleton (joints: {', '.join(sm.names[:40])}); pass a joint map", sm.source)
    if len(idx) < 6:
        raise FmgsInputError(f"joint map ({preset}) matches only {len(idx)} joints of the skeleton "
                             f"({', '.join(sm.names[:40])}); pass a joint map", sm.source)
    if missing:
        notes.append(f"joints of the map not in the file (left at rest): {', '.join(missing)}")
    notes.append(f"joint map ({preset}): " + ", ".join(f"{SMPL_JOINT_NAMES[k]}<-{sm.names[j]}"
                                                      for k, j in sorted(idx.items())))
    unmapped = [SMPL_JOINT_NAMES[k] for k in range(24) if k not in idx]
    if unmapped:
        notes.append(f"SMPL joints kept at rest: {', '.join(unmapped)}")

    Prest = rest_positions(sm)
    # 1. axes
    def first(*ks):
        return next((k for k in ks if k in idx), None)

    top = first(15, 12, 9, 6, 3)
    if top is None:
        raise FmgsInputError("joint map has no head/neck/spine joint: cannot tell the up axis", sm.source)
    if up is None or str(up).strip().lower() == "auto":
        upv = _snap(Prest[idx[top]] - Prest[idx[0]])
        up_how = "detected"
    else:
        upv = _axis_vec(up, sm.source)
        up_how = "given"
    lr = [(1, 2), (16, 17), (13, 14)]
    pair = next(((a, b) for a, b in lr if a in idx and b in idx), None)
    if pair is None:
        raise FmgsInputError("joint map has no left/right hip or shoulder pair: cannot tell left from right", sm.source)
    lv = Prest[idx[pair[0]]] - Prest[idx[pair[1]]]
    lv = lv - upv * np.dot(lv, upv)
    if np.linalg.norm(lv) < 1e-9:
        raise FmgsInputError("left and right joints coincide along the up axis: cannot tell the axes", sm.source)
    leftv = _snap(lv)
    if abs(np.dot(leftv, upv)) > 0.5:
        raise FmgsInputError("the rest pose's left-right and up directions coincide: cannot tell the axes",
                             sm.source)
    fwdv = np.cross(leftv, upv)
    A = np.stack([leftv, upv, fwdv])
    notes.append(f"source axes: up {_axis_name(upv)} ({up_how}), left {_axis_name(leftv)}, "
                 f"forward {_axis_name(fwdv)} (from the rest pose)")

    # 4 (scale) and units
    smpl_leg = np.mean([np.linalg.norm(J[4] - J[1]) + np.linalg.norm(J[7] - J[4]),
                        np.linalg.norm(J[5] - J[2]) + np.linalg.norm(J[8] - J[5])])
    legs = [v for v in (_leg_length(Prest, idx, 1, 4, 7), _leg_length(Prest, idx, 2, 5, 8)) if v]
    if legs and np.mean(legs) > 0:
        src_leg = float(np.mean(legs))
        scale = smpl_leg / src_leg
        if units is not None:
            per_m = _units_per_m(units, sm.source)
            unit = f"{units} (given)"
            extra = f"; the source's legs are {src_leg / per_m:.3f} m"
        else:
            per_m = src_leg / 0.8  # an adult's hip-to-ankle length is about 0.8 m
            unit = min(_UNITS, key=lambda u: abs(math.log(per_m / u[1])))[0]
            extra = ""
        notes.append(f"scale {scale:.5g} m per source unit (SMPL leg {smpl_leg:.3f} m / source leg {src_leg:.4g}); "
                     f"source units {'' if units is not None else 'look like '}{unit}{extra}"
                     f"{' -- ' + sm.units_note if sm.units_note else ''}")
    elif units is not None:
        scale = 1.0 / _units_per_m(units, sm.source)
        unit = f"{units} (given)"
        notes.append(f"no legs in the map: scale {scale:.5g} m per source unit from the given unit {units!r}")
    else:
        height = float(np.ptp(Prest @ upv))
        scale = 1.7 / height if height > 0 else 1.0
        unit = "unknown"
        notes.append(f"no legs in the map: scale {scale:.5g} from the rest height (assumed 1.7 m; pass units=)")

    # 2/3. rotations
    G, P = forward_kinematics(sm)
    T = G.shape[0]
    Gs = np.einsum("ab,tjbc,dc->tjad", A, G, A)  # A G A^T
    Ps = np.einsum("ab,tjb->tja", A, P)
    Prs = Prest @ A.T
    children = {k: [c for c in range(24) if SMPL_PARENTS[c] == k] for k in range(24)}

    def chain_target(k: int) -> int | None:
        """The mapped SMPL descendant along a single-child chain whose source bone has length."""
        c = children[k]
        while len(c) == 1:
            m = c[0]
            if m in idx and np.linalg.norm(Prs[idx[m]] - Prs[idx[k]]) > 1e-6 * max(1.0, float(np.abs(Prs).max())):
                return m
            if m in idx:  # zero-length source bone: keep walking
                c = children[m]
                continue
            return None
        return None

    Gk = np.zeros((T, 24, 3, 3))
    for k in range(24):
        if k not in idx:
            Gk[:, k] = Gk[:, SMPL_PARENTS[k]] if k > 0 else np.eye(3)
            continue
        j = idx[k]
        c = chain_target(k)
        if c is None:
            Gk[:, k] = Gs[:, j]
            continue
        d_smpl = J[c] - J[k]
        d_src = Prs[idx[c]] - Prs[j]
        B = _rot_between(d_smpl, d_src)
        g = Gs[:, j] @ B
        cur = np.einsum("tij,j->ti", g, _unit(d_smpl))
        tgt = Ps[:, idx[c]] - Ps[:, j]
        Gk[:, k] = _rot_between(cur, tgt) @ g
    local = np.empty_like(Gk)
    local[:, 0] = Gk[:, 0]
    for k in range(1, 24):
        local[:, k] = np.swapaxes(Gk[:, SMPL_PARENTS[k]], -1, -2) @ Gk[:, k]
    poses = Rotation.from_matrix(local.reshape(-1, 3, 3)).as_rotvec().reshape(T, 24, 3)
    trans = scale * Ps[:, idx[0]] - J[0]
    return RetargetResult(poses=poses, trans=trans, joint_map={SMPL_JOINT_NAMES[k]: sm.names[j] for k, j in idx.items()},
                          preset=preset, up=_axis_name(upv), forward=_axis_name(fwdv), axes_from_source=A,
                          scale=float(scale), units=unit, notes=notes)


# --------------------------------------------------------------------------- checks
def smpl_fk_positions(poses: np.ndarray, trans: np.ndarray, rest_joints: np.ndarray) -> np.ndarray:
    """SMPL joint positions (T, 24, 3), metres: FK of ``poses`` (T,24,3 axis-angle) on
    ``rest_joints`` (24,3), plus ``trans`` (smplx convention, as
    :func:`fmgs.body_model.forward_kinematics`, vectorised over frames)."""
    poses = np.asarray(poses, np.float64)
    T = poses.shape[0]
    R = Rotation.from_rotvec(poses.reshape(-1, 3)).as_matrix().reshape(T, 24, 3, 3)
    J = np.asarray(rest_joints, np.float64)
    G = np.empty_like(R)
    P = np.empty((T, 24, 3))
    for k, p in enumerate(SMPL_PARENTS):
        if p < 0:
            G[:, k] = R[:, k]
            P[:, k] = J[k]
        else:
            G[:, k] = G[:, p] @ R[:, k]
            P[:, k] = P[:, p] + np.einsum("tij,j->ti", G[:, p], J[k] - J[p])
    return P + np.asarray(trans, np.float64)[:, None, :]


def bone_direction_errors(smpl_pos: np.ndarray, src_pos: np.ndarray, joint_map_idx: dict[int, int],
                          src_rest: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Angle (deg) between each SMPL bone's world direction and the source's bone between the
    mapped joints, per limb of :data:`LIMBS`.

    A source bone of zero rest length (e.g. CMU's ``Hips -> LowerBack``) has no direction;
    the bone is then extended to the next mapped SMPL joint down the chain on both sides
    (pelvis -> spine2 instead of pelvis -> spine1).

    Args:
        smpl_pos: (T, 24, 3) SMPL joint positions (SMPL axes).
        src_pos: (T, J, 3) source joint positions, already in SMPL axes.
        joint_map_idx: {smpl joint index: source joint index}.
        src_rest: (J, 3) source rest positions (for the zero-length test; default frame 0).

    Returns:
        {limb: (T, n_bones) float64 degrees} for the bones whose both ends are mapped.
    """
    rest = src_pos[0] if src_rest is None else src_rest
    tol = 1e-6 * max(1.0, float(np.abs(rest).max()))
    out = {}
    for limb, bones in LIMBS.items():
        cols = []
        for a, b in bones:
            while b in joint_map_idx and np.linalg.norm(rest[joint_map_idx[b]] - rest[joint_map_idx[a]]) <= tol:
                kids = [c for c in range(24) if SMPL_PARENTS[c] == b]
                if len(kids) != 1:
                    break
                b = kids[0]
            if a not in joint_map_idx or b not in joint_map_idx:
                continue
            if np.linalg.norm(rest[joint_map_idx[b]] - rest[joint_map_idx[a]]) <= tol:
                continue
            u = _unit(smpl_pos[:, b] - smpl_pos[:, a])
            v = _unit(src_pos[:, joint_map_idx[b]] - src_pos[:, joint_map_idx[a]])
            cols.append(np.degrees(np.arctan2(np.linalg.norm(np.cross(u, v), axis=-1), np.sum(u * v, axis=-1))))
        if cols:
            out[limb] = np.stack(cols, 1)
    return out


# --------------------------------------------------------------------------- writer
def write_smpl_bvh(path: str | os.PathLike, poses: np.ndarray, trans: np.ndarray, rest_joints: np.ndarray,
                   fps: float, world_rotation: np.ndarray | None = None, scale: float = 1.0) -> None:
    """Write an SMPL pose stream as a BVH of the SMPL skeleton (written atomically).

    Joints carry SMPL's names and rest offsets ``J_k - J_parent`` (times ``scale``: 1 for
    metres, 100 for centimetres); the root has ``Xposition Yposition Zposition`` (the pelvis,
    ``world_rotation @ (J_0 + trans)``) and every joint ``Zrotation Yrotation Xrotation``
    (intrinsic ZYX Euler of the SMPL local rotation; the root's is ``world_rotation @ R_0``).
    SMPL's rest frames are aligned with its body axes, as BVH's, so the local rotations
    carry over unchanged. Leaves get an ``End Site`` 10 cm (scaled) along their parent bone.

    Args:
        path: output ``.bvh``.
        poses: (T, 24, 3) SMPL axis-angle, radians.
        trans: (T, 3) SMPL ``transl``, metres.
        rest_joints: (24, 3) SMPL rest joints, metres.
        fps: frames per second (> 0).
        world_rotation: (3, 3) rotation applied to the whole motion (e.g. a Motion's
            ``world_from_motion[:3, :3]`` to write Y-up); default identity.
        scale: length unit factor (metres -> file units).
    """
    from fmgs.atomic import atomic_path

    poses = np.asarray(poses, np.float64)
    T = poses.shape[0]
    W = np.eye(3) if world_rotation is None else np.asarray(world_rotation, np.float64)[:3, :3]
    J = np.asarray(rest_joints, np.float64)
    R = Rotation.from_rotvec(poses.reshape(-1, 3)).as_matrix().reshape(T, 24, 3, 3)
    R[:, 0] = W @ R[:, 0]
    root = (np.asarray(trans, np.float64) + J[0]) @ W.T * scale
    eul = Rotation.from_matrix(R.reshape(-1, 3, 3)).as_euler("ZYX", degrees=True).reshape(T, 24, 3)
    children = {k: [c for c in range(24) if SMPL_PARENTS[c] == k] for k in range(24)}
    lines = ["HIERARCHY"]

    def emit(k: int, depth: int) -> None:
        ind = "  " * depth
        off = (J[k] - J[SMPL_PARENTS[k]]) * scale if k > 0 else np.zeros(3)
        lines.append(f"{ind}{'ROOT' if k == 0 else 'JOINT'} {SMPL_JOINT_NAMES[k]}")
        lines.append(f"{ind}{{")
        lines.append(f"{ind}  OFFSET {off[0]:.9g} {off[1]:.9g} {off[2]:.9g}")
        ch = "CHANNELS 6 Xposition Yposition Zposition Zrotation Yrotation Xrotation" if k == 0 else \
            "CHANNELS 3 Zrotation Yrotation Xrotation"
        lines.append(f"{ind}  {ch}")
        for c in children[k]:
            emit(c, depth + 1)
        if not children[k]:
            e = (J[k] - J[SMPL_PARENTS[k]])
            e = 0.1 * scale * e / max(np.linalg.norm(e), 1e-9)
            lines.extend([f"{ind}  End Site", f"{ind}  {{", f"{ind}    OFFSET {e[0]:.9g} {e[1]:.9g} {e[2]:.9g}",
                          f"{ind}  }}"])
        lines.append(f"{ind}}}")

    emit(0, 0)
    order = []

    def pre(k: int) -> None:
        order.append(k)
        for c in children[k]:
            pre(c)

    pre(0)
    lines += ["MOTION", f"Frames: {T}", f"Frame Time: {1.0 / float(fps):.12g}"]
    for t in range(T):
        vals = list(root[t]) + [x for k in order for x in eul[t, k]]
        lines.append(" ".join(f"{v:.9g}" for v in vals))
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")

