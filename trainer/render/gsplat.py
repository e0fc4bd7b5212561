"""gsplat (CUDA) back-end of the surfel rasteriser: an adapter around ``gsplat.rasterization_2dgs``.

gsplat is an optional dependency (not in pyproject): it is imported inside
:func:`rasterize_gsplat` only, and :func:`fmgs.trainer.render.dispatch.resolve_backend`
refuses the back-end without CUDA. Written against the documented API of
gsplat 1.5.x ``rasterization_2dgs(means, quats, scales, opacities, colors, viewmats, Ks,
width, height, near_plane=..., backgrounds=None, render_mode=..., ...)`` which returns
``(render_colors, render_alphas, render_normals, surf_normals, render_distort,
render_median, meta)``.

Conversions to the :class:`~fmgs.trainer.render.dispatch.RenderOutput` conventions:

* rotations (N, 3, 3) with columns [t_u, t_v, n] -> unit quaternions (w, x, y, z);
* scales (N, 2) -> (N, 3) with a third scale of 1: gsplat's CUDA projection ignores the
  third scale (the surfel normal is the third rotation column), and its pure-torch
  reference uses it as the normal's length, so 1 keeps both unit;
* colours and extras go in one pass as channels [rgb, extras] with ``render_mode="RGB+D"``
  (accumulated depth appended last, as gsplat requires; gsplat pads the channel count);
  the background is added here to rgb only (gsplat would add it to every channel);
* ``render_normals`` come back in world space (alpha-weighted, camera-facing, not
  normalised) and are rotated into camera space with the viewmat rotation.

Known differences from the CPU back-end (see tests/test_rasterizer.py::test_gsplat_parity):
gsplat's per-fragment depth is the surfel *centre* depth (not the ray-plane
intersection); alpha is clamped at 0.999 instead of 0.99; ``depth_median`` follows 2DGS
(depth of the last fragment whose transmittance before it is > 0.5, also where the
transmittance never drops below 0.5) instead of 0 there; ``max_fragments`` is ignored.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fmgs.trainer.render.types import RenderOutput


def rotmat_to_quat_wxyz(R: Tensor) -> Tensor:
    """Rotation matrices -> unit quaternions (w, x, y, z), differentiable.

    Args:
        R: (..., 3, 3) proper rotation matrices (columns = rotated axes), float.

    Returns:
        (..., 4) unit quaternions with w >= 0 up to the branch choice; q and -q encode the
        same rotation. Uses the numerically stable branch (largest of w, x, y, z; Shepperd's
        method), so it is accurate for all rotations including 180 degrees.
    """
    m00, m01, m02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    m10, m11, m12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    m20, m21, m22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    tr = m00 + m11 + m22
    # 4 q_k^2 for each component (clamped so the sqrt is defined)
    cands = torch.stack([1 + tr, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22,
                         1 - m00 - m11 + m22], -1)
    best = cands.argmax(-1, keepdim=True)
    s = 2.0 * torch.sqrt(cands.clamp_min(1e-12))           # 4 |q_k|
    # each branch: the large component from the sqrt, the others from off-diagonals
    q_w = torch.stack([s[..., 0] / 4, (m21 - m12) / s[..., 0], (m02 - m20) / s[..., 0],
                       (m10 - m01) / s[..., 0]], -1)
    q_x = torch.stack([(m21 - m12) / s[..., 1], s[..., 1] / 4, (m01 + m10) / s[..., 1],
                       (m02 + m20) / s[..., 1]], -1)
    q_y = torch.stack([(m02 - m20) / s[..., 2], (m01 + m10) / s[..., 2], s[..., 2] / 4,
                       (m12 + m21) / s[..., 2]], -1)
    q_z = torch.stack([(m10 - m01) / s[..., 3], (m02 + m20) / s[..., 3], (m12 + m21) / s[..., 3],
                       s[..., 3] / 4], -1)
    allq = torch.stack([q_w, q_x, q_y, q_z], -2)              # (..., 4 branches, 4)
    q = torch.gather(allq, -2, best[..., None].expand(*best.shape[:-1], 1, 4)).squeeze(-2)
    return q / q.norm(dim=-1, keepdim=True)


def rasterize_gsplat(means: Tensor, rotations: Tensor, scales: Tensor, opacities: Tensor,
                     colors: Tensor, K: Tensor, viewmat: Tensor, width: int, height: int,
                     extras: Tensor | None = None, background: Tensor | None = None,
                     near: float = 0.01):
    """Render with ``gsplat.rasterization_2dgs`` (CUDA, float32) and convert the outputs.

    Arguments as :func:`fmgs.trainer.render.dispatch.rasterize_surfels` (already validated);
    tensors must be on a CUDA device. Inputs are cast to float32 (gsplat's kernels are
    float32 only) and outputs cast back to the input dtype.

    Returns:
        :class:`fmgs.trainer.render.dispatch.RenderOutput` (conventions and known differences in
        the module docstring).

    Raises:
        RuntimeError: gsplat missing, or the inputs are not on a CUDA device.
    """
    try:
        from gsplat import rasterization_2dgs
    except Exception as exc:
        raise RuntimeError(f"the gsplat back-end needs the gsplat package: {exc}") from exc

    if means.device.type != "cuda":
        raise RuntimeError("the gsplat back-end needs CUDA tensors; move the inputs with "
                           ".cuda() or use backend='cpu'")
    dt = means.dtype
    f32 = torch.float32
    dev = means.device
    E = 0 if extras is None else extras.shape[1]
    quats = rotmat_to_quat_wxyz(rotations.to(f32))
    scales3 = torch.cat([scales.to(f32), torch.ones_like(scales[:, :1], dtype=f32)], 1)
    chans = colors.to(f32) if not E else torch.cat([colors.to(f32), extras.to(f32)], 1)
    vm = viewmat.to(device=dev, dtype=f32)
    Kf = K.to(device=dev, dtype=f32)
    out = rasterization_2dgs(
        means.to(f32), quats, scales3, opacities.to(f32), chans, vm[None], Kf[None],
        width, height, near_plane=near, render_mode="RGB+D", backgrounds=None)
    render_colors, render_alphas, render_normals, _surf, _dist, render_median, _meta = out
    rc = render_colors[0]                                    # (H, W, 3 + E + 1)
    alpha = render_alphas[0, ..., 0]
    dacc = rc[..., -1]
    # world-space alpha-weighted normals -> camera space (x right, y down, z forward)
    normal = render_normals[0] @ vm[:3, :3].T
    rgb = rc[..., :3]
    if background is not None:
        rgb = rgb + (1.0 - alpha)[..., None] * background.to(device=dev, dtype=f32)
    return RenderOutput(
        rgb=rgb.to(dt), alpha=alpha.to(dt), depth=(dacc / alpha.clamp_min(1e-6)).to(dt),
        depth_acc=dacc.to(dt), depth_median=render_median[0, ..., 0].to(dt),
        normal=normal.to(dt), extras=rc[..., 3:3 + E].to(dt) if E else None)
