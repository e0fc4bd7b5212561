"""Losses (torch) and evaluation metrics (numpy) against scikit-image and hand formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import structural_similarity

from fmgs.trainer.losses.terms import (
    dssim_loss,
    l1_loss,
    mask_bce_loss,
    photometric_loss,
    ssim,
    ssim_map,
)
from fmgs.trainer.engine.metrics import LPIPSMetric, metric_library_versions, psnr, silhouette_errors, ssim_metric


def smooth_image(rng, h, w):
    """Random image with some structure (blurred noise + gradient), float64 in [0, 1]."""
    base = rng.random((h, w, 3))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = 0.5 * base + 0.3 * xx[..., None] + 0.2 * yy[..., None] * np.array([1.0, 0.5, 0.0])
    return np.clip(img, 0.0, 1.0)


# ---------------------------------------------------------------- losses


def test_ssim_identical_is_one():
    rng = np.random.default_rng(0)
    img = torch.from_numpy(smooth_image(rng, 32, 40))
    assert float(ssim(img, img)) == pytest.approx(1.0, abs=1e-12)
    assert float(dssim_loss(img, img)) == pytest.approx(0.0, abs=1e-12)
    b = img.permute(2, 0, 1).unsqueeze(0).repeat(2, 1, 1, 1)
    assert float(ssim(b, b)) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_skimage_gaussian_in_interior():
    """Interior (>= 5 px from the border) agrees with skimage to 1e-10.

    skimage (gaussian_weights=True, sigma=1.5, truncate=3.5) uses the same 11-tap
    normalised Gaussian but reflects at the border where 3DGS's conv2d pads with
    zeros, so only the border band of width 5 differs; skimage itself reports the
    mean over the same cropped interior.
    """
    rng = np.random.default_rng(1)
    a = smooth_image(rng, 48, 56)
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    mssim, smap = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                        data_range=1.0, channel_axis=-1, full=True)
    ours = ssim_map(torch.from_numpy(a), torch.from_numpy(b))[0].permute(1, 2, 0).numpy()
    pad = 5
    np.testing.assert_allclose(ours[pad:-pad, pad:-pad], smap[pad:-pad, pad:-pad], rtol=0, atol=1e-10)
    assert ours[pad:-pad, pad:-pad].mean() == pytest.approx(mssim, abs=1e-10)
    # the full-image mean (with zero-padded borders) differs only slightly
    assert float(ssim(torch.from_numpy(a), torch.from_numpy(b))) == pytest.approx(mssim, abs=0.05)


def test_ssim_layouts_agree():
    rng = np.random.default_rng(2)
    a, b = smooth_image(rng, 20, 24), smooth_image(rng, 20, 24)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    s_hwc = ssim(ta, tb)
    s_bchw = ssim(ta.permute(2, 0, 1)[None], tb.permute(2, 0, 1)[None])
    assert float(s_hwc) == pytest.approx(float(s_bchw), abs=1e-15)


def test_ssim_gradcheck_float64():
    rng = np.random.default_rng(3)
    a = torch.from_numpy(smooth_image(rng, 7, 8)).requires_grad_(True)
    b = torch.from_numpy(smooth_image(rng, 7, 8))
    # full Jacobian check for SSIM; random-projection (fast mode) check for eq. 13
    assert torch.autograd.gradcheck(lambda x: ssim(x, b), (a,), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(lambda x: photometric_loss(x, b), (a,), eps=1e-6, atol=1e-8, fast_mode=True)


def test_l1_loss_plain_and_masked():
    pred = torch.tensor([[0.0, 0.5], [1.0, 0.25]], dtype=torch.float64)
    gt = torch.tensor([[0.5, 0.5], [0.0, 0.0]], dtype=torch.float64)
    assert float(l1_loss(pred, gt)) == pytest.approx((0.5 + 0 + 1 + 0.25) / 4)
    mask = torch.tensor([[True, False], [False, True]])
    assert float(l1_loss(pred, gt, mask)) == pytest.approx((0.5 + 0.25) / 2)


def test_photometric_loss_is_eq13_combination():
    rng = np.random.default_rng(4)
    a = torch.from_numpy(smooth_image(rng, 16, 16))
    b = torch.from_numpy(smooth_image(rng, 16, 16))
    l1 = float((a - b).abs().mean())
    s = float(ssim(a, b))
    assert float(photometric_loss(a, b)) == pytest.approx(0.8 * l1 + 0.2 * (1 - s), abs=1e-14)
    assert float(photometric_loss(a, b, lambda_ssim=0.0)) == pytest.approx(l1, abs=1e-14)


def test_mask_bce_hand_values():
    alpha = torch.tensor([0.5, 0.9, 0.2, 0.0, 1.0], dtype=torch.float64)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    eps = 1e-6
    # per element: -ln 0.5, -ln 0.9, -ln 0.8, -ln(1 - eps) (alpha clamped to eps), -ln(1 - eps)
    expected = (math.log(2) - math.log(0.9) - math.log(0.8) - 2 * math.log(1 - eps)) / 5
    assert float(mask_bce_loss(alpha, mask, eps)) == pytest.approx(expected, abs=1e-15)
    # saturated wrong predictions stay finite: -ln(eps)
    f64 = torch.float64
    bad = mask_bce_loss(torch.tensor([0.0, 1.0], dtype=f64), torch.tensor([1.0, 0.0], dtype=f64), eps)
    assert float(bad) == pytest.approx(-math.log(eps), rel=1e-5)
    # boolean masks are accepted
    assert float(mask_bce_loss(alpha, mask.bool(), eps)) == pytest.approx(expected, abs=1e-15)


# ---------------------------------------------------------------- metrics


def test_psnr_exact_known_mse():
    gt = np.full((8, 10, 3), 0.3)
    assert psnr(gt + 0.1, gt) == pytest.approx(20.0, abs=1e-9)  # MSE 0.01 -> 20 dB
    assert psnr(gt + 0.01, gt) == pytest.approx(40.0, abs=1e-9)
    pred = gt.copy()
    pred[:4] += 0.2  # half the pixels off by 0.2 -> MSE 0.02
    assert psnr(pred, gt) == pytest.approx(10 * math.log10(1 / 0.02), abs=1e-9)
    mask = np.zeros((8, 10), bool)
    mask[:4] = True
    assert psnr(pred, gt, mask) == pytest.approx(10 * math.log10(1 / 0.04), abs=1e-9)
    assert psnr(gt, gt) == math.inf


def test_ssim_metric_matches_skimage_directly():
    rng = np.random.default_rng(5)
    a = smooth_image(rng, 40, 30)
    b = np.clip(a + 0.05 * rng.standard_normal(a.shape), 0, 1)
    assert ssim_metric(a, a) == pytest.approx(1.0, abs=1e-12)
    direct = structural_similarity(a, b, channel_axis=-1, data_range=1.0)
    assert ssim_metric(a, b) == direct
    assert ssim_metric(a.astype(np.float32), b.astype(np.float32)) == pytest.approx(direct, abs=1e-6)


def test_metric_library_versions_records_skimage():
    import skimage

    v = metric_library_versions()
    assert v["skimage"] == skimage.__version__


def test_lpips_unavailable_without_network(monkeypatch, tmp_path):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("network access attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # empty hub cache
    for kwargs in ({}, {"net": "alex"}, {"weights_path": tmp_path / "missing.pth"}):
        m = LPIPSMetric(**kwargs)
        img = np.zeros((8, 8, 3))
        if m.available:  # only possible where lpips + local weights exist
            continue
        assert isinstance(m.reason, str) and m.reason
        assert m(img, img) is None
    assert calls == []
    assert "missing.pth" in LPIPSMetric(weights_path=tmp_path / "missing.pth").reason


def test_semantic_confusion_and_scores_by_hand():
    """Rendered part map vs labels on a 2x3 image with known counts."""
    from fmgs.trainer.engine.metrics import semantic_confusion, semantic_scores

    C = 4
    labels = np.array([[0, 1, 1], [2, 2, 3]])
    pred_cls = np.array([[2, 1, 2], [2, 0, 3]])          # (0,0) is background in the labels: not counted
    logits = np.eye(C)[pred_cls] * 5.0
    alpha = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.2]])  # (1,2) too transparent -> background
    cm = semantic_confusion(logits, alpha, labels, C)
    want = np.zeros((C, C), np.int64)
    want[1, 1] += 1; want[1, 2] += 1; want[2, 2] += 1; want[2, 0] += 1; want[3, 0] += 1
    np.testing.assert_array_equal(cm, want)
    s = semantic_scores(cm)
    assert s["pixel_accuracy"] == 2 / 5 and s["classes"] == 3
    # IoU: class 1: 1/(2+1-1)=0.5; class 2: 1/(2+2-1)=1/3; class 3: 0/(1+0-0)=0
    assert abs(s["miou"] - (0.5 + 1 / 3 + 0.0) / 3) < 1e-12
    assert semantic_scores(np.zeros((C, C)))["pixel_accuracy"] is None


def test_scale_growth_penalises_only_growth_and_matches_brute_force():
    """scale_growth_loss against a float64 loop, zero for shrinking or unchanged surfels, and
    its gradient against central finite differences."""
    from fmgs.trainer.losses.terms import scale_growth_loss

    g = torch.Generator().manual_seed(3)
    s0 = torch.rand(7, 2, dtype=torch.float64, generator=g) * 0.01 + 0.001
    assert float(scale_growth_loss(s0 * 0.5, s0)) == 0.0
    assert float(scale_growth_loss(s0.clone(), s0)) == 0.0
    s = s0 * torch.exp(torch.randn(7, 2, dtype=torch.float64, generator=g))
    ref = np.mean([max(np.log(a / b), 0.0) ** 2 for a, b in zip(s.numpy().ravel(), s0.numpy().ravel())])
    assert abs(float(scale_growth_loss(s, s0)) - ref) < 1e-14
    x = s.clone().requires_grad_(True)
    scale_growth_loss(x, s0).backward()
    eps = 1e-9
    for idx in [(0, 0), (3, 1), (6, 0)]:
        sp, sm = s.clone(), s.clone()
        sp[idx] += eps
        sm[idx] -= eps
        fd = (float(scale_growth_loss(sp, s0)) - float(scale_growth_loss(sm, s0))) / (2 * eps)
        assert abs(float(x.grad[idx]) - fd) < 1e-5 * max(1.0, abs(fd))


def test_silhouette_errors_by_hand():
    """A 3x4 render against a mask with 4 shared pixels, 2 missed, 1 extra (union 7)."""
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], np.float32)
    alpha = np.array([[0.9, 0.6, 0.4, 0.0], [0.7, 0.8, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]], np.float32)
    # covered and in the mask: (0,0) (0,1) (1,0) (1,1); missed: (0,2) 0.4 and (1,2) 0.5 (not > 0.5);
    # extra: (2,3)
    got = silhouette_errors(alpha, mask)
    assert got == {"iou": 4 / 7, "missed": 2 / 7, "extra": 1 / 7}
    assert silhouette_errors(np.zeros((2, 2)), np.zeros((2, 2))) == {"iou": 1.0, "missed": 0.0, "extra": 0.0}
    with pytest.raises(ValueError, match="does not match"):
        silhouette_errors(np.zeros((2, 2)), np.zeros((2, 3)))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_silhouette_errors_match_a_pixel_loop_and_split_the_union(h, w, seed):
    """Against a per-pixel count in plain Python; iou + missed + extra = 1."""
    rng = np.random.default_rng(seed)
    alpha, mask = rng.random((h, w)), (rng.random((h, w)) > 0.5).astype(np.float64)
    tp = fn = fp = 0
    for y in range(h):
        for x in range(w):
            a, m = alpha[y, x] > 0.5, mask[y, x] > 0.5
            tp += a and m
            fn += m and not a
            fp += a and not m
    got = silhouette_errors(alpha, mask)
    union = tp + fn + fp
    want = ({"iou": 1.0, "missed": 0.0, "extra": 0.0} if union == 0 else
            {"iou": tp / union, "missed": fn / union, "extra": fp / union})
    assert got == pytest.approx(want, abs=1e-15)
    assert got["iou"] + got["missed"] + got["extra"] == pytest.approx(1.0, abs=1e-12)
