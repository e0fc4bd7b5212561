"""The engine bundle: schema, atomic writer and validating reader (torch-free).

A bundle is the contract between ``fmgs-export`` (torch, :mod:`fmgs.export`) and the
torch-free runtime (:mod:`fmgs.runtime`). Its layout is specified in ``docs/bundle.md``
(schema version :data:`SCHEMA_VERSION`); in short::

    BUNDLE_DIR/
      manifest.json          schema, producer, body model, conventions, channels,
                             models, pipeline, files + sha256   (written LAST)
      surfels.safetensors    per-surfel float32 constants (:data:`CHANNELS`)
      *.onnx                 pose/view-dependent models (kinds "full" and "foundation")
      *.plan                 optional TensorRT engines
      export_report.json     export checks (not needed by the runtime)
      avatar.ply             canonical avatar in the 3DGS layout (not needed by the runtime)

Kinds (``manifest["kind"]``):

* ``"full"``: the full model (``model.kind=full``): ``pose_encoder``, ``geometry``,
  ``color`` ONNX models (+ optional ``skinning``); baked hash-grid features.
* ``"foundation"``: the foundation model (``model.kind=foundation``): static geometry
  baked into the surfels, only a view-dependent ``color`` ONNX model.
* ``"preview"``: no models at all; per-surfel ``colors`` are the final colours.

Writing (:func:`write_bundle`) happens in a temporary sibling folder
(``.tmp-<name>-XXXX``) that is renamed into place only when every file and the manifest
(with the sha256 of every other file) are on disk, so an interrupted export never leaves
a folder at the target path that looks complete. Reading (:func:`read_bundle`) checks the
schema name and version, every listed file's presence, size (truncation) and sha256,
the safetensors header, and every tensor's dtype and shape; any failure raises
:class:`fmgs.errors.FmgsInputError` naming the offending file.

NumPy + safetensors only: this module must never import torch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fmgs.errors import FmgsInputError

__all__ = [
    "SCHEMA", "SCHEMA_VERSION", "MANIFEST_NAME", "SURFELS_NAME", "KINDS", "CHANNELS",
    "REQUIRED_CHANNELS", "CONVENTIONS", "MODEL_NAMES", "Bundle", "make_body_model", "write_bundle",
    "read_bundle", "sha256_file",
]

#: ``manifest["schema"]``.
SCHEMA = "fmgs-bundle"
#: ``manifest["schema_version"]``; readers reject any other value.
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SURFELS_NAME = "surfels.safetensors"
#: Bundle kinds (see module docstring).
KINDS = ("full", "foundation", "preview")
#: ONNX model names a bundle may list (``manifest["models"]`` keys), in pipeline order.
MODEL_NAMES = ("pose_encoder", "geometry", "color", "skinning")

#: Per-surfel tensors of ``surfels.safetensors``. ``shape`` uses ``"S"`` for the surfel
#: count; ``None`` marks a width that the manifest declares (feature sizes).
CHANNELS: dict[str, dict[str, Any]] = {
    "centers": {"shape": ["S", 3], "units": "m",
                "meaning": "canonical centres mu (canonical body frame); foundation bundles: the static "
                           "normal displacement already applied"},
    "rotations": {"shape": ["S", 3, 3], "units": "1",
                  "meaning": "canonical surfel frames, columns [t_u, t_v, n], orthonormal, det +1"},
    "scales": {"shape": ["S", 2], "units": "m",
               "meaning": "canonical scales (s_u, s_v) (std-devs) before the pose-dependent residual; "
                          "foundation bundles: final scales"},
    "opacities": {"shape": ["S"], "units": "1", "meaning": "opacity in (0, 1), sigmoid already applied"},
    "skin_weights": {"shape": ["S", 24], "units": "1",
                     "meaning": "baked LBS weights W at the canonical centres (rows sum to 1)"},
    "colors": {"shape": ["S", 3], "units": "1",
               "meaning": "linear RGB in [0, 1] for a neutral view (-n, head-on) in the canonical pose; "
                          "preview bundles: THE colour; full/foundation bundles: fallback / .ply"},
    "geometry_features": {"shape": ["S", None], "units": "1",
                          "meaning": "per-surfel input 'geometry_features' of geometry.onnx: the folded first layer "
                                     "W_1[:, :F] f_g (pre-activation, no bias) when models.geometry.folded_first_layer, "
                                     "else f_g, the geometry hash-grid features at the canonical centres (eq. 3)"},
    "appearance_features": {"shape": ["S", None], "units": "1",
                            "meaning": "per-surfel input 'appearance_features' of color.onnx: the folded first layer "
                                       "W_1[:, :F] f_c (pre-activation, no bias) when models.color.folded_first_layer, "
                                       "else f_c, the appearance hash-grid features at the canonical centres (eq. 7)"},
    "prior_skin_weights": {"shape": ["S", 24], "units": "1",
                           "meaning": "SMPL skinning weights carried to the surfels: the prior_weights input of "
                                      "skinning.onnx (only with that model)"},
    "semantic_logits": {"shape": ["S", 28], "units": "1",
                        "meaning": "semantic logits F_s(f_s) (eq. 8, pose-independent), Sapiens 28 classes"},
}

#: Channels each kind must have (others in :data:`CHANNELS` are optional).
REQUIRED_CHANNELS: dict[str, tuple[str, ...]] = {
    "preview": ("centers", "rotations", "scales", "opacities", "skin_weights", "colors"),
    "foundation": ("centers", "rotations", "scales", "opacities", "skin_weights", "colors",
                   "appearance_features"),
    "full": ("centers", "rotations", "scales", "opacities", "skin_weights", "colors",
             "geometry_features", "appearance_features"),
}

#: ``manifest["conventions"]``.
CONVENTIONS: dict[str, str] = {
    "units": "metres, radians; colours linear RGB in [0, 1]",
    "canonical_frame": ("canonical SMPL body frame of the subject (y up, z forward, x to the subject's left), "
                        "posed in the canonical (star) pose of body_model.canonical_pose"),
    "world_frame": "world = rodrigues(Rh) @ x_body + Th (ZJU-MoCap / HumanNeRF)",
    "bone_transforms": ("B_b = world_from_body @ G_pose_b @ inv(G_c_b), G_pose = "
                        "fmgs.body_model.forward_kinematics(rodrigues(poses), rest_joints, parents)[0], "
                        "G_c = body_model.canonical_bone_transforms (3DGS-Avatar convention)"),
    "lbs": ("T_s = sum_b W_sb B_b; mu_o = T mu'; R_o = T[:3,:3] R' re-orthonormalised: t_u <- M t_u, "
            "t_v <- M t_v, n = normalize(t_u x t_v), t_u = normalize(t_u), t_v = n x t_u "
            "(fmgs.trainer.models.fields.blend_lbs, eq. 10-12)"),
    "cameras": "world-to-camera extrinsics, OpenCV axes (x right, y down, z forward), K in pixels",
    "pixel_centres": "pixel (i, j) has its centre at (j + 0.5, i + 0.5)",
    "surfel_frames": "rotation columns [t_u, t_v, n]; scales (s_u, s_v) are Gaussian std-devs in metres",
    "view_dirs": "unit camera -> surfel directions, canonicalised per the model entry's view_dir_canonicalization",
}

_SHA_CHUNK = 1 << 20


# =========================================================================== helpers
def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (streamed in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_SHA_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_body_model(parents, rest_joints, canonical_joints, canonical_bone_transforms, betas,
                    canonical_pose=None, model_type: str = "smpl") -> dict:
    """The manifest's ``body_model`` entry (JSON-ready lists).

    Args:
        parents: ``(J,)`` int parent of each joint, ``-1`` for the root (SMPL: J = 24).
        rest_joints: ``(J, 3)`` shaped rest-pose (T-pose) joints, metres, body frame: the
            input of :func:`fmgs.body_model.forward_kinematics`.
        canonical_joints: ``(J, 3)`` joints of the canonical (star) pose, metres (the pose
            encoder's canonical joints, before normalisation).
        canonical_bone_transforms: ``(J, 4, 4)`` ``G_c``, relative bone transforms rest ->
            canonical (``CanonicalSurfels.bone_transforms``).
        betas: ``(B,)`` shape coefficients of the subject.
        canonical_pose: optional ``(J, 3)`` axis-angle (radians) of the canonical pose.
        model_type: ``"smpl"``.

    Returns:
        dict with ``type, num_joints, parents, rest_joints, canonical_joints,
        canonical_bone_transforms, betas[, canonical_pose]``.

    Raises:
        FmgsInputError: inconsistent shapes.
    """
    parents = np.asarray(parents, np.int64).reshape(-1)
    J = parents.shape[0]
    arrays = {"rest_joints": (rest_joints, (J, 3)), "canonical_joints": (canonical_joints, (J, 3)),
              "canonical_bone_transforms": (canonical_bone_transforms, (J, 4, 4))}
    if canonical_pose is not None:
        arrays["canonical_pose"] = (canonical_pose, (J, 3))
    out: dict[str, Any] = {"type": model_type, "num_joints": int(J), "parents": [int(p) for p in parents]}
    for k, (v, shape) in arrays.items():
        a = np.asarray(v, np.float64)
        if a.shape != shape:
            raise FmgsInputError(f"body_model.{k} must have shape {shape}, got {a.shape}")
        out[k] = a.tolist()
    out["betas"] = np.asarray(betas, np.float64).reshape(-1).tolist()
    return out


def _check_body_model(bm: Any, where: Path) -> None:
    if not isinstance(bm, dict):
        raise FmgsInputError("manifest 'body_model' must be an object", where)
    try:
        J = int(bm["num_joints"])
        shapes = {"parents": (J,), "rest_joints": (J, 3), "canonical_joints": (J, 3),
                  "canonical_bone_transforms": (J, 4, 4)}
        for k, shape in shapes.items():
            a = np.asarray(bm[k], np.float64)
            if a.shape != shape or not np.isfinite(a).all():
                raise FmgsInputError(f"manifest body_model.{k}: expected finite {shape}, got {a.shape}", where)
        par = np.asarray(bm["parents"], np.int64)
        if par[0] != -1 or any(not (0 <= p < b) for b, p in enumerate(par) if b > 0):
            raise FmgsInputError("manifest body_model.parents: root must be -1 and parents precede children",
                                 where)
    except KeyError as exc:
        raise FmgsInputError(f"manifest body_model lacks {exc.args[0]!r}", where) from None


def _shape_spec(name: str, arr: np.ndarray, num_joints: int) -> list:
    spec = list(CHANNELS[name]["shape"])
    if name in ("skin_weights", "prior_skin_weights"):
        spec[1] = num_joints
    return [d if d is not None else int(arr.shape[i]) for i, d in enumerate(spec)]


def _matches(arr_shape: tuple, spec: list, S: int) -> bool:
    if len(arr_shape) != len(spec):
        return False
    return all(a == (S if d == "S" else d) for a, d in zip(arr_shape, spec))


# =========================================================================== writer
def write_bundle(out_dir: str | os.PathLike, surfels: Mapping[str, np.ndarray], *, kind: str,
                 body_model: dict, models: Mapping[str, dict] | None = None,
                 files: Mapping[str, str | os.PathLike] | None = None, producer: dict | None = None,
                 pipeline: list[str] | None = None, semantic: dict | None = None,
                 extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write a bundle atomically (temporary sibling folder, manifest last, then rename).

    Args:
        out_dir: the bundle folder to create. Its parent is created if missing.
        surfels: per-surfel arrays by channel name (:data:`CHANNELS`), leading axis ``S``.
            Cast to C-contiguous float32. Must contain :data:`REQUIRED_CHANNELS` ``[kind]``.
        kind: ``"full"``, ``"foundation"`` or ``"preview"``.
        body_model: :func:`make_body_model` output.
        models: ``{name: entry}`` for the ONNX models (names from :data:`MODEL_NAMES`); each
            entry has at least ``"file"`` (a key of ``files``), ``"inputs"`` and ``"outputs"``
            (lists of ``{"name", "shape", "dtype", ...}``); optional ``"fp16_file"`` and
            ``"engine"``/``"engines"`` naming further files. Preview bundles: none.
        files: ``{name in bundle: source path}``: further files copied into the bundle
            (ONNX models, engines, ``export_report.json``, ``avatar.ply``). Names are plain
            file names (no folders).
        producer: merged into ``manifest["producer"]`` (``run_dir``, ``iteration``, ...).
        pipeline: the order in which the runtime runs the models (default: the
            :data:`MODEL_NAMES` order of the listed non-optional models).
        semantic: ``{"classes": [...], "palette": [[r, g, b], ...]}``; default: the Sapiens
            28-class list and palette of :mod:`fmgs.priors` when ``semantic_logits`` exists.
        extra: further top-level manifest keys (must not clash with the standard ones).
        overwrite: replace an existing ``out_dir`` (the old folder is removed only after the
            new one is in place). False: an existing ``out_dir`` is an error.

    Returns:
        ``Path(out_dir)``.

    Raises:
        FmgsInputError: unknown kind/channel/model, missing required channel, bad shapes,
            non-finite values, a missing source file, or ``out_dir`` exists without
            ``overwrite``.
    """
    from safetensors.numpy import save_file

    from fmgs import __version__

    out_dir = Path(out_dir)
    if kind not in KINDS:
        raise FmgsInputError(f"bundle kind must be one of {KINDS}, got {kind!r}")
    if out_dir.exists() and not overwrite:
        raise FmgsInputError("bundle folder already exists (pass overwrite=True / --overwrite to replace it)",
                             out_dir)
    models = dict(models or {})
    files = {str(k): Path(v) for k, v in (files or {}).items()}
    if kind == "preview" and models:
        raise FmgsInputError("preview bundles carry no models")
    num_joints = int(body_model.get("num_joints", 24))

    arrays: dict[str, np.ndarray] = {}
    S = None
    for name, val in surfels.items():
        if name not in CHANNELS:
            raise FmgsInputError(f"unknown surfel channel {name!r} (known: {sorted(CHANNELS)})")
        a = np.ascontiguousarray(np.asarray(val, dtype=np.float32))
        S = a.shape[0] if S is None else S
        spec = _shape_spec(name, a, num_joints)
        if not _matches(a.shape, spec, S):
            raise FmgsInputError(f"surfel channel {name!r}: shape {a.shape} does not match {spec} with S={S}")
        if not np.isfinite(a).all():
            raise FmgsInputError(f"surfel channel {name!r} has non-finite values")
        arrays[name] = a
    missing = [c for c in REQUIRED_CHANNELS[kind] if c not in arrays]
    if missing:
        raise FmgsInputError(f"{kind} bundles need surfel channels {missing}")

    for name, entry in models.items():
        if name not in MODEL_NAMES:
            raise FmgsInputError(f"unknown model {name!r} (known: {MODEL_NAMES})")
        for key in ("file", "fp16_file"):
            if entry.get(key) is not None and entry[key] not in files:
                raise FmgsInputError(f"model {name!r}: {key} {entry[key]!r} is not among the bundle's files")
        for eng in (entry.get("engines") or {}).values():
            if eng not in files:
                raise FmgsInputError(f"model {name!r}: engine {eng!r} is not among the bundle's files")
    for name, src in files.items():
        if "/" in name or "\\" in name or name in (MANIFEST_NAME, SURFELS_NAME):
            raise FmgsInputError(f"bad bundle file name {name!r}")
        if not src.is_file():
            raise FmgsInputError("file to put into the bundle does not exist", src)
    if pipeline is None:
        pipeline = [m for m in MODEL_NAMES if m in models and not models[m].get("optional", False)]
    if semantic is None and "semantic_logits" in arrays:
        from fmgs.priors import SAPIENS_CLASSES, SAPIENS_PALETTE

        semantic = {"classes": list(SAPIENS_CLASSES), "palette": np.asarray(SAPIENS_PALETTE).astype(int).tolist()}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        save_file(arrays, str(tmp / SURFELS_NAME), metadata={"schema": SCHEMA, "schema_version": str(SCHEMA_VERSION)})
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
        listing = {}
        for name in [SURFELS_NAME, *files]:
            p = tmp / name
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
            listing[name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        manifest: dict[str, Any] = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "kind": kind,
            "producer": {"name": "fmgs-avatar", "version": __version__, **(producer or {})},
            "num_surfels": int(S),
            "body_model": body_model,
            "conventions": dict(CONVENTIONS),
            "channels": {n: {"shape": _shape_spec(n, a, num_joints), "dtype": "float32",
                             "units": CHANNELS[n]["units"], "meaning": CHANNELS[n]["meaning"]}
                         for n, a in arrays.items()},
            "semantic": semantic,
            "models": models,
            "pipeline": list(pipeline),
            "files": listing,
        }
        for k, v in (extra or {}).items():
            if k in manifest:
                raise FmgsInputError(f"extra manifest key {k!r} clashes with a standard key")
            manifest[k] = v
        mpath = tmp / MANIFEST_NAME
        with open(mpath, "w") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        # mkdtemp makes the folder 0700 (and safetensors writes 0600): give the bundle the
        # ordinary permissions of a new folder / file under the current umask
        mask = os.umask(0)
        os.umask(mask)
        for p in tmp.iterdir():
            os.chmod(p, 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        _fsync_dir(tmp)
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{out_dir.name}-", dir=out_dir.parent))
            os.rename(out_dir, old / "b")
        os.rename(tmp, out_dir)
        _fsync_dir(out_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# =========================================================================== reader
@dataclass
class Bundle:
    """A validated bundle in memory.

    Attributes:
        path: the bundle folder.
        manifest: the parsed ``manifest.json`` (see ``docs/bundle.md``).
        surfels: per-surfel float32 arrays by channel name, leading axis ``S``.
        models: ``{name: path}`` of the fp32 ONNX models listed in the manifest.
        models_fp16: ``{name: path}`` of fp16 ONNX variants (``--fp16`` exports), if any.
        engines: ``{name: {precision: path}}`` of TensorRT engines, if any.
    """

    path: Path
    manifest: dict
    surfels: dict[str, np.ndarray]
    models: dict[str, Path] = field(default_factory=dict)
    models_fp16: dict[str, Path] = field(default_factory=dict)
    engines: dict[str, dict[str, Path]] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``"full"``, ``"foundation"`` or ``"preview"``."""
        return str(self.manifest["kind"])

    @property
    def num_surfels(self) -> int:
        """``S``."""
        return int(self.manifest["num_surfels"])

    @property
    def pipeline(self) -> list[str]:
        """Model names in the order the runtime runs them."""
        return list(self.manifest.get("pipeline", []))

    def body_model_arrays(self) -> dict[str, np.ndarray]:
        """The manifest's body model as arrays: ``parents (J,) int64``, ``rest_joints (J,3)``,
        ``canonical_joints (J,3)``, ``canonical_bone_transforms (J,4,4)``, ``betas (B,)``
        (float64, metres) and ``canonical_pose (J,3)`` radians when present."""
        bm = self.manifest["body_model"]
        out = {"parents": np.asarray(bm["parents"], np.int64)}
        for k in ("rest_joints", "canonical_joints", "canonical_bone_transforms", "betas", "canonical_pose"):
            if k in bm:
                out[k] = np.asarray(bm[k], np.float64)
        return out


def _load_manifest(path: Path) -> dict:
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise FmgsInputError("manifest.json is missing: not a complete bundle (an interrupted export "
                             "leaves none; re-run fmgs-export)", mpath)
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FmgsInputError(f"manifest is not valid JSON ({exc})", mpath) from exc
    if not isinstance(manifest, dict):
        raise FmgsInputError("manifest must be a JSON object", mpath)
    if manifest.get("schema") != SCHEMA:
        raise FmgsInputError(f"not an fmgs bundle manifest (schema {manifest.get('schema')!r}, "
                             f"expected {SCHEMA!r})", mpath)
    ver = manifest.get("schema_version")
    if ver != SCHEMA_VERSION:
        raise FmgsInputError(f"bundle schema version {ver!r} is not supported (this reader reads version "
                             f"{SCHEMA_VERSION}); re-export the avatar with this fmgs-export", mpath)
    for key in ("kind", "num_surfels", "body_model", "channels", "files", "models"):
        if key not in manifest:
            raise FmgsInputError(f"manifest lacks the {key!r} entry", mpath)
    if manifest["kind"] not in KINDS:
        raise FmgsInputError(f"unknown bundle kind {manifest['kind']!r} (known: {KINDS})", mpath)
    if not isinstance(manifest["num_surfels"], int) or manifest["num_surfels"] <= 0:
        raise FmgsInputError(f"num_surfels must be a positive integer, got {manifest['num_surfels']!r}", mpath)
    _check_body_model(manifest["body_model"], mpath)
    return manifest


def _check_files(path: Path, manifest: dict, verify_checksums: bool) -> None:
    mpath = path / MANIFEST_NAME
    files = manifest["files"]
    if not isinstance(files, dict) or SURFELS_NAME not in files:
        raise FmgsInputError(f"manifest 'files' must list {SURFELS_NAME}", mpath)
    for name, meta in files.items():
        p = path / name
        if Path(name).name != name:
            raise FmgsInputError(f"manifest lists a file outside the bundle: {name!r}", mpath)
        if not p.is_file():
            raise FmgsInputError("listed in manifest.json but missing from the bundle", p)
        size = p.stat().st_size
        want = int(meta.get("bytes", -1))
        if size != want:
            what = "truncated" if size < want else "larger than recorded"
            raise FmgsInputError(f"{what}: {size} bytes on disk, manifest.json records {want}", p)
        if verify_checksums and sha256_file(p) != meta.get("sha256"):
            raise FmgsInputError("checksum mismatch: the file was modified or corrupted after export "
                                 "(sha256 differs from manifest.json)", p)


def _load_surfels(path: Path, manifest: dict) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    spath = path / SURFELS_NAME
    try:
        arrays = load_file(str(spath))
    except Exception as exc:  # safetensors raises its own error types for bad headers / short files
        raise FmgsInputError(f"not a readable safetensors file ({exc.__class__.__name__}: {exc})", spath) from exc
    S = int(manifest["num_surfels"])
    J = int(manifest["body_model"]["num_joints"])
    kind = manifest["kind"]
    missing = [c for c in REQUIRED_CHANNELS[kind] if c not in arrays]
    if missing:
        raise FmgsInputError(f"{kind} bundle lacks surfel tensors {missing}", spath)
    declared = manifest["channels"]
    for name, a in arrays.items():
        if name not in CHANNELS:
            raise FmgsInputError(f"unknown tensor {name!r}", spath)
        if a.dtype != np.float32:
            raise FmgsInputError(f"tensor {name!r} has dtype {a.dtype}, expected float32", spath)
        spec = declared.get(name, {}).get("shape")
        fixed = _shape_spec(name, a, J)
        if spec is None or not _matches(a.shape, fixed, S) or not _matches(a.shape, list(spec), S):
            raise FmgsInputError(f"tensor {name!r} has shape {a.shape}, expected {spec or fixed} with S={S}", spath)
        if not np.isfinite(a).all():
            raise FmgsInputError(f"tensor {name!r} has non-finite values", spath)
    missing_decl = [n for n in declared if n not in arrays]
    if missing_decl:
        raise FmgsInputError(f"manifest declares channels {missing_decl} that the file lacks", spath)
    op = arrays["opacities"]
    if op.min() < 0 or op.max() > 1:
        raise FmgsInputError("opacities outside [0, 1]", spath)
    rs = arrays["skin_weights"].sum(1)
    if np.abs(rs - 1).max() > 1e-3:
        raise FmgsInputError(f"skin_weights rows do not sum to 1 (max error {np.abs(rs - 1).max():.2e})", spath)
    return arrays


def read_bundle(path: str | os.PathLike, verify_checksums: bool = True) -> Bundle:
    """Open and validate a bundle.

    Checks, in order: the folder and ``manifest.json`` exist and parse; ``schema`` is
    :data:`SCHEMA` and ``schema_version`` is :data:`SCHEMA_VERSION`; kind, surfel count and
    body model are well-formed; every file in ``manifest["files"]`` exists with the recorded
    size and (``verify_checksums``) sha256; ``surfels.safetensors`` parses, has the kind's
    required tensors, each float32, finite, with the manifest's shape; opacities lie in
    [0, 1] and skinning rows sum to 1; every model/engine file a model entry names is a
    listed file.

    Args:
        path: bundle folder.
        verify_checksums: hash every file (about 0.1 s per 30 MB); sizes are always checked.

    Returns:
        :class:`Bundle`.

    Raises:
        FmgsInputError: any failed check; the message names the offending file.
    """
    path = Path(path)
    if not path.is_dir():
        raise FmgsInputError("bundle folder not found", path)
    manifest = _load_manifest(path)
    _check_files(path, manifest, verify_checksums)
    surfels = _load_surfels(path, manifest)
    mpath = path / MANIFEST_NAME
    b = Bundle(path=path, manifest=manifest, surfels=surfels)
    if manifest["kind"] == "preview" and manifest["models"]:
        raise FmgsInputError("preview bundles must list no models", mpath)
    for name, entry in manifest["models"].items():
        if name not in MODEL_NAMES:
            raise FmgsInputError(f"unknown model {name!r} (known: {MODEL_NAMES})", mpath)
        for key, target in (("file", b.models), ("fp16_file", b.models_fp16)):
            fname = entry.get(key)
            if fname is None:
                if key == "file":
                    raise FmgsInputError(f"model {name!r} names no file", mpath)
                continue
            if fname not in manifest["files"]:
                raise FmgsInputError(f"model {name!r} file {fname!r} is not listed in 'files'", mpath)
            target[name] = path / fname
        for prec, fname in (entry.get("engines") or {}).items():
            if fname not in manifest["files"]:
                raise FmgsInputError(f"model {name!r} engine {fname!r} is not listed in 'files'", mpath)
            b.engines.setdefault(name, {})[prec] = path / fname
    for name in manifest.get("pipeline", []):
        if name not in b.models:
            raise FmgsInputError(f"pipeline names model {name!r} that the bundle does not list", mpath)
    return b
