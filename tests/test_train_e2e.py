"""End-to-end: fmgs-train / fmgs-eval on a few real ZJU-MoCap 377 frames at low resolution.

Covers learning (PSNR rises), interruption + resume reproducing an uninterrupted
run, evaluation outputs, and clear CLI errors for bad input.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT

TINY = [
    "data.image_size=96", "data.train_range=[0,12]", "data.train_step=3",
    "data.test_range=[455,470]", "data.test_step=5",
    "train.log_every=1", "train.image_every=0", "train.threads=1",
]


def _cli(args, data_root, timeout=600, **kw):
    env = dict(os.environ, FMGS_DATA=str(data_root), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "fmgs.trainer.cli.main", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=REPO_ROOT, **kw)


def _body_model_priors(out: Path, seq_root: Path, data_root: Path, frames: str) -> Path:
    """Write body-model priors of ``frames`` with the real ``fmgs-prep priors`` CLI."""
    env = dict(os.environ, FMGS_DATA=str(data_root))
    r = subprocess.run([sys.executable, "-m", "fmgs.trainer.cli.prep", "priors", "--sequence", str(seq_root),
                        "--from-body-model", "--out", str(out), "--frames", frames],
                       capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _model_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, zju377, data_root):
    """A 30-iteration run, evaluated on 2 held-out frames."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    r = _cli(["--out", str(out), *TINY, "train.iterations=30", "train.checkpoint_every=10",
              "train.eval_every=30", "train.eval_frames=2", "eval.max_frames=2"], data_root)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_training_improves_heldout_psnr(tiny_run, data_root):
    """The trained avatar beats the untrained one on held-out frames (real learning, not a no-op)."""
    from fmgs.config import load_run_config
    from fmgs.trainer.engine.run import build_model, build_setup, open_sequence, quick_eval

    cfg = load_run_config(tiny_run)
    seq = open_sequence(cfg, "test")
    setup = build_setup(cfg, seq)
    torch.manual_seed(0)
    untrained = build_model(cfg, setup)
    before = quick_eval(untrained, setup, seq, cfg, 2)["psnr"]
    trained = build_model(cfg, setup)
    trained.load_state_dict(_model_state(tiny_run))
    after = quick_eval(trained, setup, seq, cfg, 2)["psnr"]
    assert after > before + 1.0, (before, after)
    prog = [json.loads(line) for line in (tiny_run / "progress.jsonl").read_text().splitlines()]
    assert prog[-1]["iteration"] == 30 and abs(prog[-1]["psnr"] - after) < 1e-6


def test_eval_outputs(tiny_run):
    ev = tiny_run / "eval"
    m = json.loads((ev / "metrics.json").read_text())
    assert m["num_frames"] == 2 and m["iteration"] == 30
    assert 10.0 < m["psnr"] < 60.0 and 0.0 < m["ssim"] <= 1.0
    per = [f["psnr"] for f in m["frames"]]
    assert abs(np.mean(per) - m["psnr"]) < 1e-9
    # the silhouette's union splits into IoU, mask left uncovered and render outside the mask
    for key in ("silhouette_iou", "silhouette_missed", "silhouette_extra"):
        assert abs(np.mean([f[key] for f in m["frames"]]) - m[key]) < 1e-12
    for f in m["frames"]:
        assert abs(f["silhouette_iou"] + f["silhouette_missed"] + f["silhouette_extra"] - 1.0) < 1e-12
    if m["lpips"] is None:
        assert m["lpips_note"]  # the reason LPIPS is absent is recorded
    pngs = sorted((ev / "images").glob("*.png"))
    assert [p.stem for p in pngs] == ["frame_000455", "frame_000460"]
    import imageio.v3 as iio

    img = iio.imread(pngs[0])
    assert img.shape == (96, 3 * 96, 3)
    assert (ev / "video.mp4").stat().st_size > 1000
    modes = iio.imread(ev / "modes" / "frame_000455.png")
    assert modes.shape == (96, 4 * 96, 3)  # rgb | depth | normal | normal from depth (no semantics)
    # every panel shows the same foreground silhouette (alpha > 0.5), nothing outside it
    fg = [(modes[:, k * 96:(k + 1) * 96].astype(int).sum(-1) > 0) for k in range(4)]
    assert fg[1].sum() > 100 and not (fg[1] & ~fg[0]).any() and not (fg[2] & ~fg[0]).any()
    assert (ev / "modes.mp4").stat().st_size > 1000
    assert (tiny_run / "tb").is_dir() and any((tiny_run / "tb").iterdir())


def test_interrupt_and_resume_match_uninterrupted(tmp_path, zju377, data_root):
    """Ctrl-C saves a checkpoint and says how to continue; resuming gives the uninterrupted result."""
    # with the learning-rate decay on: the schedule must continue exactly after the resume
    common = [*TINY, "train.iterations=14", "train.checkpoint_every=1", "train.eval_at_end=false",
              "train.lr_final_ratio=0.1"]
    ref = tmp_path / "ref"
    r = _cli(["--out", str(ref), *common], data_root)
    assert r.returncode == 0, r.stderr[-3000:]

    run = tmp_path / "run"
    env = dict(os.environ, FMGS_DATA=str(data_root), PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "fmgs.trainer.cli.main", "--out", str(run), *common],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO_ROOT)
    # Wait until training is under way (the first per-iteration checkpoint exists), then interrupt.
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not (run / "checkpoints" / "last.pt").exists():
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    buf, _ = p.communicate(timeout=300)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    if p.returncode == 0:
        pytest.skip("training finished before the interrupt arrived")
    assert p.returncode == 130, buf[-2000:]
    assert f"fmgs-train --resume {run}" in buf
    assert 0 < ckpt["iteration"] < 14

    r = _cli(["--resume", str(run)], data_root)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _model_state(ref), _model_state(run)
    final = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert final["iteration"] == 14
    # the closing line's s/it counts only this session's time and iterations
    m = re.search(r"\(([0-9.]+) s/it this session\)", r.stdout + r.stderr)
    assert m, (r.stdout + r.stderr)[-2000:]
    session = (final["elapsed_s"] - ckpt["elapsed_s"]) / (14 - ckpt["iteration"])
    assert abs(float(m.group(1)) - session) <= 0.006, (m.group(0), session, ckpt["elapsed_s"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"parameter {k} differs after resume")


def test_no_eval_is_kept_for_a_resumed_run(tmp_path, zju377, data_root):
    """``--no-eval`` is recorded in the run's config: a later ``--resume`` does not evaluate."""
    from fmgs.config import load_run_config

    run = tmp_path / "run"
    r = _cli(["--out", str(run), "--no-eval", *TINY, "train.iterations=2"], data_root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_run_config(run).train.eval_at_end is False
    r = _cli(["--resume", str(run)], data_root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (run / "eval").exists() and not (run / "eval_val").exists()


def test_existing_run_folder_is_not_overwritten(tiny_run, data_root):
    before = (tiny_run / "checkpoints" / "last.pt").read_bytes()
    r = _cli(["--out", str(tiny_run), *TINY, "train.iterations=1"], data_root)
    assert r.returncode == 2
    assert "--resume" in r.stderr and str(tiny_run) in r.stderr
    assert (tiny_run / "checkpoints" / "last.pt").read_bytes() == before


def test_missing_smpl_file_is_a_clear_error(tmp_path, zju377, data_root):
    missing = tmp_path / "nowhere" / "SMPL_NEUTRAL.pkl"
    r = _cli(["--out", str(tmp_path / "r"), *TINY, f"data.smpl_path={missing}", "train.iterations=1"], data_root)
    assert r.returncode == 2
    assert str(missing) in r.stderr and "Traceback" not in r.stderr


def test_missing_sequence_is_a_clear_error(tmp_path, data_root):
    missing = tmp_path / "no_such_sequence"
    r = _cli(["--out", str(tmp_path / "r"), f"data.root={missing}"], data_root)
    assert r.returncode == 2
    assert str(missing) in r.stderr and "Traceback" not in r.stderr


def test_eval_of_non_run_folder(tmp_path, data_root):
    env = dict(os.environ, FMGS_DATA=str(data_root))
    r = subprocess.run([sys.executable, "-c", "import sys; from fmgs.trainer.cli.main import eval_main; sys.exit(eval_main())",
                        str(tmp_path)], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert r.returncode == 2 and "config.yaml" in r.stderr


def test_full_model_trains_with_body_model_priors(tmp_path, zju377, data_root):
    """model.kind=full: body-model priors from fmgs-prep drive every loss group (eq. 13-21)
    through coordinated training, and the avatar improves on held-out frames."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    priors = _body_model_priors(tmp_path / "priors", zju377, data_root, "0:12:3,455:470:5")
    run = tmp_path / "full"
    r = _cli(["--out", str(run), *TINY, "model.kind=full", f"data.priors_dir={priors}", "train.iterations=20",
              "loss.body_model_prior_scale=1", "loss.normal_consistency_start=0",
              "train.eval_every=20", "train.eval_frames=2", "eval.max_frames=2"], data_root)
    assert r.returncode == 0, r.stderr[-3000:]

    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for group in ("photometric", "depth", "normal", "semantic_field", "regularisers"):
        assert f"loss/{group}" in tags, tags

    from fmgs.config import load_run_config
    from fmgs.trainer.engine.run import build_model, build_setup, open_sequence, quick_eval

    cfg = load_run_config(run)
    seq = open_sequence(cfg, "test")
    setup = build_setup(cfg, seq)
    torch.manual_seed(0)
    before = quick_eval(build_model(cfg, setup), setup, seq, cfg, 2)["psnr"]
    after = json.loads((run / "progress.jsonl").read_text().splitlines()[-1])["psnr"]
    assert after > before + 1.0, (before, after)
    for k, v in _model_state(run).items():
        assert torch.isfinite(v).all(), f"non-finite parameter {k} after training"
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["num_frames"] == 2 and abs(m["psnr"] - after) < 0.5
    import imageio.v3 as iio

    modes = iio.imread(run / "eval" / "modes" / "frame_000455.png")
    assert modes.shape == (96, 5 * 96, 3)  # ... | semantic map
    from fmgs.priors import SAPIENS_PALETTE

    sem = modes[:, 4 * 96:].reshape(-1, 1, 3)  # every pixel is a class colour
    assert (sem == SAPIENS_PALETTE[None]).all(-1).any(-1).all()


def test_full_loss_groups_finite_where_priors_have_no_value(tmp_path, zju377, data_root):
    """Body-model priors are NaN ('no value') where the image mask reaches past the SMPL
    silhouette (hair, clothes): every loss group and every gradient must stay finite there."""
    from fmgs.priors import load_priors
    from fmgs.config import load_config
    from fmgs.trainer.engine.run import build_model, build_setup, open_sequence

    priors = _body_model_priors(tmp_path / "priors", zju377, data_root, "0")
    cfg = load_config(None, [f"data.root={zju377}", "data.image_size=128", "model.kind=full",
                             f"data.priors_dir={priors}", "data.train_range=[0,1]", "loss.body_model_prior_scale=1",
                             "loss.normal_consistency_start=0",
                             f"data.smpl_path={data_root}/body_models/smpl/SMPL_NEUTRAL.pkl",
                             f"data.parts_path={data_root}/body_models/smpl/smplh_parts_segm.pkl"])
    seq = open_sequence(cfg, "train")
    setup = build_setup(cfg, seq)
    torch.manual_seed(0)
    model = build_model(cfg, setup, num_frames=1)
    prior = load_priors(cfg.data.root, seq.names, 128, priors, verbose=False)[0]
    fr = seq[0]
    no_value = (fr.mask > 0.5) & ~np.isfinite(prior["normal"]).all(-1)
    assert no_value.sum() > 10  # the case under test really occurs
    posed = model.pose(fr, setup, frame_id=0, training=True)
    out = model.render(posed, fr.camera, cfg)
    groups = model.loss_groups(cfg, out, posed, fr, prior, 0)
    # semantic CE on logits composited with constant weights (train.semantic_weights_only)
    assert set(groups) == {"photometric", "depth", "normal", "semantic_field", "regularisers"}
    assert out.extras is not None
    assert all(torch.isfinite(v) for v in groups.values()), groups
    model.backward(posed, groups, cfg)
    for n, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n


def test_lr_schedule_decays_networks_and_positions_only():
    """train.lr_final_ratio: exponential decay (3DGS-Avatar's ExponentialLR) of the network and
    position rates, r ** (it / iterations); opacity and scale rates stay; r = 1 is constant."""
    from fmgs.config import load_config
    from fmgs.trainer.engine.run import DECAYED_GROUPS, apply_lr_schedule, lr_factor

    cfg = load_config(None, ["train.lr_final_ratio=0.01", "train.iterations=200"])
    assert lr_factor(cfg, 0) == 1.0 and abs(lr_factor(cfg, 200) - 0.01) < 1e-12
    assert abs(lr_factor(cfg, 50) - 0.01 ** 0.25) < 1e-12
    names = ["hash_grid", "mlp", "opacity", "pose", "scale", "displacement"]
    opt = torch.optim.Adam([{"params": [torch.zeros(1, requires_grad=True)], "lr": 0.1 * (k + 1), "name": n,
                             "initial_lr": 0.1 * (k + 1)} for k, n in enumerate(names)])
    apply_lr_schedule(cfg, opt, 100)
    for k, g in enumerate(opt.param_groups):
        want = 0.1 * (k + 1) * (0.1 if g["name"] in DECAYED_GROUPS else 1.0)
        assert abs(g["lr"] - want) < 1e-12, g["name"]
    assert lr_factor(load_config(None, []), 123) == 1.0       # shipped default: constant


def test_semantic_iteration_schedule():
    """loss.semantic_every = k: the semantic branch runs on iterations 0, k, 2k, ...; 1 = always."""
    from fmgs.config import load_config
    from fmgs.trainer.engine.train import semantic_iteration

    c4 = load_config(None, ["loss.semantic_every=4"])
    assert [semantic_iteration(c4, i) for i in range(9)] == [True, False, False, False, True, False, False,
                                                             False, True]
    assert all(semantic_iteration(load_config(None, []), i) for i in range(5))


def test_prior_term_scale_and_normal_consistency_start():
    """Body-model priors scale the depth / normal PRIOR terms by loss.body_model_prior_scale,
    foundation-model priors never; L_sn starts at loss.normal_consistency_start * iterations."""
    from fmgs.config import load_config
    from fmgs.trainer.losses.objectives import normal_consistency_start, prior_term_scale

    cfg = load_config(None, ["loss.body_model_prior_scale=0.25", "loss.normal_consistency_start=0.2",
                             "train.iterations=1000"])
    assert prior_term_scale(cfg, {"kind": "body-model"}) == 0.25
    assert prior_term_scale(cfg, {"kind": "foundation-model"}) == 1.0
    assert prior_term_scale(cfg, None) == 1.0 and prior_term_scale(cfg, {"kind": None}) == 1.0
    assert normal_consistency_start(cfg) == 200


def _prep(args, data_root, timeout=600, threads=None):
    env = dict(os.environ, FMGS_DATA=str(data_root), PYTHONUNBUFFERED="1")
    if threads is not None:   # torch's intra-op threads (float reductions depend on them)
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, "-m", "fmgs.trainer.cli.prep", *args], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=timeout)


def test_prep_refine_writes_a_sequence_with_refined_training_poses(tiny_run, tmp_path, zju377, data_root, request):
    """``fmgs-prep refine`` on the tiny run (training frames 0, 3, 6, 9): the refined frames
    (every 2nd training frame + the last: 0, 6, 9) carry exactly the poses that
    ``refine_frame_pose`` finds for them with the run's avatar, frame 3 the mean of its
    neighbours' changes, held-out frames their source poses; ``joints`` are the forward
    kinematics of the refined poses; images and masks are the source's bytes; the folder
    opens with the reader; replacing needs --overwrite and never touches a foreign folder."""
    import pickle

    from fmgs.body_model import axis_angle_to_matrix, forward_kinematics
    from fmgs.trainer.data.humannerf import HumanNeRFSequence
    from fmgs.trainer.engine.refine import RefineSettings, refine_frame_pose
    from fmgs.trainer.engine.run import load_run

    out = tmp_path / "refined"
    # one torch thread on both sides: the in-process reference below must reduce in the same
    # order as the subprocess, whatever thread count earlier tests left in this process
    r = _prep(["refine", str(tiny_run), "--out", str(out), "--every", "2", "--steps", "4", "--no-progress"],
              data_root, threads=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "refined 3 of 4 training frames" in r.stdout
    src = pickle.load(open(zju377 / "mesh_infos.pkl", "rb"))
    new = pickle.load(open(out / "mesh_infos.pkl", "rb"))
    assert set(new) == set(src)
    run = load_run(tiny_run, split="train")
    names = run.seq.names
    assert len(names) == 4
    deltas = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    for i in (0, 2, 3):
        fr = run.seq[i]
        ref, _ = refine_frame_pose(run.model, run.setup, fr, run.cfg, RefineSettings(iterations=4))
        np.testing.assert_allclose(new[fr.name]["poses"], ref.poses, atol=1e-6)
        np.testing.assert_allclose(new[fr.name]["Th"], ref.Th, atol=1e-6)
        deltas[i] = (np.asarray(ref.poses, np.float64) - src[fr.name]["poses"].reshape(72),
                     np.asarray(ref.Th, np.float64) - src[fr.name]["Th"].reshape(3))
        assert np.abs(deltas[i][0]).max() > 1e-5       # the refinement did move the pose
    mid = names[1]
    np.testing.assert_allclose(new[mid]["poses"] - src[mid]["poses"].reshape(72),
                               0.5 * (deltas[0][0] + deltas[2][0]), atol=1e-6)
    np.testing.assert_allclose(new[mid]["Th"] - src[mid]["Th"].reshape(3),
                               0.5 * (deltas[0][1] + deltas[2][1]), atol=1e-6)
    for name in names:
        _, posed = forward_kinematics(axis_angle_to_matrix(np.asarray(new[name]["poses"], np.float64).reshape(24, 3)),
                                      np.asarray(src[name]["tpose_joints"], np.float64),
                                      np.asarray(run.setup.smpl.parents))
        np.testing.assert_allclose(new[name]["joints"], posed, atol=1e-5)
    for name in set(src) - set(names):
        for k in ("poses", "Rh", "Th", "joints"):
            np.testing.assert_array_equal(new[name][k], src[name][k])
    for name in (names[0], "frame_000455" if "frame_000455" in src else sorted(src)[-1]):
        for kind in ("images", "masks"):
            assert (out / kind / f"{name}.png").read_bytes() == (zju377 / kind / f"{name}.png").read_bytes()
    report = json.loads((out / "pose_refinement.json").read_text())
    assert report["refined_frames"] == 3 and report["untouched_frames"] == len(src) - 4
    seq = HumanNeRFSequence(out, split="all", frames=names[:1], image_size=96)
    assert np.allclose(seq[0].poses, new[names[0]]["poses"])

    again = _prep(["refine", str(tiny_run), "--out", str(out), "--steps", "1", "--no-progress"], data_root)
    assert again.returncode == 2 and "--overwrite" in again.stderr and str(out) in again.stderr
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    r2 = _prep(["refine", str(tiny_run), "--out", str(foreign), "--steps", "1", "--overwrite", "--no-progress"],
               data_root)
    assert r2.returncode == 2 and "refusing to replace" in r2.stderr
    assert (foreign / "notes.txt").read_text() == "keep"
    r3 = _prep(["refine", str(tiny_run), "--out", str(out), "--every", "4", "--steps", "1", "--overwrite",
                "--no-progress"], data_root)
    assert r3.returncode == 0, r3.stderr[-2000:]
    assert json.loads((out / "pose_refinement.json").read_text())["settings"]["every"] == 4


def test_prep_refine_fits_held_out_poses_to_their_masks(tiny_run, tmp_path, zju377, data_root, request):
    """``fmgs-prep refine --steps 0 --held-out-steps 3`` on the tiny run: each test frame
    (455, 460, 465) carries exactly the pose that ``refine_frame_pose`` finds with the mask
    only (``photometric = 0``; with colour the poses differ), ``joints`` are their forward
    kinematics, every other frame keeps its source pose, the report counts them; ``--steps 0``
    alone is a one-line error."""
    import pickle

    from fmgs.body_model import axis_angle_to_matrix, forward_kinematics
    from fmgs.trainer.engine.refine import RefineSettings, refine_frame_pose
    from fmgs.trainer.engine.run import load_run

    out = tmp_path / "held"
    r = _prep(["refine", str(tiny_run), "--out", str(out), "--steps", "0", "--held-out-steps", "3",
               "--no-progress"], data_root, threads=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fitted 3 validation and test poses to their masks" in r.stdout and "training frames" not in r.stdout
    src = pickle.load(open(zju377 / "mesh_infos.pkl", "rb"))
    new = pickle.load(open(out / "mesh_infos.pkl", "rb"))
    run = load_run(tiny_run, split="test")
    names = run.seq.names
    assert names == ["frame_000455", "frame_000460", "frame_000465"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    for i, name in enumerate(names):
        fr = run.seq[i]
        ref, _ = refine_frame_pose(run.model, run.setup, fr, run.cfg, RefineSettings(iterations=3, photometric=0.0))
        np.testing.assert_allclose(new[name]["poses"], ref.poses, atol=1e-6)
        np.testing.assert_allclose(new[name]["Th"], ref.Th, atol=1e-6)
        np.testing.assert_array_equal(new[name]["Rh"], src[name]["Rh"])
        assert np.abs(new[name]["poses"] - src[name]["poses"].reshape(72)).max() > 1e-5
        _, posed = forward_kinematics(axis_angle_to_matrix(np.asarray(new[name]["poses"], np.float64).reshape(24, 3)),
                                      np.asarray(src[name]["tpose_joints"], np.float64),
                                      np.asarray(run.setup.smpl.parents))
        np.testing.assert_allclose(new[name]["joints"], posed, atol=1e-5)
        if i == 0:
            colour, _ = refine_frame_pose(run.model, run.setup, fr, run.cfg, RefineSettings(iterations=3))
            assert np.abs(np.asarray(colour.poses) - new[name]["poses"]).max() > 1e-5
    for name in set(src) - set(names):
        for k in ("poses", "Rh", "Th", "joints"):
            np.testing.assert_array_equal(new[name][k], src[name][k])
    report = json.loads((out / "pose_refinement.json").read_text())
    assert report["refined_frames"] == 0 and report["held_out"]["refined_frames"] == 3
    assert report["mean_joint_rotation_change_deg"] is None and "RuntimeWarning" not in r.stderr
    assert report["held_out"]["objective"] == "silhouette"
    assert report["untouched_frames"] == len(src) - 3      # the training frames' poses too
    bad = _prep(["refine", str(tiny_run), "--out", str(tmp_path / "x"), "--steps", "0", "--no-progress"], data_root)
    assert bad.returncode == 2 and "--steps must be at least 1" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()


def _eval_cli(args, data_root):
    env = dict(os.environ, FMGS_DATA=str(data_root))
    return subprocess.run([sys.executable, "-c", "import sys; from fmgs.trainer.cli.main import eval_main; "
                           "sys.exit(eval_main())", *args], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=600)


def test_eval_silhouette_refinement_fits_the_other_sequences_masks(tiny_run, tmp_path, zju377, data_root):
    """``fmgs-eval --refine-poses 3 --refine-objective silhouette --refine-masks-from SEQ``:
    SEQ is 377 with the two scored frames' masks blanked. Each frame's recorded first loss
    is the one ``refine_frame_pose`` (mask only) sees with SEQ's blank mask, not the scored
    one; the silhouette IoU is still scored against the scored sequence's masks (> 0.3; a
    blank mask gives 0); the settings are recorded. Bad combinations are clear errors."""
    import dataclasses

    import cv2

    from fmgs.trainer.engine.refine import RefineSettings, refine_frame_pose
    from fmgs.trainer.engine.run import load_run

    other = tmp_path / "blank_masks"
    (other / "masks").mkdir(parents=True)
    (other / "images").symlink_to(zju377 / "images")
    for f in ("cameras.pkl", "mesh_infos.pkl", "canonical_joints.pkl"):
        (other / f).symlink_to(zju377 / f)
    scored = ("frame_000455", "frame_000460")
    for m in sorted((zju377 / "masks").glob("*.png")):
        if m.stem in scored:
            cv2.imwrite(str(other / "masks" / m.name), np.zeros_like(cv2.imread(str(m), cv2.IMREAD_GRAYSCALE)))
        else:
            (other / "masks" / m.name).symlink_to(m)
    out = tmp_path / "ev"
    r = _eval_cli([str(tiny_run), "--out", str(out), "--no-video", "--max-frames", "2", "--refine-poses", "3",
                   "--refine-objective", "silhouette", "--refine-masks-from", str(other)], data_root)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["pose_refinement"]["photometric"] == 0.0
    assert m["pose_refinement"]["masks_from"] == str(other.resolve())
    run = load_run(tiny_run, split="test")
    for i, rec in enumerate(m["frames"]):
        fr = run.seq[i]
        assert fr.name == scored[i]
        blank = dataclasses.replace(fr, mask=np.zeros_like(fr.mask))
        _, st_blank = refine_frame_pose(run.model, run.setup, blank, run.cfg,
                                        RefineSettings(iterations=3, photometric=0.0))
        _, st_own = refine_frame_pose(run.model, run.setup, fr, run.cfg, RefineSettings(iterations=3, photometric=0.0))
        assert abs(rec["pose_refinement"]["loss_first"] - st_blank["loss_first"]) < 1e-5 * st_blank["loss_first"]
        assert abs(st_own["loss_first"] - st_blank["loss_first"]) > 0.1 * st_blank["loss_first"]
        assert rec["silhouette_iou"] > 0.3

    bad = _eval_cli([str(tiny_run), "--refine-objective", "silhouette"], data_root)
    assert bad.returncode == 2 and "--refine-poses" in bad.stderr
    wrong = _eval_cli([str(tiny_run), "--out", str(tmp_path / "ev2"), "--refine-poses", "1",
                       "--refine-masks-from", str(tmp_path / "nowhere")], data_root)
    assert wrong.returncode != 0 and "nowhere" in wrong.stderr and "Traceback" not in wrong.stderr


def test_loading_a_run_takes_its_thread_setting(tiny_run):
    """``load_run`` (fmgs-eval, fmgs-prep refine, fmgs-export) runs torch on the config's
    ``train.threads``, overridable with ``--set``; null leaves torch's count alone."""
    import torch

    from fmgs.trainer.engine.run import load_run

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        load_run(tiny_run, ["train.threads=1"], split="test")
        assert torch.get_num_threads() == 1
        load_run(tiny_run, ["train.threads=null"], split="test")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
