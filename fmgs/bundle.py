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

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fmgs.atomic import check_replaceable, clean_stale, default_mode, publish_folder, staging_prefix
from fmgs.errors import FmgsInputError

__all__ = [
    "SCHEMA", "SCHEMA_VERSION", "MANIFEST_NAME", "SURFELS_NAME", "KINDS", "CHANNELS",
    "REQUIRED_CHANNELS", "CONVENTIONS", "MODEL_NAMES", "PLANAR", "GRAPH_LAYOUTS", "Bundle", "make_body_model", "write_bundle",
    "read_bundle", "sha256_file", "bundle_ownership", "check_bundle_replaceable",
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
#: ``manifest["models"][name]["layout"]`` of graphs whose per-surfel tensors are planar ``(C, S)``
#: under ``<name>_planar`` names (docs/bundle.md); entries without the key are row-major ``(S, C)``.
PLANAR = "planar"
#: Graph layouts ``fmgs-export --layout`` writes: planar (default) or the row-major graphs of
#: bundles before it.
GRAPH_LAYOUTS = (PLANAR, "rows")

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
#: Real manifests are a few hundred kB; anything far larger is not one (and is not parsed).
_MAX_MANIFEST_BYTES = 64 << 20
#: Tolerances of the surfel-frame check at load: |R^T R - I| and |det R - 1| (float32 frames
#: re-orthonormalised by the exporter are within ~1e-6).
_ROT_TOL = 1e-3


# =========================================================================== helpers
def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (streamed in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_SHA_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num_array(v: Any, field: str, where: Path, shape: tuple | None = None, ndim: int | None = None) -> np.ndarray:
    """``v`` as a finite float64 array of the given shape / rank, else FmgsInputError naming ``field``."""
    try:
        a = np.asarray(v, np.float64)
    except (TypeError, ValueError, OverflowError):
        raise FmgsInputError(f"manifest {field}: expected numbers, got {type(v).__name__}", where) from None
    if (shape is not None and a.shape != shape) or (ndim is not None and a.ndim != ndim):
        want = shape if shape is not None else f"{ndim}-D"
        raise FmgsInputError(f"manifest {field}: expected shape {want}, got {a.shape}", where)
    if not np.isfinite(a).all():
        raise FmgsInputError(f"manifest {field}: non-finite values", where)
    return a


def _check_body_model(bm: Any, where: Path) -> None:
    if not isinstance(bm, dict):
        raise FmgsInputError("manifest 'body_model' must be an object", where)
    for k in ("num_joints", "parents", "rest_joints", "canonical_joints", "canonical_bone_transforms"):
        if k not in bm:
            raise FmgsInputError(f"manifest body_model lacks {k!r}", where)
    J = bm["num_joints"]
    if not _is_int(J) or not 1 <= J <= 1000:
        raise FmgsInputError(f"manifest body_model.num_joints must be an integer in 1..1000, got {J!r}", where)
    if not isinstance(bm.get("type", "smpl"), str):
        raise FmgsInputError("manifest body_model.type must be a string", where)
    par = bm["parents"]
    if not isinstance(par, list) or len(par) != J or not all(_is_int(p) for p in par):
        raise FmgsInputError(f"manifest body_model.parents: expected a list of {J} integers", where)
    if par[0] != -1 or any(not (0 <= p < b) for b, p in enumerate(par) if b > 0):
        raise FmgsInputError("manifest body_model.parents: root must be -1 and parents precede children", where)
    for k, shape in (("rest_joints", (J, 3)), ("canonical_joints", (J, 3)), ("canonical_bone_transforms", (J, 4, 4)),
                     ("canonical_pose", (J, 3))):
        if k in bm:
            _num_array(bm[k], f"body_model.{k}", where, shape=shape)
    if "betas" in bm:
        _num_array(bm["betas"], "body_model.betas", where, ndim=1)


def _check_fields(manifest: dict, mpath: Path) -> None:
    """Types of every manifest entry the readers use (hand-edited manifests)."""
    def need(cond: bool, field: str, want: str, got: Any) -> None:
        if not cond:
            raise FmgsInputError(f"manifest {field}: expected {want}, got {type(got).__name__} {_short(got)}", mpath)

    files = manifest["files"]
    need(isinstance(files, dict), "'files'", "an object {name: {sha256, bytes}}", files)
    for name, meta in files.items():
        need(isinstance(meta, dict), f"files[{name!r}]", "an object {sha256, bytes}", meta)
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name or "\0" in name:
            raise FmgsInputError(f"manifest lists a file outside the bundle: {name!r}", mpath)
        b, h = meta.get("bytes"), meta.get("sha256")
        need(_is_int(b) and b >= 0, f"files[{name!r}].bytes", "a non-negative integer", b)
        need(isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h),
             f"files[{name!r}].sha256", "64 lower-case hex digits", h)
    chans = manifest["channels"]
    need(isinstance(chans, dict), "'channels'", "an object", chans)
    for name, c in chans.items():
        need(isinstance(c, dict), f"channels[{name!r}]", "an object", c)
        if name not in CHANNELS:
            raise FmgsInputError(f"manifest channels: unknown channel {name!r} (known: {sorted(CHANNELS)})", mpath)
        shp = c.get("shape")
        need(isinstance(shp, list) and all(d == "S" or (_is_int(d) and d >= 0) for d in shp),
             f"channels[{name!r}].shape", "a list of integers and \"S\"", shp)
        if c.get("dtype", "float32") != "float32":
            raise FmgsInputError(f"manifest channels[{name!r}].dtype: unknown value {c.get('dtype')!r} "
                                 "(known: 'float32')", mpath)
    models = manifest["models"]
    need(isinstance(models, dict), "'models'", "an object", models)
    for name, e in models.items():
        where = f"models[{name!r}]"
        need(isinstance(e, dict), where, "an object", e)
        need(isinstance(e.get("file"), str), f"{where}.file", "a file name", e.get("file"))
        need(e.get("fp16_file") is None or isinstance(e["fp16_file"], str), f"{where}.fp16_file",
             "a file name or null", e.get("fp16_file"))
        eng = e.get("engines")
        need(eng is None or (isinstance(eng, dict) and all(isinstance(v, str) for v in eng.values())),
             f"{where}.engines", "an object {precision: file name}", eng)
        for key in ("inputs", "outputs"):
            io_ = e.get(key, [])
            need(isinstance(io_, list) and all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                               and isinstance(i.get("shape", []), list) for i in io_),
                 f"{where}.{key}", "a list of {name, shape}", io_)
        vd = e.get("view_dir_canonicalization")
        if vd not in (None, "inverse", "transpose"):
            raise FmgsInputError(f"manifest {where}.view_dir_canonicalization: unknown value {vd!r} "
                                 "(known: 'inverse', 'transpose', null)", mpath)
        need(isinstance(e.get("optional", False), bool), f"{where}.optional", "true or false", e.get("optional"))
    pipe = manifest.get("pipeline", [])
    need(isinstance(pipe, list) and all(isinstance(n, str) for n in pipe), "'pipeline'", "a list of model names",
         pipe)
    sem = manifest.get("semantic")
    if sem is not None:
        need(isinstance(sem, dict), "'semantic'", "an object or null", sem)
        cls = sem.get("classes") or []
        need(isinstance(cls, list) and all(isinstance(c, str) for c in cls), "semantic.classes",
             "a list of class names", cls)
        if sem.get("palette") is not None:
            pal = _num_array(sem["palette"], "semantic.palette", mpath, ndim=2)
            if pal.shape[1] != 3 or pal.min() < 0 or pal.max() > 255:
                raise FmgsInputError(f"manifest semantic.palette: expected (C, 3) values in 0..255, got shape "
                                     f"{pal.shape}", mpath)
    for key in ("producer", "conventions"):
        if key in manifest:
            need(isinstance(manifest[key], dict), f"'{key}'", "an object", manifest[key])


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _shape_spec(name: str, arr: np.ndarray, num_joints: int) -> list:
    spec = list(CHANNELS[name]["shape"])
    if name in ("skin_weights", "prior_skin_weights"):
        spec[1] = num_joints
    return [d if d is not None else int(arr.shape[i]) for i, d in enumerate(spec)]


def _matches(arr_shape: tuple, spec: list, S: int) -> bool:
    if len(arr_shape) != len(spec):
        return False
    return all(a == (S if d == "S" else d) for a, d in zip(arr_shape, spec))


# =========================================================================== replace rule
def bundle_ownership(path: str | os.PathLike) -> str | None:
    """Whether ``path`` is a bundle folder this project wrote, and may therefore be replaced.

    Ours means: ``manifest.json`` parses with ``schema`` :data:`SCHEMA`, and every entry of
    the folder is ``manifest.json`` or a plain file (no sub-folder, no symlink) listed in
    its ``files``. A folder holding anything else -- a run, user files, other bundles --
    is not ours, whatever its manifest says. Checksums are not verified: a damaged bundle
    of ours may be replaced.

    Returns:
        None when it is ours, else the reason it is not (one phrase).
    """
    path = Path(path)
    mpath = path / MANIFEST_NAME
    if not mpath.is_file() or mpath.is_symlink():
        return "it has no manifest.json of an fmgs bundle"
    try:
        man = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return "its manifest.json is not valid JSON"
    if not isinstance(man, dict) or man.get("schema") != SCHEMA or not isinstance(man.get("files"), dict):
        return "its manifest.json is not an fmgs bundle manifest"
    listed = set(man["files"]) | {MANIFEST_NAME}
    try:
        entries = list(os.scandir(path))
    except OSError as exc:
        return f"it cannot be listed ({exc.strerror})"
    for e in entries:
        if e.name not in listed:
            return f"it holds {e.name!r}, which its manifest does not list"
        if not e.is_file(follow_symlinks=False):
            return f"its entry {e.name!r} is not a plain file"
    return None


def check_bundle_replaceable(out_dir: str | os.PathLike, protect=()) -> None:
    """Raise unless ``out_dir`` is missing or a bundle of ours that holds no ``protect`` path.

    The replace rule of ``fmgs-export --overwrite`` and of every bundle writer
    (:func:`fmgs.atomic.check_replaceable` with :func:`bundle_ownership`).

    Raises:
        FmgsInputError: names ``out_dir`` and why it may not be replaced.
    """
    check_replaceable(out_dir, bundle_ownership, protect=protect, what="bundle folder")


# =========================================================================== writer
def write_bundle(out_dir: str | os.PathLike, surfels: Mapping[str, np.ndarray], *, kind: str,
                 body_model: dict, models: Mapping[str, dict] | None = None,
                 files: Mapping[str, str | os.PathLike] | None = None, producer: dict | None = None,
                 pipeline: list[str] | None = None, semantic: dict | None = None,
                 extra: dict | None = None, overwrite: bool = False, protect=()) -> Path:
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
            new one is in place) -- only when it is a bundle of ours
            (:func:`check_bundle_replaceable`). False: an existing ``out_dir`` is an error.
        protect: paths the replace must never remove (e.g. the run folder being exported).

    Returns:
        ``Path(out_dir)``.

    Raises:
        FmgsInputError: unknown kind/channel/model, missing required channel, bad shapes,
            non-finite values, a missing source file, ``out_dir`` exists without
            ``overwrite``, or ``out_dir`` is not a bundle of ours / holds a ``protect`` path.

    Stale staging folders of earlier interrupted writes of ``out_dir`` (``kill -9``) are
    removed first (:func:`fmgs.atomic.clean_stale`).
    """
    from safetensors.numpy import save_file

    from fmgs import __version__

    out_dir = Path(out_dir)
    if kind not in KINDS:
        raise FmgsInputError(f"bundle kind must be one of {KINDS}, got {kind!r}")
    if os.path.lexists(out_dir) and not overwrite:
        raise FmgsInputError("bundle folder already exists (pass overwrite=True / --overwrite to replace it)",
                             out_dir)
    check_bundle_replaceable(out_dir, protect)
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
    clean_stale(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(out_dir, "tmp"), dir=out_dir.parent))
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
        for p in tmp.iterdir():
            os.chmod(p, default_mode())
        os.chmod(tmp, default_mode(is_dir=True))
        # again right before the swap: the folder may have changed during a long export
        publish_folder(tmp, out_dir, recheck=lambda: check_bundle_replaceable(out_dir, protect))
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
    _check_inside(path, mpath)
    if mpath.stat().st_size > _MAX_MANIFEST_BYTES:
        raise FmgsInputError(f"manifest is larger than {_MAX_MANIFEST_BYTES >> 20} MiB: not a bundle manifest", mpath)
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FmgsInputError(f"manifest is not valid JSON ({exc})", mpath) from exc
    except RecursionError:
        raise FmgsInputError("manifest is not a bundle manifest (JSON nested too deeply)", mpath) from None
    if not isinstance(manifest, dict):
        raise FmgsInputError("manifest must be a JSON object", mpath)
    if manifest.get("schema") != SCHEMA:
        raise FmgsInputError(f"not an fmgs bundle manifest (schema {manifest.get('schema')!r}, "
                             f"expected {SCHEMA!r})", mpath)
    ver = manifest.get("schema_version")
    if not _is_int(ver) or ver != SCHEMA_VERSION:
        raise FmgsInputError(f"bundle schema version {ver!r} is not supported (this reader reads version "
                             f"{SCHEMA_VERSION}); re-export the avatar with this fmgs-export", mpath)
    for key in ("kind", "num_surfels", "body_model", "channels", "files", "models"):
        if key not in manifest:
            raise FmgsInputError(f"manifest lacks the {key!r} entry", mpath)
    if not isinstance(manifest["kind"], str) or manifest["kind"] not in KINDS:
        raise FmgsInputError(f"manifest kind: unknown value {_short(manifest['kind'])} (known: {KINDS})", mpath)
    if not _is_int(manifest["num_surfels"]) or manifest["num_surfels"] <= 0:
        raise FmgsInputError(f"manifest num_surfels must be a positive integer, got "
                             f"{_short(manifest['num_surfels'])}", mpath)
    _check_body_model(manifest["body_model"], mpath)
    _check_fields(manifest, mpath)
    return manifest


def _check_inside(bundle_dir: Path, p: Path) -> None:
    """Refuse a symlink (or a symlinked file) that resolves outside the bundle folder."""
    real, root = p.resolve(), bundle_dir.resolve()
    if root not in real.parents:
        raise FmgsInputError(f"is a symbolic link out of the bundle (to {real}); bundles must hold their "
                             "own files", p)


def _check_files(path: Path, manifest: dict, verify_checksums: bool) -> None:
    mpath = path / MANIFEST_NAME
    files = manifest["files"]
    if not isinstance(files, dict) or SURFELS_NAME not in files:
        raise FmgsInputError(f"manifest 'files' must list {SURFELS_NAME}", mpath)
    for name, meta in files.items():
        p = path / name
        if not p.is_file():
            raise FmgsInputError("listed in manifest.json but missing from the bundle", p)
        _check_inside(path, p)
        size = p.stat().st_size
        want = meta["bytes"]
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
    R = arrays["rotations"].astype(np.float64)
    ortho = np.abs(np.einsum("sji,sjk->sik", R, R) - np.eye(3)).max(initial=0.0)
    det = np.abs(np.linalg.det(R) - 1.0).max(initial=0.0) if R.size else 0.0
    if ortho > _ROT_TOL or det > _ROT_TOL:
        raise FmgsInputError(f"tensor 'rotations' is not a stack of rotation matrices (max |R^T R - I| "
                             f"{ortho:.2e}, max |det R - 1| {det:.2e}, tolerance {_ROT_TOL:g})", spath)
    sc = arrays["scales"]
    if sc.size and sc.min() <= 0:
        bad = int((sc <= 0).any(1).sum())
        raise FmgsInputError(f"tensor 'scales' has {bad} surfels with a zero or negative scale "
                             f"(min {sc.min():.3g}); scales are standard deviations in metres", spath)
    return arrays


def read_bundle(path: str | os.PathLike, verify_checksums: bool = True) -> Bundle:
    """Open and validate a bundle.

    Checks, in order: the folder and ``manifest.json`` exist and parse; ``schema`` is
    :data:`SCHEMA` and ``schema_version`` is :data:`SCHEMA_VERSION`; kind, surfel count and
    body model are well-formed; every manifest entry the readers use has its type (file
    sizes are integers, ``files`` entries objects, enum values known: ``kind``, channel
    ``dtype``, ``view_dir_canonicalization``); every file in ``manifest["files"]`` exists
    inside the folder (a symlink that leaves the bundle is refused) with the recorded size
    and (``verify_checksums``) sha256; ``surfels.safetensors`` parses, has the kind's
    required tensors, each float32, finite, with the manifest's shape; opacities lie in
    [0, 1], skinning rows sum to 1, rotations are rotation matrices (``|R^T R - I|`` and
    ``|det R - 1|`` within 1e-3) and scales are positive; every model/engine file a model
    entry names is a listed file.

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
