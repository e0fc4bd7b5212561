"""Neural fields of the full FMGS-Avatar model (paper Sec. 4.2-4.3, eq. 3-12).

Standalone building blocks, meant to be wired into :class:`fmgs.trainer.models.foundation.SurfelAvatar`
(which, so far, has only the static, pose-free subset of these equations):

* :class:`HierarchicalPoseEncoder` -- the pose latent code ``Z_p`` (16-d) from the
  SMPL pose and the (shape-dependent) canonical joints, LEAP-style as in 3DGS-Avatar;
  :func:`add_pose_noise` is its training-time augmentation.
* :class:`GeometryResidualField` -- eq. 3, ``(delta_d, delta_s, delta_r, z_g) =
  F_g(f_g, Z_p)``; :func:`apply_geometry_residual` applies eq. 4-6 (with
  :func:`so3_exp` for eq. 6).
* :class:`AppearanceField` -- eq. 7, colour from ``(f_c, z_g, Z_p, gamma(d_hat))``;
  :func:`canonicalize_view_dirs` gives ``d_hat = T_{1:3,1:3}^{-1} d``.
* :class:`SemanticField` -- eq. 8, 28 Sapiens logits from ``f_s``;
  :data:`SAPIENS_CLASSES`, :data:`SAPIENS_PALETTE`.
* :class:`SkinningField` -- eq. 9, ``W = softmax(F_w(H(mu')))``;
  :func:`skinning_regulariser`, :func:`skinning_weight_schedule`,
  :func:`sample_mesh_surface` (the random surface samples of the regulariser).
* :class:`PoseCorrection` -- learnable per-frame SMPL pose deltas ``theta_p``.
* :func:`blend_lbs` -- forward LBS, eq. 10-12 (the same computation as
  ``SurfelAvatar.forward``, factored out so the model can call it).

Conventions: surfel frames are ``(S, 3, 3)`` matrices with columns ``[t_u, t_v, n]``;
scales are linear ``(S, 2)`` metres; positions are metres in the canonical (star-pose)
body frame; all fields work in any floating dtype (float32 for training, float64 in
the tests). Nothing here depends on the rasteriser.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fmgs.body_model import NUM_JOINTS
from fmgs.trainer.models.hashgrid import HashGrid, HashGridConfig, normalize_to_bbox

__all__ = [
    "SMPL_PARENTS",
    "SAPIENS_CLASSES",
    "SAPIENS_PALETTE",
    "SAPIENS_PALETTE_PATH",
    "load_sapiens_palette",
    "colorize_labels",
    "skew",
    "so3_exp",
    "normalize_canonical_joints",
    "pose_rotation_matrices",
    "add_pose_noise",
    "HierarchicalPoseEncoder",
    "GeometryResidual",
    "CorrectedSurfels",
    "GeometryResidualField",
    "apply_geometry_residual",
    "canonicalize_view_dirs",
    "AppearanceField",
    "SemanticField",
    "DEFAULT_SKINNING_GRID",
    "SkinningField",
    "PoseCorrection",
    "LBSOutput",
    "blend_lbs",
]

#: SMPL kinematic tree (parent of each of the 24 joints; parents precede children, so
#: joint order 0..23 is a valid kinematic order). Same as ``kintree_table[0]`` of SMPL.
SMPL_PARENTS: tuple[int, ...] = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21)


# =========================================================================== semantics palette
#: Path of the palette / class-name file shipped with the package.
# The class list, palette and label colouring live in the torch-free core (the runtime
# needs them too); re-exported here for the semantic field.
from fmgs.priors import (  # noqa: E402
    NUM_SAPIENS_CLASSES, SAPIENS_CLASSES, SAPIENS_PALETTE, SAPIENS_PALETTE_PATH, colorize_labels, load_sapiens_palette,
)


# Real spherical-harmonics constants (degree <= 3), as in 3DGS / Sloan's "Stupid SH tricks".
_C0 = 0.28209479177387814
_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
       -0.4570457994644658, 1.445305721320277, -0.5900435899266435)


def sh_bands(dirs: torch.Tensor, degree: int = 3, with_dc: bool = True, axis: int = -1) -> list[torch.Tensor]:
    """The real SH basis functions of unit directions as a list of ``(N,)`` tensors
    (3DGS ordering and signs); ``with_dc=False`` leaves out the constant band-0 term
    (the exported colour graphs fold it into a per-frame bias). ``axis`` is the axis of
    ``dirs`` that holds x, y, z (``-1`` for ``(N, 3)`` rows; ``0`` for planar ``(3, N)``).

    Raises:
        ValueError: degree outside 0..3.
    """
    if not 0 <= degree <= 3:
        raise ValueError(f"SH degree must be 0..3, got {degree}")
    x, y, z = dirs.unbind(axis)
    out = [torch.full_like(x, _C0)] if with_dc else []
    if degree >= 1:
        out += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [_C2[0] * xy, _C2[1] * yz, _C2[2] * (2 * zz - xx - yy), _C2[3] * xz, _C2[4] * (xx - yy)]
    if degree >= 3:
        out += [
            _C3[0] * y * (3 * xx - yy),
            _C3[1] * xy * z,
            _C3[2] * y * (4 * zz - xx - yy),
            _C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            _C3[4] * x * (4 * zz - xx - yy),
            _C3[5] * z * (xx - yy),
            _C3[6] * x * (xx - 3 * yy),
        ]
    return out


def sh_basis(dirs: torch.Tensor, degree: int = 3) -> torch.Tensor:
    """Real SH basis of unit directions.

    Args:
        dirs: (N, 3) unit vectors, any float dtype.
        degree: 0..3.

    Returns:
        (N, (degree+1)^2) basis values, same dtype (3DGS ordering and signs).

    Raises:
        ValueError: degree outside 0..3.
    """
    return torch.stack(sh_bands(dirs, degree), -1)



# =========================================================================== rotations
def skew(v: torch.Tensor) -> torch.Tensor:
    """Cross-product matrices ``[v]_x`` with ``[v]_x w = v x w``.

    Args:
        v: ``(..., 3)`` vectors, any float dtype.

    Returns:
        ``(..., 3, 3)`` skew-symmetric matrices, same dtype/device.
    """
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], -1).reshape(*v.shape[:-1], 3, 3)


def so3_exp(v: torch.Tensor) -> torch.Tensor:
    """Exponential map so(3) -> SO(3): ``exp([v]_x)`` (Rodrigues' formula, eq. 6).

    ``exp([v]_x) = I + a K + b K^2`` with ``K = [v]_x``, ``t = |v|``,
    ``a = sin(t) / t`` and ``b = (1 - cos t) / t^2``. Below ``t = 1e-3`` rad the two
    coefficients use their Taylor series (``1 - t^2/6 + t^4/120``,
    ``1/2 - t^2/24 + t^4/720``; truncation error < 1e-20), so the map and its
    gradient are exact and finite at ``v = 0`` (where the Jacobian is ``[.]_x``).

    Args:
        v: ``(..., 3)`` rotation vectors (axis * angle, radians), any float dtype.

    Returns:
        ``(..., 3, 3)`` rotation matrices, same dtype/device (``x' = R x``).
    """
    if v.shape[-1] != 3:
        raise ValueError(f"so3_exp expects (..., 3), got {tuple(v.shape)}")
    t2 = (v * v).sum(-1)
    small = t2 < 1e-6
    t2s = torch.where(small, torch.ones_like(t2), t2)  # keeps the unused branch finite
    ts = torch.sqrt(t2s)
    a = torch.where(small, 1.0 - t2 / 6.0 + t2 * t2 / 120.0, torch.sin(ts) / ts)
    b = torch.where(small, 0.5 - t2 / 24.0 + t2 * t2 / 720.0, (1.0 - torch.cos(ts)) / t2s)
    K = skew(v)
    eye = torch.eye(3, dtype=v.dtype, device=v.device)
    return eye + a[..., None, None] * K + b[..., None, None] * (K @ K)


# =========================================================================== pose encoder
def normalize_canonical_joints(joints: torch.Tensor) -> torch.Tensor:
    """Normalise canonical joints for :class:`HierarchicalPoseEncoder`.

    ``J_hat = (J - J_pelvis) / max_b |J_b - J_pelvis|``: pelvis at the origin and the
    farthest joint (usually a hand or the head) at distance 1. The result depends on
    the body shape (beta) only through proportions, not absolute size.

    Args:
        joints: ``(..., 24, 3)`` canonical (rest / star pose) joints, metres.

    Returns:
        ``(..., 24, 3)`` unitless normalised joints, same dtype.
    """
    rel = joints - joints[..., :1, :]
    scale = rel.norm(dim=-1).amax(dim=-1, keepdim=True).clamp_min(1e-8)
    return rel / scale[..., None]


def pose_rotation_matrices(poses: torch.Tensor) -> torch.Tensor:
    """SMPL axis-angle poses -> per-joint rotation matrices with the root set to identity.

    Args:
        poses: ``(B, 72)`` or ``(B, 24, 3)`` axis-angle, radians.

    Returns:
        ``(B, 24, 3, 3)`` rotations; joint 0 (the global orientation) is the identity,
        as the pose encoder expects (the code describes the articulation only).
    """
    aa = poses.reshape(poses.shape[0], NUM_JOINTS, 3)
    rot = so3_exp(aa)
    eye = torch.eye(3, dtype=rot.dtype, device=rot.device).expand(rot.shape[0], 1, 3, 3)
    return torch.cat([eye, rot[:, 1:]], dim=1)


def add_pose_noise(rot: torch.Tensor, std: float = 0.1, p: float = 0.5,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time pose augmentation of 3DGS-Avatar: with probability ``p`` add
    i.i.d. ``N(0, std^2)`` noise to every entry of the rotation matrices.

    One coin is drawn per call (i.e. per training iteration), as 3DGS-Avatar does; the
    noisy matrices are deliberately not re-orthonormalised (the encoder sees them as
    9 numbers). Use only in training; evaluation feeds the clean rotations.

    Args:
        rot: ``(..., 3, 3)`` rotation matrices (e.g. ``(B, 24, 3, 3)``).
        std: noise standard deviation (unitless matrix entries).
        p: probability of adding noise.
        generator: optional CPU ``torch.Generator`` for reproducibility.

    Returns:
        A new tensor with noise, or ``rot`` itself when no noise was drawn.
    """
    if p <= 0 or std <= 0:
        return rot
    if float(torch.rand((), generator=generator)) >= p:
        return rot
    noise = torch.randn(rot.shape, generator=generator, dtype=rot.dtype)
    return rot + std * noise.to(rot.device)


class HierarchicalPoseEncoder(nn.Module):
    """Hierarchical (LEAP-style) pose encoder of 3DGS-Avatar, giving the pose code ``Z_p``
    of eq. 3 and 7.

    Architecture (per pose, ``B`` poses at once):

    1. Root rotation replaced by the identity (the code must describe articulation only;
       so changing the global orientation never changes ``Z_p``).
    2. Global code ``g = Linear(24*9 + 24*3 -> 6)([vec(R_0..R_23), vec(J_0..J_23)])``.
    3. In SMPL kinematic order (parents first), one MLP per joint
       ``Linear(19 -> 19) - ReLU - Linear(19 -> 6)`` on the 19-d input
       ``[vec(R_b) (9), J_b (3), l_b (1), z_parent(b) (6)]`` where ``J_b`` are the
       normalised canonical joints (:func:`normalize_canonical_joints`),
       ``l_b = |J_b - J_parent(b)|`` the normalised bone length (``l_0 = |J_0|``, 0 after
       normalisation) and ``z_parent`` the parent's 6-d code (the global code ``g`` for
       the root). Concatenating the 24 codes gives 24 * 6 = 144 dims.
    4. ``Z_p = Linear(144 -> 16)`` (no activation): the paper's 16-d pose latent code.
       The shape (beta) enters through the canonical joints.

    What ``vec(R_b)`` is (``input_mode``): ``"rotation"`` feeds the raw matrix entries (the
    LEAP / 3DGS-Avatar input); ``"relative"`` (the full model's default) feeds
    ``(R_b - I) / input_scale`` -- the rotation relative to the rest pose, zero at rest,
    divided by ``input_scale`` (0.1 by default: the RMS spread of a rotation entry over the
    ZJU-MoCap 377 training poses is 0.11). Both are affine maps of the same 9 numbers, so
    the function class is unchanged; what changes is the optimisation. Raw entries carry a
    constant part (the identity, norm ~4.8 over 23 joints) that is ~5 times the across-pose
    variation, and the pose-dependent part enters the first layers at ~0.1 scale, so with
    Adam's per-weight step (``lr`` per step, independent of the input's scale) the code's
    pose dependence grows ~10 times slower than everything else and Z_p stays nearly
    constant over a run (``benchmarks/pose_dependence.py``). The transform lives in the
    module (buffers ``input_offset (3, 3)`` and ``input_scale ()``, saved with the weights),
    so an exported encoder takes the same raw rotation matrices; a checkpoint written
    before these buffers existed loads as ``"rotation"``.

    Args:
        code_dim: output dimension of ``Z_p`` (16 in the paper); ``0`` returns the raw
            144-d concatenation (no projection).
        dim_per_joint: per-joint code size (6).
        parents: kinematic tree (default :data:`SMPL_PARENTS`).
        input_mode: ``"relative"`` or ``"rotation"`` (see above).
        input_scale: divisor of ``R - I`` in the relative mode (> 0).

    Raises:
        ValueError: unknown ``input_mode``, ``input_scale <= 0`` or a kinematic tree whose
            parents do not precede their children.
    """

    def __init__(self, code_dim: int = 16, dim_per_joint: int = 6, parents=SMPL_PARENTS,
                 input_mode: str = "rotation", input_scale: float = 0.1):
        super().__init__()
        if input_mode not in ("rotation", "relative"):
            raise ValueError(f"input_mode must be 'rotation' or 'relative', got {input_mode!r}")
        if not float(input_scale) > 0:
            raise ValueError(f"input_scale must be > 0, got {input_scale!r}")
        rel = input_mode == "relative"
        self.register_buffer("input_offset", torch.eye(3) if rel else torch.zeros(3, 3))
        self.register_buffer("input_scale", torch.tensor(float(input_scale) if rel else 1.0))
        self.parents = tuple(int(p) for p in parents)
        nj = len(self.parents)
        if any(p >= b for b, p in enumerate(self.parents)):
            raise ValueError("parents must precede their children")
        self.num_joints = nj
        self.dim_per_joint = int(dim_per_joint)
        self.global_layer = nn.Linear(nj * 9 + nj * 3, self.dim_per_joint)
        d_in = 9 + 3 + 1 + self.dim_per_joint
        self.joint_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, d_in), nn.ReLU(), nn.Linear(d_in, self.dim_per_joint)) for _ in range(nj)
        )
        self.concat_dim = nj * self.dim_per_joint
        self.out_layer = nn.Linear(self.concat_dim, code_dim) if code_dim > 0 else nn.Identity()
        self.out_dim = code_dim if code_dim > 0 else self.concat_dim

    @property
    def input_mode(self) -> str:
        """``"relative"`` or ``"rotation"``, as held by the ``input_offset`` buffer."""
        return "relative" if bool(self.input_offset.abs().sum() > 0) else "rotation"

    def prepare(self, rot: torch.Tensor) -> torch.Tensor:
        """The rotation part of the encoder input: ``(rot - input_offset) / input_scale``,
        ``(..., 3, 3)`` -> ``(..., 3, 3)`` (see the class docstring)."""
        off = self.input_offset.to(rot.dtype)
        return (rot - off) / self.input_scale.to(rot.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints written before the input buffers existed were trained on raw rotations.
        for name, legacy in (("input_offset", torch.zeros(3, 3)), ("input_scale", torch.tensor(1.0))):
            if prefix + name not in state_dict and prefix + "global_layer.weight" in state_dict:
                state_dict[prefix + name] = legacy
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, rot: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
        """Encode poses.

        Args:
            rot: ``(B, 24, 3, 3)`` (or ``(24, 3, 3)``) per-joint local rotation matrices
                (possibly noised by :func:`add_pose_noise`); joint 0 is ignored (replaced
                by the identity).
            joints: ``(24, 3)`` or ``(B, 24, 3)`` normalised canonical joints
                (:func:`normalize_canonical_joints`), unitless.

        Returns:
            ``(B, out_dim)`` pose codes ``Z_p`` (``(1, out_dim)`` for unbatched input).
        """
        if rot.dim() == 3:
            rot = rot.unsqueeze(0)
        B, nj = rot.shape[0], self.num_joints
        if rot.shape[1:] != (nj, 3, 3):
            raise ValueError(f"expected rotations (B, {nj}, 3, 3), got {tuple(rot.shape)}")
        dt = self.global_layer.weight.dtype
        eye = torch.eye(3, dtype=dt, device=rot.device).expand(B, 1, 3, 3)
        rot = torch.cat([eye, rot[:, 1:].to(dt)], dim=1)
        J = joints.to(dt)
        if J.dim() == 2:
            J = J.unsqueeze(0)
        J = J.expand(B, nj, 3)
        r9 = self.prepare(rot).reshape(B, nj, 9)
        g = self.global_layer(torch.cat([r9.reshape(B, -1), J.reshape(B, -1)], dim=-1))
        par = [max(p, 0) for p in self.parents]
        bone = J - J[:, par] * torch.tensor([0.0] + [1.0] * (nj - 1), dtype=dt, device=J.device).view(1, nj, 1)
        bone_len = bone.norm(dim=-1, keepdim=True)  # (B, nj, 1)
        codes: list[torch.Tensor] = []
        for b, p in enumerate(self.parents):
            parent_code = g if p < 0 else codes[p]
            x = torch.cat([r9[:, b], J[:, b], bone_len[:, b], parent_code], dim=-1)
            codes.append(self.joint_mlps[b](x))
        return self.out_layer(torch.cat(codes, dim=-1))


def _expand_rows(z: torch.Tensor, n: int) -> torch.Tensor:
    """(D,), (1, D) or (n, D) -> (n, D)."""
    if z.dim() == 1:
        z = z.unsqueeze(0)
    if z.shape[0] not in (1, n):
        raise ValueError(f"per-frame code must have 1 or {n} rows, got {tuple(z.shape)}")
    return z.expand(n, z.shape[-1])


def _mlp_with_code(mlp: nn.Sequential, parts: list[torch.Tensor], code: torch.Tensor, at: int) -> torch.Tensor:
    """``mlp(cat(parts[:at] + [code] + parts[at:], -1))`` with a per-frame code folded into the
    first layer's bias: ``W [x; z] + b = W_x x + (W_z z + b)``, so the ``(S, dim z)`` copy of
    the code and its share of the big matrix product are never formed (same function; the
    code's gradient is ``W_z^T sum_rows(dL/dh)``). A per-row code (``(S, dim z)``) takes the
    plain concatenation.

    Args:
        mlp: the field's MLP (first module an ``nn.Linear`` over the concatenation).
        parts: ``(S, d_k)`` per-row inputs in concatenation order, the code left out.
        code: ``(d_z,)``, ``(1, d_z)`` or ``(S, d_z)``.
        at: index of the code among the concatenated parts.
    """
    S = parts[0].shape[0]
    z = code.to(parts[0].dtype)
    if z.dim() == 2 and z.shape[0] == S and S != 1:
        return mlp(torch.cat(parts[:at] + [z] + parts[at:], dim=-1))
    z = z.reshape(1, -1)
    first = mlp[0]
    sizes = [p.shape[-1] for p in parts]
    c0 = sum(sizes[:at])
    W = first.weight
    Wz = W[:, c0:c0 + z.shape[1]]
    Wx = torch.cat([W[:, :c0], W[:, c0 + z.shape[1]:]], dim=1) if c0 + z.shape[1] < W.shape[1] else W[:, :c0]
    bias = first.bias + (z @ Wz.t()).reshape(-1)
    h = F.linear(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0], Wx, bias)
    return mlp[1:](h)


def _mlp(d_in: int, width: int, n_hidden: int, d_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(n_hidden):
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        d_in = width
    layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


# =========================================================================== geometry field
class GeometryResidual(NamedTuple):
    """Outputs of :class:`GeometryResidualField` (eq. 3), all in the field's dtype.

    Attributes:
        delta_d: ``(S, 1)`` displacement along the canonical normal, metres (eq. 4).
        delta_s: ``(S, 2)`` log-scale residual (eq. 5: ``s' = s * exp(delta_s)``).
        delta_r: ``(S, 3)`` so(3) rotation residual, radians (eq. 6).
        z_g: ``(S, 16)`` geometry feature for the appearance field (eq. 7).
    """

    delta_d: torch.Tensor
    delta_s: torch.Tensor
    delta_r: torch.Tensor
    z_g: torch.Tensor


class CorrectedSurfels(NamedTuple):
    """Canonical surfels after the pose-dependent residual (eq. 4-6).

    Attributes:
        centers: ``(S, 3)`` ``mu'``, metres.
        rotations: ``(S, 3, 3)`` ``R'`` (columns ``[t_u, t_v, n]``, orthonormal).
        scales: ``(S, 2)`` ``s'``, metres.
    """

    centers: torch.Tensor
    rotations: torch.Tensor
    scales: torch.Tensor


class GeometryResidualField(nn.Module):
    """Pose-dependent geometry residual field ``F_{theta_g}`` (eq. 3).

    ``(delta_d, delta_s, delta_r, z_g) = MLP([f_g, Z_p])`` with ``n_hidden`` ReLU layers
    of width ``width`` and a linear output of ``1 + 2 + 3 + latent_dim`` values, split in
    that order. The output layer is initialised to zero (weights and bias), so an
    untrained field is the identity correction (and ``z_g = 0``); the gradient still
    reaches the output layer at once and the hidden layers after the first step.

    Args:
        feature_dim: size of ``f_g`` (32: the geometry hash-grid feature).
        pose_dim: size of ``Z_p`` (16).
        latent_dim: size of ``z_g`` (16).
        width: hidden width (128).
        n_hidden: number of hidden layers (2); the paper only says "lightweight".
    """

    def __init__(self, feature_dim: int = 32, pose_dim: int = 16, latent_dim: int = 16,
                 width: int = 128, n_hidden: int = 2):
        super().__init__()
        self.feature_dim, self.pose_dim, self.latent_dim = feature_dim, pose_dim, latent_dim
        self.mlp = _mlp(feature_dim + pose_dim, width, n_hidden, 6 + latent_dim)
        last = self.mlp[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, f_g: torch.Tensor, z_p: torch.Tensor) -> GeometryResidual:
        """Evaluate eq. 3.

        Args:
            f_g: ``(S, feature_dim)`` geometry features of the surfels.
            z_p: ``(pose_dim,)``, ``(1, pose_dim)`` or ``(S, pose_dim)`` pose code.

        Returns:
            :class:`GeometryResidual`.
        """
        _expand_rows(z_p, f_g.shape[0])                          # shape check
        out = _mlp_with_code(self.mlp, [f_g], z_p, at=1)
        d, s, r, z = out.split([1, 2, 3, self.latent_dim], dim=-1)
        return GeometryResidual(d, s, r, z)


def apply_geometry_residual(centers: torch.Tensor, rotations: torch.Tensor, scales: torch.Tensor,
                            normals: torch.Tensor | None, out: GeometryResidual) -> CorrectedSurfels:
    """Apply the geometry residual to canonical surfels (eq. 4-6).

    * eq. 4: ``mu' = mu + n * delta_d`` (1-D displacement along the canonical normal);
    * eq. 5: ``s' = s * exp(delta_s)``;
    * eq. 6: ``R' = R @ exp([delta_r]_x)`` (right-multiplication: the residual rotates
      the surfel in its own local frame, :func:`so3_exp`).

    Args:
        centers: ``(S, 3)`` canonical centres ``mu``, metres.
        rotations: ``(S, 3, 3)`` canonical frames ``R`` (columns ``[t_u, t_v, n]``).
        scales: ``(S, 2)`` canonical scales ``s`` (linear, metres).
        normals: ``(S, 3)`` unit normals ``n``; ``None`` uses ``rotations[:, :, 2]``.
        out: the field output.

    Returns:
        :class:`CorrectedSurfels` ``(mu', R', s')``.
    """
    n = rotations[..., :, 2] if normals is None else normals
    mu = centers + n * out.delta_d
    s = scales * torch.exp(out.delta_s)
    R = rotations @ so3_exp(out.delta_r)
    return CorrectedSurfels(mu, R, s)


# =========================================================================== appearance field
def canonicalize_view_dirs(dirs: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Canonicalise viewing directions with the inverse skinning rotation (Sec. 4.2.2).

    ``d_hat = normalize(T_{1:3,1:3}^{-1} d)`` with ``T`` the blended LBS transform of each
    surfel (eq. 10). The blended 3x3 block is not exactly a rotation, so the true inverse
    is used (a batched solve), not the transpose. Detach the inputs first if the colour
    loss should not move the surfels through the view direction.

    Args:
        dirs: ``(S, 3)`` observation-space viewing directions (camera -> surfel), any norm.
        transforms: ``(S, 4, 4)`` or ``(S, 3, 3)`` blended transforms (:func:`blend_lbs`).

    Returns:
        ``(S, 3)`` unit canonical-space directions.
    """
    M = transforms[:, :3, :3]
    d = torch.linalg.solve(M, dirs.unsqueeze(-1)).squeeze(-1)
    return F.normalize(d, dim=-1)


class AppearanceField(nn.Module):
    """Pose- and view-conditioned colour field ``F_{theta_c}`` (eq. 7).

    ``c = sigmoid(Linear(64 -> 3)(ReLU(Linear(d_in -> 64)([f_c, z_g, Z_p, gamma(d_hat)]))))``
    with ``gamma`` the real SH basis of degree ``sh_degree`` (16 values for degree 3,
    :func:`fmgs.trainer.models.foundation.sh_basis`) of the canonicalised unit view direction:
    one 64-wide hidden layer, as the paper (following 3DGS-Avatar) prescribes.
    ``d_in = 32 + 16 + 16 + 16 = 80`` by default.

    Args:
        feature_dim: size of ``f_c`` (32).
        latent_dim: size of ``z_g`` (16).
        pose_dim: size of ``Z_p`` (16).
        sh_degree: degree of the view-direction encoding (3), or -1 for no view input.
        width: hidden width (64).
        n_hidden: hidden layers (1).
    """

    def __init__(self, feature_dim: int = 32, latent_dim: int = 16, pose_dim: int = 16,
                 sh_degree: int = 3, width: int = 64, n_hidden: int = 1):
        super().__init__()
        self.sh_degree = int(sh_degree)
        n_sh = (self.sh_degree + 1) ** 2 if self.sh_degree >= 0 else 0
        self.in_dim = feature_dim + latent_dim + pose_dim + n_sh
        self.mlp = _mlp(self.in_dim, width, n_hidden, 3)

    def forward(self, f_c: torch.Tensor, z_g: torch.Tensor, z_p: torch.Tensor,
                view_dirs: torch.Tensor | None = None) -> torch.Tensor:
        """Evaluate eq. 7.

        Args:
            f_c: ``(S, feature_dim)`` appearance features.
            z_g: ``(S, latent_dim)`` geometry features from :class:`GeometryResidualField`.
            z_p: ``(pose_dim,)``, ``(1, pose_dim)`` or ``(S, pose_dim)`` pose code.
            view_dirs: ``(S, 3)`` canonicalised view directions
                (:func:`canonicalize_view_dirs`; normalised here again); required unless
                ``sh_degree < 0``.

        Returns:
            ``(S, 3)`` colours in (0, 1).
        """
        _expand_rows(z_p, f_c.shape[0])                          # shape check
        parts = [f_c, z_g.to(f_c.dtype)]
        if self.sh_degree >= 0:
            if view_dirs is None:
                raise ValueError("view_dirs are required when sh_degree >= 0")
            parts.append(sh_basis(F.normalize(view_dirs.to(f_c.dtype), dim=-1), self.sh_degree))
        return torch.sigmoid(_mlp_with_code(self.mlp, parts, z_p, at=2))


# =========================================================================== semantic field
class SemanticField(nn.Module):
    """Semantic decoder ``F_{theta_s}`` (eq. 8): ``l_s = MLP(f_s)``, 28 Sapiens logits.

    A shared lightweight MLP (``n_hidden`` ReLU layers of width ``width``, default one
    64-wide layer) over the semantic hash-grid feature. The logits are rendered like
    colour and turned into a label map by ``argmax(softmax(.))`` after rendering.

    Args:
        feature_dim: size of ``f_s`` (32).
        num_classes: number of classes (28, :data:`SAPIENS_CLASSES`).
        width: hidden width (64).
        n_hidden: hidden layers (1).
    """

    def __init__(self, feature_dim: int = 32, num_classes: int = NUM_SAPIENS_CLASSES,
                 width: int = 64, n_hidden: int = 1):
        super().__init__()
        self.num_classes = num_classes
        self.mlp = _mlp(feature_dim, width, n_hidden, num_classes)

    def forward(self, f_s: torch.Tensor) -> torch.Tensor:
        """``(S, feature_dim)`` semantic features -> ``(S, num_classes)`` logits (unnormalised)."""
        return self.mlp(f_s)


# =========================================================================== skinning field
#: Default hash encoding of the skinning field: coarser than the appearance grid
#: (skinning weights are smooth; the finest cell is ~1 cm over a ~2.4 m padded box) and
#: 8 levels x 2 features = 16-d. The paper does not give the skinning grid's sizes.
DEFAULT_SKINNING_GRID = HashGridConfig(n_levels=8, n_features_per_level=2, log2_hashmap_size=16,
                                       base_resolution=8, max_resolution=256)


class SkinningField(nn.Module):
    """Neural skinning field ``F_{theta_w}`` (eq. 9): ``W = softmax(MLP(H(mu')))``.

    ``H`` is a :class:`~fmgs.trainer.models.hashgrid.HashGrid` evaluated on the fly (the
    corrected centres ``mu'`` move with the pose) on points normalised to the padded
    canonical bounding box (:func:`~fmgs.trainer.models.hashgrid.normalize_to_bbox`; points
    outside are clamped to its faces). The MLP has 4 hidden ReLU layers of width 128
    ("4-layer MLP with a hidden dimension of 128") and a linear output of 24 logits,
    followed by a softmax over bones. Differentiable w.r.t. the points, the table and
    the MLP.

    Args:
        bbox_min, bbox_max: ``(3,)`` canonical bounding box of the surfels, metres.
        padding: fraction of the extent added on each side (0.1).
        grid_cfg: hash-grid configuration (default :data:`DEFAULT_SKINNING_GRID`).
        width: hidden width (128).
        n_hidden: hidden layers (4).
        num_bones: 24.
        include_xyz: also feed the normalised position (3 extra inputs); off by default
            (the paper feeds only ``H(mu')``).
        prior_init: zero-initialise the output layer, so that with ``prior_weights`` the
            field starts exactly at the prior (see :meth:`forward`).
    """

    def __init__(self, bbox_min, bbox_max, padding: float = 0.1, grid_cfg: HashGridConfig | None = None,
                 width: int = 128, n_hidden: int = 4, num_bones: int = NUM_JOINTS, include_xyz: bool = False,
                 prior_init: bool = False):
        super().__init__()
        self.register_buffer("bbox_min", torch.as_tensor(bbox_min, dtype=torch.float32).clone())
        self.register_buffer("bbox_max", torch.as_tensor(bbox_max, dtype=torch.float32).clone())
        self.padding = float(padding)
        self.include_xyz = bool(include_xyz)
        self.grid = HashGrid(grid_cfg or DEFAULT_SKINNING_GRID)
        self.mlp = _mlp(self.grid.output_dim + (3 if include_xyz else 0), width, n_hidden, num_bones)
        self.num_bones = num_bones
        if prior_init:
            last = [m for m in self.mlp if isinstance(m, nn.Linear)][-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def weights_from_features(self, h: torch.Tensor, prior_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 9 from already encoded points: ``(N, L*F)`` grid features ``H(x)`` (e.g.
        through a precomputed lookup, ``self.grid(lookup=...)``) -> ``(N, 24)`` weights,
        with the optional ``log(prior)`` offset of :meth:`forward`. Not for
        ``include_xyz`` fields (they need the points)."""
        if self.include_xyz:
            raise ValueError("weights_from_features cannot be used with include_xyz=True")
        logits = self.mlp(h)
        if prior_weights is not None:
            logits = logits + torch.log(prior_weights.to(logits.dtype).clamp_min(1e-8))
        return torch.softmax(logits, dim=-1)

    def logits(self, points: torch.Tensor) -> torch.Tensor:
        """``(S, 3)`` canonical points (metres) -> ``(S, 24)`` skinning logits."""
        x = normalize_to_bbox(points, self.bbox_min.to(points.dtype), self.bbox_max.to(points.dtype), self.padding)
        h = self.grid(x.to(self.grid.table.dtype))
        if self.include_xyz:
            h = torch.cat([h, x.clamp(0.0, 1.0).to(h.dtype)], dim=-1)
        return self.mlp(h)

    def forward(self, points: torch.Tensor, prior_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 9: ``(S, 3)`` corrected canonical centres ``mu'`` (metres) -> ``(S, 24)``
        skinning weights (non-negative, rows sum to 1).

        With ``prior_weights`` ``(S, 24)`` (the SMPL weights carried to the points) the
        logits are offset by ``log(prior)``: ``W = softmax(F(H(mu')) + log w_SMPL)``, so
        a zero output layer (``prior_init``) starts exactly at SMPL's skinning and the MLP
        learns a correction. (Eq. 9 as printed starts from a random field; 3DGS-Avatar
        pulls it to SMPL with the early weight-10 regulariser, which costs the first
        ~1k iterations a badly skinned body.)
        """
        logits = self.logits(points)
        if prior_weights is not None:
            logits = logits + torch.log(prior_weights.to(logits.dtype).clamp_min(1e-8))
        return torch.softmax(logits, dim=-1)


# =========================================================================== pose correction
class PoseCorrection(nn.Module):
    """Learnable per-frame SMPL pose correction ``theta_p`` (zero-initialised).

    Refines the fitted SMPL poses of the training frames (monocular fits are noisy):
    ``theta_p = theta + delta(frame)``, added in axis-angle (small deltas), as
    3DGS-Avatar does. The bone transforms ``B_b`` of eq. 10 are then computed from
    ``theta_p``. Test frames (or novel poses) use ``delta = 0``.

    With ``every = k > 1`` the correction is piecewise linear in the training-frame index:
    knots every ``k`` frames, ``delta(f) = (1 - a) D[i] + a D[i + 1]`` with ``i = f // k``,
    ``a = f / k - i``. A monocular fit's error changes slowly over a video (on ZJU-MoCap 377
    prepared by ``fmgs-prep video``, 7.1 of its 7.4 px mean joint error vs the dataset's fits
    survives a 15-frame moving average), and a short training run visits each frame less
    than once, so one correction per frame cannot learn; a knot is shared by ``2k`` frames.
    ``k = 1`` is the per-frame table of the paper.

    Args:
        num_frames: number of training frames (consecutive indices = consecutive frames).
        num_joints: 24 (joint 0 corrects the body-frame root rotation; for ZJU-MoCap,
            whose root is zero and whose global rotation is in ``Rh``, it is a small
            global refinement).
        every: frames between knots (>= 1).

    Attributes:
        delta: ``(num_knots, num_joints, 3)`` axis-angle corrections at the knots, radians
            (``num_knots = num_frames`` when ``every = 1``, else ``(num_frames - 1) // every + 2``).
        num_frames, every: as given.
    """

    def __init__(self, num_frames: int, num_joints: int = NUM_JOINTS, every: int = 1):
        super().__init__()
        if int(every) < 1:
            raise ValueError(f"PoseCorrection: every must be >= 1, got {every}")
        self.num_frames, self.every = int(num_frames), int(every)
        knots = self.num_frames if self.every == 1 else (self.num_frames - 1) // self.every + 2
        self.delta = nn.Parameter(torch.zeros(knots, num_joints, 3))

    def correction(self, frame_ids: torch.Tensor) -> torch.Tensor:
        """``(B, num_joints, 3)`` corrections of training frames ``frame_ids`` (radians)."""
        f = frame_ids.long()
        if self.every == 1:
            return self.delta[f]
        i = torch.div(f, self.every, rounding_mode="floor")
        a = ((f - i * self.every).to(self.delta.dtype) / self.every)[:, None, None]
        return (1 - a) * self.delta[i] + a * self.delta[i + 1]

    def forward(self, frame_ids: torch.Tensor, poses: torch.Tensor) -> torch.Tensor:
        """Corrected poses.

        Args:
            frame_ids: ``(B,)`` int64 training-frame indices.
            poses: ``(B, 72)`` or ``(B, 24, 3)`` fitted axis-angle poses, radians.

        Returns:
            Corrected poses in the shape of ``poses``.
        """
        d = self.correction(frame_ids).to(poses.dtype)
        return poses + d.reshape(poses.shape)


# =========================================================================== forward LBS
class LBSOutput(NamedTuple):
    """Result of :func:`blend_lbs`.

    Attributes:
        means: ``(S, 3)`` posed centres ``mu_o``, metres (eq. 11).
        rotations: ``(S, 3, 3)`` posed orthonormal frames ``R_o`` (eq. 12, re-orthonormalised).
        transforms: ``(S, 4, 4)`` blended transforms ``T`` (eq. 10), e.g. for
            :func:`canonicalize_view_dirs`.
    """

    means: torch.Tensor
    rotations: torch.Tensor
    transforms: torch.Tensor


def blend_lbs(weights: torch.Tensor, bone_transforms: torch.Tensor, centers: torch.Tensor,
              rotations: torch.Tensor) -> LBSOutput:
    """Forward linear blend skinning of surfels (eq. 10-12).

    * eq. 10: ``T = sum_b w_b B_b``;
    * eq. 11: ``mu_o = T mu'`` (homogeneous);
    * eq. 12: ``R_o = T_{1:3,1:3} R'``, then re-orthonormalised because a blend of
      rotations is not a rotation: ``t_u <- M t_u``, ``t_v <- M t_v``,
      ``n = normalize(t_u x t_v)``, ``t_u = normalize(t_u)``, ``t_v = n x t_u``
      (the surfel keeps the blended plane). Shared by the foundation
      ``SurfelAvatar.forward`` and :class:`fmgs.trainer.models.full.FMGSAvatar`.

    Args:
        weights: ``(S, 24)`` skinning weights (e.g. :class:`SkinningField` output).
        bone_transforms: ``(24, 4, 4)`` canonical -> observation bone transforms ``B_b``
            (``fmgs.trainer.models.foundation.frame_bone_transforms``).
        centers: ``(S, 3)`` corrected canonical centres ``mu'``, metres.
        rotations: ``(S, 3, 3)`` corrected canonical frames ``R'`` (columns ``[t_u, t_v, n]``).

    Returns:
        :class:`LBSOutput`.
    """
    T = torch.einsum("sb,bij->sij", weights, bone_transforms.to(weights.dtype))
    M = T[:, :3, :3]
    means = torch.einsum("sij,sj->si", M, centers) + T[:, :3, 3]
    tu = torch.einsum("sij,sj->si", M, rotations[:, :, 0])
    tv = torch.einsum("sij,sj->si", M, rotations[:, :, 1])
    n = F.normalize(torch.linalg.cross(tu, tv, dim=-1), dim=-1)
    tu = F.normalize(tu, dim=-1)
    tv = torch.linalg.cross(n, tu, dim=-1)
    return LBSOutput(means, torch.stack([tu, tv, n], dim=-1), T)
