"""Host/device copies of the runtime's array layer (:mod:`fmgs.runtime.xp`) and the
pipeline's table contract they serve: with CuPy arrays, :meth:`AvatarPipeline.frame` works
in its own (device) table and copies the rows it writes into the renderer's (host) table.

The copy code is exercised with NumPy here (no GPU); the CuPy-only lines are the two
``cupy.ndarray.get`` / ``set`` calls, and the last test runs the real CuPy pipeline where
CuPy works.
"""
from __future__ import annotations

import numpy as np
import pytest

from fmgs.runtime.xp import copy_into, cupy_status, is_cupy, same_module, to_numpy


def test_copy_into_numpy_rows_and_views():
    rng = np.random.default_rng(0)
    table = np.zeros((16, 50), np.float32)
    src = rng.normal(size=(11, 50))                         # float64 -> the table's float32
    copy_into(table[0:11], src)
    np.testing.assert_array_equal(table[0:11], src.astype(np.float32))
    assert not table[11:].any()                             # nothing outside the block
    cols = np.zeros((50, 3), np.float32)
    copy_into(cols.T, table[12:15] + 1.0)                   # a non-contiguous destination
    np.testing.assert_array_equal(cols, np.ones((50, 3), np.float32))
    with pytest.raises(ValueError, match="shapes differ"):
        copy_into(table[0:3], src)


def test_array_module_membership_of_numpy_arrays():
    a = np.zeros(3, np.float32)
    assert same_module(a, np) and not is_cupy(a) and to_numpy(a) is a


@pytest.fixture(scope="module")
def bundle(smpl_path, tmp_path_factory):
    pytest.importorskip("torch")
    from runtime_avatar import build_small_avatar, export_small_bundle

    model, surfels = build_small_avatar(smpl_path)
    return export_small_bundle(model, surfels, tmp_path_factory.mktemp("xp") / "bundle")


def _frame(zju377, k=80):
    from fmgs.body_model import world_from_body
    from fmgs.pickle_io import load_pickle

    mi = load_pickle(zju377 / "mesh_infos.pkl")
    fr = mi[sorted(mi)[k]]
    return np.asarray(fr["poses"], np.float64).reshape(24, 3), world_from_body(fr["Rh"], fr["Th"])


def test_written_rows_copied_equal_a_direct_fill(bundle, zju377):
    """What the CuPy path does (fill the pipeline's own table, then copy the rows ``frame``
    writes into a renderer table prepared by ``init_table``) gives exactly the table that a
    direct fill gives: no written row is missed, the opacity row and the padding row are
    left as ``init_table`` made them."""
    from fmgs.runtime.gl_renderer import NUM_ROWS, ROWS
    from fmgs.runtime.pipeline import _WRITTEN_ROWS, AvatarPipeline

    poses, wfb = _frame(zju377)
    cam = np.array([0.3, -0.2, 3.0])
    pipe = AvatarPipeline(bundle, array_backend="numpy", providers="cpu")
    direct = np.full((NUM_ROWS, pipe.S), 7.0, np.float32)       # 7: "never written"
    pipe.init_table(direct)
    pipe.frame(poses, wfb, cam, table=direct)
    copied = np.full((NUM_ROWS, pipe.S), 7.0, np.float32)
    pipe.init_table(copied)
    own = pipe.frame(poses, wfb, cam, table=None)
    assert own is not copied and not np.shares_memory(own, copied)
    for rows in _WRITTEN_ROWS:
        copy_into(copied[rows], own[rows])
    np.testing.assert_array_equal(copied, direct)
    assert (direct[15] == 7.0).all()
    np.testing.assert_array_equal(direct[ROWS["opacity"]], pipe.opacities)


@pytest.mark.skipif(not cupy_status()[0], reason=f"CuPy cannot run here: {cupy_status()[1]}")
def test_cupy_pipeline_fills_a_numpy_table_like_numpy(bundle, zju377):
    from fmgs.runtime.gl_renderer import NUM_ROWS
    from fmgs.runtime.pipeline import AvatarPipeline

    poses, wfb = _frame(zju377)
    cam = np.array([0.3, -0.2, 3.0])
    tabs = {}
    for xp in ("numpy", "cupy"):
        pipe = AvatarPipeline(bundle, array_backend=xp, providers="cpu")
        tabs[xp] = np.zeros((NUM_ROWS, pipe.S), np.float32)
        pipe.init_table(tabs[xp])
        assert pipe.frame(poses, wfb, cam, table=tabs[xp]) is tabs[xp]
    np.testing.assert_allclose(tabs["cupy"], tabs["numpy"], atol=2e-5, rtol=0)
