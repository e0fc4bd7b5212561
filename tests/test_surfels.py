"""Canonical surfels (paper Sec. 4.1.1) on the real SMPL model with subject 377's shape."""
from __future__ import annotations

import time

import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

from fmgs.body_model import fit_betas_from_joints, forward_kinematics, axis_angle_to_matrix, \
    load_smpl, star_pose
from fmgs.errors import FmgsInputError
from fmgs.pickle_io import load_pickle
from fmgs.surfels import (SCALE_RULE_K, CanonicalSurfels, build_canonical_surfels,
                          edge_face_adjacency, fold_smplh_parts, load_npz, save_npz,
                          subdivide_midpoint)


@pytest.fixture(scope="module")
def smpl(smpl_path):
    return load_smpl(smpl_path)


@pytest.fixture(scope="module")
def parts_path(data_root):
    p = data_root / "body_models" / "smpl" / "smplh_parts_segm.pkl"
    if not p.is_file():
        pytest.skip(f"{p} not found")
    return p


@pytest.fixture(scope="module")
def betas377(smpl, zju377):
    joints = np.asarray(load_pickle(zju377 / "canonical_joints.pkl")["joints"])
    betas, rms = fit_betas_from_joints(smpl, joints)
    assert rms < 2e-3
    return betas


@pytest.fixture(scope="module")
def surfels(smpl, betas377, parts_path):
    t0 = time.perf_counter()
    s = build_canonical_surfels(smpl, betas377, "star", parts_path=parts_path)
    assert time.perf_counter() - t0 < 3.0
    return s


# ----------------------------------------------------------------------------- subdivision
def test_subdivide_matches_trimesh_and_keeps_orientation(smpl):
    v, f = smpl.v_template, smpl.faces
    v2, f2, parent, src = subdivide_midpoint(v, f)
    assert v2.shape == (27554, 3) and f2.shape == (55104, 3)
    assert np.array_equal(parent, np.repeat(np.arange(len(f)), 4))
    # same vertex set as trimesh's independent implementation
    tv, tf = trimesh.remesh.subdivide(v, f)
    assert tv.shape == v2.shape and tf.shape == f2.shape
    a = v2[np.lexsort(v2.T[::-1])]
    b = tv[np.lexsort(tv.T[::-1])]
    assert np.allclose(a, b, atol=1e-12)
    # vertex_sources reproduce the midpoints
    assert np.allclose(v2, 0.5 * (v[src[:, 0]] + v[src[:, 1]]))
    # children face the same way as their parent, and the mesh stays closed and outward
    n_parent = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    n_child = np.cross(v2[f2[:, 1]] - v2[f2[:, 0]], v2[f2[:, 2]] - v2[f2[:, 0]])
    assert np.all(np.einsum("ij,ij->i", n_child, n_parent[parent]) > 0)
    m = trimesh.Trimesh(v2, f2, process=False)
    assert m.is_watertight and m.is_winding_consistent and m.volume > 0
    assert np.isclose(m.volume, trimesh.Trimesh(v, f, process=False).volume)


def test_subdivide_rejects_bad_input():
    with pytest.raises(FmgsInputError):
        subdivide_midpoint(np.zeros((3, 2)), np.array([[0, 1, 2]]))
    with pytest.raises(FmgsInputError):
        subdivide_midpoint(np.zeros((3, 3)), np.array([[0, 1, 5]]))


# ----------------------------------------------------------------------------- layout
def test_counts_and_dtypes(surfels):
    s = surfels
    assert isinstance(s, CanonicalSurfels)
    assert s.num_surfels == 55104 and s.verts.shape == (27554, 3)
    assert s.faces.shape == (55104, 3)
    for name in ("centers", "rotations", "scales", "skin_weights", "parent_bary", "verts"):
        assert getattr(s, name).dtype == np.float32, name
    assert s.rotations.shape == (55104, 3, 3) and s.scales.shape == (55104, 2)
    assert s.skin_weights.shape == (55104, 24) and s.part_labels.shape == (55104,)
    assert s.bone_transforms.shape == (24, 4, 4) and s.joints.shape == (24, 3)


def test_centers_are_face_barycentres(surfels):
    s = surfels
    rng = np.random.default_rng(0)
    for k in rng.choice(s.num_surfels, 300, replace=False):
        a, b, c = (s.verts[i].astype(np.float64) for i in s.faces[k])
        assert np.allclose(s.centers[k], (a + b + c) / 3.0, atol=1e-6)
    # and lie inside their parent SMPL face at parent_bary
    tri = s.smpl_verts[s.smpl_faces[s.parent_face]].astype(np.float64)
    recon = np.einsum("sk,skd->sd", s.parent_bary.astype(np.float64), tri)
    assert np.abs(recon - s.centers).max() < 1e-5
    assert np.allclose(s.parent_bary.sum(1), 1, atol=1e-6) and s.parent_bary.min() > 0


def test_rotations_orthonormal_and_normals_outward(surfels):
    s = surfels
    R = s.rotations.astype(np.float64)
    assert np.abs(np.einsum("sji,sjk->sik", R, R) - np.eye(3)).max() < 1e-5
    assert np.allclose(np.linalg.det(R), 1.0, atol=1e-5)
    tri = s.verts[s.faces].astype(np.float64)
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    n = np.cross(e1, e2)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    assert np.abs(R[:, :, 2] - n).max() < 1e-3  # verts stored as float32
    assert np.abs(R[:, :, 0] - e1 / np.linalg.norm(e1, axis=1, keepdims=True)).max() < 1e-3
    assert np.abs(np.cross(R[:, :, 0], R[:, :, 1]) - R[:, :, 2]).max() < 1e-5  # t_w = t_u x t_v
    # trimesh: closed, positive volume => its (our) face normals point outwards
    m = trimesh.Trimesh(s.verts.astype(np.float64), s.faces, process=False)
    assert m.is_watertight and m.volume > 0
    assert np.einsum("ij,ij->i", m.face_normals, R[:, :, 2]).min() > 0.9999
    # torso (pelvis, spine1-3): normals point away from the vertical torso axis
    torso = np.isin(s.part_labels, [0, 3, 6, 9])
    c = s.centers[torso].astype(np.float64)
    radial = c - c.mean(0)
    radial[:, 1] = 0.0
    frac = np.mean(np.einsum("ij,ij->i", radial, R[torso, :, 2]) > 0)
    assert frac > 0.9, frac


def test_skin_weights_brute_force_barycentric(surfels, smpl):
    s = surfels
    assert np.allclose(s.skin_weights.sum(1), 1, atol=1e-5) and s.skin_weights.min() >= 0
    assert np.allclose(s.mesh_skin_weights.sum(1), 1, atol=1e-5)
    V = s.smpl_verts.astype(np.float64)
    F = smpl.faces
    A, B, C = V[F[:, 0]], V[F[:, 1]], V[F[:, 2]]
    rng = np.random.default_rng(1)
    for k in rng.choice(s.num_surfels, 60, replace=False):
        p = s.centers[k].astype(np.float64)
        # find the SMPL face containing p by brute force over all faces
        e0, e1, ep = B - A, C - A, p - A
        d00, d01, d11 = (e0 * e0).sum(1), (e0 * e1).sum(1), (e1 * e1).sum(1)
        d20, d21 = (ep * e0).sum(1), (ep * e1).sum(1)
        den = d00 * d11 - d01 * d01
        v = (d11 * d20 - d01 * d21) / den
        w = (d00 * d21 - d01 * d20) / den
        u = 1 - v - w
        proj = u[:, None] * A + v[:, None] * B + w[:, None] * C
        dist = np.linalg.norm(proj - p, axis=1)
        inside = (u > -1e-4) & (v > -1e-4) & (w > -1e-4) & (dist < 1e-5)
        hits = np.flatnonzero(inside)
        assert len(hits) == 1, (k, hits)
        f = hits[0]
        assert f == s.parent_face[k]
        bary = np.array([u[f], v[f], w[f]])
        expect = bary @ smpl.weights[F[f]]
        assert np.allclose(s.skin_weights[k], expect, atol=1e-5)


def test_part_labels(surfels, parts_path):
    s = surfels
    assert set(np.unique(s.part_labels)) == set(range(24))
    segm = np.asarray(load_pickle(parts_path)["segm"])
    # folding matches the README: 22-36 left-hand fingers -> 22, 37-51 right -> 23
    folded = fold_smplh_parts(segm)
    assert np.array_equal(folded[segm < 22], segm[segm < 22])
    assert np.all(folded[(segm >= 22) & (segm <= 36)] == 22)
    assert np.all(folded[segm >= 37] == 23)
    assert np.array_equal(s.part_labels, folded[s.parent_face])
    # independent source: the dominant skinning weight agrees for most surfels
    agree = np.mean(np.argmax(s.skin_weights, 1) == s.part_labels)
    assert agree > 0.8, agree
    # hand labels sit next to the hand joints (SMPL +x = subject's left)
    for j in (22, 23):
        c = s.centers[s.part_labels == j]
        d = np.linalg.norm(c - s.joints[j], axis=1)
        nearest = np.argmin(np.linalg.norm(c.mean(0) - s.joints, axis=1))
        assert np.median(d) < 0.12 and nearest in (j, j - 2), (j, nearest)
    assert s.centers[s.part_labels == 22, 0].mean() > 0.5
    assert s.centers[s.part_labels == 23, 0].mean() < -0.5
    # surfels nearest to each end-effector joint carry that joint's label
    for j in (10, 11):  # toes
        near = np.argsort(np.linalg.norm(s.centers - s.joints[j], axis=1))[:50]
        assert np.mean(s.part_labels[near] == j) > 0.5, j
    # SMPL's hand joints sit in the palm, which SMPL-H labels 'wrist' (20/21); the
    # fingertips (extreme x with arms out) are the folded finger labels
    assert np.all(s.part_labels[np.argsort(-s.centers[:, 0])[:200]] == 22)
    assert np.all(s.part_labels[np.argsort(s.centers[:, 0])[:200]] == 23)
    # (the head joint sits at the skull base, amid neck surfels): check the crown instead
    top = np.argsort(-s.centers[:, 1])[:200]
    assert np.all(s.part_labels[top] == 15)


def test_part_labels_fallback_and_errors(smpl, tmp_path):
    s = build_canonical_surfels(smpl, None, "tpose", subdivisions=0)
    assert np.array_equal(s.part_labels, np.argmax(s.skin_weights, 1))
    missing = tmp_path / "nope.pkl"
    with pytest.raises(FmgsInputError, match="nope.pkl"):
        build_canonical_surfels(smpl, None, parts_path=missing)
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(FmgsInputError, match="bad.pkl"):
        build_canonical_surfels(smpl, None, parts_path=bad)
    with pytest.raises(FmgsInputError):
        build_canonical_surfels(smpl, None, canonical_pose="apose")
    with pytest.raises(FmgsInputError):
        build_canonical_surfels(smpl, None, canonical_pose=np.zeros(10))
    with pytest.raises(FmgsInputError):
        build_canonical_surfels(smpl, None, subdivisions=7)
    with pytest.raises(FmgsInputError):
        build_canonical_surfels(smpl, None, scale_multiplier=0)
    with pytest.raises(FmgsInputError):
        fold_smplh_parts(np.array([0, 52]))


def test_adjacency(surfels):
    s = surfels
    adj = s.face_adjacency
    assert adj.dtype == np.int64 and np.all(adj[:, 0] < adj[:, 1])
    assert len(adj) == 3 * s.num_surfels // 2  # closed mesh: E = 3F/2
    deg = np.bincount(adj.ravel(), minlength=s.num_surfels)
    assert np.all(deg == 3)
    # symmetric as a graph and each pair shares exactly one edge (2 vertices)
    nb = s.neighbours()
    for k in np.random.default_rng(2).choice(s.num_surfels, 200, replace=False):
        assert len(nb[k]) == 3
        for j in nb[k]:
            assert k in nb[j]
            assert len(set(s.faces[k]) & set(s.faces[j])) == 2
    # same set as trimesh's face adjacency
    m = trimesh.Trimesh(s.verts, s.faces, process=False)
    ref = np.unique(np.sort(m.face_adjacency, 1), axis=0)
    assert np.array_equal(ref, adj)
    # boundary edges contribute nothing; a lone triangle has no neighbours
    assert edge_face_adjacency(np.array([[0, 1, 2]])).shape == (0, 2)


def test_scale_rule_covers_surface(surfels, smpl):
    s = surfels
    tri = s.verts[s.faces].astype(np.float64)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    assert np.allclose(s.scales[:, 0], SCALE_RULE_K * np.sqrt(area), rtol=1e-3)  # float32 verts
    assert np.array_equal(s.scales[:, 0], s.scales[:, 1])
    # summed 2D-Gaussian density at random surface points: no holes, roughly uniform.
    # Each surfel integrates to 2*pi*s^2 = 2*area over its plane, so the mean is ~2.
    rng = np.random.default_rng(3)
    fidx = rng.choice(s.num_surfels, 4000)
    r = rng.dirichlet([1, 1, 1], 4000)
    pts = np.einsum("nk,nkd->nd", r, tri[fidx])
    tree = cKDTree(s.centers)
    sig = s.scales[:, 0].astype(np.float64)
    dens = np.zeros(len(pts))
    for i, nbrs in enumerate(tree.query_ball_point(pts, 4 * sig.max())):
        nbrs = np.asarray(nbrs)
        d = pts[i] - s.centers[nbrs]
        n = s.rotations[nbrs, :, 2]
        dn = np.einsum("ij,ij->i", d, n)
        d2 = np.einsum("ij,ij->i", d, d) - dn ** 2
        g = np.exp(-0.5 * d2 / sig[nbrs] ** 2)
        g[np.abs(dn) > 2 * sig[nbrs]] = 0  # other side of a thin part
        dens[i] = g.sum()
    assert 1.5 < dens.mean() < 2.5, dens.mean()
    assert np.percentile(dens, 1) > 1.2, np.percentile(dens, 1)  # ~1.6 observed
    s2 = build_canonical_surfels(smpl, s.betas, s.canonical_pose, scale_multiplier=2.0)
    assert np.allclose(s2.scales, 2 * s.scales, rtol=1e-5)


def test_canonical_pose_and_bone_transforms(surfels, smpl, betas377):
    s = surfels
    rest_v, rest_j = smpl.shape(betas377)
    assert np.allclose(s.rest_joints, rest_j, atol=1e-6)
    assert np.allclose(s.canonical_pose, star_pose())
    # G_c maps rest joints to canonical joints and rest vertices to canonical vertices
    G = s.bone_transforms.astype(np.float64)
    hom = np.concatenate([rest_j, np.ones((24, 1))], 1)
    assert np.allclose(np.einsum("jab,jb->ja", G, hom)[:, :3], s.joints, atol=1e-5)
    _, posed = smpl.forward(betas377, star_pose())
    assert np.allclose(s.joints, posed, atol=1e-5)
    G2, _ = forward_kinematics(axis_angle_to_matrix(star_pose()), rest_j, smpl.parents)
    assert np.allclose(G, G2, atol=1e-6)
    verts, _ = smpl.forward(betas377, star_pose())
    assert np.allclose(s.smpl_verts, verts, atol=1e-5)
    # star pose spreads the legs: ankles farther apart than in the rest pose
    assert abs(s.joints[7, 0] - s.joints[8, 0]) > abs(rest_j[7, 0] - rest_j[8, 0]) + 0.2
    # T-pose: identity transforms, canonical mesh = shaped template
    t = build_canonical_surfels(smpl, betas377, "tpose", subdivisions=0)
    assert np.allclose(t.bone_transforms, np.eye(4), atol=1e-6)
    assert np.allclose(t.smpl_verts, rest_v, atol=1e-6)
    assert t.num_surfels == 13776


def test_two_levels_and_npz_roundtrip(smpl, tmp_path):
    s = build_canonical_surfels(smpl, None, "star", subdivisions=2)
    assert s.num_surfels == 13776 * 16
    assert np.array_equal(s.parent_face, np.repeat(np.arange(13776), 16))
    tri = s.smpl_verts[s.smpl_faces[s.parent_face]].astype(np.float64)
    assert np.abs(np.einsum("sk,skd->sd", s.parent_bary, tri) - s.centers).max() < 1e-5
    p = tmp_path / "s.npz"
    save_npz(s, p)
    r = load_npz(p)
    for name in ("centers", "rotations", "faces", "face_adjacency", "bone_transforms"):
        assert np.array_equal(getattr(r, name), getattr(s, name))
    assert r.subdivisions == 2
    with pytest.raises(FmgsInputError, match="missing.npz"):
        load_npz(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(FmgsInputError, match="junk.npz"):
        load_npz(tmp_path / "junk.npz")
