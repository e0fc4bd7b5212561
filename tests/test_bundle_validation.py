"""Hand-edited manifests, garbage surfels and swapped ONNX models are rejected at load with an
FmgsInputError naming the file and the field (docs/reliability.md)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fmgs import bundle as fb
from fmgs.errors import FmgsInputError

sys.path.insert(0, str(Path(__file__).parent))
from test_bundle import _body_model, _random_surfels, _resign, _write_full  # noqa: E402


def _edit(bdir: Path, fn) -> Path:
    mp = bdir / fb.MANIFEST_NAME
    man = json.loads(mp.read_text())
    fn(man)
    mp.write_text(json.dumps(man))
    return mp


def _set(path, value):
    def fn(man):
        d = man
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return fn


def _drop(path):
    def fn(man):
        d = man
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return fn


CASES = [
    ("bytes_is_a_string", _set(["files", "surfels.safetensors", "bytes"]," 123"),
     r"files\['surfels.safetensors'\].bytes: expected a non-negative integer, got str"),
    ("bytes_is_a_bool", _set(["files", "surfels.safetensors", "bytes"], True), r"\.bytes: expected a non-negative"),
    ("files_entry_not_a_dict", _set(["files", "color.onnx"], "abc"), r"files\['color.onnx'\]: expected an object"),
    ("sha256_not_hex", _set(["files", "color.onnx", "sha256"], 12), r"files\['color.onnx'\].sha256: expected 64"),
    ("unknown_kind", _set(["kind"], "mesh"), r"kind: unknown value 'mesh'"),
    ("unknown_view_dir_enum", _set(["models", "color", "view_dir_canonicalization"], "sideways"),
     r"view_dir_canonicalization: unknown value 'sideways'"),
    ("unknown_channel_dtype", _set(["channels", "centers", "dtype"], "float16"), r"channels\['centers'\].dtype"),
    ("channel_shape_junk", _set(["channels", "centers", "shape"], "S,3"), r"channels\['centers'\].shape"),
    ("num_joints_string", _set(["body_model", "num_joints"], "24"), r"body_model.num_joints must be an integer"),
    ("parents_ragged", _set(["body_model", "rest_joints"], [[0, 1]] * 23 + [[1]]), r"body_model.rest_joints"),
    ("models_not_a_dict", _set(["models"], ["color"]), r"'models': expected an object"),
    ("model_file_not_str", _set(["models", "color", "file"], 3), r"models\['color'\].file: expected a file name"),
    ("pipeline_not_list", _set(["pipeline"], "color"), r"'pipeline': expected a list"),
    ("palette_ragged", _set(["semantic", "palette"], [[1, 2]]), r"semantic.palette"),
    ("file_outside", lambda m: m["files"].__setitem__("../x", m["files"]["color.onnx"]), r"outside the bundle"),
    ("schema_version_true", _set(["schema_version"], True), r"schema version True is not supported"),
    ("missing_files", _drop(["files"]), r"lacks the 'files' entry"),
    ("missing_body_model_key", _drop(["body_model", "parents"]), r"body_model lacks 'parents'"),
    ("missing_num_surfels", _drop(["num_surfels"]), r"lacks the 'num_surfels' entry"),
]


@pytest.mark.parametrize("name,edit,msg", CASES, ids=[c[0] for c in CASES])
def test_hand_edited_manifest_is_rejected_naming_the_field(tmp_path, name, edit, msg):
    b = _write_full(tmp_path, np.random.default_rng(0))
    mp = _edit(b, edit)
    with pytest.raises(FmgsInputError, match=msg) as ei:
        fb.read_bundle(b)
    assert ei.value.path == str(mp)


def _tamper_surfels(bdir: Path, **changes) -> None:
    p = bdir / fb.SURFELS_NAME
    arrays = load_file(str(p))
    for k, fn in changes.items():
        arrays[k] = np.ascontiguousarray(fn(arrays[k]).astype(np.float32))
    save_file(arrays, str(p))
    _resign(bdir, fb.SURFELS_NAME)


@pytest.mark.parametrize("field,fn,msg", [
    ("rotations", lambda r: r * 1.5, "not a stack of rotation matrices"),
    ("rotations", lambda r: np.random.default_rng(1).normal(size=r.shape), "not a stack of rotation matrices"),
    ("rotations", lambda r: r * np.array([1, 1, -1.0]), r"det R - 1"),                 # reflection
    ("scales", lambda s: np.where(np.arange(len(s))[:, None] == 5, -s, s), "zero or negative scale"),
    ("scales", lambda s: s * 0, "zero or negative scale"),
    ("centers", lambda c: np.where(np.arange(len(c))[:, None] == 2, np.inf, c), "non-finite"),
], ids=["scaled_rotations", "garbage_rotations", "reflections", "negative_scale", "zero_scales", "inf_center"])
def test_garbage_surfels_are_rejected_naming_the_tensor(tmp_path, field, fn, msg):
    b = _write_full(tmp_path, np.random.default_rng(2))
    _tamper_surfels(b, **{field: fn})
    with pytest.raises(FmgsInputError, match=msg) as ei:
        fb.read_bundle(b)
    assert ei.value.path == str(b / fb.SURFELS_NAME) and field in str(ei.value)


# =========================================================================== swapped ONNX models
def _color_onnx(path: Path, in_name="appearance_features", F=8, out_name="colors") -> None:
    """colors = sigmoid(appearance_features @ W + view_dirs @ V), S dynamic."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    W = numpy_helper.from_array(rng.normal(size=(F, 3)).astype(np.float32), "W")
    V = numpy_helper.from_array(rng.normal(size=(3, 3)).astype(np.float32), "V")
    nodes = [helper.make_node("MatMul", [in_name, "W"], ["a"]), helper.make_node("MatMul", ["view_dirs", "V"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Sigmoid", ["c"], [out_name])]
    g = helper.make_graph(nodes, "color", [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["S", F]),
                                           helper.make_tensor_value_info("view_dirs", TensorProto.FLOAT, ["S", 3])],
                          [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["S", 3])], [W, V])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))


def _foundation_bundle(tmp_path: Path, **onnx_kw) -> Path:
    rng = np.random.default_rng(3)
    surf = _random_surfels(rng, kind="preview", S=64)
    surf["opacities"] = np.full(64, 0.9)
    surf["appearance_features"] = rng.normal(size=(64, 8))
    _color_onnx(tmp_path / "color.onnx", **onnx_kw)
    io_ = {"inputs": [{"name": "appearance_features", "shape": ["S", 8]}, {"name": "view_dirs", "shape": ["S", 3]}],
           "outputs": [{"name": "colors", "shape": ["S", 3]}]}
    models = {"color": {"file": "color.onnx", "view_dir_canonicalization": "transpose", **io_}}
    return fb.write_bundle(tmp_path / "b", surf, kind="foundation", body_model=_body_model(rng), models=models,
                           files={"color.onnx": tmp_path / "color.onnx"})


def test_matching_onnx_model_loads_and_runs(tmp_path):
    from fmgs.runtime.pipeline import AvatarPipeline

    p = AvatarPipeline(_foundation_bundle(tmp_path), array_backend="numpy", providers="cpu", threads=1)
    out = p.posed_surfels(np.zeros(72), np.eye(4), np.array([0.0, 0.0, 3.0]))
    assert out["colors"].shape == (64, 3) and np.isfinite(out["colors"]).all()


@pytest.mark.parametrize("kw,msg", [
    ({"in_name": "geometry_features"}, r"model input 'geometry_features' is not one the runtime provides"),
    ({"F": 5}, r"model input 'appearance_features' has shape \[None, 5\].*provides \[64, 8\]"),
    ({"out_name": "rgb"}, r"differ from the manifest|no output 'colors'"),
], ids=["other_model", "other_width", "other_output"])
def test_swapped_onnx_model_is_rejected_at_load(tmp_path, kw, msg):
    """A color.onnx from another export (manifest re-signed so only the model differs)."""
    from fmgs.runtime.pipeline import AvatarPipeline

    b = _foundation_bundle(tmp_path)
    _color_onnx(tmp_path / "swapped.onnx", **kw)
    (b / "color.onnx").write_bytes((tmp_path / "swapped.onnx").read_bytes())
    _resign(b, "color.onnx")
    with pytest.raises(FmgsInputError, match=msg) as ei:
        AvatarPipeline(b, array_backend="numpy", providers="cpu", threads=1)
    assert ei.value.path == str(b / "color.onnx")


def test_resign_helper_is_consistent(tmp_path):
    """The tamper helper really re-signs (so the tests above reach the value checks)."""
    b = _write_full(tmp_path, np.random.default_rng(4))
    _tamper_surfels(b, colors=lambda c: c * 0.5)
    man = json.loads((b / fb.MANIFEST_NAME).read_text())
    assert man["files"][fb.SURFELS_NAME]["sha256"] == hashlib.sha256((b / fb.SURFELS_NAME).read_bytes()).hexdigest()
    fb.read_bundle(b)
