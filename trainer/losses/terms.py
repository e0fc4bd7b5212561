"""Training losses of FMGS-Avatar (PyTorch, differentiable).

Implemented so far: the photometric loss (paper eq. 13: ``(1 - 0.2) L1 + 0.2 D-SSIM``,
with D-SSIM = 1 - SSIM as in 3DGS) and the mask loss (eq. 14, binary cross-entropy
of the rendered opacity against the foreground mask). The depth, normal, semantic
and regularisation losses (eq. 15-21) go in this module as well.

Image layout: ``(H, W, C)`` (one image, channels last) or ``(B, C, H, W)``; values
in [0, 1]; any floating dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "l1_loss",
    "gaussian_window",
    "ssim_map",
    "ssim",
    "dssim_loss",
    "photometric_loss",
    "mask_bce_loss",
]

SSIM_C1 = 0.01**2  # (K1 * data_range)^2 with data_range 1
SSIM_C2 = 0.03**2  # (K2 * data_range)^2


def l1_loss(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error.

    Args:
        pred, gt: tensors of the same shape (e.g. ``(H, W, 3)`` images in [0, 1]).
        mask: optional weights / boolean mask broadcastable to ``pred``; the loss is
            then ``sum(mask * |pred - gt|) / sum(broadcast mask)`` (0 if the mask is empty).

    Returns:
        Scalar tensor.
    """
    diff = (pred - gt).abs()
    if mask is None:
        return diff.mean()
    m = mask.to(diff.dtype).expand_as(diff)
    return (diff * m).sum() / m.sum().clamp_min(1e-12)


def gaussian_window(window_size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``window_size`` taps centred on the middle one, shape ``(window_size,)``."""
    coords = torch.arange(window_size, dtype=torch.float64) - (window_size // 2)
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def _to_bchw(img: torch.Tensor) -> torch.Tensor:
    if img.dim() == 3:
        return img.permute(2, 0, 1).unsqueeze(0)
    if img.dim() == 4:
        return img
    raise ValueError(f"expected an (H, W, C) or (B, C, H, W) image, got shape {tuple(img.shape)}")


def ssim_map(img1: torch.Tensor, img2: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM map with a Gaussian window (the 3DGS training SSIM).

    Local statistics are Gaussian-weighted (normalised separable window, ``window_size``
    taps, std ``sigma`` pixels) with zero padding of ``window_size // 2`` at the
    borders (as 3DGS's ``conv2d`` implementation); ``C1 = 0.01^2``, ``C2 = 0.03^2``
    for data range 1; population (biased) variances. In the interior (more than
    ``window_size // 2`` pixels from the border) this equals scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)``; scikit-image reflects at the border.

    Args:
        img1, img2: ``(H, W, C)`` or ``(B, C, H, W)`` images in [0, 1], same shape.

    Returns:
        ``(B, C, H, W)`` SSIM map (``B = 1`` for ``(H, W, C)`` inputs).
    """
    if img1.shape != img2.shape:
        raise ValueError(f"image shapes differ: {tuple(img1.shape)} vs {tuple(img2.shape)}")
    x, y = _to_bchw(img1), _to_bchw(img2)
    C = x.shape[1]
    g = gaussian_window(window_size, sigma, dtype=x.dtype, device=x.device)
    pad = window_size // 2
    # The 2-D window is the outer product g g^T and zero padding is separable, so two 1-D
    # passes give exactly the 2-D convolution; all five statistics go through one call.
    stats = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    n = stats.shape[1]
    wh = g.view(1, 1, 1, -1).expand(n, 1, 1, window_size).contiguous()
    wv = g.view(1, 1, -1, 1).expand(n, 1, window_size, 1).contiguous()
    filt = F.conv2d(F.conv2d(stats, wh, padding=(0, pad), groups=n), wv, padding=(pad, 0), groups=n)
    mu_x, mu_y, e_xx, e_yy, e_xy = filt.split(C, dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = e_xx - mu_xx
    var_y = e_yy - mu_yy
    cov = e_xy - mu_xy
    num = (2 * mu_xy + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_xx + mu_yy + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return num / den


def ssim(img1: torch.Tensor, img2: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM over all pixels, channels and images (3DGS convention); see :func:`ssim_map`.

    Returns:
        Scalar tensor (1 for identical images).
    """
    return ssim_map(img1, img2, window_size, sigma).mean()


def dssim_loss(img1: torch.Tensor, img2: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """D-SSIM = 1 - SSIM (3DGS's definition, used by FMGS-Avatar eq. 13). Scalar tensor."""
    return 1.0 - ssim(img1, img2, window_size, sigma)


def photometric_loss(pred: torch.Tensor, gt: torch.Tensor, lambda_ssim: float = 0.2) -> torch.Tensor:
    """FMGS-Avatar eq. 13: ``(1 - lambda) * L1 + lambda * (1 - SSIM)``, lambda = 0.2.

    Args:
        pred, gt: ``(H, W, 3)`` or ``(B, 3, H, W)`` images in [0, 1].
        lambda_ssim: weight of the D-SSIM term.

    Returns:
        Scalar tensor.
    """
    return (1.0 - lambda_ssim) * l1_loss(pred, gt) + lambda_ssim * dssim_loss(pred, gt)


def mask_bce_loss(alpha: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """FMGS-Avatar eq. 14: binary cross-entropy of rendered opacity against the mask.

    ``-mean(m * log(a) + (1 - m) * log(1 - a))`` with ``a = clamp(alpha, eps, 1 - eps)``
    so that saturated opacities give finite values (their gradient is then zero).

    Args:
        alpha: ``(...)`` rendered accumulated opacity in [0, 1].
        mask: ``(...)`` foreground mask (bool or float in [0, 1]), same shape.
        eps: clamp margin.

    Returns:
        Scalar tensor (nats per pixel).
    """
    if alpha.shape != mask.shape:
        raise ValueError(f"alpha {tuple(alpha.shape)} and mask {tuple(mask.shape)} shapes differ")
    a = alpha.clamp(eps, 1.0 - eps)
    m = mask.to(a.dtype)
    return -(m * torch.log(a) + (1.0 - m) * torch.log1p(-a)).mean()


# =========================================================================== eq. 15-20 and regularisers
__all__ += [
    "depth_ranking_loss",
    "normal_from_depth",
    "normal_consistency_loss",
    "normal_prior_loss",
    "normal_tv_loss",
    "semantic_ce_loss",
    "semantic_feature_consistency",
    "isometry_loss",
    "knn_neighbour_pairs",
]


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool view of a mask: bool as is, numbers ``> 0.5``."""
    return mask if mask.dtype == torch.bool else mask > 0.5


def _zero_like_graph(t: torch.Tensor) -> torch.Tensor:
    """A scalar 0 still connected to ``t``'s graph (so ``backward()`` works on empty losses)."""
    return t.sum() * 0.0


def depth_ranking_loss(
    depth: torch.Tensor,
    prior_depth: torch.Tensor,
    mask: torch.Tensor,
    num_pairs: int,
    alpha: float = 10.0,
    generator: torch.Generator | None = None,
    pairs: torch.Tensor | None = None,
) -> torch.Tensor:
    """FMGS-Avatar eq. 15-16: ordinal depth-ranking loss against a relative depth prior.

    For pixel pairs ``(x1, x2)``:
    ``I_ord = +1 if D_prior(x1) > D_prior(x2), -1 if D_prior(x1) < D_prior(x2)`` (eq. 15;
    larger prior depth = farther, the Sapiens convention) and
    ``L_d = mean_pairs | tanh(alpha (D(x1) - D(x2))) - I_ord |`` (eq. 16, the L1 norm
    averaged over the pairs). Pairs with equal (or non-finite) prior depths, including
    ``x1 == x2``, have no ordinal label and are skipped. Only the rendered depth is
    differentiated; the prior's scale and shift never matter.

    Args:
        depth: ``(H, W)`` rendered camera-space depth, metres (larger = farther).
        prior_depth: ``(H, W)`` relative prior depth (larger = farther), any scale.
        mask: ``(H, W)`` bool / {0, 1} foreground mask; pairs are drawn inside it.
        num_pairs: number of pairs drawn uniformly (with replacement) from the mask pixels.
        alpha: tanh sharpness (10 in the paper), per metre.
        generator: optional ``torch.Generator`` for the sampling (on any device; the
            indices are drawn there and moved to the mask's device).
        pairs: optional ``(P, 2)`` int64 flat pixel indices (``row * W + col``) to use
            instead of random sampling (then ``mask`` and ``num_pairs`` are ignored).

    Returns:
        Scalar tensor in [0, 2]; 0 (connected to the graph) when no valid pair exists.
    """
    if depth.shape != prior_depth.shape:
        raise ValueError(f"depth {tuple(depth.shape)} and prior {tuple(prior_depth.shape)} shapes differ")
    d = depth.reshape(-1)
    pd = prior_depth.reshape(-1).to(d.dtype)
    if pairs is None:
        idx = torch.nonzero(_bool_mask(mask).reshape(-1), as_tuple=False).squeeze(1)
        if idx.numel() < 2 or num_pairs <= 0:
            return _zero_like_graph(depth)
        # drawn where the generator lives (a CPU generator gives the same pairs on every device)
        gdev = generator.device if generator is not None else idx.device
        sel = torch.randint(0, idx.numel(), (int(num_pairs), 2), generator=generator, device=gdev)
        pairs = idx[sel.to(idx.device)]
    pairs = pairs.to(d.device).long()
    p1, p2 = pairs[:, 0], pairs[:, 1]
    diff_prior = pd[p1] - pd[p2]
    ind = torch.sign(diff_prior)
    valid = (ind != 0) & torch.isfinite(diff_prior)
    if not bool(valid.any()):
        return _zero_like_graph(depth)
    pred = torch.tanh(alpha * (d[p1[valid]] - d[p2[valid]]))
    return (pred - ind[valid]).abs().mean()


def normal_from_depth(depth: torch.Tensor, K: torch.Tensor, pixel_center: float = 0.5) -> torch.Tensor:
    """Camera-space normals from a depth map (the ``N_hat`` of the self-consistency loss,
    as in 2DGS).

    Every pixel is back-projected, ``P(i, j) = depth(i, j) * K^{-1} (j + c, i + c, 1)``
    (OpenCV camera, ``c = pixel_center``: 0.5 is the rasteriser's convention), and the
    normal is ``normalize((P(i+1, j) - P(i-1, j)) x (P(i, j+1) - P(i, j-1)))`` (central
    differences), flipped where needed so that it faces the camera (``n . P <= 0``).
    Exact for planes. The one-pixel border has no central difference and gets a zero
    normal (callers should mask it; :func:`normal_consistency_loss` does). Pixels next
    to a depth discontinuity (the silhouette) get meaningless normals: mask them with
    the rendered alpha / foreground.

    Args:
        depth: ``(H, W)`` camera-space z-depth, metres (``RenderOutput.depth`` or
            ``depth_median``).
        K: ``(3, 3)`` intrinsics, pixels.
        pixel_center: sub-pixel position of pixel centres (0.5 = 3DGS / gsplat).

    Returns:
        ``(H, W, 3)`` unit normals (zero on the border), depth's dtype; differentiable
        w.r.t. ``depth``.
    """
    H, W = depth.shape
    dt, dev = depth.dtype, depth.device
    Kinv = torch.linalg.inv(K.to(device=dev, dtype=torch.float64)).to(dt)
    v, u = torch.meshgrid(torch.arange(H, device=dev, dtype=dt) + pixel_center,
                          torch.arange(W, device=dev, dtype=dt) + pixel_center, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # (H, W, 3)
    P = (pix @ Kinv.T) * depth[..., None]
    dx = P[1:-1, 2:] - P[1:-1, :-2]
    dy = P[2:, 1:-1] - P[:-2, 1:-1]
    n = F.normalize(torch.linalg.cross(dy, dx, dim=-1), dim=-1)
    flip = (n * P[1:-1, 1:-1]).sum(-1, keepdim=True) > 0
    n = torch.where(flip, -n, n)
    return F.pad(n.permute(2, 0, 1), (1, 1, 1, 1)).permute(1, 2, 0)


def normal_consistency_loss(
    normal: torch.Tensor, normal_from_depth: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """FMGS-Avatar ``L_sn = || N - N_hat ||_1`` (Sec. 4.4, surface-normal loss).

    Per pixel, the L1 norm (sum over the 3 components) of the difference between the
    rendered normal ``N`` and the normal ``N_hat`` derived from the rendered depth
    (:func:`normal_from_depth`), averaged with weights ``w`` over the pixels where
    ``N_hat`` is defined (non-zero, i.e. off the border):
    ``sum_p w_p |N_p - N_hat_p|_1 / sum_p w_p``. The rendered normal is used as given
    (``RenderOutput.normal`` is alpha-weighted, close to unit where opaque); pass the
    rendered alpha or the foreground mask as ``weight``. Sec. 4.5's gradient stop (no
    gradient to the positions) is the caller's business (detach the depth branch).

    Args:
        normal: ``(H, W, 3)`` rendered camera-space normals.
        normal_from_depth: ``(H, W, 3)`` normals from the depth (zero where undefined).
        weight: optional ``(H, W)`` non-negative weights (alpha) or bool mask.

    Returns:
        Scalar tensor (0, connected to the graph, if no pixel counts).
    """
    valid = (normal_from_depth.abs().sum(-1) > 0).to(normal.dtype)
    w = valid if weight is None else valid * weight.to(normal.dtype)
    err = (normal - normal_from_depth).abs().sum(-1)
    den = w.sum()
    if float(den) <= 0:
        return _zero_like_graph(normal) + _zero_like_graph(normal_from_depth)
    return (w * err).sum() / den


def normal_prior_loss(
    normal: torch.Tensor, prior_normal: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """FMGS-Avatar ``L_n = 1 - N . N_bar`` (eq. 18 component): alignment of the rendered
    normals with the foundation model's normals.

    Both normals are normalised first, so this is ``1 - cos(angle)`` per pixel, averaged
    over the mask (or all pixels). The prior must be in the same camera frame and
    orientation as the rendered normals (OpenCV camera, facing the camera).

    Args:
        normal: ``(H, W, 3)`` rendered normals (any length).
        prior_normal: ``(H, W, 3)`` prior normals.
        mask: optional ``(H, W)`` bool / weights.
        eps: norm floor for normalisation.

    Returns:
        Scalar tensor in [0, 2].
    """
    cos = (F.normalize(normal, dim=-1, eps=eps) * F.normalize(prior_normal.to(normal.dtype), dim=-1, eps=eps)).sum(-1)
    loss = 1.0 - cos
    if mask is None:
        return loss.mean()
    w = mask.to(loss.dtype)
    den = w.sum()
    if float(den) <= 0:
        return _zero_like_graph(normal)
    return (w * loss).sum() / den


def normal_tv_loss(normal: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """FMGS-Avatar eq. 17: total variation of the rendered normal map,
    ``L_tv = sum_{i,j} (|N_{i,j+1} - N_{i,j}| + |N_{i+1,j} - N_{i,j}|)``
    (``|.|`` summed over the channels).

    With a mask, only neighbour pairs with both pixels inside the mask count.
    ``reduction="sum"`` returns eq. 17 literally (it grows with the image size);
    ``"mean"`` (default) divides that sum by the number of neighbour pairs counted
    (horizontal plus vertical), which keeps the weight independent of the resolution.

    Args:
        normal: ``(H, W, C)`` normal map (any ``C``).
        mask: optional ``(H, W)`` bool / {0, 1} mask.
        reduction: ``"mean"`` or ``"sum"``.

    Returns:
        Scalar tensor.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    dh = (normal[:, 1:] - normal[:, :-1]).abs().sum(-1)  # (H, W-1)
    dv = (normal[1:] - normal[:-1]).abs().sum(-1)  # (H-1, W)
    if mask is None:
        total = dh.sum() + dv.sum()
        count = dh.numel() + dv.numel()
    else:
        m = _bool_mask(mask)
        mh = (m[:, 1:] & m[:, :-1]).to(dh.dtype)
        mv = (m[1:] & m[:-1]).to(dv.dtype)
        total = (dh * mh).sum() + (dv * mv).sum()
        count = float(mh.sum() + mv.sum())
    if reduction == "sum":
        return total
    return total / max(count, 1.0)


def semantic_ce_loss(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, ignore_index: int = -100
) -> torch.Tensor:
    """FMGS-Avatar eq. 19: cross-entropy of rendered semantic logits against the
    foundation model's parsing map, ``L_s = mean_p (logsumexp(l_p) - l_p[y_p])``.

    Args:
        logits: ``(..., K)`` rendered logits (``(H, W, 28)``), unnormalised.
        labels: ``(...)`` int64 class ids in [0, K); ``ignore_index`` entries are skipped.
        mask: optional ``(...)`` bool / weights; the loss is the weighted mean.
        ignore_index: label value to ignore.

    Returns:
        Scalar tensor (nats per pixel); 0 (connected to the graph) if no pixel counts.
    """
    K = logits.shape[-1]
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape[:-1])}")
    lab = labels.reshape(-1).long()
    w = (lab != ignore_index).to(logits.dtype)
    if mask is not None:
        w = w * mask.reshape(-1).to(logits.dtype)
    den = w.sum()
    if float(den) <= 0:
        return _zero_like_graph(logits)
    # only the pixels with a weight take part (a foreground mask is ~1/5 of a frame)
    rows = (w != 0).nonzero().squeeze(1)
    ce = F.cross_entropy(logits.reshape(-1, K).index_select(0, rows), lab.index_select(0, rows), reduction="none")
    return (w.index_select(0, rows) * ce).sum() / den


def semantic_feature_consistency(
    features: torch.Tensor,
    labels: torch.Tensor,
    max_per_class: int | None = None,
    normalization: str = "paper",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """FMGS-Avatar eq. 20: semantic-guided feature consistency,
    ``L_reg = 1/|C| sum_c 1/|G_c| sum_{i, j in G_c} ||f_i - f_j||^2``.

    Computed in O(S F) with the identity (ordered pairs, ``i = j`` included, as the
    double sum is written; ``m_c`` = class mean, ``n = |G_c|``)
    ``sum_{i,j in G_c} ||f_i - f_j||^2 = 2 n sum_{i in G_c} ||f_i - m_c||^2``,
    since ``sum_{i,j} ||f_i - f_j||^2 = sum_{i,j} (|f_i|^2 + |f_j|^2 - 2 f_i.f_j)
    = 2 n sum_i |f_i|^2 - 2 |n m_c|^2`` and ``sum_i ||f_i - m_c||^2 = sum_i |f_i|^2 - n |m_c|^2``.
    (The sum over unordered pairs ``i < j`` is half of it.) So per class

    * ``normalization="paper"`` (eq. 20 as printed, ``1/|G_c|``):
      ``2 sum_{i in G_c} ||f_i - m_c||^2`` -- grows with the class size;
    * ``normalization="pairs"`` (``1/|G_c|^2``, the mean over ordered pairs):
      ``2 mean_{i in G_c} ||f_i - m_c||^2`` (twice the class variance) -- independent of
      the number of surfels.

    and ``L_reg`` averages this over the classes present (``|C|`` = number of distinct
    labels; singleton classes contribute 0). Deviations are taken from the class means
    (two passes), not from the expanded form, for float32 accuracy.

    Args:
        features: ``(S, F)`` semantic features ``f_s`` of the surfels.
        labels: ``(S,)`` int64 class of each surfel (e.g. the argmax of the semantic
            field, detached); negative labels are ignored.
        max_per_class: optionally keep a uniform random subset of at most this many
            members per class (bounds the cost and the class-size effect).
        normalization: ``"paper"`` or ``"pairs"`` (see above).
        generator: optional CPU ``torch.Generator`` for the subsampling.

    Returns:
        Scalar tensor (0, connected to the graph, if no surfel is labelled).
    """
    if normalization not in ("paper", "pairs"):
        raise ValueError(f"normalization must be 'paper' or 'pairs', got {normalization!r}")
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"expected features (S, F) and labels (S,), got {tuple(features.shape)}, {tuple(labels.shape)}")
    lab = labels.long()
    keep = lab >= 0
    if max_per_class is not None:
        S = lab.shape[0]
        perm = torch.randperm(S, generator=generator).to(lab.device)
        lp = torch.where(keep, lab, torch.full_like(lab, -1))[perm]
        order = torch.argsort(lp, stable=True)  # group by class, random order inside a class
        ls = lp[order]
        pos = torch.arange(S, device=lab.device)
        start = torch.ones_like(ls, dtype=torch.bool)
        start[1:] = ls[1:] != ls[:-1]
        first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values
        rank = pos - first
        sel = torch.zeros(S, dtype=torch.bool, device=lab.device)
        sel[perm[order]] = rank < int(max_per_class)
        keep = keep & sel
    # index_select rather than boolean / advanced indexing: its backward is a plain
    # index_add (advanced indexing's is an accumulating index_put, ~10x slower here)
    if bool(keep.all()):
        f = features
    else:
        rows = keep.nonzero().squeeze(1)
        f = features.index_select(0, rows)
        lab = lab.index_select(0, rows)
    if lab.numel() == 0:
        return _zero_like_graph(features)
    classes, inv, counts = torch.unique(lab, return_inverse=True, return_counts=True)
    C = classes.numel()
    n = counts.to(f.dtype)
    sums = torch.zeros(C, f.shape[1], dtype=f.dtype, device=f.device).index_add(0, inv, f)
    mean = sums / n[:, None]
    dev2 = ((f - mean.index_select(0, inv)) ** 2).sum(-1)
    ss = torch.zeros(C, dtype=f.dtype, device=f.device).index_add(0, inv, dev2)  # sum_i ||f_i - m_c||^2
    per_class = 2.0 * ss if normalization == "paper" else 2.0 * ss / n
    return per_class.mean()


def knn_neighbour_pairs(points, k: int = 4) -> torch.Tensor:
    """Neighbour pairs for :func:`isometry_loss`: each point with its ``k`` nearest others.

    Computed once on the fixed canonical surfel centres (scipy ``cKDTree``).

    Args:
        points: ``(S, 3)`` points (tensor or array), metres.
        k: neighbours per point (3DGS-Avatar: 4).

    Returns:
        ``(S * k, 2)`` int64 tensor of ``(i, j)`` pairs, ``i != j`` (directed; a pair may
        appear in both directions).
    """
    import numpy as np
    from scipy.spatial import cKDTree

    pts = points.detach().cpu().double().numpy() if isinstance(points, torch.Tensor) else points
    pts = np.asarray(pts, dtype=np.float64)
    _, nn_idx = cKDTree(pts).query(pts, k=k + 1)
    i = np.repeat(np.arange(pts.shape[0]), k)
    j = nn_idx[:, 1:].reshape(-1)
    return torch.from_numpy(np.stack([i, j], axis=1).astype(np.int64))


def isometry_loss(
    canonical_centers: torch.Tensor, posed_centers: torch.Tensor, neighbour_pairs: torch.Tensor
) -> torch.Tensor:
    """Isometry regulariser ``L_iso`` (eq. 21; 3DGS-Avatar's as-isometric-as-possible
    term on positions): keep the distances between neighbouring surfels.

    ``L_iso = mean_{(i, j)} | ||x^o_i - x^o_j|| - ||x^c_i - x^c_j|| |`` over the neighbour
    pairs (:func:`knn_neighbour_pairs` on the canonical centres), with ``x^c`` the
    (corrected) canonical and ``x^o`` the posed centres. Zero for any rigid motion,
    positive under stretching; invariant to the global pose.

    Args:
        canonical_centers: ``(S, 3)`` canonical centres, metres.
        posed_centers: ``(S, 3)`` observation-space centres, metres.
        neighbour_pairs: ``(A, 2)`` int64 surfel index pairs.

    Returns:
        Scalar tensor, metres.
    """
    i, j = neighbour_pairs[:, 0].long(), neighbour_pairs[:, 1].long()
    dc = torch.linalg.vector_norm(canonical_centers.index_select(0, i) - canonical_centers.index_select(0, j), dim=-1)
    do = torch.linalg.vector_norm(posed_centers.index_select(0, i) - posed_centers.index_select(0, j), dim=-1)
    return (do - dc.to(do.dtype)).abs().mean()


def sample_mesh_surface(vertices: torch.Tensor, faces: torch.Tensor, vertex_weights: torch.Tensor,
                        num_samples: int = 1024, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random points on a triangle mesh with barycentrically interpolated skinning
    weights (the "random surface samples" of the skinning regulariser).

    Faces are drawn with probability proportional to their area, barycentric coordinates
    uniformly on the triangle (``sqrt`` trick).

    Args:
        vertices: ``(V, 3)`` canonical mesh vertices (e.g. SMPL in the star pose), metres.
        faces: ``(F, 3)`` int64 vertex indices.
        vertex_weights: ``(V, 24)`` SMPL skinning weights.
        num_samples: number of points ``N`` (3DGS-Avatar: 1024 per iteration).
        generator: optional CPU ``torch.Generator``.

    Returns:
        ``(points (N, 3), weights (N, 24))`` in the vertices' dtype/device.
    """
    faces = faces.long()
    v0, v1, v2 = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    area = torch.linalg.cross(v1 - v0, v2 - v0).norm(dim=-1)
    fid = torch.multinomial(area.detach().cpu().double(), num_samples, replacement=True, generator=generator)
    fid = fid.to(vertices.device)
    r = torch.rand(num_samples, 2, generator=generator, dtype=torch.float64).to(vertices.device, vertices.dtype)
    su = r[:, 0].sqrt()
    b = torch.stack([1.0 - su, su * (1.0 - r[:, 1]), su * r[:, 1]], dim=-1)  # (N, 3)
    tri = faces[fid]
    pts = (b[:, :, None] * vertices[tri]).sum(1)
    w = (b[:, :, None].to(vertex_weights.dtype) * vertex_weights[tri]).sum(1)
    return pts, w


def skinning_regulariser(field, surface_points: torch.Tensor,
                         smpl_weights: torch.Tensor, prior: bool = False) -> torch.Tensor:
    """Skinning regulariser ``L_skin`` (eq. 21, as 3DGS-Avatar): pull the predicted
    weights towards SMPL's at points on the canonical body surface.

    ``L_skin = mean_{i, b} (W_b(x_i) - w^SMPL_{i, b})^2`` (mean squared error over the
    ``N x 24`` entries), with ``x_i`` random surface samples (:func:`sample_mesh_surface`,
    1024 per iteration). MSE was chosen over L1 because the targets are smooth and the
    quadratic penalty does not push small weights to exactly zero. Weight it with
    :func:`skinning_weight_schedule`.

    Args:
        field: the skinning field (:class:`fmgs.trainer.models.fields.SkinningField`).
        surface_points: ``(N, 3)`` canonical surface points, metres.
        smpl_weights: ``(N, 24)`` SMPL skinning weights at those points (rows sum to 1).

    Returns:
        Scalar tensor.
    """
    pred = field(surface_points, prior_weights=smpl_weights if prior else None)
    return F.mse_loss(pred, smpl_weights.to(pred.dtype))


def skinning_weight_schedule(it: int, warmup_iters: int = 1000, initial: float = 10.0,
                             final: float = 0.1) -> float:
    """Loss weight ``lambda_skin`` of :func:`skinning_regulariser` at iteration ``it``
    (3DGS-Avatar: 10 for the first 1k iterations, then 0.1).

    Args:
        it: 0-based training iteration.
        warmup_iters: iterations with the ``initial`` weight.
        initial, final: the two weights.

    Returns:
        ``initial`` if ``it < warmup_iters`` else ``final``.
    """
    return float(initial) if it < warmup_iters else float(final)


def offset_laplacian_loss(offsets: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Mean squared umbrella Laplacian of per-surfel offsets over an adjacency graph.

    ``L = mean_i || o_i - mean_{j in N(i)} o_j ||^2`` (metres squared), ``N(i)`` the surfels
    sharing an edge with surfel ``i`` (``pairs``, each undirected pair once). Zero for any
    offset field that is constant or varies linearly over a regular neighbourhood, so a
    garment may stand off the body as a whole; wrinkles and single surfels cost.
    Surfels without neighbours contribute zero.

    Args:
        offsets: ``(S, 3)`` float offsets, metres.
        pairs: ``(A, 2)`` int64 adjacency pairs (``CanonicalSurfels.face_adjacency``).
    """
    S = offsets.shape[0]
    i, j = pairs[:, 0], pairs[:, 1]
    nsum = torch.zeros_like(offsets).index_add(0, i, offsets[j]).index_add(0, j, offsets[i])
    deg = torch.zeros(S, dtype=offsets.dtype, device=offsets.device)
    deg = deg.index_add(0, i, torch.ones_like(i, dtype=offsets.dtype)).index_add(
        0, j, torch.ones_like(j, dtype=offsets.dtype))
    has = deg > 0
    lap = torch.where(has[:, None], offsets - nsum / deg.clamp_min(1)[:, None], torch.zeros_like(offsets))
    return (lap ** 2).sum(1).mean()


def scale_growth_loss(scales: torch.Tensor, template_scales: torch.Tensor) -> torch.Tensor:
    """Mean squared log-growth of surfel scales beyond the template's.

    ``L = mean_{i,k} relu(log(s'_ik / s_ik))^2`` (dimensionless), ``s'`` the corrected canonical
    scales after the static log-scale and the geometry field's ``delta_s`` (eq. 5,
    ``s' = s exp(delta_s)``), ``s`` the template's (``scales0``). Shrinking costs nothing;
    growing to ``e`` times the template scale costs 1 per axis. Not in the paper (which has no
    scale term); it exists because the full model's posed surfels grow to 3x the template's
    median scale within 2,000 iterations, which costs draw time at playback (docs/benchmarks.md,
    "Scale-growth penalty"). Weighted by ``loss.lambda_scale_growth`` in the full model's
    ``regularisers`` group (:func:`fmgs.trainer.losses.objectives.full_loss_groups`).

    Args:
        scales: ``(S, 2)`` float corrected scales ``s'``, metres (> 0).
        template_scales: ``(S, 2)`` float template scales ``s``, metres (> 0).

    Returns:
        Scalar tensor. A non-positive scale gives ``nan`` / ``inf`` (no check here: this runs
        every iteration; the model's scales are ``s exp(.)`` and the template's are > 0).
    """
    growth = torch.log(scales) - torch.log(template_scales)
    return torch.relu(growth).pow(2).mean()
