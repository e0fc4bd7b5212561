"""Property-based (hypothesis) fuzzing of the readers of user files (docs/reliability.md).

Every reader must give either a valid result or :class:`fmgs.errors.FmgsInputError` --
never another exception (a traceback for the user) -- and must not touch any file:

* the bundle manifest reader: valid manifests with one value replaced / deleted / added
  anywhere in the JSON tree, and random JSON documents;
* the bundle folder: random byte flips, truncation, growth, deletion of any file, with and
  without re-signing the manifest (so the safetensors parser and the value checks see
  corrupt content too); surviving bundles also go through the runtime's pipeline setup;
* the restricted pickle reader (+ ``to_numpy_tree``): random bytes and mutated valid
  pickles (numpy arrays, scipy sparse matrices, chumpy-like objects, protocols 0-5).

Example counts are fixed (``max_examples``) so the suite's time stays bounded in CI; the
numbers and timings are in docs/reliability.md.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fmgs import bundle as fb  # noqa: E402
from fmgs.errors import FmgsInputError  # noqa: E402
from fmgs.pickle_io import load_pickle, to_numpy_tree  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_bundle import _body_model, _random_surfels  # noqa: E402

S = 16


def fuzz(n: int) -> settings:
    """``n`` examples, reproducible (derandomized), no deadline, no example database."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                          max_leaves=12)


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = "dir" if p.is_dir() and not p.is_symlink() else \
                hashlib.sha256(p.read_bytes() if p.is_file() else os.readlink(p).encode()).hexdigest()
    return out


@pytest.fixture(scope="module")
def base_bundles(tmp_path_factory):
    """A small full bundle (opaque ONNX bytes) and a preview bundle, written by write_bundle."""
    root = tmp_path_factory.mktemp("fuzz_base")
    rng = np.random.default_rng(0)
    src = root / "src"
    src.mkdir()
    files, models = {}, {}
    for m in ("pose_encoder", "geometry", "color"):
        (src / f"{m}.onnx").write_bytes(rng.bytes(200))
        files[f"{m}.onnx"] = src / f"{m}.onnx"
        models[m] = {"file": f"{m}.onnx", "inputs": [{"name": "x", "shape": ["S", 3]}], "outputs": []}
    models["color"]["view_dir_canonicalization"] = "inverse"
    full = fb.write_bundle(root / "full", _random_surfels(rng, "full", S=S), kind="full",
                           body_model=_body_model(rng), models=models, files=files)
    surf = _random_surfels(rng, "preview", S=S)
    surf["opacities"] = np.full(S, 0.9)
    prev = fb.write_bundle(root / "preview", surf, kind="preview", body_model=_body_model(rng))
    return {"full": full, "preview": prev}


def _check_valid(b: fb.Bundle) -> None:
    """What a returned bundle guarantees (the reader's contract)."""
    n = b.num_surfels
    for name, a in b.surfels.items():
        assert a.dtype == np.float32 and a.shape[0] == n and np.isfinite(a).all(), name
    assert b.kind in fb.KINDS


def _read(path: Path, verify: bool = True, pipeline: bool = False) -> None:
    try:
        b = fb.read_bundle(path, verify_checksums=verify)
    except FmgsInputError as exc:
        assert str(exc)                                      # a message, naming something
        return
    _check_valid(b)
    if pipeline and b.kind == "preview":
        from fmgs.runtime.pipeline import AvatarPipeline

        try:
            AvatarPipeline(b, array_backend="numpy", blas_threads=None)
        except FmgsInputError:
            pass


# =========================================================================== manifest
def _paths(obj, prefix=()):
    """Every path (tuple of keys / indices) of a JSON tree, the root included."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):                     # long numeric lists: the first items suffice
            yield from _paths(v, prefix + (i,))


def _mutate(man: dict, path: tuple, op: str, value, key: str) -> dict:
    man = copy.deepcopy(man)
    if not path:
        return value if op == "replace" else man
    parent = man
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif isinstance(parent[last], dict):
        parent[last][key] = value
    elif isinstance(parent[last], list):
        parent[last].append(value)
    else:
        parent[last] = [parent[last], value]
    return man


@pytest.mark.parametrize("kind", ["full", "preview"])
def test_fuzz_mutated_manifests(base_bundles, kind):
    base = base_bundles[kind]
    man0 = json.loads((base / fb.MANIFEST_NAME).read_text())
    paths = list(_paths(man0))

    @fuzz(150)
    @given(idx=st.integers(0, len(paths) - 1), op=st.sampled_from(["replace", "delete", "add"]),
           value=json_value, key=st.text(max_size=6))
    def run(idx, op, value, key):
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            b = shutil.copytree(base, root / "b")
            man = _mutate(man0, paths[idx], op, value, key)
            (b / fb.MANIFEST_NAME).write_text(json.dumps(man))
            before = _snapshot(root)
            _read(b, pipeline=True)
            assert _snapshot(root) == before

    run()


@fuzz(150)
@given(doc=json_value, raw=st.binary(max_size=64), as_json=st.booleans())
def test_fuzz_random_manifests(base_bundles, doc, raw, as_json):
    with tempfile.TemporaryDirectory() as d:
        b = shutil.copytree(base_bundles["preview"], Path(d) / "b")
        if as_json and isinstance(doc, dict):
            doc = {"schema": fb.SCHEMA, "schema_version": fb.SCHEMA_VERSION, **doc}
        (b / fb.MANIFEST_NAME).write_bytes(json.dumps(doc).encode() if as_json else raw)
        before = _snapshot(Path(d))
        _read(b)
        assert _snapshot(Path(d)) == before


# =========================================================================== bundle folder
@fuzz(120)
@given(kind=st.sampled_from(["full", "preview"]), target=st.integers(0, 10),
       op=st.sampled_from(["flip", "truncate", "grow", "delete", "dir", "link_out"]),
       pos=st.integers(0, 10**6), byte=st.integers(0, 255), n=st.integers(1, 64), resign=st.booleans())
def test_fuzz_corrupted_bundle_folders(base_bundles, kind, target, op, pos, byte, n, resign):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        b = shutil.copytree(base_bundles[kind], root / "b")
        (root / "outside.bin").write_bytes(b"outside")
        names = sorted(p.name for p in b.iterdir())
        name = names[target % len(names)]
        p = b / name
        data = p.read_bytes()
        if op == "flip" and data:
            i = pos % len(data)
            data = data[:i] + bytes([data[i] ^ (byte or 1)]) + data[i + 1:]
            p.write_bytes(data)
        elif op == "truncate":
            p.write_bytes(data[: pos % (len(data) + 1)])
        elif op == "grow":
            p.write_bytes(data + bytes([byte]) * n)
        elif op == "delete":
            p.unlink()
        elif op == "dir":
            p.unlink()
            p.mkdir()
        else:
            (root / "outside.bin").write_bytes(data)
            p.unlink()
            p.symlink_to(root / "outside.bin")
        if resign and name != fb.MANIFEST_NAME and p.is_file():
            mp = b / fb.MANIFEST_NAME
            man = json.loads(mp.read_text())
            if name in man["files"]:
                raw = p.read_bytes()
                man["files"][name] = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
                mp.write_text(json.dumps(man))
        before = _snapshot(root)
        _read(b, verify=not resign)
        _read(b, verify=True)
        assert _snapshot(root) == before


# =========================================================================== pickles
def _valid_pickles() -> list[bytes]:
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    obj = {"v_template": rng.normal(size=(5, 3)), "f": np.arange(6, dtype=np.uint32).reshape(2, 3),
           "J_regressor": sp.csc_matrix(rng.random((3, 5)) * (rng.random((3, 5)) > 0.5)),
           "weights": sp.coo_matrix(np.eye(3)), "kintree_table": [[-1, 0], [1, 2]], "name": "smpl", "b": b"\x00\x01",
           "nested": {"a": (1, 2.5, None), "c": [np.float32(3.0), complex(1, 2)]}}
    return [pickle.dumps(obj, protocol=p) for p in range(6)]


_VALID = _valid_pickles()


def _load(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.pkl"
        p.write_bytes(data)
        try:
            to_numpy_tree(load_pickle(p), densify_sparse=True, path=p)
        except FmgsInputError as exc:
            assert str(exc).startswith(str(p))
        assert os.listdir(d) == ["x.pkl"] and p.read_bytes() == data


@fuzz(400)
@given(data=st.binary(max_size=256))
def test_fuzz_pickle_random_bytes(data):
    _load(data)


@pytest.mark.filterwarnings("ignore:dtype\\(\\)")   # numpy deprecation noise from mutated dtype args
@fuzz(400)
@given(which=st.integers(0, len(_VALID) - 1),
       edits=st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]), st.integers(0, 10**6),
                                st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_pickle_mutated(which, edits):
    data = bytearray(_VALID[which])
    for op, pos, byte in edits:
        i = pos % max(len(data), 1)
        if op == "flip" and data:
            data[i] ^= byte or 1
        elif op == "insert":
            data.insert(i, byte)
        elif op == "delete" and data:
            del data[i]
        elif op == "truncate":
            del data[i:]
    _load(bytes(data))


def test_valid_pickles_load_to_arrays():
    """The fuzz seeds themselves load (so mutations start from accepted files)."""
    for data in _VALID:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "x.pkl"
            p.write_bytes(data)
            tree = to_numpy_tree(load_pickle(p), densify_sparse=True, path=p)
            assert tree["J_regressor"].shape == (3, 5) and tree["nested"]["c"][1] == complex(1, 2)
