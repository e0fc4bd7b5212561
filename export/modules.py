"""The exportable (pose- or view-dependent) parts of a trained avatar as small ``nn.Module``s.

Each wrapper uses the trained modules' own weights and computes the trainer's equations;
everything that does not depend on the pose or the view (hash-grid features at the fixed
canonical centres, semantic logits, opacities, baked skinning weights) is baked into
``surfels.safetensors`` instead (:mod:`fmgs.export.bake`). The export's parity check compares
every graph with the trainer's forward on real poses.

Two exact rewrites make the per-frame graphs cheap in ONNX Runtime (CPU, 55k surfels):

* **folded first layers** (``folded=True``): the first layer of a per-surfel MLP on
  ``[f, x_frame]`` is ``W_f f + W_x x_frame + b``; ``W_f f`` is pose-independent and baked
  (:func:`fold_first_layer`), the graph adds the per-frame part (a single row for the pose
  code; a small product for ``z_g`` and the view encoding). The input keeps its name
  (``geometry_features`` / ``appearance_features``), only its width becomes the hidden width.
* **elementwise small algebra**: the rotation residual ``R exp([r]_x)`` without batched 3x3
  MatMuls, as whole-vector products (:func:`rotated_columns`: all three columns for the
  row-major graphs, :func:`rotate_local`; two for the planar ones), ``normalize``
  without ``Expand``, the constant SH band in the bias (:func:`sh_bands_without_dc`), the hash
  encoding of the live skinning field as one Gather (:func:`hash_encode_gather`;
  ``embedding_bag`` exports as a Loop that is quadratic in ``S``).

Full model (:class:`fmgs.trainer.models.full.FMGSAvatar`):

* :class:`PoseEncoderModule` -- ``rot_mats (24,3,3) -> pose_code (1,16)`` (hierarchical pose
  encoder; the normalised canonical joints are a constant of the graph).
* :class:`GeometryModule` -- eq. 3-6: ``(f_g or W_1 f_g, Z_p, mu, R, s) -> (mu', R', s', z_g)``.
* :class:`ColorModule` -- eq. 7: ``(f_c or W_1 f_c, z_g, Z_p, d_hat) -> colours``.
* :class:`SkinningModule` -- eq. 9 live: ``(points, prior_weights) -> W``.

Foundation model (:class:`fmgs.trainer.models.foundation.SurfelAvatar`):

* :class:`FoundationColorModule` -- ``(f_c or W_1 f_c, d_hat) -> colours`` (colour MLP on
  ``[f_c, SH_3(d_hat)]``).

All tensors float32; ``S`` (surfels) is the dynamic axis.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmgs.trainer.models.fields import _C0 as _SH_C0  # degree-0 real SH constant (band 0 of sh_basis)
from fmgs.trainer.models.fields import sh_basis


class PoseEncoderModule(nn.Module):
    """``Z_p = E(R_1..R_23, J_hat)`` (3DGS-Avatar's hierarchical encoder, used by eq. 3 and 7).

    Args:
        encoder: the trained :class:`~fmgs.trainer.models.fields.HierarchicalPoseEncoder`.
        joints_normalized: ``(24, 3)`` normalised canonical joints
            (:func:`~fmgs.trainer.models.fields.normalize_canonical_joints`), baked as a constant.

    Forward: ``rot_mats (24, 3, 3)`` float32 local joint rotations (joint 0 ignored) ->
    ``pose_code (1, 16)``.
    """

    def __init__(self, encoder: nn.Module, joints_normalized: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("joints", joints_normalized.detach().clone().float())

    def forward(self, rot_mats: torch.Tensor) -> torch.Tensor:
        return self.encoder(rot_mats, self.joints)


def fold_first_layer(features: torch.Tensor, linear: nn.Linear, cols: slice) -> torch.Tensor:
    """The pose-independent part of an MLP's first layer, evaluated once at bake time.

    A first layer ``y = W [f, x_frame] + b`` splits into ``W[:, cols] f`` (per surfel, constant:
    ``f`` are hash-grid features at the fixed canonical centres) plus per-frame terms. This
    returns ``f W[:, cols]^T`` -- no bias -- computed in float64 and rounded once to float32;
    the exported graph adds the per-frame terms (:class:`GeometryModule`, :class:`ColorModule`,
    :class:`FoundationColorModule` with ``folded=True``). Exact up to float32 rounding.

    Args:
        features: ``(S, F)`` per-surfel features.
        linear: the MLP's first ``nn.Linear`` (``weight (H, D_in)``).
        cols: the input columns ``f`` occupies (``slice(0, F)``).

    Returns:
        ``(S, H)`` float32 pre-activation part.
    """
    W = linear.weight.detach().double()[:, cols]
    if W.shape[1] != features.shape[1]:
        raise ValueError(f"first layer columns {cols} ({W.shape[1]}) do not match the features ({features.shape[1]})")
    return (features.detach().double() @ W.T).float()


def rotate_local(R: torch.Tensor, v_rows: torch.Tensor) -> torch.Tensor:
    """``R @ so3_exp(v)`` (eq. 6: the residual rotates each surfel in its own frame) for the
    row-major graphs: :func:`rotated_columns` (the vector form of the planar graphs, all three
    columns) on ``R`` transposed to ``(3, 3, S)``, stacked back to rows.

    Args:
        R: ``(S, 3, 3)`` frames (columns ``[t_u, t_v, n]``).
        v_rows: ``(3, S)`` rotation vectors (planar), radians.

    Returns:
        ``(S, 3, 3)``.
    """
    cols = rotated_columns(R.permute(1, 2, 0), v_rows, 3)                         # 3 x (3, S)
    return torch.stack(cols, 1).permute(2, 0, 1)


def _normalize(v: torch.Tensor) -> torch.Tensor:
    """``F.normalize(v, dim=-1)`` (norm clamped at 1e-12) with a broadcast division: the
    exporter turns ``F.normalize`` into an ``Expand`` that ONNX Runtime runs slowly."""
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-12)


def sh_bands_without_dc(dirs: torch.Tensor, degree: int, axis: int = -1) -> list[torch.Tensor]:
    """The non-constant real SH basis functions of :func:`~fmgs.trainer.models.fields.sh_basis`
    (bands 1..degree, same order and signs): ``(degree+1)^2 - 1`` tensors ``(S,)``.

    Band 0 is the constant ``C0``; the folded colour graphs add its contribution to the
    per-frame bias instead of computing a column of constants per surfel.
    """
    from fmgs.trainer.models.fields import sh_bands

    return sh_bands(dirs, degree, with_dc=False, axis=axis)


def geometry_foldable(field: nn.Module | None) -> bool:
    """Whether :class:`GeometryModule` can take a folded first layer (a field with >= 1 hidden layer)."""
    return field is not None and len(field.mlp) > 1


class GeometryModule(nn.Module):
    """Geometry residual, eq. 3-6 (:class:`~fmgs.trainer.models.fields.GeometryResidualField` +
    :func:`~fmgs.trainer.models.fields.apply_geometry_residual`).

    Args:
        field: the trained field, or None (field switched off: identity correction, ``z_g = 0``).
        latent_dim: size of ``z_g`` (16).
        folded: the ``geometry_features`` input is the baked first-layer part
            ``W_1[:, :F] f_g`` (``(S, H)``, :func:`fold_first_layer`) instead of ``f_g``; the graph
            adds the per-frame term ``W_1[:, F:] Z_p + b_1`` (one row) and runs the remaining
            layers. Same values as the field on ``[f_g, Z_p]``.
        max_displacement: the trainer's soft bound of ``delta_d`` (``FullModelConfig.max_displacement``,
            metres; 0 = none): ``d_max * tanh(delta_d / d_max)``.

    Forward: ``geometry_features (S,F)`` or ``(S,H)`` (folded), ``pose_code (1,16)``,
    ``centers (S,3)`` m, ``rotations (S,3,3)``, ``scales (S,2)`` m -> ``centers (S,3)`` =
    ``mu'``, ``rotations (S,3,3)`` = ``R'``, ``scales (S,2)`` = ``s'``, ``z_g (S,16)``. The
    rotation residual ``R' = R exp([delta_r]_x)`` is written elementwise (:func:`rotate_local`).
    """

    def __init__(self, field: nn.Module | None, latent_dim: int = 16, folded: bool = False,
                 max_displacement: float = 0.0):
        super().__init__()
        self.field = field
        self.max_displacement = float(max_displacement)
        self.latent_dim = int(latent_dim)
        if folded and not geometry_foldable(field):
            raise ValueError("the geometry field has no hidden layer (or is off): nothing to fold")
        self.folded = bool(folded)

    def hidden(self, geometry_features, pose_code):
        """Input ``(S, H)`` of the field's output layer (after the last hidden ReLU)."""
        mlp = self.field.mlp
        if not self.folded:
            z = pose_code.to(geometry_features.dtype).expand(geometry_features.shape[0], -1)
            return mlp[:-1](torch.cat([geometry_features, z], dim=-1))
        first = mlp[0]
        Fd = self.field.feature_dim
        bias = pose_code @ first.weight[:, Fd:].T + first.bias                  # (1, H) per frame
        return mlp[1:-1](geometry_features + bias)

    def forward(self, geometry_features, pose_code, centers, rotations, scales):
        if self.field is None:
            z = torch.zeros_like(geometry_features[:, :1]).expand(-1, self.latent_dim)
            return centers + 0.0, rotations + 0.0, scales + 0.0, z + 0.0
        h = self.hidden(geometry_features, pose_code)
        last = self.field.mlp[-1]
        # output layer in two products: z_g row-major (an output), the 6 geometric values
        # planar (6, S) so that eq. 4-6 below run on contiguous rows
        z = F.linear(h, last.weight[6:], last.bias[6:])                           # (S, L)
        g = last.weight[:6] @ h.T + last.bias[:6, None]                           # (6, S): d, s_u, s_v, r
        d = g[0]
        if self.max_displacement > 0:
            d = self.max_displacement * torch.tanh(d / self.max_displacement)
        mu = centers + rotations[:, :, 2] * d.unsqueeze(-1)                        # eq. 4
        sc = scales * torch.exp(g[1:3].T)                                         # eq. 5
        R = rotate_local(rotations, g[3:6])                                       # eq. 6
        return mu, R, sc, z


class ColorModule(nn.Module):
    """Pose- and view-conditioned colour, eq. 7 (:class:`~fmgs.trainer.models.fields.AppearanceField`).

    Args:
        field: the trained appearance field (first layer on ``[f_c, z_g, Z_p, SH(d_hat)]``).
        folded: the ``appearance_features`` input is ``W_1[:, :F] f_c`` (``(S, H)``,
            :func:`fold_first_layer`); the graph computes ``W_z z_g + W_sh SH(d_hat)`` per surfel,
            adds the per-frame row ``W_p Z_p + b_1`` (with the constant SH band folded into it)
            and runs the remaining layers. Same values as the field.

    Forward: ``appearance_features (S,F)`` or ``(S,H)`` (folded), ``z_g (S,16)``, ``pose_code
    (1,16)`` and, when the field is view dependent, ``view_dirs (S,3)`` canonicalised unit
    directions (``normalize(inv(T[:3,:3]) d)``) -> ``colors (S,3)`` in (0, 1).
    """

    def __init__(self, field: nn.Module, folded: bool = False):
        super().__init__()
        self.field = field
        self.folded = bool(folded)

    def first_layer_columns(self, L: int, P: int) -> tuple[torch.Tensor, int, int]:
        """The first layer's weight ``W`` ``(H, F + L + P + n_sh)`` and where its column blocks
        start: ``(W, Fd, k)`` with ``f_c`` in ``[:Fd]``, ``z_g`` in ``[Fd:Fd+L]``, ``Z_p`` in
        ``[Fd+L:k]`` and the SH bands from ``k`` (eq. 7's input order ``[f_c, z_g, Z_p, SH]``)."""
        W = self.field.mlp[0].weight
        n_sh = (self.field.sh_degree + 1) ** 2 if self.field.sh_degree >= 0 else 0
        Fd = W.shape[1] - L - P - n_sh
        return W, Fd, Fd + L + P

    def forward(self, appearance_features, z_g, pose_code, view_dirs=None):
        f = self.field
        if not self.folded:
            return f(appearance_features, z_g, pose_code, view_dirs)
        first = f.mlp[0]
        L, P = z_g.shape[1], pose_code.shape[1]
        W, Fd, k = self.first_layer_columns(L, P)
        bias = pose_code @ W[:, Fd + L:k].T + first.bias                          # (1, H) per frame
        cols = [z_g]
        rows = [W[:, Fd:Fd + L].T]
        if f.sh_degree >= 0:
            bias = bias + _SH_C0 * W[:, k]                                        # band 0 is a constant
            bands = sh_bands_without_dc(_normalize(view_dirs), f.sh_degree)
            if bands:
                cols += [b.unsqueeze(-1) for b in bands]
                rows.append(W[:, k + 1:].T)
        # one product per frame: [z_g, SH_1.., 1] @ [W_z; W_sh; bias] + W_1 f_c (one Concat, one Gemm)
        cols.append(torch.ones_like(z_g[:, :1]))
        rows.append(bias)
        h = torch.addmm(appearance_features, torch.cat(cols, -1), torch.cat(rows, 0))
        return torch.sigmoid(f.mlp[1:](h))


class SkinningModule(nn.Module):
    """Skinning field, eq. 9 (:class:`~fmgs.trainer.models.fields.SkinningField`), evaluated live.

    Forward: ``points (S,3)`` canonical positions (m) [, ``prior_weights (S,24)`` SMPL weights
    when the field was trained with the ``log(prior)`` offset] -> ``skin_weights (S,24)``.
    """

    def __init__(self, field: nn.Module, with_prior: bool):
        super().__init__()
        self.field = field
        self.with_prior = bool(with_prior)

    def forward(self, points, prior_weights=None):
        # SkinningField.logits + forward, spelled out: its normalize_to_bbox validates the box
        # with a data-dependent Python branch that torch.export cannot trace. Same arithmetic
        # (the export's parity check compares against SkinningField.forward itself).
        sf = self.field
        lo, hi = sf.bbox_min.to(points.dtype), sf.bbox_max.to(points.dtype)
        ext = hi - lo
        lo, hi = lo - sf.padding * ext, hi + sf.padding * ext
        x = (points - lo) / (hi - lo)
        h = hash_encode_gather(sf.grid, x.to(sf.grid.table.dtype))
        if sf.include_xyz:
            h = torch.cat([h, x.clamp(0.0, 1.0).to(h.dtype)], dim=-1)
        logits = sf.mlp(h)
        if self.with_prior:
            logits = logits + torch.log(prior_weights.to(logits.dtype).clamp_min(1e-8))
        return torch.softmax(logits, dim=-1)


def hash_encode_gather(grid: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:class:`~fmgs.trainer.models.hashgrid.HashGrid` encoding of ``x`` as plain Gather + weighted sum.

    ``HashGrid.forward`` sums the 8 corners of each (point, level) with ``embedding_bag``,
    which the ONNX exporter lowers to a Loop over bags whose cost grows quadratically with
    the number of points in ONNX Runtime (measured: 4,096 points 7.7 s). Here the same
    arithmetic -- ``out[n, l*F + f] = sum_k w[l, n, k] table[off_l + idx[l, n, k], f]`` with
    the grid's own corner rows and trilinear weights (``HashGrid._corner_lookup``) -- is a
    single ``Gather`` and a reduction: linear in the number of points.

    Args:
        grid: a trained ``HashGrid`` (table ``(sum_l T_l, F)``).
        x: ``(N, 3)`` points in [0, 1]^3 (clamped inside the grid), table dtype.

    Returns:
        ``(N, L * F)`` features, column ``l * F + f`` (as ``HashGrid.forward``).
    """
    idx, w = grid._corner_lookup(x)                                   # (L, N, 8) each
    glob = (idx + grid._offsets.view(-1, 1, 1)).transpose(0, 1)       # (N, L, 8)
    vals = grid.table[glob]                                            # (N, L, 8, F)
    out = (vals * w.transpose(0, 1).unsqueeze(-1).to(vals.dtype)).sum(2)  # (N, L, F)
    return out.reshape(x.shape[0], -1)


class FoundationColorModule(nn.Module):
    """Colour of the foundation model: ``sigmoid(MLP([f_c, SH_deg(normalize(d_hat))]))``
    (:class:`fmgs.trainer.models.foundation.SurfelAvatar`, the view-dependent part of eq. 7).

    Args:
        mlp: the trained colour MLP (``nn.Sequential``, first layer on ``[f_c, SH]``).
        sh_degree: SH degree of the view encoding, -1 for a view-independent model.
        feature_dim: size of ``f_c``.
        folded: ``appearance_features`` is ``W_1[:, :F] f_c`` (``(S, H)``, :func:`fold_first_layer`);
            the graph adds ``W_sh SH(d_hat) + b_1`` and runs the remaining layers.

    Forward: ``appearance_features (S,F)`` or ``(S,H)`` (folded) [, ``view_dirs (S,3)``
    canonicalised with the TRANSPOSE of the blended rotation: ``normalize(T[:3,:3]^T d)``] ->
    ``colors (S,3)``.
    """

    def __init__(self, mlp: nn.Module, sh_degree: int, feature_dim: int = 32, folded: bool = False):
        super().__init__()
        self.mlp = mlp
        self.sh_degree = int(sh_degree)
        self.feature_dim = int(feature_dim)
        self.folded = bool(folded)

    def forward(self, appearance_features, view_dirs=None):
        if not self.folded:
            x = appearance_features
            if self.sh_degree >= 0:
                x = torch.cat([x, sh_basis(F.normalize(view_dirs, dim=-1), self.sh_degree)], dim=-1)
            return torch.sigmoid(self.mlp(x))
        first = self.mlp[0]
        W, Fd = first.weight, self.feature_dim
        if self.sh_degree < 0:
            return torch.sigmoid(self.mlp[1:](appearance_features + first.bias))
        bias = (first.bias + _SH_C0 * W[:, Fd]).unsqueeze(0)                      # band 0 is a constant
        bands = sh_bands_without_dc(_normalize(view_dirs), self.sh_degree)
        x = torch.stack(bands + [torch.ones_like(bands[0])], -1) if bands else torch.ones_like(view_dirs[:, :1])
        w = torch.cat([W[:, Fd + 1:].T, bias], 0)
        return torch.sigmoid(self.mlp[1:](torch.addmm(appearance_features, x, w)))


# =========================================================================== planar graphs
def _planar_layers(layers, h: torch.Tensor) -> torch.Tensor:
    """Run ``nn.Linear`` / ``nn.ReLU`` layers on planar activations ``(D, S)``: ``W h + b``."""
    for layer in layers:
        if isinstance(layer, nn.Linear):
            h = torch.addmm(layer.bias.unsqueeze(-1), layer.weight, h)
        else:
            h = layer(h)
    return h


class PlanarGeometryModule(GeometryModule):
    """:class:`GeometryModule` (eq. 3-6) on planar tensors: surfels along the last axis.

    Row-major per-surfel tensors make ONNX Runtime interleave narrow columns (concats,
    transposes) and make the runtime transpose every output into its planar LBS buffers.
    Here every per-surfel tensor is ``(C, S)``: the MLP runs as ``W h + b`` products on
    ``(H, S)`` activations, the output layer is one ``(6 + L, S)`` product whose rows are
    sliced, and only the two tangent columns of ``R' = R exp([delta_r]_x)`` (eq. 6) that the
    runtime draws with are computed (the normal is ``t_u x t_v``). Same arithmetic as
    :class:`GeometryModule`; the export's parity check compares it with the trainer.

    Args (as :class:`GeometryModule`):
        field: the trained :class:`~fmgs.trainer.models.fields.GeometryResidualField`, or
            None (field off: identity correction, ``z_g = 0``).
        latent_dim: size of ``z_g``.
        folded: ``geometry_features_planar`` is ``(W_1[:, :F] f_g)^T`` (``(H, S)``,
            :func:`fold_first_layer` transposed) instead of ``f_g^T`` (``(F, S)``).
        max_displacement: the trainer's soft bound of ``delta_d`` (metres; 0 = none).

    Forward: ``geometry_features_planar (H|F, S)``, ``pose_code (1, P)``,
    ``centers_planar (3, S)`` m, ``rotations_planar (3, 3, S)`` (``[i, j, s] = R_s[i, j]``),
    ``scales_planar (2, S)`` m -> ``centers_planar_out (3, S)`` = ``mu'`` (eq. 4),
    ``t_u_planar_out (3, S)``, ``t_v_planar_out (3, S)`` (columns 0 and 1 of ``R'``, eq. 6),
    ``scales_planar_out (2, S)`` = ``s'`` (eq. 5), ``z_g_planar (L, S)``.
    """

    def forward(self, geometry_features, pose_code, centers, rotations, scales):
        R = rotations
        if self.field is None:
            z = torch.zeros_like(geometry_features[:1]).expand(self.latent_dim, -1)
            return centers + 0.0, R[:, 0] + 0.0, R[:, 1] + 0.0, scales + 0.0, z + 0.0
        mlp = self.field.mlp
        first = mlp[0]
        Fd = self.field.feature_dim
        col = first.weight[:, Fd:] @ pose_code.T + first.bias.unsqueeze(-1)          # (H, 1) per frame
        if self.folded:
            h = geometry_features + col
        else:
            h = torch.addmm(col, first.weight[:, :Fd], geometry_features)
        out = _planar_layers(mlp[1:], h)                                            # (6 + L, S)
        d = out[0:1]
        if self.max_displacement > 0:
            d = self.max_displacement * torch.tanh(d / self.max_displacement)
        mu = centers + R[:, 2] * d                                                  # eq. 4
        sc = scales * torch.exp(out[1:3])                                           # eq. 5
        tu, tv = rotate_tangents_planar(R, out[3:6])                                # eq. 6
        return mu, tu, tv, sc, out[6:]


def rotated_columns(R: torch.Tensor, v: torch.Tensor, n: int = 2) -> list[torch.Tensor]:
    """The first ``n`` columns of ``R exp([v]_x)`` (eq. 6) on planar tensors.

    Rodrigues' formula applied to the basis vectors, ``exp([v]_x) e = c e + b (v.e) v + a (v x e)``
    with ``t = |v|``, ``a = sin t / t``, ``b = (1 - cos t) / t^2 = 2 (sin(t/2) / t)^2`` and
    ``c = 1 - b t^2``, then multiplied by ``R`` (columns ``R_0, R_1, R_2``)::

        t_u = c R_0 + b x (R v) + a (z R_1 - y R_2)
        t_v = c R_1 + b y (R v) + a (x R_2 - z R_0)
        n   = c R_2 + b z (R v) + a (y R_0 - x R_1)

    as whole ``(3, S)`` products (about half the graph nodes of an entry-by-entry form). No
    small-angle series is needed (the trainer's :func:`~fmgs.trainer.models.fields.so3_exp` has
    one): ``sin`` of a tiny argument is the argument in float32, so ``a -> 1`` and ``b -> 1/2``,
    and the half-angle form of ``b`` has no ``1 - cos`` cancellation. At ``t = 0`` the divisor is
    1 instead of ``t`` (a ``Where`` on ``t^2 > 0``), giving ``a = b = 0``: every ``a``/``b`` term
    is multiplied by a component of ``v``, so the result is exactly ``R`` there. A tiny additive
    constant instead would round to 0 in an fp16 TensorRT engine and give 0/0 = NaN wherever
    ``v * v`` underflows. Same values as the trainer's map to float32 rounding (the export's
    parity check compares them).

    Args:
        R: ``(3, 3, S)`` frames, ``R[i, j, s] = R_s[i, j]`` (columns ``[t_u, t_v, n]``).
        v: ``(3, S)`` rotation vectors (radians).
        n: how many columns (1 to 3; the planar geometry graph needs ``t_u, t_v`` only).

    Returns:
        ``n`` tensors ``(3, S)``: ``t_u``, ``t_v`` [, ``n``].
    """
    x, y, z = v[0:1], v[1:2], v[2:3]
    t2 = (v * v).sum(0, keepdim=True)
    t = torch.sqrt(t2)
    ts = torch.where(t2 > 0, t, torch.ones_like(t))                 # divisor; t = 0: a = b = 0
    a = torch.sin(t) / ts
    h = torch.sin(0.5 * t) / ts
    b = 2.0 * h * h
    c = 1.0 - b * t2
    R0, R1, R2 = R[:, 0], R[:, 1], R[:, 2]
    Rv = R0 * x + R1 * y + R2 * z
    ax, ay, az = a * x, a * y, a * z
    cols = [c * R0 + (b * x) * Rv + az * R1 - ay * R2,
            c * R1 + (b * y) * Rv + ax * R2 - az * R0,
            c * R2 + (b * z) * Rv + ay * R0 - ax * R1]
    return cols[:n]


def rotate_tangents_planar(R: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_u, t_v)``, each ``(3, S)``: columns 0 and 1 of ``R exp([v]_x)`` (eq. 6) for the
    planar geometry graph (:func:`rotated_columns`; ``R (3, 3, S)``, ``v (3, S)`` radians)."""
    tu, tv = rotated_columns(R, v, 2)
    return tu, tv


class PlanarColorModule(ColorModule):
    """:class:`ColorModule` (eq. 7) on planar tensors.

    The first layer is one product per frame: ``h = W_1 f_c + [W_z, W_sh, b] [z_g; SH(d_hat);
    1]`` with the stacked rows contiguous (``(L + n_sh, S)``; the constant SH band and
    ``W_p Z_p`` live in ``b``), then the remaining layers as ``W h + b``.

    Args:
        field: the trained :class:`~fmgs.trainer.models.fields.AppearanceField`.
        folded: ``appearance_features_planar`` is ``(W_1[:, :F] f_c)^T`` (``(H, S)``) instead
            of ``f_c^T`` (``(F, S)``).

    Forward: ``appearance_features_planar (H|F, S)``, ``z_g_planar (L, S)``, ``pose_code (1, P)``
    [, ``view_dirs_planar (3, S)`` canonicalised directions ``normalize(inv(T[:3,:3]) d)``]
    -> ``colors_planar (3, S)`` in (0, 1).
    """

    def forward(self, appearance_features, z_g, pose_code, view_dirs=None):
        f = self.field
        first = f.mlp[0]
        L, P = z_g.shape[0], pose_code.shape[1]
        W, Fd, k = self.first_layer_columns(L, P)
        bias = W[:, Fd + L:k] @ pose_code.T + first.bias.unsqueeze(-1)            # (H, 1) per frame
        rows, cols = [z_g], [W[:, Fd:Fd + L]]
        if f.sh_degree >= 0:
            bias = bias + _SH_C0 * W[:, k:k + 1]                                  # band 0 is a constant
            n = view_dirs / torch.linalg.vector_norm(view_dirs, dim=0, keepdim=True).clamp_min(1e-12)
            bands = sh_bands_without_dc(n, f.sh_degree, axis=0)
            if bands:
                rows.append(torch.stack(bands, 0))
                cols.append(W[:, k + 1:])
        rows.append(torch.ones_like(z_g[:1]))
        cols.append(bias)
        A = appearance_features if self.folded else W[:, :Fd] @ appearance_features
        h = torch.addmm(A, torch.cat(cols, 1), torch.cat(rows, 0))
        return torch.sigmoid(_planar_layers(f.mlp[1:], h))


class PlanarFoundationColorModule(FoundationColorModule):
    """:class:`FoundationColorModule` on planar tensors (the foundation model's colour MLP).

    Args:
        mlp: the trained colour MLP (first layer on ``[f_c, SH]``).
        sh_degree: SH degree of the view encoding, -1 for a view-independent model.
        feature_dim: size of ``f_c``.
        folded: ``appearance_features_planar`` is ``(W_1[:, :F] f_c)^T`` (``(H, S)``).

    Forward: ``appearance_features_planar (H|F, S)`` [, ``view_dirs_planar (3, S)`` canonicalised
    with the transpose of the blended rotation] -> ``colors_planar (3, S)``.
    """

    def forward(self, appearance_features, view_dirs=None):
        first = self.mlp[0]
        W, Fd = first.weight, self.feature_dim
        A = appearance_features if self.folded else W[:, :Fd] @ appearance_features
        bias = first.bias.unsqueeze(-1)
        if self.sh_degree < 0:
            return torch.sigmoid(_planar_layers(self.mlp[1:], A + bias))
        bias = bias + _SH_C0 * W[:, Fd:Fd + 1]                                    # band 0 is a constant
        n = view_dirs / torch.linalg.vector_norm(view_dirs, dim=0, keepdim=True).clamp_min(1e-12)
        bands = sh_bands_without_dc(n, self.sh_degree, axis=0)
        rows = torch.cat([torch.stack(bands, 0), torch.ones_like(n[:1])], 0) if bands else torch.ones_like(n[:1])
        cols = torch.cat([W[:, Fd + 1:], bias], 1)
        return torch.sigmoid(_planar_layers(self.mlp[1:], torch.addmm(A, cols, rows)))
