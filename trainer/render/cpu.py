"""CPU (plain PyTorch) back-end of the 2D Gaussian surfel rasteriser.

Design (fragment lists, fully vectorised, no Python loop over surfels or pixels):

1. **Per-surfel preprocessing** (ordinary autograd, O(N)): camera-space centre,
   tangents and normal; the normal is flipped to face the camera; the ray-splat
   intersection is folded into one 3x3 matrix per surfel (the 2DGS homography,
   2DGS paper eq. 9-10 / gsplat ``ray_transforms``, here derived directly from the
   ray-plane intersection) so that for a pixel centre ``x = (x, y, 1)`` (pixel units)

       q = M x,   u = q_0 / q_2,   v = q_1 / q_2,   z = b / q_2,

   where (u, v) are the local surfel coordinates in units of (s_u, s_v) and z is the
   camera-space depth of the ray-plane intersection.
2. **Binning** (no grad): depth sort of the surfels (centre depth, front to back as
   in 2DGS), an exact screen-space bounding box per surfel (projected conic of the
   alpha >= 1/255 cut-off ellipse united with the low-pass filter disc), and the
   enumeration of (surfel, pixel) fragments inside the boxes.
3. **Fragment evaluation and compositing** (:class:`_CompositeFn`, a hand-written
   ``torch.autograd.Function`` with an analytic backward, verified by gradcheck in
   ``tests/test_rasterizer.py``): 2DGS alpha ``min(0.99, o * exp(-min(rho3d, rho2d)/2))``
   (2DGS eq. 11-12 with the screen-space low-pass filter ``rho2d = 2 |pix - proj(p)|^2``),
   fragments below 1/255 dropped, stable grouping by pixel in depth order, front-to-back
   alpha blending with the 2DGS early stop (transmittance < 1e-4), median depth.
   Speed notes (2 CPU cores): alpha is first evaluated on all box fragments with
   gathers from the small per-surfel tables only, the survivors are sorted by pixel
   (int32 keys) and re-evaluated (cheaper than gathering a dozen big arrays through a
   random permutation); feature sums and their gradients are sparse-CSR products
   (pixels x surfels weight matrix) so no (fragments x channels) array is ever built.

Only :func:`rasterize_cpu` is meant to be called from outside (through
:func:`fmgs.trainer.render.dispatch.rasterize_surfels`).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from fmgs.trainer.render.types import RenderOutput

ALPHA_MAX = 0.99          # 2DGS clamp of the per-fragment alpha
ALPHA_MIN = 1.0 / 255.0   # fragments below this are skipped (2DGS / 3DGS)
T_STOP = 1e-4             # early-stop transmittance (2DGS)
T_MEDIAN = 0.5            # median-depth transmittance threshold
FILTER_INV_SQUARE = 2.0   # rho2d = 2 |d|^2 (2DGS low-pass filter, pixel units)
EDGE_EPS = 1e-7           # q_2 below this: ray (almost) parallel to the surfel plane

LAST_COUNTS: dict[str, int] = {}
"""Fragment counts of the last forward (box fragments, alpha >= 1/255, used after the
early stop); for benchmarks and debugging only."""

__all__ = ["rasterize_cpu", "surfel_camera_terms", "ALPHA_MAX", "ALPHA_MIN", "T_STOP"]


# ---------------------------------------------------------------------------------------
# 1. per-surfel preprocessing (autograd)
# ---------------------------------------------------------------------------------------
def surfel_camera_terms(means: Tensor, rotations: Tensor, scales: Tensor, K: Tensor,
                        viewmat: Tensor) -> dict[str, Tensor]:
    """Camera-space quantities of each surfel needed by the rasteriser (differentiable).

    Args:
        means: (N, 3) float, world-space centres p (metres).
        rotations: (N, 3, 3) float, world-frame columns [t_u, t_v, n].
        scales: (N, 2) float, (s_u, s_v) in metres, > 0.
        K: (3, 3) pixel intrinsics (OpenCV; last row (0, 0, 1)).
        viewmat: (4, 4) world->camera extrinsics (OpenCV axes: x right, y down, z forward).

    Returns:
        dict with
        ``p`` (N, 3) camera-space centres;
        ``normal`` (N, 3) unit camera-space normals flipped to face the camera
        (``normal . p <= 0``);
        ``M`` (N, 3, 3) ray-splat matrix: for a pixel centre x = (x, y, 1) (pixel units)
        ``q = M x`` gives u = q0/q2, v = q1/q2 (local coordinates in units of the scales)
        and intersection depth z = b/q2; q2 > 0 for rays hitting the plane in front
        of the camera;
        ``b`` (N,) = m . p with m = -normal (distance of the plane from the camera
        centre, >= 0);
        ``mean2d`` (N, 2) projected centre in pixels (K p / p_z);
        ``zc`` (N,) centre depth p_z.

    Derivation: with d = K^-1 x, the ray hits the plane m.(X - p) = 0 at X = d b/(m.d);
    u = t_u.(X - p)/s_u = ((b t_u - (t_u.p) m)/s_u) . d / (m.d); fold K^-1 in on the right.
    """
    R = viewmat[:3, :3]
    t = viewmat[:3, 3]
    p = means @ R.T + t
    rc = torch.matmul(R, rotations)            # (N, 3, 3) camera-frame columns
    tu, tv, n = rc[..., 0], rc[..., 1], rc[..., 2]
    with torch.no_grad():
        flip = torch.where((n * p).sum(-1) > 0, -1.0, 1.0).to(p.dtype)
    normal = n * flip[:, None]                  # faces the camera
    m = -normal                                 # points away from the camera
    b = (m * p).sum(-1)
    su = scales[:, 0:1]
    sv = scales[:, 1:2]
    U = (b[:, None] * tu - (tu * p).sum(-1, keepdim=True) * m) / su
    V = (b[:, None] * tv - (tv * p).sum(-1, keepdim=True) * m) / sv
    Kinv = torch.linalg.inv(K)
    M = torch.stack([U, V, m], dim=1) @ Kinv    # (N, 3, 3)
    ph = p @ K.T
    mean2d = ph[:, :2] / ph[:, 2:3]
    return {"p": p, "normal": normal, "M": M, "b": b, "mean2d": mean2d, "zc": p[:, 2],
            "tu": tu, "tv": tv}


# ---------------------------------------------------------------------------------------
# 2. binning (no grad)
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def _surfel_boxes(p: Tensor, tu: Tensor, tv: Tensor, scales: Tensor, mean2d: Tensor,
                  opac: Tensor, K: Tensor, width: int, height: int):
    """Conservative pixel boxes of the alpha >= 1/255 support of every surfel.

    The support is {rho3d <= r^2} U {rho2d <= r^2} with r^2 = 2 ln(255 o). The first
    set is an ellipse in the surfel plane whose image is a conic; its axis-aligned
    bounding box follows from the dual conic C* = H diag(r^2, r^2, -1) H^T with
    H = K [s_u t_u, s_v t_v, p] (tangent lines x = c satisfy C*00 - 2c C*02 + c^2 C*22 = 0).
    The second set is a disc of radius r / sqrt(2) pixels around the projected centre.
    Surfels whose ellipse crosses the camera plane get the whole image.

    Returns (x0, y0, bw, bh) int64 (N,) tensors: first pixel column/row and box size
    (0 where the surfel has no pixel).
    """
    dt = torch.float64
    p = p.to(dt); tu = tu.to(dt); tv = tv.to(dt); s = scales.to(dt); K = K.to(dt)
    o = opac.to(dt).clamp_min(1e-30)
    r2 = (2.0 * torch.log(255.0 * o)).clamp_min(0.0) * (1.0 + 1e-6) + 1e-9
    H = torch.stack([tu * s[:, 0:1], tv * s[:, 1:2], p], dim=-1)     # (N, 3, 3) columns
    H = torch.matmul(K, H)
    A = H[:, :, 0:2]                                                # (N, 3, 2)
    c = H[:, :, 2]                                                   # (N, 3)

    def dual(i, j):
        return r2 * (A[:, i] * A[:, j]).sum(-1) - c[:, i] * c[:, j]

    c22 = dual(2, 2)
    ok = c22 < -1e-12 * (c[:, 2] ** 2)
    c22s = torch.where(ok, c22, torch.full_like(c22, -1.0))
    cx = dual(0, 2) / c22s
    cy = dual(1, 2) / c22s
    ex = (cx * cx - dual(0, 0) / c22s).clamp_min(0.0).sqrt()
    ey = (cy * cy - dual(1, 1) / c22s).clamp_min(0.0).sqrt()
    rf = (r2 / FILTER_INV_SQUARE).sqrt()
    m2 = mean2d.to(dt)
    margin = 1e-3
    lox = torch.minimum(cx - ex, m2[:, 0] - rf) - margin
    hix = torch.maximum(cx + ex, m2[:, 0] + rf) + margin
    loy = torch.minimum(cy - ey, m2[:, 1] - rf) - margin
    hiy = torch.maximum(cy + ey, m2[:, 1] + rf) + margin
    big = float(max(width, height) * 4 + 16)
    lox = torch.where(ok, lox, torch.full_like(lox, -big)).clamp(-big, big)
    hix = torch.where(ok, hix, torch.full_like(hix, big)).clamp(-big, big)
    loy = torch.where(ok, loy, torch.full_like(loy, -big)).clamp(-big, big)
    hiy = torch.where(ok, hiy, torch.full_like(hiy, big)).clamp(-big, big)
    # pixel centre j + 0.5 inside [lo, hi]
    x0 = torch.ceil(lox - 0.5).clamp_min(0).long()
    x1 = torch.floor(hix - 0.5).clamp_max(width - 1).long()
    y0 = torch.ceil(loy - 0.5).clamp_min(0).long()
    y1 = torch.floor(hiy - 0.5).clamp_max(height - 1).long()
    bw = (x1 - x0 + 1).clamp_min(0)
    bh = (y1 - y0 + 1).clamp_min(0)
    none = (r2 <= 1e-9) | (opac < ALPHA_MIN)
    bw = torch.where(none, torch.zeros_like(bw), bw)
    return x0, y0, bw, bh


@torch.no_grad()
def _enumerate_fragments(x0: Tensor, y0: Tensor, bw: Tensor, bh: Tensor,
                         width: int) -> tuple[Tensor, Tensor]:
    """(surfel slot, pixel id) of every pixel in every box, slot-major, row-major per box.

    Args: int64 (Nv,) boxes (first column / row, width, height), all non-empty.
    Returns two int64 (F0,) tensors: the slot (index into the box arrays) and the pixel
    id row * width + col. Within a slot the pixel ids are increasing.
    """
    cnt = bw * bh
    total = int(cnt.sum())
    dev = bw.device
    if total == 0:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return e, e
    slot = torch.repeat_interleave(torch.arange(cnt.numel(), device=dev), cnt, output_size=total)
    start = torch.cumsum(cnt, 0) - cnt
    local = torch.arange(total, device=dev) - start.index_select(0, slot)
    w_f = bw.index_select(0, slot)
    row = torch.div(local, w_f, rounding_mode="floor")
    col = local - row * w_f
    base = y0 * width + x0
    pix = base.index_select(0, slot) + row * width + col
    return slot, pix


# ---------------------------------------------------------------------------------------
# 3. fragment evaluation + compositing (custom autograd)
# ---------------------------------------------------------------------------------------
# rows of the per-surfel parameter table P (R, Nv) handed to _CompositeFn
# rows 0-8: ray-splat matrix M, row-major
_ROW_B, _ROW_MX, _ROW_MY, _ROW_ZC, _ROW_O = 9, 10, 11, 12, 13
_N_ROWS = 14


def _eval_fragments(P: Tensor, sid: Tensor, x: Tensor, y: Tensor):
    """Per-fragment 2DGS quantities (plain tensor math, no autograd).

    Args:
        P: (14, Nv) per-surfel table (rows: M00..M22, b, mean2d x, mean2d y, zc, opacity).
        sid: (F,) int64 surfel slots; x, y: (F,) pixel-centre coordinates.

    Returns: qu, qv, inv = 1/qw (1 where the ray misses the plane), rho, use3 (bool:
    3D term used), G = exp(-rho/2), ar = o G (unclamped alpha), dx, dy (pixel offsets
    from the projected centre).
    """
    g = [P[r].index_select(0, sid) for r in range(9)]
    qu = torch.addcmul(torch.addcmul(g[2], g[0], x), g[1], y)
    qv = torch.addcmul(torch.addcmul(g[5], g[3], x), g[4], y)
    qw = torch.addcmul(torch.addcmul(g[8], g[6], x), g[7], y)
    del g
    valid = qw > EDGE_EPS
    inv = torch.where(valid, qw, torch.ones_like(qw)).reciprocal_()
    rho3 = (qu * qu).addcmul_(qv, qv).mul_(inv).mul_(inv)
    rho3 = torch.where(valid, rho3, torch.full_like(rho3, math.inf))
    dx = x - P[_ROW_MX].index_select(0, sid)
    dy = y - P[_ROW_MY].index_select(0, sid)
    rho2 = (dx * dx).addcmul_(dy, dy).mul_(FILTER_INV_SQUARE)
    use3 = rho3 <= rho2
    rho = torch.where(use3, rho3, rho2)
    G = torch.exp(rho * -0.5)
    ar = P[_ROW_O].index_select(0, sid) * G
    return qu, qv, inv, rho, use3, G, ar, dx, dy


def _csr(crow: Tensor, col: Tensor, val: Tensor, shape) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, val, shape, check_invariants=False)


class _CompositeFn(torch.autograd.Function):
    """Fragment evaluation + front-to-back compositing with an analytic backward.

    forward(P (14, Nv), feats (Nv, C), sid (F0,) int64, pix (F0,) int64, n_pix, width,
            max_fragments, splits)
      -> feat chunks (n_pix, C_k) for the column widths ``splits`` (sum = C) of
         sum_i w_i f_i, then alpha (n_pix,) = sum_i w_i,
         depth_acc (n_pix,) = sum_i w_i z_i, median (n_pix,).

    The feature channels come back as separate outputs (e.g. colour / normal / extras)
    so that a loss that reads only some of them gives None gradients for the others:
    the backward then skips those columns instead of autograd materialising a dense
    zero gradient for the whole feature image per slice.

    Surfel slots must be numbered in front-to-back (centre depth) order and the box
    fragments (sid, pix) listed slot-major with increasing pixel ids per slot (as
    :func:`_enumerate_fragments` makes them); then every pixel's fragments, grouped by
    a stable sort, are in depth order with increasing slots, i.e. a canonical CSR
    matrix (pixels x surfels) of blending weights, used for the feature sums
    (sparse @ dense) and their gradients (sampled dense-dense products).

    Backward (per pixel, L = sum_i w_i c_i with c_i = dL/dw_i):
        dL/dalpha_k = T_k c_k - (sum_{i>k} w_i c_i) / (1 - alpha_k),
    then chain rule through alpha = o exp(-rho/2), rho3d = (qu^2 + qv^2)/qw^2,
    rho2d = 2 |pix - mean2d|^2, z = b/qw (3D term) or zc (2D term). The fragment
    selection (1/255 cut, early stop, median choice, 3D/2D choice, 0.99 clamp) is
    treated as fixed, as in 2DGS / gsplat.
    """

    @staticmethod
    def forward(ctx, P, feats, sid, pix, n_pix, width, max_fragments, splits, weight_free=()):
        dt = P.dtype
        dev = P.device
        Nv = P.shape[1]
        C = feats.shape[1]
        F0 = pix.numel()
        # pass 1 over all box fragments: alpha only (slot-major, cache-friendly gathers)
        x = (pix % width).to(dt).add_(0.5)
        y = torch.div(pix, width, rounding_mode="floor").to(dt).add_(0.5)
        ar = _eval_fragments(P, sid, x, y)[6]
        del x, y
        idx = (ar >= ALPHA_MIN).nonzero().squeeze(1)
        # group by pixel, keeping the depth order (stable sort; keys fit in int32)
        pix32, perm = torch.sort(pix.index_select(0, idx).to(torch.int32), stable=True)
        idx = idx.index_select(0, perm)
        pix = pix32.long()
        del pix32, perm
        if max_fragments is not None and idx.numel() > 0:
            cnt = torch.bincount(pix, minlength=n_pix)
            start = torch.cumsum(cnt, 0) - cnt
            rank = torch.arange(idx.numel(), device=dev) - start.index_select(0, pix)
            sel = (rank < int(max_fragments)).nonzero().squeeze(1)
            idx = idx.index_select(0, sel)
            pix = pix.index_select(0, sel)
        alpha = torch.gather(ar, 0, idx).clamp_max_(ALPHA_MAX)
        del ar
        # transmittance per pixel segment via a float64 cumulative log
        lg = torch.log1p(-alpha.double())
        cs = torch.cumsum(lg, 0)
        cnt = torch.bincount(pix, minlength=n_pix)
        start = torch.cumsum(cnt, 0) - cnt
        log_after = cs - (cs - lg).index_select(0, start.index_select(0, pix))
        # 2DGS early stop: a fragment contributes only while T after it stays >= 1e-4
        # (monotone per pixel, so the included set is a prefix of each pixel's list)
        k = (log_after >= math.log(T_STOP)).nonzero().squeeze(1)
        LAST_COUNTS.update(box=F0, alpha_ok=int(lg.numel()), used=int(k.numel()))
        idx = idx.index_select(0, k)
        pix = pix.index_select(0, k)
        log_after = log_after.index_select(0, k)
        T = torch.exp(log_after - lg.index_select(0, k)).to(dt)
        alpha = alpha.index_select(0, k)
        del lg, cs, k, start
        # pass 2 over the used fragments: recompute from the small per-surfel tables
        sid = torch.gather(sid, 0, idx)
        x = (pix % width).to(dt).add_(0.5)
        y = torch.div(pix, width, rounding_mode="floor").to(dt).add_(0.5)
        qu, qv, inv, rho, use3, G, ar, dx, dy = _eval_fragments(P, sid, x, y)
        clamped = ar > ALPHA_MAX
        del ar
        w = alpha * T
        z = torch.where(use3, P[_ROW_B].index_select(0, sid) * inv,
                        P[_ROW_ZC].index_select(0, sid))
        cnt = torch.bincount(pix, minlength=n_pix)
        crow = torch.zeros(n_pix + 1, dtype=torch.long, device=dev)
        torch.cumsum(cnt, 0, out=crow[1:])
        if C and pix.numel():
            out_feat = (_csr(crow, sid, w, (n_pix, Nv)) @ feats).contiguous()
        else:
            out_feat = torch.zeros(n_pix, C, dtype=dt, device=dev)
        out_alpha = torch.zeros(n_pix, dtype=dt, device=dev).scatter_add_(0, pix, w)
        out_dacc = torch.zeros(n_pix, dtype=dt, device=dev).scatter_add_(0, pix, w * z)
        # median: first used fragment of its pixel with T after it < 0.5
        below = log_after < math.log(T_MEDIAN)
        first = torch.arange(pix.numel(), device=dev) == crow[:-1].index_select(0, pix)
        prev_below = torch.zeros_like(below)
        prev_below[1:] = below[:-1]
        msel = (below & (first | ~prev_below)).nonzero().squeeze(1)
        out_med = torch.zeros(n_pix, dtype=dt, device=dev)
        out_med.index_copy_(0, pix.index_select(0, msel), z.index_select(0, msel))
        ctx.save_for_backward(P, feats, sid, pix, idx, x, y, qu, qv, inv, rho, use3, G,
                              clamped, alpha, T, w, z, dx, dy, msel, crow)
        ctx.sizes = (n_pix, F0)
        ctx.set_materialize_grads(False)   # unused outputs -> None gradients (skipped below)
        ctx.splits = tuple(int(k) for k in splits)
        ctx.weight_free = frozenset(int(k) for k in weight_free)
        chunks = tuple(c.contiguous() for c in torch.split(out_feat, ctx.splits, dim=1))
        return (*chunks, out_alpha, out_dacc, out_med)

    @staticmethod
    def backward(ctx, *grads):
        g_chunks, (g_alpha, g_dacc, g_med) = grads[:-3], grads[-3:]
        (P, feats, sid, pix, idx, x, y, qu, qv, inv, rho, use3, G, clamped, alpha, T, w, z,
         dx, dy, msel, crow) = ctx.saved_tensors
        n_pix, F0 = ctx.sizes
        Nv = P.shape[1]
        dt = P.dtype
        dev = P.device
        C = feats.shape[1]
        nf = sid.numel()
        nones = (None,) * 6
        if not ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]:
            return (None, None, *nones, None)
        g_P = torch.zeros(_N_ROWS, Nv, dtype=dt, device=dev)
        g_feats = torch.zeros(Nv, C, dtype=dt, device=dev) if ctx.needs_input_grad[1] else None
        if nf == 0:
            return (g_P, g_feats, *nones, None)
        # only the feature columns whose chunk received a gradient take part
        bounds = torch.tensor((0,) + ctx.splits).cumsum(0).tolist()
        cols = [(bounds[k], bounds[k + 1], g) for k, g in enumerate(g_chunks) if g is not None]
        # chunks in ctx.weight_free reach their feature columns only (the weights w_i are
        # constants for them), so they take no part in c_i = dL/dw_i
        wcols = [(bounds[k], bounds[k + 1], g) for k, g in enumerate(g_chunks)
                 if g is not None and k not in ctx.weight_free]

        def column_index(parts):
            """Feature columns of the chunks in ``parts`` (None when that is every column)."""
            if len(parts) == len(g_chunks):
                return None
            return torch.cat([torch.arange(a, b, device=dev) for a, b, _ in parts])

        g_feat = g_wfeat = None
        if cols:
            g_feat = torch.cat([g for _, _, g in cols], 1)
            col_idx = column_index(cols)
        if wcols:
            g_wfeat = torch.cat([g for _, _, g in wcols], 1)
            w_idx = column_index(wcols)
            feats_w = feats if w_idx is None else feats.index_select(1, w_idx)
        # c_i = dL/dw_i over all channels (features, alpha, depth_acc)
        c = torch.zeros(nf, dtype=dt, device=dev)
        g_z = torch.zeros(nf, dtype=dt, device=dev)
        if g_alpha is not None:
            c += g_alpha.index_select(0, pix)
        if g_dacc is not None:
            gd = g_dacc.index_select(0, pix)
            c.addcmul_(gd, z)
            g_z.addcmul_(gd, w)
        if g_med is not None and msel.numel():
            g_z.index_add_(0, msel, g_med.index_select(0, pix.index_select(0, msel)))
        if g_wfeat is not None and C:
            pattern = _csr(crow, sid, torch.zeros_like(w), (n_pix, Nv))
            c += torch.sparse.sampled_addmm(pattern, g_wfeat.contiguous(), feats_w.t().contiguous(),
                                            beta=0.0).values()
        if g_feat is not None and C:
            g_feat = g_feat.contiguous()
            if g_feats is not None:
                # surfel-major order of the used fragments = their order in the box list
                pos = torch.full((F0,), -1, dtype=torch.long, device=dev)
                pos.index_copy_(0, idx, torch.arange(nf, device=dev))
                perm_s = pos[pos >= 0]
                scnt = torch.bincount(sid, minlength=Nv)
                srow = torch.zeros(Nv + 1, dtype=torch.long, device=dev)
                torch.cumsum(scnt, 0, out=srow[1:])
                At = _csr(srow, pix.index_select(0, perm_s), w.index_select(0, perm_s),
                          (Nv, n_pix))
                if col_idx is None:
                    g_feats = (At @ g_feat).contiguous()
                else:
                    g_feats.index_copy_(1, col_idx, At @ g_feat)
        if g_alpha is None and g_dacc is None and g_med is None and g_wfeat is None:
            return (g_P, g_feats, *nones, None)     # only weight-free channels: no geometry term
        # dL/dalpha_k = T_k c_k - S_k / (1 - alpha_k),  S_k = sum_{i>k, same pixel} w_i c_i
        cs = torch.cumsum((w * c).double(), 0)
        tot = cs.index_select(0, (crow[1:] - 1).clamp_min(0))
        S = (tot.index_select(0, pix) - cs).to(dt)
        g_a = (T * c).sub_(S.div_(1.0 - alpha))
        g_a.masked_fill_(clamped, 0.0)
        g_P[_ROW_O].scatter_add_(0, sid, g_a * G)
        g_rho = (g_a * G).mul_(P[_ROW_O].index_select(0, sid)).mul_(-0.5)
        # 3D term: rho = (qu^2 + qv^2) inv^2, z = b inv  (inv = 1/qw)
        z3 = torch.where(use3, g_z, torch.zeros_like(g_z))
        r3 = torch.where(use3, g_rho, torch.zeros_like(g_rho))
        inv2 = inv * inv
        g_qu = (2.0 * r3).mul_(qu).mul_(inv2)
        g_qv = (2.0 * r3).mul_(qv).mul_(inv2)
        g_qw = (-2.0 * r3).mul_(rho).sub_(z3 * z).mul_(inv)
        for r, gq in ((0, g_qu), (3, g_qv), (6, g_qw)):
            g_P[r].scatter_add_(0, sid, gq * x)
            g_P[r + 1].scatter_add_(0, sid, gq * y)
            g_P[r + 2].scatter_add_(0, sid, gq)
        g_P[_ROW_B].scatter_add_(0, sid, z3 * inv)
        # 2D term: rho = 2 |pix - mean2d|^2, z = zc
        r2 = (g_rho - r3).mul_(-2.0 * FILTER_INV_SQUARE)
        g_P[_ROW_MX].scatter_add_(0, sid, r2 * dx)
        g_P[_ROW_MY].scatter_add_(0, sid, r2 * dy)
        g_P[_ROW_ZC].scatter_add_(0, sid, g_z - z3)
        return (g_P, g_feats, *nones, None)


# ---------------------------------------------------------------------------------------
# public entry point of this back-end
# ---------------------------------------------------------------------------------------
def rasterize_cpu(means: Tensor, rotations: Tensor, scales: Tensor, opacities: Tensor,
                  colors: Tensor, K: Tensor, viewmat: Tensor, width: int, height: int,
                  extras: Tensor | None = None, background: Tensor | None = None,
                  near: float = 0.01, max_fragments: int | None = None,
                  extras_weights_only: bool = False):
    """Render 2D Gaussian surfels with the plain-PyTorch back-end.

    Arguments and result as :func:`fmgs.trainer.render.dispatch.rasterize_surfels` (which
    validates them); written for CPU (any torch device with sparse CSR support works).
    All float inputs must share one dtype (float32 or float64); the result has that
    dtype. Peak memory is O(F) with F the number of (surfel, pixel) box fragments
    (~2M for 55k 5-mm surfels at 512^2: ~1 GB).

    Returns:
        :class:`fmgs.trainer.render.dispatch.RenderOutput`.
    """

    dt = means.dtype
    E = 0 if extras is None else extras.shape[1]
    n_pix = width * height
    terms = surfel_camera_terms(means, rotations, scales, K, viewmat)
    with torch.no_grad():
        zc = terms["zc"].detach()
        x0, y0, bw, bh = _surfel_boxes(terms["p"].detach(), terms["tu"].detach(),
                                       terms["tv"].detach(), scales.detach(),
                                       terms["mean2d"].detach(), opacities.detach(),
                                       K.detach(), width, height)
        vis = (zc >= near) & (opacities.detach() >= ALPHA_MIN) & (bw * bh > 0)
        zkey = torch.where(vis, zc, torch.full_like(zc, math.inf))
        order = torch.argsort(zkey, stable=True)[: int(vis.sum())]   # front to back
        sid, pix = _enumerate_fragments(x0[order], y0[order], bw[order], bh[order], width)
    feats = [colors, terms["normal"]] + ([extras] if E else [])
    feats = torch.cat(feats, 1).index_select(0, order)
    P = torch.cat([terms["M"].reshape(-1, 9), terms["b"][:, None], terms["mean2d"],
                   terms["zc"][:, None], opacities[:, None]], 1).index_select(0, order)
    P = P.t().contiguous()                                             # (14, Nv)
    splits = (3, 3) + ((E,) if E else ())
    *chunks, out_alpha, out_dacc, out_med = _CompositeFn.apply(
        P, feats, sid, pix, n_pix, width, max_fragments, splits, (2,) if extras_weights_only and E else ())
    alpha = out_alpha.reshape(height, width)
    dacc = out_dacc.reshape(height, width)
    rgb = chunks[0].reshape(height, width, 3)
    if background is not None:
        rgb = rgb + (1.0 - alpha)[..., None] * background.to(dt)
    return RenderOutput(
        rgb=rgb, alpha=alpha, depth=dacc / alpha.clamp_min(1e-6), depth_acc=dacc,
        depth_median=out_med.reshape(height, width), normal=chunks[1].reshape(height, width, 3),
        extras=chunks[2].reshape(height, width, E) if E else None)
