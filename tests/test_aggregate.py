"""Instant avatar (``fmgs.trainer.init.aggregate``) on a synthetic scene with known colours.

The scene: two icospheres bound to two "bones" (sphere A, 320 faces, spins about the
vertical axis; sphere B, 80 faces, orbits A and passes in front of and behind it), seen
by a fixed pinhole camera over 12 frames. Every face is a surfel with an exactly known
colour; the images are rendered independently of the code under test as flat-colour
z-buffer images (:func:`fmgs.priors.rasterize_mesh` at 2x resolution, box-filtered to
the native size, so edges mix colours as a real camera does), with a binary mask
(coverage >= 1/2). The reference visibility comes from the same 2x face-id buffers.

Checks: exact recovery (< 2/255) of surfels that are never occluded and whose footprint
is pure whenever they face the camera; no observation of a surfel from a frame in which
the other sphere hides it (per-frame observation index); neighbour fill against a
brute-force breadth-first reference and on a constant-colour cap; rejection of an
injected outlier frame; weighted median and robust mean against brute force; the
preview bundle round trip; the warm start lowering the appearance field's colour error.
A last test runs ``fmgs-train --init aggregate`` and ``--preview`` end to end on a few
real ZJU-MoCap 377 frames (skipped without the data).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO_ROOT

from fmgs.body_model import lbs_points
from fmgs.camera import Camera
from fmgs.priors import rasterize_mesh
from fmgs.surfels import SCALE_RULE_K, CanonicalSurfels, edge_face_adjacency, subdivide_midpoint, surfel_frames
from fmgs.config import InitConfig
from fmgs.trainer.init import aggregate as ag

N_FRAMES = 12
RES = 192          # native image size (pixels)
FOCAL = 400.0      # pixels
TOL = 2.0 / 255.0
CFG = InitConfig(min_cos=0.5)   # steeper facing test: faces keep >= 2.5 px inradius on screen


# =========================================================================== scene
def _icosphere(n_sub: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    t = (1 + 5 ** 0.5) / 2
    v = np.array([(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t),
                  (0, 1, -t), (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)], float)
    f = np.array([(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2),
                  (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5),
                  (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)])
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for _ in range(n_sub):
        v, f, _, _ = subdivide_midpoint(v, f)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
    tri = v[f]
    flip = np.einsum("fc,fc->f", np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), tri.mean(1)) < 0
    f[flip] = f[flip][:, ::-1]
    return v * radius, f


def _rot_y(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _bones(i: int) -> np.ndarray:
    """(24, 4, 4) canonical -> world transforms of frame ``i``: bone 0 spins sphere A about
    the world y axis, bone 1 carries sphere B on an orbit of radius 0.85 m (in front of A
    when the orbit angle is near 0: the camera is at z = -3)."""
    B = np.tile(np.eye(4), (24, 1, 1))
    B[0, :3, :3] = _rot_y(2 * np.pi * i / N_FRAMES)
    phi = 2 * np.pi * i / N_FRAMES + 0.3
    B[1, :3, :3] = _rot_y(-1.3 * phi)
    B[1, :3, 3] = [0.85 * np.sin(phi), 0.05, -0.85 * np.cos(phi)]
    return B


def _make_scene():
    va, fa = _icosphere(2, 0.5)
    vb, fb = _icosphere(1, 0.2)
    verts = np.concatenate([va, vb])
    faces = np.concatenate([fa, fb + len(va)])
    S = len(faces)
    tri = verts[faces]
    rot, area = surfel_frames(tri)
    s = SCALE_RULE_K * np.sqrt(area)
    bone = np.r_[np.zeros(len(fa), int), np.ones(len(fb), int)]
    W = np.eye(24)[bone]
    Wv = np.eye(24)[np.r_[np.zeros(len(va), int), np.ones(len(vb), int)]]
    centers = tri.mean(1)
    rng = np.random.default_rng(7)
    colors = rng.uniform(0.3, 0.7, (S, 3))
    # Each face is textured with a linear ramp through its colour at the centre (3 / m, random
    # direction per channel), so sampling away from the exact projection (a half-pixel
    # convention error: ~4/255) shows up; the face colour is the value at its centre.
    grads = rng.normal(size=(S, 3, 3))  # (surfel, channel, xyz)
    grads *= 3.0 / np.linalg.norm(grads, axis=2, keepdims=True)
    # Constant caps around A's poles (where the camera never looks head-on): the fill test.
    ya = centers[:, 1] / 0.5
    cap_top = (bone == 0) & (ya < -0.55)          # world y is image-down: "top" = -y
    cap_bottom = (bone == 0) & (ya > 0.55)
    colors[cap_top] = [0.9, 0.2, 0.1]
    colors[cap_bottom] = [0.1, 0.3, 0.8]
    grads[cap_top | cap_bottom] = 0.0
    f32 = np.float32
    sf = CanonicalSurfels(
        centers=centers.astype(f32), rotations=rot.astype(f32), scales=np.stack([s, s], 1).astype(f32),
        skin_weights=W.astype(f32), part_labels=bone, parent_face=np.arange(S), parent_bary=np.full((S, 3), 1 / 3, f32),
        verts=verts.astype(f32), faces=faces, mesh_skin_weights=Wv.astype(f32),
        face_adjacency=edge_face_adjacency(faces), smpl_verts=verts.astype(f32), smpl_faces=faces,
        canonical_pose=np.zeros((24, 3), f32), betas=np.zeros(10, f32),
        bone_transforms=np.tile(np.eye(4, dtype=f32), (24, 1, 1)), joints=np.zeros((24, 3), f32),
        rest_joints=np.zeros((24, 3), f32), subdivisions=0)
    cam = Camera(K=[[FOCAL, 0, RES / 2], [0, FOCAL, RES / 2], [0, 0, 1]], R=np.eye(3), t=[0, 0, 3.0],
                 width=RES, height=RES)
    cam2 = cam.scaled(2.0)
    frames, ref = [], []
    for i in range(N_FRAMES):
        B = _bones(i)
        means, normals = ag.pose_surfels(B, sf.skin_weights, sf.centers, sf.rotations)
        vw = lbs_points(sf.verts, sf.mesh_skin_weights, B)
        # independent flat-colour render at 2x, box-filtered to the native size
        r2 = rasterize_mesh(cam2.world_to_camera(vw), faces, cam2.K, 2 * RES, 2 * RES)
        face2 = r2["face"]
        fi = np.maximum(face2, 0)
        # canonical point of each fragment (perspective-correct barycentrics) -> ramp colour
        p = np.einsum("hwk,hwkc->hwc", r2["bary"], np.asarray(sf.verts, np.float64)[faces[fi]])
        ramp = colors[fi] + np.einsum("hwkc,hwc->hwk", grads[fi], p - centers[fi])
        col2 = np.where(face2[..., None] >= 0, ramp, 0.0)
        image = col2.reshape(RES, 2, RES, 2, 3).mean((1, 3))
        mask = ((face2 >= 0).reshape(RES, 2, RES, 2).mean((1, 3)) >= 0.5).astype(np.float64)
        frames.append({"means": means, "normals": normals, "scales": np.asarray(sf.scales, np.float64),
                       "image": image, "mask": mask, "camera": cam,
                       "depth_map": ag.mesh_depth_map(vw, faces, cam)})
        ref.append({"face2": face2, "depth2": r2["depth"], "means": means, "normals": normals})
    return {"surfels": sf, "colors": colors, "frames": frames, "ref": ref, "camera": cam,
            "bone": bone, "caps": (cap_top, cap_bottom)}


@pytest.fixture(scope="module")
def scene():
    return _make_scene()


@pytest.fixture(scope="module")
def result(scene):
    return ag.aggregate_frames(scene["frames"], scene["surfels"].num_surfels, scene["surfels"].face_adjacency,
                               CFG, keep_observations=True)


def _footprint_faces(cam: Camera, face2: np.ndarray, uv: np.ndarray, radius: float) -> list[np.ndarray]:
    """Face ids of the 2x sub-pixels whose centres lie within ``radius`` native pixels of each ``uv``."""
    H2, W2 = face2.shape
    out = []
    r2 = 2 * radius
    for u, v in 2 * uv:
        x0, x1 = int(np.floor(u - r2)), int(np.ceil(u + r2))
        y0, y1 = int(np.floor(v - r2)), int(np.ceil(v + r2))
        xs, ys = np.meshgrid(np.arange(max(x0, 0), min(x1, W2)), np.arange(max(y0, 0), min(y1, H2)))
        near = (xs + 0.5 - u) ** 2 + (ys + 0.5 - v) ** 2 <= r2 * r2
        out.append(face2[ys[near], xs[near]])
    return out


def _facing(scene, i):
    """(S,) cos of the viewing angle, (S, 2) projections and (S,) in-image flags in frame ``i``."""
    cam, r = scene["camera"], scene["ref"][i]
    uv, z = cam.project(r["means"])
    to = cam.center[None] - r["means"]
    cos = np.einsum("sc,sc->s", r["normals"], to) / np.linalg.norm(to, axis=1)
    inside = (z > 0) & (uv >= 3).all(1) & (uv <= RES - 3).all(1)
    return cos, uv, inside


# =========================================================================== tests
def test_recovers_fully_visible_colours(scene, result):
    """Surfels whose 2-px footprint shows only themselves whenever they face the camera get
    their exact colour back (< 2/255); they are all observed in those frames."""
    S = scene["surfels"].num_surfels
    clean = np.ones(S, bool)
    expected_pairs = []
    for i in range(N_FRAMES):
        cos, uv, inside = _facing(scene, i)
        cand = np.nonzero(cos > CFG.min_cos)[0]
        clean[cand[~inside[cand]]] = False
        fp = _footprint_faces(scene["camera"], scene["ref"][i]["face2"], uv[cand], 2.0)
        pure = np.array([(f == s).all() for f, s in zip(fp, cand)])
        clean[cand[~pure]] = False
        expected_pairs.append(set(cand[pure & inside[cand]].tolist()))
    ever = np.zeros(S, bool)
    for i in range(N_FRAMES):
        ever[list(expected_pairs[i])] = True
    full = clean & ever
    assert full.sum() > 150, full.sum()
    # recall: every pure, front-facing (surfel, frame) pair of these surfels is observed
    for i, o in enumerate(result.observations):
        want = {s for s in expected_pairs[i] if full[s]}
        assert want <= set(o.index.tolist()), (i, sorted(want - set(o.index.tolist()))[:10])
    assert result.seen[full].all()
    err = np.abs(result.colors[full] - scene["colors"][full]).max()
    assert err < TOL, err
    # all seen surfels are close too (edge-mixed observations are the only error source)
    seen = result.seen
    assert np.median(np.abs(result.colors[seen] - scene["colors"][seen]).max(1)) < TOL


def test_occluded_surfels_get_no_observation(scene, result):
    """A surfel facing the camera but hidden behind the other sphere in frame i (the 2x
    z-buffer at its projection shows the other sphere >= 5 cm nearer) is absent from
    frame i's observations; such surfels still get their colour from other frames."""
    bone = scene["bone"]
    S = scene["surfels"].num_surfels
    hidden_any = np.zeros(S, bool)
    n_hidden = 0
    for i, o in enumerate(result.observations):
        cos, uv, inside = _facing(scene, i)
        r = scene["ref"][i]
        px = np.clip(np.floor(2 * uv).astype(int), 0, 2 * RES - 1)
        f_at = r["face2"][px[:, 1], px[:, 0]]
        d_at = r["depth2"][px[:, 1], px[:, 0]]
        z = scene["camera"].world_to_camera(r["means"])[:, 2]
        hidden = (cos > 0) & inside & (f_at >= 0) & (bone[np.maximum(f_at, 0)] != bone) & (d_at < z - 0.05)
        n_hidden += int(hidden.sum())
        hidden_any |= hidden
        assert not np.isin(o.index, np.nonzero(hidden)[0]).any(), i
        # an observation index is unique within a frame
        assert len(np.unique(o.index)) == len(o.index)
    assert n_hidden > 40, n_hidden  # the scene really has occlusions in both directions
    assert (bone[hidden_any] == 0).any() and (bone[hidden_any] == 1).any()
    vis = hidden_any & result.seen
    assert vis.sum() > 20
    assert np.median(np.abs(result.colors[vis] - scene["colors"][vis]).max(1)) < TOL


def test_surfel_depth_visibility_agrees_with_mesh(scene):
    """``visibility: surfels`` (2DGS median depth of the posed surfels) gives the same
    surface as the mesh z-buffer to a fraction of a millimetre and nearly the same visible
    sets; it still never observes a hidden surfel."""
    sf = scene["surfels"]
    cam = scene["camera"]
    model = ag.PreviewAvatar(sf, scene["colors"], 0.9)
    frames = []
    for i, f in enumerate(scene["frames"]):
        with torch.no_grad():
            p = model(torch.as_tensor(_bones(i), dtype=torch.float32), torch.zeros(3))
        ds = ag.surfel_depth_map(p.means, p.rotations, sf.scales, np.full(sf.num_surfels, 0.9), cam)
        dm = f["depth_map"]
        both = np.isfinite(dm) & np.isfinite(ds)
        assert both.sum() > 0.9 * np.isfinite(dm).sum()
        assert np.median(np.abs(dm[both] - ds[both])) < 2e-3
        a = set(ag.visible_surfels(f["means"], f["normals"], f["mask"], cam, dm, CFG)[0].tolist())
        b = set(ag.visible_surfels(f["means"], f["normals"], f["mask"], cam, ds, CFG)[0].tolist())
        assert len(a & b) / len(a | b) > 0.8, i
        frames.append(dict(f, depth_map=ds))
    res = ag.aggregate_frames(frames, sf.num_surfels, sf.face_adjacency, CFG, keep_observations=True)
    test_occluded_surfels_get_no_observation(scene, res)


def test_unseen_surfels_filled_from_neighbours(scene, result):
    """Surfels no frame saw (A's polar caps) are filled: equal to the cap colour where the
    cap is constant, and equal to a brute-force ring-by-ring neighbour mean."""
    cap_top, cap_bottom = scene["caps"]
    filled = result.filled
    assert filled.sum() > 10 and not (filled & result.seen).any()
    assert (result.seen | result.filled).all()
    for cap, c in ((cap_top, [0.9, 0.2, 0.1]), (cap_bottom, [0.1, 0.3, 0.8])):
        f = filled & cap
        assert f.sum() >= 5
        np.testing.assert_allclose(result.colors[f], np.broadcast_to(c, (f.sum(), 3)), atol=1e-5)

    # brute force on the same graph with random colours and a random known set
    S = scene["surfels"].num_surfels
    rng = np.random.default_rng(3)
    col = rng.uniform(0, 1, (S, 3))
    known = rng.uniform(size=S) < 0.3
    got, got_filled, sweeps = ag.fill_from_neighbours(col, known, scene["surfels"].face_adjacency)
    nb = [[] for _ in range(S)]
    for a, b in scene["surfels"].face_adjacency:
        nb[a].append(b)
        nb[b].append(a)
    ref, kn, n = col.copy(), known.copy(), 0
    while not kn.all():
        new = {s: np.mean([ref[t] for t in nb[s] if kn[t]], 0)
               for s in range(S) if not kn[s] and any(kn[t] for t in nb[s])}
        for s, v in new.items():
            ref[s] = v
            kn[s] = True
        n += 1
    assert sweeps == n and (got_filled == ~known).all()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    # a surfel with no path to a known one gets the mean known colour
    adj = np.array([[0, 1], [2, 3]])
    c4, f4, _ = ag.fill_from_neighbours(np.array([[1.0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]),
                                         np.array([True, False, False, False]), adj)
    np.testing.assert_allclose(c4, [[1, 0, 0]] * 4)


def test_outlier_frame_rejected(scene, result):
    """An extra frame with inverted colours (same pose as frame 3) does not move the fused
    colour of surfels with >= 3 clean observations; a plain weighted mean would."""
    frames = list(scene["frames"])
    bad = dict(frames[3])
    bad["image"] = np.where(bad["mask"][..., None] > 0, 1.0 - bad["image"], 0.0)
    frames.append(bad)
    S, adj = scene["surfels"].num_surfels, scene["surfels"].face_adjacency
    robust = ag.aggregate_frames(frames, S, adj, CFG, keep_observations=True)
    hit = np.zeros(S, bool)
    hit[robust.observations[-1].index] = True
    target = hit & (result.count >= 3)
    assert target.sum() > 30
    truth = scene["colors"]
    clean_err = np.abs(result.colors[target] - truth[target]).max(1)
    ok = clean_err < TOL  # surfels the clean run recovers exactly
    assert ok.mean() > 0.8
    err = np.abs(robust.colors[target] - truth[target]).max(1)
    assert err[ok].max() < TOL, err[ok].max()
    plain = ag.aggregate_frames(frames, S, adj, InitConfig(min_cos=0.5, outlier_k=1e9, min_sigma=1e9))
    assert np.abs(plain.colors[target] - truth[target]).max(1)[ok].max() > 0.05


def test_weighted_median_and_robust_fuse_brute_force():
    """Grouped weighted median and the robust mean against per-group float64 loops."""
    rng = np.random.default_rng(11)
    G, N = 60, 900
    group = rng.integers(0, G, N)
    group[group == 5] = 6  # one empty group
    vals = rng.permutation(np.arange(N)) / 997.0
    w = rng.uniform(0.05, 1.0, N)
    got = ag._group_weighted_median(group, vals, w, G)
    for g in range(G):
        sel = group == g
        if not sel.any():
            assert got[g] == 0.0
            continue
        o = np.argsort(vals[sel])
        v, ww = vals[sel][o], w[sel][o]
        k = np.nonzero(np.cumsum(ww) >= 0.5 * ww.sum() - 1e-12)[0][0]
        assert got[g] == v[k], g

    cols = np.clip(rng.normal(0.5, 0.02, (N, 3)), 0, 1)
    out = rng.uniform(size=N) < 0.1
    cols[out] = rng.uniform(0, 1, (out.sum(), 3))
    cfg = InitConfig()
    res = ag.robust_fuse(group, cols, w, G, cfg)
    for g in range(G):
        sel = np.nonzero(group == g)[0]
        if sel.size == 0:
            assert not res["seen"][g]
            continue
        c, ww = cols[sel], w[sel]

        def wmed(x):
            o = np.argsort(x)
            return x[o][np.nonzero(np.cumsum(ww[o]) >= 0.5 * ww.sum() - 1e-12)[0][0]]

        q = lambda x: np.round(x * (1 << 20)) / (1 << 20)  # noqa: E731  (the documented quantisation)
        est = np.array([wmed(q(c[:, k])) for k in range(3)])
        # medians compare quantised values but return originals; recompute on originals
        est = np.array([c[np.argmin(np.abs(q(c[:, k]) - e)), k] for k, e in enumerate(est)])
        r = np.linalg.norm(c - est, axis=1)
        thr = max(cfg.outlier_k * 1.4826 * wmed(r), cfg.min_sigma)
        inl = r <= thr
        for it in range(cfg.irls_iters + 1):
            if it:
                r = np.linalg.norm(c - est, axis=1)
                new = r <= thr
                inl = new if (ww * new).sum() > 0 else inl
            est = (ww[inl, None] * c[inl]).sum(0) / ww[inl].sum()
        np.testing.assert_allclose(res["colors"][g], est, atol=1e-6)
        assert res["inliers"][g] == inl.sum()
    # the outliers far from 0.5 are rejected
    far = out & (np.linalg.norm(cols - 0.5, axis=1) > 0.3)
    assert not res["inlier_mask"][far].any()


def test_preview_avatar_and_bundle_round_trip(scene, result, tmp_path):
    """The preview avatar poses like the NumPy LBS; its bundle reads back bit-exactly."""
    from types import SimpleNamespace

    from fmgs.bundle import read_bundle

    sf = scene["surfels"]
    model = ag.PreviewAvatar(sf, result.colors, 0.9)
    B = _bones(4)
    posed = model(torch.as_tensor(B, dtype=torch.float32), torch.zeros(3))
    means, normals = ag.pose_surfels(B, sf.skin_weights, sf.centers, sf.rotations)
    np.testing.assert_allclose(posed.means.numpy(), means, atol=1e-5)
    np.testing.assert_allclose(posed.rotations[:, :, 2].numpy(), normals, atol=1e-5)
    np.testing.assert_array_equal(posed.colors.numpy(), result.colors)

    setup = SimpleNamespace(surfels=sf, smpl=SimpleNamespace(parents=np.r_[-1, np.arange(23)]),
                            rest_joints=np.zeros((24, 3)), betas=np.zeros(10))
    path = ag.write_preview_bundle(tmp_path / "preview", setup, result.colors, 0.9, producer={"test": True})
    b = read_bundle(path)
    assert b.kind == "preview" and b.num_surfels == sf.num_surfels and not b.models
    np.testing.assert_array_equal(b.surfels["colors"], result.colors)
    np.testing.assert_array_equal(b.surfels["centers"], sf.centers)
    np.testing.assert_array_equal(b.surfels["skin_weights"], sf.skin_weights)
    np.testing.assert_array_equal(b.surfels["opacities"], np.full(sf.num_surfels, 0.9, np.float32))


def test_warm_start_lowers_colour_error(scene, result):
    """Fitting the foundation model's appearance to the fused colours lowers its colour
    error, measured independently through the model's forward pass (front-facing surfels
    of a distant camera, so view directions are near head-on)."""
    from fmgs.trainer.models.foundation import SurfelAvatar

    torch.manual_seed(0)
    mcfg = OmegaConf.create({"hash_grid": {"n_levels": 8, "n_features_per_level": 2, "log2_hashmap_size": 12,
                                           "base_resolution": 4, "max_resolution": 64},
                             "view_dependent": True, "sh_degree": 3,
                             "foundation": {"color_mlp_width": 32, "color_mlp_layers": 2,
                                            "learn_displacement": False}})
    sf = scene["surfels"]
    model = SurfelAvatar(sf, mcfg)
    eye = torch.eye(4).repeat(24, 1, 1)
    cam = torch.tensor([0.0, 0.0, -100.0])
    front = np.asarray(sf.rotations)[:, 2, 2] < -0.8  # normals towards the camera

    def err():
        with torch.no_grad():
            c = model(eye, cam).colors.numpy()
        return float(np.sqrt(((c[front] - result.colors[front]) ** 2).mean()))

    before = err()
    info = model.warm_start_appearance(result.colors, iters=150, lr_grid=3e-2, lr_mlp=1e-2)
    after = err()
    assert info["rmse_end"] < info["rmse_start"]
    assert after < 0.5 * before and after < 0.1, (before, after)


# =========================================================================== real data, CLI
TINY = ["data.image_size=96", "data.train_range=[0,12]", "data.train_step=3", "data.test_range=[455,465]",
        "data.test_step=5", "train.threads=1", "train.image_every=0", "train.checkpoint_every=0"]


def _cli(args, data_root):
    env = dict(os.environ, FMGS_DATA=str(data_root), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "fmgs.trainer.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO_ROOT)


def test_cli_init_aggregate_and_preview(tmp_path, zju377, data_root):
    """``fmgs-train --init aggregate`` logs the warm-started iteration 0 (its time counted) and
    trains on; ``fmgs-train --preview`` writes a readable preview bundle with metrics."""
    from fmgs.bundle import read_bundle

    run = tmp_path / "warm"
    r = _cli(["--out", str(run), "--init", "aggregate", "--no-eval", *TINY, "train.iterations=2",
              "train.eval_every=2", "train.eval_frames=1", "init.warmup_iters=20", "init.frame_step=1"], data_root)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((run / "aggregate.json").read_text())
    assert info["aggregate"]["frames"] == 4 and info["aggregate"]["seen"] > 1000
    assert info["warmup"]["rmse_end"] < info["warmup"]["rmse_start"]
    prog = [json.loads(x) for x in (run / "progress.jsonl").read_text().splitlines()]
    assert [p["iteration"] for p in prog] == [0, 2]
    assert 0 < prog[0]["elapsed_s"] <= prog[1]["elapsed_s"]
    assert abs(prog[0]["elapsed_s"] - info["init_seconds"]) < 0.01

    out = tmp_path / "prev"
    r = _cli(["--preview", "--out", str(out), *TINY, "eval.max_frames=1", "init.frame_step=1"], data_root)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "preview_metrics.json").read_text())
    assert m["heldout"]["num_frames"] == 1 and 15 < m["heldout"]["psnr"] < 60
    b = read_bundle(out / "preview")
    assert b.kind == "preview" and b.num_surfels == m["aggregate"]["surfels"]
    r = _cli(["--preview", "--resume", str(out)], data_root)
    assert r.returncode != 0 and "--preview" in r.stderr
