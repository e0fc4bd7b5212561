"""fmgs-export end to end on real ZJU-MoCap 377 data: train tiny models, export, read back, play.

The references are independent of the export code: hash-grid features recomputed through the
grids' on-the-fly encoding (not the precomputed lookup the bake uses) and the first layers
folded in float64 here, skinning weights from the field's on-the-fly path, opacities from the
raw checkpoint in float64, the canonical .ply geometry from the trainer's own
``apply_geometry_residual`` (batched ``so3_exp`` matmuls, not the exporter's elementwise
rewrite), and a float64 NumPy implementation of the runtime recipe (forward kinematics, LBS,
view-direction canonicalisation) driving the bundle's ONNX models in ONNX Runtime on a
HELD-OUT pose, compared with the torch model's own forward pass. The torch-free runtime
(``fmgs.runtime.pipeline.AvatarPipeline``) plays both exported bundles unchanged.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fmgs.errors import FmgsInputError

TINY = ["data.image_size=64", "data.train_range=[0,12]", "data.train_step=3", "data.test_range=[455,460]",
        "data.test_step=5", "train.log_every=1", "train.image_every=0", "train.threads=1",
        "train.eval_at_end=false", "train.checkpoint_every=0"]


def _train(out: Path, data_root: Path, extra: list[str]) -> Path:
    from fmgs.trainer.cli.main import train_main

    os.environ["FMGS_DATA"] = str(data_root)
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_main(["--out", str(out), "--no-eval", *TINY, *extra]) == 0
    return out


def _cli(argv: list[str]) -> tuple[int, str, str]:
    from fmgs.export.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def full_export(tmp_path_factory, zju377, data_root):
    """A 3-iteration full-model run, exported through the CLI (checks on, 1 parity frame, 2 bake
    frames, --trt auto on a machine without TensorRT)."""
    root = tmp_path_factory.mktemp("export")
    run = _train(root / "run", data_root, ["model.kind=full", "model.full.static_offsets=true", "train.iterations=3"])
    rc, out, err = _cli([str(run), "--out", str(root / "bundle"), "--parity-frames", "1", "--bake-frames", "2"])
    assert rc == 0, err
    return run, root / "bundle", out


@pytest.fixture(scope="module")
def foundation_export(tmp_path_factory, zju377, data_root):
    """A 2-iteration foundation run, exported with --fp16 and --trt off."""
    from fmgs.export.api import export_run

    root = tmp_path_factory.mktemp("export_fnd")
    run = _train(root / "run", data_root, ["train.iterations=2"])
    rep = export_run(run, root / "bundle", parity_frames=1, fp16=True, trt="off", verbose=False)
    return run, root / "bundle", rep


def _rebuild(run: Path):
    from fmgs.config import load_run_config
    from fmgs.trainer.engine.run import build_model, build_setup, open_sequence

    cfg = load_run_config(run)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    test = open_sequence(cfg, "test")
    setup = build_setup(cfg, test)
    delta = state.get("pose_correction.delta")
    model = build_model(cfg, setup, num_frames=0 if delta is None else int(delta.shape[0]))
    model.load_state_dict(state)
    model.eval()
    return cfg, state, setup, model, test


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _numpy_pose(bm: dict, poses, Rh, Th):
    """World-from-canonical bone transforms from the manifest's body model, float64."""
    from fmgs.body_model import axis_angle_to_matrix, forward_kinematics, world_from_body

    rot = axis_angle_to_matrix(np.asarray(poses, np.float64).reshape(24, 3))
    G, _ = forward_kinematics(rot, bm["rest_joints"], bm["parents"])
    B = world_from_body(Rh, Th) @ G @ np.linalg.inv(bm["canonical_bone_transforms"])
    return rot, B


def _fold64(f: torch.Tensor, linear: torch.nn.Linear) -> np.ndarray:
    """``f @ W[:, :F]^T`` in float64 (the folded first layer, computed here independently)."""
    W = linear.weight.detach().double().numpy()[:, : f.shape[1]]
    return f.detach().double().numpy() @ W.T


def _read_ply(path: Path) -> tuple[list[str], np.ndarray]:
    """Minimal binary little-endian PLY reader: (header lines, structured vertex array)."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[0] == "ply" and header[1] == "format binary_little_endian 1.0"
    props = [ln.split()[2] for ln in header if ln.startswith("property float ")]
    count = int(next(ln.split()[2] for ln in header if ln.startswith("element vertex ")))
    arr = np.frombuffer(data[end:], dtype=np.dtype([(p, "<f4") for p in props]))
    assert arr.shape == (count,)
    return header, arr


# =========================================================================== full model
def test_full_bundle_round_trips_with_independent_constants(full_export):
    from fmgs.bundle import read_bundle
    from fmgs.trainer.models.hashgrid import normalize_to_bbox

    run, bdir, _ = full_export
    b = read_bundle(bdir)
    assert b.kind == "full" and b.num_surfels == 55104
    assert set(b.models) == {"pose_encoder", "geometry", "color", "skinning"}
    assert b.pipeline == ["pose_encoder", "geometry", "color"]
    assert sorted(p.name for p in bdir.iterdir()) == sorted([*b.manifest["files"], "manifest.json"])
    assert not [p for p in bdir.parent.iterdir() if p.name.startswith(".")]      # no staging folders left
    _, state, _, model, _ = _rebuild(run)
    with torch.no_grad():
        x = normalize_to_bbox(model.centers, model.bbox_min, model.bbox_max, padding=model.cfg.grid_padding)
        f_g = model.geometry_grid(x)          # on-the-fly encoding, not the baked lookup
        f_c = model.appearance_grid(x)
        sem = model.semantic_field(model.semantic_grid(x)).numpy()
        W = model.skinning_field(model.centers, prior_weights=model.skin_weights).numpy()
    # folded first layers: the per-surfel part W_1[:, :32] f of the geometry and colour MLPs
    assert b.manifest["models"]["geometry"]["folded_first_layer"] is True
    assert b.manifest["models"]["color"]["folded_first_layer"] is True
    H = model.cfg.geometry_width
    assert b.manifest["channels"]["geometry_features"]["shape"] == ["S", H]
    np.testing.assert_allclose(b.surfels["geometry_features"], _fold64(f_g, model.geometry_field.mlp[0]), atol=2e-6)
    np.testing.assert_allclose(b.surfels["appearance_features"], _fold64(f_c, model.appearance_field.mlp[0]),
                               atol=2e-6)
    np.testing.assert_allclose(b.surfels["semantic_logits"], sem, atol=1e-5)
    np.testing.assert_allclose(b.surfels["skin_weights"], W, atol=1e-6)
    np.testing.assert_allclose(b.surfels["prior_skin_weights"], state["skin_weights"].numpy(), atol=0)
    op = 1.0 / (1.0 + np.exp(-state["opacity_logit"].double().numpy()))
    np.testing.assert_allclose(b.surfels["opacities"], op, atol=1e-7)
    # base surfels: template + the static offsets (model.full.static_offsets), in float64
    n64 = state["frames"][:, :, 2].double()
    np.testing.assert_allclose(b.surfels["centers"],
                               (state["centers"].double() + n64 * state["displacement"].double()[:, None]).numpy(),
                               atol=1e-7)
    assert np.abs(state["displacement"].numpy()).max() > 0          # the offsets did train
    np.testing.assert_allclose(b.surfels["scales"],
                               (state["scales0"].double() * state["log_scale_delta"].double().exp()).numpy(),
                               rtol=1e-6)
    np.testing.assert_array_equal(b.surfels["rotations"], state["frames"].numpy())
    bm = b.body_model_arrays()
    np.testing.assert_allclose(bm["canonical_bone_transforms"] @ np.linalg.inv(bm["canonical_bone_transforms"]),
                               np.tile(np.eye(4), (24, 1, 1)), atol=1e-9)


def test_report_numbers_are_written_and_printed(full_export):
    _, bdir, printed = full_export
    rep = json.loads((bdir / "export_report.json").read_text())
    par = rep["parity"]
    assert par["passed"] and par["max_abs_error"] < 1e-4 and len(par["frames"]) == 1
    assert set(par["models"]) == {"pose_encoder", "geometry", "color", "skinning"}
    assert set(par["models"]["geometry"]) == {"centers_out", "rotations_out", "scales_out", "z_g"}
    assert par["end_to_end"]["colors"] < 1e-4 and par["end_to_end"]["means_mm"] < 1e-2
    sb = rep["skinning_bake"]
    assert sb["applicable"] and sb["frames"] == 2 and sb["skinning_query_trained"] == "canonical"
    # canonical query: the forward uses W(mu), exactly what is baked
    assert sb["exact"] and sb["bake_error"]["max_weight_diff"] == 0.0
    assert sb["bake_error"]["max_displacement_mm"] == 0.0
    cc = sb["canonical_vs_corrected"]
    assert 0.0 <= cc["p99_weight_diff"] <= cc["max_weight_diff"] <= 1.0
    assert 0.0 <= cc["mean_displacement_mm"] <= cc["p99_displacement_mm"] <= cc["max_displacement_mm"] < 1e3
    assert sb["max_residual_offset_mm"] > 0.0
    # --trt auto without tensorrt: a note, no engines, the export went on
    t = rep["tensorrt"]
    assert t["built"] is False and t["mode"] == "auto" and "tensorrt" in t["note"]
    assert not list(bdir.glob("*.plan"))
    # the CLI printed the same numbers, and the bundle's size
    size = sum(p.stat().st_size for p in bdir.iterdir())
    assert f"({size / 1e6:.1f} MB," in printed
    assert "note: --trt auto: tensorrt is not importable" in printed
    assert f"max abs error {par['max_abs_error']:.2e}" in printed
    assert f"W(mu) vs W(mu'): max |dW| {cc['max_weight_diff']:.2e}" in printed
    assert "baked W vs trained forward: max |dW| 0.00e+00" in printed


def test_skinning_bake_check_for_a_corrected_query_model(full_export):
    """Read as a skinning_query=corrected model, the bake error IS the W(mu) vs W(mu') gap."""
    from fmgs.export.bake import bake_full
    from fmgs.export.checks import skinning_bake_check
    from fmgs.trainer.engine.run import load_run

    run, _, _ = full_export
    lr = load_run(run, ["model.full.skinning_query=corrected"])
    rep = skinning_bake_check(lr, bake_full(lr, True), frames=2)
    assert rep["skinning_query_trained"] == "corrected" and rep["frames"] == 2
    assert rep["bake_error"] == rep["canonical_vs_corrected"]
    assert rep["bake_error"]["max_weight_diff"] > 0.0 and not rep["exact"]


def test_ort_chain_matches_torch_on_a_heldout_pose(full_export):
    """Drive the bundle like the runtime (NumPy float64 LBS, ORT models) on a test-split pose."""
    from fmgs.bundle import read_bundle
    from fmgs.trainer.models.full import canonical_pose_joints, pose_frame

    run, bdir, _ = full_export
    b = read_bundle(bdir)
    s, bm = b.surfels, b.body_model_arrays()
    _, _, setup, model, test = _rebuild(run)
    fr = test[0]
    rot, B = _numpy_pose(bm, fr.poses, fr.Rh, fr.Th)
    cam = np.asarray(fr.camera.center, np.float64)
    (z,) = _ort(b.models["pose_encoder"]).run(None, {"rot_mats": rot.astype(np.float32)})
    # the planar graphs (manifest layout "planar"): per-surfel tensors with the surfel axis last
    assert b.manifest["models"]["geometry"]["layout"] == b.manifest["models"]["color"]["layout"] == "planar"
    pl = {k: np.ascontiguousarray(np.moveaxis(s[k], 0, -1)) for k in
          ("geometry_features", "centers", "rotations", "scales", "appearance_features")}
    mu, tu, tv, sc, zg = (o.T for o in _ort(b.models["geometry"]).run(None, {
        "geometry_features_planar": pl["geometry_features"], "pose_code": z, "centers_planar": pl["centers"],
        "rotations_planar": pl["rotations"], "scales_planar": pl["scales"]}))
    R = np.stack([tu, tv, np.cross(tu, tv)], -1)
    T = np.einsum("sb,bij->sij", s["skin_weights"].astype(np.float64), B)
    means = np.einsum("sij,sj->si", T[:, :3, :3], mu.astype(np.float64)) + T[:, :3, 3]
    d = means - cam
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    dh = np.linalg.solve(T[:, :3, :3], d[..., None])[..., 0]
    dh /= np.linalg.norm(dh, axis=1, keepdims=True)
    (col,) = _ort(b.models["color"]).run(None, {"appearance_features_planar": pl["appearance_features"],
                                                "z_g_planar": np.ascontiguousarray(zg.T), "pose_code": z,
                                                "view_dirs_planar": np.ascontiguousarray(dh.T, dtype=np.float32)})
    col = col.T
    with torch.no_grad():
        rot_t, B_t = pose_frame(fr.poses, None, None, setup.rest_joints, setup.canonical_G, fr.world_from_body)
        posed = model(rot_t, B_t, torch.as_tensor(cam, dtype=torch.float32),
                      torch.as_tensor(canonical_pose_joints(setup.surfels), dtype=torch.float32))
    np.testing.assert_allclose(B, B_t.double().numpy(), atol=1e-5)
    np.testing.assert_allclose(R, posed.canonical_rotations.numpy(), atol=1e-6)
    np.testing.assert_allclose(sc, posed.scales.numpy(), atol=1e-6)
    np.testing.assert_allclose(means, posed.means.double().numpy(), atol=2e-5)
    np.testing.assert_allclose(col, posed.colors.numpy(), atol=1e-4)
    assert np.abs(mu - s["centers"]).max() > 1e-4          # the residual really moves the surfels
    # the skinning model evaluates eq. 9 live
    (w,) = _ort(b.models["skinning"]).run(None, {"points": s["centers"], "prior_weights": s["prior_skin_weights"]})
    np.testing.assert_allclose(w, s["skin_weights"], atol=1e-5)


def test_runtime_plays_the_exported_bundle(full_export):
    """The torch-free runtime (unchanged) poses the folded bundle like the trainer's forward."""
    from fmgs.runtime.pipeline import AvatarPipeline
    from fmgs.trainer.models.full import canonical_pose_joints, pose_frame

    run, bdir, _ = full_export
    _, _, setup, model, test = _rebuild(run)
    fr = test[-1]
    cam = np.asarray(fr.camera.center, np.float64)
    pipe = AvatarPipeline(bdir, array_backend="numpy", inference_backend="onnxruntime", providers="cpu", threads=1,
                          drop_invisible=False)
    got = pipe.posed_surfels(np.asarray(fr.poses).reshape(24, 3), fr.world_from_body, cam)
    with torch.no_grad():
        rot_t, B_t = pose_frame(fr.poses, None, None, setup.rest_joints, setup.canonical_G, fr.world_from_body)
        ref = model(rot_t, B_t, torch.as_tensor(cam, dtype=torch.float32),
                    torch.as_tensor(canonical_pose_joints(setup.surfels), dtype=torch.float32))
    for k in ("means", "rotations", "scales", "colors", "opacities"):
        np.testing.assert_allclose(got[k], getattr(ref, k).numpy(), atol=2e-5, rtol=0, err_msg=k)


def test_ply_holds_the_canonical_avatar(full_export):
    import trimesh

    from fmgs.body_model import axis_angle_to_matrix
    from fmgs.export.ply import SH_C0, THIN_SCALE
    from fmgs.trainer.models.fields import apply_geometry_residual, normalize_canonical_joints
    from fmgs.trainer.models.hashgrid import normalize_to_bbox

    run, bdir, _ = full_export
    header, v = _read_ply(bdir / "avatar.ply")
    names = list(v.dtype.names)
    assert names == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2",
                     *[f"f_rest_{i}" for i in range(45)],
                     "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert "element vertex 55104" in header
    assert len(trimesh.load(bdir / "avatar.ply").vertices) == 55104        # a common loader reads it

    # independent reference: the trainer's own residual in the canonical pose, head-on colour
    _, state, setup, model, _ = _rebuild(run)
    with torch.no_grad():
        x = normalize_to_bbox(model.centers, model.bbox_min, model.bbox_max, padding=model.cfg.grid_padding)
        rot = torch.as_tensor(axis_angle_to_matrix(np.asarray(setup.surfels.canonical_pose).reshape(24, 3)),
                              dtype=torch.float32)
        z_p = model.pose_encoder(rot, normalize_canonical_joints(torch.as_tensor(setup.surfels.joints).float()))
        res = model.geometry_residual(model.geometry_grid(x), z_p)   # eq. 3 (+ the d_max bound)
        mu_b = model.centers + model.frames[:, :, 2] * model.displacement[:, None]   # static offsets
        corr = apply_geometry_residual(mu_b, model.frames, model.scales0 * model.log_scale_delta.exp(), None, res)
        rgb = model.appearance_field(model.appearance_grid(x), res.z_g, z_p, -corr.rotations[:, :, 2]).numpy()
    pos = np.stack([v["x"], v["y"], v["z"]], 1)
    np.testing.assert_allclose(pos, corr.centers.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.stack([v["nx"], v["ny"], v["nz"]], 1), corr.rotations[:, :, 2].numpy(), atol=1e-6)
    # 3DGS build_rotation of (w, x, y, z), written out independently
    q = np.stack([v[f"rot_{i}"] for i in range(4)], 1).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-6)
    w, qx, qy, qz = q.T
    R = np.stack([1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - w * qz), 2 * (qx * qz + w * qy),
                  2 * (qx * qy + w * qz), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - w * qx),
                  2 * (qx * qz - w * qy), 2 * (qy * qz + w * qx), 1 - 2 * (qx * qx + qy * qy)], 1).reshape(-1, 3, 3)
    np.testing.assert_allclose(R, corr.rotations.numpy(), atol=2e-6)
    np.testing.assert_allclose(np.exp(np.stack([v["scale_0"], v["scale_1"]], 1).astype(np.float64)),
                               corr.scales.numpy(), rtol=2e-6)
    np.testing.assert_allclose(v["scale_2"], np.log(THIN_SCALE), rtol=1e-6)
    np.testing.assert_allclose(v["opacity"], state["opacity_logit"].numpy(), atol=2e-5)
    np.testing.assert_allclose(np.stack([v[f"f_dc_{i}"] for i in range(3)], 1) * SH_C0 + 0.5, rgb, atol=1e-6)
    assert not np.any(np.stack([v[f"f_rest_{i}"] for i in range(45)]))


def test_corrupted_exported_bundles_are_rejected_naming_the_file(full_export, tmp_path):
    from fmgs.bundle import read_bundle
    from fmgs.runtime.pipeline import AvatarPipeline

    _, bdir, _ = full_export

    def fresh(name):
        d = tmp_path / name
        shutil.copytree(bdir, d)
        return d

    d = fresh("flip")                                     # one flipped byte in a model
    g = d / "geometry.onnx"
    data = bytearray(g.read_bytes())
    data[len(data) // 3] ^= 0x01
    g.write_bytes(bytes(data))
    with pytest.raises(FmgsInputError, match="checksum mismatch") as ei:
        AvatarPipeline(d, array_backend="numpy", providers="cpu")
    assert ei.value.path == str(g)
    d = fresh("trunc")                                    # truncated surfels
    p = d / "surfels.safetensors"
    p.write_bytes(p.read_bytes()[:-4096])
    with pytest.raises(FmgsInputError, match="truncated") as ei:
        read_bundle(d)
    assert ei.value.path == str(p)
    d = fresh("missing")                                  # a model file gone
    (d / "color.onnx").unlink()
    with pytest.raises(FmgsInputError, match="missing") as ei:
        read_bundle(d)
    assert ei.value.path == str(d / "color.onnx")
    d = fresh("version")                                  # a future schema version
    m = d / "manifest.json"
    man = json.loads(m.read_text())
    man["schema_version"] += 1
    m.write_text(json.dumps(man))
    with pytest.raises(FmgsInputError, match="schema version") as ei:
        read_bundle(d)
    assert ei.value.path == str(m)


def test_cli_errors(tmp_path, full_export):
    from fmgs.export.trt import tensorrt_status

    run, bdir, _ = full_export
    rc, _, err = _cli([str(tmp_path), "--out", str(tmp_path / "b")])
    assert rc == 2 and "config.yaml" in err and "Traceback" not in err
    rc, _, err = _cli([str(run), "--out", str(bdir)])
    assert rc == 2 and "already exists" in err
    if not tensorrt_status()[0]:
        rc, out, err = _cli([str(run), "--out", str(tmp_path / "t"), "--trt", "on"])
        assert rc == 2 and "--trt on: tensorrt is not importable" in err
        assert not (tmp_path / "t").exists() and out == ""


# =========================================================================== foundation model
def test_foundation_export(foundation_export):
    from fmgs.bundle import read_bundle
    from fmgs.runtime.pipeline import AvatarPipeline
    from fmgs.trainer.models.hashgrid import normalize_to_bbox
    from fmgs.trainer.models.base import frame_bone_transforms

    run, bdir, rep = foundation_export
    b = read_bundle(bdir)
    assert b.kind == "foundation" and set(b.models) == {"color"} and b.pipeline == ["color"]
    assert set(b.models_fp16) == {"color"}
    assert b.manifest["models"]["color"]["view_dir_canonicalization"] == "transpose"
    assert rep["parity"]["passed"] and rep["parity"]["end_to_end"]["colors"] < 1e-4
    assert rep["parity_fp16"]["max_abs_error"] < 2e-2
    assert rep["skinning_bake"]["applicable"] is False and rep["skinning_bake"]["exact"] is True
    assert rep["tensorrt"]["note"].startswith("--trt off")
    _, state, setup, model, test = _rebuild(run)
    n = state["frames"][:, :, 2].double()
    mu = state["centers"].double() + n * state["displacement"].double()[:, None]
    np.testing.assert_allclose(b.surfels["centers"], mu.numpy(), atol=1e-6)
    np.testing.assert_allclose(b.surfels["scales"], torch.exp(state["log_scales0"].double()
                                                              + state["log_scale_delta"].double()).numpy(), rtol=1e-6)
    with torch.no_grad():                                   # on-the-fly encoding (SurfelAvatar pads the box by 5%)
        f_c = model.grid(normalize_to_bbox(model.centers, model.bbox_min, model.bbox_max, padding=0.05))
    np.testing.assert_allclose(b.surfels["appearance_features"], _fold64(f_c, model.color_mlp[0]), atol=2e-6)
    # the runtime plays it like the trainer's forward on a held-out pose
    fr = test[0]
    cam = np.asarray(fr.camera.center, np.float64)
    pipe = AvatarPipeline(bdir, array_backend="numpy", inference_backend="onnxruntime", providers="cpu", threads=1,
                          drop_invisible=False)
    got = pipe.posed_surfels(np.asarray(fr.poses).reshape(24, 3), fr.world_from_body, cam)
    B = frame_bone_transforms(setup.smpl, setup.rest_joints, setup.canonical_G, fr.poses, fr.world_from_body)
    with torch.no_grad():
        ref = model(torch.as_tensor(B, dtype=torch.float32), torch.as_tensor(cam, dtype=torch.float32))
    for k in ("means", "scales", "colors", "opacities"):
        np.testing.assert_allclose(got[k], getattr(ref, k).numpy(), atol=2e-5, rtol=0, err_msg=k)


def test_interrupted_export_leaves_no_bundle(foundation_export, tmp_path, monkeypatch):
    """Ctrl-C at the last moment (publishing the files) leaves no bundle, no staging folder, and an
    existing bundle being overwritten intact."""
    from fmgs import bundle as fb

    run, bdir, _ = foundation_export
    shutil.copytree(bdir, tmp_path / "old")
    real_copy = shutil.copyfile
    calls = {"n": 0}

    def interrupted(src, dst, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(fb.shutil, "copyfile", interrupted)
    (tmp_path / "new").mkdir()
    rc, _, _ = _cli([str(run), "--out", str(tmp_path / "new" / "b"), "--no-check", "--trt", "off"])
    assert rc == 130 and calls["n"] == 2
    assert os.listdir(tmp_path / "new") == []
    # overwriting a complete bundle: interrupted, the old one stays complete and valid
    calls["n"] = 0
    rc, _, _ = _cli([str(run), "--out", str(tmp_path / "old"), "--no-check", "--trt", "off", "--overwrite"])
    assert rc == 130 and calls["n"] == 2
    assert sorted(os.listdir(tmp_path)) == ["new", "old"]
    monkeypatch.undo()
    fb.read_bundle(tmp_path / "old")


# =========================================================================== exporter building blocks
@pytest.mark.parametrize("geometry_hidden", [2, 1])
def test_geometry_module_bounded_displacement_matches_the_trainer(geometry_hidden):
    """GeometryModule with ``max_displacement`` (raw and folded graphs; two hidden layers and
    ``model.full.geometry_hidden=1``) equals, in float64,
    eq. 4-6 applied to the field's residual with delta_d -> d_max tanh(delta_d / d_max),
    on residuals large enough (|delta_d| up to ~0.3 m) for the bound to act."""
    from fmgs.export.modules import GeometryModule, fold_first_layer
    from fmgs.trainer.models.fields import GeometryResidualField, apply_geometry_residual, so3_exp

    torch.manual_seed(3)
    S, md = 500, 0.02
    field = GeometryResidualField(32, 16, 16, width=64, n_hidden=geometry_hidden).double()
    with torch.no_grad():
        last = field.mlp[-1]
        last.weight.normal_(0, 0.05)
        last.bias.zero_()
        last.weight[0].mul_(20.0)                        # large delta_d
    f_g = torch.randn(S, 32, dtype=torch.float64)
    z_p = torch.randn(1, 16, dtype=torch.float64)
    mu = torch.randn(S, 3, dtype=torch.float64)
    R = so3_exp(torch.randn(S, 3, dtype=torch.float64))
    sc = torch.rand(S, 2, dtype=torch.float64) * 0.01 + 0.001
    with torch.no_grad():
        res = field(f_g, z_p)
        assert res.delta_d.abs().max() > 5 * md
        ref = apply_geometry_residual(mu, R, sc, None, res._replace(delta_d=md * torch.tanh(res.delta_d / md)))
        for folded in (False, True):
            gm = GeometryModule(field, 16, folded=folded, max_displacement=md)
            feats = fold_first_layer(f_g, field.mlp[0], slice(0, 32)) if folded else f_g
            c, r, s_, z = gm(feats, z_p, mu, R, sc)
            tol = 1e-6 if folded else 1e-10      # fold_first_layer bakes in float32
            torch.testing.assert_close(c, ref.centers, atol=tol, rtol=0)
            torch.testing.assert_close(r, ref.rotations, atol=max(tol, 1e-7), rtol=0)   # elementwise so3_exp
            torch.testing.assert_close(s_, ref.scales, atol=0, rtol=tol)
            torch.testing.assert_close(z, res.z_g, atol=tol, rtol=0)
        assert (ref.centers - mu).norm(dim=1).max() <= md + 1e-12


def test_elementwise_rewrites_equal_the_trainer_functions():
    """rotate_local / rotate_tangents_planar / sh_bands_without_dc / hash_encode_gather /
    fold_first_layer against the trainer's so3_exp @, sh_basis, HashGrid.forward and nn.Linear,
    in float64 (rotate_tangents_planar also in float32, and at v = 0)."""
    from fmgs.export.modules import (fold_first_layer, hash_encode_gather, rotate_local, rotate_tangents_planar,
                                     sh_bands_without_dc)
    from fmgs.trainer.models.fields import sh_basis, so3_exp
    from fmgs.trainer.models.hashgrid import HashGrid, HashGridConfig

    g = torch.Generator().manual_seed(0)
    R = torch.linalg.qr(torch.randn(500, 3, 3, generator=g, dtype=torch.float64))[0]
    v = torch.randn(500, 3, generator=g, dtype=torch.float64)
    v[:100] *= 1e-5                                          # the trainer's small-angle series branch
    v[100:200] *= 3.0                                        # large angles
    v[200:210] = 0.0                                         # exactly no rotation
    ref = (R @ so3_exp(v)).numpy()
    for dt, tol in ((torch.float64, 1e-14), (torch.float32, 2e-6)):
        rl = rotate_local(R.to(dt), v.T.contiguous().to(dt))   # row-major graphs: all three columns
        assert rl.shape == (500, 3, 3) and rl.dtype == dt and torch.isfinite(rl).all()
        np.testing.assert_allclose(rl.double().numpy(), ref, atol=tol)
        tu, tv = rotate_tangents_planar(R.permute(1, 2, 0).to(dt), v.T.contiguous().to(dt))
        assert tu.dtype == dt and torch.isfinite(tu).all() and torch.isfinite(tv).all()
        np.testing.assert_allclose(tu.double().T.numpy(), ref[:, :, 0], atol=tol)
        np.testing.assert_allclose(tv.double().T.numpy(), ref[:, :, 1], atol=tol)
    # half precision (an fp16 engine): at |v| <= 3e-5 (rows :100) v * v underflows to 0; finite,
    # and within fp16 rounding (eps 1e-3) of the float64 reference everywhere
    tu, tv = rotate_tangents_planar(R.permute(1, 2, 0).half(), v.T.contiguous().half())
    assert torch.isfinite(tu).all() and torch.isfinite(tv).all()
    np.testing.assert_allclose(tu.double().T.numpy(), ref[:, :, 0], atol=1e-2)
    np.testing.assert_allclose(tv.double().T.numpy(), ref[:, :, 1], atol=1e-2)
    d = torch.nn.functional.normalize(torch.randn(300, 3, generator=g, dtype=torch.float64), dim=-1)
    for deg in (1, 2, 3):
        np.testing.assert_allclose(torch.stack(sh_bands_without_dc(d, deg), -1).numpy(),
                                   sh_basis(d, deg)[:, 1:].numpy(), atol=1e-15)
    grid = HashGrid(HashGridConfig(n_levels=8, log2_hashmap_size=12, max_resolution=512), dtype=torch.float64)
    with torch.no_grad():
        grid.table.normal_(generator=g)
    x = torch.rand(1000, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        np.testing.assert_allclose(hash_encode_gather(grid, x).numpy(), grid(x).numpy(), atol=1e-12)
    lin = torch.nn.Linear(48, 64).double()
    f = torch.randn(200, 32, generator=g, dtype=torch.float64)
    folded = fold_first_layer(f, lin, slice(0, 32)).double()
    full = lin(torch.cat([f, torch.zeros(200, 16, dtype=torch.float64)], -1)) - lin.bias
    np.testing.assert_allclose(folded.numpy(), full.detach().numpy(), atol=1e-5)   # float32 storage


def test_rotation_to_quaternion_rebuilds_the_matrix_as_3dgs_does():
    """The .ply quaternion, turned back into a matrix with 3DGS's ``build_rotation`` formula
    (written out here), is the surfel frame; scalar first, w >= 0."""
    from scipy.spatial.transform import Rotation

    from fmgs.export.ply import rotation_to_quaternion

    Rs = Rotation.random(500, random_state=1).as_matrix()
    # rotations by ~pi about each axis (w ~ 0) and the identity
    Rs = np.concatenate([Rs, Rotation.from_rotvec(np.eye(3) * (np.pi - 1e-3)).as_matrix(), np.eye(3)[None]])
    q = rotation_to_quaternion(Rs)
    assert q.shape == (len(Rs), 4) and (q[:, 0] >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-12)
    r, x, y, z = q.T
    built = np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - r * z), 2 * (x * z + r * y),
                      2 * (x * y + r * z), 1 - 2 * (x * x + z * z), 2 * (y * z - r * x),
                      2 * (x * z - r * y), 2 * (y * z + r * x), 1 - 2 * (x * x + y * y)], 1).reshape(-1, 3, 3)
    np.testing.assert_allclose(built, Rs, atol=1e-12)


def test_overwrite_replaces_our_bundle_only(foundation_export, tmp_path):
    """--overwrite onto a bundle of ours works; onto the (real) run folder it is refused, run intact."""
    from fmgs.bundle import read_bundle

    run, bdir, _ = foundation_export
    shutil.copytree(bdir, tmp_path / "b")
    rc, _, err = _cli([str(run), "--out", str(tmp_path / "b"), "--no-check", "--trt", "off", "--overwrite"])
    assert rc == 0, err
    assert read_bundle(tmp_path / "b").kind == "foundation" and sorted(os.listdir(tmp_path)) == ["b"]
    before = sorted(p.name for p in run.rglob("*"))
    rc, _, err = _cli([str(run), "--out", str(run), "--no-check", "--trt", "off", "--overwrite"])
    assert rc == 2 and "refusing to replace: this folder is" in err
    assert sorted(p.name for p in run.rglob("*")) == before


@pytest.mark.parametrize("geometry_hidden", [2, 1])
def test_planar_graph_modules_equal_the_trainer_fields(geometry_hidden):
    """The planar graph modules (surfel axis last) equal, in float64, the trainer's eq. 3-7 on
    the same surfels: geometry (raw and folded features, bounded displacement; the default two
    hidden layers and ``model.full.geometry_hidden=1``), full colour
    (raw and folded, view dependent) and foundation colour (view dependent and not)."""
    from fmgs.export.modules import (PlanarColorModule, PlanarFoundationColorModule, PlanarGeometryModule,
                                     fold_first_layer)
    from fmgs.trainer.models.fields import (AppearanceField, GeometryResidualField, apply_geometry_residual,
                                            sh_basis, so3_exp)

    torch.manual_seed(5)
    S, md = 300, 0.05
    P = lambda x: torch.movedim(x, 0, -1).contiguous()   # noqa: E731 - (S, ...) -> (..., S)
    field = GeometryResidualField(32, 16, 16, width=64, n_hidden=geometry_hidden).double()
    with torch.no_grad():
        field.mlp[-1].weight.normal_(0, 0.3)
        field.mlp[-1].bias.normal_(0, 0.1)
    f_g, f_c = torch.randn(S, 32, dtype=torch.float64), torch.randn(S, 32, dtype=torch.float64)
    z_p = torch.randn(1, 16, dtype=torch.float64)
    mu, sc = torch.randn(S, 3, dtype=torch.float64), torch.rand(S, 2, dtype=torch.float64) * 0.01 + 0.001
    R = so3_exp(torch.randn(S, 3, dtype=torch.float64))
    d = torch.nn.functional.normalize(torch.randn(S, 3, dtype=torch.float64), dim=-1) * 2.0
    app = AppearanceField(32, 16, 16, sh_degree=3, width=64, n_hidden=1).double()
    mlp = torch.nn.Sequential(torch.nn.Linear(32 + 16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)).double()
    with torch.no_grad():
        res = field(f_g, z_p)
        ref = apply_geometry_residual(mu, R, sc, None, res._replace(delta_d=md * torch.tanh(res.delta_d / md)))
        assert (ref.rotations - R).abs().max() > 0.1            # residual rotations far from identity
        col_ref = app(f_c, res.z_g, z_p, d)
        fnd_ref = torch.sigmoid(mlp(torch.cat([f_c, sh_basis(torch.nn.functional.normalize(d, dim=-1), 3)], -1)))
        for folded in (False, True):
            gm = PlanarGeometryModule(field, 16, folded=folded, max_displacement=md)
            fg = fold_first_layer(f_g, field.mlp[0], slice(0, 32)).double() if folded else f_g
            c, tu, tv, s_, z = gm(P(fg), z_p, P(mu), P(R), P(sc))
            tol = 1e-5 if folded else 1e-12            # fold_first_layer rounds to float32 once
            torch.testing.assert_close(c.T, ref.centers, atol=tol, rtol=0)
            torch.testing.assert_close(tu.T, ref.rotations[:, :, 0], atol=tol, rtol=0)
            torch.testing.assert_close(tv.T, ref.rotations[:, :, 1], atol=tol, rtol=0)
            torch.testing.assert_close(s_.T, ref.scales, atol=0, rtol=tol)
            torch.testing.assert_close(z.T, res.z_g, atol=tol, rtol=0)
            fc = fold_first_layer(f_c, app.mlp[0], slice(0, 32)).double() if folded else f_c
            col = PlanarColorModule(app, folded=folded)(P(fc), P(res.z_g), z_p, P(d))
            torch.testing.assert_close(col.T, col_ref, atol=tol, rtol=0)
            ff = fold_first_layer(f_c, mlp[0], slice(0, 32)).double() if folded else f_c
            fnd = PlanarFoundationColorModule(mlp, 3, 32, folded=folded)(P(ff), P(d))
            torch.testing.assert_close(fnd.T, fnd_ref, atol=tol, rtol=0)
        flat = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)).double()
        torch.testing.assert_close(PlanarFoundationColorModule(flat, -1, 32)(P(f_c)).T, torch.sigmoid(flat(f_c)),
                                   atol=1e-12, rtol=0)


def test_rows_layout_bundle_plays_like_the_planar_one(full_export, tmp_path):
    """``--layout rows`` (the row-major graphs of earlier bundles) passes the parity check
    and the runtime poses it exactly like the default planar bundle of the same run."""
    from fmgs.export.api import export_run
    from fmgs.runtime.pipeline import AvatarPipeline

    run, bdir, _ = full_export
    rep = export_run(run, tmp_path / "rows", parity_frames=1, bake_frames=2, trt="off", ply=False,
                     layout="rows", verbose=False)
    assert rep["parity"]["passed"]
    man = json.loads((tmp_path / "rows" / "manifest.json").read_text())
    assert "layout" not in man["models"]["geometry"] and "layout" not in man["models"]["color"]
    _, _, _, _, test = _rebuild(run)
    fr = test[0]
    cam = np.asarray(fr.camera.center, np.float64)
    got = {}
    for name, path in (("planar", bdir), ("rows", tmp_path / "rows")):
        pipe = AvatarPipeline(path, array_backend="numpy", inference_backend="onnxruntime", providers="cpu",
                              threads=1, drop_invisible=False)
        got[name] = pipe.posed_surfels(np.asarray(fr.poses).reshape(24, 3), fr.world_from_body, cam)
    for k in got["rows"]:
        np.testing.assert_allclose(got["planar"][k], got["rows"][k], atol=1e-6, rtol=0, err_msg=k)
    with pytest.raises(FmgsInputError, match="layout"):
        export_run(run, tmp_path / "bad", layout="columns", verbose=False)
