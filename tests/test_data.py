"""HumanNeRF-format reader (fmgs.trainer.data.humannerf) and pinhole cameras (fmgs.camera) on real ZJU 377."""
from __future__ import annotations

import pickle
import shutil

import cv2
import imageio.v2 as imageio
import numpy as np
import pytest

from fmgs.body_model import load_smpl, world_from_body
from fmgs.camera import Camera
from fmgs.errors import FmgsInputError
from fmgs.pickle_io import load_pickle
from fmgs.trainer.data.humannerf import (Frame, HumanNeRFSequence, SplitConfig, read_image, read_mask,
                               undistort_image)

FEW = [0, 137, 300, 455, 565]


@pytest.fixture(scope="module")
def seq(zju377, smpl_path):
    s = HumanNeRFSequence(zju377, frames=FEW, smpl_path=smpl_path)
    s.load()
    return s


@pytest.fixture(scope="module")
def smpl(smpl_path):
    return load_smpl(smpl_path)


# ----------------------------------------------------------------------------- camera
def _random_camera(rng, dist=None):
    R, _ = cv2.Rodrigues(rng.normal(size=3))
    K = np.array([[500.0, 0, 260.0], [0, 510.0, 250.0], [0, 0, 1]])
    return Camera(K=K, R=R, t=rng.normal(size=3), width=512, height=512, dist=dist)


def test_camera_projection_matches_opencv():
    rng = np.random.default_rng(0)
    dist = np.array([-0.2, 0.03, -0.005, 0.002, 0.06])
    cam = _random_camera(rng, dist)
    pts = cam.center + rng.normal(size=(50, 3)) * 0.3 + cam.R.T @ np.array([0, 0, 3.0])
    rvec, _ = cv2.Rodrigues(cam.R)
    ref, _ = cv2.projectPoints(pts, rvec, cam.t, cam.K, None)
    uv, z = cam.project(pts)
    assert np.allclose(uv, ref[:, 0], atol=1e-8)
    assert np.allclose(z, (pts @ cam.R.T + cam.t)[:, 2]) and np.all(z > 0)
    refd, _ = cv2.projectPoints(pts, rvec, cam.t, cam.K, dist)
    assert np.allclose(cam.project_distorted(pts)[0], refd[:, 0], atol=1e-6)
    # centre: maps to camera origin; optical axis projects to the principal point
    assert np.allclose(cam.R @ cam.center + cam.t, 0)
    assert np.allclose(cam.viewmat @ np.append(cam.center, 1), [0, 0, 0, 1])
    uv0, _ = cam.project((cam.center + 2.0 * cam.R[2])[None])
    assert np.allclose(uv0[0], cam.K[:2, 2])


def test_camera_scaled_is_exact_under_half_pixel_convention():
    rng = np.random.default_rng(1)
    cam = _random_camera(rng)
    pts = cam.center + cam.R.T @ np.array([0, 0, 3.0]) + rng.normal(size=(20, 3)) * 0.3
    half = cam.scaled(0.5)
    assert (half.width, half.height) == (256, 256)
    assert np.allclose(half.project(pts)[0], 0.5 * cam.project(pts)[0])
    # the image's outer corner (512, 512) maps to (256, 256): pixel boxes scale exactly
    assert np.allclose(half.K[:2, 2], 0.5 * cam.K[:2, 2])
    with pytest.raises(FmgsInputError):
        cam.scaled(0)


def test_camera_validation():
    K = np.eye(3)
    with pytest.raises(FmgsInputError, match="shape"):
        Camera(K=np.eye(2), R=np.eye(3), t=np.zeros(3), width=4, height=4)
    with pytest.raises(FmgsInputError, match="rotation"):
        Camera(K=K, R=2 * np.eye(3), t=np.zeros(3), width=4, height=4)
    with pytest.raises(FmgsInputError, match="rotation"):
        Camera(K=K, R=-np.eye(3), t=np.zeros(3), width=4, height=4)
    with pytest.raises(FmgsInputError, match="width"):
        Camera(K=K, R=np.eye(3), t=np.zeros(3), width=0, height=4)
    with pytest.raises(FmgsInputError, match="distortion"):
        Camera(K=K, R=np.eye(3), t=np.zeros(3), width=4, height=4, dist=np.zeros(4))
    with pytest.raises(FmgsInputError, match="cams.pkl"):
        Camera.from_extrinsics(K, np.ones((4, 4)), 4, 4, source="cams.pkl")


# ----------------------------------------------------------------------------- splits, betas
def test_default_splits(zju377):
    train = HumanNeRFSequence(zju377, split="train")
    test = HumanNeRFSequence(zju377, split="test")
    assert len(train) == 455 and train.indices == list(range(455))
    assert len(test) == 23 and test.indices == list(range(455, 570, 5))
    assert test.names[0] == "frame_000455" and test.names[-1] == "frame_000565"
    assert len(HumanNeRFSequence(zju377, split="all")) == 570
    custom = HumanNeRFSequence(zju377, split="test",
                               split_config={"test_range": (500, 600), "test_step": 10})
    assert custom.indices == list(range(500, 570, 10))
    assert SplitConfig().indices("train", 100) == list(range(100))
    with pytest.raises(FmgsInputError):
        HumanNeRFSequence(zju377, split="validation")
    with pytest.raises(FmgsInputError):
        HumanNeRFSequence(zju377, split_config={"train_stride": 2})


def test_betas_reproduce_canonical_joints(seq, smpl, zju377):
    betas = seq.betas
    assert betas.shape == (10,)
    assert seq.betas_residual_rms is not None and seq.betas_residual_rms < 2e-3
    ref = np.asarray(load_pickle(zju377 / "canonical_joints.pkl")["joints"])
    _, joints = smpl.shape(betas)
    assert np.abs(joints - ref).max() < 2e-3


# ----------------------------------------------------------------------------- images
def test_frame_contents(seq, zju377):
    f = seq[0]
    assert isinstance(f, Frame) and f.name == "frame_000000" and f.index == 0
    assert f.image.shape == (512, 512, 3) and f.image.dtype == np.float32
    assert f.mask.shape == (512, 512) and set(np.unique(f.mask)) <= {0.0, 1.0}
    assert 0 <= f.image.min() and f.image.max() <= 1
    assert f.poses.shape == (72,) and np.all(f.poses[:3] == 0)
    assert f.joints.shape == (24, 3) and f.camera.dist is None
    assert np.allclose(f.world_from_body, world_from_body(f.Rh, f.Th))
    assert seq[-1].index == 565
    # the loaded pixels are the undistorted file contents (bilinear image, nearest mask)
    raw = read_image(zju377 / "images" / "frame_000000.png")
    rawm = read_mask(zju377 / "masks" / "frame_000000.png")
    cam = load_pickle(zju377 / "cameras.pkl")["frame_000000"]
    K, D = np.asarray(cam["intrinsics"], np.float64), np.asarray(cam["distortions"], np.float64)
    ref = cv2.undistort(raw, K, D, None, K)
    refm = cv2.remap(rawm, *cv2.initUndistortRectifyMap(K, D, None, K, (512, 512), cv2.CV_32FC1),
                     cv2.INTER_NEAREST)
    img8, m8 = seq.image_uint8(0)
    assert np.array_equal(m8, refm)
    # cv2.undistort uses fixed-point (1/32 px) maps internally: tiny differences only
    diff = np.abs(img8.astype(int) - ref.astype(int))
    assert diff.mean() < 0.2 and np.percentile(diff, 99.9) <= 3
    assert not np.array_equal(img8, raw)  # undistortion did something


def test_undistortion_moves_pixels_as_undistortpoints_predicts(zju377):
    cam = load_pickle(zju377 / "cameras.pkl")["frame_000000"]
    K, D = np.asarray(cam["intrinsics"], np.float64), np.asarray(cam["distortions"], np.float64)
    yy, xx = np.mgrid[0:512, 0:512].astype(np.float64)

    def blob_centroid_after(pd):
        img = np.exp(-((xx - pd[0]) ** 2 + (yy - pd[1]) ** 2) / (2 * 1.5 ** 2)).astype(np.float32)
        out = undistort_image(img, K, D).astype(np.float64)
        out[out < 0.05 * out.max()] = 0
        return np.array([(out * xx).sum(), (out * yy).sum()]) / out.sum()

    # a point near the image corner: barrel distortion -> undistortion pushes it outwards
    for pd in ([60.0, 55.0], [450.0, 460.0], [70.0, 440.0]):
        pu = cv2.undistortPoints(np.array([[pd]]), K, D, P=K)[0, 0]
        shift = np.linalg.norm(pu - pd)
        assert shift > 3.0, shift  # meaningful displacement
        got = blob_centroid_after(np.array(pd))
        assert np.linalg.norm(got - pu) < 0.25, (pd, pu, got)
    # the principal point stays where it is
    pp = K[:2, 2]
    assert np.linalg.norm(blob_centroid_after(pp) - pp) < 0.05


def test_background_composited_outside_mask(zju377):
    white = HumanNeRFSequence(zju377, frames=[10, 200], background=(1, 1, 1))
    black = HumanNeRFSequence(zju377, frames=[10, 200])
    for i in range(2):
        fw, fb = white[i], black[i]
        out = fw.mask == 0
        assert out.mean() > 0.5 and (~out).sum() > 1000
        assert np.all(fw.image[out] == 1.0) and np.all(fb.image[out] == 0.0)
        assert np.array_equal(fw.image[~out], fb.image[~out])
        assert fb.image[~out].mean() > 0.05  # the person is not black


def test_posed_smpl_joints_project_inside_mask(seq, smpl):
    betas = seq.betas
    for i in range(len(seq)):
        f = seq[i]
        _, joints = smpl.forward(betas, f.poses)  # body frame, root rotation zero
        assert np.abs(joints - f.joints).max() < 2e-3  # agrees with the file's joints
        world = joints @ f.world_from_body[:3, :3].T + f.world_from_body[:3, 3]
        uv, z = f.camera.project(world)
        assert np.all(z > 0.5)
        assert np.all(f.camera.in_image(uv))
        ij = np.floor(uv).astype(int)  # pixel (i, j) covers [j, j+1) x [i, i+1)
        inside = f.mask[ij[:, 1], ij[:, 0]] > 0
        assert inside.mean() >= 0.9, (f.name, inside.mean())  # wrong Rh convention: 20-45%


def test_image_size_rescales_camera_and_pixels(zju377, smpl_path):
    small = HumanNeRFSequence(zju377, frames=[300], image_size=256, smpl_path=smpl_path)
    f = small[0]
    assert f.image.shape == (256, 256, 3) and f.mask.shape == (256, 256)
    assert (f.camera.width, f.camera.height) == (256, 256)
    full = HumanNeRFSequence(zju377, frames=[300])[0]
    assert np.allclose(f.camera.K[:2], 0.5 * full.camera.K[:2])
    # the mask centroid moves with the camera: half of the full-size centroid
    c_s = np.argwhere(f.mask > 0).mean(0) + 0.5
    c_f = np.argwhere(full.mask > 0).mean(0) + 0.5
    assert np.allclose(c_s, 0.5 * c_f, atol=1.0)


def test_no_undistort_keeps_raw_pixels(zju377):
    s = HumanNeRFSequence(zju377, frames=[0], undistort=False)
    img8, m8 = s.image_uint8(0)
    assert np.array_equal(img8, read_image(zju377 / "images" / "frame_000000.png"))
    assert s[0].camera.dist is not None and s[0].camera.dist.shape == (5,)


# ----------------------------------------------------------------------------- errors
@pytest.fixture()
def fake(zju377, tmp_path):
    """A 3-frame copy of 377 rebuilt from the real files via the real loaders."""
    names = ["frame_000000", "frame_000001", "frame_000002"]
    cams = load_pickle(zju377 / "cameras.pkl")
    infos = load_pickle(zju377 / "mesh_infos.pkl")
    root = tmp_path / "seq"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    with open(root / "cameras.pkl", "wb") as fh:
        pickle.dump({n: cams[n] for n in names}, fh)
    with open(root / "mesh_infos.pkl", "wb") as fh:
        pickle.dump({n: infos[n] for n in names}, fh)
    shutil.copy(zju377 / "canonical_joints.pkl", root / "canonical_joints.pkl")
    for n in names:
        imageio.imwrite(root / "images" / f"{n}.png", read_image(zju377 / "images" / f"{n}.png"))
        imageio.imwrite(root / "masks" / f"{n}.png",
                        read_mask(zju377 / "masks" / f"{n}.png") * np.uint8(255))
    return root


def test_fake_sequence_loads(fake):
    s = HumanNeRFSequence(fake, split="all")
    assert len(s) == 3 and s[2].name == "frame_000002"
    assert s[1].image.shape == (512, 512, 3)


def test_error_missing_root(tmp_path):
    with pytest.raises(FmgsInputError, match="nowhere"):
        HumanNeRFSequence(tmp_path / "nowhere")


@pytest.mark.parametrize("fname", ["cameras.pkl", "mesh_infos.pkl"])
def test_error_missing_pickle(fake, fname):
    (fake / fname).unlink()
    with pytest.raises(FmgsInputError) as exc:
        HumanNeRFSequence(fake, split="all")
    assert str(fake / fname) in str(exc.value)


@pytest.mark.parametrize("kind", ["images", "masks"])
def test_error_missing_image_or_mask(fake, kind):
    victim = fake / kind / "frame_000001.png"
    victim.unlink()
    with pytest.raises(FmgsInputError) as exc:
        HumanNeRFSequence(fake, split="all")
    assert str(victim) in str(exc.value)


def test_error_size_mismatch(fake):
    mpath = fake / "masks" / "frame_000002.png"
    m = imageio.imread(mpath)
    imageio.imwrite(mpath, cv2.resize(m, (256, 256), interpolation=cv2.INTER_NEAREST))
    s = HumanNeRFSequence(fake, split="all")
    with pytest.raises(FmgsInputError) as exc:
        s[0]
    assert str(mpath) in str(exc.value) and "size" in str(exc.value)


def test_error_corrupt_images(fake):
    ipath = fake / "images" / "frame_000000.png"
    ipath.write_bytes(b"\x89PNG garbage")
    with pytest.raises(FmgsInputError) as exc:
        HumanNeRFSequence(fake, split="all").load()
    assert str(ipath) in str(exc.value)


@pytest.mark.parametrize("content", [b"", b"\x80\x04\x95garbage", b"not a pickle at all"])
def test_error_corrupt_cameras(fake, content):
    (fake / "cameras.pkl").write_bytes(content)
    with pytest.raises(FmgsInputError) as exc:
        HumanNeRFSequence(fake, split="all")
    assert str(fake / "cameras.pkl") in str(exc.value)


def test_error_truncated_cameras(fake):
    p = fake / "cameras.pkl"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(FmgsInputError) as exc:
        HumanNeRFSequence(fake, split="all")
    assert str(p) in str(exc.value)


@pytest.mark.parametrize("edit,words", [
    (lambda e: e.pop("intrinsics"), "intrinsics"),
    (lambda e: e.__setitem__("extrinsics", np.eye(3)), "extrinsics"),
    (lambda e: e.__setitem__("distortions", np.zeros(4)), "distortions"),
    (lambda e: e.__setitem__("extrinsics", 2 * np.eye(4)), "extrinsics"),
])
def test_error_bad_camera_entry(fake, edit, words):
    p = fake / "cameras.pkl"
    cams = load_pickle(p)
    edit(cams["frame_000001"])
    with open(p, "wb") as fh:
        pickle.dump(cams, fh)
    with pytest.raises(FmgsInputError) as exc:
        HumanNeRFSequence(fake, split="all")
    msg = str(exc.value)
    assert str(p) in msg and words in msg and "frame_000001" in msg


def test_smpl_params_are_the_mesh_infos_entries_without_decoding_an_image(zju377, smpl_path):
    s = HumanNeRFSequence(zju377, frames=[0, 8], smpl_path=smpl_path)
    raw = load_pickle(zju377 / "mesh_infos.pkl")["frame_000008"]
    p = s.smpl_params("frame_000008")
    assert s._images is None                 # nothing decoded
    for k in ("poses", "Rh", "Th", "joints"):
        assert np.allclose(p[k], np.asarray(raw[k]).reshape(p[k].shape), atol=1e-6), k
    p["poses"][:] = 9.0                      # a copy: the sequence is unchanged
    assert np.array_equal(s[1].poses, np.asarray(raw["poses"], np.float32).reshape(72))
    with pytest.raises(KeyError):
        s.smpl_params("frame_999999")


def test_validation_split_is_carved_from_the_end_of_the_training_range():
    """val_fraction 0.1 of [0, 455): frames 409-454 leave training, every 5th validates."""
    sc = SplitConfig.from_any({"val_fraction": 0.1})
    assert sc.indices("train", 570) == list(range(0, 409))
    assert sc.indices("val", 570) == list(range(409, 455, 5))
    assert sc.indices("test", 570) == list(range(455, 570, 5))
    assert not set(sc.indices("train", 570)) & set(sc.indices("val", 570))
    plain = SplitConfig.from_any(None)
    assert plain.indices("train", 570) == list(range(455)) and plain.indices("val", 570) == []
    with pytest.raises(FmgsInputError):
        SplitConfig.from_any({"val_fraction": 1.0})


def test_error_intrinsics_of_another_image_size(fake):
    """A calibration made for a 4x larger image (principal point beyond this one): refused by
    the camera of that frame, naming the file and the frame."""
    p = fake / "cameras.pkl"
    cams = load_pickle(p)
    cams["frame_000001"]["intrinsics"] = np.asarray(cams["frame_000001"]["intrinsics"], np.float64) * [[4], [4], [1]]
    with open(p, "wb") as fh:
        pickle.dump(cams, fh)
    seq = HumanNeRFSequence(fake, split="all")
    with pytest.raises(FmgsInputError) as exc:
        seq.camera("frame_000001")
    assert str(p) in str(exc.value) and "principal point" in str(exc.value) and "frame_000001" in str(exc.value)


def test_error_frame_missing_from_mesh_infos(fake):
    p = fake / "mesh_infos.pkl"
    infos = load_pickle(p)
    del infos["frame_000002"]
    with open(p, "wb") as fh:
        pickle.dump(infos, fh)
    with pytest.raises(FmgsInputError) as exc:
        HumanNeRFSequence(fake, split="all")
    assert str(p) in str(exc.value) and "frame_000002" in str(exc.value)


def test_error_bad_options(fake):
    with pytest.raises(FmgsInputError):
        HumanNeRFSequence(fake, background=(2, 0, 0))
    with pytest.raises(FmgsInputError):
        HumanNeRFSequence(fake, image_size=-5)
    with pytest.raises(FmgsInputError):
        HumanNeRFSequence(fake, frames=[7])
    with pytest.raises(FmgsInputError):
        HumanNeRFSequence(fake, frames=["frame_000009"])
