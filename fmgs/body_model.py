"""SMPL body model in NumPy (float64): shaping, forward kinematics and LBS.

Implements the SMPL model of Loper et al., "SMPL: A Skinned Multi-Person
Linear Model" (SIGGRAPH Asia 2015), following the conventions of the reference
PyTorch implementation ``smplx`` (``smplx.lbs.lbs`` / ``batch_rigid_transform``):

* shaped template ``v_shaped = v_template + shapedirs @ betas``;
* rest joints ``J = J_regressor @ v_shaped``;
* pose blendshapes ``v_posed = v_shaped + posedirs @ vec(R_1..R_23 - I)``;
* relative bone transforms ``G_b`` (the global transform of bone ``b`` with its
  rest joint subtracted) and linear blend skinning
  ``x_posed = sum_b w_b G_b x_rest``.

Units are metres; the SMPL body frame is y up, z forward (towards the
viewer of a front-facing body), x to the body's own left. Everything here is
torch-free (see ``tests/test_no_torch.py``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from fmgs.errors import FmgsInputError
from fmgs.pickle_io import load_pickle, to_numpy_tree

__all__ = [
    "JOINT_NAMES",
    "PARTS",
    "NUM_JOINTS",
    "SMPLModel",
    "load_smpl",
    "axis_angle_to_matrix",
    "matrix_to_axis_angle",
    "forward_kinematics",
    "blend_transforms",
    "lbs_points",
    "star_pose",
    "fit_betas_from_joints",
    "world_from_body",
]

#: Number of SMPL joints (root included).
NUM_JOINTS = 24

#: The 24 SMPL joint names in SMPL's joint order (left/right are the subject's own sides).
JOINT_NAMES: list[str] = [
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee",
    "spine2", "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot",
    "neck", "left_collar", "right_collar", "head", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hand", "right_hand",
]

#: Alias of :data:`JOINT_NAMES`: one skinning part per joint.
PARTS: list[str] = JOINT_NAMES

_REQUIRED_KEYS = ("v_template", "f", "J_regressor", "weights", "kintree_table", "shapedirs", "posedirs")
_NUM_POSE_BASIS = 9 * (NUM_JOINTS - 1)  # 207


# --------------------------------------------------------------------------- rotations
def _skew(v: np.ndarray) -> np.ndarray:
    """(...,3) -> (...,3,3) cross-product matrices ``[v]_x``."""
    z = np.zeros(v.shape[:-1], dtype=v.dtype)
    x, y, w = v[..., 0], v[..., 1], v[..., 2]
    return np.stack(
        [np.stack([z, -w, y], -1), np.stack([w, z, -x], -1), np.stack([-y, x, z], -1)], -2
    )


def axis_angle_to_matrix(aa: np.ndarray) -> np.ndarray:
    """Rodrigues' formula: axis-angle vectors to rotation matrices.

    ``R = I + (sin t / t) K + ((1 - cos t) / t^2) K^2`` with ``K = [aa]_x`` and
    ``t = |aa|``; the two coefficients use their Taylor series below
    ``t = 1e-4`` so the result is accurate (and differentiable) at ``t -> 0``.
    Same convention as SMPL / ``smplx.lbs.batch_rodrigues`` and
    ``scipy.spatial.transform.Rotation.from_rotvec``.

    Args:
        aa: (..., 3) float axis-angle vectors, radians (direction = axis).

    Returns:
        (..., 3, 3) float64 rotation matrices (``x' = R @ x``).
    """
    aa = np.asarray(aa, dtype=np.float64)
    if aa.shape[-1:] != (3,):
        raise ValueError(f"axis_angle_to_matrix expects (...,3), got {aa.shape}")
    t2 = np.sum(aa * aa, axis=-1)
    t = np.sqrt(t2)
    small = t < 1e-4
    ts = np.where(small, 1.0, t)
    a = np.where(small, 1.0 - t2 / 6.0 + t2 * t2 / 120.0, np.sin(ts) / ts)
    b = np.where(small, 0.5 - t2 / 24.0 + t2 * t2 / 720.0, (1.0 - np.cos(ts)) / (ts * ts))
    k = _skew(aa)
    eye = np.broadcast_to(np.eye(3), k.shape)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def matrix_to_axis_angle(rot: np.ndarray) -> np.ndarray:
    """Rotation matrices to axis-angle vectors (inverse of :func:`axis_angle_to_matrix`).

    Goes through a unit quaternion (Shepperd's method, choosing the largest
    diagonal pivot) and ``angle = 2 atan2(|q_xyz|, q_w)``, which is stable at
    zero angle and near pi. Returned angles lie in [0, pi].

    Args:
        rot: (..., 3, 3) rotation matrices (orthonormal, det +1).

    Returns:
        (..., 3) float64 axis-angle vectors in radians.
    """
    r = np.asarray(rot, dtype=np.float64)
    if r.shape[-2:] != (3, 3):
        raise ValueError(f"matrix_to_axis_angle expects (...,3,3), got {r.shape}")
    m00, m11, m22 = r[..., 0, 0], r[..., 1, 1], r[..., 2, 2]
    tr = m00 + m11 + m22
    # Four candidate quaternions (w, x, y, z), each well conditioned for one pivot.
    cands = np.stack(
        [
            np.stack([1 + tr, r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1),
            np.stack([r[..., 2, 1] - r[..., 1, 2], 1 + m00 - m11 - m22, r[..., 0, 1] + r[..., 1, 0], r[..., 0, 2] + r[..., 2, 0]], -1),
            np.stack([r[..., 0, 2] - r[..., 2, 0], r[..., 0, 1] + r[..., 1, 0], 1 - m00 + m11 - m22, r[..., 1, 2] + r[..., 2, 1]], -1),
            np.stack([r[..., 1, 0] - r[..., 0, 1], r[..., 0, 2] + r[..., 2, 0], r[..., 1, 2] + r[..., 2, 1], 1 - m00 - m11 + m22], -1),
        ],
        -2,
    )  # (...,4,4)
    pivot = np.argmax(np.stack([tr, m00, m11, m22], -1), axis=-1)
    q = np.take_along_axis(cands, pivot[..., None, None], axis=-2)[..., 0, :]
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    q = np.where(q[..., :1] < 0, -q, q)  # w >= 0 -> angle in [0, pi]
    s = np.linalg.norm(q[..., 1:], axis=-1)
    angle = 2.0 * np.arctan2(s, q[..., 0])
    small = s < 1e-8
    # angle / sin(angle/2) -> 2 as angle -> 0
    scale = np.where(small, 2.0 / np.where(small, q[..., 0], 1.0), angle / np.where(small, 1.0, s))
    return q[..., 1:] * scale[..., None]


# --------------------------------------------------------------------------- kinematics
def forward_kinematics(
    rot_mats: np.ndarray, joints: np.ndarray, parents: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """SMPL forward kinematics (as ``smplx.lbs.batch_rigid_transform``).

    Each bone's local transform is ``[R_b | J_b - J_parent(b)]`` (root:
    ``[R_0 | J_0]``); chaining them gives global transforms ``A_b`` whose
    translation is the posed joint. The returned "relative" transforms are
    ``G_b = A_b`` with the rest joint removed, ``G_b = [R^g_b | t_b - R^g_b J_b]``,
    so that a rest-pose point maps as ``x_posed = sum_b w_b G_b x_rest``.

    Args:
        rot_mats: (24, 3, 3) local joint rotations (parent frame), float.
        joints: (24, 3) rest-pose joint locations, metres, body frame.
        parents: (24,) int parent index per joint, ``parents[0] = -1``; each
            parent must precede its child.

    Returns:
        G: (24, 4, 4) float64 relative bone transforms (body frame).
        posed_joints: (24, 3) float64 posed joint locations, metres.
    """
    rot_mats = np.asarray(rot_mats, dtype=np.float64)
    joints = np.asarray(joints, dtype=np.float64)
    parents = np.asarray(parents, dtype=np.int64)
    n = joints.shape[0]
    if rot_mats.shape != (n, 3, 3) or joints.shape != (n, 3) or parents.shape != (n,):
        raise ValueError(
            f"forward_kinematics: shapes rot_mats {rot_mats.shape}, joints {joints.shape}, parents {parents.shape}"
        )
    glob = np.zeros((n, 4, 4))
    for b in range(n):
        local = np.eye(4)
        local[:3, :3] = rot_mats[b]
        p = parents[b]
        if p < 0:
            local[:3, 3] = joints[b]
            glob[b] = local
        else:
            if p >= b:
                raise ValueError(f"forward_kinematics: parent {p} of joint {b} does not precede it")
            local[:3, 3] = joints[b] - joints[p]
            glob[b] = glob[p] @ local
    posed_joints = glob[:, :3, 3].copy()
    G = glob.copy()
    G[:, :3, 3] -= np.einsum("bij,bj->bi", glob[:, :3, :3], joints)
    return G, posed_joints


def blend_transforms(weights: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Per-point blended skinning transforms ``T_i = sum_b w_ib G_b``.

    Args:
        weights: (N, 24) skinning weights (rows normally sum to 1).
        G: (24, 4, 4) relative bone transforms from :func:`forward_kinematics`.

    Returns:
        (N, 4, 4) float64 blended transforms (not rigid in general).
    """
    weights = np.asarray(weights, dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    # one (N, B) @ (B, 16) matrix product (BLAS), not an einsum loop
    return (weights @ G.reshape(G.shape[0], 16)).reshape(-1, 4, 4)


def lbs_points(points: np.ndarray, weights: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Linear blend skinning of rest-pose points: ``x' = (sum_b w_b G_b) [x; 1]``.

    Args:
        points: (N, 3) rest-pose (canonical) points, metres, body frame.
        weights: (N, 24) skinning weights.
        G: (24, 4, 4) relative bone transforms from :func:`forward_kinematics`.

    Returns:
        (N, 3) float64 posed points, metres, body frame.
    """
    points = np.asarray(points, dtype=np.float64)
    T = blend_transforms(weights, G)
    return np.einsum("nij,nj->ni", T[:, :3, :3], points) + T[:, :3, 3]


def bone_transforms(poses, world_from_body, rest_joints, parents, canonical_G_inv) -> tuple[np.ndarray, np.ndarray]:
    """World-from-canonical bone transforms of one frame (3DGS-Avatar convention).

    Args:
        poses: (24, 3) or (72,) SMPL axis-angle, radians (joint 0 = global orientation).
        world_from_body: (4, 4) rigid body -> world transform, metres.
        rest_joints: (24, 3) shaped rest-pose joints, metres (bundle ``body_model.rest_joints``).
        parents: (24,) int parents, -1 for the root.
        canonical_G_inv: (24, 4, 4) ``inv(G_c)`` of the canonical pose.
    Returns:
        ``rot_mats`` (24, 3, 3) float64 local joint rotations (pose-encoder input) and
        ``B`` (24, 4, 4) float64 ``world_from_body @ G_pose_b @ inv(G_c_b)``.
    """
    rot = axis_angle_to_matrix(np.asarray(poses, np.float64).reshape(-1, 3))
    G_pose, _ = forward_kinematics(rot, rest_joints, parents)
    return rot, np.asarray(world_from_body, np.float64)[None] @ G_pose @ canonical_G_inv


# --------------------------------------------------------------------------- model
@dataclass
class SMPLModel:
    """The SMPL model arrays (float64 NumPy), as stored in ``SMPL_*.pkl``.

    Attributes:
        v_template: (6890, 3) float64 mean template vertices, metres, T-pose.
        faces: (13776, 3) int64 triangle vertex indices (key ``f``).
        J_regressor: (24, 6890) float64 dense joint regressor.
        weights: (6890, 24) float64 LBS weights.
        parents: (24,) int64 parent joint per joint (``kintree_table[0]``),
            ``parents[0] = -1``.
        shapedirs: (6890, 3, B) float64 shape blendshapes (B = 10 for the
            neutral model of SMPLify / the shared data, 300 for SMPL 1.1).
        posedirs: (6890, 3, 207) float64 pose-corrective blendshapes
            (all zeros in the shared model).
        path: the file it was loaded from ("" if built in memory).
    """

    v_template: np.ndarray
    faces: np.ndarray
    J_regressor: np.ndarray
    weights: np.ndarray
    parents: np.ndarray
    shapedirs: np.ndarray
    posedirs: np.ndarray
    path: str = ""

    @property
    def num_betas(self) -> int:
        """Number of shape components B."""
        return int(self.shapedirs.shape[-1])

    def _betas(self, betas: np.ndarray | None) -> np.ndarray:
        if betas is None:
            return np.zeros(self.num_betas)
        b = np.asarray(betas, dtype=np.float64).reshape(-1)
        if b.shape[0] > self.num_betas:
            raise ValueError(f"got {b.shape[0]} betas but the model has {self.num_betas} shape components")
        return np.pad(b, (0, self.num_betas - b.shape[0]))

    def shape(self, betas: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rest-pose shaped template and joints (SMPL eq. 2-3).

        Args:
            betas: (B',) shape coefficients, B' <= B (missing ones are zero);
                None means the mean shape.

        Returns:
            verts: (6890, 3) float64 ``v_template + shapedirs @ betas``, metres.
            joints: (24, 3) float64 ``J_regressor @ verts``, metres.
        """
        b = self._betas(betas)
        verts = self.v_template + self.shapedirs @ b
        return verts, self.J_regressor @ verts

    def pose_offsets(self, rot_mats: np.ndarray) -> np.ndarray:
        """Pose-corrective vertex offsets ``posedirs @ vec(R_1..R_23 - I)``.

        Args:
            rot_mats: (24, 3, 3) local joint rotations (root excluded from the
                feature, as in SMPL / smplx).

        Returns:
            (6890, 3) float64 offsets, metres.
        """
        feat = (np.asarray(rot_mats, dtype=np.float64)[1:] - np.eye(3)).reshape(-1)
        return self.posedirs @ feat

    def forward(
        self,
        betas: np.ndarray | None = None,
        pose: np.ndarray | None = None,
        transl: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Posed SMPL mesh and joints, exactly as ``smplx.SMPL.forward``.

        Args:
            betas: (B',) shape coefficients (None = zeros).
            pose: (72,) or (24, 3) axis-angle, radians: root orientation
                followed by the 23 body joints (None = rest pose).
            transl: (3,) translation in metres added to the result (None = 0).

        Returns:
            verts: (6890, 3) float64 posed vertices, metres, body frame.
            joints: (24, 3) float64 posed joints, metres (smplx's first 24
                output joints).
        """
        pose = np.zeros((NUM_JOINTS, 3)) if pose is None else np.asarray(pose, dtype=np.float64)
        if pose.size != NUM_JOINTS * 3:
            raise ValueError(f"pose must have 72 values (24 joints x 3), got shape {pose.shape}")
        rot = axis_angle_to_matrix(pose.reshape(NUM_JOINTS, 3))
        v_shaped, j_rest = self.shape(betas)
        v_posed = v_shaped + self.pose_offsets(rot)
        G, joints = forward_kinematics(rot, j_rest, self.parents)
        verts = lbs_points(v_posed, self.weights, G)
        if transl is not None:
            t = np.asarray(transl, dtype=np.float64).reshape(3)
            verts = verts + t
            joints = joints + t
        return verts, joints


def _bad(path: str, msg: str) -> FmgsInputError:
    return FmgsInputError(f"invalid SMPL model file: {msg}", path)


def load_smpl(path: str | os.PathLike) -> SMPLModel:
    """Load an SMPL model pickle (plain-numpy or the original chumpy one) safely.

    Uses :func:`fmgs.pickle_io.load_pickle` (never plain pickle), converts
    chumpy arrays to numpy and a scipy-sparse ``J_regressor`` to dense, and
    validates keys, shapes and values.

    Args:
        path: an ``SMPL_{NEUTRAL,MALE,FEMALE}.pkl`` file (e.g.
            ``<data>/body_models/smpl/SMPL_NEUTRAL.pkl``).

    Returns:
        :class:`SMPLModel` with float64 arrays and int64 faces/parents.

    Raises:
        FmgsInputError: the file is missing (the message says where SMPL is
            expected and that SMPL_NEUTRAL.pkl must be downloaded from the SMPL
            site), not a valid pickle, not a dict, lacks a required key, or has
            an array of the wrong shape / non-finite values. The message names
            the file and the offending key.
    """
    spath = os.fspath(path)
    if not os.path.isfile(spath):
        raise FmgsInputError(
            "SMPL model not found. The SMPL body model is not distributed with fmgs-avatar: "
            "register at https://smpl.is.tue.mpg.de, download the neutral model and save it as "
            "SMPL_NEUTRAL.pkl at this path (or point FMGS_DATA at a folder containing "
            "body_models/smpl/SMPL_NEUTRAL.pkl)",
            spath,
        )
    raw = load_pickle(spath)
    if not isinstance(raw, dict):
        raise _bad(spath, f"expected a dict of arrays, got {type(raw).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:
        raise _bad(spath, f"missing key(s) {', '.join(repr(k) for k in missing)}")
    data = to_numpy_tree({k: raw[k] for k in _REQUIRED_KEYS}, densify_sparse=True, path=spath)

    def arr(key: str, dtype: type) -> np.ndarray:
        try:
            a = np.asarray(data[key], dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise _bad(spath, f"key '{key}' is not a numeric array ({exc})") from exc
        if dtype is np.float64 and not np.all(np.isfinite(a)):
            raise _bad(spath, f"key '{key}' contains NaN or infinite values")
        return a

    v_template = arr("v_template", np.float64)
    if v_template.ndim != 2 or v_template.shape[1] != 3 or v_template.shape[0] < 1:
        raise _bad(spath, f"key 'v_template' has shape {v_template.shape}, expected (V, 3)")
    nv = v_template.shape[0]
    faces = arr("f", np.float64)
    if faces.ndim != 2 or faces.shape[1] != 3 or np.any(faces != np.round(faces)):
        raise _bad(spath, f"key 'f' has shape {faces.shape} or non-integer values, expected (F, 3) vertex indices")
    faces = faces.astype(np.int64)
    if faces.size and (faces.min() < 0 or faces.max() >= nv):
        raise _bad(spath, f"key 'f' indexes vertices outside [0, {nv})")
    expect = {
        "J_regressor": (NUM_JOINTS, nv),
        "weights": (nv, NUM_JOINTS),
        "kintree_table": (2, NUM_JOINTS),
        "posedirs": (nv, 3, _NUM_POSE_BASIS),
    }
    out = {}
    for key, shp in expect.items():
        a = arr(key, np.float64)
        if a.shape != shp:
            raise _bad(spath, f"key '{key}' has shape {a.shape}, expected {shp}")
        out[key] = a
    shapedirs = arr("shapedirs", np.float64)
    if shapedirs.ndim != 3 or shapedirs.shape[:2] != (nv, 3) or shapedirs.shape[2] < 1:
        raise _bad(spath, f"key 'shapedirs' has shape {shapedirs.shape}, expected ({nv}, 3, B)")
    parents = out["kintree_table"][0].astype(np.int64)
    parents[0] = -1
    if np.any(parents[1:] < 0) or np.any(parents[1:] >= np.arange(1, NUM_JOINTS)):
        raise _bad(spath, "key 'kintree_table' is not a tree with parents before children")
    return SMPLModel(
        v_template=v_template,
        faces=faces,
        J_regressor=out["J_regressor"],
        weights=out["weights"],
        parents=parents,
        shapedirs=shapedirs,
        posedirs=out["posedirs"],
        path=spath,
    )


# --------------------------------------------------------------------------- poses & fitting
def star_pose(angle_deg: float = 45.0) -> np.ndarray:
    """Canonical "star" (Da-) pose used by 3DGS-Avatar / ARAH-style avatars.

    The left hip (joint 1) is rotated by ``+angle`` and the right hip (joint 2)
    by ``-angle`` about the body z axis, spreading the legs outwards (the left
    foot moves to larger x, since SMPL's +x is the body's left); everything else
    is zero.

    Args:
        angle_deg: leg spread per side, degrees.

    Returns:
        (24, 3) float64 axis-angle pose, radians.
    """
    pose = np.zeros((NUM_JOINTS, 3))
    a = np.deg2rad(float(angle_deg))
    pose[1, 2] = a
    pose[2, 2] = -a
    return pose


def fit_betas_from_joints(
    model: SMPLModel,
    joints: np.ndarray,
    num_betas: int = 10,
    fit_translation: bool = False,
) -> tuple[np.ndarray, float]:
    """Recover SMPL shape coefficients from rest-pose (T-pose) joints.

    Solves the linear least-squares problem
    ``min_b || J_regressor @ (v_template + shapedirs[..., :K] @ b) (+ t) - joints ||^2``
    (the joints are linear in betas, SMPL eq. 2-3). HumanNeRF's ZJU-MoCap
    ``canonical_joints.pkl`` needs no translation (residual ~0.6 mm for 377).

    Args:
        model: the SMPL model.
        joints: (24, 3) T-pose joints, metres, body frame.
        num_betas: K, number of shape components to fit (<= model.num_betas).
        fit_translation: also fit a free translation ``t`` (3,), which is then
            applied when computing the residual but not returned; use it for
            T-pose joints given in a shifted frame.

    Returns:
        betas: (K,) float64 shape coefficients.
        residual_rms_m: float, RMS over the 72 joint coordinates of the fit
            residual, metres.

    Raises:
        ValueError: bad shapes or ``num_betas`` out of range.
    """
    joints = np.asarray(joints, dtype=np.float64)
    if joints.shape != (NUM_JOINTS, 3):
        raise ValueError(f"joints must be (24, 3), got {joints.shape}")
    if not 1 <= num_betas <= model.num_betas:
        raise ValueError(f"num_betas must be in [1, {model.num_betas}], got {num_betas}")
    base = model.J_regressor @ model.v_template  # (24,3)
    A = np.einsum("jv,vkb->jkb", model.J_regressor, model.shapedirs[..., :num_betas]).reshape(-1, num_betas)
    if fit_translation:
        A = np.concatenate([A, np.tile(np.eye(3), (NUM_JOINTS, 1))], axis=1)
    rhs = (joints - base).reshape(-1)
    sol, *_ = np.linalg.lstsq(A, rhs, rcond=None)
    resid = A @ sol - rhs
    return sol[:num_betas].copy(), float(np.sqrt(np.mean(resid**2)))


def world_from_body(Rh: np.ndarray, Th: np.ndarray) -> np.ndarray:
    """ZJU-MoCap / HumanNeRF global body placement as a 4x4 matrix.

    ZJU-MoCap stores the SMPL root orientation and translation separately
    (``Rh``, ``Th`` in ``mesh_infos.pkl``): ``x_world = rodrigues(Rh) @ x_body + Th``.

    Args:
        Rh: (3,) axis-angle, radians.
        Th: (3,) translation, metres (world frame).

    Returns:
        (4, 4) float64 world-from-body rigid transform.
    """
    M = np.eye(4)
    M[:3, :3] = axis_angle_to_matrix(np.asarray(Rh, dtype=np.float64).reshape(3))
    M[:3, 3] = np.asarray(Th, dtype=np.float64).reshape(3)
    return M
