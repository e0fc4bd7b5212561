"""Canonical mesh-guided 2D Gaussian surfels (FMGS-Avatar paper, Sec. 4.1.1). Torch-free.

The SMPL template is shaped (betas), posed into the canonical pose by pure linear blend
skinning (no pose blendshapes, as in 3DGS-Avatar), upsampled by midpoint subdivision
(one level: 6,890 -> 27,554 vertices, 13,776 -> 55,104 faces; the paper says "about
30,000 vertices") and one 2D Gaussian surfel is attached to every face of the upsampled
mesh:

* centre ``mu_k`` = barycentre of the face (paper eq. 2);
* rotation ``R_k = [t_u, t_v, t_w]`` with ``t_u`` along the face's first edge
  ``v1 - v0``, ``t_w`` the outward unit face normal and ``t_v = t_w x t_u`` (so the frame
  is right-handed and ``t_w = t_u x t_v`` as in 2DGS);
* isotropic initial scales (``s_u = s_v``, standard deviations in metres) from the face
  area, see :data:`SCALE_RULE_K`;
* skinning weights, body-part labels and the barycentric position inside the parent
  SMPL face, carried from the original SMPL face each surfel lies in.

Subdivision is done on the *posed canonical* SMPL mesh (midpoints of the LBS-posed
vertices), so every upsampled vertex and every surfel centre is an exact barycentric
combination of the 6,890 canonical SMPL vertices of its parent face (``parent_bary``);
the same barycentric coordinates locate the surfel on the shaped rest (T-pose) mesh.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

import numpy as np

from fmgs.errors import FmgsInputError

__all__ = [
    "SCALE_RULE_K",
    "CanonicalSurfels",
    "subdivide_midpoint",
    "edge_face_adjacency",
    "surfel_frames",
    "fold_smplh_parts",
    "build_canonical_surfels",
    "save_npz",
    "load_npz",
]

#: Initial surfel scale rule: ``s_u = s_v = SCALE_RULE_K * sqrt(face_area) * scale_multiplier``
#: with ``SCALE_RULE_K = 1/sqrt(pi)``: the surfel's 1-sigma disk then has exactly the area
#: of its face (pi s^2 = A). Neighbouring face centroids are about ``0.88 sqrt(A)`` apart
#: on a regular triangulation, i.e. ~1.5 sigma, so each surfel overlaps its neighbours
#: well inside their 2-3 sigma footprint, and the summed Gaussian density over the surface
#: is nearly constant (for a regular triangular lattice its ripple is ~1e-4 of the mean):
#: the initial surfels look like a closed surface with no holes and little over-blurring.
SCALE_RULE_K = float(1.0 / np.sqrt(np.pi))


@dataclass
class CanonicalSurfels:
    """Canonical-space surfels attached to the faces of the upsampled SMPL mesh.

    All arrays are float32 unless stated; lengths in metres; frame: canonical SMPL body
    frame (the rest pose posed into ``canonical_pose``; y up, z forward, x to the
    subject's left). ``S`` = number of surfels = faces of the upsampled mesh.

    Attributes:
        centers: (S, 3) face barycentres (eq. 2).
        rotations: (S, 3, 3) columns ``[t_u, t_v, t_w]``; ``t_u`` = unit first edge,
            ``t_w`` = outward unit normal, ``t_v = t_w x t_u``; orthonormal, det +1.
        scales: (S, 2) initial ``(s_u, s_v)`` standard deviations in metres
            (``SCALE_RULE_K * sqrt(area) * scale_multiplier``).
        skin_weights: (S, 24) LBS weights, SMPL per-vertex weights interpolated
            barycentrically at the centre; rows sum to 1.
        part_labels: (S,) int64 SMPL joint id 0-23 of the parent SMPL face (from
            ``smplh_parts_segm.pkl`` with finger ids folded into the hand joints, or the
            argmax skinning weight when no part file is given).
        parent_face: (S,) int64 index of the original SMPL face containing the surfel.
        parent_bary: (S, 3) barycentric coordinates of the centre in the parent face
            (w.r.t. ``smpl_faces[parent_face]``); rows sum to 1.
        verts: (V, 3) vertices of the upsampled canonical mesh.
        faces: (S, 3) int64 faces of the upsampled mesh, counter-clockwise seen from
            outside (surfel ``k`` belongs to face ``k``).
        mesh_skin_weights: (V, 24) LBS weights of the upsampled vertices.
        face_adjacency: (A, 2) int64 pairs ``(i, j)``, ``i < j``, of surfels whose faces
            share an edge, each pair once (an undirected graph; for a closed mesh every
            surfel appears in exactly 3 pairs).
        smpl_verts: (6890, 3) canonical (posed, shaped) SMPL vertices.
        smpl_faces: (13776, 3) int64 SMPL faces.
        canonical_pose: (24, 3) axis-angle (radians) of the canonical pose.
        betas: (B,) shape coefficients used.
        bone_transforms: (24, 4, 4) ``G_c``: relative bone transforms rest -> canonical
            (rest joint subtracted; ``x_c = sum_j w_j G_c[j] x_rest``). A posed frame with
            transforms ``G_p`` maps canonical -> posed by ``A = G_p @ inv(G_c)``
            (3DGS-Avatar convention).
        joints: (24, 3) canonical-pose joint positions.
        rest_joints: (24, 3) shaped T-pose (rest) joints.
        subdivisions: number of midpoint-subdivision levels applied.
    """

    centers: np.ndarray
    rotations: np.ndarray
    scales: np.ndarray
    skin_weights: np.ndarray
    part_labels: np.ndarray
    parent_face: np.ndarray
    parent_bary: np.ndarray
    verts: np.ndarray
    faces: np.ndarray
    mesh_skin_weights: np.ndarray
    face_adjacency: np.ndarray
    smpl_verts: np.ndarray
    smpl_faces: np.ndarray
    canonical_pose: np.ndarray
    betas: np.ndarray
    bone_transforms: np.ndarray
    joints: np.ndarray
    rest_joints: np.ndarray
    subdivisions: int = 1

    @property
    def num_surfels(self) -> int:
        """Number of surfels S."""
        return int(self.centers.shape[0])

    @property
    def normals(self) -> np.ndarray:
        """(S, 3) float32 outward unit normals ``t_w`` (third rotation column)."""
        return self.rotations[:, :, 2]

    def neighbours(self) -> list[np.ndarray]:
        """Per-surfel arrays of edge-adjacent surfel ids (from ``face_adjacency``)."""
        S = self.num_surfels
        a = np.concatenate([self.face_adjacency[:, 0], self.face_adjacency[:, 1]])
        b = np.concatenate([self.face_adjacency[:, 1], self.face_adjacency[:, 0]])
        order = np.argsort(a, kind="stable")
        a, b = a[order], b[order]
        splits = np.searchsorted(a, np.arange(1, S))
        return np.split(b, splits)


# ----------------------------------------------------------------------------- geometry
def subdivide_midpoint(verts, faces):
    """One level of midpoint (1-to-4) subdivision.

    Every edge gets a new vertex at its midpoint; face ``(a, b, c)`` with edge midpoints
    ``ab, bc, ca`` becomes, in this order, ``(a, ab, ca), (ab, b, bc), (ca, bc, c),
    (ab, bc, ca)``. Each child keeps the winding (hence the outward normal) of its parent.
    Same vertex set as ``trimesh.remesh.subdivide`` (the tests check this).

    Args:
        verts: (V, 3) float vertex positions (any unit).
        faces: (F, 3) int vertex indices.
    Returns:
        verts2: (V + E, 3) float64; the first V rows are ``verts``, then one midpoint per
            unique undirected edge.
        faces2: (4F, 3) int64; children of face ``f`` are rows ``4f .. 4f+3``.
        parent_face: (4F,) int64 = ``repeat(arange(F), 4)``.
        vertex_sources: (V + E, 2) int64: each new vertex is the mean of
            ``verts[vertex_sources[i, 0]]`` and ``verts[vertex_sources[i, 1]]``
            (``(i, i)`` for an original vertex). Use it to carry per-vertex attributes.
    Raises:
        FmgsInputError: on bad shapes or out-of-range indices.
    """
    v = np.asarray(verts, dtype=np.float64)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3:
        raise FmgsInputError(f"vertices must have shape (V, 3), got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3 or not np.issubdtype(f.dtype, np.integer):
        raise FmgsInputError(f"faces must be an integer array (F, 3), got {f.shape} {f.dtype}")
    f = f.astype(np.int64)
    V, F = len(v), len(f)
    if F and (f.min() < 0 or f.max() >= V):
        raise FmgsInputError("face indices out of range of the vertex array")
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])  # ab | bc | ca
    lo, hi = e.min(1), e.max(1)
    key = lo * V + hi
    ukey, inv = np.unique(key, return_inverse=True)
    src_new = np.stack([ukey // V, ukey % V], 1)
    mids = V + inv.reshape(3, F).T  # (F, 3): ab, bc, ca
    verts2 = np.concatenate([v, 0.5 * (v[src_new[:, 0]] + v[src_new[:, 1]])])
    a, b, c = f.T
    ab, bc, ca = mids.T
    faces2 = np.stack([
        np.stack([a, ab, ca], 1),
        np.stack([ab, b, bc], 1),
        np.stack([ca, bc, c], 1),
        np.stack([ab, bc, ca], 1),
    ], 1).reshape(-1, 3)
    parent = np.repeat(np.arange(F, dtype=np.int64), 4)
    ident = np.arange(V, dtype=np.int64)
    sources = np.concatenate([np.stack([ident, ident], 1), src_new])
    return verts2, faces2, parent, sources


def edge_face_adjacency(faces) -> np.ndarray:
    """Pairs of faces sharing an (undirected) edge.

    Args:
        faces: (F, 3) int vertex indices.
    Returns:
        (A, 2) int64 pairs ``(i, j)`` with ``i < j``, sorted, each once. An edge used by
        ``k > 2`` faces (non-manifold) contributes the ``k - 1`` pairs of consecutive faces
        in face order; boundary edges contribute nothing.
    """
    f = np.asarray(faces, dtype=np.int64)
    F = len(f)
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    V = int(f.max()) + 1 if F else 1
    key = e.min(1) * V + e.max(1)
    fid = np.tile(np.arange(F, dtype=np.int64), 3)
    order = np.lexsort((fid, key))
    key, fid = key[order], fid[order]
    same = key[1:] == key[:-1]
    pairs = np.stack([fid[:-1][same], fid[1:][same]], 1)
    pairs = np.sort(pairs, 1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(pairs, axis=0).astype(np.int64)


def surfel_frames(tri: np.ndarray):
    """Per-face surfel frames and areas.

    Args:
        tri: (F, 3, 3) float triangle vertex positions ``[v0, v1, v2]`` (counter-clockwise
            seen from the side the normal should point to).
    Returns:
        rotations: (F, 3, 3) float64 columns ``[t_u, t_v, t_w]``: ``t_u = (v1-v0)/|v1-v0|``,
            ``t_w = (v1-v0) x (v2-v0)`` normalised, ``t_v = t_w x t_u``.
        areas: (F,) float64 face areas.
    Raises:
        FmgsInputError: if a face is degenerate (zero edge or zero area).
    """
    tri = np.asarray(tri, dtype=np.float64)
    e1 = tri[:, 1] - tri[:, 0]
    e2 = tri[:, 2] - tri[:, 0]
    n = np.cross(e1, e2)
    nn = np.linalg.norm(n, axis=1)
    l1 = np.linalg.norm(e1, axis=1)
    if len(tri) and (nn.min() <= 1e-20 or l1.min() <= 1e-12):
        raise FmgsInputError(f"{int((nn <= 1e-20).sum())} degenerate (zero-area) faces in the mesh")
    t_u = e1 / l1[:, None]
    t_w = n / nn[:, None]
    t_v = np.cross(t_w, t_u)
    return np.stack([t_u, t_v, t_w], 2), 0.5 * nn


def fold_smplh_parts(segm) -> np.ndarray:
    """Fold SMPL-H part ids (0-51) into SMPL joint ids (0-23).

    SMPL-H joints 0-21 are SMPL's body joints; 22-36 are the left-hand finger joints and
    37-51 the right-hand ones, which SMPL merges into its hand joints 22 (left hand) and
    23 (right hand) (``smplh_parts_segm.pkl`` README).

    Args:
        segm: (F,) int ids in 0..51.
    Returns:
        (F,) int64 ids in 0..23.
    Raises:
        FmgsInputError: if any id is outside 0..51.
    """
    s = np.asarray(segm).astype(np.int64)
    if s.size and (s.min() < 0 or s.max() > 51):
        raise FmgsInputError(f"part ids must be in 0..51, got range {s.min()}..{s.max()}")
    out = s.copy()
    out[(s >= 22) & (s <= 36)] = 22
    out[s >= 37] = 23
    return out


def _load_part_labels(parts_path, num_faces: int) -> np.ndarray:
    from fmgs.pickle_io import load_pickle

    data = load_pickle(parts_path)
    if not isinstance(data, dict) or "segm" not in data:
        raise FmgsInputError("part segmentation pickle must be a dict with key 'segm'", parts_path)
    segm = np.asarray(data["segm"])
    if segm.shape != (num_faces,):
        raise FmgsInputError(
            f"'segm' must have shape ({num_faces},) (one id per SMPL face), got {segm.shape}",
            parts_path)
    try:
        return fold_smplh_parts(segm)
    except FmgsInputError as exc:
        raise FmgsInputError(str(exc), parts_path) from None


def _canonical_pose_array(canonical_pose, num_joints: int) -> np.ndarray:
    from fmgs.body_model import star_pose

    if isinstance(canonical_pose, str):
        if canonical_pose == "star":
            return np.asarray(star_pose(), dtype=np.float64).reshape(num_joints, 3)
        if canonical_pose == "tpose":
            return np.zeros((num_joints, 3))
        raise FmgsInputError(
            f"canonical_pose must be 'star', 'tpose' or a ({num_joints}, 3) array, "
            f"got {canonical_pose!r}")
    p = np.asarray(canonical_pose, dtype=np.float64)
    if p.size != num_joints * 3:
        raise FmgsInputError(
            f"canonical_pose must have {num_joints * 3} axis-angle values, got shape {p.shape}")
    p = p.reshape(num_joints, 3)
    if not np.all(np.isfinite(p)):
        raise FmgsInputError("canonical_pose contains NaN or inf")
    return p


# ----------------------------------------------------------------------------- builder
def build_canonical_surfels(smpl, betas=None, canonical_pose="star", subdivisions: int = 1,
                            parts_path=None, scale_multiplier: float = 1.0) -> CanonicalSurfels:
    """Build the canonical surfels of FMGS-Avatar (Sec. 4.1.1) from an SMPL model.

    Steps: shape the template (``smpl.shape(betas)``), pose it into ``canonical_pose`` by
    LBS without pose blendshapes (``forward_kinematics`` + ``lbs_points``), subdivide the
    posed mesh ``subdivisions`` times by midpoints, and attach one surfel per face
    (centre eq. 2, frame from the face, scale by :data:`SCALE_RULE_K`).

    Args:
        smpl: :class:`fmgs.body_model.SMPLModel`.
        betas: (B,) shape coefficients (B <= number of shape components); None = zeros.
        canonical_pose: (24, 3) / (72,) axis-angle radians, ``'star'`` (the 3DGS-Avatar /
            ARAH canonical star pose, ``fmgs.body_model.star_pose()``: hips rotated by
            +-45 deg about the body z axis, legs spread) or ``'tpose'`` (all zeros).
        subdivisions: midpoint-subdivision levels (0..3); 1 gives 55,104 surfels for SMPL.
        parts_path: path of ``smplh_parts_segm.pkl`` (per-SMPL-face SMPL-H part ids); None
            labels each surfel with its argmax skinning weight instead.
        scale_multiplier: positive factor applied to the initial scales.
    Returns:
        :class:`CanonicalSurfels`.
    Raises:
        FmgsInputError: bad ``betas``/``canonical_pose``/``subdivisions``/
            ``scale_multiplier``, an unreadable or malformed ``parts_path`` (named), or a
            degenerate mesh.
    """
    from fmgs.body_model import axis_angle_to_matrix, forward_kinematics, lbs_points

    if not isinstance(subdivisions, (int, np.integer)) or not 0 <= int(subdivisions) <= 3:
        raise FmgsInputError(f"subdivisions must be an integer in 0..3, got {subdivisions!r}")
    sm = float(scale_multiplier)
    if not np.isfinite(sm) or sm <= 0:
        raise FmgsInputError(f"scale_multiplier must be positive, got {scale_multiplier!r}")
    n_shape = int(np.asarray(smpl.shapedirs).shape[-1])
    if betas is None:
        betas = np.zeros(n_shape)
    betas = np.asarray(betas, dtype=np.float64).reshape(-1)
    if betas.size > n_shape or not np.all(np.isfinite(betas)):
        raise FmgsInputError(
            f"betas must be at most {n_shape} finite values, got shape {betas.shape}")

    parents = np.asarray(smpl.parents)
    J = len(parents)
    pose = _canonical_pose_array(canonical_pose, J)

    rest_verts, rest_joints = smpl.shape(betas)
    rest_verts = np.asarray(rest_verts, dtype=np.float64)
    rest_joints = np.asarray(rest_joints, dtype=np.float64)
    rot = np.asarray(axis_angle_to_matrix(pose), dtype=np.float64).reshape(J, 3, 3)
    G_c, joints_c = forward_kinematics(rot, rest_joints, parents)
    G_c = np.asarray(G_c, dtype=np.float64)
    W = np.asarray(smpl.weights, dtype=np.float64)
    smpl_verts = np.asarray(lbs_points(rest_verts, W, G_c), dtype=np.float64)
    smpl_faces = np.asarray(smpl.faces, dtype=np.int64)
    F0 = len(smpl_faces)

    # Subdivide, tracking for every face its parent SMPL face and the barycentric
    # coordinates (w.r.t. that face) of its three corners.
    verts, faces = smpl_verts, smpl_faces
    vweights = W
    corner_bary = np.broadcast_to(np.eye(3), (F0, 3, 3)).copy()  # (F, corner, bary)
    parent = np.arange(F0, dtype=np.int64)
    for _ in range(int(subdivisions)):
        verts, faces, par, src = subdivide_midpoint(verts, faces)
        vweights = 0.5 * (vweights[src[:, 0]] + vweights[src[:, 1]])
        A, B, C = corner_bary[:, 0], corner_bary[:, 1], corner_bary[:, 2]
        AB, BC, CA = 0.5 * (A + B), 0.5 * (B + C), 0.5 * (C + A)
        corner_bary = np.stack([
            np.stack([A, AB, CA], 1),
            np.stack([AB, B, BC], 1),
            np.stack([CA, BC, C], 1),
            np.stack([AB, BC, CA], 1),
        ], 1).reshape(-1, 3, 3)
        parent = parent[par]

    tri = verts[faces]
    centers = tri.mean(1)
    rotations, areas = surfel_frames(tri)
    s = SCALE_RULE_K * np.sqrt(areas) * sm
    scales = np.stack([s, s], 1)
    bary = corner_bary.mean(1)
    skin = np.einsum("sk,skj->sj", bary, W[smpl_faces[parent]])
    skin /= skin.sum(1, keepdims=True)

    if parts_path is not None:
        if not os.path.isfile(parts_path):
            raise FmgsInputError("part segmentation file not found", parts_path)
        face_labels = _load_part_labels(parts_path, F0)
        labels = face_labels[parent]
    else:
        labels = np.argmax(skin, 1).astype(np.int64)

    f32 = np.float32
    return CanonicalSurfels(
        centers=centers.astype(f32),
        rotations=rotations.astype(f32),
        scales=scales.astype(f32),
        skin_weights=skin.astype(f32),
        part_labels=labels.astype(np.int64),
        parent_face=parent,
        parent_bary=bary.astype(f32),
        verts=verts.astype(f32),
        faces=faces.astype(np.int64),
        mesh_skin_weights=vweights.astype(f32),
        face_adjacency=edge_face_adjacency(faces),
        smpl_verts=smpl_verts.astype(f32),
        smpl_faces=smpl_faces,
        canonical_pose=pose.astype(f32),
        betas=betas.astype(f32),
        bone_transforms=G_c.astype(f32),
        joints=np.asarray(joints_c, dtype=f32),
        rest_joints=rest_joints.astype(f32),
        subdivisions=int(subdivisions),
    )


# ----------------------------------------------------------------------------- I/O
def save_npz(surfels: CanonicalSurfels, path) -> None:
    """Save ``surfels`` to an uncompressed ``.npz`` (one array per field)."""
    arrays = {f.name: np.asarray(getattr(surfels, f.name)) for f in fields(CanonicalSurfels)}
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def load_npz(path) -> CanonicalSurfels:
    """Load surfels written by :func:`save_npz`.

    Raises:
        FmgsInputError: if the file is missing, not an npz, or lacks a field (named).
    """
    if not os.path.isfile(path):
        raise FmgsInputError("surfel file not found", path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - any decode failure is bad input
        raise FmgsInputError(f"not a readable .npz file ({exc})", path) from None
    kw = {}
    for f in fields(CanonicalSurfels):
        if f.name not in data:
            raise FmgsInputError(f"missing array '{f.name}'", path)
        kw[f.name] = data[f.name]
    kw["subdivisions"] = int(kw["subdivisions"])
    return CanonicalSurfels(**kw)
