"""benchmarks/component_ablation.py on a real (tiny) full-model run of ZJU-MoCap 377."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train_e2e import TINY, _cli

_spec = importlib.util.spec_from_file_location(
    "component_ablation", Path(__file__).parents[1] / "benchmarks" / "component_ablation.py")
ca = importlib.util.module_from_spec(_spec)
sys.modules["component_ablation"] = ca
_spec.loader.exec_module(ca)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, zju377, data_root):
    """A 12-iteration full-model run (no priors) with its end-of-training evaluation of 2 frames."""
    out = tmp_path_factory.mktemp("runs") / "full"
    r = _cli(["--out", str(out), *TINY, "model.kind=full", "train.iterations=12", "train.eval_every=12",
              "train.eval_frames=2", "eval.max_frames=2", "train.lr.pose=0.01"], data_root)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_mean_code_is_the_mean_over_training_frames_with_their_correction(full_run):
    """Against an independent path: the correction added to the axis-angle by hand (float64),
    rotations from scipy, the encoder on the whole batch at once."""
    from scipy.spatial.transform import Rotation

    from fmgs.trainer.engine.run import load_run
    from fmgs.trainer.models.full import canonical_pose_joints, normalize_canonical_joints

    run = load_run(full_run, split="train")
    got = ca.mean_training_pose_code(run)
    delta = run.model.pose_correction.delta.detach().double().numpy().reshape(len(run.seq), 72)
    assert np.abs(delta).max() > 1e-4          # the correction learnt something to add
    thetas = np.stack([np.asarray(run.seq.smpl_params(n)["poses"], np.float64) for n in run.seq.names]) + delta
    R = Rotation.from_rotvec(thetas.reshape(-1, 3)).as_matrix().reshape(len(thetas), 24, 3, 3)
    J = normalize_canonical_joints(torch.as_tensor(canonical_pose_joints(run.setup.surfels), dtype=torch.float32))
    with torch.no_grad():
        ref = run.model.pose_encoder(torch.as_tensor(R, dtype=torch.float32), J.expand(len(R), 24, 3)).mean(0)
    torch.testing.assert_close(got[0], ref, rtol=0, atol=2e-5)


def test_variants_change_only_their_part(full_run):
    """After ``pose_code_mean`` every pose gets the same code (the given one); after
    ``smpl_skinning`` the surfels are skinned with the SMPL weights; the rest of the forward
    (the skinning weights resp. the pose code) is the unchanged model's."""
    from fmgs.trainer.engine.run import load_run
    from fmgs.trainer.models.full import canonical_pose_joints, pose_frame

    run = load_run(full_run, split="test")
    m, setup = run.model, run.setup
    J = torch.as_tensor(canonical_pose_joints(setup.surfels), dtype=torch.float32)
    frames = [run.seq[0], run.seq[1]]

    def posed(fr):
        rot, B = pose_frame(fr.poses, None, None, setup.rest_joints, setup.canonical_G, fr.world_from_body)
        with torch.no_grad():
            return m(rot, B, torch.as_tensor(fr.camera.center, dtype=torch.float32), J, semantic=False)

    before = [posed(f) for f in frames]
    assert not torch.equal(before[0].pose_code, before[1].pose_code)
    code = torch.linspace(-1.0, 1.0, before[0].pose_code.shape[1])[None]
    ca.VARIANTS["pose_code_mean"](code)(run)
    after = [posed(f) for f in frames]
    for a, b in zip(after, before):
        assert torch.equal(a.pose_code, code)
        assert torch.equal(a.skin_weights, b.skin_weights)
    ca.VARIANTS["smpl_skinning"]()(run)
    skinned = posed(frames[0])
    assert torch.equal(skinned.skin_weights, m.skin_weights)
    assert not torch.equal(skinned.skin_weights, before[0].skin_weights)


def test_cli_scores_the_unablated_avatar_as_fmgs_eval_and_records_each_variant(full_run, tmp_path, capsys):
    out = tmp_path / "abl"
    rc = ca.main([str(full_run), "--split", "test", "--max-frames", "2", "--out", str(out),
                  "--json", str(tmp_path / "s.json")])
    assert rc == 0
    ref = json.loads((full_run / "eval" / "metrics.json").read_text())
    none = json.loads((out / "none" / "metrics.json").read_text())
    assert [f["frame"] for f in none["frames"]] == [f["frame"] for f in ref["frames"]]
    for a, b in zip(none["frames"], ref["frames"]):
        assert a["psnr"] == pytest.approx(b["psnr"], abs=1e-9)
    s = json.loads((tmp_path / "s.json").read_text())
    for v in ca.VARIANTS:
        m = json.loads((out / v / "metrics.json").read_text())
        assert m["ablation"] == v and none["ablation"] is None
        d = np.mean([a["psnr"] - b["psnr"] for a, b in zip(m["frames"], none["frames"])])
        assert s["variants"][v]["psnr"]["mean_difference"] == pytest.approx(d, abs=1e-12)
    assert "| pose_code_mean |" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert ca.main([str(tmp_path)]) == 2
    assert ca.main([str(tmp_path), "--variants", "no_such_part"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("component_ablation: ") for line in err)
    assert "no_such_part" in err[1] and "Traceback" not in "".join(err)
