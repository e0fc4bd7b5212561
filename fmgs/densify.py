"""Mesh-guided densification of canonical surfels: 1-to-4 midpoint subdivision of
selected faces of the upsampled template. Torch-free.

3DGS (Kerbl et al. 2023, Sec. 5.2) densifies Gaussians whose view-space position
gradients are large by cloning or splitting them in free space. Here the surfels are
bound to the faces of the canonical mesh (FMGS-Avatar Sec. 4.1.1), so a surfel is
"split" by subdividing its face: face ``(a, b, c)`` with edge midpoints ``ab, bc, ca``
becomes the four faces ``(a, ab, ca), (ab, b, bc), (ca, bc, c), (ab, bc, ca)`` (the
pattern of :func:`fmgs.surfels.subdivide_midpoint`), and the face's surfel is replaced
by one surfel per child face. Everything stays on the template surface:

* child centre = barycentre of the child face, i.e. the point of barycentric
  coordinates :data:`CHILD_BARY` in the parent face (on the parent face's plane);
* child frame from the child face (:func:`fmgs.surfels.surfel_frames`): the same normal
  as the parent, since the child lies in the parent's plane;
* child scales = parent's / 2 (a quarter of the area: the rule of
  :data:`fmgs.surfels.SCALE_RULE_K` applied to the child face);
* child skinning weights = barycentric interpolation of the upsampled mesh's vertex
  weights at :data:`CHILD_BARY` (SMPL's weights are linear over each SMPL face, so this
  equals SMPL's weights at the child centre, as for the surfels of
  :func:`fmgs.surfels.build_canonical_surfels`);
* part label and parent SMPL face copied; ``parent_bary`` recomputed in the SMPL face.

Only the selected faces are split, so the mesh gets T-junctions (hanging midpoints) on
the edges between a split and an unsplit face. A midpoint that already exists as a vertex
(its other face was split earlier) is reused, so two split neighbours share it again.
Surfel adjacency (``face_adjacency``) keeps conforming edges and adds the pairs across
one level of hanging edge (the unsplit face and the two children along its edge).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from fmgs.errors import FmgsInputError
from fmgs.surfels import CanonicalSurfels, edge_face_adjacency, surfel_frames

__all__ = ["CHILD_BARY", "subdivide_faces", "replay_densification"]

#: (4, 3) barycentric coordinates of the four child-face centres in their parent face
#: ``(a, b, c)``, children in the order of :func:`fmgs.surfels.subdivide_midpoint`.
CHILD_BARY = np.array([[4, 1, 1], [1, 4, 1], [1, 1, 4], [2, 2, 2]], np.float64) / 6.0


def _barycentric_in(tri: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Barycentric coordinates (float64, rows sum to 1) of ``pts (N,3)`` projected onto the
    planes of triangles ``tri (N,3,3)`` (least squares on the two edge vectors)."""
    e1 = tri[:, 1] - tri[:, 0]
    e2 = tri[:, 2] - tri[:, 0]
    d = pts - tri[:, 0]
    a11, a12, a22 = (e1 * e1).sum(1), (e1 * e2).sum(1), (e2 * e2).sum(1)
    b1, b2 = (d * e1).sum(1), (d * e2).sum(1)
    det = a11 * a22 - a12 * a12
    v = (a22 * b1 - a12 * b2) / det
    w = (a11 * b2 - a12 * b1) / det
    return np.stack([1.0 - v - w, v, w], 1)


def subdivide_faces(surfels: CanonicalSurfels, face_ids, remove_ids=()) -> tuple[CanonicalSurfels, np.ndarray]:
    """Split the surfels of ``face_ids`` into four each by 1-to-4 subdivision of their faces,
    and drop the surfels (faces) of ``remove_ids``.

    Args:
        surfels: canonical surfels (module docstring of :mod:`fmgs.surfels`).
        face_ids: int indices of surfels (= faces) to split; duplicates are ignored.
        remove_ids: int indices of surfels to drop with their faces (pruning; the mesh
            gets a hole there, its vertices stay); must not overlap ``face_ids``.

    Returns:
        ``(new_surfels, source)``: the densified surfels, the unsplit ones first in their
        old order, then the children of ``unique(face_ids)`` in ascending face order, four
        per parent (:data:`CHILD_BARY` order); ``source`` is ``(S_new,)`` int64: the old
        surfel each new surfel comes from (itself or its parent), for carrying per-surfel
        learnt values.

    Raises:
        FmgsInputError: a face id out of range, or a face both split and removed.
    """
    S = surfels.num_surfels
    sel = np.unique(np.asarray(face_ids, dtype=np.int64).reshape(-1))
    rem = np.unique(np.asarray(remove_ids, dtype=np.int64).reshape(-1))
    for ids in (sel, rem):
        if ids.size and (ids[0] < 0 or ids[-1] >= S):
            raise FmgsInputError(f"densification face ids must be in 0..{S - 1}, got {ids[0]}..{ids[-1]}")
    if np.intersect1d(sel, rem).size:
        raise FmgsInputError("a densification face cannot be both split and removed")
    keep = np.ones(S, bool)
    keep[sel] = False
    keep[rem] = False
    keep_idx = np.nonzero(keep)[0]
    source = np.concatenate([keep_idx, np.repeat(sel, 4)]).astype(np.int64)
    if sel.size == 0:
        if rem.size == 0:
            return replace(surfels), source
        faces2 = np.asarray(surfels.faces, np.int64)[keep_idx]
        out = replace(surfels, **{k: np.asarray(getattr(surfels, k))[keep_idx] for k in
                                  ("centers", "rotations", "scales", "skin_weights", "part_labels", "parent_face",
                                   "parent_bary")},
                      faces=faces2, face_adjacency=_adjacency_with_hanging(np.asarray(surfels.verts), faces2))
        return out, source

    verts = np.asarray(surfels.verts)
    faces = np.asarray(surfels.faces, np.int64)
    vw = np.asarray(surfels.mesh_skin_weights)
    V = len(verts)
    # Midpoints of the selected faces' edges, one per undirected edge; computed in float32 as
    # the stored vertices are, so that a midpoint created earlier is found bit-exactly.
    pf = faces[sel]                                                   # (n, 3) a, b, c
    e = np.concatenate([pf[:, [0, 1]], pf[:, [1, 2]], pf[:, [2, 0]]])
    key = e.min(1) * V + e.max(1)
    ukey, inv = np.unique(key, return_inverse=True)
    lo, hi = ukey // V, ukey % V
    mid = (0.5 * (verts[lo].astype(np.float64) + verts[hi].astype(np.float64))).astype(verts.dtype)
    mid_w = (0.5 * (vw[lo].astype(np.float64) + vw[hi].astype(np.float64))).astype(vw.dtype)
    mid_index, fresh = _match_rows(verts, mid)
    new_v, new_w = mid[fresh], mid_w[fresh]
    mid_index[fresh] = V + np.arange(int(fresh.sum()))
    verts2 = np.concatenate([verts, new_v])
    vw2 = np.concatenate([vw, new_w])
    mids = mid_index[inv].reshape(3, -1).T                            # (n, 3): ab, bc, ca
    a, b, c = pf.T
    ab, bc, ca = mids.T
    child_faces = np.stack([np.stack([a, ab, ca], 1), np.stack([ab, b, bc], 1),
                            np.stack([ca, bc, c], 1), np.stack([ab, bc, ca], 1)], 1).reshape(-1, 3)
    faces2 = np.concatenate([faces[keep_idx], child_faces])

    par = np.repeat(sel, 4)
    tri = verts2[child_faces].astype(np.float64)
    centers_c = tri.mean(1)
    rot_c, _ = surfel_frames(tri)
    cb = np.tile(CHILD_BARY, (len(sel), 1))                           # (4n, 3)
    skin_c = np.einsum("sk,skj->sj", cb, vw[faces[par]].astype(np.float64))
    skin_c /= skin_c.sum(1, keepdims=True)
    smpl_tri = np.asarray(surfels.smpl_verts, np.float64)[np.asarray(surfels.smpl_faces)[surfels.parent_face[par]]]
    pbary_c = _barycentric_in(smpl_tri, centers_c)

    def cat(old, new):
        old = np.asarray(old)
        return np.concatenate([old[keep_idx], np.asarray(new).astype(old.dtype)])

    out = replace(
        surfels,
        centers=cat(surfels.centers, centers_c),
        rotations=cat(surfels.rotations, rot_c),
        scales=cat(surfels.scales, 0.5 * np.asarray(surfels.scales, np.float64)[par]),
        skin_weights=cat(surfels.skin_weights, skin_c),
        part_labels=cat(surfels.part_labels, np.asarray(surfels.part_labels)[par]),
        parent_face=cat(surfels.parent_face, np.asarray(surfels.parent_face)[par]),
        parent_bary=cat(surfels.parent_bary, pbary_c),
        verts=verts2,
        faces=faces2,
        mesh_skin_weights=vw2,
        face_adjacency=_adjacency_with_hanging(verts2, faces2),
    )
    return out, source


def _match_rows(verts: np.ndarray, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``pts (N,3)``: the index of a bit-identical row of ``verts``, and a mask
    of the rows with none (their index is left -1)."""
    V = len(verts)
    rows = np.ascontiguousarray(np.concatenate([verts, pts.astype(verts.dtype)])).view(np.int32)
    order = np.lexsort((np.arange(len(rows)), rows[:, 2], rows[:, 1], rows[:, 0]))
    r = rows[order]
    new_group = np.ones(len(r), bool)
    new_group[1:] = np.any(r[1:] != r[:-1], axis=1)
    group_first = order[np.nonzero(new_group)[0]][np.cumsum(new_group) - 1]   # smallest index of each row's group
    first = np.empty(len(rows), np.int64)
    first[order] = group_first
    hit = first[V:]
    fresh = hit >= V
    return np.where(fresh, -1, hit).astype(np.int64), fresh


def _adjacency_with_hanging(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """:func:`fmgs.surfels.edge_face_adjacency` plus, for every edge ``(p, q)`` used by a
    single face whose midpoint ``m`` is a vertex, the pairs of that face with the faces
    using ``(p, m)`` or ``(m, q)`` (one level of T-junction)."""
    pairs = [edge_face_adjacency(faces)]
    F, V = len(faces), len(verts)
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    fid = np.tile(np.arange(F, dtype=np.int64), 3)
    key = e.min(1) * V + e.max(1)
    order = np.argsort(key, kind="stable")
    skey, sfid = key[order], fid[order]
    count = np.searchsorted(skey, key, "right") - np.searchsorted(skey, key, "left")
    lone = np.nonzero(count == 1)[0]
    if lone.size:
        p, q = e[lone, 0], e[lone, 1]
        mid = (0.5 * (verts[p].astype(np.float64) + verts[q].astype(np.float64))).astype(verts.dtype)
        m, fresh = _match_rows(verts, mid)
        ok = ~fresh
        f, p, q, m = fid[lone][ok], p[ok], q[ok], m[ok]
        extra = []
        for u in (p, q):
            k = np.minimum(u, m) * V + np.maximum(u, m)
            lo = np.searchsorted(skey, k, "left")
            for off in (0, 1):                          # an edge has at most two faces here
                pos = np.minimum(lo + off, len(skey) - 1)
                hit = (skey[pos] == k) & (sfid[pos] != f)
                extra.append(np.stack([np.minimum(f[hit], sfid[pos][hit]), np.maximum(f[hit], sfid[pos][hit])], 1))
        pairs += extra
    allp = np.concatenate(pairs).astype(np.int64)
    k = np.unique(allp[:, 0] * F + allp[:, 1])
    return np.stack([k // F, k % F], 1)


def replay_densification(surfels: CanonicalSurfels, steps) -> tuple[CanonicalSurfels, list[np.ndarray]]:
    """Apply recorded densification steps in order (what a checkpoint stores).

    Args:
        surfels: the template surfels the run started from.
        steps: sequence of ``face_ids`` int arrays, or of ``(face_ids, remove_ids)`` pairs
            (:func:`subdivide_faces`).

    Returns:
        ``(surfels, sources)``: the densified surfels and each step's ``source`` array.
    """
    sources = []
    for step in steps:
        ids, rem = step if isinstance(step, tuple) else (step, ())
        surfels, src = subdivide_faces(surfels, ids, rem)
        sources.append(src)
    return surfels, sources
