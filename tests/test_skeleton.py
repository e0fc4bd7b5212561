"""BVH / ASF-AMC reading and retargeting to SMPL, on the real CMU 01_01 take and exact round trips."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from fmgs.body_model import load_smpl
from fmgs.errors import FmgsInputError
from fmgs.motion import load_motion
from fmgs.skeleton import (
    JOINT_MAP_PRESETS, SMPL_JOINT_NAMES, bone_direction_errors, read_bvh, rest_positions,
    retarget_to_smpl, smpl_fk_positions, write_smpl_bvh,
)


@pytest.fixture(scope="module")
def cmu(data_root: Path) -> Path:
    d = data_root / "motion" / "cmu_fairmotion"
    if not (d / "01_01.bvh").is_file() or not (d / "01_01.amc").is_file() or not (d / "01.asf").is_file():
        pytest.skip(f"CMU 01_01 BVH/ASF/AMC not found in {d}")
    return d


@pytest.fixture(scope="module")
def rest(smpl_path) -> np.ndarray:
    return load_smpl(smpl_path).shape()[1]


def _rot_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ra, rb = Rotation.from_rotvec(a.reshape(-1, 3)), Rotation.from_rotvec(b.reshape(-1, 3))
    return np.degrees((ra.inv() * rb).magnitude()).reshape(a.shape[:-1])


def test_cmu_bvh_and_asf_amc_give_the_same_smpl_motion(cmu, rest):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mb = load_motion(cmu / "01_01.bvh", rest_joints=rest)
        ma = load_motion(cmu / "01_01.amc", rest_joints=rest)
    assert (mb.kind, ma.kind) == ("bvh", "asf_amc")
    assert mb.fps == ma.fps == 120.0
    # the BVH conversion adds one leading rest frame: BVH frame k + 1 is AMC frame k
    assert (mb.num_frames, ma.num_frames) == (2752, 2751)
    d = _rot_deg(mb.poses[1:], ma.poses)
    assert d.mean() < 1e-3 and d.max() < 0.01, (d.mean(), d.max())
    assert np.abs(mb.trans[1:] - ma.trans).max() < 1e-4
    # the motion is not trivially zero: the arms and legs move by tens of degrees
    assert np.degrees(np.linalg.norm(ma.poses[:, 16], axis=-1)).max() > 30
    assert any("cmu_bvh" in n for n in mb.notes) and any("cmu_asf" in n for n in ma.notes)


def test_cmu_bone_directions_match_bvhio_forward_kinematics(cmu, rest, tmp_path):
    """Retargeted SMPL bones point where the source's bones point, the source posed by the
    bvhio library's own hierarchy FK (an implementation independent of fmgs.skeleton's)."""
    import bvhio

    lines = (cmu / "01_01.bvh").read_text().splitlines()
    m = lines.index("MOTION")
    n = 60
    clip = tmp_path / "clip.bvh"
    # every 40th frame of the take (a walk): 60 frames
    frames = lines[m + 3:][::40][:n]
    clip.write_text("\n".join(lines[:m + 1] + [f"Frames: {len(frames)}", lines[m + 2]] + frames) + "\n")
    sk = read_bvh(clip)
    rt = retarget_to_smpl(sk, rest)
    h = bvhio.readAsHierarchy(str(clip))
    joints = [j for j, _, _ in h.layout()]
    names = [j.Name for j in joints]
    P = np.zeros((len(frames), len(joints), 3))
    for f in range(len(frames)):
        h.loadPose(f)
        for k, j in enumerate(joints):
            v = j.PositionWorld
            P[f, k] = (v.x, v.y, v.z)
    A = rt.axes_from_source
    idx = {SMPL_JOINT_NAMES.index(k): names.index(v) for k, v in rt.joint_map.items()}
    src_rest = rest_positions(sk)[[sk.names.index(nm) for nm in names]] @ A.T
    err = bone_direction_errors(smpl_fk_positions(rt.poses, rt.trans, rest), P @ A.T, idx, src_rest)
    for limb in ("left_leg", "right_leg", "left_arm", "right_arm"):
        assert err[limb].max() < 0.05, (limb, err[limb].max())
    assert err["spine_head"].mean() < 5.0
    # pelvis -> hips and chest -> collars differ by the rest proportions only (constant)
    hs = err["hips_shoulders"]
    assert np.ptp(hs, axis=0).max() < 1.0 and hs.max() < 30.0


def test_amass_round_trip_through_a_bvh_of_the_smpl_skeleton(data_root, rest, tmp_path):
    p = data_root / "motion" / "amass_samples" / "human_body_prior__amass_sample.npz"
    if not p.is_file():
        pytest.skip(f"AMASS sample not found at {p}")
    m = load_motion(p)
    m.poses, m.trans = m.poses[:200], m.trans[:200]
    out = tmp_path / "smpl.bvh"
    write_smpl_bvh(out, m.poses, m.trans, rest, m.fps, world_rotation=m.world_from_motion)
    back = load_motion(out, rest_joints=rest)
    assert back.num_frames == 200 and back.fps == m.fps and any("(smpl)" in n for n in back.notes)
    W = m.world_from_motion[:3, :3]
    ref = smpl_fk_positions(m.poses, m.trans, rest) @ W.T
    got = smpl_fk_positions(back.poses, back.trans, rest) @ back.world_from_motion[:3, :3].T
    err = np.linalg.norm(ref - got, axis=-1)
    assert err.max() < 1e-3, err.max()
    # the same file with Mixamo names (and a namespace prefix) reads the same through the preset
    text = out.read_text()
    mix = {v: k for k, v in JOINT_MAP_PRESETS["mixamo"].items()}
    for smpl_name, mixamo_name in sorted(((k, v) for k, v in JOINT_MAP_PRESETS["mixamo"].items()),
                                         key=lambda kv: -len(kv[0])):
        text = text.replace(f"JOINT {smpl_name}\n", f"JOINT mixamorig:{mixamo_name}\n")
    text = text.replace("ROOT pelvis", "ROOT mixamorig:Hips")
    mfile = tmp_path / "mixamo.bvh"
    mfile.write_text(text)
    mm = load_motion(mfile, rest_joints=rest)
    assert any("(mixamo)" in n for n in mm.notes) and mix
    got2 = smpl_fk_positions(mm.poses, mm.trans, rest)
    # hands are unmapped in the preset: compare the mapped joints
    mapped = [SMPL_JOINT_NAMES.index(k) for k in JOINT_MAP_PRESETS["mixamo"]]
    assert np.linalg.norm(ref[:, mapped] - got2[:, mapped], axis=-1).max() < 1e-3
    # a user map (YAML) naming the same joints gives the same result
    ymap = tmp_path / "map.yaml"
    ymap.write_text("".join(f"{k}: 'mixamorig:{v}'\n" for k, v in JOINT_MAP_PRESETS["mixamo"].items()))
    mu = load_motion(mfile, rest_joints=rest, joint_map=ymap)
    np.testing.assert_allclose(mu.poses, mm.poses, atol=1e-12)
    bad = tmp_path / "bad.yaml"
    bad.write_text("pelvis: Hips\nknee_left: LeftLeg\n")
    with pytest.raises(FmgsInputError, match="unknown SMPL joints"):
        load_motion(mfile, rest_joints=rest, joint_map=bad)


def test_a_pose_rest_is_aligned_by_bone_direction(rest, tmp_path):
    """A skeleton whose rest pose is an A-pose (arms 45 deg down): at its rest frame the SMPL
    upper arms must point 45 deg down too, whatever the source's rest frame."""
    T = 3
    poses = np.zeros((T, 24, 3))
    out = tmp_path / "t.bvh"
    write_smpl_bvh(out, poses, np.zeros((T, 3)), rest, 30.0)
    # rewrite the shoulder -> elbow offsets (and below) rotated 45 deg down: an A-pose rest
    sk = read_bvh(out)
    for side, sgn in (("left", 1.0), ("right", -1.0)):
        R = Rotation.from_rotvec([0, 0, -sgn * np.pi / 4]).as_matrix()
        for name in (f"{side}_elbow", f"{side}_wrist", f"{side}_hand", f"{side}_hand_end"):
            k = sk.names.index(name)
            sk.local_pos[:, k] = sk.local_pos[:, k] @ R.T
    rt = retarget_to_smpl(sk, rest)
    pos = smpl_fk_positions(rt.poses, rt.trans, rest)
    for a, b, sgn in ((16, 18, 1.0), (17, 19, -1.0)):
        d = pos[0, b] - pos[0, a]
        d /= np.linalg.norm(d)
        R = Rotation.from_rotvec([0, 0, -sgn * np.pi / 4]).as_matrix()
        ref = R @ (rest[b] - rest[a]) / np.linalg.norm(rest[b] - rest[a])
        np.testing.assert_allclose(d, ref, atol=1e-9)
        assert d[1] < -0.6  # clearly down: an A-pose, not SMPL's T-pose


def test_bad_skeleton_files_raise_naming_the_file(tmp_path, rest):
    cases = {
        "empty_motion.bvh": "HIERARCHY\nROOT a\n{\nOFFSET 0 0 0\nCHANNELS 3 Xrotation Yrotation Zrotation\n"
                            "End Site\n{\nOFFSET 0 1 0\n}\n}\nMOTION\nFrames: 0\nFrame Time: 0.1\n",
        "truncated.bvh": "HIERARCHY\nROOT a\n{\nOFFSET 0 0 0\nCHANNELS 3 Xrotation Yrotation Zrotation\n"
                         "End Site\n{\nOFFSET 0 1 0\n}\n}\nMOTION\nFrames: 5\nFrame Time: 0.1\n0 0 0\n",
        "count.bvh": "HIERARCHY\nROOT a\n{\nOFFSET 0 0 0\nCHANNELS 3 Xrotation Yrotation Zrotation\n"
                     "End Site\n{\nOFFSET 0 1 0\n}\n}\nMOTION\nFrames: 1\nFrame Time: 0.1\n0 0\n",
        "nomap.bvh": "HIERARCHY\nROOT a\n{\nOFFSET 0 0 0\nCHANNELS 3 Xrotation Yrotation Zrotation\n"
                     "End Site\n{\nOFFSET 0 1 0\n}\n}\nMOTION\nFrames: 1\nFrame Time: 0.1\n0 0 0\n",
        "lonely.amc": ":FULLY-SPECIFIED\n1\nroot 0 0 0 0 0 0\n",
    }
    for name, text in cases.items():
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(FmgsInputError) as exc:
            load_motion(p, rest_joints=rest)
        assert exc.value.path == str(p), (name, exc.value)
    asf = tmp_path / "x.asf"
    asf.write_text(":bonedata\n")
    with pytest.raises(FmgsInputError, match="skeleton without motion"):
        load_motion(asf)


def test_up_axis_units_and_heading_are_detected(rest, tmp_path):
    """The same SMPL-skeleton take, re-expressed Z-up in centimetres: detected (+z, cm) and
    retargeted to the same SMPL motion; ``up=`` and ``units=`` override."""
    rng = np.random.default_rng(0)
    T = 20
    poses = rng.normal(scale=0.3, size=(T, 24, 3))
    poses[:, 0] = 0.0
    trans = rng.normal(scale=0.2, size=(T, 3))
    p = tmp_path / "y.bvh"
    write_smpl_bvh(p, poses, trans, rest, 30.0)
    sk = read_bvh(p)
    ref = retarget_to_smpl(sk, rest)
    assert ref.up == "+y" and ref.units == "m"
    M = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # y-up -> z-up: (x, y, z) -> (x, -z, y)
    sk.local_pos = sk.local_pos @ M.T * 100.0
    sk.local_rot = M @ sk.local_rot @ M.T  # every joint frame is world-aligned at rest
    got = retarget_to_smpl(sk, rest)
    assert got.up == "+z" and got.units == "cm" and got.forward == "-y"
    np.testing.assert_allclose(got.poses, ref.poses, atol=1e-7)
    np.testing.assert_allclose(got.trans, ref.trans, atol=1e-7)
    given = retarget_to_smpl(sk, rest, up="+z", units="cm")
    np.testing.assert_allclose(given.poses, ref.poses, atol=1e-7)
    assert any("cm (given)" in n for n in given.notes)
    with pytest.raises(FmgsInputError, match="unknown length unit"):
        retarget_to_smpl(sk, rest, units="furlong")
