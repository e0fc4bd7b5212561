"""The full FMGS-Avatar training objective (eq. 13-21), grouped for coordinated training.

:func:`full_loss_groups` returns the loss terms of one iteration grouped as
:mod:`fmgs.trainer.losses.coordinated` expects:

=============  ===========================================================  ==================
group          terms (weights in ``loss.*`` of the config)                  may not update
=============  ===========================================================  ==================
photometric    (1-l) L1 + l D-SSIM (eq. 13) + lambda_mask BCE (eq. 14)      --
depth          lambda_depth * ordinal ranking vs the depth prior (eq. 15-16)  rotations
normal         lambda_sn L_sn + lambda_n L_n + lambda_tv L_tv (eq. 17-18)    positions
semantic_field lambda_sem * CE vs the parts prior (eq. 19), logits composited  all but the
               with constant weights (default, train.semantic_weights_only)   semantic logits
semantic       the same with train.semantic_weights_only=false (Sec. 4.5)     positions, rotations
regularisers   lambda_reg eq. 20 + lambda_skin L_skin + lambda_iso L_iso     --
               + lambda_scale_growth L_grow (not in the paper)
=============  ===========================================================  ==================

A prior modality that is absent (None) simply leaves its group out. Default weights
(:class:`fmgs.config.LossConfig`): 3DGS-Avatar's for mask (0.1), skinning
(10 -> 0.1 after 1k iterations) and isometry (1 on positions), as the paper says; the paper
sets lambda_d, lambda_n, lambda_s, lambda_reg "through empirical validation" without giving
them, so: the prior terms (depth ranking, normal prior) 0.05 as 2DGS's normal term, normal
TV 0.01, semantic 0.05, eq. 20 0.01, and the normal self-consistency L_sn 0.01 -- 2DGS's
0.05 cost 0.33 dB held-out PSNR on ZJU-MoCap 377 at 256^2 (0.01: 0.09 dB; docs/benchmarks.md).
With body-model priors (the fitted naked SMPL rendered, ``meta.json`` kind ``body-model``)
the two prior terms are scaled by ``loss.body_model_prior_scale`` (0 by default,
:func:`prior_term_scale`).
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from fmgs.trainer.losses.terms import (
    depth_ranking_loss, isometry_loss, mask_bce_loss, normal_consistency_loss, normal_from_depth,
    normal_prior_loss, normal_tv_loss, photometric_loss, sample_mesh_surface, scale_growth_loss,
    semantic_ce_loss, semantic_feature_consistency, skinning_regulariser, skinning_weight_schedule,
)


def semantic_weights_only(cfg: DictConfig) -> bool:
    """Whether the semantic losses reach the semantic field only (``train.coordinated`` and
    ``train.semantic_weights_only``; see :mod:`fmgs.trainer.losses.coordinated`)."""
    return bool(cfg.train.coordinated) and bool(cfg.train.semantic_weights_only)


def prior_term_scale(cfg: DictConfig, prior: dict | None) -> float:
    """Multiplier of the depth-prior (eq. 15-16) and normal-prior (eq. 18) terms for a frame's
    priors: ``loss.body_model_prior_scale`` when they are body-model priors (``meta.json`` kind
    ``"body-model"``: the fitted, naked SMPL rendered), else 1.

    Body-model priors carry no information beyond the SMPL fit the avatar is built on, and
    their naked-body depth and normals disagree with the clothed subject; on ZJU-MoCap 377 they
    cost held-out PSNR (docs/benchmarks.md), so the shipped scale is 0. Foundation-model
    priors (Sapiens, the paper's) always get the full weights. The semantic term (eq. 19) is
    not scaled: with ``train.semantic_weights_only`` it trains only the semantic field."""
    if prior and prior.get("kind") == "body-model":
        return float(cfg.loss.body_model_prior_scale)
    return 1.0


def normal_consistency_start(cfg: DictConfig) -> int:
    """First iteration of the normal self-consistency term L_sn: ``loss.normal_consistency_start``
    times ``train.iterations`` (2DGS switches its normal consistency on at 7k of 30k
    iterations, i.e. ~0.23; the paper gives no schedule)."""
    return int(round(float(cfg.loss.normal_consistency_start) * int(cfg.train.iterations)))


def foreground_crop(mask: torch.Tensor, margin: int = 2) -> tuple[slice, slice] | None:
    """``(rows, cols)`` slices of the bounding box of ``mask`` grown by ``margin`` pixels
    (clipped to the image); None for an empty mask.

    Args:
        mask: ``(H, W)`` bool foreground mask (pixels).
        margin: pixels added on each side.
    """
    rows = mask.any(1).nonzero()
    cols = mask.any(0).nonzero()
    if rows.numel() == 0:
        return None
    H, W = mask.shape
    return (slice(max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, H)),
            slice(max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, W)))


def normal_group_loss(cfg: DictConfig, depth: torch.Tensor, normal: torch.Tensor, K: torch.Tensor,
                      inside: torch.Tensor, prior_normal=None, prior_scale: float = 1.0, iteration: int = 0,
                      crop: bool = True) -> torch.Tensor | None:
    """The normal group (eq. 17-18): ``lambda_sn L_sn + s lambda_n L_n + lambda_tv L_tv``.

    Every term is a mean over pixels of the foreground mask ``inside`` (L_sn and L_tv also
    read each pixel's 4-neighbours), so with ``crop`` they are evaluated on the mask's
    bounding box grown by 2 pixels, with the principal point shifted for
    :func:`normal_from_depth`: the same value, a fraction of the work.

    Args:
        depth: ``(H, W)`` rendered depth (m); normal: ``(H, W, 3)`` rendered camera normals.
        K: ``(3, 3)`` intrinsics (pixels). inside: ``(H, W)`` bool foreground mask.
        prior_normal: ``(H, W, 3)`` float array of prior normals (NaN = no value), or None.
        prior_scale: multiplier of the prior term (:func:`prior_term_scale`).
        iteration: training iteration (L_sn starts at :func:`normal_consistency_start`).
        crop: evaluate on the foreground bounding box.

    Returns:
        Scalar tensor, or None when no term is active.
    """
    L = cfg.loss
    if crop:
        box = foreground_crop(inside)
        if box is not None:
            r, c = box
            depth, normal, inside = depth[r, c], normal[r, c], inside[r, c]
            K = K.clone()
            K[0, 2] -= c.start
            K[1, 2] -= r.start
            if prior_normal is not None:
                prior_normal = prior_normal[r, c]
    terms = []
    if L.lambda_normal_consistency > 0 and iteration >= normal_consistency_start(cfg):
        n_hat = normal_from_depth(depth, K)
        terms.append(float(L.lambda_normal_consistency) * normal_consistency_loss(
            torch.nn.functional.normalize(normal, dim=-1), n_hat, inside.to(depth.dtype)))
    if prior_normal is not None and L.lambda_normal_prior > 0 and prior_scale > 0:
        # NaN marks "no value" in the format (e.g. outside a body-model prior's silhouette):
        # only pixels inside the mask with a finite prior count, and NaN never enters the graph.
        pn = torch.as_tensor(prior_normal)
        ok = inside & torch.isfinite(pn).all(-1)
        terms.append(prior_scale * float(L.lambda_normal_prior) * normal_prior_loss(
            normal, torch.nan_to_num(pn, nan=0.0), ok))
    if L.lambda_normal_tv > 0:
        terms.append(float(L.lambda_normal_tv) * normal_tv_loss(normal, inside))
    return sum(terms) if terms else None


def full_loss_groups(cfg, out, posed, model, frame, prior: dict | None, iteration: int,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Loss groups of one iteration of the full model.

    Args:
        cfg: run config (``train.lambda_ssim``, ``train.lambda_mask`` and the ``loss`` section).
        out: :class:`fmgs.trainer.render.dispatch.RenderOutput` of ``posed`` (semantic logits in ``extras``).
        posed: :class:`fmgs.trainer.models.full.FullPosed`.
        model: the :class:`fmgs.trainer.models.full.FMGSAvatar` (skinning field, mesh buffers).
        frame: :class:`fmgs.trainer.data.humannerf.Frame` (image, mask, camera).
        prior: the frame's priors from :func:`fmgs.priors.load_priors` (None: no priors).
        iteration: current iteration (skinning-weight schedule).
        generator: RNG for pixel pairs and surface samples.

    Returns:
        ``{group name: scalar loss}``; groups without data are omitted.
    """
    L = cfg.loss
    dev = out.rgb.device

    def host(a) -> torch.Tensor:  # the frame's and priors' NumPy arrays, on the render's device
        return torch.as_tensor(a).to(dev)

    gt = host(frame.image)
    mask = host(frame.mask)
    groups = {"photometric": photometric_loss(out.rgb, gt, float(cfg.train.lambda_ssim))
              + float(cfg.train.lambda_mask) * mask_bce_loss(out.alpha, mask)}
    prior = prior or {}
    inside = mask > 0.5
    ps = prior_term_scale(cfg, prior)
    if prior.get("depth") is not None and L.lambda_depth > 0 and ps > 0:
        groups["depth"] = ps * float(L.lambda_depth) * depth_ranking_loss(
            out.depth, host(prior["depth"]), inside, int(L.depth_pairs), alpha=float(L.depth_alpha),
            generator=generator)
    K = torch.as_tensor(frame.camera.K, dtype=out.depth.dtype, device=dev)
    prior_normal = None if prior.get("normal") is None else host(prior["normal"])
    normal = normal_group_loss(cfg, out.depth, out.normal, K, inside, prior_normal, ps, iteration)
    if normal is not None:
        groups["normal"] = normal
    if prior.get("parts") is not None and out.extras is not None and L.lambda_semantic > 0:
        # Pixels the prior itself calls person (its mask, else parts > 0) and the image mask agrees.
        parts = host(prior["parts"])
        prior_fg = host(prior["mask"]) > 0.5 if prior.get("mask") is not None else parts > 0
        # With train.semantic_weights_only the logits were composited with constant weights,
        # so the loss can only reach the semantic field: it needs no restricted pass.
        name = "semantic_field" if semantic_weights_only(cfg) else "semantic"
        groups[name] = float(L.lambda_semantic) * semantic_ce_loss(out.extras, parts, inside & prior_fg)

    reg = []
    if posed.semantic_logits is not None and L.lambda_semantic_reg > 0:
        labels = posed.semantic_logits.argmax(-1).detach()
        reg.append(float(L.lambda_semantic_reg) * semantic_feature_consistency(
            posed.semantic_features, labels, normalization="pairs", generator=generator))
    if model.skinning_field is not None:
        w = skinning_weight_schedule(iteration, int(L.skinning_warmup), float(L.lambda_skinning_initial),
                                     float(L.lambda_skinning_final))
        pts, wts = sample_mesh_surface(model.mesh_verts, model.mesh_faces, model.mesh_skin_weights,
                                       int(L.skinning_samples), generator=generator)
        reg.append(w * skinning_regulariser(model.skinning_field, pts, wts, prior=model.cfg.skinning_prior))
    if L.lambda_isometry > 0:
        reg.append(float(L.lambda_isometry) * isometry_loss(posed.canonical_centers, posed.means,
                                                            model.neighbour_pairs))
    if L.lambda_scale_growth > 0:
        reg.append(float(L.lambda_scale_growth) * scale_growth_loss(posed.scales, model.scales0))
    if reg:
        groups["regularisers"] = sum(reg)
    return groups
