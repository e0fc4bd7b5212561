"""Test helper (not a test module): a small full FMGS avatar, its bundle and its trainer render.

Builds :class:`fmgs.trainer.models.full.FMGSAvatar` on real canonical SMPL surfels
(``subdivisions=0``: 13,776 surfels), gives every field non-trivial random weights (so the
geometry residual, pose code and view-dependent colour all matter), bakes the pose-independent
parts, exports the three models with ``torch.onnx.export`` and writes a schema-1 bundle with
:func:`fmgs.bundle.write_bundle` -- i.e. what ``fmgs-export`` produces, built here
independently from the trainer's own modules so the runtime is checked against the trainer.
"""
from __future__ import annotations

import io
import contextlib
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fmgs.body_model import load_smpl
from fmgs.bundle import make_body_model, write_bundle
from fmgs.surfels import build_canonical_surfels
from fmgs.trainer.models.fields import apply_geometry_residual, normalize_canonical_joints
from fmgs.trainer.models.full import FMGSAvatar, FullModelConfig


class _PoseEnc(nn.Module):
    def __init__(self, enc, joints):
        super().__init__()
        self.enc = enc
        self.register_buffer("joints", joints)

    def forward(self, rot_mats):
        return self.enc(rot_mats, self.joints)


class _Geo(nn.Module):
    def __init__(self, field):
        super().__init__()
        self.field = field

    def forward(self, geometry_features, pose_code, centers, rotations, scales):
        res = self.field(geometry_features, pose_code)
        c = apply_geometry_residual(centers, rotations, scales, None, res)
        return c.centers, c.rotations, c.scales, res.z_g


class _Col(nn.Module):
    def __init__(self, field):
        super().__init__()
        self.field = field

    def forward(self, appearance_features, z_g, pose_code, view_dirs):
        return self.field(appearance_features, z_g, pose_code, view_dirs)


def _export(mod, args, names_in, names_out, dyn, path):
    axes = {n: {0: "S"} for n in dyn}
    axes.update({n: {0: "S"} for n in names_out if n != "pose_code"})
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(mod, args, str(path), input_names=names_in, output_names=names_out,
                          dynamic_axes=axes, opset_version=18, dynamo=False)


def build_small_avatar(smpl_path: Path, seed: int = 0, subdivisions: int = 0):
    """A randomised full avatar on canonical SMPL surfels (``subdivisions=0``: 13,776;
    1: 55,104); returns (model, surfels)."""
    torch.manual_seed(seed)
    smpl = load_smpl(smpl_path)
    surfels = build_canonical_surfels(smpl, betas=np.linspace(-0.5, 0.5, 10), subdivisions=subdivisions)
    cfg = FullModelConfig(use_pose_correction=False, skinning_subset=1.0, static_offsets=False, max_displacement=0.0)
    model = FMGSAvatar(surfels, cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for grid in model._grids():
            grid.table.copy_(torch.randn(grid.table.shape, generator=g) * 0.5)
        last = model.geometry_field.mlp[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.01)
        last.bias.zero_()
        model.opacity_logit.copy_(torch.randn(model.opacity_logit.shape, generator=g) + 2.0)
    return model, surfels


def export_small_bundle(model: FMGSAvatar, surfels, out_dir: Path) -> Path:
    """Bake + export ``model`` into a schema-1 full bundle at ``out_dir``."""
    out_dir = Path(out_dir)
    stage = out_dir.parent / (out_dir.name + "-stage")
    stage.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        f_g, f_c, f_s = model.canonical_features()
        W = model.skinning_weights(None, training=False)
        logits = model.semantic_field(f_s)
        joints = normalize_canonical_joints(torch.as_tensor(surfels.joints, dtype=torch.float32))
        pe = _PoseEnc(model.pose_encoder, joints)
        rot = torch.eye(3).expand(24, 3, 3).contiguous()
        _export(pe, (rot,), ["rot_mats"], ["pose_code"], [], stage / "pose_encoder.onnx")
        z_p = pe(rot)
        k = 64
        _export(_Geo(model.geometry_field), (f_g[:k], z_p, model.centers[:k], model.frames[:k], model.scales0[:k]),
                ["geometry_features", "pose_code", "centers", "rotations", "scales"],
                ["centers_out", "rotations_out", "scales_out", "z_g"],
                ["geometry_features", "centers", "rotations", "scales"], stage / "geometry.onnx")
        vd = torch.nn.functional.normalize(torch.randn(k, 3), dim=-1)
        _export(_Col(model.appearance_field), (f_c[:k], torch.zeros(k, 16), z_p, vd),
                ["appearance_features", "z_g", "pose_code", "view_dirs"], ["colors"],
                ["appearance_features", "z_g", "view_dirs"], stage / "color.onnx")
        arrays = {
            "centers": model.centers.numpy(), "rotations": model.frames.numpy(), "scales": model.scales0.numpy(),
            "opacities": torch.sigmoid(model.opacity_logit).numpy(), "skin_weights": W.numpy(),
            "colors": np.full((model.num_surfels, 3), 0.5, np.float32),
            "geometry_features": f_g.numpy(), "appearance_features": f_c.numpy(),
            "semantic_logits": logits.numpy(),
        }
    io_ = lambda n: {"name": n, "shape": [], "dtype": "float32"}  # noqa: E731
    models = {
        "pose_encoder": {"file": "pose_encoder.onnx", "inputs": [io_("rot_mats")], "outputs": [io_("pose_code")]},
        "geometry": {"file": "geometry.onnx", "inputs": [], "outputs": []},
        "color": {"file": "color.onnx", "inputs": [], "outputs": [], "view_dir_canonicalization": "inverse"},
    }
    files = {n: stage / n for n in ("pose_encoder.onnx", "geometry.onnx", "color.onnx")}
    bm = make_body_model(np.asarray(surfels_parents()), surfels.rest_joints, surfels.joints,
                         surfels.bone_transforms, surfels.betas, canonical_pose=surfels.canonical_pose)
    return write_bundle(out_dir, arrays, kind="full", body_model=bm, models=models, files=files,
                        overwrite=True)


def surfels_parents():
    from fmgs.trainer.models.fields import SMPL_PARENTS

    return list(SMPL_PARENTS)


def trainer_posed(model: FMGSAvatar, surfels, poses, world_from_body, camera_center):
    """The trainer's posed surfels (FMGSAvatar.forward) for one frame, float32 torch."""
    from fmgs.trainer.models.full import pose_frame

    with torch.no_grad():
        rot, B = pose_frame(np.asarray(poses, np.float64).reshape(72), None, None, surfels.rest_joints,
                            surfels.bone_transforms, world_from_body)
        return model(rot, B, torch.as_tensor(np.asarray(camera_center), dtype=torch.float32),
                     torch.as_tensor(surfels.joints, dtype=torch.float32))
