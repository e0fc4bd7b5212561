"""Tests of the restricted, chumpy-free unpickler (fmgs.pickle_io)."""
from __future__ import annotations

import builtins
import os
import pickle
import sys
import types

import numpy as np
import pytest
import scipy.sparse as sp

from fmgs.errors import FmgsInputError
from fmgs.pickle_io import ChumpyStub, load_pickle, to_numpy_tree


# ----------------------------------------------------------------- helpers
def _make_fake_chumpy(monkeypatch: pytest.MonkeyPatch) -> type:
    """Install a minimal ``chumpy.ch.Ch`` look-alike in sys.modules (pickling side only).

    Like chumpy's Ch it pickles through object.__reduce_ex__ with its
    ``__dict__`` (value under 'x', plus bookkeeping) as state.
    """

    class Ch:
        def __init__(self, x):
            self.x = np.asarray(x) if not isinstance(x, Ch) else x
            self._dirty_vars = set()
            self._itr = None
            self._parents = {}

        def __getstate__(self):
            d = dict(self.__dict__)
            d.pop("_parents", None)  # chumpy drops its weak-ref caches
            return d

    Ch.__module__ = "chumpy.ch"
    Ch.__qualname__ = "Ch"
    pkg = types.ModuleType("chumpy")
    sub = types.ModuleType("chumpy.ch")
    sub.Ch = Ch
    pkg.ch = sub
    monkeypatch.setitem(sys.modules, "chumpy", pkg)
    monkeypatch.setitem(sys.modules, "chumpy.ch", sub)
    return Ch


class _SystemCall:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvalCall:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (builtins.eval, (self.code,))


def _assert_same(a, b) -> None:
    """Deep equality of dict/list/array trees (type and dtype included)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


# ----------------------------------------------------------------- chumpy
@pytest.mark.parametrize("protocol", [0, 1, 2, 4, 5])
def test_chumpy_pickle_loads_without_chumpy(tmp_path, monkeypatch, protocol):
    rng = np.random.default_rng(protocol)
    shapedirs = rng.normal(size=(7, 3, 4))
    weights = rng.random((7, 24))
    with monkeypatch.context() as mp:
        Ch = _make_fake_chumpy(mp)
        obj = {
            "shapedirs": Ch(shapedirs),
            "weights": Ch(Ch(weights)),  # nested Ch: value is itself a Ch
            "f": np.arange(6, dtype=np.uint32).reshape(2, 3),
            "bs_type": "lrotmin",
        }
        f = tmp_path / "chumpy.pkl"
        f.write_bytes(pickle.dumps(obj, protocol=protocol))
    # the fake chumpy is gone again: loading must not need it
    assert "chumpy" not in sys.modules and "chumpy.ch" not in sys.modules
    raw = load_pickle(f)
    assert isinstance(raw["shapedirs"], ChumpyStub)
    assert raw["shapedirs"].chumpy_class == "chumpy.ch.Ch"
    out = to_numpy_tree(raw)
    assert isinstance(out["shapedirs"], np.ndarray)
    np.testing.assert_array_equal(out["shapedirs"], shapedirs)
    np.testing.assert_array_equal(out["weights"], weights)
    _assert_same(out["f"], obj["f"])
    assert out["bs_type"] == "lrotmin"


def test_chumpy_stub_without_value_is_reported(tmp_path, monkeypatch):
    with monkeypatch.context() as mp:
        Ch = _make_fake_chumpy(mp)
        c = Ch(np.zeros(2))
        del c.x
        c.a, c.b = np.zeros(2), np.ones(2)  # two candidate arrays, no 'x'
        f = tmp_path / "weird.pkl"
        f.write_bytes(pickle.dumps({"v": c}, protocol=2))
    raw = load_pickle(f)
    with pytest.raises(FmgsInputError) as ei:
        to_numpy_tree(raw, path=f)
    msg = str(ei.value)
    assert str(f) in msg and "chumpy.ch.Ch" in msg and "'x'" in msg


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("fmt", ["csc", "csr", "coo"])
def test_sparse_matrices_round_trip(tmp_path, protocol, fmt):
    dense = np.zeros((24, 50))
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 50, size=(24, 4))
    for j in range(24):
        dense[j, idx[j]] = rng.random(4)
    mat = getattr(sp, f"{fmt}_matrix")(dense)
    f = tmp_path / "sparse.pkl"
    f.write_bytes(pickle.dumps({"J_regressor": mat}, protocol=protocol))
    raw = load_pickle(f)
    assert sp.issparse(raw["J_regressor"]) and raw["J_regressor"].format == fmt
    kept = to_numpy_tree(raw)["J_regressor"]
    assert sp.issparse(kept)
    np.testing.assert_array_equal(kept.toarray(), dense)
    dense_out = to_numpy_tree(raw, densify_sparse=True)["J_regressor"]
    assert isinstance(dense_out, np.ndarray)
    np.testing.assert_array_equal(dense_out, dense)


def test_python2_style_protocol0_pickle(tmp_path):
    # Hand-written Python-2 pickle: __builtin__ / copy_reg names must be mapped.
    data = b"(dp0\nS'name'\np1\nS'caf\\xe9'\np2\nsS'items'\np3\nc__builtin__\nset\np4\n((lp5\nI1\naI2\natp6\nRp7\ns."
    f = tmp_path / "py2.pkl"
    f.write_bytes(data)
    out = load_pickle(f)
    assert out == {"name": "caf\xe9", "items": {1, 2}}


# ----------------------------------------------------------------- malicious
def test_os_system_is_refused_and_not_run(tmp_path):
    target = tmp_path / "pwned.txt"
    f = tmp_path / "evil.pkl"
    f.write_bytes(pickle.dumps(_SystemCall(f"echo pwned > {target}"), protocol=2))
    with pytest.raises(FmgsInputError) as ei:
        load_pickle(f)
    msg = str(ei.value)
    assert str(f) in msg and "forbidden global" in msg
    assert f"{os.system.__module__}.system" in msg  # posix.system / nt.system
    assert not target.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_builtins_eval_is_refused_and_not_run(tmp_path, protocol):
    target = tmp_path / "pwned_eval.txt"
    f = tmp_path / "evil_eval.pkl"
    f.write_bytes(pickle.dumps(_EvalCall(f"open({str(target)!r}, 'w').write('x')"), protocol=protocol))
    with pytest.raises(FmgsInputError) as ei:
        load_pickle(f)
    assert str(f) in str(ei.value) and "builtins.eval" in str(ei.value)
    assert not target.exists()


@pytest.mark.parametrize(
    "payload, name",
    [
        (b"c__builtin__\neval\n(S'1+1'\ntR.", "builtins.eval"),  # Python-2 spelling
        (b"cbuiltins\ngetattr\n(cbuiltins\nobject\nS'__subclasses__'\ntR.", "builtins.getattr"),
        (b"csubprocess\ncheck_output\n((S'true'\nltR.", "subprocess.check_output"),
        (b"cposix\nsystem\n(S'true'\ntR.", "posix.system"),
        (b"cnumpy\nload\n(S'x.npy'\ntR.", "numpy.load"),
    ],
)
def test_other_globals_are_refused(tmp_path, payload, name):
    f = tmp_path / "evil2.pkl"
    f.write_bytes(payload)
    with pytest.raises(FmgsInputError) as ei:
        load_pickle(f)
    assert str(f) in str(ei.value) and name in str(ei.value)


def test_copyreg_reconstructor_only_for_allowed_classes(tmp_path):
    # copy_reg._reconstructor(<chumpy stub>, builtins.dict, state): base must be object
    payload = b"ccopy_reg\n_reconstructor\n(cchumpy.ch\nCh\nc__builtin__\ndict\n(dtR."
    f = tmp_path / "recon.pkl"
    f.write_bytes(payload)
    with pytest.raises(FmgsInputError) as ei:
        load_pickle(f)
    assert str(f) in str(ei.value) and "_reconstructor" in str(ei.value)


# ----------------------------------------------------------------- broken files
def test_truncated_pickle(tmp_path):
    data = pickle.dumps({"a": np.arange(1000.0), "b": [1, 2, 3]}, protocol=2)
    f = tmp_path / "trunc.pkl"
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(FmgsInputError) as ei:
        load_pickle(f)
    assert str(f) in str(ei.value) and "corrupt or truncated pickle" in str(ei.value)


@pytest.mark.parametrize("data", [b"", b"\x80\x02}q\x00", b"not a pickle at all\n"])
def test_garbage_and_empty_files(tmp_path, data):
    f = tmp_path / "bad.pkl"
    f.write_bytes(data)
    with pytest.raises(FmgsInputError) as ei:
        load_pickle(f)
    assert str(f) in str(ei.value) and "corrupt or truncated" in str(ei.value)


def test_missing_file(tmp_path):
    f = tmp_path / "nope" / "missing.pkl"
    with pytest.raises(FmgsInputError) as ei:
        load_pickle(f)
    assert ei.value.path == str(f) and str(f) in str(ei.value) and "not found" in str(ei.value)


# ----------------------------------------------------------------- real data
def test_real_smpl_matches_plain_pickle(smpl_path):
    ours = load_pickle(smpl_path)
    with open(smpl_path, "rb") as fh:
        ref = pickle.load(fh, encoding="latin1")  # trusted shared file
    _assert_same(ours, ref)
    _assert_same(to_numpy_tree(ours), ref)


@pytest.mark.parametrize("name", ["cameras.pkl", "canonical_joints.pkl"])
def test_real_zju_pickles_match_plain_pickle(zju377, name):
    ours = load_pickle(zju377 / name)
    with open(zju377 / name, "rb") as fh:
        ref = pickle.load(fh)  # trusted shared file
    _assert_same(ours, ref)


# =========================================================================== crafted resource bombs
def _crafted(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _smpl_like(**extra) -> dict:
    base = {k: np.zeros((2, 3)) for k in ("v_template", "f", "weights", "kintree_table", "shapedirs", "posedirs")}
    return dict(base, **extra)


@pytest.mark.parametrize("name,data,msg", [
    ("deep.pkl", b"(" * 50000 + b"l" * 50000 + b".", "nested deeper than 100 levels"),
    ("bytearray.pkl", b"\x80\x02c__builtin__\nbytearray\n\x8a\x05\x00\x00\x00\x00\x10\x85R.",
     "bytearray declares 68,719,476,736 bytes"),
    ("ndarray.pkl", b"\x80\x02cnumpy\nndarray\n\x8a\x05\x00\x00\x00\x00\x10\x85\x85R.",
     "numpy.ndarray declares 549,755,813,888 bytes"),
    ("reconstruct.pkl", b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n\x8a\x05\x00\x00\x00\x00"
                        b"\x10\x85C\x01b\x87R.", "numpy array declares"),
])
def test_crafted_pickles_give_input_errors(tmp_path, name, data, msg):
    """Deep nesting and declared-but-absent huge buffers: FmgsInputError, not RecursionError /
    MemoryError (or an out-of-memory kill)."""
    p = _crafted(tmp_path, name, data)
    with pytest.raises(FmgsInputError, match=msg) as ei:
        to_numpy_tree(load_pickle(p), densify_sparse=True, path=p)
    assert ei.value.path == str(p)


def test_self_referencing_and_huge_sparse_smpl_files(tmp_path):
    import scipy.sparse as sp

    from fmgs.body_model import load_smpl

    a: list = []
    a.append(a)
    p = _crafted(tmp_path, "selfref.pkl", pickle.dumps(_smpl_like(J_regressor=a), protocol=2))
    with pytest.raises(FmgsInputError, match="holds itself"):
        load_smpl(p)
    empty = (np.zeros(0), (np.zeros(0, int), np.zeros(0, int)))
    p = _crafted(tmp_path, "sparse.pkl", pickle.dumps(_smpl_like(J_regressor=sp.coo_matrix(empty, shape=(10**6, 10**6))),
                                                      protocol=2))
    with pytest.raises(FmgsInputError, match=r"shape \(1000000, 1000000\) would need 8,000,000,000,000 bytes"):
        load_smpl(p)
    # the same matrix kept sparse is harmless and loads
    assert to_numpy_tree(load_pickle(p), path=p)["J_regressor"].shape == (10**6, 10**6)
