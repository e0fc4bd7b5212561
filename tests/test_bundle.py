"""fmgs.bundle: the torch-free bundle writer/reader (docs/bundle.md).

Round trip, then every way a bundle can be broken on disk -- corrupted byte, truncated
safetensors, wrong schema version, missing file, missing manifest (interrupted export),
wrong shape / dtype -- must be rejected with an FmgsInputError naming the offending file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fmgs import bundle as fb
from fmgs.errors import FmgsInputError

S = 257


def _random_surfels(rng, kind="full", S=S):
    w = rng.random((S, 24)) ** 4
    w /= w.sum(1, keepdims=True)
    q, _ = np.linalg.qr(rng.normal(size=(S, 3, 3)))
    q *= np.sign(np.linalg.det(q))[:, None, None]
    out = {"centers": rng.normal(size=(S, 3)), "rotations": q, "scales": rng.random((S, 2)) * 0.01 + 1e-3,
           "opacities": rng.random(S), "skin_weights": w, "colors": rng.random((S, 3))}
    if kind == "full":
        out.update(geometry_features=rng.normal(size=(S, 32)), appearance_features=rng.normal(size=(S, 32)),
                   semantic_logits=rng.normal(size=(S, 28)))
    return out


def _body_model(rng):
    parents = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21]
    G = np.tile(np.eye(4), (24, 1, 1))
    G[:, :3, 3] = rng.normal(size=(24, 3)) * 0.1
    return fb.make_body_model(parents, rng.normal(size=(24, 3)), rng.normal(size=(24, 3)), G, rng.normal(size=10),
                              canonical_pose=rng.normal(size=(24, 3)) * 0.1)


def _write_full(tmp_path: Path, rng, name="b", surfels=None) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    files = {}
    for m in ("pose_encoder", "geometry", "color"):
        p = src / f"{m}.onnx"
        p.write_bytes(rng.bytes(1000 + len(m)))  # the reader never parses ONNX; opaque bytes suffice
        files[p.name] = p
    models = {m: {"file": f"{m}.onnx", "inputs": [], "outputs": []} for m in ("pose_encoder", "geometry", "color")}
    surfels = _random_surfels(rng) if surfels is None else surfels
    return fb.write_bundle(tmp_path / name, surfels, kind="full", body_model=_body_model(rng),
                           models=models, files=files, producer={"run_dir": "x", "iteration": 3})


def _resign(bdir: Path, name: str) -> None:
    """Rewrite the manifest's size/sha256 of ``name`` to match the file (a 'consistent' tamper)."""
    mp = bdir / fb.MANIFEST_NAME
    man = json.loads(mp.read_text())
    data = (bdir / name).read_bytes()
    man["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    mp.write_text(json.dumps(man))


def test_round_trip_full_bundle(tmp_path):
    rng = np.random.default_rng(0)
    surf = _random_surfels(rng)
    b = fb.read_bundle(_write_full(tmp_path, rng, surfels=surf))
    assert b.kind == "full" and b.num_surfels == S and b.pipeline == ["pose_encoder", "geometry", "color"]
    for k, v in surf.items():
        assert b.surfels[k].dtype == np.float32
        np.testing.assert_array_equal(b.surfels[k], v.astype(np.float32))
    assert set(b.models) == {"pose_encoder", "geometry", "color"} and all(p.is_file() for p in b.models.values())
    man = b.manifest
    assert man["schema"] == "fmgs-bundle" and man["schema_version"] == fb.SCHEMA_VERSION
    assert man["channels"]["geometry_features"]["shape"] == ["S", 32]
    assert len(man["semantic"]["classes"]) == 28 and np.asarray(man["semantic"]["palette"]).shape == (28, 3)
    # checksums are real sha256 of the files on disk
    for name, meta in man["files"].items():
        assert meta["sha256"] == hashlib.sha256((b.path / name).read_bytes()).hexdigest()
    bm = b.body_model_arrays()
    assert bm["parents"][0] == -1 and bm["canonical_bone_transforms"].shape == (24, 4, 4)
    # no temporary folders left beside the bundle
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # ordinary permissions (not mkdtemp's 0700 / safetensors' 0600)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(b.path.stat().st_mode) == 0o777 & ~mask
    assert {stat.S_IMODE(p.stat().st_mode) for p in b.path.iterdir()} == {0o666 & ~mask}


def test_preview_bundle_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    surf = _random_surfels(rng, kind="preview")
    out = fb.write_bundle(tmp_path / "p", surf, kind="preview", body_model=_body_model(rng))
    b = fb.read_bundle(out)
    assert b.kind == "preview" and b.models == {} and b.pipeline == []
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "surfels.safetensors"]
    np.testing.assert_array_equal(b.surfels["colors"], surf["colors"].astype(np.float32))


def test_corrupted_byte_is_rejected_naming_the_file(tmp_path):
    bdir = _write_full(tmp_path, np.random.default_rng(2))
    p = bdir / "surfels.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(FmgsInputError, match="checksum mismatch") as ei:
        fb.read_bundle(bdir)
    assert ei.value.path == str(p)
    # the same for a model file
    bdir2 = _write_full(tmp_path, np.random.default_rng(2), name="b2")
    g = bdir2 / "geometry.onnx"
    g.write_bytes(g.read_bytes()[:-1] + b"\x00" if g.read_bytes()[-1:] != b"\x00" else g.read_bytes()[:-1] + b"\x01")
    with pytest.raises(FmgsInputError, match="checksum") as ei:
        fb.read_bundle(bdir2)
    assert str(g) in str(ei.value)


def test_truncated_safetensors_is_rejected(tmp_path):
    bdir = _write_full(tmp_path, np.random.default_rng(3))
    p = bdir / "surfels.safetensors"
    full = p.read_bytes()
    p.write_bytes(full[: len(full) - 100])
    with pytest.raises(FmgsInputError, match="truncated") as ei:
        fb.read_bundle(bdir)
    assert ei.value.path == str(p)
    # even with a manifest that agrees with the short file, the safetensors parser rejects it
    _resign(bdir, "surfels.safetensors")
    with pytest.raises(FmgsInputError, match="safetensors") as ei:
        fb.read_bundle(bdir)
    assert ei.value.path == str(p)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_schema_version_is_rejected(tmp_path, version):
    bdir = _write_full(tmp_path, np.random.default_rng(4))
    mp = bdir / "manifest.json"
    man = json.loads(mp.read_text())
    man["schema_version"] = version
    mp.write_text(json.dumps(man))
    with pytest.raises(FmgsInputError, match="schema version") as ei:
        fb.read_bundle(bdir)
    assert ei.value.path == str(mp)


def test_missing_files_are_rejected(tmp_path):
    bdir = _write_full(tmp_path, np.random.default_rng(5))
    (bdir / "color.onnx").unlink()
    with pytest.raises(FmgsInputError, match="missing") as ei:
        fb.read_bundle(bdir)
    assert ei.value.path == str(bdir / "color.onnx")
    (bdir / "manifest.json").unlink()
    with pytest.raises(FmgsInputError, match="manifest.json is missing") as ei:
        fb.read_bundle(bdir)
    assert ei.value.path == str(bdir / "manifest.json")
    with pytest.raises(FmgsInputError, match="not found"):
        fb.read_bundle(tmp_path / "nowhere")


def test_wrong_shape_and_dtype_are_rejected(tmp_path):
    rng = np.random.default_rng(6)
    bdir = _write_full(tmp_path, rng)
    p = bdir / "surfels.safetensors"
    arrays = load_file(str(p))
    bad = dict(arrays, centers=arrays["centers"][:, :2].copy())
    save_file(bad, str(p))
    _resign(bdir, "surfels.safetensors")
    with pytest.raises(FmgsInputError, match="'centers' has shape") as ei:
        fb.read_bundle(bdir)
    assert ei.value.path == str(p)
    bad = dict(arrays, scales=arrays["scales"].astype(np.float64))
    save_file(bad, str(p))
    _resign(bdir, "surfels.safetensors")
    with pytest.raises(FmgsInputError, match="float64"):
        fb.read_bundle(bdir)
    bad = {k: v for k, v in arrays.items() if k != "appearance_features"}
    save_file(bad, str(p))
    _resign(bdir, "surfels.safetensors")
    with pytest.raises(FmgsInputError, match="appearance_features"):
        fb.read_bundle(bdir)
    w = arrays["skin_weights"].copy()
    w[0] *= 2
    save_file(dict(arrays, skin_weights=w), str(p))
    _resign(bdir, "surfels.safetensors")
    with pytest.raises(FmgsInputError, match="sum to 1"):
        fb.read_bundle(bdir)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    """An exception (e.g. Ctrl-C) while files are copied leaves no bundle and no temp folder."""
    rng = np.random.default_rng(7)
    calls = {"n": 0}
    real_copy = shutil.copyfile

    def flaky(src, dst, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(fb.shutil, "copyfile", flaky)
    with pytest.raises(KeyboardInterrupt):
        _write_full(tmp_path, rng)
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "src"] == []


def test_existing_folder_and_overwrite(tmp_path):
    rng = np.random.default_rng(8)
    bdir = _write_full(tmp_path, rng)
    with pytest.raises(FmgsInputError, match="already exists"):
        _write_full(tmp_path, rng)
    surf = _random_surfels(rng, kind="preview")
    fb.write_bundle(bdir, surf, kind="preview", body_model=_body_model(rng), overwrite=True)
    b = fb.read_bundle(bdir)
    assert b.kind == "preview" and not (bdir / "color.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "src"]


def test_writer_rejects_bad_input(tmp_path):
    rng = np.random.default_rng(9)
    bm = _body_model(rng)
    surf = _random_surfels(rng, kind="preview")
    with pytest.raises(FmgsInputError, match="need surfel channels"):
        fb.write_bundle(tmp_path / "x", {k: v for k, v in surf.items() if k != "colors"}, kind="preview",
                        body_model=bm)
    with pytest.raises(FmgsInputError, match="shape"):
        fb.write_bundle(tmp_path / "x", dict(surf, scales=surf["scales"][:, :1]), kind="preview", body_model=bm)
    with pytest.raises(FmgsInputError, match="non-finite"):
        c = surf["centers"].copy()
        c[3, 1] = np.nan
        fb.write_bundle(tmp_path / "x", dict(surf, centers=c), kind="preview", body_model=bm)
    with pytest.raises(FmgsInputError, match="kind"):
        fb.write_bundle(tmp_path / "x", surf, kind="mesh", body_model=bm)
    with pytest.raises(FmgsInputError, match="not among the bundle's files"):
        fb.write_bundle(tmp_path / "x", _random_surfels(rng), kind="full", body_model=bm,
                        models={"color": {"file": "color.onnx", "inputs": [], "outputs": []}})
    assert not (tmp_path / "x").exists()
