"""Motion readers on hostile input: a valid Motion or FmgsInputError, never another exception."""
from __future__ import annotations

import io
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fmgs.errors import FmgsInputError
from fmgs.motion import Motion, load_motion

# SMPL-like rest joints (metres; the shape of SMPL's skeleton, not the licensed values): the
# fuzzed skeleton files need a target, and this keeps the tests free of the model file
_REST = np.array([
    [0, 0, 0], [0.06, -0.09, 0], [-0.06, -0.09, 0], [0, 0.11, -0.02], [0.1, -0.47, 0], [-0.1, -0.47, 0],
    [0, 0.25, -0.01], [0.09, -0.87, -0.04], [-0.09, -0.87, -0.04], [0, 0.31, 0.01], [0.12, -0.93, 0.08],
    [-0.12, -0.93, 0.08], [0, 0.52, -0.02], [0.08, 0.43, -0.01], [-0.08, 0.43, -0.01], [0, 0.6, 0.03],
    [0.17, 0.46, -0.02], [-0.17, 0.46, -0.02], [0.43, 0.44, -0.04], [-0.43, 0.44, -0.04],
    [0.68, 0.45, -0.04], [-0.68, 0.45, -0.04], [0.77, 0.44, -0.05], [-0.77, 0.44, -0.05]], dtype=np.float64)


def _load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            m = load_motion(path, rest_joints=_REST)
        except FmgsInputError as exc:
            assert str(path) in str(exc)  # the message names the file
            return None
    assert isinstance(m, Motion)
    assert np.isfinite(m.poses).all() and np.isfinite(m.trans).all() and m.num_frames >= 1
    return m


_SUFFIXES = (".npy", ".npz", ".bvh", ".amc", ".pkl")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2000), suffix=st.sampled_from(_SUFFIXES))
def test_arbitrary_bytes(data, suffix):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"clip{suffix}"
        p.write_bytes(data)
        _load(p)


_BVH_HEAD = ("HIERARCHY\nROOT Hips\n{\nOFFSET 0 0 0\nCHANNELS 6 Xposition Yposition Zposition Zrotation "
             "Yrotation Xrotation\nJOINT LeftUpLeg\n{\nOFFSET 1 -1 0\nCHANNELS 3 Zrotation Yrotation Xrotation\n"
             "End Site\n{\nOFFSET 0 -4 0\n}\n}\n}\nMOTION\n")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tail=st.text(alphabet=st.sampled_from(list("0123456789.-e \n\tnaifFrmsTt:")), max_size=300))
def test_bvh_like_text(tail):
    """Text that passes the HIERARCHY check and wanders through the MOTION section."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "clip.bvh"
        p.write_text(_BVH_HEAD + tail)
        _load(p)


_dtypes = st.sampled_from([np.float64, np.float32, np.float16, np.int32, np.uint8, np.complex128, np.bool_])
_arrays = hnp.arrays(dtype=_dtypes, shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=80),
                     elements=None)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arr=_arrays)
def test_arbitrary_npy_arrays(arr):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "clip.npy"
        np.save(p, arr)
        _load(p)


_keys = st.sampled_from(["poses", "trans", "fps", "mocap_framerate", "betas", "smpl_poses", "smpl_trans",
                         "smpl_scaling", "root_orient", "pose_body", "global_orient", "body_pose", "transl",
                         "surface_model_type", "other"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=st.dictionaries(_keys, _arrays, min_size=1, max_size=4))
def test_arbitrary_npz_archives(d):
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "clip.npz"
        np.savez(p, **d)
        _load(p)


def test_validation_messages(tmp_path):
    """Concrete bad values: each gives a one-line FmgsInputError naming the file and the problem."""
    good = np.zeros((10, 72))

    def npz(name, **kw):
        p = tmp_path / name
        np.savez(p, **kw)
        return p

    cases = [
        (npz("fps_tiny.npz", poses=good, fps=1e-6), "outside the sane range"),
        (npz("fps_huge.npz", poses=good, fps=1e9), "outside the sane range"),
        (npz("fps_nan.npz", poses=good, fps=np.nan), "not a positive number"),
        (npz("complex.npz", poses=good.astype(np.complex128) + 1j), "complex"),
        (npz("trans_complex.npz", poses=good, trans=np.zeros((10, 3), np.complex64)), "complex"),
        (npz("far.npz", poses=good, trans=np.full((10, 3), 1e30), fps=30), "root translation"),
        (npz("angles.npz", poses=np.full((10, 72), 1e20), fps=30), "pose values"),
        (npz("text.npz", poses=np.array(["a", "b"]), fps=30), "not a numeric array"),
    ]
    for p, msg in cases:
        with pytest.raises(FmgsInputError, match=msg) as exc:
            load_motion(p)
        assert str(p) in str(exc.value) and "\n" not in str(exc.value)
    p = npz("ok.npz", poses=good, fps=30)
    for bad in (1e-6, 1e9, float("inf")):
        with pytest.raises(FmgsInputError, match="source_fps"):
            load_motion(p, source_fps=bad)
        with pytest.raises(FmgsInputError, match="display fps"):
            load_motion(p, fps=bad)
    # zlib-compressed members with a corrupted stream: still a clean error
    buf = io.BytesIO()
    np.savez_compressed(buf, poses=np.random.default_rng(0).normal(size=(50, 72)))
    raw = bytearray(buf.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        info = z.infolist()[0]
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 40
    raw[start:start + 20] = b"\x00" * 20
    bad = tmp_path / "zcorrupt.npz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(FmgsInputError):
        load_motion(bad)


_CMU = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "motion" / "cmu_fairmotion"


@pytest.mark.skipif(not (_CMU / "01.asf").is_file(), reason=f"CMU ASF not found in {_CMU}")
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(st.one_of(
    st.sampled_from(["1", "2", ":DEGREES", "root 0 0 0 0 0 0", "root 1 2", "lfemur 10 20 30", "lfemur 1e400 0 0",
                     "ltibia 45", "ltibia nan", "head 1 2 3", "nosuchbone 1", "lfoot 1 2 3", ""]),
    st.text(alphabet=st.sampled_from(list("0123456789.- eE\t:abcdefghijklmnopqrstuvwxyz")), max_size=40)),
    max_size=30))
def test_amc_like_text_with_the_real_cmu_skeleton(lines):
    """AMC motion text next to the real CMU 01.asf: a Motion or FmgsInputError."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "01.asf").write_bytes((_CMU / "01.asf").read_bytes())
        p = Path(d) / "01_99.amc"
        p.write_text("\n".join(lines) + "\n")
        _load(p)
