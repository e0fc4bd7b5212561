"""Tests of the motion readers (fmgs.motion).

References: the raw arrays of the real AMASS / AIST++ / SMPL / ZJU-MoCap files
(shared data), scipy's Rotation / Slerp in float64, np.interp, posed SMPL
meshes from fmgs.body_model (upright check), and the ZJU-MoCap posed joints
stored by HumanNeRF (world = rodrigues(Rh) @ joints + Th).
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation, Slerp

from fmgs.body_model import fit_betas_from_joints, load_smpl
from fmgs.errors import FmgsInputError
from fmgs.motion import (
    UP_AXES,
    Motion,
    axis_angle_to_quat,
    detect_up_axis,
    load_motion,
    main,
    quat_slerp,
    quat_to_axis_angle,
    resample_motion,
    world_from_up,
)
from fmgs.pickle_io import load_pickle

AMASS = ("amass_repo__amass_sample.npz", "amass_repo__dmpl_sample.npz", "human_body_prior__amass_sample.npz")
HEAD, PELVIS, L_ANKLE, R_ANKLE = 15, 0, 7, 8


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def motion_dir(data_root: Path) -> Path:
    p = data_root / "motion"
    if not (p / "amass_samples").is_dir():
        pytest.skip(f"motion clips not found at {p}")
    return p


@pytest.fixture(scope="module")
def smpl(smpl_path):
    return load_smpl(smpl_path)


def _load_quiet(path, **kw) -> Motion:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_motion(path, **kw)


def _world_joints(model, m: Motion, t: int, betas=None) -> np.ndarray:
    """Posed SMPL joints of frame t in the player's world (independent of the reader's up detection)."""
    _, joints = model.forward(betas=betas, pose=m.poses[t])
    wfb = m.world_from_body(t)
    return joints @ wfb[:3, :3].T + wfb[:3, 3]


def _assert_upright(model, m: Motion, n: int = 9) -> None:
    """Feet below the pelvis in every sampled frame; head above the pelvis along +Y in the typical frame.

    (A single frame may bend the torso level with the hips, e.g. a fencing lunge.)
    """
    head_up = []
    for t in np.linspace(0, m.num_frames - 1, n).astype(int):
        j = _world_joints(model, m, t)
        assert j[PELVIS, 1] - min(j[L_ANKLE, 1], j[R_ANKLE, 1]) > 0.3, f"{m.source} frame {t}: feet not below pelvis"
        head_up.append(j[HEAD, 1] - j[PELVIS, 1])
    assert np.median(head_up) > 0.35, f"{m.source}: head not above pelvis along +Y ({np.round(head_up, 2)})"


# --------------------------------------------------------------------------- real files
@pytest.mark.parametrize("name", AMASS)
def test_amass_real_file(motion_dir, smpl, name):
    path = motion_dir / "amass_samples" / name
    raw = np.load(path)
    m = load_motion(path)
    t = raw["poses"].shape[0]
    assert m.kind == "amass" and m.source == str(path)
    assert m.poses.shape == (t, 24, 3) and m.trans.shape == (t, 3) and m.poses.dtype == np.float64
    assert m.fps == 120.0  # dmpl sample stores 120.00004577636719 (float32 artefact)
    np.testing.assert_array_equal(m.poses[:, :22].reshape(t, 66), raw["poses"][:, :66])
    np.testing.assert_array_equal(m.poses[:, 22:], 0.0)  # SMPL hand joints: zero rotation
    np.testing.assert_array_equal(m.trans, raw["trans"])
    np.testing.assert_array_equal(m.betas, raw["betas"])
    # AMASS is Z-up: the player's +Y is the file's +Z
    np.testing.assert_allclose(m.world_from_motion[:3, :3] @ [0, 0, 1], [0, 1, 0], atol=1e-15)
    _assert_upright(smpl, m)


def test_aist_demo_npz(motion_dir, smpl):
    path = motion_dir / "smpl72_sequences" / "aist_demo.npz"
    raw = np.load(path)
    with pytest.warns(UserWarning, match="no frame rate"):
        m = load_motion(path)
    assert m.kind == "smpl" and m.poses.shape == (320, 24, 3) and m.fps == 30.0
    np.testing.assert_array_equal(m.poses.reshape(320, 72), raw["poses"].astype(np.float64))
    np.testing.assert_array_equal(m.trans, raw["trans"].astype(np.float64))
    # the demo is stored in an OpenCV-like (y down) frame: detected, flipped upright
    np.testing.assert_allclose(m.world_from_motion[:3, :3] @ [0, -1, 0], [0, 1, 0], atol=1e-15)
    _assert_upright(smpl, m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit source rate: no warning
        m60 = load_motion(path, source_fps=60)
    assert m60.fps == 60.0 and m60.num_frames == 320


@pytest.mark.parametrize("name", ["eating.npy", "walking.npy", "fencing.npy"])
def test_plain_smpl_npy(motion_dir, smpl, name):
    path = motion_dir / "smpl72_sequences" / name
    raw = np.load(path)
    m = _load_quiet(path)
    assert m.kind == "smpl" and m.poses.shape == (len(raw), 24, 3) and m.fps == 30.0
    np.testing.assert_array_equal(m.poses.reshape(len(raw), 72), raw.astype(np.float64))
    np.testing.assert_array_equal(m.trans, 0.0)
    _assert_upright(smpl, m, n=5)


def test_aistpp_pickle_and_npz(motion_dir, smpl, tmp_path):
    """AIST++ layout (smpl_poses / smpl_trans / smpl_scaling) built from the real AIST++ demo dance."""
    raw = np.load(motion_dir / "smpl72_sequences" / "aist_demo.npz")
    poses, trans = raw["poses"][:40].astype(np.float64), raw["trans"][:40].astype(np.float64)
    scaling = np.array([93.77])
    d = {"smpl_poses": poses.reshape(40, 24, 3), "smpl_trans": trans * scaling, "smpl_scaling": scaling,
         "smpl_loss": 1.5}
    pkl = tmp_path / "gBR_sBM_cAll_d04_mBR0_ch01.pkl"
    pkl.write_bytes(pickle.dumps(d, protocol=pickle.HIGHEST_PROTOCOL))
    npz = tmp_path / "aist.npz"
    np.savez(npz, smpl_poses=poses, smpl_trans=trans * scaling, smpl_scaling=scaling)
    for path in (pkl, npz):
        m = load_motion(path)
        assert m.kind == "aistpp" and m.fps == 60.0 and m.poses.shape == (40, 24, 3)
        np.testing.assert_array_equal(m.poses.reshape(40, 72), poses)
        np.testing.assert_allclose(m.trans, trans, rtol=1e-14, atol=1e-15)  # trans / scaling, metres
        _assert_upright(smpl, m, n=5)
    bad = dict(d, smpl_scaling=np.array([-1.0]))
    pkl.write_bytes(pickle.dumps(bad))
    with pytest.raises(FmgsInputError, match="smpl_scaling"):
        load_motion(pkl)


def test_zju_humannerf_sequence(zju377, smpl):
    """mesh_infos.pkl re-expressed as SMPL root + transl reproduces HumanNeRF's world joints."""
    m = _load_quiet(zju377)
    infos = load_pickle(zju377 / "mesh_infos.pkl")
    names = sorted(infos)
    assert m.kind == "humannerf" and m.num_frames == len(names) == 570
    canon = load_pickle(zju377 / "canonical_joints.pkl")["joints"]
    betas, _ = fit_betas_from_joints(smpl, np.asarray(canon, dtype=np.float64))
    for t in (0, 123, 569):
        info = infos[names[t]]
        rh = Rotation.from_rotvec(np.asarray(info["Rh"], dtype=np.float64)).as_matrix()
        ref = np.asarray(info["joints"], dtype=np.float64) @ rh.T + np.asarray(info["Th"], dtype=np.float64)
        _, joints = smpl.forward(betas=betas, pose=m.poses[t], transl=m.trans[t])  # file world
        assert np.abs(joints - ref).max() < 2e-3
        np.testing.assert_array_equal(m.poses[t, 1:].reshape(-1), np.asarray(info["poses"], dtype=np.float64)[3:])
    _assert_upright(smpl, m, n=5)


# --------------------------------------------------------------------------- resampling
def _scipy_reference(m: Motion, fps: float):
    """Per-joint scipy Slerp + np.interp at times k / fps (float64)."""
    times = np.arange(m.num_frames) / m.fps
    n_out = int(np.floor((m.num_frames - 1) * fps / m.fps + 1e-9)) + 1
    tq = np.minimum(np.arange(n_out) / fps, times[-1])
    rots = np.stack([Slerp(times, Rotation.from_rotvec(m.poses[:, j]))(tq).as_matrix() for j in range(24)], 1)
    trans = np.stack([np.interp(tq, times, m.trans[:, k]) for k in range(3)], 1)
    return rots, trans


@pytest.mark.parametrize("name,fps", [(AMASS[0], 60.0), (AMASS[0], 24.0), (AMASS[2], 50.0), ("aist", 60.0), ("aist", 24.0)])
def test_resample_matches_scipy_slerp(motion_dir, name, fps):
    path = motion_dir / ("smpl72_sequences/aist_demo.npz" if name == "aist" else f"amass_samples/{name}")
    m = _load_quiet(path)
    if m.num_frames > 200:  # keep the scipy reference fast
        m = Motion(m.poses[:200], m.trans[:200], m.fps, m.world_from_motion, m.betas, m.source, m.kind)
    r = resample_motion(m, fps)
    rots, trans = _scipy_reference(m, fps)
    assert r.fps == fps and r.num_frames == len(rots)
    assert abs(r.duration - m.duration) <= 1.0 / fps
    np.testing.assert_array_equal(r.poses[0], m.poses[0])  # first frame exact
    np.testing.assert_array_equal(r.trans[0], m.trans[0])
    got = Rotation.from_rotvec(r.poses.reshape(-1, 3)).as_matrix().reshape(-1, 24, 3, 3)
    assert np.abs(got - rots).max() < 1e-9
    assert np.abs(r.trans - trans).max() < 1e-9
    # output times that are source timestamps copy the source frame bit for bit
    src_pos = np.arange(r.num_frames) * m.fps / fps
    on_grid = np.abs(src_pos - np.round(src_pos)) < 1e-9
    assert on_grid.any()
    idx = np.round(src_pos[on_grid]).astype(int)
    np.testing.assert_array_equal(r.poses[on_grid], m.poses[idx])
    np.testing.assert_array_equal(r.trans[on_grid], m.trans[idx])
    np.testing.assert_array_equal(r.world_from_motion, m.world_from_motion)


def test_load_motion_fps_argument_resamples(motion_dir):
    path = motion_dir / "amass_samples" / AMASS[1]
    a = load_motion(path, fps=24)
    b = resample_motion(load_motion(path), 24)
    assert a.fps == 24.0 and a.num_frames == b.num_frames == 47  # 234 / 120 s * 24 = 46.8 -> frames 0..46
    np.testing.assert_array_equal(a.poses, b.poses)
    same = resample_motion(load_motion(path), 120)
    np.testing.assert_array_equal(same.poses, load_motion(path).poses)


def test_resample_slerp_takes_shorter_arc_and_single_frame():
    # two rotations 350 deg apart about z as axis-angle (+175 deg and -175 deg): shorter arc is 10 deg through 180
    a = np.deg2rad(175.0)
    poses = np.zeros((2, 24, 3))
    poses[0, 0] = [0, 0, a]
    poses[1, 0] = [0, 0, -a]
    m = Motion(poses, np.array([[0.0, 0, 0], [1.0, 2.0, 3.0]]), 1.0, np.eye(4), None, "synthetic", "smpl")
    r = resample_motion(m, 2.0)
    assert r.num_frames == 3
    mid = Rotation.from_rotvec(r.poses[1, 0]).as_matrix()
    np.testing.assert_allclose(mid, Rotation.from_euler("z", 180, degrees=True).as_matrix(), atol=1e-12)
    np.testing.assert_allclose(r.trans[1], [0.5, 1.0, 1.5], atol=1e-15)
    one = Motion(poses[:1], np.zeros((1, 3)), 30.0, np.eye(4), None, "synthetic", "smpl")
    assert resample_motion(one, 60).num_frames == 1
    for bad in (0, -5, float("nan"), float("inf")):
        with pytest.raises(FmgsInputError, match="fps"):
            resample_motion(m, bad)


def test_quaternion_helpers_against_scipy():
    rng = np.random.default_rng(0)
    aa = np.concatenate([rng.normal(size=(200, 3)),
                         rng.normal(size=(20, 3)) * 1e-9,  # tiny angles
                         (lambda v: v / np.linalg.norm(v, axis=1, keepdims=True) * (np.pi - 1e-7))(rng.normal(size=(20, 3)))])
    q = axis_angle_to_quat(aa)
    ref = Rotation.from_rotvec(aa).as_quat()[:, [3, 0, 1, 2]]
    sign = np.sign(np.sum(q * ref, axis=1, keepdims=True))
    np.testing.assert_allclose(q, sign * ref, atol=1e-14)
    back = quat_to_axis_angle(q)
    np.testing.assert_allclose(Rotation.from_rotvec(back).as_matrix(), Rotation.from_rotvec(aa).as_matrix(), atol=1e-12)
    inside = np.linalg.norm(aa, axis=1) < np.pi - 1e-3  # unique axis-angle there: recovered as given
    np.testing.assert_allclose(back[inside], aa[inside], atol=1e-12)
    # slerp against scipy at random weights
    q0, q1 = axis_angle_to_quat(rng.normal(size=(50, 3))), axis_angle_to_quat(rng.normal(size=(50, 3)))
    w = rng.uniform(size=50)
    got = quat_slerp(q0, q1, w)
    for i in range(50):
        key = Rotation.from_quat(np.stack([q0[i], q1[i]])[:, [1, 2, 3, 0]])
        exp = Slerp([0.0, 1.0], key)([w[i]]).as_matrix()[0]
        np.testing.assert_allclose(Rotation.from_quat(got[i, [1, 2, 3, 0]]).as_matrix(), exp, atol=1e-12)


# --------------------------------------------------------------------------- axes
@pytest.mark.parametrize("axis", UP_AXES)
def test_up_axis_detection_and_world_rotation(axis):
    vec = {"x": [1, 0, 0], "y": [0, 1, 0], "z": [0, 0, 1]}[axis[1]]
    up = np.array(vec, dtype=np.float64) * (1 if axis[0] == "+" else -1)
    w = world_from_up(axis)
    np.testing.assert_allclose(w[:3, :3] @ up, [0, 1, 0], atol=1e-15)
    np.testing.assert_allclose(w[:3, :3] @ w[:3, :3].T, np.eye(3), atol=1e-15)
    assert np.isclose(np.linalg.det(w[:3, :3]), 1.0) and np.array_equal(w[3], [0, 0, 0, 1])
    # root orientations: body +Y -> file up, random heading about the file up, small tilts
    rng = np.random.default_rng(1)
    file_from_yup = Rotation.from_matrix(w[:3, :3].T)
    heading = Rotation.from_rotvec(np.outer(rng.uniform(-np.pi, np.pi, 50), [0, 1, 0]))
    tilt = Rotation.from_rotvec(rng.normal(scale=0.3, size=(50, 3)))
    roots = (file_from_yup * heading * tilt).as_rotvec()
    poses = np.zeros((50, 24, 3))
    poses[:, 0] = roots
    assert detect_up_axis(poses) == axis


def test_undecidable_up_axis_warns_and_keeps_identity(tmp_path):
    rng = np.random.default_rng(2)
    poses = np.zeros((400, 72))
    poses[:, :3] = Rotation.random(400, random_state=3).as_rotvec()  # tumbling: no dominant up
    assert detect_up_axis(poses) is None
    p = tmp_path / "tumble.npz"
    np.savez(p, poses=poses, trans=rng.normal(size=(400, 3)), fps=np.array(25.0))
    with pytest.warns(UserWarning, match="up axis"):
        m = load_motion(p)
    assert m.fps == 25.0
    np.testing.assert_array_equal(m.world_from_motion, np.eye(4))
    m2 = load_motion(p, up="-z")
    np.testing.assert_array_equal(m2.world_from_motion, world_from_up("-z"))
    with pytest.raises(FmgsInputError, match="up axis"):
        load_motion(p, up="upwards")


def test_world_from_body(motion_dir):
    m = load_motion(motion_dir / "amass_samples" / AMASS[0])
    x = np.array([0.1, -0.2, 0.3])
    t = 17
    expected = m.world_from_motion[:3, :3] @ (x + m.trans[t]) + m.world_from_motion[:3, 3]
    wfb = m.world_from_body(t)
    np.testing.assert_allclose(wfb[:3, :3] @ x + wfb[:3, 3], expected, atol=1e-15)


# --------------------------------------------------------------------------- bad input
def _save_npy(tmp_path, name, arr) -> Path:
    p = tmp_path / name
    np.save(p, arr)
    return p


def test_wrong_shapes_raise_naming_file(tmp_path):
    p = _save_npy(tmp_path, "seventy.npy", np.zeros((10, 70)))
    with pytest.raises(FmgsInputError, match="70") as exc:
        load_motion(p)
    assert str(p) in str(exc.value) and exc.value.path == str(p)
    for arr in (np.zeros((10, 23, 3)), np.zeros((4, 5, 6, 3)), np.zeros(5)):
        with pytest.raises(FmgsInputError, match="shape"):
            load_motion(_save_npy(tmp_path, "bad.npy", arr))
    q = tmp_path / "mismatch.npz"
    np.savez(q, poses=np.zeros((10, 72)), trans=np.zeros((9, 3)))
    with pytest.raises(FmgsInputError, match="trans"):
        load_motion(q)
    r = tmp_path / "nokeys.npz"
    np.savez(r, foo=np.zeros(3), bar=np.zeros(2))
    with pytest.raises(FmgsInputError, match="no pose array"):
        load_motion(r)


def test_smplx_files_rejected(tmp_path):
    p = _save_npy(tmp_path, "smplx.npy", np.zeros((8, 165)))
    with pytest.raises(FmgsInputError, match="SMPL-X") as exc:
        load_motion(p)
    assert "smplx" in str(exc.value) and str(p) in str(exc.value)
    q = tmp_path / "amass_smplx.npz"  # AMASS SMPL-X N layout
    np.savez(q, poses=np.zeros((8, 165)), trans=np.zeros((8, 3)), surface_model_type=np.array("smplx"),
             mocap_frame_rate=np.array(120.0), gender=np.array("neutral"))
    with pytest.raises(FmgsInputError, match="smplx"):
        load_motion(q)
    r = tmp_path / "tagged.npz"  # tagged SMPL-X even with an SMPL+H-sized pose
    np.savez(r, poses=np.zeros((8, 156)), trans=np.zeros((8, 3)), surface_model_type=np.array(b"smplx"))
    with pytest.raises(FmgsInputError, match="SMPL-X"):
        load_motion(r)


def test_nonfinite_frames_dropped_with_warning(motion_dir, tmp_path):
    raw = np.load(motion_dir / "smpl72_sequences" / "walking.npy").astype(np.float64)[:30]
    trans = np.linspace(0, 1, 30)[:, None] * np.array([1.0, 0, 0])
    raw[3, 10] = np.nan
    raw[7] = np.inf
    trans[20, 1] = -np.inf
    p = tmp_path / "holes.npz"
    np.savez(p, poses=raw, trans=trans, fps=np.array(30.0))
    with pytest.warns(UserWarning, match="dropped 3 of 30 frames"):
        m = load_motion(p)
    keep = np.setdiff1d(np.arange(30), [3, 7, 20])
    assert m.num_frames == 27
    np.testing.assert_array_equal(m.poses.reshape(27, 72), raw[keep])
    np.testing.assert_array_equal(m.trans, trans[keep])
    with pytest.warns(UserWarning, match="dropped"):
        r = load_motion(p, fps=60)  # resampling after dropping does not crash
    assert np.isfinite(r.poses).all() and np.isfinite(r.trans).all()


def test_all_nan_empty_and_corrupt_files_raise(tmp_path):
    with pytest.raises(FmgsInputError, match="all 5 frames"):
        load_motion(_save_npy(tmp_path, "nan.npy", np.full((5, 72), np.nan)), source_fps=30)
    with pytest.raises(FmgsInputError, match="empty"):
        load_motion(_save_npy(tmp_path, "zero.npy", np.zeros((0, 72))))
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(FmgsInputError, match="empty") as exc:
        load_motion(empty)
    assert exc.value.path == str(empty)
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(FmgsInputError, match="corrupt"):
        load_motion(corrupt)
    with pytest.raises(FmgsInputError, match="not found"):
        load_motion(tmp_path / "missing.npz")
    bvh = tmp_path / "clip.bvh"
    bvh.write_text("HIERARCHY\nROOT Hips\n")
    with pytest.raises(FmgsInputError, match="MOTION"):
        load_motion(bvh)
    evil = tmp_path / "evil.pkl"  # pickles are read with the restricted unpickler
    evil.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(FmgsInputError):
        load_motion(evil)
    notmotion = tmp_path / "other.pkl"
    notmotion.write_bytes(pickle.dumps({"foo": np.zeros(3)}))
    with pytest.raises(FmgsInputError, match="unrecognised"):
        load_motion(notmotion)
    p = _save_npy(tmp_path, "ok.npy", np.zeros((4, 72)))
    with pytest.raises(FmgsInputError, match="source_fps"):
        load_motion(p, source_fps=-1)


def test_cli_summary(motion_dir, tmp_path, capsys):
    assert main([str(motion_dir / "amass_samples" / AMASS[0]), "--fps", "30"]) == 0
    out = capsys.readouterr().out
    assert "kind amass" in out and "at 30 fps" in out and "file up axis +z" in out
    assert main([str(_save_npy(tmp_path, "bad.npy", np.zeros((3, 70))))]) == 2
    assert "bad.npy" in capsys.readouterr().out
