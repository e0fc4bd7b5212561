"""Priors: on-disk format, Sapiens converter / runner, body-model producer.

References are independent of the code under test: analytic sphere and plane geometry,
trimesh's ray-triangle intersection (with a brute-force box index instead of rtree), and
a NumPy/OpenCV re-implementation of the Sapiens preprocessing.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from fmgs.errors import FmgsInputError
from fmgs.priors import (MODALITIES, SAPIENS_CLASSES, SMPL_JOINT_TO_SAPIENS, PriorSet,
                         load_priors, make_meta, rasterize_mesh, smpl_face_joint_ids,
                         smpl_face_sapiens_labels)
from fmgs.sapiens import NORMAL_CONVENTIONS
from fmgs.trainer.cli.prep import parse_frames, prep_main

# ----------------------------------------------------------------------------- helpers
W, H, F = 96, 128, 100.0  # synthetic sequence: image size and focal length (px)
SPHERE_C, SPHERE_R = np.array([0.05, -0.1, 2.0]), 0.5


def _sphere(K, w, h):
    """Analytic ray-sphere intersection for every pixel centre: mask, z, OpenCV normals."""
    jj, ii = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    d = np.stack([jj, ii, np.ones_like(jj)], -1) @ np.linalg.inv(K).T
    d /= np.linalg.norm(d, axis=2, keepdims=True)
    b = d @ SPHERE_C
    disc = b * b - (SPHERE_C @ SPHERE_C - SPHERE_R ** 2)
    mask = disc > 0
    t = b - np.sqrt(np.where(mask, disc, 0))
    p = d * t[..., None]
    n = (p - SPHERE_C) / SPHERE_R
    z = np.where(mask, p[..., 2], np.nan)
    n[~mask] = np.nan
    seg = np.where(mask, np.where(p[..., 1] < SPHERE_C[1], 2, 21), 0)
    return mask, z, n, seg, d


def _make_sequence(root: Path, n_frames: int = 2) -> Path:
    """A tiny HumanNeRF-format sequence (no distortion) showing the sphere."""
    K_raw = np.array([[F, 0, W / 2 - 0.5], [0, F, H / 2 - 0.5], [0, 0, 1]])
    K = K_raw.copy()
    K[:2, 2] += 0.5  # the sequence loader's pixel-centre convention
    mask, *_ = _sphere(K, W, H)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    cams, infos = {}, {}
    for i in range(n_frames):
        name = f"frame_{i:06d}"
        img = np.zeros((H, W, 3), np.uint8)
        img[mask] = (200, 120, 90)
        cv2.imwrite(str(root / "images" / f"{name}.png"), img)
        cv2.imwrite(str(root / "masks" / f"{name}.png"), mask.astype(np.uint8) * 255)
        cams[name] = dict(intrinsics=K_raw, extrinsics=np.eye(4), distortions=np.zeros(5))
        infos[name] = dict(poses=np.zeros(72), Rh=np.zeros(3), Th=np.zeros(3),
                           joints=np.zeros((24, 3)))
    for fname, obj in (("cameras.pkl", cams), ("mesh_infos.pkl", infos)):
        with open(root / fname, "wb") as f:
            pickle.dump(obj, f)
    return root


def _seq_K():
    return np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1]])


def _write_sapiens(src: Path, names, convention: str, scale: int = 2, with_seg=True):
    """Sapiens-lite-like outputs at ``scale`` x the image size, normals in ``convention``."""
    K2 = _seq_K().copy()
    K2[:2] *= scale
    mask, z, n, seg, _ = _sphere(K2, W * scale, H * scale)
    signs = np.array(NORMAL_CONVENTIONS[convention], dtype=np.float32)
    for sub in ("seg", "depth", "normal"):
        (src / sub).mkdir(parents=True, exist_ok=True)
    for name in names:
        if with_seg:
            np.save(src / "seg" / f"{name}_seg.npy", seg.astype(np.int64))
            np.save(src / "seg" / f"{name}.npy", mask)
        # Sapiens depth is unmasked: fill the background with a far plane
        np.save(src / "depth" / f"{name}.npy", np.where(mask, z, 3.0).astype(np.float32))
        nn = np.where(mask[..., None], n, np.array([0, 0, -1.0]))
        np.save(src / "normal" / f"{name}.npy", (nn * signs).astype(np.float32))


# ----------------------------------------------------------------------------- format
def test_format_round_trip_and_load_priors(tmp_path, capsys):
    rng = np.random.default_rng(0)
    h, w = 40, 30
    ps = PriorSet(tmp_path / "priors")
    frames = {}
    for name in ("a", "b"):
        m = rng.random((h, w)) > 0.5
        d = rng.random((h, w)).astype(np.float32)
        d[~m] = np.nan
        nv = rng.normal(size=(h, w, 3))
        nv[..., 2] = -np.abs(nv[..., 2]) - 0.5  # camera facing
        nv /= np.linalg.norm(nv, axis=2, keepdims=True)
        p = rng.integers(0, 28, (h, w))
        frames[name] = dict(mask=m, depth=d, normal=nv.astype(np.float32), parts=p)
        ps.write(name, **frames[name])
    ps.write_meta(make_meta("test", "foundation-model", w, h, list(frames), MODALITIES))
    ps2 = PriorSet(tmp_path / "priors")
    for name, ref in frames.items():
        got = ps2.read(name)
        np.testing.assert_array_equal(got["mask"], ref["mask"].astype(np.uint8) * 255)
        np.testing.assert_array_equal(got["depth"], ref["depth"])  # NaNs compare equal
        np.testing.assert_array_equal(got["normal"], ref["normal"])
        np.testing.assert_array_equal(got["parts"], ref["parts"].astype(np.uint8))
    out = load_priors(tmp_path, ["a", "b"])
    assert out[0]["mask"].dtype == np.float32 and set(np.unique(out[0]["mask"])) <= {0.0, 1.0}
    np.testing.assert_array_equal(out[1]["parts"], frames["b"]["parts"])
    # resized for training: width 15 -> height 20, nearest sampling keeps ids valid
    small = load_priors(tmp_path, ["a"], image_size=15)[0]
    assert small["depth"].shape == (20, 15) and small["normal"].shape == (20, 15, 3)
    assert set(np.unique(small["parts"])) <= set(np.unique(frames["a"]["parts"]))
    # a missing modality switches off with one printed note
    for f in (tmp_path / "priors" / "normal").iterdir():
        f.unlink()
    (tmp_path / "priors" / "normal").rmdir()
    capsys.readouterr()
    out = load_priors(tmp_path, ["a", "b"])
    notes = capsys.readouterr().out
    assert notes.count("note:") == 1 and "'normal'" in notes
    assert all(o["normal"] is None and o["depth"] is not None for o in out)
    # no priors at all
    out = load_priors(tmp_path / "nothing", ["a"])
    assert "no priors found" in capsys.readouterr().out and out[0]["mask"] is None


def test_reader_rejects_bad_maps(tmp_path):
    ps = PriorSet(tmp_path)
    ps.write_meta(make_meta("test", "body-model", 8, 6, ["f"], MODALITIES))
    (tmp_path / "mask").mkdir()
    cv2.imwrite(str(tmp_path / "mask" / "f.png"), np.full((6, 8), 128, np.uint8))
    with pytest.raises(FmgsInputError, match=r"mask/f\.png.*0 or 255"):
        ps.read("f")
    cv2.imwrite(str(tmp_path / "mask" / "f.png"), np.full((6, 9), 255, np.uint8))
    with pytest.raises(FmgsInputError, match="resolution"):
        ps.read("f")
    cv2.imwrite(str(tmp_path / "mask" / "f.png"), np.full((6, 8), 255, np.uint8))
    with pytest.raises(FmgsInputError, match="0..27"):
        ps.write("f", parts=np.full((6, 8), 28))
    with pytest.raises(FmgsInputError, match="unit vectors"):
        ps.write("f", normal=np.full((6, 8, 3), 0.9, np.float32))
    # normals pointing away from the camera inside the mask: z axis flipped
    away = np.zeros((6, 8, 3), np.float32)
    away[..., 2] = 1
    (tmp_path / "normal").mkdir(exist_ok=True)
    np.save(tmp_path / "normal" / "f.npy", away)
    with pytest.raises(FmgsInputError, match=r"normal/f\.npy.*flipped"):
        ps.read("f")
    with pytest.raises(FmgsInputError, match="inf"):
        ps.write("f", depth=np.full((6, 8), np.inf, np.float32))
    meta = make_meta("test", "body-model", 8, 6, ["f"], MODALITIES)
    meta["conventions"]["normal_axes"] = "opengl"
    with pytest.raises(FmgsInputError, match="normal_axes"):
        ps.write_meta(meta)
    (tmp_path / "meta.json").write_text('{"format": "fmgs-priors", "version": 99}')
    with pytest.raises(FmgsInputError, match=r"meta\.json.*version"):
        PriorSet(tmp_path)


# ----------------------------------------------------------------------------- Sapiens
@pytest.mark.parametrize("convention", ["opengl", "opencv"])
def test_from_sapiens_detects_convention(tmp_path, convention):
    seq = _make_sequence(tmp_path / "seq")
    names = ["frame_000000", "frame_000001"]
    _write_sapiens(tmp_path / "sap", names, convention)
    rc = prep_main(["priors", "--from-sapiens", str(tmp_path / "sap"), "--sequence", str(seq)])
    assert rc == 0
    ps = PriorSet(seq / "priors")
    assert ps.meta["normal_source_convention"] == convention
    assert ps.meta["kind"] == "foundation-model" and ps.meta["resolution"] == [W, H]
    mask, z, n, seg, _ = _sphere(_seq_K(), W, H)
    inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2) > 0
    for name in names:
        got = ps.read(name)
        assert ((got["mask"] > 0) == mask).mean() > 0.98
        assert (got["parts"] == seg).mean() > 0.97
        cos = (got["normal"][inner] * n[inner]).sum(1)
        assert np.degrees(np.arccos(np.clip(cos, -1, 1))).max() < 3.0
        assert np.abs(got["depth"][inner] - z[inner]).max() < 5e-3


def test_from_sapiens_wrong_convention_fails_loudly(tmp_path, capsys):
    seq = _make_sequence(tmp_path / "seq", n_frames=1)
    _write_sapiens(tmp_path / "sap", ["frame_000000"], "opengl")
    rc = prep_main(["priors", "--from-sapiens", str(tmp_path / "sap"), "--sequence", str(seq),
                    "--normal-convention", "opencv"])
    err = capsys.readouterr().err
    assert rc == 2 and "\nerror: " in "\n" + err.replace("\r", "\n")
    assert "face the camera" in err and "outwards in y" in err
    assert "--normal-convention opengl" in err and "frame_000000.npy" in err


def test_from_sapiens_without_seg_uses_sequence_mask(tmp_path):
    seq = _make_sequence(tmp_path / "seq", n_frames=1)
    _write_sapiens(tmp_path / "sap", ["frame_000000"], "y_up_z_forward", with_seg=False)
    assert prep_main(["priors", "--from-sapiens", str(tmp_path / "sap"),
                      "--sequence", str(seq), "--out", str(tmp_path / "p")]) == 0
    ps = PriorSet(tmp_path / "p")
    assert ps.meta["normal_source_convention"] == "y_up_z_forward"
    assert ps.modalities() == ["depth", "normal"]


def test_torchscript_stand_in(tmp_path):
    torch = pytest.importorskip("torch")
    from fmgs.trainer.data.sapiens_run import SapiensModel

    class StandIn(torch.nn.Module):
        """(1,3,1024,768) -> (1,C,256,192): 4x4 average pool then a fixed 1x1 map."""

        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            y = torch.nn.functional.avg_pool2d(x, 4)
            if self.c == 1:
                return y[:, :1]
            if self.c == 3:
                return torch.stack([y[:, 0] * 0 + 0.6, y[:, 0] * 0, y[:, 0] * 0 - 0.8], 1) * 2
            k = torch.arange(self.c, dtype=x.dtype).view(1, -1, 1, 1)
            v = (y[:, :1] + 2.0) * 5.0  # class = round(5 * (normalised R + 2))
            return -(v - k) ** 2

    paths = {}
    for task, c in (("seg", 28), ("depth", 1), ("normal", 3)):
        m = torch.jit.script(StandIn(c))
        paths[task] = tmp_path / f"standin_{task}_torchscript.pt2"
        m.save(str(paths[task]))
    seq = _make_sequence(tmp_path / "seq", n_frames=1)
    img = cv2.cvtColor(cv2.imread(str(seq / "images" / "frame_000000.png")), cv2.COLOR_BGR2RGB)
    # independent reference of Sapiens preprocessing + depth stand-in + resize back
    x = cv2.resize(img, (768, 1024), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    xr = (x[..., 0] - 123.675) / 58.395
    pooled = xr.reshape(256, 4, 192, 4).mean((1, 3))
    ref = cv2.resize(pooled.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
    depth = SapiensModel(paths["depth"])(img)
    assert depth.shape == (H, W) and depth.dtype == np.float32
    np.testing.assert_allclose(depth, ref, atol=2e-3)
    seg = SapiensModel(paths["seg"])(img)
    expect = np.clip(np.round((ref + 2.0) * 5.0), 0, 27)
    inner = np.abs((ref + 2.0) * 5.0 - np.round((ref + 2.0) * 5.0)) < 0.3
    assert seg.dtype == np.int64 and (seg[inner] == expect[inner]).all()
    normal = SapiensModel(paths["normal"])(img)
    np.testing.assert_allclose(normal, np.broadcast_to([0.6, 0, -0.8], (H, W, 3)), atol=1e-6)
    # end to end through the CLI (seg + depth; the constant stand-in normals would fail
    # the silhouette check, as they should)
    rc = prep_main(["priors", "--sapiens-model", str(paths["seg"]), "--sapiens-model",
                    str(paths["depth"]), "--sequence", str(seq)])
    assert rc == 0
    got = PriorSet(seq / "priors").read("frame_000000")
    np.testing.assert_array_equal(got["parts"], seg.astype(np.uint8))
    np.testing.assert_allclose(got["depth"], ref, atol=2e-3)
    assert got["normal"] is None
    rc = prep_main(["priors", "--sapiens-model", str(paths["normal"]), "--sequence", str(seq),
                    "--out", str(tmp_path / "p2"), "--normal-convention", "opencv"])
    assert rc == 2


# ----------------------------------------------------------------------------- body model
def test_rasterizer_perspective_correct_depth():
    """A tilted quad: depth must equal the exact ray-plane intersection at every pixel."""
    K = np.array([[300.0, 0, 64], [0, 300.0, 48], [0, 0, 1]])
    V = np.array([[-1, -1, 2.0], [1, -1, 4.0], [1, 1, 4.0], [-1, 1, 2.0]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    r = rasterize_mesh(V, faces, K, 128, 96)
    jj, ii = np.meshgrid(np.arange(128) + 0.5, np.arange(96) + 0.5)
    d = np.stack([jj, ii, np.ones_like(jj)], -1) @ np.linalg.inv(K).T
    nrm = np.cross(V[1] - V[0], V[2] - V[0])
    t = (nrm @ V[0]) / (d @ nrm)
    p = d * t[..., None]
    inside = (np.abs(p[..., 0]) < 1) & (np.abs(p[..., 1]) < 1)
    assert (r["mask"] == inside).mean() > 0.99
    both = r["mask"] & inside
    np.testing.assert_allclose(r["depth"][both], p[..., 2][both], rtol=1e-9)
    # barycentrics reproduce the 3D point
    pts = np.einsum("nk,nkc->nc", r["bary"][both], V[faces[r["face"][both]]])
    np.testing.assert_allclose(pts, p[both], atol=1e-9)


def test_smpl_left_right_mapping(smpl_path):
    from fmgs.body_model import load_smpl

    smpl = load_smpl(smpl_path)
    verts, joints = smpl.shape()
    assert joints[1, 0] > 0 and joints[2, 0] < 0  # left hip at +x (the body's own left)
    jid, source = smpl_face_joint_ids(smpl)
    assert "segm" in source
    lab = smpl_face_sapiens_labels(jid)
    cx = verts[smpl.faces].mean(1)[:, 0]
    left = np.array([SAPIENS_CLASSES[c].startswith("Left_") for c in lab])
    right = np.array([SAPIENS_CLASSES[c].startswith("Right_") for c in lab])
    assert (cx[left] > 0).mean() > 0.99 and (cx[right] < 0).mean() > 0.99
    # every mapped label is one of the ten limb classes, Face_Neck or Torso
    assert set(np.unique(SMPL_JOINT_TO_SAPIENS)) == {2, 4, 5, 6, 7, 10, 11, 13, 14, 15, 16,
                                                      19, 20, 21}


class _BoxIndex:
    """Brute-force stand-in for trimesh's rtree index (rtree is not a dependency)."""

    def __init__(self, tris):
        self.lo, self.hi = tris.min(1), tris.max(1)
        self.bounds = np.concatenate([self.lo.min(0), self.hi.max(0)])

    def intersection(self, b):
        b = np.asarray(b)
        return np.nonzero(((self.hi >= b[:3]) & (self.lo <= b[3:])).all(1))[0]


def test_body_model_priors_match_ray_cast(zju377, smpl_path, tmp_path):
    from trimesh.ray.ray_triangle import ray_triangle_id

    from fmgs.priors import BodyModelPriorProducer
    from fmgs.trainer.data.humannerf import HumanNeRFSequence

    seq = HumanNeRFSequence(zju377, split="all", smpl_path=smpl_path)
    prod = BodyModelPriorProducer(seq)
    rng = np.random.default_rng(1)
    for name in (seq.all_names[30], seq.all_names[400]):
        cam = seq.camera(name)
        assert (cam.width, cam.height) == (512, 512)
        r = prod.render(name)
        Vc = cam.world_to_camera(prod.posed_world_vertices(name))
        tris = Vc[prod.smpl.faces]
        # rays: 3000 random pixels inside the projected bounding box of the body (+ margin)
        uv = Vc[:, :2] / Vc[:, 2:] @ cam.K[:2, :2].T + cam.K[:2, 2]
        lo = np.maximum(np.floor(uv.min(0)) - 5, 0).astype(int)
        hi = np.minimum(np.ceil(uv.max(0)) + 5, 511).astype(int)
        n = 3000
        jj = rng.integers(lo[0], hi[0] + 1, n)
        ii = rng.integers(lo[1], hi[1] + 1, n)
        d = np.stack([jj + 0.5, ii + 0.5, np.ones(n)], 1) @ np.linalg.inv(cam.K).T
        tri, ray, loc = ray_triangle_id(tris, np.zeros((n, 3)), d, tree=_BoxIndex(tris))
        order = np.lexsort((loc[:, 2], ray))
        tri, ray, loc = tri[order], ray[order], loc[order]
        first = np.r_[True, ray[1:] != ray[:-1]]
        z_ref = np.full(n, np.nan)
        f_ref = np.full(n, -1)
        z_ref[ray[first]] = loc[first, 2]
        f_ref[ray[first]] = tri[first]
        hit = f_ref >= 0
        got_mask = r["mask"][ii, jj] > 0
        assert hit.sum() > 500
        assert (got_mask == hit).mean() > 0.995
        both = got_mask & hit
        err = np.abs(r["depth"][ii, jj][both] - z_ref[both])
        assert np.median(err) < 1e-3 and np.percentile(err, 95) < 1e-2
        lab_ref = prod.face_labels[f_ref[both]]
        assert (r["parts"][ii, jj][both] == lab_ref).mean() > 0.99
        # normals: unit, camera facing, close to the hit face's geometric normal
        nrm = r["normal"][ii, jj][both].astype(np.float64)
        np.testing.assert_allclose(np.linalg.norm(nrm, axis=1), 1, atol=1e-5)
        assert ((nrm * d[both]).sum(1) < 0).all()
        t = tris[f_ref[both]]
        fn = np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])
        fn /= np.linalg.norm(fn, axis=1, keepdims=True)
        fn *= -np.sign((fn * d[both]).sum(1, keepdims=True))
        ang = np.degrees(np.arccos(np.clip((nrm * fn).sum(1), -1, 1)))
        assert np.median(ang) < 10
        assert not np.isfinite(r["depth"][~(r["mask"] > 0)]).any()


def test_cli_body_model_and_producer_guard(zju377, smpl_path, tmp_path, capsys):
    out = tmp_path / "priors"
    rc = prep_main(["priors", "--from-body-model", "--sequence", str(zju377), "--out", str(out),
                    "--smpl-path", str(smpl_path), "--frames", "0,10:13"])
    assert rc == 0
    ps = PriorSet(out)
    assert ps.meta["kind"] == "body-model" and ps.meta["depth_units"] == "metres"
    assert ps.meta["frames"] == ["frame_000000", "frame_000010", "frame_000011", "frame_000012"]
    pri = load_priors(zju377, ps.meta["frames"], image_size=256, priors_dir=out)
    assert all(p[m] is not None for p in pri for m in MODALITIES)
    assert pri[0]["mask"].shape == (256, 256)
    # the real mask and the body-model mask mostly agree
    from fmgs.trainer.data.humannerf import HumanNeRFSequence

    seq = HumanNeRFSequence(zju377, frames=["frame_000000"], smpl_path=smpl_path,
                            image_size=256)
    real = seq[0].mask > 0
    prior = pri[0]["mask"] > 0
    assert (real & prior).sum() / (real | prior).sum() > 0.7
    capsys.readouterr()
    rc = prep_main(["priors", "--from-sapiens", str(tmp_path), "--sequence", str(zju377),
                    "--out", str(out)])
    assert rc == 2 and "another producer" in capsys.readouterr().err


def test_parse_frames():
    names = [f"f{i}" for i in range(10)]
    assert parse_frames(None, names) == names
    assert parse_frames("0,2:5,f9,2", names) == ["f0", "f2", "f3", "f4", "f9"]
    assert parse_frames("::4", names) == ["f0", "f4", "f8"]
    with pytest.raises(FmgsInputError, match="out of range"):
        parse_frames("10", names)
    with pytest.raises(FmgsInputError, match="unknown frame"):
        parse_frames("nope", names)
