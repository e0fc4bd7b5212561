"""Evaluation metrics (NumPy in, Python floats out): PSNR, SSIM, LPIPS.

Conventions follow 3DGS-Avatar's ZJU-MoCap protocol: full image, black background,
float images in [0, 1] of shape ``(H, W, 3)``. SSIM is scikit-image's
``structural_similarity`` whose value depends on the scikit-image version (papers'
numbers were produced with 0.19.3); record :func:`metric_library_versions` next to
any result. LPIPS (VGG) needs pretrained backbone weights that cannot be downloaded
on these machines: :class:`LPIPSMetric` only uses local files and reports itself
unavailable otherwise.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

__all__ = ["psnr", "ssim_metric", "metric_library_versions", "LPIPSMetric"]


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"image shapes differ: {pred.shape} vs {gt.shape}")
    return pred, gt


def psnr(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB for data range 1: ``10 log10(1 / MSE)``.

    Args:
        pred, gt: ``(H, W, C)`` float images in [0, 1].
        mask: optional ``(H, W)`` boolean; the MSE is then taken over the masked
            pixels only (all channels). Default: full image (3DGS-Avatar protocol).

    Returns:
        PSNR (float64); ``inf`` for identical images.
    """
    pred, gt = _check_pair(pred, gt)
    se = (pred - gt) ** 2
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != se.shape[:2]:
            raise ValueError(f"mask shape {m.shape} does not match image {se.shape[:2]}")
        se = se[m]
        if se.size == 0:
            raise ValueError("empty mask")
    mse = float(se.mean())
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(1.0 / mse))


def silhouette_errors(alpha: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """IoU of the rendered silhouette ``alpha > threshold`` against the foreground
    ``mask > threshold`` (both ``(H, W)``, values in [0, 1]), and what the rest of the union is.

    ``missed`` is the share of the union that the mask covers and the render does not (the
    body or garment left uncovered, false negatives); ``extra`` the share the render covers
    outside the mask (false positives). ``iou + missed + extra == 1``, so a gap in mean IoU
    between two frame sets splits exactly into the two (issue 17: are loose garments covered?).

    Returns:
        ``{"iou", "missed", "extra"}``, each in [0, 1]; ``iou`` 1.0 and the others 0.0 when both
        silhouettes are empty.

    Raises:
        ValueError: shapes differ.
    """
    a = np.asarray(alpha) > threshold
    m = np.asarray(mask) > threshold
    if a.shape != m.shape:
        raise ValueError(f"alpha shape {a.shape} does not match mask {m.shape}")
    inter, missed, extra = int((a & m).sum()), int((m & ~a).sum()), int((a & ~m).sum())
    union = inter + missed + extra
    if union == 0:
        return {"iou": 1.0, "missed": 0.0, "extra": 0.0}
    return {"iou": inter / union, "missed": missed / union, "extra": extra / union}


def ssim_metric(pred: np.ndarray, gt: np.ndarray) -> float:
    """SSIM via ``skimage.metrics.structural_similarity(channel_axis=-1, data_range=1)``.

    scikit-image defaults otherwise (7x7 uniform window, sample covariance), as the
    ZJU-MoCap evaluations of 3DGS-Avatar/HumanNeRF. The value depends on the
    scikit-image version (0.19.3 reproduces published numbers); store
    :func:`metric_library_versions` with results.

    Args:
        pred, gt: ``(H, W, C)`` float images in [0, 1].

    Returns:
        Mean SSIM (float).
    """
    from skimage.metrics import structural_similarity

    pred, gt = _check_pair(pred, gt)
    return float(structural_similarity(pred, gt, channel_axis=-1, data_range=1.0))


def metric_library_versions() -> dict[str, str]:
    """Versions of the libraries that determine metric values (``skimage``, ``numpy``, ``lpips``)."""
    import skimage

    out = {"skimage": skimage.__version__, "numpy": np.__version__}
    try:
        import lpips  # noqa: F401

        out["lpips"] = getattr(lpips, "__version__", "unknown")
    except ImportError:
        out["lpips"] = "not installed"
    return out


@contextlib.contextmanager
def _no_downloads():
    """Make any ``torch.hub`` download raise while building LPIPS."""
    import torch.hub as hub

    def refuse(*args, **kwargs):
        raise RuntimeError("LPIPSMetric never downloads weights (network use refused)")

    saved = hub.download_url_to_file
    hub.download_url_to_file = refuse
    try:
        yield
    finally:
        hub.download_url_to_file = saved


class LPIPSMetric:
    """LPIPS (Zhang et al. 2018) perceptual distance, built only from local files.

    Two sources are tried, in order, and nothing is ever downloaded:

    1. ``weights_path``: a ``torch.save``-d state dict of a complete
       ``lpips.LPIPS(net=net)`` module (backbone + linear heads); the architecture
       comes from the installed ``lpips`` package (random backbone init, no download).
    2. the installed ``lpips`` package (its bundled linear heads) plus the
       torchvision ImageNet backbone checkpoint already present in the torch hub
       cache (``torch.hub.get_dir()/checkpoints``).

    Neither ``lpips`` nor ``torchvision`` is a dependency of this project.

    Args:
        net: backbone, ``"vgg"`` (ZJU-MoCap protocol) or ``"alex"`` (PeopleSnapshot).
        weights_path: optional local state-dict file (see above).
        device: torch device for the network.

    Attributes:
        available: whether the network was built.
        reason: why not (empty when available).
    """

    _BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}

    def __init__(self, net: str = "vgg", weights_path: str | os.PathLike | None = None, device: str = "cpu"):
        self.net_name = net
        self.device = device
        self.model = None
        self.available = False
        self.reason = ""
        try:
            self.model = self._build(net, weights_path)
            self.available = True
        except _Unavailable as exc:
            self.reason = str(exc)

    def _build(self, net, weights_path):
        if net not in self._BACKBONE_FILES:
            raise _Unavailable(f"unknown LPIPS backbone {net!r} (use 'vgg' or 'alex')")
        if weights_path is not None and not Path(weights_path).is_file():
            raise _Unavailable(f"LPIPS weights file not found: {weights_path}")
        try:
            import lpips
            import torch
        except ImportError as exc:
            raise _Unavailable(f"the 'lpips' package is not installed ({exc}); LPIPS not computed") from None
        if weights_path is None:
            ckpt = Path(torch.hub.get_dir()) / "checkpoints" / self._BACKBONE_FILES[net]
            if not ckpt.is_file():
                raise _Unavailable(
                    f"backbone weights {ckpt} not in the torch hub cache and no weights_path given; "
                    "LPIPS not computed (this tool never downloads)"
                )
        try:
            with _no_downloads():
                if weights_path is None:
                    model = lpips.LPIPS(net=net, verbose=False)
                else:
                    model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
                    state = torch.load(weights_path, map_location="cpu", weights_only=True)
                    model.load_state_dict(state, strict=True)
        except Exception as exc:  # any failure means "not available", with the cause
            raise _Unavailable(f"could not build LPIPS-{net} from local files: {exc}") from None
        return model.eval().to(self.device)

    def __call__(self, pred: np.ndarray, gt: np.ndarray) -> float | None:
        """LPIPS distance between two ``(H, W, 3)`` float images in [0, 1]; None when unavailable."""
        if not self.available:
            return None
        import torch

        pred, gt = _check_pair(pred, gt)

        def prep(a):
            t = torch.from_numpy(a).float().permute(2, 0, 1).unsqueeze(0).to(self.device)
            return t * 2.0 - 1.0  # LPIPS expects [-1, 1]

        with torch.no_grad():
            return float(self.model(prep(pred), prep(gt)).item())


class _Unavailable(Exception):
    pass


def semantic_confusion(logits: np.ndarray, alpha: np.ndarray, labels: np.ndarray, num_classes: int,
                       alpha_min: float = 0.5) -> np.ndarray:
    """Confusion counts of a rendered semantic map against a part-label map.

    The predicted class of a pixel is ``argmax`` of its rendered logits (eq. 8 after
    compositing) where the rendered opacity is at least ``alpha_min``, else background (0).
    Only pixels the labels call foreground (``labels > 0``) are counted, so the score
    measures the part labels on the person, not the silhouette.

    Args:
        logits: ``(H, W, C)`` rendered logits. alpha: ``(H, W)`` rendered opacity.
        labels: ``(H, W)`` int class ids in ``[0, num_classes)`` (0 = background).
        num_classes: C.
        alpha_min: opacity below which a pixel is predicted background.

    Returns:
        ``(C, C)`` int64 counts, row = label, column = prediction.
    """
    pred = np.where(alpha >= alpha_min, np.argmax(logits, axis=-1), 0)
    fg = labels > 0
    idx = labels[fg].astype(np.int64) * num_classes + pred[fg].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def semantic_scores(confusion: np.ndarray) -> dict:
    """Pixel accuracy and mean IoU from :func:`semantic_confusion` counts (summed over frames).

    ``pixel_accuracy = trace / total``; ``miou`` = mean over the foreground classes that occur
    in the labels of ``TP / (TP + FP + FN)`` (FP counted over the labelled-foreground pixels
    only). Returns ``{"pixel_accuracy", "miou", "classes"}`` (None values when nothing was
    counted).
    """
    c = np.asarray(confusion, np.float64)
    total = c.sum()
    if total <= 0:
        return {"pixel_accuracy": None, "miou": None, "classes": 0}
    tp = np.diag(c)
    present = [k for k in range(1, c.shape[0]) if c[k].sum() > 0]
    ious = [tp[k] / (c[k].sum() + c[:, k].sum() - tp[k]) for k in present]
    return {"pixel_accuracy": float(tp.sum() / total), "miou": float(np.mean(ious)) if ious else None,
            "classes": len(present)}
