"""Tests of the NumPy SMPL model (fmgs.body_model) and its torch twin (trainer.smpl_torch).

References: smplx.SMPL in float64 built from the same arrays, scipy's Rotation,
brute-force per-vertex skinning, and the ZJU-MoCap 377 fits from HumanNeRF.
"""
from __future__ import annotations

import dataclasses
import pickle
import sys
import types

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial.transform import Rotation

from fmgs.body_model import (
    JOINT_NAMES,
    PARTS,
    SMPLModel,
    axis_angle_to_matrix,
    blend_transforms,
    fit_betas_from_joints,
    forward_kinematics,
    lbs_points,
    load_smpl,
    matrix_to_axis_angle,
    star_pose,
    world_from_body,
)
from fmgs.errors import FmgsInputError
from fmgs.pickle_io import load_pickle

N_POSES = 20


@pytest.fixture(scope="module")
def model(smpl_path) -> SMPLModel:
    return load_smpl(smpl_path)


@pytest.fixture(scope="module")
def raw_smpl(smpl_path) -> dict:
    return load_pickle(smpl_path)


@pytest.fixture(scope="module")
def betas_377(model, zju377):
    joints = load_pickle(zju377 / "canonical_joints.pkl")["joints"]
    betas, rms = fit_betas_from_joints(model, joints)
    return betas, rms, joints


def _random_inputs(seed: int):
    rng = np.random.default_rng(seed)
    poses = rng.normal(scale=0.5, size=(N_POSES, 72))
    betas = rng.normal(scale=1.0, size=(N_POSES, 10))
    transl = rng.normal(scale=0.3, size=(N_POSES, 3))
    return poses, betas, transl


def _smplx_forward(smpl_path, data: dict, poses, betas, transl):
    torch = pytest.importorskip("torch")
    smplx = pytest.importorskip("smplx")
    ref = smplx.SMPL(str(smpl_path), data_struct=smplx.utils.Struct(**data), dtype=torch.float64, num_betas=10)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    with torch.no_grad():
        out = ref(betas=t(betas), global_orient=t(poses[:, :3]), body_pose=t(poses[:, 3:]), transl=t(transl))
    return out.vertices.numpy(), out.joints[:, :24].numpy()


# ----------------------------------------------------------------- loading
def test_load_smpl_arrays(model, raw_smpl):
    assert model.v_template.shape == (6890, 3) and model.v_template.dtype == np.float64
    assert model.faces.shape == (13776, 3) and model.faces.dtype == np.int64
    assert model.J_regressor.shape == (24, 6890) and model.weights.shape == (6890, 24)
    assert model.shapedirs.shape == (6890, 3, 10) and model.posedirs.shape == (6890, 3, 207)
    assert model.parents.dtype == np.int64 and model.parents[0] == -1
    np.testing.assert_array_equal(model.parents[1:], raw_smpl["kintree_table"][0, 1:])
    np.testing.assert_array_equal(model.faces, raw_smpl["f"])
    np.testing.assert_allclose(model.weights.sum(1), 1.0, atol=1e-6)
    assert len(JOINT_NAMES) == 24 and PARTS == JOINT_NAMES and JOINT_NAMES[7] == "left_ankle"


def test_load_smpl_chumpy_and_sparse_layout(tmp_path, monkeypatch, smpl_path, raw_smpl, model):
    """An SMPL-site style pickle (chumpy arrays, sparse J_regressor, protocol 2) loads identically."""

    class Ch:
        def __init__(self, x):
            self.x = np.asarray(x)
            self._dirty_vars = set()

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    with monkeypatch.context() as mp:
        mod = types.ModuleType("chumpy.ch")
        mod.Ch = Ch
        mp.setitem(sys.modules, "chumpy", types.ModuleType("chumpy"))
        mp.setitem(sys.modules, "chumpy.ch", mod)
        data = {k: (Ch(v) if k in ("v_template", "weights", "shapedirs", "posedirs") else v) for k, v in raw_smpl.items()}
        data["J_regressor"] = sp.csc_matrix(raw_smpl["J_regressor"])
        data["kintree_table"] = raw_smpl["kintree_table"].astype(np.uint32)  # root parent 4294967295
        data["kintree_table"][0, 0] = np.uint32(4294967295)
        data["bs_style"] = "lbs"
        f = tmp_path / "SMPL_NEUTRAL.pkl"
        f.write_bytes(pickle.dumps(data, protocol=2))
    m2 = load_smpl(f)
    for field in ("v_template", "faces", "J_regressor", "weights", "parents", "shapedirs", "posedirs"):
        np.testing.assert_array_equal(getattr(m2, field), getattr(model, field), err_msg=field)


def test_load_smpl_missing_file_message(tmp_path):
    f = tmp_path / "body_models" / "smpl" / "SMPL_NEUTRAL.pkl"
    with pytest.raises(FmgsInputError) as ei:
        load_smpl(f)
    msg = str(ei.value)
    assert str(f) in msg and "SMPL_NEUTRAL.pkl" in msg and "smpl.is.tue.mpg.de" in msg and "download" in msg


def test_load_smpl_bad_contents(tmp_path, raw_smpl):
    no_key = {k: v for k, v in raw_smpl.items() if k != "posedirs"}
    f1 = tmp_path / "no_posedirs.pkl"
    f1.write_bytes(pickle.dumps(no_key))
    with pytest.raises(FmgsInputError) as ei:
        load_smpl(f1)
    assert str(f1) in str(ei.value) and "'posedirs'" in str(ei.value)

    bad_shape = dict(raw_smpl, weights=raw_smpl["weights"][:, :23])
    f2 = tmp_path / "bad_weights.pkl"
    f2.write_bytes(pickle.dumps(bad_shape))
    with pytest.raises(FmgsInputError) as ei:
        load_smpl(f2)
    assert str(f2) in str(ei.value) and "'weights'" in str(ei.value) and "(6890, 23)" in str(ei.value)

    f3 = tmp_path / "list.pkl"
    f3.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(FmgsInputError, match="dict"):
        load_smpl(f3)


# ----------------------------------------------------------------- rotations
def test_rodrigues_matches_scipy():
    rng = np.random.default_rng(0)
    aa = rng.normal(scale=1.5, size=(500, 3))
    aa[:10] *= 1e-7  # tiny angles
    aa[10:20] *= 1e-3
    aa[20] = 0.0
    ref = Rotation.from_rotvec(aa).as_matrix()
    np.testing.assert_allclose(axis_angle_to_matrix(aa), ref, atol=1e-13)
    assert axis_angle_to_matrix(aa.reshape(50, 10, 3)).shape == (50, 10, 3, 3)


def test_matrix_to_axis_angle_matches_scipy():
    rots = Rotation.random(500, random_state=1)
    R = rots.as_matrix()
    np.testing.assert_allclose(matrix_to_axis_angle(R), rots.as_rotvec(), atol=1e-10)
    # near-identity and near-pi
    aa = np.array([[1e-9, 0, 0], [0, 0, 0], [0, np.pi - 1e-9, 0], [np.pi / np.sqrt(2), np.pi / np.sqrt(2), 0.0]])
    back = axis_angle_to_matrix(matrix_to_axis_angle(axis_angle_to_matrix(aa)))
    np.testing.assert_allclose(back, Rotation.from_rotvec(aa).as_matrix(), atol=1e-9)


# ----------------------------------------------------------------- forward vs smplx
def test_forward_matches_smplx_shared_model(model, raw_smpl, smpl_path):
    poses, betas, transl = _random_inputs(1)
    ref_v, ref_j = _smplx_forward(smpl_path, dict(raw_smpl), poses, betas, transl)
    for i in range(N_POSES):
        v, j = model.forward(betas[i], poses[i], transl[i])
        assert np.abs(v - ref_v[i]).max() < 1e-5
        assert np.abs(j - ref_j[i]).max() < 1e-5


def test_forward_matches_smplx_with_pose_blendshapes(model, raw_smpl, smpl_path):
    rng = np.random.default_rng(2)
    posedirs = rng.normal(scale=0.01, size=(6890, 3, 207)).astype(np.float32).astype(np.float64)
    data = dict(raw_smpl, posedirs=posedirs)
    m = dataclasses.replace(model, posedirs=posedirs)
    poses, betas, transl = _random_inputs(3)
    ref_v, ref_j = _smplx_forward(smpl_path, data, poses, betas, transl)
    offsets_seen = 0.0
    for i in range(N_POSES):
        v, j = m.forward(betas[i], poses[i], transl[i])
        assert np.abs(v - ref_v[i]).max() < 1e-5
        assert np.abs(j - ref_j[i]).max() < 1e-5
        offsets_seen = max(offsets_seen, np.abs(v - model.forward(betas[i], poses[i], transl[i])[0]).max())
    assert offsets_seen > 0.01  # the blendshapes really moved the mesh


# ----------------------------------------------------------------- FK / LBS
def test_fk_and_lbs_brute_force(model):
    rng = np.random.default_rng(4)
    pose = rng.normal(scale=0.5, size=(24, 3))
    betas = rng.normal(size=10)
    v_rest, j_rest = model.shape(betas)
    np.testing.assert_allclose(j_rest, model.J_regressor @ (model.v_template + np.einsum("vkb,b->vk", model.shapedirs, betas)))
    R = axis_angle_to_matrix(pose)
    G, posed_joints = forward_kinematics(R, j_rest, model.parents)
    # brute-force global transforms by walking each joint's chain to the root
    for b in range(24):
        chain = []
        k = b
        while k != -1:
            chain.append(k)
            k = model.parents[k]
        A = np.eye(4)
        for k in reversed(chain):
            L = np.eye(4)
            L[:3, :3] = R[k]
            L[:3, 3] = j_rest[k] - (j_rest[model.parents[k]] if model.parents[k] >= 0 else 0.0)
            A = A @ L
        np.testing.assert_allclose(posed_joints[b], A[:3, 3], atol=1e-12)
        np.testing.assert_allclose(G[b, :3, :3], A[:3, :3], atol=1e-12)
        np.testing.assert_allclose(G[b] @ np.append(j_rest[b], 1.0), np.append(A[:3, 3], 1.0), atol=1e-12)
    # LBS with these G reproduces forward() (posedirs are zero in the shared model)
    assert not np.any(model.posedirs)
    verts, joints = model.forward(betas, pose)
    np.testing.assert_allclose(lbs_points(v_rest, model.weights, G), verts, atol=1e-12)
    np.testing.assert_allclose(joints, posed_joints, atol=1e-12)
    # brute force per-vertex blending on a subset
    T = blend_transforms(model.weights[:50], G)
    for i in range(50):
        Ti = sum(model.weights[i, b] * G[b] for b in range(24))
        np.testing.assert_allclose(T[i], Ti, atol=1e-12)
        np.testing.assert_allclose(verts[i], (Ti @ np.append(v_rest[i], 1.0))[:3], atol=1e-12)


def test_star_pose_spreads_legs(model):
    sp_pose = star_pose(45.0)
    assert sp_pose.shape == (24, 3)
    assert sp_pose[1, 2] == pytest.approx(np.pi / 4) and sp_pose[2, 2] == pytest.approx(-np.pi / 4)
    assert np.count_nonzero(sp_pose) == 2
    _, j_rest = model.forward()
    _, j_star = model.forward(None, sp_pose)
    left_ankle, right_ankle = JOINT_NAMES.index("left_ankle"), JOINT_NAMES.index("right_ankle")
    assert j_rest[left_ankle, 0] > 0  # SMPL's +x is the body's left
    assert j_star[left_ankle, 0] > j_rest[left_ankle, 0] + 0.2
    assert j_star[right_ankle, 0] < j_rest[right_ankle, 0] - 0.2
    np.testing.assert_allclose(j_star[:4], j_rest[:4], atol=1e-12)  # hips and spine do not move


def test_world_from_body_matches_scipy():
    rng = np.random.default_rng(5)
    Rh, Th = rng.normal(size=3), rng.normal(size=3)
    x = rng.normal(size=(10, 3))
    M = world_from_body(Rh, Th)
    np.testing.assert_allclose((M[:3, :3] @ x.T).T + M[:3, 3], Rotation.from_rotvec(Rh).apply(x) + Th, atol=1e-12)
    np.testing.assert_array_equal(M[3], [0, 0, 0, 1])


# ----------------------------------------------------------------- ZJU-MoCap 377
def test_fit_betas_377_canonical_joints(model, betas_377):
    betas, rms, joints = betas_377
    assert betas.shape == (10,)
    _, fitted = model.shape(betas)
    err = np.linalg.norm(fitted - joints, axis=1).max()
    assert err < 2e-3
    assert rms == pytest.approx(np.sqrt(np.mean((fitted - joints) ** 2)), rel=1e-6)
    # no translation is needed: a free one barely improves the fit
    _, rms_t = fit_betas_from_joints(model, joints, fit_translation=True)
    assert rms_t <= rms and rms - rms_t < 1e-4


def test_fit_betas_recovers_synthetic_betas(model):
    rng = np.random.default_rng(6)
    true = rng.normal(size=10)
    _, joints = model.shape(true)
    betas, rms = fit_betas_from_joints(model, joints)
    np.testing.assert_allclose(betas, true, atol=1e-8)
    assert rms < 1e-10
    b_t, rms_t = fit_betas_from_joints(model, joints + [0.1, -0.2, 0.3], fit_translation=True)
    np.testing.assert_allclose(b_t, true, atol=1e-8)
    assert rms_t < 1e-10


def test_posed_joints_match_zju377(model, zju377, betas_377):
    betas = betas_377[0]
    infos = load_pickle(zju377 / "mesh_infos.pkl")
    names = sorted(infos)
    for name in (names[0], names[150], names[300], names[-1]):
        info = infos[name]
        np.testing.assert_allclose(info["poses"][:3], 0.0)  # root handled by Rh/Th
        _, joints = model.forward(betas, info["poses"])
        assert np.linalg.norm(joints - info["joints"], axis=1).max() < 2e-3, name
        np.testing.assert_allclose(model.shape(betas)[1], info["tpose_joints"], atol=2e-3)


# ----------------------------------------------------------------- torch twin
def test_torch_rodrigues_and_fk_match_numpy(model):
    torch = pytest.importorskip("torch")
    from fmgs.trainer.models.fields import so3_exp
    from fmgs.trainer.models.smpl_torch import forward_kinematics_torch

    rng = np.random.default_rng(7)
    aa = rng.normal(scale=0.7, size=(5, 24, 3))
    aa[0, :4] *= 1e-7
    R_t = so3_exp(torch.as_tensor(aa, dtype=torch.float64))
    R_np = axis_angle_to_matrix(aa)
    np.testing.assert_allclose(R_t.numpy(), R_np, atol=1e-13)
    joints = np.stack([model.shape(rng.normal(size=10))[1] for _ in range(5)])
    G_t = forward_kinematics_torch(R_t, torch.as_tensor(joints), torch.as_tensor(model.parents))
    assert G_t.shape == (5, 24, 4, 4) and G_t.dtype == torch.float64
    for i in range(5):
        G_np, _ = forward_kinematics(R_np[i], joints[i], model.parents)
        np.testing.assert_allclose(G_t[i].numpy(), G_np, atol=1e-12)
    # gradient at zero rotation is finite
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    so3_exp(z).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_build_smplx_model_matches_numpy(model, smpl_path, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("smplx")
    from fmgs.trainer.models.smpl_torch import build_smplx_model

    smpl = build_smplx_model(smpl_path, dtype=torch.float64)
    poses, betas, transl = _random_inputs(8)
    t = lambda a: torch.as_tensor(a[:4], dtype=torch.float64)  # noqa: E731
    with torch.no_grad():
        out = smpl(betas=t(betas), global_orient=t(poses[:, :3]), body_pose=t(poses[:, 3:]), transl=t(transl))
    for i in range(4):
        v, j = model.forward(betas[i], poses[i], transl[i])
        assert np.abs(out.vertices[i].numpy() - v).max() < 1e-5
        assert np.abs(out.joints[i, :24].numpy() - j).max() < 1e-5
    # never falls back to unsafe unpickling
    evil = tmp_path / "SMPL_NEUTRAL.pkl"
    evil.write_bytes(b"cposix\nsystem\n(S'true'\ntR.")
    with pytest.raises(FmgsInputError, match="posix.system"):
        build_smplx_model(evil)
