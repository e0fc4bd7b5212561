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
